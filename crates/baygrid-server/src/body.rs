//! JSON bodies whose errors name the field at fault.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The most a request body may carry (axum's default limit, which the server keeps).
pub const BODY_LIMIT: usize = 2 << 20;

/// Like `axum::Json`, but a bad body is a 400 that names the field and the problem, and one
/// over [`BODY_LIMIT`] a 413.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// The body's bytes, for handlers that parse it themselves; its errors are JSON like every
/// other answer (413 over [`BODY_LIMIT`]).
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|e| match e.status() {
                axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!(
                    "the body is larger than the {} MiB a request may carry",
                    BODY_LIMIT >> 20
                )),
                _ => ApiError::BadRequest {
                    field: None,
                    message: format!("cannot read body: {e}"),
                },
            })
    }
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::BadRequest {
            field: None,
            message: "body is empty: send a JSON object".into(),
        });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let e = baygrid_core::SpecError::at(e.path(), &e.inner().to_string(), "body");
        ApiError::BadRequest {
            message: e.to_string(),
            field: Some(e.field),
        }
    })
}

/// Like `axum::extract::Query`, but a bad query string is a JSON 400 naming the parameter.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(QueryParams)
            .map_err(|e| {
                let inner = e.inner().to_string();
                let field = match e.path().to_string().as_str() {
                    "." | "?" => inner
                        .split('`')
                        .nth(1)
                        .map(str::to_string)
                        .unwrap_or_else(|| "query".to_string()),
                    path => path.to_string(),
                };
                ApiError::BadRequest {
                    message: format!("query parameter {field}: {inner}"),
                    field: Some(field),
                }
            })
    }
}
