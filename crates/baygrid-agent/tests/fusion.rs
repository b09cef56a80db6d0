//! Fusion training through the exchange, end to end: a Hong Kong hospital's breast-tumour
//! cases (FATE's breast_homo guest table) in the Cyberport vault and a Guangzhou hospital's
//! (the host table) in the Nansha vault. A Hong Kong lab with federated contracts on both
//! starts a homo-LR run through the API; each party's worker runs beside its own vault, in
//! its own jurisdiction; the aggregator is placed where the rules let both parties' model
//! updates go; each party's copy of the model lands in its vault, released by the rules,
//! audited, and the run is charged.

mod common;

use std::path::Path;
use std::time::Duration;

use baygrid_api::{
    Client, DatasetSpec, DatasetView, FusionEvent, FusionState, FusionView, WorkerState,
};
use baygrid_core::{Jurisdiction, Role};
use baygrid_server::ServerConfig;
use common::{console_page, repo, start_agent, wait_job_ended};
use serde_json::{json, Value};

fn yaml<T: serde::de::DeserializeOwned>(path: &str) -> T {
    serde_yaml::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

struct Zone {
    server: baygrid_server::RunningServer,
    config: ServerConfig,
    operator: Client,
    lab: Client,
    agents: Vec<(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
}

/// A holder's dataset, its federated offer, and the file uploaded into its vault.
struct Holding {
    party: Value,
    dataset: DatasetSpec,
    offer: Value,
    file: &'static str,
    /// Drop a seeded quarter of the file's individuals before uploading, with this seed.
    drop_seed: Option<u64>,
}

/// Holders of examples/datasets with their examples/data-offers: (party, jurisdiction,
/// city, dataset, FATE file).
fn holdings(of: &[(&str, &str, &str, &str, &'static str)]) -> Vec<Holding> {
    of.iter()
        .map(|&(name, jurisdiction, city, dataset, file)| Holding {
            party: json!({"name": name, "jurisdiction": jurisdiction, "city": city}),
            dataset: yaml(&format!("examples/datasets/{dataset}.yaml")),
            offer: yaml(&format!("examples/data-offers/{dataset}.yaml")),
            file,
            drop_seed: None,
        })
        .collect()
}

/// The two hospitals (FATE's breast_homo).
fn hospitals() -> Vec<Holding> {
    holdings(&[
        (
            "hk-hospital",
            "HK",
            "hong-kong",
            "hk-breast-clinic",
            "breast_homo_guest.csv",
        ),
        (
            "gz-hospital",
            "CN",
            "guangzhou",
            "gz-breast-clinic",
            "breast_homo_host.csv",
        ),
    ])
}

/// A Hong Kong hospital's diagnoses and a Guangzhou hospital's imaging of the same
/// patients (FATE's breast_hetero).
fn tumour_holders() -> Vec<Holding> {
    holdings(&[
        (
            "hk-hospital",
            "HK",
            "hong-kong",
            "hk-tumour-diagnoses",
            "breast_hetero_guest.csv",
        ),
        (
            "gz-hospital",
            "CN",
            "guangzhou",
            "gz-tumour-imaging",
            "breast_hetero_host.csv",
        ),
    ])
}

/// The three card issuers (FATE's default_credit_homo).
fn issuers() -> Vec<Holding> {
    holdings(&[
        (
            "hk-issuer",
            "HK",
            "hong-kong",
            "hk-issuer-cards",
            "default_credit_homo_guest.csv",
        ),
        (
            "sz-issuer",
            "CN",
            "shenzhen",
            "sz-issuer-cards",
            "default_credit_homo_host_1.csv",
        ),
        (
            "mo-issuer",
            "MO",
            "macao",
            "mo-issuer-cards",
            "default_credit_homo_host_2.csv",
        ),
    ])
}

async fn zone(dir: &Path, holdings: Vec<Holding>, clusters: &[&str]) -> Zone {
    zone_with(
        dir,
        holdings,
        clusters,
        ServerConfig::default().vault_answer_timeout,
    )
    .await
}

async fn zone_with(
    dir: &Path,
    holdings: Vec<Holding>,
    clusters: &[&str],
    vault_answer_timeout: Duration,
) -> Zone {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("server"),
        sites_file: "sample".into(),
        schedule_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        checkpoint_interval: Duration::from_millis(200),
        vault_answer_timeout,
        ..ServerConfig::default()
    };
    let server = baygrid_server::start(config.clone()).await.unwrap();
    let url = server.url();
    let operator = Client::new(&url, Some(server.operator_token.clone()));
    for h in holdings {
        let _: Value = operator.post("/api/v1/parties", &h.party).await.unwrap();
        let holder = operator
            .issue(Role::DataHolder, h.party["name"].as_str())
            .await
            .unwrap();
        let _: DatasetView = holder.post("/api/v1/datasets", &h.dataset).await.unwrap();
        let mut file = repo(&format!("../shared/data/fate/{}", h.file));
        if let Some(seed) = h.drop_seed {
            let part = dir.join(format!("{}.csv", h.dataset.name));
            baygrid_query::drop_subjects(&file, &part, "id", 0.25, seed).unwrap();
            file = part;
        }
        baygrid_vault::upload(&holder, &h.dataset.name, &[file])
            .await
            .unwrap();
        let _: Value = holder.post("/api/v1/data-offers", &h.offer).await.unwrap();
    }
    let lab = operator
        .add_tenant(
            "gba-oncology-lab",
            Jurisdiction::HK,
            "hong-kong",
            "10000.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    let mut agents = Vec::new();
    for cluster in clusters {
        agents.push(start_agent(&url, &operator, cluster, &dir.join(cluster)).await);
    }
    Zone {
        server,
        config,
        operator,
        lab,
        agents,
    }
}

/// The tumour holders' zone, with agents at Cyberport and Nansha and the lab's federated
/// contracts on both datasets.
async fn tumour_zone(dir: &Path) -> Zone {
    let zone = zone(dir, tumour_holders(), &["cyberport-h800", "nansha-a800"]).await;
    contracts(
        &zone.lab,
        &[
            "hk-tumour-diagnoses-federated",
            "gz-tumour-imaging-federated",
        ],
    )
    .await;
    zone
}

async fn contracts(lab: &Client, offers: &[&str]) {
    contracts_for(lab, offers, "medical_research").await
}

/// The lab's federated contracts on `offers` for `purpose`, active at once.
async fn contracts_for(lab: &Client, offers: &[&str], purpose: &str) {
    for offer in offers {
        let c: Value = lab
            .post(
                "/api/v1/contracts",
                &json!({"offer": offer, "mode": "federated", "purpose": purpose, "site": "hk-cyberport"}),
            )
            .await
            .unwrap();
        assert_eq!(c["state"], "active", "{c}");
    }
}

const HOSPITAL_OFFERS: [&str; 2] = ["hk-breast-clinic-federated", "gz-breast-clinic-federated"];

fn run_file() -> Value {
    let spec: Value = yaml("examples/fusion/breast-homo-lr-exchange.yaml");
    spec
}

async fn wait_ended(client: &Client, id: &str) -> FusionView {
    for _ in 0..1200 {
        let view: FusionView = client.get(&format!("/api/v1/fusion/{id}")).await.unwrap();
        if view.state != FusionState::Running {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fusion run {id} did not end");
}

#[tokio::test]
async fn a_federated_run_trains_in_each_partys_jurisdiction_and_saves_each_copy_in_its_vault() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path(), hospitals(), &["cyberport-h800", "nansha-a800"]).await;
    contracts(&zone.lab, &HOSPITAL_OFFERS).await;
    let started: FusionView = zone.lab.post("/api/v1/fusion", &run_file()).await.unwrap();
    assert_eq!(started.state, FusionState::Running);
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");

    // every party's worker ran at its own vault's site, in its own jurisdiction
    let by_role = |role: &str| view.workers.iter().find(|w| w.role == role).unwrap();
    let hk = by_role("hk-hospital");
    let gz = by_role("gz-hospital");
    assert_eq!(
        (hk.site.as_str(), hk.jurisdiction),
        ("hk-cyberport", Jurisdiction::HK)
    );
    assert_eq!(hk.cluster.as_deref(), Some("cyberport-h800"));
    assert_eq!(
        (gz.site.as_str(), gz.jurisdiction),
        ("guangzhou-nansha", Jurisdiction::CN)
    );
    assert_eq!(gz.cluster.as_deref(), Some("nansha-a800"));
    // the aggregator sits at the cheaper party site both parties' updates may reach
    let aggregator = by_role("aggregator");
    assert_eq!(aggregator.site, "guangzhou-nansha");
    assert!(view
        .placement
        .iter()
        .any(|p| p.starts_with("guangzhou-nansha (CN)")));
    assert!(
        view.rules.iter().any(|r| r == "DERIVED-MODEL"),
        "{:?}",
        view.rules
    );
    assert!(view
        .aggregation
        .as_deref()
        .is_some_and(|a| a.starts_with("plain")));
    assert!(view.workers.iter().all(|w| w.state == WorkerState::Done));

    // FATE's settings: 30 rounds, the loss falls, the model separates the classes
    assert_eq!(view.rounds.len(), 30);
    assert!(view.rounds[29].loss.unwrap() < view.rounds[0].loss.unwrap());
    for party in [hk, gz] {
        let auc = party.scores.as_ref().unwrap()["auc"].as_f64().unwrap();
        assert!(auc > 0.97, "{}: AUC {auc}", party.role);
    }

    // each copy of the model is a derived dataset in the party's own vault, not personal
    assert_eq!(hk.model_sha256, gz.model_sha256, "both hold the same model");
    for party in [hk, gz] {
        let name = party.model.as_ref().unwrap();
        let dataset: DatasetView = zone
            .operator
            .get(&format!("/api/v1/datasets/{name}"))
            .await
            .unwrap();
        assert_eq!(dataset.spec.vault, party.site);
        assert_eq!(dataset.spec.personal, baygrid_rules::Personal::None);
        assert_eq!(
            dataset.spec.derived_from,
            vec![
                "hk-breast-clinic".to_string(),
                "gz-breast-clinic".to_string()
            ]
        );
        let file = &dataset.versions[0].files[0];
        assert_eq!(file.name, "model.json");
        assert_eq!(Some(&file.sha256), party.model_sha256.as_ref());
    }

    // each worker was a job in the dispatcher's queue, held to its site and jurisdiction,
    // placed on the cluster that ran it, and settled as a job
    let mut compute = 0;
    for w in &view.workers {
        let id = w.job.as_ref().expect("every worker has a job");
        let job = wait_job_ended(&zone.lab, id).await;
        assert_eq!(job.state, baygrid_core::JobState::Succeeded, "{job:#?}");
        assert_eq!(job.cluster, w.cluster, "{job:#?}");
        assert_eq!(job.spec.sites, Some(vec![w.site.clone()]));
        assert_eq!(job.spec.allowed_jurisdictions, Some(vec![w.jurisdiction]));
        assert_eq!(
            job.spec.fusion.as_ref().map(|f| (f.run.as_str(), f.index)),
            Some((view.id.as_str(), w.index))
        );
        // metered from the lease's start: a worker of a second costs under a fen
        compute += job.cost.expect("a finished job has its cost").minor;
    }
    // the run itself is charged both offers' per-use prices
    let charged = view.charged.unwrap();
    assert!(
        charged.minor > 0 && charged.minor <= view.held.minor,
        "{charged} of {}",
        view.held
    );
    let statement: Value = zone
        .lab
        .get("/api/v1/ledger/accounts/wallet:gba-oncology-lab/statement")
        .await
        .unwrap();
    assert!(
        statement
            .to_string()
            .contains(&format!("fusion:{}", view.id)),
        "{statement}"
    );
    // and on the month's invoice, as a data use with its datasets
    let month = &view.finished_at.as_ref().unwrap()[..7];
    let invoice: baygrid_api::InvoiceView = zone
        .lab
        .get(&format!(
            "/api/v1/ledger/invoices/gba-oncology-lab?month={month}"
        ))
        .await
        .unwrap();
    let line = invoice.data_uses.iter().find(|u| u.id == view.id).unwrap();
    assert_eq!(
        (line.kind.as_str(), line.state.as_str()),
        ("fusion", "succeeded")
    );
    assert_eq!(line.amount, charged);
    assert_eq!(line.datasets, ["hk-breast-clinic", "gz-breast-clinic"]);
    // and the workers' jobs as compute lines
    let workers: Vec<_> = view.workers.iter().filter_map(|w| w.job.clone()).collect();
    let lines: Vec<_> = invoice
        .lines
        .iter()
        .filter(|l| workers.contains(&l.job))
        .collect();
    assert_eq!(lines.len(), 3, "{invoice:#?}");
    assert_eq!(invoice.total.minor, charged.minor + compute, "{invoice:#?}");

    // the log shows placement and every round; the audit log has the run and the release
    let logs: Vec<FusionEvent> = zone
        .lab
        .get(&format!("/api/v1/fusion/{}/logs", view.id))
        .await
        .unwrap();
    assert!(logs.iter().any(|e| e.line.starts_with("round 30: loss")));
    assert!(logs.iter().any(|e| e.line.contains("released under")));
    let entries: Value = zone
        .operator
        .get("/api/v1/audit/entries?limit=1000")
        .await
        .unwrap();
    let text = entries.to_string();
    assert!(text.contains("fusion.accepted") && text.contains("fusion.finished"));
    assert!(text.contains(&view.id));

    // listed for the lab; another tenant sees nothing of it
    let mine: Vec<FusionView> = zone.lab.get("/api/v1/fusion").await.unwrap();
    assert_eq!(mine.len(), 1);
    let other = zone
        .operator
        .add_tenant(
            "other-lab",
            Jurisdiction::HK,
            "hong-kong",
            "10.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    assert!(other
        .get::<FusionView>(&format!("/api/v1/fusion/{}", view.id))
        .await
        .is_err());
    let theirs: Vec<FusionView> = other.get("/api/v1/fusion").await.unwrap();
    assert!(theirs.is_empty());
    // the console's page of the run: every worker with its job and model, every round
    let path = format!("/console/fusion/{}", view.id);
    let (status, page) = console_page(&zone.lab, &path).await;
    assert_eq!(status, 200, "{page}");
    for worker in &view.workers {
        assert!(page.contains(&worker.site), "{}: {page}", worker.site);
        if let Some(job) = &worker.job {
            assert!(
                page.contains(&format!("/console/jobs/{job}")),
                "{job}: {page}"
            );
        }
        if let Some(model) = &worker.model {
            assert!(page.contains(model), "{model}: {page}");
        }
    }
    let rounds = page.matches("<tr><td>").count();
    assert!(rounds >= view.rounds.len(), "{rounds} rows: {page}");
    let (status, _) = console_page(&other, &path).await;
    assert_eq!(status, 404);
    // nor may it start a page there
    let e = other
        .get::<Vec<FusionView>>(&format!("/api/v1/fusion?before={}", view.id))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("before"), "{e}");
    let after_it: Vec<FusionView> = zone
        .lab
        .get(&format!("/api/v1/fusion?before={}", view.id))
        .await
        .unwrap();
    assert!(after_it.is_empty());

    // an MLP with DP-SGD inside each party: each reports the ε it spent
    let mut dp = run_file();
    dp["task"] = json!("homo-mlp");
    dp["settings"] = json!({
        "hidden": 8, "rounds": 3, "learning_rate": 0.5, "seed": 3,
        "dp": {"clip": 1.0, "noise_multiplier": 1.0, "batch_size": 64, "delta": 1e-5},
    });
    let started: FusionView = zone.lab.post("/api/v1/fusion", &dp).await.unwrap();
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    for party in &view.workers[1..] {
        let epsilon = party.scores.as_ref().unwrap()["dp_epsilon"]
            .as_f64()
            .unwrap();
        assert!(epsilon > 0.0 && epsilon.is_finite(), "{epsilon}");
    }
    drop(zone.agents);
    zone.server.stop().await;
}

#[tokio::test]
async fn bad_runs_are_refused_by_field_and_cancelled_runs_are_not_charged() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path(), hospitals(), &["cyberport-h800", "nansha-a800"]).await;
    // no contract yet
    let err = zone
        .lab
        .post::<_, FusionView>("/api/v1/fusion", &run_file())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no active federated contract"), "{err}");
    contracts(&zone.lab, &HOSPITAL_OFFERS).await;
    let cases = [
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}]}),
            "parties",
        ),
        (json!({"task": "psi", "parties": []}), "parties"),
        (json!({"task": "boosting", "parties": []}), "task"),
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}, {"name": "a", "dataset": "gz-breast-clinic"}]}),
            "parties[1].name",
        ),
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}, {"name": "b", "dataset": "nowhere"}]}),
            "parties[1].dataset",
        ),
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}, {"name": "b", "dataset": "gz-breast-clinic"}], "settings": {"rounds": 0}}),
            "settings.rounds",
        ),
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}, {"name": "b", "dataset": "gz-breast-clinic"}], "settings": {"learning_rate": "fast"}}),
            "settings.learning_rate",
        ),
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}, {"name": "b", "dataset": "gz-breast-clinic"}], "settings": {"hidden": 8}}),
            "settings.hidden",
        ),
        (
            json!({"task": "homo-lr", "parties": [{"name": "a", "dataset": "hk-breast-clinic"}, {"name": "b", "dataset": "gz-breast-clinic"}], "priority_class": "vip"}),
            "priority_class",
        ),
    ];
    for (body, field) in cases {
        let err = zone
            .lab
            .post::<_, FusionView>("/api/v1/fusion", &body)
            .await
            .unwrap_err();
        match &err {
            baygrid_api::ClientError::Api {
                status,
                field: got,
                message,
                ..
            } => {
                assert_eq!(*status, 400, "{message}");
                assert_eq!(got.as_deref(), Some(field), "{message}");
            }
            other => panic!("{other}"),
        }
    }
    // a wallet that cannot cover the run's hold and its workers' jobs' holds is refused by
    // field, and nothing of the run is written
    let small = zone
        .operator
        .add_tenant(
            "small-lab",
            Jurisdiction::HK,
            "hong-kong",
            "500.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    contracts(&small, &HOSPITAL_OFFERS).await;
    let mut long = run_file();
    long["max_minutes"] = json!(1440);
    match small.post::<_, FusionView>("/api/v1/fusion", &long).await {
        Err(baygrid_api::ClientError::Api {
            status,
            field,
            message,
            ..
        }) => {
            assert_eq!(
                (status, field.as_deref()),
                (422, Some("max_minutes")),
                "{message}"
            );
            assert!(message.contains("500.00 CNY available"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let runs: Vec<FusionView> = small.get("/api/v1/fusion").await.unwrap();
    let jobs: Vec<baygrid_api::JobView> = small.get("/api/v1/jobs").await.unwrap();
    assert!(runs.is_empty() && jobs.is_empty(), "{runs:?} {jobs:?}");
    let wallet: Value = small
        .get("/api/v1/ledger/accounts/wallet:small-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.00 CNY", "{wallet}");
    // the default half hour fits the same wallet
    let fits: FusionView = small.post("/api/v1/fusion", &run_file()).await.unwrap();
    let _: FusionView = small
        .post(&format!("/api/v1/fusion/{}/cancel", fits.id), &json!({}))
        .await
        .unwrap();

    // a run whose parties never get an agent can be cancelled; its hold is voided
    drop(zone.agents);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut spec = run_file();
    spec["settings"]["rounds"] = json!(500);
    let started: FusionView = zone.lab.post("/api/v1/fusion", &spec).await.unwrap();
    let cancelled: FusionView = zone
        .lab
        .post(&format!("/api/v1/fusion/{}/cancel", started.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(cancelled.state, FusionState::Cancelled);
    assert!(cancelled.charged.is_none());
    let again = zone
        .lab
        .post::<_, FusionView>(&format!("/api/v1/fusion/{}/cancel", started.id), &json!({}))
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("has ended"), "{again}");
    let wallet: Value = zone
        .lab
        .get("/api/v1/ledger/accounts/wallet:gba-oncology-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.00 CNY", "{wallet}");

    // a run left running when the server stops is still running after the next start
    // (its workers' messages are in the store), holding its charge until it ends
    let orphan: FusionView = zone.lab.post("/api/v1/fusion", &spec).await.unwrap();
    assert_eq!(orphan.state, FusionState::Running);
    zone.server.stop().await;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..zone.config.clone()
    };
    let server = baygrid_server::start(config).await.unwrap();
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    let after: FusionView = operator
        .get(&format!("/api/v1/fusion/{}", orphan.id))
        .await
        .unwrap();
    assert_eq!(after.state, FusionState::Running, "{after:#?}");
    let cancelled: FusionView = operator
        .post(&format!("/api/v1/fusion/{}/cancel", orphan.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(cancelled.state, FusionState::Cancelled);
    let wallet: Value = operator
        .get("/api/v1/ledger/accounts/wallet:gba-oncology-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.00 CNY", "{wallet}");
    server.stop().await;
}

#[tokio::test]
async fn three_card_issuers_in_three_jurisdictions_train_with_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let holdings = issuers();
    let zone = zone(
        dir.path(),
        holdings,
        &["cyberport-h800", "qianhai-h800", "macao-a100"],
    )
    .await;
    contracts_for(
        &zone.lab,
        &[
            "hk-issuer-cards-federated",
            "sz-issuer-cards-federated",
            "mo-issuer-cards-federated",
        ],
        "credit_risk",
    )
    .await;
    let mut run: Value = yaml("examples/fusion/default-credit-homo-lr-exchange.yaml");
    run["settings"]["rounds"] = json!(5);
    let started: FusionView = zone.lab.post("/api/v1/fusion", &run).await.unwrap();
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    assert_eq!(view.aggregation.as_deref(), Some("secure (threshold 2)"));
    let jurisdictions: Vec<Jurisdiction> =
        view.workers[1..].iter().map(|w| w.jurisdiction).collect();
    assert_eq!(
        jurisdictions,
        [Jurisdiction::HK, Jurisdiction::CN, Jurisdiction::MO]
    );
    assert_eq!(view.rounds.len(), 5);
    // the same model as the three tables trained in one process, through the same
    // secure aggregation: the parties' split never changed the arithmetic
    let tables: Vec<baygrid_fusion::data::Table> = ["guest", "host_1", "host_2"]
        .iter()
        .map(|p| {
            baygrid_fusion::data::Table::read_csv(&repo(&format!(
                "../shared/data/fate/default_credit_homo_{p}.csv"
            )))
            .unwrap()
        })
        .collect();
    let cfg = baygrid_fusion::homo::HomoConfig {
        rounds: 5,
        ..baygrid_fusion::homo::HomoConfig::fate_lr()
    };
    let together =
        baygrid_fusion::homo::train(&cfg, &tables, &baygrid_fusion::homo::device(), |_| {})
            .unwrap();
    for (r, t) in view.rounds.iter().zip(&together.rounds) {
        assert!(
            (r.loss.unwrap() - t.loss).abs() < 1e-3,
            "round {}: {} vs {}",
            r.round,
            r.loss.unwrap(),
            t.loss
        );
    }
    for w in &view.workers[1..] {
        assert!(w.model.is_some() && w.model_sha256 == view.workers[1].model_sha256);
    }
    zone.server.stop().await;
}

#[tokio::test]
async fn a_vertical_run_aligns_patients_by_psi_and_reproduces_fates_auc_across_the_border() {
    let dir = tempfile::tempdir().unwrap();
    let zone = tumour_zone(dir.path()).await;
    // the host's table holds no label, the guest's does: swapped, the run is refused
    let mut swapped: Value = yaml("examples/fusion/breast-hetero-lr-exchange.yaml");
    let parties = swapped["parties"].as_array_mut().unwrap();
    parties.swap(0, 1);
    let err = zone
        .lab
        .post::<_, FusionView>("/api/v1/fusion", &swapped)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("parties[0].dataset"), "{err}");

    let run: Value = yaml("examples/fusion/breast-hetero-lr-exchange.yaml");
    let started: FusionView = zone.lab.post("/api/v1/fusion", &run).await.unwrap();
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    let dealer = &view.workers[0];
    assert_eq!(dealer.role, "dealer");
    assert!(dealer.model.is_none());
    let (guest, host) = (&view.workers[1], &view.workers[2]);
    assert_eq!(
        (guest.jurisdiction, host.jurisdiction),
        (Jurisdiction::HK, Jurisdiction::CN)
    );
    assert_eq!(view.rounds.len(), 5);
    assert!(view.rounds.iter().all(|r| r.gradient_norm.is_some()));
    // FATE's train AUC on breast_hetero, 0.975186, within ±0.005
    let scores = guest.scores.as_ref().unwrap();
    let auc = scores["auc"].as_f64().unwrap();
    assert!((auc - 0.975186).abs() <= 0.005, "train AUC {auc}");
    // the host never scores (it has no label); it only says how many rows it aligned
    assert_eq!(host.scores.as_ref().unwrap()["aligned_rows"], 569);
    // each party's own weights are in its own vault, and they differ
    assert!(guest.model.is_some() && host.model.is_some());
    assert_ne!(guest.model_sha256, host.model_sha256);
    zone.server.stop().await;
}

/// A message posted to the relay must carry its sender's number for it; a number beyond
/// the next one expected is refused, since a message between was never accepted.
async fn relay_posts_are_numbered(operator: &Client, view: &FusionView) {
    let guest = &view.workers[1];
    let cluster = guest.cluster.as_deref().unwrap();
    let agent = operator.issue(Role::Agent, Some(cluster)).await.unwrap();
    let agent = Client::new(operator.base(), agent.token().map(str::to_string));
    let path = format!(
        "/api/v1/agent/fusion/{}/relay?index={}&to=2",
        view.id, guest.index
    );
    let err = agent.post_bytes(&path, b"{}".to_vec()).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().starts_with("n: "), "{err}");
    let err = agent
        .post_bytes(&format!("{path}&n=1000000"), b"{}".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("never accepted"), "{err}");
}

/// The server stops in the middle of a vertical run (PSI, then training over secret
/// shares, every message through the relay) and starts again on the same address and
/// store: the workers wait for it, the messages it had accepted are delivered, and the run
/// ends as one that was never interrupted.
#[tokio::test]
async fn a_run_goes_on_through_a_server_restart() {
    const ITERATIONS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let zone = tumour_zone(dir.path()).await;
    let (mut server, config) = (zone.server, zone.config);
    let addr = server.addr;
    let mut spec: Value = yaml("examples/fusion/breast-hetero-lr-exchange.yaml");
    // long enough to stop the server twice in it
    spec["settings"]["iterations"] = json!(ITERATIONS);
    let started: FusionView = zone.lab.post("/api/v1/fusion", &spec).await.unwrap();

    // once both workers run, stop the server (its in-memory state goes) and start a
    // new one on the same address and store
    let path = format!("/api/v1/fusion/{}", started.id);
    let mut stops = 0;
    let mut restarted_at = chrono::Utc::now();
    for _ in 0..600 {
        let view: FusionView = zone.lab.get(&path).await.unwrap();
        assert_eq!(
            view.state,
            FusionState::Running,
            "ended before the restarts: {view:#?}"
        );
        let running = view
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .count();
        // twice: as the parties align their patients, and again during training
        if running == view.workers.len() && (stops == 0 || view.rounds.len() >= 2) {
            if stops == 0 {
                relay_posts_are_numbered(&zone.operator, &view).await;
            }
            server.stop().await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let config = ServerConfig {
                listen: addr,
                ..config.clone()
            };
            server = baygrid_server::start(config).await.unwrap();
            restarted_at = chrono::Utc::now();
            stops += 1;
            if stops == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stops, 2, "the run never had all its workers running");
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    // it moved on after the second start: rounds were reported to the new server
    let events: Vec<FusionEvent> = zone.lab.get(&format!("{path}/logs")).await.unwrap();
    assert!(
        events.iter().any(|e| e.line.starts_with("round ")
            && chrono::DateTime::parse_from_rfc3339(&e.at).unwrap() > restarted_at),
        "no round after the restart at {restarted_at}: {events:#?}"
    );
    let mut rounds: Vec<usize> = view.rounds.iter().map(|r| r.round).collect();
    rounds.dedup();
    assert_eq!(rounds.len(), ITERATIONS, "each round once: {rounds:?}");
    let guest = view
        .workers
        .iter()
        .find(|w| w.role == "hk-hospital")
        .unwrap();
    let auc = guest.scores.as_ref().unwrap()["auc"].as_f64().unwrap();
    // FATE's train AUC after 5 of these rounds is 0.975186
    assert!(auc > 0.97, "AUC {auc}");
    for w in &view.workers {
        let job = wait_job_ended(&zone.lab, w.job.as_ref().unwrap()).await;
        assert_eq!(job.state, baygrid_core::JobState::Succeeded, "{job:#?}");
        assert_eq!(job.attempts, 0, "{job:#?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_run_no_agent_takes_fails_after_the_timeout_and_is_not_charged() {
    let dir = tempfile::tempdir().unwrap();
    // no agent at either hospital's site
    let zone = zone_with(dir.path(), hospitals(), &[], Duration::from_secs(1)).await;
    contracts(&zone.lab, &HOSPITAL_OFFERS).await;
    let started: FusionView = zone.lab.post("/api/v1/fusion", &run_file()).await.unwrap();
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Failed);
    let error = view.error.unwrap();
    assert!(error.contains("no cluster started"), "{error}");
    assert!(error.contains("hk-hospital's job"), "{error}");
    assert!(error.contains("at hk-cyberport"), "{error}");
    assert!(view.charged.is_none());
    // the workers' jobs waited in the queue and were cancelled with the run
    for w in &view.workers {
        let job: baygrid_api::JobView = zone
            .lab
            .get(&format!("/api/v1/jobs/{}", w.job.as_ref().unwrap()))
            .await
            .unwrap();
        assert_eq!(job.state, baygrid_core::JobState::Cancelled, "{job:#?}");
        assert!(job.cost.is_none_or(|c| c.minor == 0), "{job:#?}");
    }
    let wallet: Value = zone
        .lab
        .get("/api/v1/ledger/accounts/wallet:gba-oncology-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.00 CNY", "{wallet}");
    zone.server.stop().await;
}

/// The ids of a CSV's first column.
fn ids(path: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn psi_through_the_exchange_leaves_each_intersection_in_its_own_vault_where_the_rules_allow()
{
    let dir = tempfile::tempdir().unwrap();
    // FATE's default_credit hetero tables, a seeded quarter of each dropped: a Shenzhen
    // lender and card issuer, and a Hong Kong card issuer
    let card_holders = |party: &str, jurisdiction: &str, city: &str, dataset: &str, file, seed| {
        let offer: Value = yaml(&format!("examples/data-offers/{dataset}.yaml"));
        Holding {
            party: json!({"name": party, "jurisdiction": jurisdiction, "city": city}),
            dataset: yaml(&format!("examples/datasets/{dataset}.yaml")),
            offer: json!({
                "name": format!("{dataset}-federated"), "dataset": dataset,
                "modes": ["federated"], "purposes": ["credit_risk"], "destinations": ["CN", "HK"],
                "price": offer["price"], "expires": "2027-12-31", "auto_approve": true,
            }),
            file,
            drop_seed: Some(seed),
        }
    };
    let holdings = vec![
        card_holders(
            "sz-lender",
            "CN",
            "shenzhen",
            "sz-credit-labels",
            "default_credit_hetero_guest.csv",
            1,
        ),
        card_holders(
            "sz-card-issuer",
            "CN",
            "shenzhen",
            "sz-card-spend",
            "default_credit_hetero_host.csv",
            2,
        ),
        card_holders(
            "hk-card-issuer",
            "HK",
            "hong-kong",
            "hk-card-features",
            "default_credit_hetero_host.csv",
            3,
        ),
    ];
    let zone = zone(dir.path(), holdings, &["qianhai-h800", "cyberport-h800"]).await;
    contracts_for(
        &zone.lab,
        &[
            "sz-credit-labels-federated",
            "sz-card-spend-federated",
            "hk-card-features-federated",
        ],
        "credit_risk",
    )
    .await;
    let run = |guest: &str, host: &str, reveal: &str| {
        json!({
            "task": "psi", "purpose": "credit_risk",
            "parties": [{"name": "guest", "dataset": guest}, {"name": "host", "dataset": host}],
            "settings": {"reveal": reveal},
        })
    };

    // within Shenzhen both learn the intersection; each keeps it in its own vault
    let started: FusionView = zone
        .lab
        .post(
            "/api/v1/fusion",
            &run("sz-credit-labels", "sz-card-spend", "both"),
        )
        .await
        .unwrap();
    assert!(started.workers.iter().all(|w| w.role != "aggregator"));
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    let plain: usize = ids(&dir.path().join("sz-credit-labels.csv"))
        .intersection(&ids(&dir.path().join("sz-card-spend.csv")))
        .count();
    assert!(plain > 10_000 && plain < 22_500, "{plain}");
    assert!(
        view.rules.iter().any(|r| r == "DOMESTIC"),
        "{:?}",
        view.rules
    );
    for party in &view.workers {
        assert_eq!(party.scores.as_ref().unwrap()["intersection"], plain);
        let name = party.model.as_ref().unwrap();
        let dataset: DatasetView = zone
            .operator
            .get(&format!("/api/v1/datasets/{name}"))
            .await
            .unwrap();
        assert_eq!(dataset.spec.vault, "shenzhen-qianhai");
        // a list of individuals stays personal data
        assert_eq!(dataset.spec.personal, baygrid_rules::Personal::Personal);
        assert_eq!(dataset.versions[0].rows, plain as u64);
    }

    // across the border, the Hong Kong side may not learn which Shenzhen lender's
    // customers it holds without their separate consent: refused before anything runs
    let err = zone
        .lab
        .post::<_, FusionView>(
            "/api/v1/fusion",
            &run("sz-credit-labels", "hk-card-features", "both"),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("reach hk-cyberport"), "{err}");
    assert!(err.contains("separate_consent"), "{err}");
    // designated to the Shenzhen lender alone, the membership flows into the mainland
    let started: FusionView = zone
        .lab
        .post(
            "/api/v1/fusion",
            &run("sz-credit-labels", "hk-card-features", "designated"),
        )
        .await
        .unwrap();
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    let (guest, host) = (&view.workers[0], &view.workers[1]);
    assert!(guest.model.is_some());
    assert!(
        host.model.is_none(),
        "the host learned nothing, so keeps nothing"
    );
    assert!(host.scores.as_ref().unwrap().get("intersection").is_none());
    zone.server.stop().await;
}

#[tokio::test]
async fn a_worker_waits_in_the_dispatchers_queue_while_its_site_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path(), hospitals(), &["cyberport-h800", "nansha-a800"]).await;
    contracts(&zone.lab, &HOSPITAL_OFFERS).await;
    // another job holds every accelerator at the Hong Kong hospital's site
    let filler: baygrid_core::JobSpec = serde_yaml::from_str(
        "name: filler\nresources: {accelerators: {H800: 8}, nodes: 16}\ncommand: sleep 600\nestimated_duration: 10m\nsites: [hk-cyberport]\n",
    )
    .unwrap();
    let filler: baygrid_api::JobView = zone.lab.post("/api/v1/jobs", &filler).await.unwrap();
    let mut running = false;
    for _ in 0..200 {
        let job: baygrid_api::JobView = zone
            .lab
            .get(&format!("/api/v1/jobs/{}", filler.id))
            .await
            .unwrap();
        if job.state == baygrid_core::JobState::Running {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "the filler never ran");

    // the Hong Kong worker's job waits in the queue, at the run's priority class; the
    // Guangzhou side starts
    let mut high = run_file();
    high["priority_class"] = json!("high");
    let started: FusionView = zone.lab.post("/api/v1/fusion", &high).await.unwrap();
    let hk_job = started.workers[1].job.clone().unwrap();
    assert_eq!(started.workers[1].site, "hk-cyberport");
    let mut gz_started = false;
    for _ in 0..100 {
        let view: FusionView = zone
            .lab
            .get(&format!("/api/v1/fusion/{}", started.id))
            .await
            .unwrap();
        if view.workers[2].state == WorkerState::Running {
            gz_started = true;
            assert_eq!(view.workers[1].state, WorkerState::Pending, "{view:#?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gz_started, "the Guangzhou worker never started");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting: baygrid_api::JobView = zone
        .lab
        .get(&format!("/api/v1/jobs/{hk_job}"))
        .await
        .unwrap();
    assert_eq!(
        waiting.state,
        baygrid_core::JobState::Queued,
        "{waiting:#?}"
    );

    // once the site frees, the dispatcher places it there and the run completes
    let _: Value = zone
        .lab
        .post(&format!("/api/v1/jobs/{}/cancel", filler.id), &json!({}))
        .await
        .unwrap();
    let view = wait_ended(&zone.lab, &started.id).await;
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    assert_eq!(view.workers[1].cluster.as_deref(), Some("cyberport-h800"));
    let placed = wait_job_ended(&zone.lab, &hk_job).await;
    assert_eq!(placed.cluster.as_deref(), Some("cyberport-h800"));
    assert!(
        placed
            .events
            .iter()
            .any(|e| e.reason.contains("placed on cyberport-h800")),
        "{placed:#?}"
    );
    drop(zone.agents);
    zone.server.stop().await;
}
