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
        hold: None,
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
        estimated_seconds: Some(60),
        staging_cny: None,
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
    // the same key for another spec is refused, alone and among concurrent submissions
    let other = |id: &str| NewJob {
        spec: spec("another"),
        ..new_job(id, Some("k1"))
    };
    let refused = store.submit(other("job_x")).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::Conflict(m) if m.contains("Idempotency-Key `k1` was used for another spec (job job_a)")),
        "{refused}"
    );
    let burst: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let job = if i % 2 == 0 {
                new_job(&format!("job_k{i}"), Some("k2"))
            } else {
                NewJob {
                    spec: spec("another"),
                    ..new_job(&format!("job_k{i}"), Some("k2"))
                }
            };
            tokio::spawn(async move { store.submit(job).await })
        })
        .collect();
    let mut kept = std::collections::BTreeSet::new();
    let mut conflicts = 0;
    for h in burst {
        match h.await.unwrap() {
            Ok((job, _)) => {
                kept.insert(job.id);
            }
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(kept.len(), 1, "one job for the key: {kept:?}");
    assert_eq!(conflicts, 4, "the other spec's four are refused");
    assert!(matches!(
        store.get_job("job_x").await,
        Err(StoreError::NotFound { .. })
    ));
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
    assert_eq!(store.count("jobs").await.unwrap(), 202);
    assert_eq!(store.queued_jobs(1000).await.unwrap().len(), 202);

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
    // (line 3 has a NUL, which PostgreSQL's text cannot hold)
    let line = |seq: i64| LogLine {
        epoch: 1,
        seq,
        stream: "stdout".into(),
        line: format!("line {seq}{}", if seq == 3 { "\0" } else { "" }),
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
    assert_eq!(logs[2].line, "line 3\u{fffd}");
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
    // failover: the cluster that lost it is blocked for this job for the back-off
    let blocks = store.cluster_blocks(14_000).await.unwrap();
    let block = &blocks["job_a"][0];
    assert_eq!(
        (block.cluster.as_str(), block.until_ms),
        ("c1", 14_000 + FAILOVER_BACKOFF_MS)
    );
    assert!(block.reason.contains("lease expired"));
    assert!(store
        .cluster_blocks(14_000 + FAILOVER_BACKOFF_MS)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        failover_backoff(FAILOVER_BACKOFF_MS, 3),
        4 * FAILOVER_BACKOFF_MS
    );
    assert_eq!(
        failover_backoff(FAILOVER_BACKOFF_MS, 40),
        FAILOVER_BACKOFF_MAX_MS
    );
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
                settlement: vec![],
            },
            now: 15_000,
        })
        .await
        .unwrap();
    assert_eq!(finished.state, JobState::Succeeded);
    assert_eq!(finished.cost_cny_minor, Some(1234));
    let events = store.job_events("job_a").await.unwrap();
    let path: Vec<JobState> = events.iter().map(|e| e.to_state).collect();
    use JobState::*;
    assert_eq!(
        path,
        vec![Queued, Placed, Running, Queued, Placed, Succeeded]
    );

    // log retention: an ended job's output is deleted once, and the job says when
    let kept = store.read_logs("job_a", (0, 0), 1000).await.unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(store.purge_logs(15_000, 10, 15_500).await.unwrap(), (0, 0));
    assert_eq!(store.purge_logs(15_001, 10, 15_500).await.unwrap(), (1, 3));
    assert!(store
        .read_logs("job_a", (0, 0), 1000)
        .await
        .unwrap()
        .is_empty());
    let purged = store.get_job("job_a").await.unwrap();
    assert_eq!(purged.logs_purged_ms, Some(15_500));
    assert_eq!(purged.state, Succeeded);
    assert_eq!(store.purge_logs(15_001, 10, 15_600).await.unwrap(), (0, 0));

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
        expires_ms: Some(1_000),
    };
    store
        .insert_token(token.clone(), "operator".into(), 1)
        .await
        .unwrap();
    assert_eq!(store.find_token("abc").await.unwrap(), Some(token.clone()));
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

mod ledger_suite {
    use super::*;
    use baygrid_ledger::{names, Transfer, TransferError, TransferKind};

