//! Jobs that read datasets, end to end: a Shenzhen lender's and a Hong Kong card issuer's
//! tables (FATE's default_credit, 30,000 card holders) are uploaded into their sites'
//! vaults; a job reading both is placed only where both may be copied, each copy is
//! decided and recorded, the agent stages the files checked against their digests, the job
//! runs with no network, and a vault object changed after upload fails the job instead of
//! feeding it other bytes.

mod common;

use std::path::Path;
use std::time::Duration;

use baygrid_api::{Client, DatasetSpec, DatasetView, JobView, LogsView, QuoteView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Role};
use baygrid_server::ServerConfig;
use common::{repo, start_agent, wait_job_ended};
use serde_json::{json, Value};

fn example(name: &str) -> DatasetSpec {
    let text = std::fs::read_to_string(repo(&format!("examples/datasets/{name}.yaml"))).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// A server with the sample sites, the Shenzhen lender and the Hong Kong card issuer as
/// data holders with their datasets registered (nothing uploaded), and the Hong Kong lab.
struct Zone {
    server: baygrid_server::RunningServer,
    url: String,
    operator: Client,
    lender: Client,
    issuer: Client,
    lab: Client,
}

/// How long a lease lasts without a heartbeat: short, so that an agent that stopped
/// heartbeating would be seen to within seconds.
const LEASE_TTL: Duration = Duration::from_secs(4);

/// The sample region with moving data a thousand times dearer than the sample's (300 and
/// 1,000 CNY per GB), so staging the FATE tables (megabytes) costs whole yuan.
async fn zone(dir: &Path) -> Zone {
    let sites = dir.join("sites.yaml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        &sites,
        baygrid_core::catalog::SAMPLE_SITES_YAML
            .replace(
                "within_jurisdiction: \"0.30 CNY\"",
                "within_jurisdiction: \"300.00 CNY\"",
            )
            .replace(
                "across_border: \"1.00 CNY\"",
                "across_border: \"1000.00 CNY\"",
            ),
    )
    .unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("server"),
        sites_file: sites.display().to_string(),
        schedule_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        lease_ttl: LEASE_TTL,
        ..ServerConfig::default()
    };
    let server = baygrid_server::start(config).await.unwrap();
    let url = server.url();
    let operator = Client::new(&url, Some(server.operator_token.clone()));
    let mut holders = Vec::new();
    for (party, dataset) in [
        (
            json!({"name": "sz-lender", "jurisdiction": "CN", "city": "shenzhen"}),
            "sz-credit-labels",
        ),
        (
            json!({"name": "hk-card-issuer", "jurisdiction": "HK", "city": "hong-kong"}),
            "hk-card-features",
        ),
    ] {
        let _: Value = operator.post("/api/v1/parties", &party).await.unwrap();
        let holder = operator
            .issue(Role::DataHolder, party["name"].as_str())
            .await
            .unwrap();
        let _: DatasetView = holder
            .post("/api/v1/datasets", &example(dataset))
            .await
            .unwrap();
        holders.push(holder);
    }
    let lab = operator
        .add_tenant(
            "gba-risk-lab",
            Jurisdiction::HK,
            "hong-kong",
            "100000.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    let issuer = holders.pop().unwrap();
    let lender = holders.pop().unwrap();
    Zone {
        server,
        url,
        operator,
        lender,
        issuer,
        lab,
    }
}

const COMMAND: &str = "{ echo table,lines; \
     echo guest,$(wc -l < $BAYGRID_INPUT_SZ_CREDIT_LABELS/default_credit_hetero_guest.csv); \
     echo host,$(wc -l < $BAYGRID_INPUT_HK_CARD_FEATURES/default_credit_hetero_host.csv); } \
     > $BAYGRID_OUTPUTS/counts.csv; \
     echo spaced > \"$BAYGRID_OUTPUTS/my results.csv\"; echo plain > $BAYGRID_OUTPUTS/my_results.csv; \
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
    let Zone {
        server,
        url,
        operator,
        lender,
        issuer,
        lab,
    } = zone(dir.path()).await;

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

    // the holders offer copies; the lab contracts for both tables in Guangzhou and Hong Kong
    for (holder, offer) in [(&lender, "sz-credit-labels"), (&issuer, "hk-card-features")] {
        let text =
            std::fs::read_to_string(repo(&format!("examples/data-offers/{offer}.yaml"))).unwrap();
        let spec: Value = serde_yaml::from_str(&text).unwrap();
        let _: Value = holder.post("/api/v1/data-offers", &spec).await.unwrap();
    }
    for site in ["guangzhou-nansha", "hk-cyberport"] {
        for offer in ["sz-credit-labels-copy", "hk-card-features-risk"] {
            let made: Value = lab
                .post(
                    "/api/v1/contracts",
                    &json!({"offer": offer, "mode": "copy", "purpose": "credit_risk", "site": site}),
                )
                .await
                .unwrap();
            if made["state"] == "pending" {
                let id = made["id"].as_str().unwrap();
                let _: Value = issuer
                    .post(&format!("/api/v1/contracts/{id}/approve"), &json!({}))
                    .await
                    .unwrap();
            }
        }
    }

    // agents in Guangzhou and Hong Kong; the lender's data may not go to Hong Kong
    let nansha_dir = dir.path().join("nansha");
    let _nansha = start_agent(&url, &operator, "nansha-a800", &nansha_dir).await;
    let _cyberport = start_agent(&url, &operator, "cyberport-h800", &dir.path().join("hk")).await;
    // staging both tables to Nansha is quoted (Shenzhen's within the mainland, Hong Kong's
    // across the border) and billed with the job, to the platform that runs the links
    let quote: QuoteView = lab.post("/api/v1/jobs/quote", &job()).await.unwrap();
    let staging = quote
        .quote
        .candidates
        .iter()
        .find(|c| c.cluster == "nansha-a800")
        .and_then(|c| c.transfer_cost_cny)
        .unwrap();
    assert!(staging.minor > 100, "{staging}");
    let submitted: JobView = lab.post("/api/v1/jobs", &job()).await.unwrap();
    let done = wait_job_ended(&lab, &submitted.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.site.as_deref(), Some("guangzhou-nansha"));
    let billed = server
        .state
        .store
        .ledger_transfer(&format!("staging:{}", submitted.id))
        .await
        .unwrap()
        .expect("staging is billed");
    assert_eq!(billed.amount, staging.minor);
    assert_eq!(billed.credit, "fees:CNY");
    assert!(done.cost.unwrap().minor >= staging.minor, "{done:?}");
    // its output and logs stayed at the site: none reached the exchange; they are the
    // lab's dataset in the Guangzhou vault, classified as its inputs
    let logs: LogsView = lab
        .get(&format!("/api/v1/jobs/{}/logs", submitted.id))
        .await
        .unwrap();
    assert!(logs.lines.is_empty(), "{logs:?}");
    let derived_name = format!("credit-model-{}", &submitted.id[submitted.id.len() - 8..]);
    assert!(done.reason.contains(&derived_name), "{}", done.reason);
    let derived: DatasetView = lab
        .get(&format!("/api/v1/datasets/{derived_name}"))
        .await
        .unwrap();
    assert_eq!(derived.spec.holder, "gba-risk-lab");
    assert_eq!(derived.spec.vault, "guangzhou-nansha");
    assert_eq!(derived.spec.personal, baygrid_rules::Personal::Personal);
    assert_eq!(derived.spec.subjects, 30000);
    assert!(
        derived.spec.collected_abroad,
        "the card table crossed a border"
    );
    assert_eq!(
        derived.spec.derived_from,
        ["sz-credit-labels", "hk-card-features"]
    );
    let files: Vec<&str> = derived.versions[0]
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    // a name the exchange does not take is kept under one it does, not over another file
    assert_eq!(
        files,
        [
            "counts.csv",
            "job.log",
            "my_results-2.csv",
            "my_results.csv"
        ]
    );
    let kept = |file: &str| {
        std::fs::read_to_string(dir.path().join("server/vaults/guangzhou-nansha").join(
            baygrid_vault::object_key(&derived_name, &submitted.id, file),
        ))
        .unwrap()
    };
    // both tables whole (header + 30,000 rows), and only a loopback to talk on
    assert_eq!(kept("counts.csv"), "table,lines\nguest,30001\nhost,30001\n");
    assert_eq!(kept("job.log"), "stdout: interfaces 1\n");
    assert_eq!(kept("my_results-2.csv"), "spaced\n");
    assert_eq!(kept("my_results.csv"), "plain\n");

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
    let done = wait_job_ended(&lab, &again.id).await;
    assert_eq!(done.state, JobState::Failed);
    assert!(done.reason.contains("staging inputs"), "{}", done.reason);
    assert!(done.reason.contains("hash"), "{}", done.reason);

    // a vault that does not answer (the object is now a pipe nobody writes to): the agent
    // heartbeats on while it waits for the copy, so the job keeps its lease, is not handed
    // to anyone else, and can still be cancelled
    std::fs::remove_file(&object).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&object)
        .status()
        .unwrap();
    assert!(made.success());
    let _release = Release(object.clone());
    let stuck: JobView = lab.post("/api/v1/jobs", &job()).await.unwrap();
    let path = format!("/api/v1/jobs/{}", stuck.id);
    for _ in 0..200 {
        let now: JobView = lab.get(&path).await.unwrap();
        if now.state != JobState::Queued {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(LEASE_TTL * 2).await;
    let waiting: JobView = lab.get(&path).await.unwrap();
    assert_eq!(waiting.state, JobState::Placed, "{}", waiting.reason);
    assert_eq!(waiting.attempts, 0, "{:?}", waiting.events);
    // the agent still heartbeats: its cluster is online
    let status = server.state.store.cluster_status().await.unwrap();
    let seen = status
        .iter()
        .find(|(name, _, _)| name == "nansha-a800")
        .map(|(_, at, _)| *at)
        .unwrap();
    assert!(
        server.state.now() - seen < LEASE_TTL.as_millis() as i64,
        "last heartbeat {seen}"
    );
    let _: Value = lab
        .post(&format!("{path}/cancel"), &json!({}))
        .await
        .unwrap();
    let done = wait_job_ended(&lab, &stuck.id).await;
    assert_eq!(done.state, JobState::Cancelled, "{}", done.reason);
    assert!(done.reason.contains("staged"), "{}", done.reason);
    server.stop().await;
}

/// Lets go of whoever is blocked opening the pipe at this path (a runtime waits for its
/// blocking threads when it drops), pass or fail: each open for writing releases a reader.
/// It keeps at it until the test process ends: a reader may open the pipe again late on a
/// loaded machine, and one left blocked would keep the runtime from shutting down.
struct Release(std::path::PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.0.clone();
        std::thread::spawn(move || loop {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path);
            std::thread::sleep(Duration::from_millis(100));
        });
    }
}

