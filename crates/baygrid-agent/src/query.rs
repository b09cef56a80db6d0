//! The vault's side of queries at the data: claim a side, stage the dataset's files from
//! the vault (digests checked, kept for the next query), plan and check the whole query
//! again, align the individuals with the other vault by PSI when the query spans two, run
//! the side with its privacy bounds and noise, and answer with the released groups only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baygrid_api::{Client, ClientError, QueryAnswerBody, QueryTask};
use baygrid_query::datafusion::prelude::SessionContext;
use baygrid_query::Table;
use rand::SeedableRng;
use tokio::sync::watch;

/// Serves query sides until shutdown: long-polls for work, runs each side beside the loop.
pub(crate) async fn serve(client: Client, work_dir: PathBuf, shutdown: watch::Receiver<bool>) {
    let answerer = client.clone();
    serve_claims(
        client,
        "/api/v1/agent/queries/claim",
        shutdown,
        move |task: QueryTask| {
            let client = answerer.clone();
            let dir = work_dir.clone();
            async move {
                let body = match run(&client, &dir, &task).await {
                    Ok(answer) => QueryAnswerBody {
                        answer: Some(answer),
                        error: None,
                    },
                    Err(error) => {
                        tracing::warn!(query = %task.query, %error, "query side failed");
                        QueryAnswerBody {
                            answer: None,
                            error: Some(error),
                        }
                    }
                };
                let path = format!(
                    "/api/v1/agent/queries/{}/answer?dataset={}",
                    task.query, task.dataset
                );
                let answered = baygrid_api::patiently(
                    baygrid_api::PATIENCE,
                    || client.post::<_, serde_json::Value>(&path, &body),
                    |failure| waiting_on_server(&path, failure),
                )
                .await;
                if let Err(e) = answered {
                    // unanswered, the server hands the side out again later
                    tracing::warn!(query = %task.query, error = %e, "answer not delivered");
                }
            }
        },
    )
    .await
}