    fn single(id: &str, debit: &str, credit: &str, amount: i64) -> Transfer {
        Transfer {
            id: id.into(),
            debit_account: debit.into(),
            credit_account: credit.into(),
            amount,
            currency: Currency::CNY,
            kind: TransferKind::Single,
            linked: false,
            reference: String::new(),
        }
    }

    fn hold(job: &str, tenant: &str, amount: i64, expires_at: Millis) -> Transfer {
        Transfer {
            id: names::hold(job),
            debit_account: names::wallet(tenant).id,
            credit_account: names::clearing(Currency::CNY).id,
            amount,
            currency: Currency::CNY,
            kind: TransferKind::Pending { expires_at },
            linked: false,
            reference: names::job_reference(job),
        }
    }

    fn job_with_hold(id: &str, amount: i64) -> NewJob {
        NewJob {
            hold: Some(hold(id, "t1", amount, 1_000_000)),
            ..new_job(id, None)
        }
    }

    async fn wallet(store: &Store) -> baygrid_ledger::Balance {
        store.ledger_balance(&names::wallet("t1").id).await.unwrap()
    }

    /// What memory says equals what the database says, for every account.
    async fn memory_matches_database(store: &Store) {
        for account in store.ledger_accounts() {
            let from_db = store.ledger_balance(&account.id).await.unwrap();
            let in_memory = store.ledger.read(|l| l.balance(&account.id)).unwrap();
            assert_eq!(from_db, in_memory, "account {}", account.id);
        }
    }

    pub(super) async fn run(store: Store, url: &str) {
        let mut accounts = names::platform();
        accounts.push(names::wallet("t1"));
        accounts.push(names::provider("p1", Currency::CNY));
        store.open_accounts(accounts.clone(), 0).await.unwrap();
        store.open_accounts(accounts, 0).await.unwrap(); // a no-op the second time
        let funding = names::funding(Currency::CNY).id;
        let wallet_id = names::wallet("t1").id;
        store
            .transfer(
                vec![single("dep1", &funding, &wallet_id, 10_000)],
                "op".into(),
                1,
            )
            .await
            .unwrap();
        // a retry with the same body changes nothing; another body is refused
        let again = store
            .transfer(
                vec![single("dep1", &funding, &wallet_id, 10_000)],
                "op".into(),
                2,
            )
            .await
            .unwrap();
        assert_eq!(again, vec![baygrid_ledger::Outcome::AlreadyExists]);
        let err = store
            .transfer(
                vec![single("dep1", &funding, &wallet_id, 9_999)],
                "op".into(),
                2,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Ledger {
                    error: TransferError::ExistsWithDifferentBody(_),
                    ..
                }
            ),
            "{err}"
        );