async fn wait_flow(client: &Client, id: &str) -> Value {
    for _ in 0..600 {
        let flow: Value = client.get(&format!("/api/v1/flows/{id}")).await.unwrap();
        if flow["state"] != "pending" && flow["state"] != "copying" {
            return flow;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("flow {id} never finished");
}

#[tokio::test]
async fn a_copy_under_a_contract_is_counted_moved_by_the_source_agent_and_undone_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let Zone {
        server,
        url,
        operator,
        lender,
        lab,
        ..
    } = zone(dir.path()).await;
    let table = repo("../shared/data/fate/default_credit_hetero_guest.csv");
    let uploaded = baygrid_vault::upload(&lender, "sz-credit-labels", std::slice::from_ref(&table))
        .await
        .unwrap();
    let offer: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("examples/data-offers/sz-credit-labels.yaml")).unwrap(),
    )
    .unwrap();
    let _: Value = lender.post("/api/v1/data-offers", &offer).await.unwrap();
    // the agent beside the source vault does the moving
    let _qianhai = start_agent(&url, &operator, "qianhai-h800", &dir.path().join("sz")).await;

    let ask =
        |site: &str| json!({"dataset": "sz-credit-labels", "site": site, "purpose": "credit_risk"});
    // no contract, no copy
    match lab
        .post::<_, Value>("/api/v1/flows", &ask("shaoguan"))
        .await
    {
        Err(e) => assert_eq!(e.status(), Some(403), "{e}"),
        Ok(v) => panic!("copied without a contract: {v}"),
    }
    let contract = |site: &str| json!({"offer": "sz-credit-labels-copy", "mode": "copy", "purpose": "credit_risk", "site": site});
    let active: Value = lab
        .post("/api/v1/contracts", &contract("shaoguan"))
        .await
        .unwrap();
    assert_eq!(active["state"], "active");
    let flow: Value = lab.post("/api/v1/flows", &ask("shaoguan")).await.unwrap();
    assert_eq!(flow["state"], "pending", "{flow}");
    let done = wait_flow(&lab, flow["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    // the copy is the lab's dataset in the Shaoguan vault, byte for byte
    let copy: DatasetView = lab
        .get("/api/v1/datasets/sz-credit-labels-shaoguan")
        .await
        .unwrap();
    assert_eq!(copy.spec.holder, "gba-risk-lab");
    assert_eq!(copy.spec.vault, "shaoguan");
    assert_eq!(copy.versions[0].files, uploaded.files);
    let object = dir
        .path()
        .join("server/vaults/shaoguan")
        .join(baygrid_vault::object_key(
            "sz-credit-labels-shaoguan",
            done["id"].as_str().unwrap(),
            "default_credit_hetero_guest.csv",
        ));
    assert_eq!(
        std::fs::read(object).unwrap(),
        std::fs::read(&table).unwrap()
    );

    // to Hong Kong: with consent and a filed GBA contract the copy is allowed and counted
    for (kind, filed) in [
        ("separate_consent", None),
        ("gba_contract_hk", Some("2026-01-05")),
    ] {
        let record = json!({
            "kind": kind, "exporter": "sz-lender", "recipient": "gba-risk-lab",
            "effective": "2026-01-01", "filed": filed,
        });
        let _: Value = lender.post("/api/v1/evidence", &record).await.unwrap();
    }
    let active: Value = lab
        .post("/api/v1/contracts", &contract("hk-cyberport"))
        .await
        .unwrap();
    assert_eq!(active["state"], "active", "{active}");
    let year = i64::from(chrono::Datelike::year(&chrono::Utc::now()));
    let before = server
        .state
        .store
        .export_totals("sz-lender", year)
        .await
        .unwrap();
    let flow: Value = lab
        .post("/api/v1/flows", &ask("hk-cyberport"))
        .await
        .unwrap();
    let counted = flow["counted"][1]
        .as_i64()
        .expect("a cross-border copy counts");
    assert_eq!(counted, 30000);
    let done = wait_flow(&lab, flow["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    let after = server
        .state
        .store
        .export_totals("sz-lender", year)
        .await
        .unwrap();
    assert_eq!(after.0 + after.1 - before.0 - before.1, counted);
    let copy: DatasetView = lab
        .get("/api/v1/datasets/sz-credit-labels-hk-cyberport")
        .await
        .unwrap();
    assert!(copy.spec.collected_abroad);
    assert_eq!(
        copy.spec.arrived_under,
        Some(baygrid_rules::EvidenceKind::GbaContractHk)
    );

    // the source object changes under the vault: the copy fails on its digest, nothing is
    // left at the destination, and the flow is taken back out of the totals
    let source = dir
        .path()
        .join("server/vaults/shenzhen-qianhai")
        .join(baygrid_vault::object_key(
            "sz-credit-labels",
            &uploaded.upload,
            "default_credit_hetero_guest.csv",
        ));
    let mut bytes = std::fs::read(&source).unwrap();
    bytes[300] ^= 1;
    std::fs::write(&source, bytes).unwrap();
    let flow: Value = lab
        .post(
            "/api/v1/flows",
            &json!({"dataset": "sz-credit-labels", "site": "hk-cyberport", "purpose": "credit_risk", "as": "sz-credit-labels-retry"}),
        )
        .await
        .unwrap();
    let failed = wait_flow(&lab, flow["id"].as_str().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("hash"),
        "{failed}"
    );
    assert_eq!(
        server
            .state
            .store
            .export_totals("sz-lender", year)
            .await
            .unwrap(),
        after
    );
    assert!(!dir
        .path()
        .join("server/vaults/hk-cyberport/datasets/sz-credit-labels-retry")
        .join("uploads")
        .join(flow["id"].as_str().unwrap())
        .join("default_credit_hetero_guest.csv")
        .exists());
    let outbox = server.state.store.outbox_from(1, 100_000).await.unwrap();
    assert!(outbox
        .iter()
        .any(|r| r.kind == "flow.compensated" && r.payload["flow"] == flow["id"]));
    server.stop().await;
}
