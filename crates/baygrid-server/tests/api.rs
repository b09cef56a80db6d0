//! Every endpoint through real HTTP: good calls, bad input (a 4xx naming the field) and the
//! wrong role. The whole flow runs on SQLite and on PostgreSQL.

use std::time::Duration;

use baygrid_api::{
    Client, ClientError, ClusterView, IssueTokenRequest, IssuedToken, JobView, LogsView, QuoteView,
};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Party, Role};
use baygrid_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

async fn serve(store: Option<String>, dir: &std::path::Path) -> RunningServer {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        store: store.unwrap_or_default(),
        sites_file: "sample".into(),
        schedule_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        // long enough that no lease expires during the test, however loaded the machine
        lease_ttl: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    baygrid_server::start(config).await.unwrap()
}

fn spec(yaml: &str) -> JobSpec {
    JobSpec::from_yaml(yaml).unwrap()
}

const SMALL: &str = "name: small\nresources: {accelerators: {H800: 1}}\ncommand: 'echo hi'\nestimated_duration: 1m\n";

async fn issue(operator: &Client, role: Role, subject: Option<&str>) -> Client {
    operator.issue(role, subject).await.unwrap()
}

async fn add_tenant(
    operator: &Client,
    name: &str,
    jurisdiction: Jurisdiction,
    city: &str,
    budget: &str,
) -> Client {
    operator
        .add_tenant(name, jurisdiction, city, budget.parse().unwrap())
        .await
        .unwrap()
}

/// Asserts an API error's status, code and field.
fn expect_error<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    status: u16,
    field: Option<&str>,
) -> String {
    match result {
        Err(ClientError::Api {
            status: got,
            field: got_field,
            message,
            code,
        }) => {
            assert_eq!(got, status, "{code}: {message}");
            if let Some(field) = field {
                assert_eq!(got_field.as_deref(), Some(field), "{message}");
            }
            assert!(!message.is_empty());
            message
        }
        other => panic!("expected HTTP {status}, got {other:?}"),
    }
}

