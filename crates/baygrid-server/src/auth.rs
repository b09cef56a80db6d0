//! Bearer tokens: issued by the operator, stored as SHA-256 hashes, checked on every request
//! (a revoked token fails at once), each carrying one role.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use baygrid_core::{Millis, Principal, Role};
use baygrid_store::TokenRecord;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

/// Valid tokens seen recently, so a request costs no store read. The server revokes
/// through [`TokenCache::clear`] at once; entries also age out after [`TokenCache::TTL`], so
/// a token changed in the store by other means (a restore, a hand edit) is read again soon.
/// There is no other server to tell: a store has one server (`Store::claim`).
///
/// A lookup that read the store before a revocation must not put the revoked token back
/// after the clear: each clear moves the cache to a new generation, and a lookup's entry is
/// kept only if no clear happened since it began.
#[derive(Default)]
pub struct TokenCache {
    entries: std::sync::RwLock<Entries>,
}

#[derive(Default)]
struct Entries {
    generation: u64,
    /// Each valid token's principal, when it was read, and when it expires.
    tokens: std::collections::HashMap<String, (Principal, std::time::Instant, Option<Millis>)>,
}

impl TokenCache {
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(5);

    /// A cached principal, or the generation to hand [`TokenCache::put`] after the store
    /// has been read.
    fn get(&self, hash: &str, now: Millis) -> Result<Principal, u64> {
        let entries = self.entries.read().expect("token cache lock");
        match entries.tokens.get(hash) {
            Some((principal, at, expires))
                if at.elapsed() < Self::TTL && expires.is_none_or(|e| now < e) =>
            {
                Ok(principal.clone())
            }
            _ => Err(entries.generation),
        }
    }

    /// Caches what the store said, unless the cache was cleared since `generation`.
    fn put(&self, generation: u64, hash: String, principal: Principal, expires: Option<Millis>) {
        let mut entries = self.entries.write().expect("token cache lock");
        if entries.generation != generation {
            return;
        }
        if entries.tokens.len() > 100_000 {
            entries.tokens.clear();
        }
        entries
            .tokens
            .insert(hash, (principal, std::time::Instant::now(), expires));
    }

    pub fn clear(&self) {
        let mut entries = self.entries.write().expect("token cache lock");
        entries.generation += 1;
        entries.tokens.clear();
    }
}

/// A new random secret: `bg_` and 64 hex digits.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("bg_{}", hex::encode(bytes))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Issues a token and returns `(record, secret)`; the secret is not stored.
pub async fn issue(
    state: &AppState,
    role: Role,
    subject: Option<String>,
    label: String,
    expires_ms: Option<Millis>,
    actor: &str,
) -> Result<(TokenRecord, String), ApiError> {
    let secret = new_secret();
    let now = state.now();
    let record = TokenRecord {
        id: baygrid_core::new_id("tok"),
        hash: hash_secret(&secret),
        role,
        subject,
        label,
        created_ms: now,
        revoked_ms: None,
        expires_ms,
    };
    state
        .store
        .insert_token(record.clone(), actor.to_string(), now)
        .await?;
    Ok((record, secret))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
        let value = header
            .to_str()
            .map_err(|_| ApiError::Unauthorized("Authorization header is not text".into()))?;
        let secret = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::Unauthorized("Authorization must be `Bearer TOKEN`".into()))?;
        principal_of(state, secret).await
    }
}

/// Who a token's secret is: a valid token's role and subject, or why it is refused.
pub async fn principal_of(state: &AppState, secret: &str) -> Result<Principal, ApiError> {
    let hash = hash_secret(secret.trim());
    let now = state.now();
    let generation = match state.tokens.get(&hash, now) {
        Ok(principal) => return Ok(principal),
        Err(generation) => generation,
    };
    let record = state
        .store
        .find_token(&hash)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".into()))?;
    if let Some(expired) = record.expires_ms.filter(|e| *e <= now) {
        return Err(ApiError::Unauthorized(format!(
            "token {} expired at {}",
            record.id,
            baygrid_core::millis_to_rfc3339(expired)
        )));
    }
    let principal = Principal {
        token_id: record.id,
        role: record.role,
        subject: record.subject,
    };
    state
        .tokens
        .put(generation, hash, principal.clone(), record.expires_ms);
    Ok(principal)
}

/// Refuses callers whose role is not in `roles`.
pub fn require(principal: &Principal, roles: &[Role]) -> Result<(), ApiError> {
    if roles.contains(&principal.role) {
        return Ok(());
    }
    let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(ApiError::Forbidden(format!(
        "role {} may not do this (allowed: {})",
        principal.role,
        allowed.join(", ")
    )))
}

/// A short description of the caller for the audit trail.
pub fn actor(principal: &Principal) -> String {
    match &principal.subject {
        Some(subject) => format!("{}:{subject}", principal.role),
        None => principal.role.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal {
            token_id: "tok_1".into(),
            role: Role::Tenant,
            subject: Some("gz-ai-lab".into()),
        }
    }

    #[test]
    fn a_lookup_that_began_before_a_revocation_does_not_cache_the_token_after_it() {
        let cache = TokenCache::default();
        // a request misses the cache and reads the store (the token is still valid there)
        let began = cache.get("h", 0).unwrap_err();
        // meanwhile the token is revoked: the store first, then the cache
        cache.clear();
        // the request's answer from the store comes back late and is not kept
        cache.put(began, "h".into(), principal(), None);
        assert!(cache.get("h", 0).is_err());
        // a lookup that began after the clear is kept
        let now = cache.get("h", 0).unwrap_err();
        cache.put(now, "h".into(), principal(), None);
        assert_eq!(cache.get("h", 0).unwrap(), principal());
    }

    #[test]
    fn a_cached_token_is_not_served_past_its_expiry() {
        let cache = TokenCache::default();
        let generation = cache.get("h", 0).unwrap_err();
        cache.put(generation, "h".into(), principal(), Some(100));
        assert_eq!(cache.get("h", 99).unwrap(), principal());
        // the store is read again, which says it expired
        assert!(cache.get("h", 100).is_err());
    }
}
