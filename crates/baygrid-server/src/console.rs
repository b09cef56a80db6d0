//! The console at `/console`: pages for people, rendered on the server from the very
//! handlers the API serves, so a page shows exactly what the caller's token may read.
//!
//! Signing in posts a token once; the server sets it as an HttpOnly, SameSite=Strict
//! cookie scoped to `/console`, and checks it like a bearer token on every page (a revoked
//! token signs the page out at once). The pages only read: every change goes through the API or
//! the CLI. Every value is HTML-escaped, and the pages carry a content security policy
//! that runs no script.

use axum::extract::{Form, Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use baygrid_api::{AccountView, ClusterView, FusionEvent, FusionView, JobView, QueryView};
use baygrid_core::{Principal, Role};
use serde::Deserialize;

use crate::body::QueryParams;
use crate::error::ApiError;
use crate::paging::ListParams;
use crate::AppState;

/// The cookie that carries the signed-in token.
const COOKIE_NAME: &str = "baygrid_console";
/// Rows of each list on the overview.
const ROWS: i64 = 50;

/// The overview, or the sign-in form when the caller is not signed in.
pub async fn overview(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let who = match signed_in(&state, &headers).await {
        Ok(who) => who,
        Err(why) => return sign_in_page(StatusCode::OK, why.as_deref()),
    };
    let mut body = String::new();
    body.push_str(&section(
        "Clusters",
        crate::catalog::list_clusters(State(state.clone()), who.clone())
            .await
            .map(|c| clusters_table(&c.0)),
    ));
    body.push_str(&section(
        "Jobs, newest first",
        crate::jobs::list(State(state.clone()), who.clone(), QueryParams(newest()))
            .await
            .map(|j| jobs_page(&j.0)),
    ));
    body.push_str(&section(
        "Queries at the data, newest first",
        crate::queries::list(State(state.clone()), who.clone(), QueryParams(newest()))
            .await
            .map(|q| queries_table(&q.0)),
    ));
    body.push_str(&section(
        "Fusion runs, newest first",
        crate::fusion::list(State(state.clone()), who.clone(), QueryParams(newest()))
            .await
            .map(|f| fusion_table(&f.0)),
    ));
    body.push_str(&section(
        "Accounts",
        crate::ledger::list_accounts(State(state.clone()), who.clone())
            .await
            .map(|a| accounts_table(&a.0)),
    ));
    body.push_str(&section("Audit log", audit_checkpoint(&state, &who).await));
    page(StatusCode::OK, "baygrid", &who, &body)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Older {
    pub before: String,
}

/// Older jobs: the page after the job `before` names.
pub async fn jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(older): QueryParams<Older>,
) -> Response {
    detail(
        &state,
        &headers,
        "older jobs".into(),
        |state, who| async move {
            let params = ListParams {
                before: Some(older.before),
                ..newest()
            };
            let jobs = crate::jobs::list(State(state), who, QueryParams(params)).await?;
            Ok(jobs_page(&jobs.0))
        },
    )
    .await
}

/// A page of jobs, with a link to the older ones when the page is full.
fn jobs_page(jobs: &[JobView]) -> String {
    let mut html = jobs_table(jobs);
    if let (Some(last), true) = (jobs.last(), jobs.len() as i64 >= ROWS) {
        html.push_str(&format!(
            "<p><a href=\"/console/jobs?before={}\">older jobs</a></p>",
            esc(&last.id)
        ));
    }
    html
}

/// One job: what it is, where it ran, and every change of its state.
pub async fn job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    detail(
        &state,
        &headers,
        format!("job {id}"),
        |state, who| async move {
            let job = crate::jobs::get(State(state), who, Path(id)).await?;
            Ok(job_detail(&job.0))
        },
    )
    .await
}