        // concurrent submissions: the wallet covers six holds of 1,500 and no more
        let mut tasks = Vec::new();
        for i in 0..10 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.submit(job_with_hold(&format!("jh{i}"), 1_500)).await
            }));
        }
        let mut accepted = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok((job, true)) => accepted.push(job.id),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(StoreError::Ledger {
                    error: TransferError::ExceedsCredits { .. },
                    ..
                }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(accepted.len(), 6);
        let refused_stored = store.count("jobs").await.unwrap();
        assert_eq!(refused_stored, 6, "a refused job is not stored");
        let balance = wallet(&store).await;
        assert_eq!(balance.debits_pending, 9_000);
        assert_eq!(balance.available(), 1_000);

        // settle one: post 1,200 of its 1,500 hold, fee 60, provider 1,140, as a chain
        let job = accepted[0].clone();
        store
            .place(job.clone(), allocation("c1"), "test".into(), 100_000, 10)
            .await
            .unwrap();
        let granted = store
            .grant_leases("c1".into(), 10, 100_000, 11)
            .await
            .unwrap();
        let epoch = granted[0].lease_epoch;
        let clearing = names::clearing(Currency::CNY).id;
        let mut chain = vec![
            Transfer {
                id: format!("post:{job}"),
                kind: TransferKind::Post {
                    pending_id: names::hold(&job),
                },
                linked: true,
                ..single("", &wallet_id, &clearing, 1_200)
            },
            Transfer {
                linked: true,
                ..single(
                    &format!("fee:{job}"),
                    &clearing,
                    &names::fees(Currency::CNY).id,
                    60,
                )
            },
            single(
                &format!("revenue:{job}"),
                &clearing,
                &names::provider("p1", Currency::CNY).id,
                1_140,
            ),
        ];
        chain[0].id = format!("post:{job}");
        store
            .report(LeaseReport {
                job_id: job.clone(),
                cluster: "c1".into(),
                epoch,
                report: Report::Finished {
                    state: JobState::Succeeded,
                    exit_code: Some(0),
                    reason: "exit 0".into(),
                    cost_cny_minor: 1_200,
                    settlement: chain,
                },
                now: 20,
            })
            .await
            .unwrap();
        let balance = wallet(&store).await;
        assert_eq!(balance.debits_posted, 1_200);
        assert_eq!(balance.debits_pending, 7_500);
        assert_eq!(store.ledger_balance(&clearing).await.unwrap().net(), 0);

        // a cancel voids the hold; a queued job whose hold expires fails
        store
            .cancel(accepted[1].clone(), "tenant:t1".into(), 30)
            .await
            .unwrap();
        assert_eq!(wallet(&store).await.debits_pending, 6_000);
        assert!(store.ledger_open_hold(&names::hold(&accepted[1])).is_none());
        let expired = store.expire_holds(1_000_000).await.unwrap();
        assert_eq!(expired.len(), 4);
        assert_eq!(
            store.get_job(&accepted[2]).await.unwrap().state,
            JobState::Failed
        );
        assert_eq!(wallet(&store).await.available(), 10_000 - 1_200);

        // a change that fails after the ledger accepted its transfer leaves no trace
        let cell = store.ledger.clone();
        let wallet_in_closure = wallet_id.clone();
        let funding_in_closure = funding.clone();
        let failed = store
            .write(move |conn| {
                Box::pin(async move {
                    crate::ledger::apply_in_tx(
                        conn,
                        &cell,
                        &[single(
                            "dep-rolled-back",
                            &funding_in_closure,
                            &wallet_in_closure,
                            5,
                        )],
                        "op",
                        40,
                    )
                    .await?;
                    Err::<(), _>(StoreError::Conflict("the rest of the change failed".into()))
                })
            })
            .await;
        assert!(failed.is_err());
        assert!(store
            .ledger
            .read(|l| l.transfer("dep-rolled-back").is_none()));
        memory_matches_database(&store).await;

        // debits equal credits per currency; the database replays to the same ledger
        let totals = store.ledger_totals().await.unwrap();
        assert_eq!(totals, vec![(Currency::CNY, 10_000 + 1_200 + 60 + 1_140)]);
        let before: Vec<_> = store
            .ledger_accounts()
            .iter()
            .map(|a| (a.id.clone(), store.ledger.read(|l| l.balance(&a.id))))
            .collect();
        drop(store);
        let reopened = Store::open(url).await.unwrap();
        let after: Vec<_> = reopened
            .ledger_accounts()
            .iter()
            .map(|a| (a.id.clone(), reopened.ledger.read(|l| l.balance(&a.id))))
            .collect();
        assert_eq!(before, after);
        memory_matches_database(&reopened).await;
        let period = (0, i64::MAX);
        let lines = reopened
            .ledger_statement(&wallet_id, period, None, 1000)
            .await
            .unwrap();
        let net: i64 = lines.iter().map(|l| l.signed_amount).sum();
        assert_eq!(net, 10_000 - 1_200);
        assert_eq!(reopened.ledger_net(&wallet_id, period).await.unwrap(), net);
        // a page at a time: each line once, in order, however small the pages
        let mut paged = Vec::new();
        loop {
            let after = paged.last().map(|l: &StatementLine| l.transfer.seq);
            let page = reopened
                .ledger_statement(&wallet_id, period, after, 2)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            paged.extend(page);
        }
        assert_eq!(paged, lines);
        assert!(lines.len() > 2, "{}", lines.len());
    }
}

#[tokio::test]
async fn sqlite_ledger_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    ledger_suite::run(Store::open(&url).await.unwrap(), &url).await;
}

#[tokio::test]
async fn postgres_ledger_suite() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    ledger_suite::run(Store::open(&url).await.unwrap(), &url).await;
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

