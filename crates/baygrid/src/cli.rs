//! The user commands: thin calls to the API, printed as tables or JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use baygrid_api::{
    AccountView, CancelView, Client, ClusterView, DepositRequest, InvoiceView, IssueTokenRequest,
    IssuedToken, JobView, LogsView, QuoteView, StatementView, TenantView, TokenView,
};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Money, Offer, Party, Role, Site, Tenant};
use clap::Subcommand;

use crate::output::{emit, encode, or_dash, query_path, table, ListArgs};
use crate::{Args, Output};

#[derive(Debug, Subcommand)]
pub enum ListOnly {
    /// List them.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum PartyCommand {
    /// Register a party (operator).
    Add {
        /// The party's name (lowercase letters, digits and `-`).
        name: String,
        /// Where it is established: CN (the mainland), HK, MO or INTL.
        #[arg(long)]
        jurisdiction: Jurisdiction,
        /// Its city, e.g. `shenzhen` (latency-sensitive jobs stay near it).
        #[arg(long)]
        city: String,
        /// The party operates critical information infrastructure.
        #[arg(long)]
        ciio: bool,
    },
    /// Every party: its jurisdiction, city and whether it operates critical infrastructure.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Add a tenant with a budget (operator).
    Add {
        /// The tenant's name (lowercase letters, digits and `-`).
        name: String,
        /// The party it belongs to (its jurisdiction and city are the tenant's).
        #[arg(long)]
        party: String,
        /// e.g. "10000.00 CNY"
        #[arg(long)]
        budget: Money,
    },
    /// Every tenant the caller may see: its party, and its budget spent, held and left.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Fund an account from outside the exchange (operator), e.g. `wallet:gz-lab 500.00 CNY`.
    Deposit {
        /// The account to fund, e.g. `wallet:gz-lab`.
        account: String,
        /// In the account's currency, e.g. "500.00 CNY".
        amount: Money,
        /// A client-chosen id: repeating the command with it changes nothing.
        #[arg(long)]
        id: Option<String>,
    },
    /// Balances: one account, or every account the caller may read.
    Balance {
        /// The account, e.g. `wallet:gz-lab`; every account the caller may read without it.
        account: Option<String>,
    },
    /// The transfers that touched an account in a period.
    Statement {
        /// The account, e.g. `wallet:gz-lab`.
        account: String,
        /// YYYY-MM-DD or RFC 3339, inclusive.
        #[arg(long)]
        from: Option<String>,
        /// YYYY-MM-DD or RFC 3339, exclusive.
        #[arg(long)]
        to: Option<String>,
    },
    /// A tenant's charges for the jobs that ended in a month.
    Invoice {
        /// The tenant invoiced.
        tenant: String,
        /// YYYY-MM (UTC).
        #[arg(long)]
        month: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token (operator). The secret is printed once.
    Issue {
        /// What the token may do: operator, provider (its subject a provider), tenant (a
        /// tenant), data_holder (a party), regulator, or agent (a cluster).
        #[arg(long)]
        role: Role,
        /// The tenant, provider, party or cluster it acts for.
        #[arg(long)]
        subject: Option<String>,
        /// A note for people: what or who the token is for.
        #[arg(long)]
        label: Option<String>,
        /// How long it is good for (`90days`, `12h`); without it, until revoked.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Every token: id, role, subject, label, when made, expires and revoked (never the
    /// secret).
    Ls,
    /// Revoke a token at once.
    Revoke {
        /// The token's id, as `token ls` shows it.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job spec (YAML).
    Submit {
        /// The job spec (YAML): name, resources, command, estimated_duration, ….
        file: PathBuf,
        /// For operators: the tenant to submit for.
        #[arg(long)]
        tenant: Option<String>,
        /// A retry with the same key returns the first job.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the job ends, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// Every cluster's verdict for a spec, with cost and reasons.
    Quote {
        /// The job spec (YAML), as for `job submit`.
        file: PathBuf,
        /// For operators: the tenant to quote for.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Your jobs, newest first (operators and regulators: everyone's); their states:
    /// queued, placed, running, succeeded, failed, cancelled.
    Ls(ListArgs),
    /// One job: its state, placement, cost and every change of state.
    Get {
        /// The job's id.
        id: String,
    },
    /// A job's output, from its first line.
    Logs {
        /// The job's id.
        id: String,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a job: at once if no agent holds it, otherwise once its agent stops it.
    Cancel {
        /// The job's id.
        id: String,
    },
}

/// The token: `--token`, `BAYGRID_TOKEN`, or the operator token `baygrid up` wrote.
pub fn bearer_token(args: &Args) -> anyhow::Result<String> {
    match &args.token {
        Some(token) => Ok(token.clone()),
        None => {
            let path = args.data_dir().join("operator.token");
            read_token(&path).with_context(|| {
                format!("no token: pass --token or BAYGRID_TOKEN, or run `baygrid up` so that {} exists", path.display())
            })
        }
    }
}

/// A client for `--server` with the token above.
pub fn client(args: &Args) -> anyhow::Result<Client> {
    Ok(Client::new(&args.server, Some(bearer_token(args)?)))
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

pub async fn sites(args: &Args, _cmd: &ListOnly) -> anyhow::Result<std::process::ExitCode> {
    let sites: Vec<Site> = client(args)?.get("/api/v1/sites").await?;
    emit(args.output, &sites, |sites| {
        let rows = sites
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.jurisdiction.to_string(),
                    s.city.clone(),
                    format!("{}%", s.green_share_pct),
                    s.power_price_per_kwh.to_string(),
                ]
            })
            .collect::<Vec<_>>();
        table(
            &["SITE", "JURISDICTION", "CITY", "GREEN", "POWER/KWH"],
            &rows,
        );
    });
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn clusters(args: &Args, _cmd: &ListOnly) -> anyhow::Result<std::process::ExitCode> {
    let clusters: Vec<ClusterView> = client(args)?.get("/api/v1/clusters").await?;
    emit(args.output, &clusters, |clusters| {
        let rows = clusters
            .iter()
            .map(|c| {
                vec![
                    c.cluster.name.clone(),
                    c.cluster.site.clone(),
                    c.jurisdiction.to_string(),
                    c.cluster.engine.to_string(),
                    format!(
                        "{} × {} {}",
                        c.cluster.nodes, c.cluster.accelerators_per_node, c.cluster.accelerator
                    ),
                    format!("{}/{}", c.accelerators_in_use, c.accelerators_total),
                    if c.online {
                        "online".into()
                    } else {
                        "offline".into()
                    },
                ]
            })
            .collect::<Vec<_>>();
        table(
            &[
                "CLUSTER",
                "SITE",
                "JURISDICTION",
                "ENGINE",
                "NODES × ACCELERATORS",
                "IN USE",
                "AGENT",
            ],
            &rows,
        );
    });
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn offers(args: &Args, _cmd: &ListOnly) -> anyhow::Result<std::process::ExitCode> {
    let offers: Vec<Offer> = client(args)?.get("/api/v1/offers").await?;
    emit(args.output, &offers, |offers| {
        let rows = offers
            .iter()
            .map(|o| vec![o.cluster.clone(), o.price_per_accelerator_hour.to_string()])
            .collect::<Vec<_>>();
        table(&["CLUSTER", "PRICE PER ACCELERATOR-HOUR"], &rows);
    });
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn party(args: &Args, cmd: &PartyCommand) -> anyhow::Result<std::process::ExitCode> {
    let client = client(args)?;
    match cmd {
        PartyCommand::Add {
            name,
            jurisdiction,
            city,
            ciio,
        } => {
            let party = Party {
                name: name.clone(),
                jurisdiction: *jurisdiction,
                city: city.clone(),
                ciio: *ciio,
            };
            let created: Party = client.post("/api/v1/parties", &party).await?;
            emit(args.output, &created, |p| {
                println!("party {} ({}, {})", p.name, p.jurisdiction, p.city)
            });
        }
        PartyCommand::Ls => {
            let parties: Vec<Party> = client.get("/api/v1/parties").await?;
            emit(args.output, &parties, |parties| {
                let rows = parties
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            p.jurisdiction.to_string(),
                            p.city.clone(),
                            if p.ciio { "yes".into() } else { "no".into() },
                        ]
                    })
                    .collect::<Vec<_>>();
                table(&["PARTY", "JURISDICTION", "CITY", "CIIO"], &rows);
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn tenant(args: &Args, cmd: &TenantCommand) -> anyhow::Result<std::process::ExitCode> {
    let client = client(args)?;
    match cmd {
        TenantCommand::Add {
            name,
            party,
            budget,
        } => {
            let tenant = Tenant {
                name: name.clone(),
                party: party.clone(),
                budget: *budget,
            };
            let created: Tenant = client.post("/api/v1/tenants", &tenant).await?;
            emit(args.output, &created, |t| {
                println!("tenant {} (party {}, budget {})", t.name, t.party, t.budget)
            });
        }
        TenantCommand::Ls => {
            let tenants: Vec<TenantView> = client.get("/api/v1/tenants").await?;
            emit(args.output, &tenants, |tenants| {
                let rows = tenants
                    .iter()
                    .map(|t| {
                        vec![
                            t.tenant.name.clone(),
                            t.tenant.party.clone(),
                            t.tenant.budget.to_string(),
                            t.spent.to_string(),
                            t.held.to_string(),
                            t.available.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &["TENANT", "PARTY", "OPENING", "SPENT", "HELD", "AVAILABLE"],
                    &rows,
                );
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn account_rows(accounts: &[AccountView]) {
    let rows = accounts
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.kind.clone(),
                a.balance.to_string(),
                a.debits_pending.to_string(),
                a.available.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    table(&["ACCOUNT", "KIND", "BALANCE", "HELD", "AVAILABLE"], &rows);
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and `:`).
pub async fn ledger(args: &Args, cmd: &LedgerCommand) -> anyhow::Result<std::process::ExitCode> {
    let client = client(args)?;
    match cmd {
        LedgerCommand::Deposit {
            account,
            amount,
            id,
        } => {
            let request = DepositRequest {
                account: account.clone(),
                amount: *amount,
                id: id.clone(),
            };
            let view: AccountView = client.post("/api/v1/ledger/deposits", &request).await?;
            emit(args.output, &view, |a| {
                println!(
                    "deposited {amount} into {}: balance {}, available {}",
                    a.id, a.balance, a.available
                )
            });
        }
        LedgerCommand::Balance {
            account: Some(account),
        } => {
            let view: AccountView = client
                .get(&format!("/api/v1/ledger/accounts/{}", encode(account)))
                .await?;
            emit(args.output, &view, |a| {
                account_rows(std::slice::from_ref(a))
            });
        }
        LedgerCommand::Balance { account: None } => {
            let views: Vec<AccountView> = client.get("/api/v1/ledger/accounts").await?;
            emit(args.output, &views, |v| account_rows(v));
        }
        LedgerCommand::Statement { account, from, to } => {
            let base = format!("/api/v1/ledger/accounts/{}/statement", encode(account));
            let path = query_path(&base, &[("from", from.clone()), ("to", to.clone())]);
            // every page of the period the first page fixed, as one statement
            let mut view: StatementView = client.get(&path).await?;
            while let Some(after) = view.next.take() {
                let next = query_path(
                    &base,
                    &[
                        ("from", Some(view.from.clone())),
                        ("to", Some(view.to.clone())),
                        ("after", Some(after)),
                    ],
                );
                let page: StatementView = client.get(&next).await?;
                view.lines.extend(page.lines);
                view.next = page.next;
            }
            emit(args.output, &view, |s| {
                println!("{} from {} to {}", s.account, s.from, s.to);
                let rows = s
                    .lines
                    .iter()
                    .map(|l| {
                        vec![
                            l.transfer.at.clone(),
                            l.transfer.id.clone(),
                            l.transfer.kind.clone(),
                            l.transfer.amount.to_string(),
                            l.signed_amount.to_string(),
                            l.transfer.reference.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &["AT", "TRANSFER", "KIND", "AMOUNT", "MOVED", "REFERENCE"],
                    &rows,
                );
                println!("net {}", s.net);
            });
        }
        LedgerCommand::Invoice { tenant, month } => {
            let path = format!(
                "/api/v1/ledger/invoices/{}?month={}",
                encode(tenant),
                encode(month)
            );
            let view: InvoiceView = client.get(&path).await?;
            emit(args.output, &view, |inv| {
                println!("invoice for {} ({})", inv.tenant, inv.month);
                let rows = inv
                    .lines
                    .iter()
                    .map(|l| {
                        vec![
                            l.job.clone(),
                            or_dash(l.site.as_ref()),
                            match (&l.accelerator, l.accelerators) {
                                (Some(model), n) if n > 0 => format!("{n}×{model}"),
                                _ => "-".into(),
                            },
                            format!("{:.1}", l.seconds),
                            l.price_per_accelerator_hour
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "-".into()),
                            l.amount.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &[
                        "JOB",
                        "SITE",
                        "ACCELERATORS",
                        "SECONDS",
                        "PRICE/ACC-H",
                        "AMOUNT",
                    ],
                    &rows,
                );
                if !inv.data_uses.is_empty() {
                    println!();
                    let uses = inv
                        .data_uses
                        .iter()
                        .map(|u| {
                            vec![
                                u.kind.clone(),
                                u.id.clone(),
                                u.state.clone(),
                                u.datasets.join(", "),
                                u.amount.to_string(),
                            ]
                        })
                        .collect::<Vec<_>>();
                    table(&["USE", "ID", "STATE", "DATASETS", "AMOUNT"], &uses);
                }
                println!("total {}", inv.total);
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn token(args: &Args, cmd: &TokenCommand) -> anyhow::Result<std::process::ExitCode> {
    let client = client(args)?;
    match cmd {
        TokenCommand::Issue {
            role,
            subject,
            label,
            expires_in,
        } => {
            let request = IssueTokenRequest {
                role: *role,
                subject: subject.clone(),
                label: label.clone(),
                expires_in: expires_in.clone(),
            };
            let issued: IssuedToken = client.post("/api/v1/tokens", &request).await?;
            emit(args.output, &issued, |t| {
                let until = t
                    .expires_at
                    .as_ref()
                    .map(|at| format!(", until {at}"))
                    .unwrap_or_default();
                println!(
                    "token {} ({} {}{until})",
                    t.id,
                    t.role,
                    or_dash(t.subject.clone())
                );
                println!("{}", t.token);
            });
        }
        TokenCommand::Ls => {
            let tokens: Vec<TokenView> = client.get("/api/v1/tokens").await?;
            emit(args.output, &tokens, |tokens| {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.role.to_string(),
                            or_dash(t.subject.clone()),
                            t.label.clone(),
                            t.created_at.clone(),
                            or_dash(t.expires_at.clone()),
                            or_dash(t.revoked_at.clone()),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &[
                        "TOKEN", "ROLE", "SUBJECT", "LABEL", "CREATED", "EXPIRES", "REVOKED",
                    ],
                    &rows,
                );
            });
        }
        TokenCommand::Revoke { id } => {
            client
                .delete::<serde_json::Value>(&format!("/api/v1/tokens/{id}"))
                .await?;
            if args.output == Output::Table {
                println!("revoked {id}");
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Reads a YAML spec, reporting the field at fault with the file's name.
pub fn read_spec(file: &Path) -> anyhow::Result<JobSpec> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    JobSpec::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn tenant_query(tenant: &Option<String>) -> String {
    tenant
        .as_ref()
        .map(|t| format!("?tenant={t}"))
        .unwrap_or_default()
}

pub async fn job(args: &Args, cmd: &JobCommand) -> anyhow::Result<std::process::ExitCode> {
    let client = client(args)?;
    match cmd {
        JobCommand::Submit {
            file,
            tenant,
            idempotency_key,
            wait,
        } => {
            let spec = read_spec(file)?;
            let path = format!("/api/v1/jobs{}", tenant_query(tenant));
            let job: JobView = match idempotency_key {
                Some(key) => client.post_idempotent(&path, &spec, key).await?,
                None => client.post(&path, &spec).await?,
            };
            if !*wait {
                emit(args.output, &job, |j| {
                    println!("submitted {} ({})", j.id, j.state)
                });
                return Ok(std::process::ExitCode::SUCCESS);
            }
            let done = wait_for(
                &client,
                std::slice::from_ref(&job.id),
                args.output == Output::Table,
            )
            .await?;
            let job = &done[0];
            emit(args.output, job, print_job);
            return Ok(if job.state == JobState::Succeeded {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            });
        }
        JobCommand::Quote { file, tenant } => {
            let spec = read_spec(file)?;
            let quote: QuoteView = client
                .post(
                    &format!("/api/v1/jobs/quote{}", tenant_query(tenant)),
                    &spec,
                )
                .await?;
            emit(args.output, &quote, |q| {
                let asked_at = chrono::Utc::now().timestamp_millis();
                // the estimated wait from now, to the minute, and the start it gives
                let wait = |at: Option<i64>| match at {
                    None => "-".to_string(),
                    Some(at) if at <= asked_at + 1000 => "now".to_string(),
                    Some(at) => humantime::format_duration(std::time::Duration::from_secs(
                        ((at - asked_at) / 60_000).max(1) as u64 * 60,
                    ))
                    .to_string(),
                };
                let start = |at: Option<i64>| match at {
                    None => "-".to_string(),
                    Some(at) => chrono::DateTime::from_timestamp_millis(at.max(asked_at))
                        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                        .unwrap_or_else(|| "-".into()),
                };
                let rows = q
                    .quote
                    .candidates
                    .iter()
                    .map(|c| {
                        vec![
                            c.cluster.clone(),
                            c.site.clone(),
                            c.jurisdiction.to_string(),
                            format!("{} × {}", c.accelerators, or_dash(c.accelerator.clone())),
                            or_dash(c.price_per_accelerator_hour),
                            or_dash(c.estimated_cost_cny),
                            or_dash(c.transfer_cost_cny),
                            or_dash(c.green_cost_cny),
                            or_dash(c.total_cost_cny),
                            wait(c.estimated_start_ms),
                            start(c.estimated_start_ms),
                            c.round_trip_ms
                                .map(|ms| format!("{ms} ms"))
                                .unwrap_or_else(|| "-".into()),
                            c.verdict.clone(),
                            c.reason.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &[
                        "CLUSTER",
                        "SITE",
                        "JUR",
                        "ACCELERATORS",
                        "PRICE/H",
                        "COMPUTE",
                        "TRANSFER",
                        "GREEN",
                        "TOTAL",
                        "WAIT",
                        "START (UTC)",
                        "RTT",
                        "VERDICT",
                        "REASON",
                    ],
                    &rows,
                );
                println!("\n{}", q.summary);
            });
            if !quote.feasible {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        JobCommand::Ls(list) => {
            let path = list.path("/api/v1/jobs");
            let jobs: Vec<JobView> = client.get(&path).await?;
            emit(args.output, &jobs, |jobs| {
                let rows = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.id.clone(),
                            j.name.clone(),
                            j.tenant.clone(),
                            j.state.to_string(),
                            or_dash(j.site.clone()),
                            or_dash(j.cost),
                            j.reason.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &["JOB", "NAME", "TENANT", "STATE", "SITE", "COST", "REASON"],
                    &rows,
                );
            });
            list.hint_next(
                args.output,
                jobs.len(),
                jobs.last().map(|j| j.id.as_str()),
                "baygrid job ls",
            );
        }
        JobCommand::Get { id } => {
            let job: JobView = client.get(&format!("/api/v1/jobs/{id}")).await?;
            emit(args.output, &job, print_job);
        }
        JobCommand::Logs { id, follow } => {
            let mut after = String::from("0:0");
            loop {
                let path = format!("/api/v1/jobs/{id}/logs?after={after}");
                let page: LogsView = match follow {
                    true => get_patiently(&client, &path, None).await?,
                    false => client.get(&path).await?,
                };
                for line in &page.lines {
                    match args.output {
                        Output::Json => println!("{}", serde_json::to_string(line)?),
                        Output::Table if line.stream.starts_with("stderr") => {
                            eprintln!("{}", line.line)
                        }
                        Output::Table => println!("{}", line.line),
                    }
                }
                if let (Some(at), true) = (&page.purged_at, page.lines.is_empty()) {
                    eprintln!("the output of job {id} was deleted at {at}, past the server's log retention");
                }
                after = page.next.clone();
                if page.done || (!follow && page.lines.is_empty()) {
                    break;
                }
                if page.lines.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        JobCommand::Cancel { id } => {
            let result: CancelView = client
                .post(&format!("/api/v1/jobs/{id}/cancel"), &serde_json::json!({}))
                .await?;
            emit(args.output, &result, |r| {
                println!(
                    "{}: {} (now {})",
                    r.job.id,
                    r.outcome.replace('_', " "),
                    r.job.state
                )
            });
            if let Some(why) = cancel_refusal(&result) {
                eprintln!("{why}");
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Why a cancel did nothing, when it did nothing: the job had already ended some other way
/// (as `scancel` on a completed job does, the command then exits non-zero). A job already
/// cancelled is not an error, so that a cancel repeated after a lost answer succeeds.
fn cancel_refusal(result: &CancelView) -> Option<String> {
    let job = &result.job;
    (result.outcome == "already_ended" && job.state != JobState::Cancelled).then(|| {
        let at = job.finished_at.as_deref().unwrap_or(&job.updated_at);
        format!(
            "job {}: nothing to cancel; it had already {} at {at}",
            job.id, job.state
        )
    })
}

fn print_job(job: &JobView) {
    let rows = vec![
        vec!["id".to_string(), job.id.clone()],
        vec!["name".into(), job.name.clone()],
        vec!["tenant".into(), job.tenant.clone()],
        vec!["state".into(), job.state.to_string()],
        vec!["reason".into(), job.reason.clone()],
        vec!["cluster".into(), or_dash(job.cluster.clone())],
        vec!["site".into(), or_dash(job.site.clone())],
        vec!["engine".into(), or_dash(job.engine.clone())],
        vec!["submitted".into(), job.submitted_at.clone()],
        vec!["started".into(), or_dash(job.started_at.clone())],
        vec!["finished".into(), or_dash(job.finished_at.clone())],
        vec!["attempts".into(), job.attempts.to_string()],
        vec!["exit code".into(), or_dash(job.exit_code)],
        vec!["cost".into(), or_dash(job.cost)],
    ];
    table(&["FIELD", "VALUE"], &rows);
    if !job.events.is_empty() {
        println!();
        let rows = job
            .events
            .iter()
            .map(|e| {
                vec![
                    e.at.clone(),
                    or_dash(e.from.map(|s| s.to_string())),
                    e.to.to_string(),
                    e.reason.clone(),
                ]
            })
            .collect::<Vec<_>>();
        table(&["AT", "FROM", "TO", "REASON"], &rows);
    }
}

/// Polls until every job has ended, with a progress bar when `progress`.
/// GET `path`, riding out a server that is restarting (see [`baygrid_api::PATIENCE`]);
/// says so on stderr (above `bar`, when there is one).
pub(crate) async fn get_patiently<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: &str,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<T, baygrid_api::ClientError> {
    let say = |text: String| match bar {
        Some(bar) => bar.suspend(|| eprintln!("{text}")),
        None => eprintln!("{text}"),
    };
    baygrid_api::patiently(
        baygrid_api::PATIENCE,
        || client.get::<T>(path),
        |failure| match failure {
            Some(e) => say(format!(
                "{e}; asking again for up to {}",
                humantime::format_duration(baygrid_api::PATIENCE)
            )),
            None => say("the server answers again".into()),
        },
    )
    .await
}

pub async fn wait_for(
    client: &Client,
    ids: &[String],
    progress: bool,
) -> anyhow::Result<Vec<JobView>> {
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(ids.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs ended  {msg}",
            )
            .expect("progress template"),
        );
        bar
    });
    loop {
        let mut jobs: Vec<JobView> = Vec::with_capacity(ids.len());
        for id in ids {
            jobs.push(get_patiently(client, &format!("/api/v1/jobs/{id}"), bar.as_ref()).await?);
        }
        let ended = jobs.iter().filter(|j| j.state.is_terminal()).count();
        if let Some(bar) = &bar {
            bar.set_position(ended as u64);
            let running = jobs
                .iter()
                .filter(|j| j.state == baygrid_core::JobState::Running)
                .count();
            let queued = jobs
                .iter()
                .filter(|j| {
                    matches!(
                        j.state,
                        baygrid_core::JobState::Queued | baygrid_core::JobState::Placed
                    )
                })
                .count();
            bar.set_message(format!("{running} running, {queued} waiting"));
            bar.tick();
        }
        if ended == jobs.len() {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return Ok(jobs);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