/// One fusion run: its workers and where they ran, its placement, every round, its log.
pub async fn fusion_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    detail(
        &state,
        &headers,
        format!("fusion run {id}"),
        |state, who| async move {
            let (run, log) = crate::fusion::view_and_log(&state, &who, &id).await?;
            Ok(fusion_detail(&run, &log))
        },
    )
    .await
}

/// One query: what it asked, what it cost, and the result that left the vault.
pub async fn query(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    detail(
        &state,
        &headers,
        format!("query {id}"),
        |state, who| async move {
            let no_wait = crate::queries::GetParams { wait_ms: None };
            let query =
                crate::queries::get(State(state), who, Path(id), QueryParams(no_wait)).await?;
            Ok(query_detail(&query.0))
        },
    )
    .await
}

/// A page about one thing, drawn by `render` for the signed-in caller, or why not.
async fn detail<F, Fut>(state: &AppState, headers: &HeaderMap, title: String, render: F) -> Response
where
    F: FnOnce(AppState, Principal) -> Fut,
    Fut: std::future::Future<Output = Result<String, ApiError>>,
{
    let who = match signed_in(state, headers).await {
        Ok(who) => who,
        Err(why) => return sign_in_page(StatusCode::UNAUTHORIZED, why.as_deref()),
    };
    match render(state.clone(), who.clone()).await {
        Ok(body) => page(StatusCode::OK, &title, &who, &body),
        Err(e) => page(
            e.status(),
            &title,
            &who,
            &format!("<p class=\"refused\">{}</p>", esc(&e.to_string())),
        ),
    }
}

#[derive(Debug, Deserialize)]
pub struct SignIn {
    pub token: String,
}

/// Signs in with a token: the cookie is set only for a token the exchange accepts.
pub async fn sign_in(State(state): State<AppState>, Form(form): Form<SignIn>) -> Response {
    let token = form.token.trim();
    if token.is_empty() {
        return sign_in_page(StatusCode::BAD_REQUEST, Some("token: paste a token"));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return sign_in_page(StatusCode::BAD_REQUEST, Some("token: not a token"));
    }
    if let Err(e) = crate::auth::principal_of(&state, token).await {
        return sign_in_page(e.status(), Some(&e.to_string()));
    }
    let cookie =
        format!("{COOKIE_NAME}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age=43200");
    (
        StatusCode::SEE_OTHER,
        [(SET_COOKIE, cookie), (LOCATION, "/console".to_string())],
    )
        .into_response()
}

/// Signs out: the cookie goes.
pub async fn sign_out() -> Response {
    let cookie = format!("{COOKIE_NAME}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [(SET_COOKIE, cookie), (LOCATION, "/console".to_string())],
    )
        .into_response()
}

/// The caller the cookie names; `Err(None)` when there is no cookie, `Err(Some(why))` when
/// its token is refused.
async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Principal, Option<String>> {
    let token = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_string())
        .filter(|value| !value.is_empty())
        .ok_or(None)?;
    crate::auth::principal_of(state, &token)
        .await
        .map_err(|e| Some(format!("signed out: {e}")))
}

fn newest() -> ListParams {
    ListParams {
        state: None,
        tenant: None,
        limit: Some(ROWS),
        before: None,
    }
}

/// The latest signed checkpoint, for those who may read the log.
async fn audit_checkpoint(state: &AppState, who: &Principal) -> Result<String, ApiError> {
    crate::auth::require(who, &[Role::Operator, Role::Regulator])?;
    crate::audit::sync(state).await?;
    Ok(format!("<pre>{}</pre>", esc(&state.audit.checkpoint())))
}

/// A section of the overview: its table, or why the caller's role does not see it.
fn section(title: &str, content: Result<String, ApiError>) -> String {
    let inner = match content {
        Ok(html) => html,
        Err(ApiError::Forbidden(why)) => format!("<p class=\"muted\">{}</p>", esc(&why)),
        Err(e) => format!("<p class=\"refused\">{}</p>", esc(&e.to_string())),
    };
    format!("<section><h2>{}</h2>{inner}</section>", esc(title))
}

