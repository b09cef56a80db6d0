//! `baygrid query`: aggregate questions asked of datasets at their vaults.

use std::process::ExitCode;

use baygrid_api::{Mechanism, QueryDryRun, QueryRequest, QueryState, QueryView};
use clap::{Args as ClapArgs, Subcommand};

use crate::output::{emit, table, ListArgs};
use crate::Args;

#[derive(Debug, ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QueryArgs {
    #[command(subcommand)]
    command: Option<QueryCommand>,
    #[command(flatten)]
    ask: Option<Ask>,
}

/// Ask a question: only the noisy aggregate comes back.
#[derive(Debug, ClapArgs)]
pub struct Ask {
    /// The dataset asked about (in SQL, a dataset's `-` is written `_`).
    #[arg(long)]
    dataset: String,
    /// One SELECT of aggregates (COUNT, COUNT(DISTINCT subject), SUM, AVG as the offer
    /// allows), optionally grouped by the offer's dimensions.
    #[arg(long)]
    sql: String,
    /// The query contract's purpose (default: that of your only query contract on it).
    #[arg(long)]
    purpose: Option<String>,
    /// The query's ε, split over its aggregations.
    #[arg(long)]
    epsilon: Option<f64>,
    /// The query's δ when it groups or its noise is Gaussian.
    #[arg(long)]
    delta: Option<f64>,
    /// The noise on released numbers: laplace (ε-DP) or gaussian ((ε, δ)-DP, the analytic
    /// Gaussian mechanism).
    #[arg(long, value_parser = mechanism, default_value = "laplace")]
    mechanism: Mechanism,
    /// Show the privacy cost and the budgets left; spend and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// For operators: the tenant to act for.
    #[arg(long)]
    tenant: Option<String>,
}

fn mechanism(text: &str) -> Result<Mechanism, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| format!("`{text}` is not a mechanism: laplace or gaussian"))
}

#[derive(Debug, Subcommand)]
pub enum QueryCommand {
    /// Your queries, newest first (operators and regulators: everyone's); their states:
    /// running, released, withheld, failed.
    Ls(ListArgs),
    /// One query and its result (waits for a running one to end).
    Get {
        /// The query's id.
        id: String,
    },
}

fn outcome(view: &QueryView) -> ExitCode {
    match view.state {
        QueryState::Released | QueryState::Running => ExitCode::SUCCESS,
        QueryState::Withheld => ExitCode::from(3),
        QueryState::Failed => ExitCode::FAILURE,
    }
}

/// A query as the CLI (and the demo) shows it.
pub(crate) fn show(view: &QueryView) {
    println!(
        "query {} by {}  {:?}  {}",
        view.id, view.tenant, view.state, view.sql
    );
    for c in &view.cost {
        println!("  {}", cost_line(c));
    }
    if let Some(result) = &view.result {
        let rows: Vec<Vec<String>> = result
            .rows
            .iter()
            .map(|r| r.iter().map(cell).collect())
            .collect();
        let headers: Vec<&str> = result.columns.iter().map(String::as_str).collect();
        table(&headers, &rows);
        if result.rows.is_empty() {
            println!("(no group passed its threshold)");
        }
        for n in &result.noise {
            println!(
                "  noise on {}: {} scale {:.4}",
                n.output, n.mechanism, n.scale
            );
        }
    }
    if !view.rules.is_empty() {
        println!("  released under {}", view.rules.join(", "));
    }
    if let Some(digest) = &view.result_sha256 {
        println!("  result sha256 {digest} (in the audit log)");
    }
    if !view.charged.is_empty() {
        let charged: Vec<String> = view.charged.iter().map(|m| m.to_string()).collect();
        println!("  charged {}", charged.join(" + "));
    }
    if let Some(error) = &view.error {
        println!("  {error}");
    }
}

