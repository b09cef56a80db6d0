//! The server's one typed config. Every field has a default, so `baygrid up` needs no file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `baygrid server --config FILE` (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where the SQLite store, the operator token and the keys live.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://USER:PASS@HOST/DB`; empty: SQLite in `data_dir`.
    pub store: String,
    /// A sites file to publish at start (`sample` for the built-in GBA region); empty: none.
    pub sites_file: String,
    /// How long a lease lasts without a heartbeat.
    #[serde(with = "baygrid_core::duration_text")]
    pub lease_ttl: Duration,
    /// How often agents are asked to heartbeat.
    #[serde(with = "baygrid_core::duration_text")]
    pub heartbeat_interval: Duration,
    /// How long an agent has to take the lease on a placed job before it is requeued.
    #[serde(with = "baygrid_core::duration_text")]
    pub grant_timeout: Duration,
    /// Time between scheduling cycles.
    #[serde(with = "baygrid_core::duration_text")]
    pub schedule_interval: Duration,
    /// After a restart, how long agents get to reconnect before their leases can expire.
    #[serde(with = "baygrid_core::duration_text")]
    pub restart_grace: Duration,
    /// Most queued jobs considered per scheduling cycle.
    pub schedule_batch: i64,
    /// The audit log's name: the origin line of its checkpoints and its key's name.
    pub audit_origin: String,
    /// How often a new checkpoint is signed when the log has grown.
    #[serde(with = "baygrid_core::duration_text")]
    pub checkpoint_interval: Duration,
    /// The platform's fee, in basis points of each job's metered cost (500 = 5%).
    pub fee_bps: u32,
    /// A job's hold is its price ceiling × accelerators × estimated duration × this
    /// margin, in percent (150 = half as much again).
    pub hold_margin_pct: u32,
    /// How long a hold may stay open before it is voided (a job that never completes).
    #[serde(with = "baygrid_core::duration_text")]
    pub hold_timeout: Duration,
    /// How long an ended job's output is kept in the store; absent: for as long as the job.
    /// The job itself, its history and its charges stay.
    #[serde(
        with = "baygrid_core::duration_text::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub log_retention: Option<Duration>,
    /// A rule-pack parameters file (thresholds, city lists, dates); empty: the built-in one.
    pub rule_pack: String,
    /// How long a cluster that lost a job is blocked for it after the first loss; doubles
    /// with each further loss, at most an hour.
    #[serde(with = "baygrid_core::duration_text")]
    pub failover_backoff: Duration,
    /// Tenants' fair-share weights (1 when absent): the scheduling cycle orders queued jobs
    /// by each tenant's dominant share divided by its weight.
    pub tenant_weights: std::collections::BTreeMap<String, f64>,
    /// Each site's vault, by site name: an absolute directory, `file:///…` or
    /// `s3://bucket/prefix`. A site not listed keeps its vault in `<data_dir>/vaults/<site>`.
    pub vaults: std::collections::BTreeMap<String, String>,
    /// Named priority classes a job spec may give as `priority_class` instead of a number
    /// (-1000 to 1000; higher runs first).
    pub priority_classes: std::collections::BTreeMap<String, i32>,
    /// How long a query may wait for its vaults' answers, and a fusion run for its workers
    /// to be claimed or to report, before it fails with the sites it waited on.
    #[serde(with = "baygrid_core::duration_text")]
    pub vault_answer_timeout: Duration,
    /// The green term's weight in placement: CNY added per CNY of compute for each unit of
    /// a site's non-green power share (0 ignores green power; 0.05 makes a site on 30% green
    /// power 3.5% dearer in the choice). It steers the choice and is never billed.
    pub green_weight: f64,
    /// Nominal quotas: tenant → accelerator model → accelerators. A tenant listed here
    /// holds no more than its quota of each model (none of a model it does not list),
    /// unless `quota_borrowing` lets it use the cohort's idle quota. Tenants not listed are
    /// not limited.
    pub tenant_quotas: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Tenants with quotas form one cohort and may borrow its unused quota; the cohort
    /// never holds more than its quotas' sum.
    pub quota_borrowing: bool,
    /// A preemptible job runs at least this long before it may be stopped for another.
    #[serde(with = "baygrid_core::duration_text")]
    pub preemption_grace: Duration,
    /// A latency-insensitive job that fits now only on a dearer cluster may wait for a
    /// cheaper one expected to free up, for up to this share of its estimated run time from
    /// its submission (0: never waits).
    pub patience_share: f64,
    /// The longest such wait.
    #[serde(with = "baygrid_core::duration_text")]
    pub patience_cap: Duration,
    /// The least saving, as a share of the cost now, worth that wait.
    pub patience_saving: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7700".parse().expect("literal address"),
            data_dir: PathBuf::from(".baygrid"),
            store: String::new(),
            sites_file: String::new(),
            lease_ttl: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(1),
            grant_timeout: Duration::from_secs(30),
            schedule_interval: Duration::from_millis(200),
            restart_grace: Duration::from_secs(20),
            schedule_batch: 10_000,
            audit_origin: "baygrid.local/audit".into(),
            checkpoint_interval: Duration::from_secs(1),
            fee_bps: 500,
            hold_margin_pct: 150,
            hold_timeout: Duration::from_secs(30 * 24 * 3600),
            log_retention: None,
            rule_pack: String::new(),
            failover_backoff: Duration::from_secs(60),
            tenant_weights: std::collections::BTreeMap::new(),
            vaults: std::collections::BTreeMap::new(),
            vault_answer_timeout: Duration::from_secs(600),
            green_weight: 0.0,
            tenant_quotas: Default::default(),
            quota_borrowing: true,
            preemption_grace: Duration::from_secs(60),
            patience_share: baygrid_sched::patience::Patience::default().share,
            patience_cap: Duration::from_secs_f64(
                baygrid_sched::patience::Patience::default().cap_s,
            ),
            patience_saving: baygrid_sched::patience::Patience::default().saving,
            priority_classes: [
                ("urgent", 500),
                ("high", 100),
                ("normal", 0),
                ("batch", -100),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect(),
        }
    }
}

