//! Queries at the data, end to end: a Hong Kong bank's card holders (FATE's default_credit
//! guest table) in the Cyberport vault and a Shenzhen card issuer's spending (the host
//! table) in the Qianhai vault, each with a seeded 25% of the card holders dropped. A Hong
//! Kong lab asks through the API; the agents beside the vaults answer with noisy,
//! thresholded aggregates only; the budget is spent before anything runs; the release is
//! audited with the result's hash and charged; a query across both vaults aligns the card
//! holders by PSI through the server's relay.

mod common;

use std::path::Path;
use std::time::Duration;

use baygrid_api::{Client, DatasetSpec, DatasetView, QueryDryRun, QueryState, QueryView};
use baygrid_core::{Jurisdiction, Role};
use baygrid_server::ServerConfig;
use common::{console_page, repo, start_agent};
use serde_json::{json, Value};

fn yaml<T: serde::de::DeserializeOwned>(path: &str) -> T {
    serde_yaml::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

struct Zone {
    server: baygrid_server::RunningServer,
    /// What the server was started with (to start it again on the same store).
    config: ServerConfig,
    operator: Client,
    lab: Client,
    _agents: Vec<(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
    /// Card holders kept in each table.
    kept: (usize, usize),
}

/// Both holders with their datasets uploaded (a seeded 25% of card holders dropped from
/// each) and their query offers published, agents beside both vaults, and the lab with a
/// wallet. `shared_epsilon` overrides the guest offer's shared budget.
async fn zone(dir: &Path) -> Zone {
    zone_with(dir, true, ServerConfig::default().vault_answer_timeout).await
}

/// The zone, with or without the vaults' agents, and the time a query waits for them.
async fn zone_with(dir: &Path, with_agents: bool, vault_answer_timeout: Duration) -> Zone {
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
    let mut kept = Vec::new();
    for (party, dataset, file, seed) in [
        (
            json!({"name": "hk-bank", "jurisdiction": "HK", "city": "hong-kong"}),
            "hk-credit-history",
            "default_credit_hetero_guest.csv",
            1u64,
        ),
        (
            json!({"name": "sz-card-issuer", "jurisdiction": "CN", "city": "shenzhen"}),
            "sz-card-spend",
            "default_credit_hetero_host.csv",
            2u64,
        ),
    ] {
        let _: Value = operator.post("/api/v1/parties", &party).await.unwrap();
        let holder = operator
            .issue(Role::DataHolder, party["name"].as_str())
            .await
            .unwrap();
        let spec: DatasetSpec = yaml(&format!("examples/datasets/{dataset}.yaml"));
        let _: DatasetView = holder.post("/api/v1/datasets", &spec).await.unwrap();
        let part = dir.join(file);
        let (rows, _) = baygrid_query::drop_subjects(
            &repo(&format!("../shared/data/fate/{file}")),
            &part,
            "id",
            0.25,
            seed,
        )
        .unwrap();
        kept.push(rows);
        baygrid_vault::upload(&holder, dataset, &[part])
            .await
            .unwrap();
        let offer: Value = yaml(&format!("examples/data-offers/{dataset}.yaml"));
        let _: Value = holder.post("/api/v1/data-offers", &offer).await.unwrap();
    }
    let lab = operator
        .add_tenant(
            "gba-risk-lab",
            Jurisdiction::HK,
            "hong-kong",
            "10000.00 CNY".parse().unwrap(),
        )
        .await
        .unwrap();
    let mut agents = Vec::new();
    if with_agents {
        agents.push(start_agent(&url, &operator, "cyberport-h800", &dir.join("hk")).await);
        agents.push(start_agent(&url, &operator, "qianhai-h800", &dir.join("sz")).await);
    }
    Zone {
        server,
        config,
        operator,
        lab,
        _agents: agents,
        kept: (kept[0], kept[1]),
    }
}

async fn contract(lab: &Client, offer: &str) -> Value {
    let c: Value = lab
        .post(
            "/api/v1/contracts",
            &json!({"offer": offer, "mode": "query", "purpose": "credit_risk", "site": "hk-cyberport"}),
        )
        .await
        .unwrap();
    assert_eq!(c["state"], "active", "{c}");
    c
}

fn ask(dataset: &str, sql: &str, epsilon: f64) -> Value {
    json!({"dataset": dataset, "sql": sql, "epsilon": epsilon, "wait_ms": 60000})
}

async fn query(lab: &Client, dataset: &str, sql: &str, epsilon: f64) -> QueryView {
    let view: QueryView = lab
        .post("/api/v1/queries", &ask(dataset, sql, epsilon))
        .await
        .unwrap();
    assert_ne!(view.state, QueryState::Running, "{view:?}");
    view
}

/// The true intersection of the two seeded drops the zone uploaded into `dir`.
fn card_holders_in_both(dir: &Path) -> f64 {
    let ids = |file: &str| -> std::collections::HashSet<String> {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap().to_string())
            .collect()
    };
    ids("default_credit_hetero_guest.csv")
        .intersection(&ids("default_credit_hetero_host.csv"))
        .count() as f64
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

#[tokio::test]
async fn a_query_runs_at_the_vault_and_only_its_noisy_aggregate_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path()).await;
    let lab = &zone.lab;
    let sql = "SELECT y, COUNT(*) AS n, AVG(x1) AS mean_x1 FROM hk_credit_history GROUP BY y";

    // no contract, nothing: not even a dry run
    match lab
        .post::<_, Value>("/api/v1/queries", &ask("hk-credit-history", sql, 1.0))
        .await
    {
        Err(e) => assert_eq!(e.status(), Some(403), "{e}"),
        Ok(v) => panic!("answered without a contract: {v}"),
    }
    contract(lab, "hk-credit-history-query").await;

    // the dry run prices it and spends nothing
    let mut dry = ask("hk-credit-history", sql, 1.0);
    dry["dry_run"] = json!(true);
    let cost: QueryDryRun = lab.post("/api/v1/queries", &dry).await.unwrap();
    assert_eq!(cost.columns, vec!["y", "n", "mean_x1"]);
    assert!(cost.fits);
    assert_eq!(cost.cost[0].shares, 4, "threshold + count + avg (two)");
    assert_eq!(cost.cost[0].budget.epsilon_left, 3.0);
    assert_eq!(cost.price[0].to_string(), "20.00 HKD");

    let view = query(lab, "hk-credit-history", sql, 1.0).await;
    assert_eq!(view.state, QueryState::Released, "{view:?}");
    // the record shows the budgets as this query left them
    assert!(
        (view.cost[0].budget.epsilon_left - 2.0).abs() < 1e-9,
        "{view:?}"
    );
    assert!((view.cost[0].budget.shared_epsilon_left - 5.0).abs() < 1e-9);
    assert!(view.cost[0].budget.delta_left < view.cost[0].budget.delta);
    assert!(
        view.rules.iter().any(|r| r == "DERIVED-ANON"),
        "{:?}",
        view.rules
    );
    let result = view.result.clone().unwrap();
    assert_eq!(result.columns, vec!["y", "n", "mean_x1"]);
    assert_eq!(result.rows.len(), 2);
    let total: f64 = result.rows.iter().map(|r| number(&r[1])).sum();
    assert!(
        (total - zone.kept.0 as f64).abs() < 100.0,
        "{total} vs {} kept",
        zone.kept.0
    );
    // the audit log holds the result's hash
    let digest = view.result_sha256.clone().unwrap();
    assert_eq!(digest, result.digest());
    let entries: Vec<Value> = zone
        .operator
        .get("/api/v1/audit/entries?limit=10000")
        .await
        .unwrap();
    let released: Vec<&Value> = entries
        .iter()
        .filter(|e| e["canonical"].as_str().unwrap().contains("query.released"))
        .collect();
    assert_eq!(released.len(), 1);
    assert!(released[0]["canonical"].as_str().unwrap().contains(&digest));
    // and the ledger charged it under the contract
    assert_eq!(view.charged[0].to_string(), "20.00 HKD");
    let revenue: Value = zone
        .operator
        .get("/api/v1/ledger/accounts/holder:hk-bank:HKD")
        .await
        .unwrap();
    assert_eq!(revenue["kind"], "data_holder_revenue");
    assert_ne!(revenue["balance"], json!("0.00 HKD"), "{revenue}");
    // the month's invoice has the query as a data use, charged in CNY
    let month = &view.finished_at.as_ref().unwrap()[..7];
    let invoice: baygrid_api::InvoiceView = lab
        .get(&format!(
            "/api/v1/ledger/invoices/gba-risk-lab?month={month}"
        ))
        .await
        .unwrap();
    let line = invoice.data_uses.iter().find(|u| u.id == view.id).unwrap();
    assert_eq!(
        (line.kind.as_str(), line.state.as_str()),
        ("query", "released")
    );
    assert_eq!(line.datasets, ["hk-credit-history"]);
    assert!(line.amount.minor > 0);
    assert_eq!(invoice.total, line.amount);

    // the budget went down by the query's ε, and a second dry run says so
    let cost: QueryDryRun = lab.post("/api/v1/queries", &dry).await.unwrap();
    assert!((cost.cost[0].budget.epsilon_left - 2.0).abs() < 1e-9);
    assert!((cost.cost[0].budget.shared_epsilon_left - 5.0).abs() < 1e-9);
}