/// Long-polls `path` for work until shutdown and runs each piece beside the loop.
pub(crate) async fn serve_claims<T, F, Fut>(
    client: Client,
    path: &'static str,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ask = serde_json::json!({ "wait_ms": 20_000 });
    loop {
        let claimed = tokio::select! {
            r = client.post::<_, Vec<T>>(path, &ask) => r,
            _ = shutdown.changed() => return,
        };
        match claimed {
            Ok(work) => {
                for piece in work {
                    tokio::spawn(handle(piece));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, path, "cannot claim work yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// The dataset's files of one upload, staged once into `work_dir/vault-cache` and checked
/// against their recorded digests. Each staging writes its own folder and renames it into
/// place whole, so concurrent queries never read a half-staged one.
pub(crate) async fn staged(
    work_dir: &Path,
    name: &str,
    upload: &str,
    files: &[baygrid_api::VersionFile],
    vault_url: &str,
) -> Result<PathBuf, String> {
    let parent = work_dir.join("vault-cache").join(name);
    let dir = parent.join(upload);
    if dir.exists() {
        return Ok(dir);
    }
    let staging = parent.join(format!(".staging-{upload}-{}", rand::random::<u64>()));
    let fetched = match baygrid_vault::Vault::open(vault_url) {
        Ok(vault) => vault.get_upload(name, upload, files, &staging).await,
        Err(e) => Err(e),
    };
    if let Err(e) = fetched {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.to_string());
    }
    if let Err(e) = std::fs::rename(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // another query staged the same upload first
        if !dir.exists() {
            return Err(format!("{}: {e}", dir.display()));
        }
    }
    Ok(dir)
}

async fn run(
    client: &Client,
    work_dir: &Path,
    task: &QueryTask,
) -> Result<baygrid_api::SideAnswer, String> {
    let tables = task
        .tables
        .iter()
        .map(|t| Table::new(&t.dataset, t.terms.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    // the vault checks the query itself: it does not take the server's word for its shape
    let shape = baygrid_query::plan(&task.sql, &tables)
        .await
        .map_err(|e| format!("refused at the vault: {e}"))?;
    let mine = task
        .tables
        .iter()
        .position(|t| t.dataset.name == task.dataset)
        .ok_or_else(|| format!("the task does not carry `{}`", task.dataset))?;
    let table = &tables[mine];
    let mine = &task.tables[mine];
    let dir = staged(
        work_dir,
        &mine.dataset.name,
        &mine.upload,
        &mine.files,
        &mine.vault_url,
    )
    .await?;
    let ctx = SessionContext::new();
    baygrid_query::register_files(&ctx, table, &dir)
        .await
        .map_err(|e| e.to_string())?;
    let members = match &task.psi_role {
        None => None,
        Some(role) => Some(intersect(client, &ctx, table, task, role).await?),
    };
    let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
    baygrid_query::answer(
        &ctx,
        table,
        &shape.side(&table.name),
        baygrid_query::Privacy {
            epsilon: task.epsilon,
            delta: task.delta,
            mechanism: task.mechanism,
        },
        members.as_deref(),
        &mut rng,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Logs the wait of work at a vault (a query's side, a fusion worker) for a server it
/// cannot reach (a restart), and the wait's end.
pub(crate) fn waiting_on_server(work: &str, failure: Option<&ClientError>) {
    match failure {
        Some(e) => tracing::warn!(
            work,
            error = %e,
            "asking the server again for up to {:?}",
            baygrid_api::PATIENCE
        ),
        None => tracing::info!(work, "the server answers again"),
    }
}

/// The individuals both vaults hold, by ECDH PSI with the other side's agent through the
/// server's relay: only blinded points cross, and each side learns which of its own ids
/// the other holds, nothing about the others.
async fn intersect(
    client: &Client,
    ctx: &SessionContext,
    table: &Table,
    task: &QueryTask,
    role: &str,
) -> Result<Vec<String>, String> {
    use baygrid_query::datafusion::arrow::array::AsArray;
    use baygrid_query::datafusion::arrow::datatypes::DataType;
    use baygrid_query::datafusion::logical_expr::{cast, ident};
    let ids_df = ctx
        .table(table.name.as_str())
        .await
        .and_then(|df| df.select(vec![cast(ident(&table.subject), DataType::Utf8).alias("id")]))
        .and_then(|df| df.distinct())
        .map_err(|e| e.to_string())?;
    let batches = ids_df.collect().await.map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for batch in &batches {
        let column = batch.column(0).as_string::<i32>();
        ids.extend(column.iter().flatten().map(str::to_string));
    }
    let role = match role {
        "guest" => baygrid_fusion::psi::Role::Guest,
        "host" => baygrid_fusion::psi::Role::Host,
        other => return Err(format!("unknown PSI role `{other}`")),
    };
    let base = format!(
        "/api/v1/agent/queries/{}/relay?dataset={}",
        task.query, task.dataset
    );
    let (to_peer, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let (incoming, from_peer) = std::sync::mpsc::channel::<Vec<u8>>();
    let sender = {
        let client = client.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(chunk) = outgoing.recv().await {
                // the same number when resent: the server keeps the chunk once
                let path = format!("{base}&n={n}");
                baygrid_api::patiently(
                    baygrid_api::PATIENCE,
                    || client.post_bytes(&path, chunk.clone()),
                    |failure| waiting_on_server(&path, failure),
                )
                .await?;
                n += 1;
            }
            Ok::<(), ClientError>(())
        })
    };
    let receiver = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let path = format!("{base}&from={next}&wait_ms=20000");
                let bytes = baygrid_api::patiently(
                    baygrid_api::PATIENCE,
                    || client.get_bytes(&path),
                    |failure| waiting_on_server(&path, failure),
                )
                .await
                .map_err(|e| e.to_string())?;
                for message in baygrid_api::relay::unframe(&bytes)? {
                    next += 1;
                    if incoming.send(message).is_err() {
                        return Ok::<(), String>(());
                    }
                }
            }
        })
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
        baygrid_fusion::psi::run_party(
            role,
            &ids,
            baygrid_fusion::psi::Reveal::Both,
            baygrid_fusion::psi::DEFAULT_BATCH,
            baygrid_fusion::psi::ChunkReader::new(from_peer, baygrid_fusion::psi::IO_TIMEOUT),
            baygrid_fusion::psi::ChunkWriter(move |chunk| to_peer.send(chunk).is_ok()),
            &mut rng,
        )
    })
    .await
    .map_err(|e| format!("PSI: {e}"))?;
    receiver.abort();
    // a receiver that stopped on its own says why the peer's messages ended
    let received = receiver.await;
    let outcome = outcome.map_err(|e| match received {
        Ok(Err(why)) => format!("PSI relay: {why}"),
        _ => format!("PSI with the other vault: {e}"),
    })?;
    // the writer's channel closed when the run ended: the sender drains and stops
    match sender.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("PSI relay: {e}")),
        Err(e) => return Err(format!("PSI relay: {e}")),
    }
    outcome
        .intersection
        .ok_or_else(|| "PSI: this side was not told the intersection".to_string())
}
