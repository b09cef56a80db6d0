//! One error type at the HTTP edge: each error maps to a status, a stable code and a message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use baygrid_api::ErrorBody;
use baygrid_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Unprocessable {
        code: &'static str,
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    TooLarge(String),
}

impl ApiError {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// The HTTP status the error answers with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            ApiError::BadRequest { field, .. } => {
                (StatusCode::BAD_REQUEST, "bad_request", field.clone())
            }
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", None),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            ApiError::Unprocessable { code, field, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, code, field.clone())
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", None),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            StoreError::StaleLease(message) => {
                ApiError::Conflict(format!("stale lease: {message}"))
            }
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Ledger { transfer, error } => {
                use baygrid_ledger::TransferError as E;
                let message = format!("transfer {transfer}: {error}");
                match error {
                    E::ExistsWithDifferentBody(_) | E::AlreadyResolved(_) => {
                        ApiError::Conflict(message)
                    }
                    E::ExceedsCredits { .. } => ApiError::Unprocessable {
                        code: "insufficient_funds",
                        field: None,
                        message,
                    },
                    _ => ApiError::Unprocessable {
                        code: "ledger_refused",
                        field: None,
                        message,
                    },
                }
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::Unavailable(format!("store unavailable: {other}"))
            }
        }
    }
}

impl From<baygrid_core::SpecError> for ApiError {
    fn from(error: baygrid_core::SpecError) -> Self {
        ApiError::BadRequest {
            field: Some(error.field.clone()),
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.parts();
        let body = ErrorBody {
            code: code.to_string(),
            message: self.to_string(),
            field,
        };
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
