//! Lists of jobs, queries and fusion runs come newest first, a page at a time: at most
//! `limit` rows, and `before` (the id of the previous page's last row) for the next page.

use crate::error::ApiError;

/// Rows in a page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 1000;
/// The most rows one page may ask for.
pub const MAX_LIMIT: i64 = 100_000;

/// The page size asked for, checked.
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

/// The error for a `before` that names nothing the caller may list.
pub fn unknown_before(kind: &str, id: &str) -> ApiError {
    ApiError::bad(
        "before",
        format!("no {kind} `{id}` you may see: pass the id of the last row of the previous page"),
    )
}