#[tokio::test]
async fn adversarial_queries_are_refused_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path()).await;
    let lab = &zone.lab;
    contract(lab, "hk-credit-history-query").await;
    contract(lab, "sz-card-spend-query").await;
    for (sql, reason) in [
        ("SELECT * FROM hk_credit_history", "must be an aggregate"),
        ("SELECT id, COUNT(*) FROM hk_credit_history GROUP BY id", "subject column"),
        ("SELECT COUNT(*) FROM hk_credit_history WHERE x1 > (SELECT AVG(x1) FROM hk_credit_history)", "subqueries"),
        ("SELECT COUNT(*) FROM hk_credit_history WHERE leak(x1) > 0", "does not plan"),
        ("SELECT COUNT(*) FROM hk_credit_history; DELETE FROM hk_credit_history", "one statement"),
        ("SELECT COUNT(*) FROM hk_credit_history WHERE", "does not parse"),
        ("SELECT y, COUNT(*) FROM hk_credit_history GROUP BY y ORDER BY 2 LIMIT 1", "not allowed"),
        (
            "SELECT hk_credit_history.y, AVG(sz_card_spend.x3) FROM hk_credit_history JOIN sz_card_spend ON hk_credit_history.id = sz_card_spend.id GROUP BY hk_credit_history.y",
            "per-row linkage",
        ),
    ] {
        match lab
            .post::<_, Value>("/api/v1/queries", &ask("hk-credit-history", sql, 1.0))
            .await
        {
            Err(baygrid_api::ClientError::Api { status, field, message, .. }) => {
                assert_eq!(status, 422, "{sql}: {message}");
                assert_eq!(field.as_deref(), Some("sql"));
                assert!(message.contains(reason), "{sql}: `{message}` lacks `{reason}`");
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    // nothing refused spent anything
    let mut dry = ask(
        "hk-credit-history",
        "SELECT COUNT(*) FROM hk_credit_history",
        1.0,
    );
    dry["dry_run"] = json!(true);
    let cost: QueryDryRun = lab.post("/api/v1/queries", &dry).await.unwrap();
    assert_eq!(cost.cost[0].budget.epsilon_left, 3.0);
}

#[tokio::test]
async fn concurrent_queries_never_overspend_and_repeats_exhaust_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path()).await;
    let lab = &zone.lab;
    contract(lab, "hk-credit-history-query").await;
    // ten at once at ε 0.5 against a budget of 3: exactly six are accepted
    let sql = "SELECT COUNT(*) FROM hk_credit_history WHERE x0 > 0";
    let tries = (0..10).map(|_| {
        let lab = lab.clone();
        async move {
            lab.post::<_, QueryView>("/api/v1/queries", &ask("hk-credit-history", sql, 0.5))
                .await
        }
    });
    let outcomes = futures_join(tries).await;
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(accepted, 6, "{refused:?}");
    for e in &refused {
        assert_eq!(e.status(), Some(409), "{e}");
        assert!(e.to_string().contains("budget"), "{e}");
    }
    // the repeated question's answers spread like the calibrated noise, and the budget is gone
    let answers: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .map(|v| number(&v.result.as_ref().unwrap_or_else(|| panic!("{v:?}")).rows[0][0]))
        .collect();
    assert!(answers.iter().any(|a| *a != answers[0]), "{answers:?}");
    let mut dry = ask("hk-credit-history", sql, 0.01);
    dry["dry_run"] = json!(true);
    let cost: QueryDryRun = lab.post("/api/v1/queries", &dry).await.unwrap();
    assert!(!cost.fits);
    assert_eq!(cost.cost[0].budget.epsilon_left, 0.0);
    let spent = zone
        .operator
        .get::<Vec<QueryView>>("/api/v1/queries")
        .await
        .unwrap()
        .iter()
        .map(|q| q.cost[0].epsilon)
        .sum::<f64>();
    assert!((spent - 3.0).abs() < 1e-9, "{spent}");
    // listed newest first, a page at a time, in one state when asked
    let list = |path: String| {
        let operator = zone.operator.clone();
        async move { operator.get::<Vec<QueryView>>(&path).await }
    };
    let ids = |views: &[QueryView]| views.iter().map(|q| q.id.clone()).collect::<Vec<_>>();
    let all = list("/api/v1/queries".into()).await.unwrap();
    assert!(all.len() > 4, "{}", all.len());
    let first = list("/api/v1/queries?limit=4".into()).await.unwrap();
    let rest = list(format!("/api/v1/queries?before={}", first[3].id))
        .await
        .unwrap();
    assert_eq!([ids(&first), ids(&rest)].concat(), ids(&all));
    let released = list("/api/v1/queries?state=released".into()).await.unwrap();
    assert_eq!(released.len(), accepted);
    assert!(released.iter().all(|q| q.state == QueryState::Released));
    for (path, field) in [
        ("/api/v1/queries?state=sleeping", "state"),
        ("/api/v1/queries?limit=0", "limit"),
        ("/api/v1/queries?before=q_none", "before"),
    ] {
        let e = list(path.into()).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{path}: {e}");
        assert!(e.to_string().contains(field), "{path}: {e}");
    }
}

