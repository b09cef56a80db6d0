//! The store suite, run against SQLite and against PostgreSQL.

use super::*;
use crate::testing::{fresh_postgres_url, sqlite_url};
use baygrid_core::{Allocation, Currency, JobSpec, JobState, Money, Role};

fn spec(name: &str) -> JobSpec {
    JobSpec::from_yaml(&format!(
        "name: {name}\nresources: {{accelerators: {{H800: 2}}}}\ncommand: 'true'\nestimated_duration: 1m\n"
    ))
    .unwrap()
}

fn new_job(id: &str, key: Option<&str>) -> NewJob {
    NewJob {
        id: id.to_string(),
        tenant: "t1".into(),
        idempotency_key: key.map(str::to_string),
        spec: spec("demo"),
        actor: "tenant:t1".into(),
        now: 1_000,
    }
}

fn allocation(cluster: &str) -> Allocation {
    Allocation {
        cluster: cluster.into(),
        accelerator: Some("H800".into()),
        accelerators_per_node: 2,
        cpus_per_node: 1,
        memory_gb_per_node: 1,
        nodes: vec![0],
        price_per_accelerator_hour: Money::new(2200, Currency::CNY),
    }
}

async fn suite(store: Store) {
    // submission and idempotency
    let (job, created) = store.submit(new_job("job_a", Some("k1"))).await.unwrap();
    assert!(created);
    assert_eq!(job.state, JobState::Queued);
    let (again, created) = store.submit(new_job("job_b", Some("k1"))).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, "job_a");
    assert!(matches!(
        store.submit(new_job("job_a", None)).await,
        Err(StoreError::Database(_))
    ));

    // concurrent submissions share commits and all land
    let mut handles = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store.submit(new_job(&format!("job_c{i:03}"), None)).await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(store.count("jobs").await.unwrap(), 201);
    assert_eq!(store.queued_jobs(1000).await.unwrap().len(), 201);

    // placement, lease grant with fencing epoch, running, finished
    assert!(store
        .place(
            "job_a".into(),
            allocation("c1"),
            "cheapest".into(),
            5_000,
            2_000
        )
        .await
        .unwrap());
    assert!(!store
        .place(
            "job_a".into(),
            allocation("c1"),
            "again".into(),
            5_000,
            2_000
        )
        .await
        .unwrap());
    assert_eq!(store.active_allocations().await.unwrap().len(), 1);
    let granted = store
        .grant_leases("c1".into(), 10, 10_000, 2_100)
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0].lease_epoch, 1);
    assert!(store
        .grant_leases("c1".into(), 10, 10_000, 2_100)
        .await
        .unwrap()
        .is_empty());
    let report = |epoch: i64, report: Report, now: i64| LeaseReport {
        job_id: "job_a".into(),
        cluster: "c1".into(),
        epoch,
        report,
        now,
    };
    assert!(matches!(
        store.report(report(0, Report::Running, 2_200)).await,
        Err(StoreError::StaleLease(_))
    ));
    let running = store
        .report(report(1, Report::Running, 2_200))
        .await
        .unwrap();
    assert_eq!(running.state, JobState::Running);

    // heartbeats renew valid leases and name stale ones
    let beat = store
        .heartbeat(
            "c1".into(),
            serde_json::json!({"nodes": 1}),
            vec![("job_a".into(), 1), ("job_c000".into(), 1)],
            10_000,
            3_000,
        )
        .await
        .unwrap();
    assert_eq!(beat.renewed, vec!["job_a".to_string()]);
    assert_eq!(beat.stale, vec!["job_c000".to_string()]);
    assert_eq!(store.cluster_status().await.unwrap().len(), 1);

    // logs are idempotent per (epoch, seq) and fenced
    let line = |seq: i64| LogLine {
        epoch: 1,
        seq,
        stream: "stdout".into(),
        line: format!("line {seq}"),
    };
    store
        .append_logs("job_a".into(), "c1".into(), 1, vec![line(1), line(2)])
        .await
        .unwrap();
    store
        .append_logs("job_a".into(), "c1".into(), 1, vec![line(2), line(3)])
        .await
        .unwrap();
    assert!(store
        .append_logs("job_a".into(), "c1".into(), 7, vec![line(4)])
        .await
        .is_err());
    let logs = store.read_logs("job_a", (0, 0), 100).await.unwrap();
    assert_eq!(
        logs.iter().map(|l| l.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        store.read_logs("job_a", (1, 2), 100).await.unwrap().len(),
        1
    );

    // lease expiry requeues; the old epoch is fenced off afterwards
    assert!(store.expire_leases(12_000).await.unwrap().is_empty());
    let requeued = store.expire_leases(14_000).await.unwrap();
    assert_eq!(requeued, vec!["job_a".to_string()]);
    let job = store.get_job("job_a").await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 1));
    assert!(job.reason.contains("lease expired"), "{}", job.reason);
    assert!(store
        .report(report(1, Report::Running, 14_100))
        .await
        .is_err());
    store
        .place(
            "job_a".into(),
            allocation("c2"),
            "retry".into(),
            20_000,
            14_200,
        )
        .await
        .unwrap();
    let granted = store
        .grant_leases("c2".into(), 10, 10_000, 14_300)
        .await
        .unwrap();
    assert_eq!(granted[0].lease_epoch, 2);
    let finished = store
        .report(LeaseReport {
            job_id: "job_a".into(),
            cluster: "c2".into(),
            epoch: 2,
            report: Report::Finished {
                state: JobState::Succeeded,
                exit_code: Some(0),
                reason: "exit 0".into(),
                cost_cny_minor: 1234,
            },
            now: 15_000,
        })
        .await
        .unwrap();
    assert_eq!(finished.state, JobState::Succeeded);
    assert_eq!(finished.cost_cny_minor, Some(1234));
    assert_eq!(store.tenant_spent("t1").await.unwrap(), 1234);
    let events = store.job_events("job_a").await.unwrap();
    let path: Vec<JobState> = events.iter().map(|e| e.to_state).collect();
    use JobState::*;
    assert_eq!(
        path,
        vec![Queued, Placed, Running, Queued, Placed, Succeeded]
    );

    // cancellation: queued at once; held jobs through their agent
    let (outcome, job) = store
        .cancel("job_c001".into(), "tenant:t1".into(), 16_000)
        .await
        .unwrap();
    assert_eq!((outcome, job.state), (Outcome::Cancelled, Cancelled));
    store
        .place(
            "job_c002".into(),
            allocation("c1"),
            "x".into(),
            99_000,
            16_000,
        )
        .await
        .unwrap();
    store
        .grant_leases("c1".into(), 1, 10_000, 16_000)
        .await
        .unwrap();
    let (outcome, _) = store
        .cancel("job_c002".into(), "tenant:t1".into(), 16_100)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Requested);
    let beat = store
        .heartbeat(
            "c1".into(),
            serde_json::json!({}),
            vec![("job_c002".into(), 1)],
            10_000,
            16_200,
        )
        .await
        .unwrap();
    assert_eq!(beat.cancel, vec!["job_c002".to_string()]);
    let (outcome, _) = store
        .cancel("job_c001".into(), "tenant:t1".into(), 16_300)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::AlreadyEnded);

    // a crash-restart grace period keeps leases alive
    assert_eq!(store.extend_leases(100_000).await.unwrap(), 1);
    assert!(store.expire_leases(50_000).await.unwrap().is_empty());

    // catalog and tokens
    store
        .put_catalog(
            "site",
            "s1".into(),
            None,
            serde_json::json!({"name": "s1"}),
            "operator".into(),
            1,
        )
        .await
        .unwrap();
    store
        .put_catalog(
            "site",
            "s1".into(),
            None,
            serde_json::json!({"name": "s1", "v": 2}),
            "operator".into(),
            2,
        )
        .await
        .unwrap();
    let sites = store.list_catalog("site").await.unwrap();
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].2["v"], 2);
    assert!(store
        .remove_catalog("site", "s1".into(), "operator".into(), 3)
        .await
        .unwrap());
    assert!(!store
        .remove_catalog("site", "s1".into(), "operator".into(), 4)
        .await
        .unwrap());
    assert!(store.list_catalog("site").await.unwrap().is_empty());
    let token = TokenRecord {
        id: "tok_1".into(),
        hash: "abc".into(),
        role: Role::Tenant,
        subject: Some("t1".into()),
        label: "test".into(),
        created_ms: 1,
        revoked_ms: None,
    };
    store
        .insert_token(token.clone(), "operator".into(), 1)
        .await
        .unwrap();
    assert_eq!(
        store
            .find_token("abc")
            .await
            .unwrap()
            .unwrap()
            .subject
            .as_deref(),
        Some("t1")
    );
    assert!(store
        .revoke_token("tok_1".into(), "operator".into(), 2)
        .await
        .unwrap());
    assert!(store.find_token("abc").await.unwrap().is_none());

    // every transition left an outbox entry for the audit log
    let events = store.count("job_events").await.unwrap();
    let outbox = store.count("outbox").await.unwrap();
    assert!(outbox > events, "outbox {outbox} events {events}");
}

#[tokio::test]
async fn sqlite_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&sqlite_url(dir.path())).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    suite(store).await;
}

#[tokio::test]
async fn postgres_store_suite() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    suite(store).await;
}

#[tokio::test]
async fn sqlite_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    {
        let store = Store::open(&url).await.unwrap();
        store.submit(new_job("job_keep", None)).await.unwrap();
    }
    let store = Store::open(&url).await.unwrap();
    assert_eq!(
        store.get_job("job_keep").await.unwrap().state,
        JobState::Queued
    );
}

#[tokio::test]
async fn rejects_unknown_urls() {
    assert!(matches!(
        Store::open("mysql://x").await,
        Err(StoreError::UnsupportedUrl(_))
    ));
}

#[test]
fn multi_row_statements_number_every_bind() {
    let sql = multi_row_insert("INSERT INTO t VALUES ", "({1}, 'x', {2}, {2})", 2, 3);
    assert_eq!(
        sql,
        "INSERT INTO t VALUES ($1, 'x', $2, $2), ($3, 'x', $4, $4), ($5, 'x', $6, $6)"
    );
}
