//! The exchange's server: the HTTP API under `/api/v1`, bearer-token auth, the catalog, the
//! scheduling loop and agent leases. It is the only writer of the store.

mod agent;
pub mod audit;
pub mod auth;
mod body;
mod catalog;
pub mod config;
mod console;
mod contracts;
mod error;
mod flows;
mod fusion;
mod jobs;
pub mod ledger;
mod metrics;
mod openapi;
mod paging;
mod queries;
mod relay;
mod scheduler;
mod zone;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::routing::{delete, get, post};
use axum::Router;
use baygrid_core::{Catalog, Clock, Millis, Role, SystemClock};
use baygrid_sched::{CheapestFeasible, Placer};
use baygrid_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use catalog::{publish_catalog, CatalogSnapshot};
pub use config::ServerConfig;
pub use error::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] baygrid_store::StoreError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("sites file: {0}")]
    Sites(String),
    #[error("{0}")]
    Rules(#[from] baygrid_rules::RuleError),
    #[error("{0}")]
    Api(#[from] ApiError),
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    pub placer: Arc<dyn Placer>,
    pub catalog: Arc<RwLock<Arc<CatalogSnapshot>>>,
    /// Serialises reloads of the cached catalog, so that a reload that read the store
    /// before a change never replaces one that read it after.
    catalog_reload: Arc<tokio::sync::Mutex<()>>,
    pub metrics: metrics::Metrics,
    pub clock: Arc<dyn Clock>,
    pub tokens: Arc<auth::TokenCache>,
    /// The audit log over the outbox.
    pub audit: Arc<audit::AuditLog>,
    /// The GBA cross-border rule pack.
    pub rules: Arc<baygrid_rules::RulePack>,
    /// Serialises the data zone's read-modify-writes of catalog rows (version numbering,
    /// claiming and finishing copies).
    pub zone_writes: Arc<tokio::sync::Mutex<()>>,
    /// Queries at the data: the signals waking agents and consumers, and the PSI relay.
    pub queries: Arc<queries::Queries>,
}

impl AppState {
    pub fn now(&self) -> Millis {
        self.clock.now_millis()
    }

    pub fn catalog(&self) -> Arc<CatalogSnapshot> {
        self.catalog.read().expect("catalog lock").clone()
    }

    /// Reloads the cached catalog from the store after a change. Reloads run one at a
    /// time: each reads the store after every change written before it began, so the last
    /// one to finish has them all.
    pub async fn reload_catalog(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.catalog_reload.lock().await;
        let snapshot = CatalogSnapshot::load(&self.store).await?;
        *self.catalog.write().expect("catalog lock") = Arc::new(snapshot);
        Ok(())
    }
}

/// A server that is listening. Dropping it does not stop it; call [`RunningServer::stop`].
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: AppState,
    /// The operator token written to the data directory.
    pub operator_token: String,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Opens the store, publishes the sites file if configured, ensures an operator token,
/// and starts the API and the scheduling loop.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&config.store_url()).await?;
    // before anything is taken over from the last server: one server per store
    let claim = store.claim().await?;
    store.set_failover_backoff(config.failover_backoff.as_millis() as i64);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = AppState {
        store: store.clone(),
        config: Arc::new(config.clone()),
        placer: Arc::new(CheapestFeasible),
        catalog: Arc::new(RwLock::new(Arc::new(CatalogSnapshot::load(&store).await?))),
        catalog_reload: Arc::new(tokio::sync::Mutex::new(())),
        metrics: metrics::Metrics::new(),
        clock,
        tokens: Arc::new(auth::TokenCache::default()),
        zone_writes: Arc::new(tokio::sync::Mutex::new(())),
        queries: Arc::new(queries::Queries::default()),
        rules: Arc::new(if config.rule_pack.is_empty() {
            baygrid_rules::RulePack::load()?
        } else {
            let text = std::fs::read_to_string(&config.rule_pack).map_err(|source| {
                ServerError::DataDir {
                    path: config.rule_pack.clone().into(),
                    source,
                }
            })?;
            baygrid_rules::RulePack::from_file(&text)?
        }),
        audit: Arc::new(
            audit::AuditLog::open(&config.data_dir, &config.audit_origin).map_err(|source| {
                ServerError::DataDir {
                    path: config.data_dir.join("audit.key"),
                    source,
                }
            })?,
        ),
    };
    ledger::open_platform(&state).await?;
    if !config.sites_file.is_empty() {
        let catalog = if config.sites_file == "sample" {
            Catalog::sample()
        } else {
            let text = std::fs::read_to_string(&config.sites_file)
                .map_err(|e| ServerError::Sites(format!("{}: {e}", config.sites_file)))?;
            Catalog::from_yaml(&text).map_err(|e| ServerError::Sites(e.to_string()))?
        };
        publish_catalog(&state, &catalog, "operator").await?;
    }
    let operator_token = ensure_operator_token(&state).await?;
    // agents get a grace period to reconnect before any lease held across the restart expires
    let grace_until = state.now() + config.restart_grace.as_millis() as i64;
    state.store.extend_leases(grace_until).await?;
    // running queries and fusion runs go on: their relay messages are in the store; those
    // of any that ended without dropping them go
    let pruned = state.store.relay_prune().await?;
    if pruned > 0 {
        tracing::info!(
            rows = pruned,
            "dropped relay messages of ended queries and runs"
        );
    }

    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let (shutdown, mut stopped) = watch::channel(false);
    let scheduler = tokio::spawn(scheduler::run(state.clone(), shutdown.subscribe()));
    let app = router(state.clone());
    let queries = state.queries.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
            queries.close();
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "server stopped");
        }
        let _ = scheduler.await;
        // held as long as this server serves
        drop(claim);
    });
    tracing::info!(%addr, store = state.store.backend().durability(), "baygrid server listening");
    Ok(RunningServer {
        addr,
        state,
        operator_token,
        shutdown,
        task,
    })
}