async fn futures_join<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_question_across_two_vaults_aligns_card_holders_by_psi_and_moves_no_rows() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path()).await;
    let lab = &zone.lab;
    contract(lab, "hk-credit-history-query").await;
    contract(lab, "sz-card-spend-query").await;
    let sql = "SELECT COUNT(*) AS card_holders, AVG(hk_credit_history.x1) AS history_x1, \
               AVG(sz_card_spend.x3) AS spend_x3 \
               FROM hk_credit_history JOIN sz_card_spend ON hk_credit_history.id = sz_card_spend.id";
    let view = query(lab, "hk-credit-history", sql, 2.0).await;
    assert_eq!(view.state, QueryState::Released, "{view:?}");
    assert_eq!(view.cost.len(), 2);
    let row = &view.result.as_ref().unwrap().rows[0];
    let both = card_holders_in_both(dir.path());
    assert!(both < zone.kept.0 as f64 && both < zone.kept.1 as f64);
    assert!((number(&row[0]) - both).abs() < 50.0, "{row:?} vs {both}");
    assert!(number(&row[1]).abs() < 3.0 && number(&row[2]).abs() < 3.0);
    assert_eq!(view.charged.len(), 2);
    // the console's page of the query: its cost at both vaults and the released result
    let (status, page) = console_page(lab, &format!("/console/queries/{}", view.id)).await;
    assert_eq!(status, 200, "{page}");
    for shown in [
        "hk-credit-history",
        "sz-card-spend",
        "<th>card_holders</th>",
        view.result_sha256.as_deref().unwrap(),
    ] {
        assert!(page.contains(shown), "{shown}: {page}");
    }
    let (status, _) = console_page(&zone.operator, "/console/queries/q_none").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_two_vault_query_goes_on_through_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    // only Hong Kong's agent at first: its side aligns, posts, and waits for the other
    let zone = zone_with(dir.path(), false, Duration::from_secs(600)).await;
    let (server, config) = (zone.server, zone.config);
    let (addr, url, store_url) = (server.addr, server.url(), config.store_url());
    let hk = start_agent(
        &url,
        &zone.operator,
        "cyberport-h800",
        &dir.path().join("hk"),
    )
    .await;
    let lab = &zone.lab;
    contract(lab, "hk-credit-history-query").await;
    contract(lab, "sz-card-spend-query").await;
    let sql = "SELECT COUNT(*) AS card_holders FROM hk_credit_history \
               JOIN sz_card_spend ON hk_credit_history.id = sz_card_spend.id";
    let mut body = ask("hk-credit-history", sql, 2.0);
    body["wait_ms"] = json!(0);
    let view: QueryView = lab.post("/api/v1/queries", &body).await.unwrap();
    assert_eq!(view.state, QueryState::Running, "{view:?}");

    // Hong Kong's message to Shenzhen's side is in the relay: stop the server then
    let reader = baygrid_store::Store::open(&store_url).await.unwrap();
    let conversation = baygrid_store::query_conversation(&view.id);
    let to_shenzhen = baygrid_store::mailbox(&conversation, "sz-card-spend");
    let mut waiting = Vec::new();
    for _ in 0..1200 {
        waiting = reader.relay_messages(&to_shenzhen, 0).await.unwrap();
        if !waiting.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!waiting.is_empty(), "Hong Kong's side never posted");
    drop(reader);
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = baygrid_server::start(ServerConfig {
        listen: addr,
        ..config
    })
    .await
    .unwrap();

    // Shenzhen's agent, started only now, reads what was posted before the restart
    let sz = start_agent(&url, &zone.operator, "qianhai-h800", &dir.path().join("sz")).await;
    let view: QueryView = lab
        .get(&format!("/api/v1/queries/{}?wait_ms=60000", view.id))
        .await
        .unwrap();
    assert_eq!(view.state, QueryState::Released, "{view:?}");
    let both = card_holders_in_both(dir.path());
    let row = &view.result.as_ref().unwrap().rows[0];
    assert!((number(&row[0]) - both).abs() < 50.0, "{row:?} vs {both}");
    assert_eq!(view.charged.len(), 2);
    for (stop, task) in [hk, sz] {
        stop.send(true).unwrap();
        task.await.unwrap();
    }
    server.stop().await;
    // the query's mailboxes went with its ending
    let reader = baygrid_store::Store::open(&store_url).await.unwrap();
    for dataset in ["sz-card-spend", "hk-credit-history"] {
        let mailbox = baygrid_store::mailbox(&conversation, dataset);
        assert!(reader.relay_messages(&mailbox, 0).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_gaussian_query_spends_delta_and_says_which_noise_it_carries() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone(dir.path()).await;
    let lab = &zone.lab;
    contract(lab, "hk-credit-history-query").await;
    let sql = "SELECT COUNT(*) AS n, AVG(x1) AS mean_x1 FROM hk_credit_history";
    let mut body = ask("hk-credit-history", sql, 1.0);
    body["mechanism"] = json!("gaussian");
    body["delta"] = json!(1e-7);
    body["dry_run"] = json!(true);
    let cost: QueryDryRun = lab.post("/api/v1/queries", &body).await.unwrap();
    // ungrouped, yet δ is spent: the Gaussian mechanism is (ε, δ)-DP
    assert_eq!(cost.cost[0].delta, 1e-7);
    body["dry_run"] = json!(false);
    let view: QueryView = lab.post("/api/v1/queries", &body).await.unwrap();
    assert_eq!(view.state, QueryState::Released, "{view:?}");
    let result = view.result.unwrap();
    assert!(result.noise.iter().all(|n| n.mechanism == "gaussian"));
    let n = number(&result.rows[0][0]);
    assert!(
        (n - zone.kept.0 as f64).abs() < 200.0,
        "{n} vs {}",
        zone.kept.0
    );
    // a mechanism that is not one is refused by name
    body["mechanism"] = json!("exponential");
    let err = lab
        .post::<_, Value>("/api/v1/queries", &body)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("mechanism"), "{err}");
}

#[tokio::test]
async fn a_query_no_vault_answers_fails_after_the_timeout_and_is_not_charged() {
    let dir = tempfile::tempdir().unwrap();
    let zone = zone_with(dir.path(), false, Duration::from_secs(1)).await;
    contract(&zone.lab, "hk-credit-history-query").await;
    let view = query(
        &zone.lab,
        "hk-credit-history",
        "SELECT COUNT(*) AS n FROM hk_credit_history",
        1.0,
    )
    .await;
    assert_eq!(view.state, QueryState::Failed);
    let error = view.error.unwrap();
    assert!(
        error.contains("no answer from `hk-credit-history` at hk-cyberport"),
        "{error}"
    );
    assert!(view.charged.is_empty());
}
