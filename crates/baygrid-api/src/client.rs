//! A typed client for the API, used by the CLI and the agent.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; its field, when it names one, leads.
    #[error("{}{message} ({code}, HTTP {status})", field_prefix(.field, .message))]
    Api {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

/// `field: `, unless the message already starts with the field as a word of its own
/// or a path into it (`budget: …`, `budget must …`, `resources.nodes: …` for `resources`;
/// but `budgets are …` still gets the prefix).
fn field_prefix(field: &Option<String>, message: &str) -> String {
    let Some(field) = field else {
        return String::new();
    };
    let named = message.strip_prefix(field.as_str()).is_some_and(|rest| {
        rest.chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-')))
    });
    if named {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// An error a restarting server gives: it cannot be reached, or it (or a proxy before
    /// it) answers 502, 503 or 504.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Api { status, .. } => matches!(status, 502..=504),
            ClientError::Decode(_) => false,
        }
    }
}

/// How long the CLI's waiting commands and the workers at the vaults keep asking a server
/// that is restarting (see [`patiently`]): long enough for a restart, while the work they
/// wait on goes on.
pub const PATIENCE: Duration = Duration::from_secs(300);

/// Runs `attempt` again while it fails with a transient error (see
/// [`ClientError::is_transient`]), backing off from 250 ms to 5 s, until `patience` has
/// passed since the first such failure. `note` hears of that first failure (`Some`) and,
/// when there was one, of the answer that came at last (`None`). An attempt must be safe to
/// repeat: the request may have been carried out before its answer was lost.
pub async fn patiently<T, F, Fut>(
    patience: Duration,
    mut attempt: F,
    mut note: impl FnMut(Option<&ClientError>),
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut deadline = None;
    let mut pause = Duration::from_millis(250);
    loop {
        match attempt().await {
            Ok(value) => {
                if deadline.is_some() {
                    note(None);
                }
                return Ok(value);
            }
            Err(e) if e.is_transient() => {
                let deadline = *deadline.get_or_insert_with(|| {
                    note(Some(&e));
                    tokio::time::Instant::now() + patience
                });
                if tokio::time::Instant::now() >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A connection to one server with one token.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client builds");
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token this client sends.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Issues a token (operator) and returns a client that uses it.
    pub async fn issue(
        &self,
        role: baygrid_core::Role,
        subject: Option<&str>,
    ) -> Result<Client, ClientError> {
        let request = crate::IssueTokenRequest {
            role,
            subject: subject.map(str::to_string),
            label: None,
            expires_in: None,
        };
        let issued: crate::IssuedToken = self.post("/api/v1/tokens", &request).await?;
        Ok(Client {
            token: Some(issued.token),
            ..self.clone()
        })
    }

    /// Registers a party and a tenant of the same name with a budget (operator), and
    /// returns a client with that tenant's token.
    pub async fn add_tenant(
        &self,
        name: &str,
        jurisdiction: baygrid_core::Jurisdiction,
        city: &str,
        budget: baygrid_core::Money,
    ) -> Result<Client, ClientError> {
        let party = baygrid_core::Party {
            name: name.into(),
            jurisdiction,
            city: city.into(),
            ciio: false,
        };
        let _: baygrid_core::Party = self.post("/api/v1/parties", &party).await?;
        let tenant = baygrid_core::Tenant {
            name: name.into(),
            party: name.into(),
            budget,
        };
        let _: baygrid_core::Tenant = self.post("/api/v1/tenants", &tenant).await?;
        self.issue(baygrid_core::Role::Tenant, Some(name)).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<(), T>(Method::GET, path, None, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(Method::POST, path, Some(body), None).await
    }

    /// POST with an `Idempotency-Key`: a retry returns the first result.
    pub async fn post_idempotent<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        key: &str,
    ) -> Result<T, ClientError> {
        self.send(Method::POST, path, Some(body), Some(key)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<(), T>(Method::DELETE, path, None, None).await
    }

    /// Sends a request and decodes the answer, or the API's error body.
    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        idempotency_key: Option<&str>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self
            .exchange(method, path, |mut request| {
                if let Some(key) = idempotency_key {
                    request = request.header("Idempotency-Key", key);
                }
                if let Some(body) = body {
                    request = request.json(body);
                }
                request
            })
            .await?;
        let bytes = if bytes.is_empty() || status == StatusCode::NO_CONTENT {
            bytes::Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(format!("{path}: {e}")))
    }

    /// POSTs raw bytes (`application/octet-stream`).
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<(), ClientError> {
        self.exchange(Method::POST, path, |request| {
            request
                .header("Content-Type", "application/octet-stream")
                .body(body)
        })
        .await
        .map(|_| ())
    }

    /// GETs raw bytes.
    pub async fn get_bytes(&self, path: &str) -> Result<bytes::Bytes, ClientError> {
        self.exchange(Method::GET, path, |request| request)
            .await
            .map(|(_, bytes)| bytes)
    }

    /// Sends a request with the bearer token; a success's status and body, or the API's
    /// error.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        prepare: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<(StatusCode, bytes::Bytes), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response =
            prepare(request)
                .send()
                .await
                .map_err(|source| ClientError::Unreachable {
                    url: url.clone(),
                    source,
                })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        if status.is_success() {
            return Ok((status, bytes));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status: status.as_u16(),
                code: body.code,
                message: body.message,
                field: body.field,
            }),
            Err(_) => Err(ClientError::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                field: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::field_prefix;

    #[test]
    fn the_field_leads_unless_the_message_already_names_it() {
        let budget = Some("budget".to_string());
        for (field, message, prefix) in [
            (&budget, "budgets are kept in CNY", "budget: "),
            (&budget, "budget: must not be negative", ""),
            (&budget, "budget must not be negative", ""),
            (&budget, "budget", ""),
            (
                &Some("resources".into()),
                "resources.nodes: must be at least 1",
                "",
            ),
            (
                &Some("resources.nodes".into()),
                "resources.nodes: must be at least 1",
                "",
            ),
            (&Some("inputs".into()), "inputs[0]: unknown dataset", ""),
            (&Some("input".into()), "inputs[0]: unknown", "input: "),
            (&None, "anything", ""),
        ] {
            assert_eq!(field_prefix(field, message), prefix, "{field:?} {message}");
        }
    }
}