mod counters {
    use super::*;
    use proptest::prelude::*;

    /// One step against the data zone's counters: a flow decided (counted in a category,
    /// or not counted: denied or exempt), possibly failing later and compensated.
    #[derive(Debug, Clone)]
    struct Step {
        exporter: usize,
        counted: Option<(bool, i64)>,
        fails: bool,
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            0usize..3,
            prop::option::of((any::<bool>(), 1i64..200_000)),
            any::<bool>(),
        )
            .prop_map(|(exporter, counted, fails)| Step {
                exporter,
                counted,
                fails,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The export totals always equal what the log says: the counted flows' individuals
        /// less the compensated ones', per exporter and category.
        #[test]
        fn totals_equal_the_recorded_flows_less_compensations(steps in prop::collection::vec(step(), 1..25)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(&format!("sqlite://{}", dir.path().join("z.db").display()))
                    .await
                    .unwrap();
                // concurrent decisions: the writer serialises them
                let mut tasks = Vec::new();
                for (i, s) in steps.iter().cloned().enumerate() {
                    let store = store.clone();
                    tasks.push(tokio::spawn(async move {
                        let exporter = format!("exporter-{}", s.exporter);
                        let counts = s.counted.map(|(sensitive, n)| {
                            ((if sensitive { "sensitive" } else { "personal" }).to_string(), n)
                        });
                        let recorded = counts.clone();
                        store
                            .decide_flow(exporter.clone(), 2026, "t".into(), i as i64, move |_, _| {
                                Ok(FlowRecord {
                                    payload: serde_json::json!({"exporter": exporter, "counted": recorded, "step": i}),
                                    counts,
                                    answer: serde_json::Value::Null,
                                    obligations: vec![],
                                    exporter: String::new(),
                                    recipient: String::new(),
                                    dataset: String::new(),
                                })
                            })
                            .await
                            .unwrap();
                        if s.fails {
                            let exporter = format!("exporter-{}", s.exporter);
                            let counted = s.counted.map(|(sensitive, n)| {
                                ((if sensitive { "sensitive" } else { "personal" }).to_string(), n)
                            });
                            store
                                .compensate_flow(
                                    exporter.clone(),
                                    2026,
                                    counted.clone(),
                                    "t".into(),
                                    i as i64,
                                    serde_json::json!({"exporter": exporter, "counted": counted}),
                                )
                                .await
                                .unwrap();
                        }
                    }));
                }
                for task in tasks {
                    task.await.unwrap();
                }
                let mut expected = std::collections::BTreeMap::<(String, String), i64>::new();
                for row in store.outbox_from(1, 10_000).await.unwrap() {
                    let sign = match row.kind.as_str() {
                        "flow.decision" => 1,
                        "flow.compensated" => -1,
                        _ => continue,
                    };
                    if let Some(counted) = row.payload["counted"].as_array() {
                        let category = counted[0].as_str().unwrap().to_string();
                        let exporter = row.payload["exporter"].as_str().unwrap().to_string();
                        *expected.entry((exporter, category)).or_default() +=
                            sign * counted[1].as_i64().unwrap();
                    }
                }
                for e in 0..3 {
                    let exporter = format!("exporter-{e}");
                    let (personal, sensitive) = store.export_totals(&exporter, 2026).await.unwrap();
                    let want = |c: &str| expected.get(&(exporter.clone(), c.to_string())).copied().unwrap_or(0);
                    assert_eq!((personal, sensitive), (want("personal"), want("sensitive")), "{steps:?}");
                }
            });
        }
    }
}