/// The operator token lives in `data_dir/operator.token`; it is made at first start.
async fn ensure_operator_token(state: &AppState) -> Result<String, ServerError> {
    let path = state.config.data_dir.join("operator.token");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_string();
        if state
            .store
            .find_token(&auth::hash_secret(&secret))
            .await?
            .is_some()
        {
            return Ok(secret);
        }
    }
    let (_, secret) = auth::issue(
        state,
        Role::Operator,
        None,
        "first operator".into(),
        None,
        "server",
    )
    .await?;
    write_private(&path, &secret).map_err(|source| ServerError::DataDir {
        path: path.clone(),
        source,
    })?;
    Ok(secret)
}

pub(crate) fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Every route.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/accelerators",
            get(catalog::list_accelerators).post(catalog::put_accelerator),
        )
        .route("/sites", get(catalog::list_sites).post(catalog::put_site))
        .route(
            "/parties",
            get(catalog::list_parties).post(catalog::put_party),
        )
        .route(
            "/providers",
            get(catalog::list_providers).post(catalog::put_provider),
        )
        .route(
            "/clusters",
            get(catalog::list_clusters).post(catalog::put_cluster),
        )
        .route("/clusters/{name}", delete(catalog::remove_cluster))
        .route(
            "/offers",
            get(catalog::list_offers).post(catalog::put_offer),
        )
        .route(
            "/tenants",
            get(catalog::list_tenants).post(catalog::put_tenant),
        )
        .route(
            "/tokens",
            get(catalog::list_tokens).post(catalog::issue_token),
        )
        .route("/tokens/{id}", delete(catalog::revoke_token))
        .route("/jobs", get(jobs::list).post(jobs::submit))
        .route("/jobs/quote", post(jobs::quote))
        .route("/jobs/{id}", get(jobs::get))
        .route("/jobs/{id}/logs", get(jobs::logs))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/agent/register", post(agent::register))
        .route("/agent/heartbeat", post(agent::heartbeat))
        .route("/agent/lease", post(agent::lease))
        .route("/agent/jobs/{id}/report", post(agent::report))
        .route("/ledger/accounts", get(ledger::list_accounts))
        .route("/ledger/accounts/{id}", get(ledger::get_account))
        .route("/ledger/accounts/{id}/statement", get(ledger::statement))
        .route("/ledger/deposits", post(ledger::deposit))
        .route("/ledger/invoices/{tenant}", get(ledger::invoice))
        .route(
            "/evidence",
            get(zone::list_evidence).post(zone::put_evidence),
        )
        .route("/flows/decide", post(zone::decide))
        .route("/obligations", get(zone::obligations))
        .route("/flows", get(flows::list).post(flows::request))
        .route("/flows/{id}", get(flows::get))
        .route("/agent/flows/{id}/report", post(flows::report))
        .route(
            "/datasets",
            get(zone::list_datasets).post(zone::register_dataset),
        )
        .route("/datasets/{name}", get(zone::get_dataset))
        .route("/datasets/{name}/versions", post(zone::add_version))
        .route("/vaults", get(zone::list_vaults))
        .route(
            "/data-offers",
            get(contracts::list_offers).post(contracts::publish_offer),
        )
        .route(
            "/contracts",
            get(contracts::list_contracts).post(contracts::request_contract),
        )
        .route("/contracts/{id}/approve", post(contracts::approve))
        .route("/contracts/{id}/revoke", post(contracts::revoke))
        .route("/queries", get(queries::list).post(queries::submit))
        .route("/queries/{id}", get(queries::get))
        .route("/fusion", get(fusion::list).post(fusion::submit))
        .route("/fusion/{id}", get(fusion::get))
        .route("/fusion/{id}/logs", get(fusion::logs))
        .route("/fusion/{id}/cancel", post(fusion::cancel))
        .route(
            "/agent/fusion/{id}/relay",
            get(fusion::relay_receive).post(fusion::relay_send),
        )
        .route("/agent/fusion/{id}/report", post(fusion::report))
        .route("/agent/queries/claim", post(queries::claim))
        .route("/agent/queries/{id}/answer", post(queries::answer))
        .route(
            "/agent/queries/{id}/relay",
            get(queries::relay_receive).post(queries::relay_send),
        )
        .route("/audit/checkpoint", get(audit::checkpoint))
        .route("/audit/key", get(audit::key))
        .route("/audit/entries", get(audit::list_entries))
        .route("/audit/entries/{index}", get(audit::get_entry))
        .route("/audit/proof/inclusion", get(audit::inclusion))
        .route("/audit/proof/consistency", get(audit::consistency))
        .route("/openapi.json", get(openapi::document));
    Router::new()
        .nest("/api/v1", api)
        .merge(openapi::browser())
        .route("/console", get(console::overview))
        .route("/console/jobs", get(console::jobs))
        .route("/console/jobs/{id}", get(console::job))
        .route("/console/queries/{id}", get(console::query))
        .route("/console/fusion/{id}", get(console::fusion_run))
        .route("/console/login", post(console::sign_in))
        .route("/console/logout", post(console::sign_out))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics::render))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(body::BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Health: the store answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = baygrid_api::Health)))]
async fn health(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<baygrid_api::Health>, ApiError> {
    sqlx_ping(&state).await?;
    Ok(axum::Json(baygrid_api::Health {
        status: "ok".into(),
        store: state.store.backend().durability().into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}

async fn sqlx_ping(state: &AppState) -> Result<(), ApiError> {
    state.store.count("catalog").await?;
    Ok(())
}