async fn raw_post(url: &str, token: &str, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_state(client: &Client, id: &str, state: JobState) -> JobView {
    for _ in 0..200 {
        let job: JobView = client.get(&format!("/api/v1/jobs/{id}")).await.unwrap();
        if job.state == state {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {id} never reached {state}");
}

async fn api_flow(store: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(store, dir.path()).await;
    let base = server.url();
    let operator = Client::new(&base, Some(server.operator_token.clone()));
    let anonymous = Client::new(&base, None);

    // health, metrics, the OpenAPI document
    let health: Value = anonymous.get("/healthz").await.unwrap();
    assert_eq!(health["status"], "ok");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("baygrid_http_requests_total"), "{metrics}");
    let openapi: Value = anonymous.get("/api/v1/openapi.json").await.unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs/{id}/logs",
        "/api/v1/agent/lease",
        "/api/v1/clusters/{name}",
        "/api/v1/tokens/{id}",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    // Swagger UI over that document, its files in the binary
    let text = |path: &'static str| {
        let url = format!("{base}{path}");
        async move {
            let response = reqwest::get(url).await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, page) = text("/api/v1/docs/").await;
    assert_eq!(status, 200);
    assert!(page.contains("swagger-ui"), "{page}");
    let (status, script) = text("/api/v1/docs/swagger-initializer.js").await;
    assert_eq!(status, 200);
    assert!(script.contains("/api/v1/openapi.json"), "{script}");
    expect_error(anonymous.get::<Value>("/api/v1/nowhere").await, 404, None);

    // authentication
    expect_error(anonymous.get::<Value>("/api/v1/sites").await, 401, None);
    expect_error(
        Client::new(&base, Some("bg_nope".into()))
            .get::<Value>("/api/v1/sites")
            .await,
        401,
        None,
    );

    // the published catalog
    let sites: Vec<Value> = operator.get("/api/v1/sites").await.unwrap();
    assert_eq!(sites.len(), 6);
    let offers: Vec<Value> = operator.get("/api/v1/offers").await.unwrap();
    assert_eq!(offers.len(), 6);
    let models: Vec<Value> = operator.get("/api/v1/accelerators").await.unwrap();
    assert_eq!(models.len(), 4);
    let providers: Vec<Value> = operator.get("/api/v1/providers").await.unwrap();
    assert_eq!(providers.len(), 6);

    // parties, tenants, tokens
    let gz = add_tenant(
        &operator,
        "gz-lab",
        Jurisdiction::CN,
        "guangzhou",
        "1000.00 CNY",
    )
    .await;
    let hk = add_tenant(
        &operator,
        "hk-bank",
        Jurisdiction::HK,
        "hong-kong",
        "1000.00 CNY",
    )
    .await;
    let poor = add_tenant(
        &operator,
        "poor-lab",
        Jurisdiction::CN,
        "guangzhou",
        "0.01 CNY",
    )
    .await;
    let parties: Vec<Party> = operator.get("/api/v1/parties").await.unwrap();
    assert!(parties.len() >= 9);
    expect_error(gz.get::<Vec<Party>>("/api/v1/parties").await, 403, None);
    let bad_party = json!({"name": "x", "jurisdiction": "US", "city": "y"});
    expect_error(
        operator
            .post::<_, Value>("/api/v1/parties", &bad_party)
            .await,
        400,
        Some("jurisdiction"),
    );
    let bad_tenant = json!({"name": "t2", "party": "missing", "budget": "1.00 CNY"});
    expect_error(
        operator
            .post::<_, Value>("/api/v1/tenants", &bad_tenant)
            .await,
        400,
        Some("party"),
    );
    let bad_budget = json!({"name": "t2", "party": "gz-lab", "budget": "lots"});
    expect_error(
        operator
            .post::<_, Value>("/api/v1/tenants", &bad_budget)
            .await,
        400,
        Some("budget"),
    );
    expect_error(
        gz.post::<_, Value>(
            "/api/v1/tenants",
            &json!({"name": "t3", "party": "gz-lab", "budget": "1.00 CNY"}),
        )
        .await,
        403,
        None,
    );
    let tenants: Vec<Value> = gz.get("/api/v1/tenants").await.unwrap();
    assert_eq!(tenants.len(), 1, "a tenant sees only itself");
    expect_error(
        operator
            .post::<_, Value>("/api/v1/tokens", &json!({"role": "tenant"}))
            .await,
        400,
        Some("subject"),
    );
    expect_error(
        operator
            .post::<_, Value>(
                "/api/v1/tokens",
                &json!({"role": "tenant", "subject": "ghost"}),
            )
            .await,
        400,
        Some("subject"),
    );
    expect_error(
        operator
            .post::<_, Value>("/api/v1/tokens", &json!({"role": "king"}))
            .await,
        400,
        Some("role"),
    );
    expect_error(
        gz.post::<_, Value>("/api/v1/tokens", &json!({"role": "operator"}))
            .await,
        403,
        None,
    );
    let tokens: Vec<Value> = operator.get("/api/v1/tokens").await.unwrap();
    assert!(tokens.len() >= 4);
    assert!(tokens
        .iter()
        .all(|t| t.get("hash").is_none() && t.get("token").is_none()));
    expect_error(gz.get::<Value>("/api/v1/tokens").await, 403, None);
    let doomed: IssuedToken = operator
        .post(
            "/api/v1/tokens",
            &IssueTokenRequest {
                role: Role::Regulator,
                subject: None,
                label: None,
                expires_in: None,
            },
        )
        .await
        .unwrap();
    let regulator = Client::new(&base, Some(doomed.token.clone()));
    let _: Vec<Value> = regulator.get("/api/v1/sites").await.unwrap();
    operator
        .delete::<Value>(&format!("/api/v1/tokens/{}", doomed.id))
        .await
        .unwrap();
    expect_error(regulator.get::<Value>("/api/v1/sites").await, 401, None);
    expect_error(
        operator
            .delete::<Value>(&format!("/api/v1/tokens/{}", doomed.id))
            .await,
        404,
        None,
    );
    // a token issued for a time is refused once it is up, saying so
    for bad in ["soon", "0s", "11years"] {
        expect_error(
            operator
                .post::<_, Value>(
                    "/api/v1/tokens",
                    &json!({"role": "regulator", "expires_in": bad}),
                )
                .await,
            400,
            Some("expires_in"),
        );
    }
    let brief: IssuedToken = operator
        .post(
            "/api/v1/tokens",
            &json!({"role": "regulator", "expires_in": "1s"}),
        )
        .await
        .unwrap();
    let expires_at = brief.expires_at.clone().expect("an expiry");
    let auditor = Client::new(&base, Some(brief.token.clone()));
    let _: Vec<Value> = auditor.get("/api/v1/sites").await.unwrap();
    let listed: Vec<Value> = operator.get("/api/v1/tokens").await.unwrap();
    assert!(listed
        .iter()
        .any(|t| t["id"] == brief.id.as_str() && t["expires_at"] == expires_at.as_str()));
    let until = chrono::DateTime::parse_from_rfc3339(&expires_at).unwrap();
    while chrono::Utc::now() <= until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let refused = auditor.get::<Value>("/api/v1/sites").await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&format!("token {} expired at {expires_at}", brief.id)),
        "{refused}"
    );

    // sites and accelerators: operator only, validated
    let site = json!({"name": "nansha-2", "jurisdiction": "CN", "city": "guangzhou", "green_share_pct": 40, "power_price_per_kwh": "0.70 CNY"});
    let _: Value = operator.post("/api/v1/sites", &site).await.unwrap();
    let mut bad_site = site.clone();
    bad_site["green_share_pct"] = json!(140);
    expect_error(
        operator.post::<_, Value>("/api/v1/sites", &bad_site).await,
        400,
        Some("green_share_pct"),
    );
    let mut bad_site = site.clone();
    bad_site["colour"] = json!("green");
    expect_error(
        operator.post::<_, Value>("/api/v1/sites", &bad_site).await,
        400,
        Some("colour"),
    );
    expect_error(gz.post::<_, Value>("/api/v1/sites", &site).await, 403, None);
    let model = json!({"model": "H20", "vendor": "nvidia", "memory_gb": 96, "bf16_tflops": 148});
    let _: Value = operator.post("/api/v1/accelerators", &model).await.unwrap();
    expect_error(
        operator
            .post::<_, Value>(
                "/api/v1/accelerators",
                &json!({"model": "X", "vendor": "v", "memory_gb": 1, "bf16_tflops": 0}),
            )
            .await,
        400,
        Some("bf16_tflops"),
    );
    let provider = json!({"name": "nansha-two", "party": "nansha-ai-center"});
    let _: Value = operator.post("/api/v1/providers", &provider).await.unwrap();
    expect_error(
        operator
            .post::<_, Value>("/api/v1/providers", &json!({"name": "p", "party": "ghost"}))
            .await,
        400,
        Some("party"),
    );

    // a provider publishes its own cluster and offer, and sees only its own clusters
    let nansha = issue(&operator, Role::Provider, Some("nansha-two")).await;
    let cluster = json!({"name": "nansha-h20", "site": "nansha-2", "provider": "nansha-two", "engine": "local", "nodes": 2,
        "accelerator": "H20", "accelerators_per_node": 8, "cpus_per_node": 64, "memory_gb_per_node": 512});
    let _: Value = nansha.post("/api/v1/clusters", &cluster).await.unwrap();
    let mut foreign = cluster.clone();
    foreign["provider"] = json!("qianhai-compute");
    foreign["name"] = json!("stolen");
    expect_error(
        nansha.post::<_, Value>("/api/v1/clusters", &foreign).await,
        403,
        None,
    );
    let mut bad_cluster = cluster.clone();
    bad_cluster["nodes"] = json!(0);
    expect_error(
        nansha
            .post::<_, Value>("/api/v1/clusters", &bad_cluster)
            .await,
        400,
        Some("nodes"),
    );
    let mut bad_cluster = cluster.clone();
    bad_cluster["accelerator"] = json!("B300");
    expect_error(
        nansha
            .post::<_, Value>("/api/v1/clusters", &bad_cluster)
            .await,
        400,
        Some("accelerator"),
    );
    let _: Value = nansha
        .post(
            "/api/v1/offers",
            &json!({"cluster": "nansha-h20", "price_per_accelerator_hour": "5.00 CNY"}),
        )
        .await
        .unwrap();
    expect_error(
        nansha
            .post::<_, Value>(
                "/api/v1/offers",
                &json!({"cluster": "qianhai-h800", "price_per_accelerator_hour": "1.00 CNY"}),
            )
            .await,
        403,
        None,
    );
    expect_error(
        nansha
            .post::<_, Value>(
                "/api/v1/offers",
                &json!({"cluster": "nansha-h20", "price_per_accelerator_hour": "-1.00 CNY"}),
            )
            .await,
        400,
        Some("price_per_accelerator_hour"),
    );
    expect_error(
        nansha
            .post::<_, Value>(
                "/api/v1/offers",
                &json!({"cluster": "nansha-h20", "price_per_accelerator_hour": "1.00 USD"}),
            )
            .await,
        400,
        Some("price_per_accelerator_hour"),
    );
    let own: Vec<ClusterView> = nansha.get("/api/v1/clusters").await.unwrap();
    assert_eq!(own.len(), 1);
    assert!(
        own[0].reported.is_none(),
        "no agent has reported for a new cluster"
    );
    let all: Vec<ClusterView> = gz.get("/api/v1/clusters").await.unwrap();
    assert_eq!(all.len(), 7);
    expect_error(
        nansha
            .delete::<Value>("/api/v1/clusters/qianhai-h800")
            .await,
        403,
        None,
    );
    nansha
        .delete::<Value>("/api/v1/clusters/nansha-h20")
        .await
        .unwrap();
    expect_error(
        nansha.delete::<Value>("/api/v1/clusters/nansha-h20").await,
        404,
        None,
    );

    // submitting: bad specs name the field
    let (status, body) =
        raw_post(&format!("{base}/api/v1/jobs"), &server.operator_token, "{}").await;
    assert_eq!(status, 400, "{body}");
    let gz_token = gz_token(&operator).await;
    let cases = [
        ("{", "body"),
        (
            r#"{"name": "a", "resources": {"nodes": "two"}, "command": "x", "estimated_duration": "1m"}"#,
            "resources.nodes",
        ),
        (
            r#"{"name": "a", "resources": {}, "command": "x", "estimated_duration": "1m", "gpus": 1}"#,
            "gpus",
        ),
        (
            r#"{"name": "a", "resources": {}, "command": "x", "estimated_duration": "soon"}"#,
            "estimated_duration",
        ),
        (
            r#"{"name": "a", "resources": {}, "command": "", "estimated_duration": "1m"}"#,
            "command",
        ),
        (
            r#"{"name": "a", "resources": {}, "command": "x", "estimated_duration": "1m", "priority": 5000}"#,
            "priority",
        ),
        (
            r#"{"name": "a", "resources": {}, "command": "x", "estimated_duration": "1m", "sites": ["Nansha"]}"#,
            "sites[0]",
        ),
        (
            r#"{"name": "a", "resources": {}, "command": "x", "estimated_duration": "1m", "fusion": {"run": "fu-x", "index": 1}}"#,
            "fusion",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = raw_post(&format!("{base}/api/v1/jobs"), &gz_token, body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
    }
    // a body over the limit is a 413 that says what the limit is
    let padded = format!(
        r#"{{"name": "a", "resources": {{}}, "command": "{}", "estimated_duration": "1m"}}"#,
        "x".repeat(3 << 20)
    );
    let (status, answer) = raw_post(&format!("{base}/api/v1/jobs"), &gz_token, &padded).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["code"], "too_large", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("larger than the 2 MiB a request may carry"),
        "{answer}"
    );
    let impossible = spec(
        "name: huge\nresources: {accelerators: {H800: 16}}\ncommand: x\nestimated_duration: 1m\n",
    );
    let message = expect_error(
        gz.post::<_, JobView>("/api/v1/jobs", &impossible).await,
        422,
        Some("resources.accelerators"),
    );
    assert!(message.contains("16 per node"), "{message}");
    let unknown_model = spec(
        "name: huge\nresources: {accelerators: {B200: 1}}\ncommand: x\nestimated_duration: 1m\n",
    );
    expect_error(
        gz.post::<_, JobView>("/api/v1/jobs", &unknown_model).await,
        422,
        Some("resources.accelerators"),
    );
    // from shaoguan, the only A100s (macao) are 8 ms away
    let sg = add_tenant(
        &operator,
        "sg-lab",
        Jurisdiction::CN,
        "shaoguan",
        "1000.00 CNY",
    )
    .await;
    let far = spec("name: far\nresources: {accelerators: {A100: 1}}\ncommand: x\nestimated_duration: 1m\nlatency_sensitive: true\n");
    let message = expect_error(
        sg.post::<_, JobView>("/api/v1/jobs", &far).await,
        422,
        Some("latency_sensitive"),
    );
    assert!(message.contains("8 ms"), "{message}");
    let past = spec("name: late\nresources: {}\ncommand: x\nestimated_duration: 1m\ndeadline: 2020-01-01T00:00:00Z\n");
    expect_error(
        gz.post::<_, JobView>("/api/v1/jobs", &past).await,
        400,
        Some("deadline"),
    );
    let dear = spec(
        "name: dear\nresources: {accelerators: {H800: 8}}\ncommand: x\nestimated_duration: 10h\n",
    );
    let message = expect_error(
        poor.post::<_, JobView>("/api/v1/jobs", &dear).await,
        422,
        Some("estimated_duration"),
    );
    assert!(
        message.contains("0.01 CNY available") && message.contains("hold"),
        "{message}"
    );
    let capped = spec("name: capped\nresources: {accelerators: {H800: 1}}\ncommand: x\nestimated_duration: 1h\nmax_price_per_hour: 30.00 CNY\n");
    let message = expect_error(
        poor.post::<_, JobView>("/api/v1/jobs", &capped).await,
        422,
        Some("max_price_per_hour"),
    );
    // 30.00 × 1 accelerator × 1 h × the 150% margin
    assert!(message.contains("45.00 CNY"), "{message}");
    // the operator funds the wallet; the same job now goes through
    expect_error(
        operator
            .post::<_, Value>(
                "/api/v1/ledger/deposits",
                &json!({"account": "wallet:poor-lab", "amount": "45.00 HKD"}),
            )
            .await,
        400,
        Some("amount"),
    );
    expect_error(
        operator
            .post::<_, Value>(
                "/api/v1/ledger/deposits",
                &json!({"account": "wallet:nobody", "amount": "45.00 CNY"}),
            )
            .await,
        400,
        Some("account"),
    );
    expect_error(
        operator
            .post::<_, Value>(
                "/api/v1/ledger/deposits",
                &json!({"account": "wallet:poor-lab", "amount": "-1.00 CNY"}),
            )
            .await,
        400,
        Some("amount"),
    );
    expect_error(
        poor.post::<_, Value>(
            "/api/v1/ledger/deposits",
            &json!({"account": "wallet:poor-lab", "amount": "45.00 CNY"}),
        )
        .await,
        403,
        None,
    );
    let deposit = json!({"account": "wallet:poor-lab", "amount": "45.00 CNY", "id": "top-up-1"});
    let funded: Value = operator
        .post("/api/v1/ledger/deposits", &deposit)
        .await
        .unwrap();
    assert_eq!(funded["available"], "45.01 CNY");
    // the same deposit again changes nothing; the same id with another amount is a conflict
    let again: Value = operator
        .post("/api/v1/ledger/deposits", &deposit)
        .await
        .unwrap();
    assert_eq!(again["available"], "45.01 CNY");
    let conflict = operator
        .post::<_, Value>(
            "/api/v1/ledger/deposits",
            &json!({"account": "wallet:poor-lab", "amount": "46.00 CNY", "id": "top-up-1"}),
        )
        .await;
    assert!(
        conflict.as_ref().is_err_and(|e| e
            .to_string()
            .starts_with("transfer deposit:top-up-1: exists with a different body (")),
        "{conflict:?}"
    );
    expect_error(conflict, 409, None);
    let held: JobView = poor.post("/api/v1/jobs", &capped).await.unwrap();
    let wallet: Value = poor
        .get("/api/v1/ledger/accounts/wallet:poor-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "45.00 CNY");
    assert_eq!(wallet["available"], "0.01 CNY");
    // another tenant's wallet, and a bad month, are refused
    expect_error(
        poor.get::<Value>("/api/v1/ledger/accounts/wallet:gz-lab")
            .await,
        404,
        None,
    );
    expect_error(
        poor.get::<Value>("/api/v1/ledger/invoices/poor-lab?month=2026-13")
            .await,
        400,
        Some("month"),
    );
    expect_error(
        poor.get::<Value>("/api/v1/ledger/accounts/wallet:poor-lab/statement?from=yesterday")
            .await,
        400,
        Some("from"),
    );
    // cancelling the queued job releases its hold
    let _: Value = poor
        .post(&format!("/api/v1/jobs/{}/cancel", held.id), &json!({}))
        .await
        .unwrap();
    let wallet: Value = poor
        .get("/api/v1/ledger/accounts/wallet:poor-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.00 CNY");
    assert_eq!(wallet["available"], "45.01 CNY");
    expect_error(
        operator
            .post::<_, JobView>("/api/v1/jobs", &spec(SMALL))
            .await,
        400,
        Some("tenant"),
    );
    expect_error(
        regulator_client(&operator)
            .await
            .post::<_, JobView>("/api/v1/jobs", &spec(SMALL))
            .await,
        403,
        None,
    );
    expect_error(
        gz.post::<_, JobView>("/api/v1/jobs?tenant=hk-bank", &spec(SMALL))
            .await,
        403,
        None,
    );

    // quote: every cluster with a verdict and a reason
    let quote: QuoteView = gz.post("/api/v1/jobs/quote", &spec(SMALL)).await.unwrap();
    assert_eq!(quote.quote.candidates.len(), 6);
    assert!(quote.feasible);
    assert!(quote.quote.candidates.iter().all(|c| !c.reason.is_empty()));
    assert_eq!(
        quote.chosen, None,
        "no agent is connected, so nothing fits now"
    );
    expect_error(
        gz.post::<_, QuoteView>("/api/v1/jobs/quote", &json!({"name": 1}))
            .await,
        400,
        Some("name"),
    );

    // submit, idempotent retry, visibility
    let first: JobView = gz
        .post_idempotent("/api/v1/jobs", &spec(SMALL), "key-1")
        .await
        .unwrap();
    let again: JobView = gz
        .post_idempotent("/api/v1/jobs", &spec(SMALL), "key-1")
        .await
        .unwrap();
    assert_eq!(first.id, again.id);
    let hk_job: JobView = hk.post("/api/v1/jobs", &spec(SMALL)).await.unwrap();
    let by_operator: JobView = operator
        .post("/api/v1/jobs?tenant=gz-lab", &spec(SMALL))
        .await
        .unwrap();
    assert_eq!(by_operator.tenant, "gz-lab");
    let mine: Vec<JobView> = gz.get("/api/v1/jobs").await.unwrap();
    assert_eq!(mine.len(), 2);
    assert!(mine.iter().all(|j| j.tenant == "gz-lab"));
    let everyone: Vec<JobView> = operator.get("/api/v1/jobs").await.unwrap();
    assert_eq!(
        everyone.len(),
        4,
        "three queued and poor-lab's cancelled one"
    );
    // newest first, a page at a time: the pages hold the whole list once, in its order
    assert!(everyone
        .windows(2)
        .all(|w| w[0].submitted_at >= w[1].submitted_at));
    let first_page: Vec<JobView> = operator.get("/api/v1/jobs?limit=3").await.unwrap();
    let next_page: Vec<JobView> = operator
        .get(&format!("/api/v1/jobs?limit=3&before={}", first_page[2].id))
        .await
        .unwrap();
    let paged: Vec<&str> = first_page
        .iter()
        .chain(&next_page)
        .map(|j| j.id.as_str())
        .collect();
    let whole: Vec<&str> = everyone.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(paged, whole);
    // a page may not start at a job the caller cannot see
    expect_error(
        gz.get::<Vec<JobView>>(&format!("/api/v1/jobs?before={}", hk_job.id))
            .await,
        400,
        Some("before"),
    );
    let queued: Vec<JobView> = operator
        .get("/api/v1/jobs?state=queued&tenant=hk-bank")
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    expect_error(
        operator
            .get::<Vec<JobView>>("/api/v1/jobs?state=sleeping")
            .await,
        400,
        Some("state"),
    );
    expect_error(
        operator.get::<Vec<JobView>>("/api/v1/jobs?limit=0").await,
        400,
        Some("limit"),
    );
    expect_error(
        gz.get::<JobView>(&format!("/api/v1/jobs/{}", hk_job.id))
            .await,
        404,
        None,
    );
    expect_error(nansha.get::<Vec<JobView>>("/api/v1/jobs").await, 403, None);
    let got: JobView = gz.get(&format!("/api/v1/jobs/{}", first.id)).await.unwrap();
    assert_eq!(got.events.len(), 1);
    expect_error(
        gz.get::<LogsView>(&format!("/api/v1/jobs/{}/logs?after=nonsense", first.id))
            .await,
        400,
        Some("after"),
    );

    // agents: only agent tokens, fenced by epoch
    expect_error(
        gz.post::<_, Value>("/api/v1/agent/lease", &json!({"max": 1}))
            .await,
        403,
        None,
    );
    let agent = issue(&operator, Role::Agent, Some("qianhai-h800")).await;
    let capacity = json!({"engine": "local", "nodes": 32, "accelerators_per_node": 8, "cpus_per_node": 192, "memory_gb_per_node": 2048, "running_jobs": 0});
    let _: Value = agent
        .post("/api/v1/agent/register", &json!({"capacity": capacity}))
        .await
        .unwrap();
    expect_error(
        agent
            .post::<_, Value>("/api/v1/agent/lease", &json!({"max": 0}))
            .await,
        400,
        Some("max"),
    );
    expect_error(
        agent
            .post::<_, Value>(
                "/api/v1/agent/register",
                &json!({"capacity": {"engine": "local"}}),
            )
            .await,
        400,
        None,
    );
    let placed = wait_state(&gz, &first.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("qianhai-h800"));
    let mut leases: Vec<Value> = Vec::new();
    for _ in 0..50 {
        let answer: Value = agent
            .post("/api/v1/agent/lease", &json!({"max": 10}))
            .await
            .unwrap();
        leases.extend(answer["leases"].as_array().unwrap().iter().cloned());
        if leases.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leases.len(), 3, "{leases:#?}");
    let lease = leases
        .iter()
        .find(|l| l["job_id"] == first.id.as_str())
        .unwrap();
    let epoch = lease["epoch"].as_i64().unwrap();
    assert_eq!(epoch, 1);
    let report = format!("/api/v1/agent/jobs/{}/report", first.id);
    expect_error(
        agent
            .post::<_, Value>(&report, &json!({"epoch": epoch + 1, "status": "running"}))
            .await,
        409,
        None,
    );
    let other_agent = issue(&operator, Role::Agent, Some("macao-a100")).await;
    expect_error(
        other_agent
            .post::<_, Value>(&report, &json!({"epoch": epoch, "status": "running"}))
            .await,
        409,
        None,
    );
    expect_error(
        agent
            .post::<_, Value>(&report, &json!({"epoch": epoch, "status": "sleeping"}))
            .await,
        400,
        Some("status"),
    );
    let _: Value = agent
        .post(&report, &json!({"epoch": epoch, "status": "running", "logs": [{"seq": 1, "stream": "stdout", "line": "hi"}]}))
        .await
        .unwrap();
    let beat: Value = agent
        .post("/api/v1/agent/heartbeat", &json!({"capacity": capacity, "held": [{"job_id": first.id, "epoch": epoch}, {"job_id": "job_ghost", "epoch": 1}]}))
        .await
        .unwrap();
    assert_eq!(beat["renewed"], json!([first.id]));
    assert_eq!(beat["stale"], json!(["job_ghost"]));
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let done: JobView = agent
        .post(
            &report,
            &json!({"epoch": epoch, "status": "succeeded", "exit_code": 0}),
        )
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    // metered: 1 H800 × 22.00 CNY/h × the seconds between the start and end reports
    let at = |t: &Option<String>| {
        chrono::DateTime::parse_from_rfc3339(t.as_deref().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let elapsed_ms = at(&done.finished_at) - at(&done.started_at);
    let expected_fen = (2200 * elapsed_ms + 1_800_000) / 3_600_000;
    assert!(expected_fen >= 1);
    assert_eq!(done.cost.unwrap().minor, expected_fen);
    let logs: LogsView = gz
        .get(&format!("/api/v1/jobs/{}/logs", first.id))
        .await
        .unwrap();
    assert_eq!(logs.lines.len(), 1);
    assert!(logs.done);
    let provider_view: JobView = issue(&operator, Role::Provider, Some("qianhai-compute"))
        .await
        .get(&format!("/api/v1/jobs/{}", first.id))
        .await
        .unwrap();
    assert_eq!(provider_view.id, first.id);

    // cancel: a held job through its agent, a finished job is already ended
    let cancel: Value = hk
        .post(&format!("/api/v1/jobs/{}/cancel", hk_job.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(cancel["outcome"], "requested");
    let hk_epoch = leases
        .iter()
        .find(|l| l["job_id"] == hk_job.id.as_str())
        .unwrap()["epoch"]
        .as_i64()
        .unwrap();
    let beat: Value = agent
        .post(
            "/api/v1/agent/heartbeat",
            &json!({"capacity": capacity, "held": [{"job_id": hk_job.id, "epoch": hk_epoch}]}),
        )
        .await
        .unwrap();
    assert_eq!(beat["cancel"], json!([hk_job.id]));
    let cancelled: JobView = agent
        .post(
            &format!("/api/v1/agent/jobs/{}/report", hk_job.id),
            &json!({"epoch": hk_epoch, "status": "cancelled"}),
        )
        .await
        .unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    let again: Value = gz
        .post(&format!("/api/v1/jobs/{}/cancel", first.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(again["outcome"], "already_ended");
    expect_error(
        gz.post::<_, Value>(&format!("/api/v1/jobs/{}/cancel", hk_job.id), &json!({}))
            .await,
        404,
        None,
    );
    expect_error(
        regulator_client(&operator)
            .await
            .post::<_, Value>(&format!("/api/v1/jobs/{}/cancel", first.id), &json!({}))
            .await,
        403,
        None,
    );

    // a queued job whose only possible cluster disappears fails within a cycle
    let macao_only = spec("name: macao-only\nresources: {accelerators: {A100: 8}, nodes: 4}\ncommand: x\nestimated_duration: 1m\n");
    let stranded: JobView = hk.post("/api/v1/jobs", &macao_only).await.unwrap();
    operator
        .delete::<Value>("/api/v1/clusters/macao-a100")
        .await
        .unwrap();
    let failed = wait_state(&hk, &stranded.id, JobState::Failed).await;
    assert!(
        failed.reason.contains("no cluster can ever hold"),
        "{}",
        failed.reason
    );

    // the audit log: regulators and operators read it; proofs verify against the checkpoint
    let regulator = regulator_client(&operator).await;
    expect_error(gz.get::<Value>("/api/v1/audit/entries").await, 403, None);
    let entries: Vec<Value> = regulator
        .get("/api/v1/audit/entries?from=0&limit=5")
        .await
        .unwrap();
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[0]["index"], 0);
    let entry: Value = regulator.get("/api/v1/audit/entries/3").await.unwrap();
    assert_eq!(entry["index"], 3);
    expect_error(
        regulator
            .get::<Value>("/api/v1/audit/entries/99999999")
            .await,
        404,
        None,
    );
    let proof: Value = regulator
        .get("/api/v1/audit/proof/inclusion?index=3")
        .await
        .unwrap();
    assert!(proof["to"].as_u64().unwrap() > 3);
    expect_error(
        regulator
            .get::<Value>("/api/v1/audit/proof/inclusion?index=99999999")
            .await,
        400,
        None,
    );
    expect_error(
        regulator
            .get::<Value>("/api/v1/audit/proof/consistency?from=0")
            .await,
        400,
        None,
    );
    expect_error(
        regulator
            .get::<Value>("/api/v1/audit/proof/consistency?from=x")
            .await,
        400,
        Some("from"),
    );
    let consistency: Value = regulator
        .get("/api/v1/audit/proof/consistency?from=1")
        .await
        .unwrap();
    assert!(consistency["proof"].as_array().is_some());
    let note = reqwest::Client::new()
        .get(format!("{base}/api/v1/audit/checkpoint"))
        .bearer_auth(&server.operator_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = reqwest::Client::new()
        .get(format!("{base}/api/v1/audit/key"))
        .bearer_auth(&server.operator_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (name, public) = baygrid_audit::parse_verifier_key(&key).unwrap();
    let checkpoint = baygrid_audit::verify_checkpoint(&note, &name, &public).unwrap();
    assert!(checkpoint.size >= proof["to"].as_u64().unwrap());
    // every job transition above is in the log
    let outbox = server.state.store.count("outbox").await.unwrap();
    assert!(
        checkpoint.size as i64 <= outbox && checkpoint.size > 50,
        "{} of {outbox}",
        checkpoint.size
    );

    // a tenant sees what it spent
    let tenants: Vec<Value> = gz.get("/api/v1/tenants").await.unwrap();
    assert_eq!(tenants[0]["spent"], json!(done.cost.unwrap().to_string()));
    // the invoice has the job at its metered cost, and the cost was split: fee and revenue
    let month = &done.finished_at.as_deref().unwrap()[..7];
    let invoice: Value = gz
        .get(&format!("/api/v1/ledger/invoices/gz-lab?month={month}"))
        .await
        .unwrap();
    let line = invoice["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["job"] == first.id.as_str())
        .unwrap();
    assert_eq!(line["amount"], json!(done.cost.unwrap().to_string()));
    assert_eq!(line["site"], "shenzhen-qianhai");
    let fee = (expected_fen * 500 + 5_000) / 10_000;
    let fees: Value = operator
        .get("/api/v1/ledger/accounts/fees:CNY")
        .await
        .unwrap();
    let revenue: Value = issue(&operator, Role::Provider, Some("qianhai-compute"))
        .await
        .get("/api/v1/ledger/accounts/provider:qianhai-compute:CNY")
        .await
        .unwrap();
    let minor = |v: &Value| -> i64 {
        let text = v
            .as_str()
            .unwrap()
            .trim_end_matches(" CNY")
            .replace('.', "");
        text.parse().unwrap()
    };
    assert_eq!(minor(&fees["balance"]), fee);
    assert_eq!(minor(&revenue["balance"]), expected_fen - fee);
    let statement: Value = gz
        .get("/api/v1/ledger/accounts/wallet:gz-lab/statement")
        .await
        .unwrap();
    assert!(statement["lines"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["id"] == format!("post:{}", first.id)));
    // a page at a time, oldest first: the pages hold the statement's lines once each, and
    // every page carries the whole period's net
    let whole = statement["lines"].as_array().unwrap().clone();
    assert!(whole.len() > 2, "{statement}");
    assert!(statement.get("next").is_none(), "{statement}");
    let period = format!(
        "from={}&to={}",
        statement["from"].as_str().unwrap(),
        statement["to"].as_str().unwrap()
    );
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page: Value = gz
            .get(&format!(
                "/api/v1/ledger/accounts/wallet:gz-lab/statement?{period}&limit=2{after}"
            ))
            .await
            .unwrap();
        assert_eq!(page["net"], statement["net"]);
        paged.extend(page["lines"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged, whole);
    for (query, field) in [("limit=0", "limit"), ("after=yesterday", "after")] {
        expect_error(
            gz.get::<Value>(&format!(
                "/api/v1/ledger/accounts/wallet:gz-lab/statement?{query}"
            ))
            .await,
            400,
            Some(field),
        );
    }
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("baygrid_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

async fn gz_token(operator: &Client) -> String {
    let client = issue(operator, Role::Tenant, Some("gz-lab")).await;
    client.token().unwrap().to_string()
}

async fn regulator_client(operator: &Client) -> Client {
    issue(operator, Role::Regulator, None).await
}

#[tokio::test]
async fn api_on_sqlite() {
    api_flow(None).await;
}

#[tokio::test]
async fn api_on_postgres() {
    let Some(url) = baygrid_store::testing::fresh_postgres_url().await else {
        return;
    };
    api_flow(Some(url)).await;
}

/// Catalog changes made at the same time all reach the cached catalog: a reload that read
/// the store before another change was written never replaces the one that read it after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_catalog_changes_all_reach_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(None, dir.path()).await;
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    for round in 0..6 {
        let names: Vec<String> = (0..64).map(|i| format!("lender-{round}-{i}")).collect();
        let adds = names.iter().map(|name| {
            let operator = operator.clone();
            let party = Party {
                name: name.clone(),
                jurisdiction: Jurisdiction::CN,
                city: "shenzhen".into(),
                ciio: false,
            };
            async move {
                let _: Party = operator.post("/api/v1/parties", &party).await.unwrap();
            }
        });
        futures::future::join_all(adds).await;
        // each party is known at once: a data holder's token for it is issued
        let catalog = server.state.catalog();
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !catalog.parties.contains_key(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: not in the cache: {missing:?}"
        );
        for name in &names {
            issue(&operator, Role::DataHolder, Some(name)).await;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_operator_token_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = serve(None, dir.path()).await;
    let token = first.operator_token.clone();
    first.stop().await;
    let second = serve(None, dir.path()).await;
    assert_eq!(second.operator_token, token);
    let on_disk = std::fs::read_to_string(dir.path().join("operator.token")).unwrap();
    assert_eq!(on_disk.trim(), token);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("operator.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    second.stop().await;
}

/// Readers asking for checkpoints while entries are written, alongside the background
/// sync: every answer is a checkpoint (never a spurious "gap"), and sizes never go back.
#[tokio::test]
async fn concurrent_checkpoint_reads_while_writing_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(None, dir.path()).await;
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    let tenant = add_tenant(
        &operator,
        "audit-race",
        Jurisdiction::CN,
        "shenzhen",
        "100000.00 CNY",
    )
    .await;
    let base = server.url();
    let writer = {
        let tenant = tenant.clone();
        tokio::spawn(async move {
            for _ in 0..150 {
                let _: JobView = tenant.post("/api/v1/jobs", &spec(SMALL)).await.unwrap();
            }
        })
    };
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (base, token) = (base.clone(), server.operator_token.clone());
        readers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut last = 0u64;
            for _ in 0..60 {
                let response = http
                    .get(format!("{base}/api/v1/audit/checkpoint"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let text = response.text().await.unwrap();
                assert!(status.is_success(), "{status}: {text}");
                let size: u64 = text.lines().nth(1).unwrap().parse().unwrap();
                assert!(size >= last, "checkpoint went back from {last} to {size}");
                last = size;
            }
        }));
    }
    writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    server.stop().await;
}

/// A region of one cluster of two 8-accelerator nodes, so the queue must wait for it.
const ONE_CLUSTER: &str = r#"
version: 1
exchange_rates: { HKD: "0.92", MOP: "0.89" }
transfer_price_per_gb: { within_jurisdiction: "0.30 CNY", across_border: "1.00 CNY" }
accelerators:
  - { model: A800, vendor: nvidia, memory_gb: 80, bf16_tflops: 312 }
parties:
  - { name: nansha-ai-center, jurisdiction: CN, city: guangzhou, ciio: false }
providers:
  - { name: nansha-ai-center, party: nansha-ai-center }
sites:
  - { name: guangzhou-nansha, jurisdiction: CN, city: guangzhou, green_share_pct: 30, power_price_per_kwh: "0.70 CNY" }
clusters:
  - { name: nansha-a800, site: guangzhou-nansha, provider: nansha-ai-center, engine: local, nodes: 2, accelerator: A800, accelerators_per_node: 8, cpus_per_node: 128, memory_gb_per_node: 1024 }
offers:
  - { cluster: nansha-a800, price_per_accelerator_hour: "16.00 CNY" }
round_trip_ms: []
"#;

/// A server over [`ONE_CLUSTER`] with `nodes` nodes, scheduling every 50 ms, with `tweak`
/// applied to its config; and its operator.
async fn one_cluster(
    dir: &std::path::Path,
    nodes: u32,
    tweak: impl FnOnce(&mut ServerConfig),
) -> (baygrid_server::RunningServer, Client) {
    serve_sites(
        dir,
        &ONE_CLUSTER.replace("nodes: 2,", &format!("nodes: {nodes},")),
        tweak,
    )
    .await
}

/// A server over the sites file `sites`, scheduling every 50 ms, with `tweak` applied to
/// its config; and its operator.
async fn serve_sites(
    dir: &std::path::Path,
    sites_yaml: &str,
    tweak: impl FnOnce(&mut ServerConfig),
) -> (baygrid_server::RunningServer, Client) {
    let sites = dir.join("sites.yaml");
    std::fs::write(&sites, sites_yaml).unwrap();
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("server"),
        sites_file: sites.display().to_string(),
        schedule_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    tweak(&mut config);
    let server = baygrid_server::start(config).await.unwrap();
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    (server, operator)
}

/// The Guangzhou AI lab, a mainland tenant with 100,000 CNY; its client.
async fn gz_lab(operator: &Client) -> Client {
    add_tenant(
        operator,
        "gz-ai-lab",
        Jurisdiction::CN,
        "guangzhou",
        "100000.00 CNY",
    )
    .await
}

/// Registers the Nansha cluster's agent with `nodes` nodes of 8 A800s; its client and
/// the capacity it declared.
async fn nansha_agent(operator: &Client, nodes: u32) -> (Client, Value) {
    register_agent(operator, "nansha-a800", nodes).await
}

/// Registers `cluster`'s agent with `nodes` nodes of 8 accelerators; its client and the
/// capacity it declared.
async fn register_agent(operator: &Client, cluster: &str, nodes: u32) -> (Client, Value) {
    let agent = issue(operator, Role::Agent, Some(cluster)).await;
    let capacity = json!({"engine": "local", "nodes": nodes, "accelerators_per_node": 8, "cpus_per_node": 128, "memory_gb_per_node": 1024, "running_jobs": 0});
    let _: Value = agent
        .post("/api/v1/agent/register", &json!({"capacity": capacity}))
        .await
        .unwrap();
    (agent, capacity)
}

#[tokio::test]
async fn backfill_starts_only_jobs_that_end_before_the_first_blocked_jobs_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let (server, operator) = one_cluster(dir.path(), 2, |_| {}).await;
    let lab = gz_lab(&operator).await;
    let _agent = nansha_agent(&operator, 2).await;
    let job = |name: &str, nodes: u32, duration: &str| {
        spec(&format!(
            "name: {name}\nresources: {{accelerators: {{A800: 8}}, nodes: {nodes}}}\ncommand: 'sleep 1'\nestimated_duration: {duration}\n"
        ))
    };
    let submit = |s: JobSpec| {
        let lab = &lab;
        async move { lab.post::<_, JobView>("/api/v1/jobs", &s).await.unwrap() }
    };
    // priority classes come from the server's config
    let mut classed = job("classed", 1, "1m");
    classed.priority_class = Some("batch".into());
    let view = submit(classed.clone()).await;
    assert_eq!(view.priority, -100);
    let _: Value = lab
        .post(&format!("/api/v1/jobs/{}/cancel", view.id), &json!({}))
        .await
        .unwrap();
    classed.priority_class = Some("vip".into());
    let err = lab.post::<_, JobView>("/api/v1/jobs", &classed).await;
    expect_error(err, 400, Some("priority_class"));
    classed.priority_class = Some("high".into());
    classed.priority = 5;
    let err = lab.post::<_, JobView>("/api/v1/jobs", &classed).await;
    expect_error(err, 400, Some("priority_class"));
    // one node busy for an hour
    let first = submit(job("first", 1, "1h")).await;
    wait_state(&lab, &first.id, JobState::Placed).await;
    // a two-node gang waits for it: it reserves the cluster from about an hour from now
    let gang = submit(job("gang", 2, "2h")).await;
    // a two-hour job would take the free node past the gang's start: it waits behind it
    let long = submit(job("long", 1, "2h")).await;
    // a ten-minute job ends before the gang could start: it is backfilled onto the free node
    let short = submit(job("short", 1, "10m")).await;
    let placed = wait_state(&lab, &short.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("nansha-a800"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for waiting in [&gang, &long] {
        let view: JobView = lab
            .get(&format!("/api/v1/jobs/{}", waiting.id))
            .await
            .unwrap();
        assert_eq!(view.state, JobState::Queued, "{view:#?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn within_a_tenant_the_job_due_first_is_placed_first() {
    let dir = tempfile::tempdir().unwrap();
    let (server, operator) = one_cluster(dir.path(), 1, |_| {}).await;
    let lab = gz_lab(&operator).await;
    let job = |name: &str, deadline: Option<String>| {
        let mut text = format!(
            "name: {name}\nresources: {{accelerators: {{A800: 8}}}}\ncommand: 'sleep 1'\nestimated_duration: 30m\n"
        );
        if let Some(d) = deadline {
            text.push_str(&format!("deadline: {d}\n"));
        }
        spec(&text)
    };
    // both wait for the cluster's agent; the later one is due in three hours, the older
    // has no deadline, and there is room for one
    let older: JobView = lab.post("/api/v1/jobs", &job("older", None)).await.unwrap();
    let due_at = (chrono::Utc::now() + chrono::Duration::hours(3)).to_rfc3339();
    let due: JobView = lab
        .post("/api/v1/jobs", &job("due", Some(due_at)))
        .await
        .unwrap();
    let _agent = nansha_agent(&operator, 1).await;
    let placed = wait_state(&lab, &due.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("nansha-a800"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view: JobView = lab
        .get(&format!("/api/v1/jobs/{}", older.id))
        .await
        .unwrap();
    assert_eq!(view.state, JobState::Queued, "{view:#?}");
    server.stop().await;
}

#[tokio::test]
async fn quotas_hold_a_tenant_to_its_share_and_borrowing_lends_the_cohorts_idle_quota() {
    let quota = |a800: u64| std::collections::BTreeMap::from([("A800".to_string(), a800)]);
    let job = |name: &str, nodes: u32| {
        spec(&format!(
            "name: {name}\nresources: {{accelerators: {{A800: 8}}, nodes: {nodes}}}\ncommand: 'sleep 1'\nestimated_duration: 1h\n"
        ))
    };
    for borrowing in [false, true] {
        // four nodes of eight, so room is never what holds a job back
        let dir = tempfile::tempdir().unwrap();
        let (server, operator) = one_cluster(dir.path(), 4, |c| {
            c.tenant_quotas = [("gz-ai-lab", quota(8)), ("sz-fintech", quota(8))]
                .into_iter()
                .map(|(t, q)| (t.to_string(), q))
                .collect();
            c.quota_borrowing = borrowing;
        })
        .await;
        let mut tenants = Vec::new();
        for (name, city) in [
            ("gz-ai-lab", "guangzhou"),
            ("sz-fintech", "shenzhen"),
            ("zh-startup", "zhuhai"),
        ] {
            tenants
                .push(add_tenant(&operator, name, Jurisdiction::CN, city, "100000.00 CNY").await);
        }
        let (lab, fintech, startup) = (&tenants[0], &tenants[1], &tenants[2]);
        let _agent = nansha_agent(&operator, 4).await;
        // larger than the quota (alone) or the cohort's (borrowing): refused at once
        let too_big = if borrowing { 3 } else { 2 };
        let message = expect_error(
            lab.post::<_, JobView>("/api/v1/jobs", &job("too-big", too_big))
                .await,
            422,
            None,
        );
        assert!(message.contains("quota"), "{message}");
        let first: JobView = lab.post("/api/v1/jobs", &job("first", 1)).await.unwrap();
        wait_state(lab, &first.id, JobState::Placed).await;
        let second: JobView = lab.post("/api/v1/jobs", &job("second", 1)).await.unwrap();
        let (client, waiting, expect) = if borrowing {
            // the fintech's idle quota is lent: the second runs beside the first
            wait_state(lab, &second.id, JobState::Placed).await;
            // the cohort now holds all 16 of its quota: the fintech, within its own, waits
            // for the borrowed nodes to come back
            let own: JobView = fintech.post("/api/v1/jobs", &job("own", 1)).await.unwrap();
            (fintech, own, "the cohort holds 16 of its 16")
        } else {
            // a free node, but the lab holds its 8: the second waits
            (lab, second, "gz-ai-lab holds 8 of its 8")
        };
        // held back by the quota, and the quote says why
        tokio::time::sleep(Duration::from_millis(500)).await;
        let view: JobView = client
            .get(&format!("/api/v1/jobs/{}", waiting.id))
            .await
            .unwrap();
        assert_eq!(view.state, JobState::Queued, "{view:#?}");
        let quote: QuoteView = client
            .post("/api/v1/jobs/quote", &waiting.spec)
            .await
            .unwrap();
        let line = &quote.quote.candidates[0];
        assert_eq!(line.verdict, "waits", "{line:?}");
        assert!(line.reason.contains(expect), "{}", line.reason);
        // a tenant with no quota is not limited by the others'
        let free: JobView = startup.post("/api/v1/jobs", &job("free", 1)).await.unwrap();
        wait_state(startup, &free.id, JobState::Placed).await;
        server.stop().await;
    }
}

#[tokio::test]
async fn an_urgent_job_preempts_a_preemptible_one_which_is_queued_again_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, operator) = one_cluster(dir.path(), 2, |c| {
        c.preemption_grace = Duration::from_millis(100);
    })
    .await;
    let lab = gz_lab(&operator).await;
    let fintech = add_tenant(
        &operator,
        "sz-fintech",
        Jurisdiction::CN,
        "shenzhen",
        "100000.00 CNY",
    )
    .await;
    let (agent, capacity) = nansha_agent(&operator, 2).await;
    let job = |name: &str, nodes: u32, extra: &str| {
        spec(&format!(
            "name: {name}\nresources: {{accelerators: {{A800: 8}}, nodes: {nodes}}}\ncommand: 'sleep 600'\nestimated_duration: 1h\n{extra}"
        ))
    };
    // the lab's preemptible gang takes the whole cluster and starts
    let gang: JobView = lab
        .post("/api/v1/jobs", &job("gang", 2, "preemptible: true\n"))
        .await
        .unwrap();
    wait_state(&lab, &gang.id, JobState::Placed).await;
    let lease = |id: String| {
        let agent = &agent;
        async move {
            for _ in 0..100 {
                let answer: Value = agent
                    .post("/api/v1/agent/lease", &json!({"max": 10}))
                    .await
                    .unwrap();
                if let Some(l) = answer["leases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|l| l["job_id"] == id.as_str())
                {
                    return l["epoch"].as_i64().unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no lease for {id}");
        }
    };
    let epoch = lease(gang.id.clone()).await;
    let report = format!("/api/v1/agent/jobs/{}/report", gang.id);
    let _: Value = agent
        .post(&report, &json!({"epoch": epoch, "status": "running"}))
        .await
        .unwrap();
    // a job of the same priority from another tenant does not stop it: taking back the
    // two-node gang would leave the lab below the fintech, so the shares would flip
    let same: JobView = fintech
        .post("/api/v1/jobs", &job("same", 1, ""))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let beat: Value = agent
        .post(
            "/api/v1/agent/heartbeat",
            &json!({"capacity": capacity, "held": [{"job_id": gang.id, "epoch": epoch}]}),
        )
        .await
        .unwrap();
    assert_eq!(beat["cancel"], json!([]), "{beat}");
    let _: Value = fintech
        .post(&format!("/api/v1/jobs/{}/cancel", same.id), &json!({}))
        .await
        .unwrap();
    // an urgent job stops it
    let urgent: JobView = fintech
        .post(
            "/api/v1/jobs",
            &job("urgent", 1, "priority_class: urgent\n"),
        )
        .await
        .unwrap();
    let mut told = false;
    for _ in 0..100 {
        let beat: Value = agent
            .post(
                "/api/v1/agent/heartbeat",
                &json!({"capacity": capacity, "held": [{"job_id": gang.id, "epoch": epoch}]}),
            )
            .await
            .unwrap();
        if beat["cancel"] == json!([gang.id]) {
            told = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(told, "the agent was never told to stop the preemptible job");
    let view: JobView = lab.get(&format!("/api/v1/jobs/{}", gang.id)).await.unwrap();
    assert_eq!(view.state, JobState::Running);
    assert!(view.reason.contains("being preempted"), "{}", view.reason);
    // the agent stops it: it is queued again, not ended, and its stopped run is not charged
    let requeued: JobView = agent
        .post(&report, &json!({"epoch": epoch, "status": "cancelled"}))
        .await
        .unwrap();
    assert_eq!(requeued.state, JobState::Queued, "{requeued:#?}");
    assert!(
        requeued.reason.contains("preempted on nansha-a800"),
        "{}",
        requeued.reason
    );
    assert!(requeued.reason.contains(&urgent.id), "{}", requeued.reason);
    assert!(requeued.cost.is_none());
    let placed = wait_state(&fintech, &urgent.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("nansha-a800"));
    // queued once for that eviction; it waits for the urgent job (the gang needs both nodes)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view: JobView = lab.get(&format!("/api/v1/jobs/{}", gang.id)).await.unwrap();
    assert_eq!(view.state, JobState::Queued);
    let queued = view
        .events
        .iter()
        .filter(|e| e.to == JobState::Queued)
        .count();
    assert_eq!(
        queued, 2,
        "submitted, then queued again once: {:#?}",
        view.events
    );
    server.stop().await;
}

#[tokio::test]
async fn a_batch_job_waits_for_a_cheaper_cluster_about_to_free_and_a_short_one_does_not() {
    // Nansha's one node (16 CNY) is busy for an hour; a dearer cluster beside it (24 CNY)
    // is free. A ten-hour batch job may wait two hours: it waits for Nansha. A ten-minute job
    // may wait two minutes: it takes the dear cluster now.
    let dir = tempfile::tempdir().unwrap();
    let two = ONE_CLUSTER
        .replace("nodes: 2,", "nodes: 1,")
        .replace(
            "offers:\n",
            "  - { name: tianhe-a800, site: guangzhou-nansha, provider: nansha-ai-center, engine: local, nodes: 1, accelerator: A800, accelerators_per_node: 8, cpus_per_node: 128, memory_gb_per_node: 1024 }\noffers:\n  - { cluster: tianhe-a800, price_per_accelerator_hour: \"24.00 CNY\" }\n",
        );
    let (server, operator) = serve_sites(dir.path(), &two, |_| {}).await;
    let lab = gz_lab(&operator).await;
    let _nansha = nansha_agent(&operator, 1).await;
    let _tianhe = register_agent(&operator, "tianhe-a800", 1).await;
    let job = |name: &str, duration: &str, extra: &str| {
        spec(&format!(
            "name: {name}\nresources: {{accelerators: {{A800: 8}}, nodes: 1}}\ncommand: 'sleep 1'\nestimated_duration: {duration}\n{extra}"
        ))
    };
    let submit = |s: JobSpec| {
        let lab = &lab;
        async move { lab.post::<_, JobView>("/api/v1/jobs", &s).await.unwrap() }
    };
    let first = submit(job("first", "1h", "")).await;
    let placed = wait_state(&lab, &first.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("nansha-a800"));
    // an interactive job never waits: it takes the dear cluster at once
    let hurried = submit(job("hurried", "10h", "latency_sensitive: true")).await;
    let placed = wait_state(&lab, &hurried.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("tianhe-a800"));
    let _: Value = lab
        .post(&format!("/api/v1/jobs/{}/cancel", hurried.id), &json!({}))
        .await
        .unwrap();
    wait_state(&lab, &hurried.id, JobState::Cancelled).await;
    // the batch job waits for Nansha though Tianhe is free again; its quote says so
    let quote: QuoteView = lab
        .post("/api/v1/jobs/quote", &job("patient", "10h", ""))
        .await
        .unwrap();
    assert_eq!(quote.chosen.as_deref(), Some("tianhe-a800"));
    assert!(
        quote.summary.starts_with("would wait for nansha-a800")
            && quote
                .summary
                .contains("1280.00 CNY in all against 1920.00 CNY on tianhe-a800"),
        "{}",
        quote.summary
    );
    let patient = submit(job("patient", "10h", "")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let view: JobView = lab
        .get(&format!("/api/v1/jobs/{}", patient.id))
        .await
        .unwrap();
    assert_eq!(view.state, JobState::Queued, "{view:#?}");
    // a short one may not wait an hour: it takes Tianhe
    let short = submit(job("short", "10m", "")).await;
    let placed = wait_state(&lab, &short.id, JobState::Placed).await;
    assert_eq!(placed.cluster.as_deref(), Some("tianhe-a800"));
    server.stop().await;
}