/// Privacy budgets: a query is accepted only if its spend fits the consumer's budget and
/// the one all consumers share, as summed inside the transaction; a refused one writes
/// nothing; a new period starts afresh; a finished query can no longer change.
async fn query_budget_suite(store: Store) {
    let spend = |tenant: &str, epsilon: f64| Spend {
        dataset: "hk-credit".into(),
        tenant: tenant.into(),
        period_start: 0,
        amount: ((epsilon * EPSILON_UNIT) as i64, 10),
        consumer_limit: ((3.0 * EPSILON_UNIT) as i64, 100),
        shared_limit: ((4.0 * EPSILON_UNIT) as i64, 100),
    };
    let row = |id: &str, tenant: &str| QueryRow {
        id: id.into(),
        tenant: tenant.into(),
        state: "running".into(),
        created_ms: 1,
        finished_ms: None,
        body: serde_json::json!({ "sql": "SELECT COUNT(*) FROM t" }),
    };
    let accept = |id: &str, tenant: &str, epsilon: f64| {
        store.accept_query(
            row(id, tenant),
            vec![spend(tenant, epsilon)],
            None,
            "test".into(),
            serde_json::json!({ "query": id }),
            |after: &[Spent]| Ok(serde_json::json!({ "spent": after[0].consumer.0 })),
        )
    };
    accept("q1", "alice", 2.0).await.unwrap();
    assert_eq!(
        store.query_row("q1").await.unwrap().unwrap().body,
        serde_json::json!({ "spent": (2.0 * EPSILON_UNIT) as i64 }),
        "the record is written with what its own spend brings the budget to"
    );
    let over = accept("q2", "alice", 1.5).await.unwrap_err().to_string();
    assert!(
        over.contains(
            "epsilon: the query needs ε 1.5 of `hk-credit`; the consumer's budget has 1 left"
        ),
        "{over}"
    );
    assert!(
        store.query_row("q2").await.unwrap().is_none(),
        "nothing written"
    );
    accept("q3", "bob", 2.0).await.unwrap();
    let shared = accept("q4", "bob", 0.5).await.unwrap_err().to_string();
    assert!(shared.contains("the shared budget has 0 left"), "{shared}");
    let spent = store.privacy_spent("hk-credit", "alice", 0).await.unwrap();
    assert_eq!(spent.consumer, ((2.0 * EPSILON_UNIT) as i64, 10));
    assert_eq!(spent.shared, ((4.0 * EPSILON_UNIT) as i64, 20));
    assert_eq!(
        store
            .privacy_spent("hk-credit", "alice", 86_400_000)
            .await
            .unwrap(),
        Spent::default()
    );
    // δ is a budget of its own
    let mut greedy = spend("carol", 0.1);
    greedy.amount.1 = 101;
    let delta = store
        .accept_query(
            row("q5", "carol"),
            vec![greedy],
            None,
            "test".into(),
            serde_json::json!({}),
            |_: &[Spent]| Ok(serde_json::json!({})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(delta.contains("delta: the query needs δ"), "{delta}");
    // running queries change; finished ones do not
    store
        .update_query("q1".into(), serde_json::json!({ "claimed": true }))
        .await
        .unwrap();
    store
        .finish_query(
            "q1".into(),
            crate::Ending {
                state: "released".into(),
                body: serde_json::json!({ "done": true }),
                transfers: vec![],
                actor: "test".into(),
                now: 2,
                kind: "query.released",
                payload: serde_json::json!({ "query": "q1" }),
            },
        )
        .await
        .unwrap();
    assert!(store
        .update_query("q1".into(), serde_json::json!({}))
        .await
        .is_err());
    let finished = store.query_row("q1").await.unwrap().unwrap();
    assert_eq!(
        (finished.state.as_str(), finished.finished_ms),
        ("released", Some(2))
    );
    let running = store
        .query_rows(&records(None, Some("running")))
        .await
        .unwrap();
    assert_eq!(
        running.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["q3"]
    );
    assert_eq!(
        store
            .query_rows(&records(Some("alice"), None))
            .await
            .unwrap()
            .len(),
        1
    );
}

/// The first ten queries or runs, of one tenant and in one state when given.
fn records<'a>(tenant: Option<&'a str>, state: Option<&'a str>) -> RecordFilter<'a> {
    RecordFilter {
        tenant,
        state,
        before: None,
        limit: 10,
    }
}

/// Lists page newest first: by time, then id, each row once, with filters applied.
async fn listing_suite(store: Store) {
    // jobs at times 1..=7, three of them in the same millisecond, two tenants
    let jobs = [
        ("j1", "t1", 1),
        ("j2", "t2", 2),
        ("j3", "t1", 4),
        ("j5", "t1", 4),
        ("j4", "t2", 4),
        ("j6", "t1", 6),
        ("j7", "t1", 7),
    ];
    for (id, tenant, at) in jobs {
        let job = NewJob {
            tenant: tenant.into(),
            now: at,
            ..new_job(id, None)
        };
        store.submit(job).await.unwrap();
    }
    let pages = |tenant: Option<&str>, limit: i64| {
        let store = store.clone();
        let tenant = tenant.map(str::to_string);
        async move {
            let mut pages: Vec<Vec<String>> = Vec::new();
            let mut before: Option<Below> = None;
            loop {
                let page = store
                    .list_jobs(&JobFilter {
                        tenant: tenant.clone(),
                        states: vec![JobState::Queued],
                        before: before.clone(),
                        limit,
                    })
                    .await
                    .unwrap();
                if page.is_empty() {
                    return pages;
                }
                before = page.last().map(|j| Below {
                    at_ms: j.submitted_ms,
                    id: j.id.clone(),
                });
                pages.push(page.into_iter().map(|j| j.id).collect());
            }
        }
    };
    assert_eq!(
        pages(None, 2).await,
        [
            vec!["j7", "j6"],
            vec!["j5", "j4"],
            vec!["j3", "j2"],
            vec!["j1"]
        ]
    );
    assert_eq!(
        pages(Some("t1"), 3).await,
        [vec!["j7", "j6", "j5"], vec!["j3", "j1"]]
    );
    assert_eq!(pages(Some("t2"), 100).await, [vec!["j4", "j2"]]);
    // queries: the same order, and every row in a state however many pages it takes
    for (id, tenant, at) in [("q1", "alice", 5), ("q3", "bob", 5), ("q2", "alice", 9)] {
        let row = QueryRow {
            id: id.into(),
            tenant: tenant.into(),
            state: "running".into(),
            created_ms: at,
            finished_ms: None,
            body: serde_json::json!({}),
        };
        store
            .accept_query(
                row,
                vec![],
                None,
                "test".into(),
                serde_json::json!({}),
                |_| Ok(serde_json::json!({})),
            )
            .await
            .unwrap();
    }
    let ids = |rows: Vec<QueryRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let q3 = Below {
        at_ms: 5,
        id: "q3".into(),
    };
    let after_q3 = RecordFilter {
        before: Some(&q3),
        ..records(None, None)
    };
    assert_eq!(
        ids(store.query_rows(&records(None, None)).await.unwrap()),
        ["q2", "q3", "q1"]
    );
    assert_eq!(ids(store.query_rows(&after_q3).await.unwrap()), ["q1"]);
    assert_eq!(
        ids(store
            .query_rows(&RecordFilter {
                tenant: Some("alice"),
                limit: 1,
                ..records(None, None)
            })
            .await
            .unwrap()),
        ["q2"]
    );
    assert_eq!(
        ids(store.every_query_row("running").await.unwrap()),
        ["q2", "q3", "q1"]
    );
}

#[tokio::test]
async fn sqlite_listing_suite() {
    let dir = tempfile::tempdir().unwrap();
    listing_suite(Store::open(&sqlite_url(dir.path())).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_listing_suite() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    listing_suite(Store::open(&url).await.unwrap()).await;
}

async fn fusion_suite(store: Store) {
    let run = |id: &str, tenant: &str, at: i64| FusionRow {
        id: id.into(),
        tenant: tenant.into(),
        state: "running".into(),
        created_ms: at,
        finished_ms: None,
        body: serde_json::json!({ "workers": [] }),
    };
    // f1's two workers are jobs in the queue, written with the run
    let workers = |run: &str| {
        vec![
            new_job(&format!("{run}-w0"), None),
            new_job(&format!("{run}-w1"), None),
        ]
    };
    for (id, tenant, at) in [("f1", "alice", 1), ("f2", "bob", 2)] {
        store
            .accept_fusion(
                run(id, tenant, at),
                None,
                if id == "f1" { workers(id) } else { vec![] },
                "test".into(),
                serde_json::json!({ "run": id }),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        store.get_job("f1-w1").await.unwrap().state,
        JobState::Queued
    );
    // the same id twice is refused, and nothing of the second is written
    assert!(store
        .accept_fusion(
            run("f1", "bob", 3),
            None,
            vec![new_job("f1-again", None)],
            "test".into(),
            serde_json::json!({})
        )
        .await
        .is_err());
    assert!(store.get_job("f1-again").await.is_err());
    store
        .update_fusion("f1".into(), serde_json::json!({ "round": 1 }))
        .await
        .unwrap();
    let end = |state: &str| Ending {
        state: state.into(),
        body: serde_json::json!({ "done": true }),
        transfers: vec![],
        actor: "test".into(),
        now: 9,
        kind: "fusion.finished",
        payload: serde_json::json!({ "run": "f1" }),
    };
    // messages in flight between both runs' workers
    for run in ["f1", "f2"] {
        let conversation = fusion_conversation(run);
        store
            .relay_post(
                RelayMessage {
                    mailbox: mailbox(&conversation, "1"),
                    conversation,
                    sender: "0".into(),
                    n: 0,
                    body: b"update".to_vec(),
                },
                0,
            )
            .await
            .unwrap();
    }
    // both runs are running: nothing to prune
    assert_eq!(store.relay_prune().await.unwrap(), 0);
    // ending the run cancels the workers' jobs it names and drops its relay mailboxes, in
    // the same change
    store
        .finish_fusion("f1".into(), end("succeeded"), vec!["f1-w1".into()])
        .await
        .unwrap();
    assert!(store
        .relay_messages("fusion/f1/1", 0)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.relay_messages("fusion/f2/1", 0).await.unwrap(),
        vec![b"update".to_vec()]
    );
    assert_eq!(store.relay_prune().await.unwrap(), 0);
    assert_eq!(
        store.get_job("f1-w0").await.unwrap().state,
        JobState::Queued
    );
    assert_eq!(
        store.get_job("f1-w1").await.unwrap().state,
        JobState::Cancelled
    );
    // an ended run neither changes nor ends again
    assert!(store
        .update_fusion("f1".into(), serde_json::json!({}))
        .await
        .is_err());
    assert!(store
        .finish_fusion("f1".into(), end("cancelled"), vec!["f1-w0".into()])
        .await
        .is_err());
    assert_eq!(
        store.get_job("f1-w0").await.unwrap().state,
        JobState::Queued
    );
    let f1 = store.fusion_row("f1").await.unwrap().unwrap();
    assert_eq!((f1.state.as_str(), f1.finished_ms), ("succeeded", Some(9)));
    assert_eq!(f1.body, serde_json::json!({ "done": true }));
    let running = store
        .fusion_rows(&records(None, Some("running")))
        .await
        .unwrap();
    assert_eq!(
        running.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["f2"]
    );
    assert_eq!(
        store
            .fusion_rows(&records(Some("alice"), None))
            .await
            .unwrap()
            .len(),
        1
    );
    // queries and fusion runs are kept apart
    assert!(store.query_row("f1").await.unwrap().is_none());
    // an ended run is a data use of its tenant in its month; a running one is not yet
    let uses = store
        .data_uses_finished_between("alice", 0, 10)
        .await
        .unwrap();
    assert_eq!(uses.len(), 1);
    assert_eq!((uses[0].0, uses[0].1.id.as_str()), ("fusion", "f1"));
    assert!(store
        .data_uses_finished_between("alice", 10, 20)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .data_uses_finished_between("bob", 0, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sqlite_fusion_suite() {
    let dir = tempfile::tempdir().unwrap();
    fusion_suite(Store::open(&sqlite_url(dir.path())).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_fusion_suite() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    fusion_suite(Store::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_query_budget_suite() {
    let dir = tempfile::tempdir().unwrap();
    query_budget_suite(Store::open(&sqlite_url(dir.path())).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_query_budget_suite() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    query_budget_suite(Store::open(&url).await.unwrap()).await;
}

/// One server per store: a second claim is refused while the first is held, and succeeds
/// once it is dropped.
async fn claim_suite(url: &str) {
    let first = Store::open(url).await.unwrap();
    let second = Store::open(url).await.unwrap();
    let held = first.claim().await.unwrap();
    let refused = second.claim().await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::Claimed(m) if m.contains("another baygrid server")),
        "{refused}"
    );
    drop(held);
    // PostgreSQL lets an advisory lock go when it sees the session close
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let claim = loop {
        match second.claim().await {
            Ok(claim) => break claim,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(first.claim().await.is_err());
    drop(claim);
}

#[tokio::test]
async fn sqlite_store_has_one_server() {
    let dir = tempfile::tempdir().unwrap();
    claim_suite(&sqlite_url(dir.path())).await;
}

#[tokio::test]
async fn postgres_store_has_one_server() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    claim_suite(&url).await;
}

fn message(mailbox: &str, sender: &str, n: i64, body: &[u8]) -> RelayMessage {
    RelayMessage {
        conversation: mailbox.split('/').take(2).collect::<Vec<_>>().join("/"),
        mailbox: mailbox.into(),
        sender: sender.into(),
        n,
        body: body.to_vec(),
    }
}

/// The relay's mailboxes: numbered in arrival order across senders, a resend stored once,
/// a gap refused, acknowledged messages deleted, an ended conversation dropped, and
/// everything that was accepted still there for a store opened again.
async fn relay_suite(url: &str) {
    let store = Store::open(url).await.unwrap();
    let a = "fusion/r1/2";
    assert_eq!(
        store
            .relay_post(message(a, "0", 0, b"from 0"), 0)
            .await
            .unwrap(),
        Posted::Accepted(0)
    );
    assert_eq!(
        store
            .relay_post(message(a, "1", 0, b"from 1"), 0)
            .await
            .unwrap(),
        Posted::Accepted(1)
    );
    // the answer to the first post was lost and it came again: kept once
    assert_eq!(
        store
            .relay_post(message(a, "0", 0, b"from 0"), 0)
            .await
            .unwrap(),
        Posted::Again
    );
    // every byte value, and a body of 1 MiB
    let all: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    assert_eq!(
        store.relay_post(message(a, "0", 1, &all), 0).await.unwrap(),
        Posted::Accepted(2)
    );
    let gap = store
        .relay_post(message(a, "1", 5, b"after a gap"), 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(gap.contains("skips message 1"), "{gap}");
    assert!(store.relay_post(message(a, "1", -1, b""), 0).await.is_err());
    store
        .relay_post(message("fusion/r2/1", "0", 0, b"other run"), 0)
        .await
        .unwrap();
    assert_eq!(
        store.relay_messages(a, 0).await.unwrap(),
        vec![b"from 0".to_vec(), b"from 1".to_vec(), all.clone()]
    );
    assert!(store
        .relay_messages("fusion/r1/9", 0)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.relay_messages(a, 2).await.unwrap(), vec![all.clone()]);
    // the addressee asked from 2: the next post deletes 0 and 1; the rest keep their numbers
    assert_eq!(
        store
            .relay_post(message(a, "1", 1, b"next"), 2)
            .await
            .unwrap(),
        Posted::Accepted(3)
    );
    assert_eq!(store.count("relay_messages").await.unwrap(), 3);
    assert_eq!(
        store.relay_messages(a, 0).await.unwrap(),
        vec![all.clone(), b"next".to_vec()]
    );
    // a resend of an acknowledged message is still known
    assert_eq!(
        store
            .relay_post(message(a, "1", 0, b"from 1"), 0)
            .await
            .unwrap(),
        Posted::Again
    );
    drop(store);

    let store = Store::open(url).await.unwrap();
    assert_eq!(
        store.relay_messages(a, 2).await.unwrap(),
        vec![all, b"next".to_vec()]
    );
    // neither run is running (there are none in this store): pruned, every row of both
    assert_eq!(store.relay_prune().await.unwrap(), 6);
    assert!(store.relay_messages(a, 0).await.unwrap().is_empty());
    assert!(store
        .relay_messages("fusion/r2/1", 0)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .relay_post(message(a, "0", 0, b"anew"), 0)
            .await
            .unwrap(),
        Posted::Accepted(0),
        "a dropped conversation's numbers start again"
    );
}

#[tokio::test]
async fn sqlite_relay_suite() {
    let dir = tempfile::tempdir().unwrap();
    relay_suite(&sqlite_url(dir.path())).await;
}

#[tokio::test]
async fn postgres_relay_suite() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    relay_suite(&url).await;
}
