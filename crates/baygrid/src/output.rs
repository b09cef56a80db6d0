//! Tables for people, JSON for scripts.

use serde::Serialize;

use crate::Output;

/// Prints rows under headers with aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `value` as pretty JSON, or the table `render` draws.
pub fn emit<T: Serialize>(output: Output, value: &T, render: impl FnOnce(&T)) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("output serializes")
        ),
        Output::Table => render(value),
    }
}

pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Which rows of a newest-first list (jobs, queries, fusion runs) to show, a page at a time.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only those in this state, one of those named above
    #[arg(long)]
    pub state: Option<String>,
    /// For operators and regulators: only this tenant's
    #[arg(long)]
    pub tenant: Option<String>,
    /// At most this many rows, newest first (the server's default: 1000)
    #[arg(long)]
    pub limit: Option<i64>,
    /// The next page: the rows listed after this id, the previous page's last
    #[arg(long)]
    pub before: Option<String>,
}

/// The server's page size when none is asked for.
const DEFAULT_PAGE: usize = 1000;

/// `base` with the parameters that are given, as a query string.
pub fn query_path(base: &str, params: &[(&str, Option<String>)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={}", encode(v))))
        .collect();
    match query.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", query.join("&")),
    }
}

/// Text percent-encoded for a URL's path segment or query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Under a table that filled its page (`limit`, or the server's default), on stderr: the
/// command for the next page, `next` being the option that starts it and the last row's id.
pub fn hint_next(
    output: Output,
    limit: Option<i64>,
    shown: usize,
    next: (&str, Option<String>),
    command: &str,
) {
    let full = limit.map_or(shown >= DEFAULT_PAGE, |l| shown as i64 >= l);
    if let (Output::Table, true, (cursor, Some(last))) = (output, full, next) {
        eprintln!("more may follow: {command} {cursor} {last}");
    }
}

impl ListArgs {
    /// `base` with what is given, as a query string.
    pub fn path(&self, base: &str) -> String {
        query_path(
            base,
            &[
                ("state", self.state.clone()),
                ("tenant", self.tenant.clone()),
                ("limit", self.limit.map(|l| l.to_string())),
                ("before", self.before.clone()),
            ],
        )
    }

    /// Under a full page's table, on stderr: how to ask for the next one.
    pub fn hint_next(&self, output: Output, shown: usize, last_id: Option<&str>, command: &str) {
        hint_next(
            output,
            self.limit,
            shown,
            ("--before", last_id.map(str::to_string)),
            command,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_path_carries_only_what_is_given_encoded() {
        let first = ListArgs {
            state: None,
            tenant: None,
            limit: None,
            before: None,
        };
        assert_eq!(first.path("/api/v1/jobs"), "/api/v1/jobs");
        let next = ListArgs {
            state: Some("queued".into()),
            tenant: Some("a&b c".into()),
            limit: Some(50),
            before: Some("job_01".into()),
        };
        assert_eq!(
            next.path("/api/v1/jobs"),
            "/api/v1/jobs?state=queued&tenant=a%26b%20c&limit=50&before=job_01"
        );
    }
}