fn clusters_table(clusters: &[ClusterView]) -> String {
    table(
        &[
            "CLUSTER",
            "SITE",
            "JURISDICTION",
            "ENGINE",
            "ACCELERATORS",
            "IN USE",
            "AGENT",
        ],
        clusters.iter().map(|c| {
            vec![
                esc(&c.cluster.name),
                esc(&c.cluster.site),
                esc(&format!("{:?}", c.jurisdiction)),
                esc(&format!("{:?}", c.cluster.engine).to_lowercase()),
                esc(&format!(
                    "{} × {} {}",
                    c.cluster.nodes, c.cluster.accelerators_per_node, c.cluster.accelerator
                )),
                format!("{} of {}", c.accelerators_in_use, c.accelerators_total),
                if c.online { "online" } else { "offline" }.to_string(),
            ]
        }),
    )
}

fn jobs_table(jobs: &[JobView]) -> String {
    table(
        &[
            "JOB",
            "NAME",
            "TENANT",
            "STATE",
            "SITE",
            "COST",
            "SUBMITTED",
            "REASON",
        ],
        jobs.iter().map(|j| {
            vec![
                link("jobs", &j.id),
                esc(&j.name),
                esc(&j.tenant),
                esc(j.state.as_str()),
                esc(&dash(j.site.as_ref())),
                esc(&dash(j.cost)),
                esc(&j.submitted_at),
                esc(&j.reason),
            ]
        }),
    )
}

fn queries_table(queries: &[QueryView]) -> String {
    table(
        &["QUERY", "TENANT", "STATE", "SQL", "CREATED"],
        queries.iter().map(|q| {
            vec![
                link("queries", &q.id),
                esc(&q.tenant),
                esc(q.state.as_str()),
                esc(&q.sql),
                esc(&q.created_at),
            ]
        }),
    )
}

fn fusion_table(runs: &[FusionView]) -> String {
    table(
        &["RUN", "TASK", "STATE", "ROUNDS", "CHARGED", "CREATED"],
        runs.iter().map(|r| {
            vec![
                link("fusion", &r.id),
                esc(r.task.as_str()),
                esc(r.state.as_str()),
                r.rounds.len().to_string(),
                esc(&dash(r.charged)),
                esc(&r.created_at),
            ]
        }),
    )
}

fn accounts_table(accounts: &[AccountView]) -> String {
    table(
        &["ACCOUNT", "OWNER", "KIND", "BALANCE", "AVAILABLE"],
        accounts.iter().map(|a| {
            vec![
                esc(&a.id),
                esc(&a.owner),
                esc(&a.kind),
                esc(&a.balance.to_string()),
                esc(&a.available.to_string()),
            ]
        }),
    )
}

/// A link to a thing's page in the console.
fn link(kind: &str, id: &str) -> String {
    format!("<a href=\"/console/{kind}/{}\">{}</a>", esc(id), esc(id))
}

/// Names and values as a definition list (values escaped here).
fn facts(pairs: &[(&str, String)]) -> String {
    let mut html = String::from("<dl>");
    for (name, value) in pairs {
        html.push_str(&format!("<dt>{}</dt><dd>{}</dd>", esc(name), esc(value)));
    }
    html.push_str("</dl>");
    html
}

