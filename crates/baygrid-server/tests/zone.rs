//! The data zone through real HTTP: evidence records and cross-border flow decisions by
//! the rule pack, with export totals kept by the exchange and every decision in the log.

use baygrid_api::{Client, ClientError, EvidenceRecord, FlowDecisionView};
use baygrid_core::Role;
use baygrid_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

async fn serve(store: Option<String>, dir: &std::path::Path) -> RunningServer {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        store: store.unwrap_or_default(),
        ..ServerConfig::default()
    };
    baygrid_server::start(config).await.unwrap()
}

fn field_of<T: std::fmt::Debug>(result: Result<T, ClientError>, status: u16) -> Option<String> {
    match result {
        Err(ClientError::Api {
            status: got, field, ..
        }) if got == status => field,
        other => panic!("expected HTTP {status}, got {other:?}"),
    }
}

fn ask(subjects: u64) -> Value {
    json!({
        "exporter": "sz-clinic",
        "recipient": "hk-lab",
        "data": {"name": "patients-2026", "level": "general", "personal": "personal", "subjects": subjects,
                 "collected_abroad": false, "collection_purposes": ["research"], "arrived_under": ""},
        "flow": {"mode": "copy", "purpose": "research", "destination": "HK", "destination_city": "hong-kong"},
    })
}

