//! Long answers come a page at a time. Lists of jobs, queries and fusion runs come newest
//! first: at most `limit` rows, and `before` (the id of the previous page's last row) for the
//! next page. An account's statement comes oldest first, with `after` its `next`.

use baygrid_core::Millis;
use baygrid_store::{Below, RecordRow};
use serde::Deserialize;

use crate::error::ApiError;

/// Rows in a page unless `limit` says otherwise.
const DEFAULT_LIMIT: i64 = 1000;
/// The most rows one page may ask for.
const MAX_LIMIT: i64 = 100_000;

/// A page size asked for (`limit`), checked; the default when none was.
pub fn limit(asked: Option<i64>) -> Result<i64, ApiError> {
    let limit = asked.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    Ok(limit)
}

/// What a list of jobs, queries or fusion runs is asked for.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only those in this state (an unknown state is a 400 naming the list's states).
    pub state: Option<String>,
    /// For operators and regulators: only this tenant's.
    pub tenant: Option<String>,
    /// At most this many (default 1000, at most 100,000).
    pub limit: Option<i64>,
    /// The next page: only those listed after this id (the previous page's last row).
    pub before: Option<String>,
}

impl ListParams {
    /// The page size asked for, checked.
    pub fn limit(&self) -> Result<i64, ApiError> {
        limit(self.limit)
    }

    /// The state asked for, when it is one of `states`.
    pub fn state_in(&self, states: &[&str]) -> Result<Option<&str>, ApiError> {
        match self.state.as_deref() {
            Some(s) if !states.contains(&s) => Err(ApiError::bad(
                "state",
                format!("one of {}", states.join(", ")),
            )),
            state => Ok(state),
        }
    }
}

/// Where the page after `before` starts: the time and id of the row it names, when the
/// caller may see that row (`seen`).
pub fn below(kind: &str, before: &str, seen: Option<(Millis, String)>) -> Result<Below, ApiError> {
    let (at_ms, id) = seen.ok_or_else(|| {
        ApiError::bad(
            "before",
            format!(
                "no {kind} `{before}` you may see: pass the id of the last row of the previous page"
            ),
        )
    })?;
    Ok(Below { at_ms, id })
}

/// Where the page after `before` starts among queries or fusion runs: below `row`, the
/// row `before` names as read, when the caller `sees` it.
pub fn below_record(
    kind: &str,
    before: &str,
    row: Option<RecordRow>,
    sees: impl Fn(&RecordRow) -> bool,
) -> Result<Below, ApiError> {
    let seen = row.filter(|r| sees(r)).map(|r| (r.created_ms, r.id));
    below(kind, before, seen)
}