fn fusion_detail(run: &FusionView, log: &[FusionEvent]) -> String {
    let mut html = facts(&[
        ("task", run.task.as_str().to_string()),
        ("tenant", run.tenant.clone()),
        ("purpose", run.purpose.clone()),
        ("state", run.state.as_str().to_string()),
        ("aggregation", dash(run.aggregation.as_ref())),
        ("held", run.held.to_string()),
        ("charged", dash(run.charged)),
        ("error", dash(run.error.as_ref())),
        ("created", run.created_at.clone()),
        ("finished", dash(run.finished_at.as_ref())),
    ]);
    html.push_str("<h2>Workers</h2>");
    html.push_str(&table(
        &[
            "#", "ROLE", "DATASET", "SITE", "STATE", "JOB", "SECONDS", "MODEL", "SCORES", "ERROR",
        ],
        run.workers.iter().map(|w| {
            vec![
                w.index.to_string(),
                esc(&w.role),
                esc(&dash(w.dataset.as_ref())),
                esc(&format!("{} ({:?})", w.site, w.jurisdiction)),
                esc(&format!("{:?}", w.state).to_lowercase()),
                w.job
                    .as_deref()
                    .map_or_else(|| "-".into(), |j| link("jobs", j)),
                format!("{:.1}", w.seconds),
                esc(&dash(w.model.as_ref())),
                esc(&dash(w.scores.as_ref())),
                esc(&dash(w.error.as_ref())),
            ]
        }),
    ));
    html.push_str("<h2>Placement</h2>");
    html.push_str(&lines(&run.placement));
    html.push_str("<h2>Rules</h2>");
    html.push_str(&lines(&run.rules));
    html.push_str("<h2>Rounds</h2>");
    html.push_str(&table(
        &["ROUND", "LOSS", "GRADIENT NORM", "SECONDS", "BYTES"],
        run.rounds.iter().map(|r| {
            vec![
                r.round.to_string(),
                dash(r.loss.map(|l| format!("{l:.6}"))),
                dash(r.gradient_norm.map(|g| format!("{g:.6}"))),
                format!("{:.3}", r.seconds),
                r.bytes.to_string(),
            ]
        }),
    ));
    html.push_str("<h2>Log</h2>");
    html.push_str(&table(
        &["AT", "LINE"],
        log.iter().map(|e| vec![esc(&e.at), esc(&e.line)]),
    ));
    html
}