/// What a query costs one dataset's budgets, and what is left of them.
fn cost_line(c: &baygrid_api::QueryCostView) -> String {
    format!(
        "{}: ε {} in {} shares of {:.4}, δ {}; left ε {:.4} of {} (shared {:.4} of {}), δ {} (shared {}); refills {}",
        c.dataset,
        c.epsilon,
        c.shares,
        c.epsilon_each,
        small(c.delta),
        c.budget.epsilon_left,
        c.budget.epsilon,
        c.budget.shared_epsilon_left,
        c.budget.shared_epsilon,
        small(c.budget.delta_left),
        small(c.budget.shared_delta_left),
        c.budget.resets_at
    )
}

/// A δ to six significant digits in scientific notation, without trailing zeros: the
/// sums and shares of δ carry binary rounding (`1.0000000000000001e-7`) nobody chose.
fn small(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let text = format!("{x:.5e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) if mantissa.contains('.') => {
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{mantissa}e{exponent}")
        }
        _ => text,
    }
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.4}"),
            _ => n.to_string(),
        },
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn run(args: &Args, query: &QueryArgs) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    match (&query.command, &query.ask) {
        (Some(QueryCommand::Ls(list)), _) => {
            let path = list.path("/api/v1/queries");
            let all: Vec<QueryView> = client.get(&path).await?;
            emit(args.output, &all, |all| {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|q| {
                        vec![
                            q.id.clone(),
                            format!("{:?}", q.state).to_lowercase(),
                            q.cost
                                .iter()
                                .map(|c| c.dataset.clone())
                                .collect::<Vec<_>>()
                                .join("+"),
                            q.cost
                                .first()
                                .map(|c| c.epsilon.to_string())
                                .unwrap_or_default(),
                            q.sql.clone(),
                        ]
                    })
                    .collect();
                table(&["ID", "STATE", "DATASETS", "EPSILON", "SQL"], &rows);
            });
            list.hint_next(
                args.output,
                all.len(),
                all.last().map(|q| q.id.as_str()),
                "baygrid query ls",
            );
            Ok(ExitCode::SUCCESS)
        }
        (Some(QueryCommand::Get { id }), _) => {
            let view: QueryView = client
                .get(&format!("/api/v1/queries/{id}?wait_ms=60000"))
                .await?;
            emit(args.output, &view, show);
            Ok(outcome(&view))
        }
        (None, Some(ask)) => {
            let body = QueryRequest {
                dataset: ask.dataset.clone(),
                sql: ask.sql.clone(),
                purpose: ask.purpose.clone(),
                epsilon: ask.epsilon,
                delta: ask.delta,
                mechanism: ask.mechanism,
                dry_run: ask.dry_run,
                wait_ms: Some(60_000),
            };
            let path = match &ask.tenant {
                Some(t) => format!("/api/v1/queries?tenant={t}"),
                None => "/api/v1/queries".into(),
            };
            if ask.dry_run {
                let dry: QueryDryRun = client.post(&path, &body).await?;
                emit(args.output, &dry, |d| {
                    println!("columns: {}", d.columns.join(", "));
                    for c in &d.cost {
                        println!("{}", cost_line(c));
                    }
                    let price: Vec<String> = d.price.iter().map(|m| m.to_string()).collect();
                    println!(
                        "price {}; {}",
                        price.join(" + "),
                        if d.fits {
                            "fits the budgets"
                        } else {
                            "does NOT fit the budgets"
                        }
                    );
                });
                return Ok(if dry.fits {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(3)
                });
            }
            let mut view: QueryView = client.post(&path, &body).await?;
            while view.state == QueryState::Running {
                view = client
                    .get(&format!("/api/v1/queries/{}?wait_ms=60000", view.id))
                    .await?;
            }
            emit(args.output, &view, show);
            Ok(outcome(&view))
        }
        (None, None) => anyhow::bail!("give --dataset and --sql, or `ls` or `get ID`"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_numbers_print_without_binary_rounding() {
        for (x, text) in [
            (1e-5 / 100.0, "1e-7"),
            (2e-5 - 1e-7, "1.99e-5"),
            (1.0000000000000001e-7, "1e-7"),
            (1.5e-6, "1.5e-6"),
            (0.0, "0"),
            (1.234567e-9, "1.23457e-9"),
        ] {
            assert_eq!(super::small(x), text, "{x:e}");
        }
    }
}