async fn flows(store: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(store, dir.path()).await;
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    for party in [
        json!({"name": "sz-clinic", "jurisdiction": "CN", "city": "shenzhen"}),
        json!({"name": "hk-lab", "jurisdiction": "HK", "city": "hong-kong"}),
        json!({"name": "mo-bank", "jurisdiction": "MO", "city": "macao"}),
    ] {
        let _: Value = operator.post("/api/v1/parties", &party).await.unwrap();
    }
    let clinic = operator
        .issue(Role::DataHolder, Some("sz-clinic"))
        .await
        .unwrap();
    let bank = operator
        .issue(Role::DataHolder, Some("mo-bank"))
        .await
        .unwrap();

    // no basis yet: denied, with what would allow it
    let first: FlowDecisionView = clinic
        .post("/api/v1/flows/decide", &ask(50_000))
        .await
        .unwrap();
    assert!(!first.decision.allowed);
    assert_eq!(first.decision.denied_by, vec!["CN-CONSENT".to_string()]);
    assert!(first.decision.remedies[0].contains("separate_consent"));

    // bad requests name the field; another party's holder may not ask
    let mut bad = ask(10);
    bad["data"]["level"] = json!("secret");
    assert_eq!(
        field_of(
            clinic.post::<_, Value>("/api/v1/flows/decide", &bad).await,
            400
        )
        .as_deref(),
        Some("data.level")
    );
    let mut bad = ask(10);
    bad["recipient"] = json!("nobody");
    assert_eq!(
        field_of(
            clinic.post::<_, Value>("/api/v1/flows/decide", &bad).await,
            400
        )
        .as_deref(),
        Some("recipient")
    );
    let mut bad = ask(10);
    bad["flow"]["destination_city"] = json!("");
    assert_eq!(
        field_of(
            clinic.post::<_, Value>("/api/v1/flows/decide", &bad).await,
            400
        )
        .as_deref(),
        Some("flow.destination_city")
    );
    field_of(
        bank.post::<_, Value>("/api/v1/flows/decide", &ask(10))
            .await,
        403,
    );

    // evidence: validated, then on record
    let consent = json!({"kind": "separate_consent", "exporter": "sz-clinic", "recipient": "hk-lab", "effective": "2026-01-05"});
    let contract = json!({"id": "gba-sc-1", "kind": "gba_contract_hk", "exporter": "sz-clinic", "recipient": "hk-lab", "effective": "2026-01-05", "filed": "2026-01-12"});
    let mut bad = contract.clone();
    bad["filed"] = json!("soon");
    assert_eq!(
        field_of(clinic.post::<_, Value>("/api/v1/evidence", &bad).await, 400).as_deref(),
        Some("filed")
    );
    let assessment = json!({"kind": "security_assessment", "exporter": "sz-clinic", "recipient": "hk-lab", "effective": "2026-01-05"});
    assert_eq!(
        field_of(
            clinic
                .post::<_, Value>("/api/v1/evidence", &assessment)
                .await,
            400
        )
        .as_deref(),
        Some("dataset")
    );
    let mut bad = consent.clone();
    bad["recipient"] = json!("nobody");
    assert_eq!(
        field_of(clinic.post::<_, Value>("/api/v1/evidence", &bad).await, 400).as_deref(),
        Some("recipient")
    );
    field_of(
        bank.post::<_, Value>("/api/v1/evidence", &consent).await,
        403,
    );
    let recorded: EvidenceRecord = clinic.post("/api/v1/evidence", &consent).await.unwrap();
    assert!(!recorded.id.is_empty());
    let _: EvidenceRecord = clinic.post("/api/v1/evidence", &contract).await.unwrap();
    let seen: Vec<EvidenceRecord> = clinic.get("/api/v1/evidence").await.unwrap();
    assert_eq!(seen.len(), 2);
    let unseen: Vec<EvidenceRecord> = bank.get("/api/v1/evidence").await.unwrap();
    assert!(unseen.is_empty());

    // allowed now, and counted: the next flow sees the running total
    let allowed: FlowDecisionView = clinic
        .post("/api/v1/flows/decide", &ask(50_000))
        .await
        .unwrap();
    assert!(allowed.decision.allowed, "{:?}", allowed.decision);
    assert_eq!(allowed.exported_personal, 0);
    let next: FlowDecisionView = clinic
        .post("/api/v1/flows/decide", &ask(60_000))
        .await
        .unwrap();
    assert_eq!(next.exported_personal, 50_000);
    // 110,000 in the year: the contract band, met by the GBA contract
    assert!(next.decision.allowed, "{:?}", next.decision);
    assert!(next.decision.rules.iter().any(|r| r == "GBA-SC"));
    let third: FlowDecisionView = clinic.post("/api/v1/flows/decide", &ask(1)).await.unwrap();
    assert_eq!(third.exported_personal, 110_000);
    // a denied flow does not count
    assert_eq!(
        server
            .state
            .store
            .export_totals(
                "sz-clinic",
                chrono::Utc::now().format("%Y").to_string().parse().unwrap()
            )
            .await
            .unwrap(),
        (110_001, 0)
    );

    // what the allowed flows oblige, written with their decisions: the operator sees all,
    // the clinic its own, the bank none; each is due, overdue or standing today
    let all: Vec<Value> = operator.get("/api/v1/obligations").await.unwrap();
    let expected: usize = [&allowed, &next, &third]
        .iter()
        .map(|d| d.decision.obligations.len())
        .sum();
    assert!(expected > 0);
    assert_eq!(all.len(), expected, "{all:?}");
    let today = chrono::Utc::now().date_naive().to_string();
    for o in &all {
        assert_eq!(o["exporter"], "sz-clinic");
        let status = o["status"].as_str().unwrap();
        match o["due"].as_str() {
            None => assert_eq!(status, "standing"),
            Some(due) if due < today.as_str() => assert_eq!(status, "overdue"),
            Some(_) => assert_eq!(status, "due"),
        }
    }
    // oldest first, a page at a time
    let mut paged: Vec<Value> = Vec::new();
    loop {
        let after = paged
            .last()
            .map(|o| format!("&after={}", o["id"]))
            .unwrap_or_default();
        let page: Vec<Value> = operator
            .get(&format!("/api/v1/obligations?limit=2{after}"))
            .await
            .unwrap();
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert!(all
        .windows(2)
        .all(|w| w[0]["id"].as_i64() < w[1]["id"].as_i64()));
    assert_eq!(
        field_of(
            operator
                .get::<Vec<Value>>("/api/v1/obligations?after=first")
                .await,
            400
        )
        .as_deref(),
        Some("after")
    );
    let own: Vec<Value> = clinic.get("/api/v1/obligations").await.unwrap();
    assert_eq!(own.len(), all.len());
    let none: Vec<Value> = bank.get("/api/v1/obligations").await.unwrap();
    assert!(none.is_empty());
    let dated: Vec<Value> = operator
        .get("/api/v1/obligations?status=standing")
        .await
        .unwrap();
    // exactly the decisions' obligations with no date
    let undated: usize = [&allowed, &next, &third]
        .iter()
        .map(|d| {
            d.decision
                .obligations
                .iter()
                .filter(|o| o.due.is_none())
                .count()
        })
        .sum();
    assert!(undated > 0);
    assert_eq!(dated.len(), undated, "{dated:?}");
    assert!(dated.iter().all(|o| o["status"] == "standing"));
    for status in ["due", "overdue"] {
        let some: Vec<Value> = operator
            .get(&format!("/api/v1/obligations?status={status}"))
            .await
            .unwrap();
        let expected: Vec<&Value> = all.iter().filter(|o| o["status"] == status).collect();
        assert_eq!(some.iter().collect::<Vec<_>>(), expected, "{status}");
    }
    assert_eq!(
        field_of(
            operator
                .get::<Vec<Value>>("/api/v1/obligations?status=late")
                .await,
            400
        )
        .as_deref(),
        Some("status")
    );

    // every decision is in the audit log, with its rules
    let outbox = server.state.store.outbox_from(1, 100_000).await.unwrap();
    let decisions: Vec<_> = outbox
        .iter()
        .filter(|r| r.kind == "flow.decision")
        .collect();
    assert_eq!(decisions.len(), 4);
    assert_eq!(decisions[0].payload["allowed"], false);
    assert!(outbox
        .iter()
        .any(|r| r.kind == "catalog.put" && r.payload["kind"] == "evidence"));
    server.stop().await;
}

#[tokio::test]
async fn flows_on_sqlite() {
    flows(None).await;
}

#[tokio::test]
async fn flows_on_postgres() {
    let Some(url) = baygrid_store::testing::fresh_postgres_url().await else {
        return;
    };
    flows(Some(url)).await;
}