fn query_detail(query: &QueryView) -> String {
    let mut html = facts(&[
        ("tenant", query.tenant.clone()),
        ("purpose", query.purpose.clone()),
        ("state", query.state.as_str().to_string()),
        ("sql", query.sql.clone()),
        ("result SHA-256", dash(query.result_sha256.as_ref())),
        (
            "charged",
            query
                .charged
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("error", dash(query.error.as_ref())),
        ("created", query.created_at.clone()),
        ("finished", dash(query.finished_at.as_ref())),
    ]);
    html.push_str("<h2>Privacy cost</h2>");
    html.push_str(&table(
        &["DATASET", "SITE", "CONTRACT", "EPSILON", "DELTA"],
        query.cost.iter().map(|c| {
            vec![
                esc(&c.dataset),
                esc(&c.site),
                esc(&c.contract),
                c.epsilon.to_string(),
                c.delta.to_string(),
            ]
        }),
    ));
    html.push_str("<h2>Result</h2>");
    match &query.result {
        Some(result) => {
            let headers: Vec<&str> = result.columns.iter().map(String::as_str).collect();
            html.push_str(&table(
                &headers,
                result.rows.iter().map(|row| {
                    row.iter()
                        .map(|v| match v {
                            serde_json::Value::String(s) => esc(s),
                            other => esc(&other.to_string()),
                        })
                        .collect()
                }),
            ));
            html.push_str(&table(
                &["OUTPUT", "MECHANISM", "SCALE"],
                result
                    .noise
                    .iter()
                    .map(|n| vec![esc(&n.output), esc(&n.mechanism), n.scale.to_string()]),
            ));
        }
        None => html.push_str("<p class=\"muted\">nothing left the vault</p>"),
    }
    html.push_str("<h2>Rules</h2>");
    html.push_str(&lines(&query.rules));
    html
}

/// Lines of text as a list.
fn lines(items: &[String]) -> String {
    if items.is_empty() {
        return "<p class=\"muted\">none</p>".into();
    }
    let mut html = String::from("<ul>");
    for item in items {
        html.push_str(&format!("<li>{}</li>", esc(item)));
    }
    html.push_str("</ul>");
    html
}

fn job_detail(job: &JobView) -> String {
    let mut html = facts(&[
        ("name", job.name.clone()),
        ("tenant", job.tenant.clone()),
        ("state", job.state.as_str().to_string()),
        ("reason", job.reason.clone()),
        ("priority", job.priority.to_string()),
        ("cluster", dash(job.cluster.as_ref())),
        ("site", dash(job.site.as_ref())),
        ("attempts", job.attempts.to_string()),
        ("exit code", dash(job.exit_code)),
        ("cost", dash(job.cost)),
        ("submitted", job.submitted_at.clone()),
        ("started", dash(job.started_at.as_ref())),
        ("finished", dash(job.finished_at.as_ref())),
        ("command", job.spec.command.clone()),
    ]);
    html.push_str("<h2>Every change of state</h2>");
    html.push_str(&table(
        &["AT", "FROM", "TO", "REASON"],
        job.events.iter().map(|e| {
            vec![
                esc(&e.at),
                esc(&dash(e.from.map(|s| s.as_str()))),
                esc(e.to.as_str()),
                esc(&e.reason),
            ]
        }),
    ));
    html
}

/// A value, or `-` where there is none.
fn dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Rows under headers; every cell is HTML already (escaped by the caller).
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut html = String::from("<table><thead><tr>");
    for h in headers {
        html.push_str(&format!("<th>{}</th>", esc(h)));
    }
    html.push_str("</tr></thead><tbody>");
    let mut empty = true;
    for row in rows {
        empty = false;
        html.push_str("<tr>");
        for cell in row {
            html.push_str(&format!("<td>{cell}</td>"));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    if empty {
        return "<p class=\"muted\">none</p>".into();
    }
    html
}

/// Text made safe inside HTML elements and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}.muted{color:#777}.refused{color:#a00}\
header{display:flex;gap:1em;align-items:baseline}pre{background:#f7f7f7;padding:.5em}dt{font-weight:600}dd{margin:0 0 .3em 1em}";

/// A whole page: the caller, a way out, and `body`.
fn page(status: StatusCode, title: &str, who: &Principal, body: &str) -> Response {
    let caller = match &who.subject {
        Some(subject) => format!("{} {}", who.role, subject),
        None => who.role.to_string(),
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head>\
         <body><header><h1><a href=\"/console\">baygrid</a></h1><span>signed in as {caller}</span>\
         <form method=\"post\" action=\"/console/logout\"><button>sign out</button></form></header>{body}</body></html>",
        title = esc(title),
        caller = esc(&caller),
    );
    html_response(status, html)
}

/// The sign-in form, with why the last try or the cookie was refused.
fn sign_in_page(status: StatusCode, why: Option<&str>) -> Response {
    let note = why
        .map(|w| format!("<p class=\"refused\">{}</p>", esc(w)))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>baygrid: sign in</title><style>{STYLE}</style></head>\
         <body><h1>baygrid</h1>{note}<form method=\"post\" action=\"/console/login\">\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"off\" size=\"70\"></label> \
         <button>sign in</button></form>\
         <p class=\"muted\">A token from <code>baygrid token issue</code> (the operator's is in the data directory's \
         <code>operator.token</code> under <code>baygrid up</code>). The console shows what the token may read.</p></body></html>"
    );
    html_response(status, html)
}

fn html_response(status: StatusCode, html: String) -> Response {
    (
        status,
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/html; charset=utf-8",
            ),
            (
                CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
            ),
            (CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
    }

    #[test]
    fn an_empty_table_says_none() {
        assert!(table(&["A"], std::iter::empty()).contains("none"));
        let one = table(&["A"], [vec!["1".to_string()]].into_iter());
        assert!(one.contains("<td>1</td>") && one.contains("<th>A</th>"));
    }
}
