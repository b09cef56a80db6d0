//! Jobs that read datasets, end to end: a Shenzhen lender's and a Hong Kong card issuer's
//! tables (FATE's default_credit, 30,000 card holders) are uploaded into their sites'
//! vaults; a job reading both is placed only where both may be copied, each copy is
//! decided and recorded, the agent stages the files checked against their digests, the job
//! runs with no network, and a vault object changed after upload fails the job instead of
//! feeding it other bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baygrid_agent::AgentConfig;
use baygrid_api::{Client, DatasetSpec, DatasetView, JobView, LogsView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Role};
use baygrid_server::ServerConfig;
use serde_json::{json, Value};
use tokio::sync::watch;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn example(name: &str) -> DatasetSpec {
    let text = std::fs::read_to_string(repo(&format!("examples/datasets/{name}.yaml"))).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

async fn start_agent(
    url: &str,
    operator: &Client,
    cluster: &str,
    work_dir: &Path,
) -> watch::Sender<bool> {
    let issued = operator.issue(Role::Agent, Some(cluster)).await.unwrap();
    let config = AgentConfig {
        server: url.to_string(),
        token: issued.token().map(str::to_string),
        token_file: None,
        work_dir: work_dir.to_path_buf(),
        engine: "local".into(),
        slurm: Default::default(),
        kubernetes: Default::default(),
        max_running: 8,
        poll_interval: Duration::from_millis(100),
    };
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move { baygrid_agent::run(config, stopped).await.unwrap() });
    stop
}

async fn wait_ended(client: &Client, id: &str) -> JobView {
    for _ in 0..600 {
        let view: JobView = client.get(&format!("/api/v1/jobs/{id}")).await.unwrap();
        if view.state.is_terminal() {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never ended");
}

const COMMAND: &str = "wc -l < $BAYGRID_INPUT_SZ_CREDIT_LABELS/default_credit_hetero_guest.csv; \
     wc -l < $BAYGRID_INPUT_HK_CARD_FEATURES/default_credit_hetero_host.csv; \
     echo interfaces $(tail -n +3 /proc/net/dev | wc -l)";

fn job() -> JobSpec {
    JobSpec::from_yaml(&format!(
        "name: credit-model\n\
         resources: {{accelerators: [{{H800: 1}}, {{A800: 1}}]}}\n\
         command: '{COMMAND}'\nestimated_duration: 10m\n\
         inputs: [sz-credit-labels, hk-card-features]\npurpose: credit_risk\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn a_job_reads_a_hong_kong_and_a_shenzhen_dataset_where_both_may_go() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("server"),
        sites_file: "sample".into(),
        schedule_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    let server = baygrid_server::start(config).await.unwrap();
    let url = server.url();
    let operator = Client::new(&url, Some(server.operator_token.clone()));
    for party in [
        json!({"name": "sz-lender", "jurisdiction": "CN", "city": "shenzhen"}),
        json!({"name": "hk-card-issuer", "jurisdiction": "HK", "city": "hong-kong"}),
    ] {
        let _: Value = operator.post("/api/v1/parties", &party).await.unwrap();
    }
    let lender = operator
        .issue(Role::DataHolder, Some("sz-lender"))
        .await
        .unwrap();
    let issuer = operator
        .issue(Role::DataHolder, Some("hk-card-issuer"))
        .await
        .unwrap();
    let lab = operator
        .add_tenant(
            "gba-risk-lab",
            Jurisdiction::HK,
            "hong-kong",
            "100000.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    let _: DatasetView = lender
        .post("/api/v1/datasets", &example("sz-credit-labels"))
        .await
        .unwrap();
    let _: DatasetView = issuer
        .post("/api/v1/datasets", &example("hk-card-features"))
        .await
        .unwrap();

    // a job may not name a dataset with nothing uploaded
    match lab.post::<_, JobView>("/api/v1/jobs", &job()).await {
        Err(e) => assert_eq!(e.status(), Some(400), "{e}"),
        Ok(view) => panic!("accepted {view:?}"),
    }
    let fate = repo("../shared/data/fate");
    let sz = baygrid_vault::upload(
        &lender,
        "sz-credit-labels",
        &[fate.join("default_credit_hetero_guest.csv")],
    )
    .await
    .unwrap();
    assert_eq!((sz.version, sz.rows), (1, 30000));
    let hk = baygrid_vault::upload(
        &issuer,
        "hk-card-features",
        &[fate.join("default_credit_hetero_host.csv")],
    )
    .await
    .unwrap();
    assert_eq!((hk.version, hk.rows), (1, 30000));

    // agents in Guangzhou and Hong Kong; the lender's data may not go to Hong Kong
    let nansha_dir = dir.path().join("nansha");
    let _nansha = start_agent(&url, &operator, "nansha-a800", &nansha_dir).await;
    let _cyberport = start_agent(&url, &operator, "cyberport-h800", &dir.path().join("hk")).await;
    let submitted: JobView = lab.post("/api/v1/jobs", &job()).await.unwrap();
    let done = wait_ended(&lab, &submitted.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.site.as_deref(), Some("guangzhou-nansha"));
    let logs: LogsView = lab
        .get(&format!("/api/v1/jobs/{}/logs", submitted.id))
        .await
        .unwrap();
    let out: Vec<&str> = logs.lines.iter().map(|l| l.line.trim()).collect();
    // both tables whole (header + 30,000 rows), and only a loopback to talk on
    assert_eq!(out, ["30001", "30001", "interfaces 1"], "{logs:?}");

    // each copy to Guangzhou was decided by the rules and recorded with the job
    let outbox = server.state.store.outbox_from(1, 100_000).await.unwrap();
    let flows: Vec<&Value> = outbox
        .iter()
        .filter(|r| r.kind == "flow.decision" && r.payload["job"] == submitted.id.as_str())
        .map(|r| &r.payload)
        .collect();
    let mut copied: Vec<&str> = flows
        .iter()
        .map(|p| p["dataset"].as_str().unwrap())
        .collect();
    copied.sort_unstable();
    assert_eq!(copied, ["hk-card-features", "sz-credit-labels"]);
    assert!(flows.iter().all(|p| p["allowed"] == true), "{flows:?}");

    // staged inputs leave with the job
    for _ in 0..100 {
        let left = std::fs::read_dir(nansha_dir.join("inputs"))
            .map(|d| d.count())
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read_dir(nansha_dir.join("inputs"))
            .unwrap()
            .count(),
        0
    );

    // the card table's object is changed in the vault after upload: the next job fails
    // on its digest rather than run on other bytes
    let object = dir
        .path()
        .join("server/vaults/hk-cyberport")
        .join(baygrid_vault::object_key(
            "hk-card-features",
            &hk.upload,
            "default_credit_hetero_host.csv",
        ));
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let again: JobView = lab.post("/api/v1/jobs", &job()).await.unwrap();
    let done = wait_ended(&lab, &again.id).await;
    assert_eq!(done.state, JobState::Failed);
    assert!(done.reason.contains("staging inputs"), "{}", done.reason);
    assert!(done.reason.contains("hash"), "{}", done.reason);
    server.stop().await;
}