impl ServerConfig {
    /// The quotas the scheduling cycle and quotes apply.
    pub fn quotas(&self) -> baygrid_sched::quota::Quotas {
        baygrid_sched::quota::Quotas {
            nominal: self.tenant_quotas.clone(),
            borrowing: self.quota_borrowing,
        }
    }

    /// How long a latency-insensitive job may wait for a cheaper cluster.
    pub fn patience(&self) -> baygrid_sched::patience::Patience {
        baygrid_sched::patience::Patience {
            share: self.patience_share,
            cap_s: self.patience_cap.as_secs_f64(),
            saving: self.patience_saving,
        }
    }

    /// Reads a TOML config; unknown fields are errors.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.log_retention.is_some_and(|r| r.is_zero()) {
            return Err(
                "log_retention must be longer than zero (leave it out to keep output)".into(),
            );
        }
        if self.lease_ttl < self.heartbeat_interval * 2 {
            return Err("lease_ttl must be at least twice heartbeat_interval".into());
        }
        if self.schedule_batch < 1 {
            return Err("schedule_batch must be at least 1".into());
        }
        for (name, value) in &self.priority_classes {
            if !(-1000..=1000).contains(value) {
                return Err(format!(
                    "priority_classes.{name}: must be between -1000 and 1000, got {value}"
                ));
            }
        }
        if self.vault_answer_timeout < Duration::from_secs(1) {
            return Err("vault_answer_timeout must be at least 1s".into());
        }
        if !(self.green_weight.is_finite() && (0.0..=10.0).contains(&self.green_weight)) {
            return Err(format!(
                "green_weight: must be between 0 and 10, got {}",
                self.green_weight
            ));
        }
        if let Err((field, problem)) = self.patience().validate() {
            let field = if field == "cap_s" { "cap" } else { field };
            return Err(format!("patience_{field}: {problem}"));
        }
        if self.fee_bps > 10_000 {
            return Err("fee_bps must be at most 10000 (100%)".into());
        }
        if self.hold_margin_pct < 100 {
            return Err("hold_margin_pct must be at least 100: a hold covers the estimate".into());
        }
        for (tenant, weight) in &self.tenant_weights {
            if !(weight.is_finite() && *weight > 0.0) {
                return Err(format!(
                    "tenant_weights.{tenant}: must be a positive number, got {weight}"
                ));
            }
        }
        for (site, url) in &self.vaults {
            let local = url.strip_prefix("file://").unwrap_or(url);
            let fine = url.starts_with("s3://") && url.len() > 5
                || !local.contains("://") && std::path::Path::new(local).is_absolute();
            if !fine {
                return Err(format!(
                    "vaults.{site}: `{url}` is not an absolute directory, file:///path or s3://bucket/prefix"
                ));
            }
        }
        Ok(())
    }

    /// The vault URL of a site: configured, or a directory in the data directory.
    pub fn vault_url(&self, site: &str) -> String {
        match self.vaults.get(site) {
            Some(url) => url.clone(),
            None => {
                let dir = self.data_dir.join("vaults").join(site);
                std::path::absolute(&dir)
                    .unwrap_or(dir)
                    .display()
                    .to_string()
            }
        }
    }

    /// The store URL, defaulting to SQLite in the data directory.
    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            format!("sqlite://{}", self.data_dir.join("baygrid.db").display())
        } else {
            self.store.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_fields_fail() {
        let text = toml::to_string(&ServerConfig::default()).unwrap();
        let back: ServerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, ServerConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:1\"").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        std::fs::write(&path, "[tenant_weights]\nhk-bank = 0\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("tenant_weights.hk-bank"), "{err}");
        std::fs::write(&path, "[tenant_weights]\nhk-bank = 2.5\n").unwrap();
        assert_eq!(
            ServerConfig::load(&path).unwrap().tenant_weights["hk-bank"],
            2.5
        );
        std::fs::write(&path, "lease_ttl = \"1s\"").unwrap();
        assert!(ServerConfig::load(&path)
            .unwrap_err()
            .to_string()
            .contains("lease_ttl"));
        std::fs::write(&path, "[priority_classes]\nurgent = 5000\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("priority_classes.urgent"), "{err}");
        std::fs::write(&path, "vault_answer_timeout = \"10ms\"").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("vault_answer_timeout"), "{err}");
        std::fs::write(&path, "green_weight = -0.5").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("green_weight"), "{err}");
        std::fs::write(&path, "green_weight = 0.05").unwrap();
        assert_eq!(ServerConfig::load(&path).unwrap().green_weight, 0.05);
        std::fs::write(&path, "patience_saving = 1.5").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("patience_saving"), "{err}");
        std::fs::write(&path, "patience_share = 0\npatience_cap = \"2h\"").unwrap();
        let patience = ServerConfig::load(&path).unwrap().patience();
        assert_eq!((patience.share, patience.cap_s), (0.0, 7200.0));
        std::fs::write(
            &path,
            "quota_borrowing = false\n[tenant_quotas.gz-ai-lab]\nH800 = 16\n",
        )
        .unwrap();
        let quotas = ServerConfig::load(&path).unwrap().quotas();
        assert!(!quotas.borrowing);
        assert_eq!(quotas.nominal["gz-ai-lab"]["H800"], 16);
        std::fs::write(&path, "[tenant_quotas.gz-ai-lab]\nH800 = -1\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("tenant_quotas") || err.contains("H800"),
            "{err}"
        );
    }
}
