//! Datasets in the data zone through real HTTP: registration (errors name the field, only
//! the holder registers, a dataset keeps its vault), the catalog for every role, and jobs
//! that read a Hong Kong and a Shenzhen dataset placed only where both may be copied.

use baygrid_api::{
    Client, ClientError, DatasetSpec, DatasetView, NewVersion, QuoteView, VaultView,
};
use baygrid_core::{JobSpec, Jurisdiction, Role};
use baygrid_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

async fn serve(store: Option<String>, dir: &std::path::Path) -> RunningServer {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        store: store.unwrap_or_default(),
        sites_file: "sample".into(),
        ..ServerConfig::default()
    };
    baygrid_server::start(config).await.unwrap()
}

fn error_of<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    status: u16,
) -> (Option<String>, String) {
    match result {
        Err(ClientError::Api {
            status: got,
            field,
            message,
            ..
        }) if got == status => (field, message),
        other => panic!("expected HTTP {status}, got {other:?}"),
    }
}

fn example(name: &str) -> DatasetSpec {
    let path = format!(
        "{}/../../examples/datasets/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn offer(name: &str) -> Value {
    let path = format!(
        "{}/../../examples/data-offers/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn job(extra: &str) -> JobSpec {
    JobSpec::from_yaml(&format!(
        "name: credit-model\n\
         resources: {{accelerators: [{{H800: 1}}, {{Ascend910B: 1}}, {{A800: 1}}, {{A100: 1}}]}}\n\
         command: 'true'\nestimated_duration: 10m\n\
         inputs: [sz-credit-labels, hk-card-features]\n{extra}"
    ))
    .unwrap()
}

/// Site → (verdict, field, reason) from a quote.
fn verdicts(
    quote: &QuoteView,
) -> std::collections::BTreeMap<String, (String, Option<String>, String)> {
    quote
        .quote
        .candidates
        .iter()
        .map(|c| {
            let v = serde_json::to_value(c).unwrap();
            (
                c.site.clone(),
                (
                    v["verdict"].as_str().unwrap().to_string(),
                    v["field"].as_str().map(str::to_string),
                    v["reason"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

async fn datasets(store: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(store, dir.path()).await;
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
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
    let regulator = operator.issue(Role::Regulator, None).await.unwrap();

    // registration: the holder registers its own; errors name the field
    let mut sz = example("sz-credit-labels");
    // declared short of the 30,000 card holders its file holds: the rules count the file's
    sz.subjects = 20_000;
    let hk = example("hk-card-features");
    let (field, _) = error_of(
        issuer.post::<_, DatasetView>("/api/v1/datasets", &sz).await,
        403,
    );
    assert_eq!(field, None);
    let view: DatasetView = lender.post("/api/v1/datasets", &sz).await.unwrap();
    assert_eq!(view.jurisdiction, Jurisdiction::CN);
    let view: DatasetView = issuer.post("/api/v1/datasets", &hk).await.unwrap();
    assert_eq!(view.jurisdiction, Jurisdiction::HK);
    let mut bad = serde_json::to_value(&hk).unwrap();
    bad["vault"] = json!("atlantis");
    let (field, _) = error_of(issuer.post::<_, Value>("/api/v1/datasets", &bad).await, 400);
    assert_eq!(field.as_deref(), Some("vault"));
    let mut bad = serde_json::to_value(&hk).unwrap();
    bad["level"] = json!("secret");
    let (field, _) = error_of(issuer.post::<_, Value>("/api/v1/datasets", &bad).await, 400);
    assert_eq!(field.as_deref(), Some("level"));
    let mut bad = serde_json::to_value(&hk).unwrap();
    bad["subject_column"] = json!("card_no");
    let (field, _) = error_of(issuer.post::<_, Value>("/api/v1/datasets", &bad).await, 400);
    assert_eq!(field.as_deref(), Some("subject_column"));
    let mut moved = hk.clone();
    moved.vault = "shenzhen-qianhai".into();
    let (_, message) = error_of(
        issuer.post::<_, Value>("/api/v1/datasets", &moved).await,
        409,
    );
    assert!(message.contains("moving data is a flow"), "{message}");
    let (_, _) = error_of(lab.post::<_, Value>("/api/v1/datasets", &hk).await, 403);

    // the catalog: metadata for every role
    for client in [&lab, &regulator, &lender, &operator] {
        let all: Vec<DatasetView> = client.get("/api/v1/datasets").await.unwrap();
        let names: Vec<&str> = all.iter().map(|d| d.spec.name.as_str()).collect();
        assert_eq!(names, ["hk-card-features", "sz-credit-labels"]);
        let one: DatasetView = client
            .get("/api/v1/datasets/sz-credit-labels")
            .await
            .unwrap();
        assert_eq!(one.spec, sz);
    }
    error_of(lab.get::<DatasetView>("/api/v1/datasets/nope").await, 404);

    // uploads: the holder streams the real tables into its vault, then records the version
    for (holder, name, file) in [
        (
            &lender,
            "sz-credit-labels",
            "default_credit_hetero_guest.csv",
        ),
        (
            &issuer,
            "hk-card-features",
            "default_credit_hetero_host.csv",
        ),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/fate")
            .join(file);
        let version = baygrid_vault::upload(holder, name, &[path]).await.unwrap();
        assert_eq!((version.version, version.rows), (1, 30000));
        assert_eq!(
            version.subjects,
            Some(30000),
            "distinct `id`s counted at upload"
        );
    }
    let view: DatasetView = lab.get("/api/v1/datasets/sz-credit-labels").await.unwrap();
    assert_eq!(view.spec.subjects, 20_000);
    assert_eq!(view.spec.subjects_in(&view.versions), 30_000);
    let view: DatasetView = lab.get("/api/v1/datasets/hk-card-features").await.unwrap();
    assert_eq!(view.versions.len(), 1);
    let recorded = view.versions[0].clone();
    let again = NewVersion {
        upload: recorded.upload.clone(),
        files: recorded.files.clone(),
        subjects: recorded.subjects,
    };
    // a version of a dataset with a subject column says how many individuals it holds, and
    // no more than its rows
    for (subjects, message) in [
        (None, "count the distinct values of `id`"),
        (Some(30_001), "30001 individuals in 30000 rows"),
    ] {
        let new = NewVersion {
            upload: "up-counted".into(),
            subjects,
            ..again.clone()
        };
        let (field, got) = error_of(
            issuer
                .post::<_, Value>("/api/v1/datasets/hk-card-features/versions", &new)
                .await,
            400,
        );
        assert_eq!(field.as_deref(), Some("subjects"));
        assert!(got.contains(message), "{got}");
    }
    // the same upload twice, another party's holder, a tenant, a malformed digest
    error_of(
        issuer
            .post::<_, Value>("/api/v1/datasets/hk-card-features/versions", &again)
            .await,
        409,
    );
    error_of(
        lender
            .post::<_, Value>("/api/v1/datasets/hk-card-features/versions", &again)
            .await,
        403,
    );
    error_of(lab.get::<Vec<VaultView>>("/api/v1/vaults").await, 403);
    // a regulator reads the record (evidence, contracts, flows, obligations) but is never
    // told where the bytes are, so it never reads raw data
    error_of(regulator.get::<Vec<VaultView>>("/api/v1/vaults").await, 403);
    for path in [
        "/api/v1/evidence",
        "/api/v1/contracts",
        "/api/v1/flows",
        "/api/v1/obligations",
    ] {
        let _: Vec<Value> = regulator.get(path).await.unwrap();
    }
    error_of(
        regulator
            .post::<_, Value>(
                "/api/v1/flows",
                &json!({"dataset": "hk-card-features", "site": "shaoguan", "purpose": "credit_risk"}),
            )
            .await,
        403,
    );
    let mut bad = serde_json::to_value(&again).unwrap();
    bad["upload"] = json!("up-2");
    bad["files"][0]["sha256"] = json!("xyz");
    let (field, _) = error_of(
        issuer
            .post::<_, Value>("/api/v1/datasets/hk-card-features/versions", &bad)
            .await,
        400,
    );
    assert_eq!(field.as_deref(), Some("files[0].sha256"));

    // data offers: the holder publishes; errors name the field; every role reads them
    let hk_offer = offer("hk-card-features");
    let sz_offer = offer("sz-credit-labels");
    error_of(
        lender
            .post::<_, Value>("/api/v1/data-offers", &hk_offer)
            .await,
        403,
    );
    let view: Value = issuer.post("/api/v1/data-offers", &hk_offer).await.unwrap();
    assert_eq!(view["holder"], "hk-card-issuer");
    let _: Value = lender.post("/api/v1/data-offers", &sz_offer).await.unwrap();
    for (path, value, field) in [
        ("/query/k_min", json!(5), "query.k_min"),
        ("/price/per_use", json!("80.00 CNY"), "price.per_use"),
        ("/expires", json!("2020-01-01"), "expires"),
        ("/query/filters/0", json!("id"), "query.filters[0]"),
        ("/query/filters/0", json!("x99"), "query.filters[0]"),
        (
            "/query/aggregates/0",
            json!("median"),
            "query.aggregates[0]",
        ),
        ("/query/ranges/x1", json!([3.0, -3.0]), "query.ranges.x1"),
        ("/modes/1", json!("copy"), "modes[1]"),
    ] {
        let mut bad = hk_offer.clone();
        *bad.pointer_mut(path).unwrap() = value;
        let (got, message) = error_of(
            issuer.post::<_, Value>("/api/v1/data-offers", &bad).await,
            400,
        );
        assert_eq!(got.as_deref(), Some(field), "{path}: {message}");
    }
    for client in [&lab, &regulator, &lender] {
        let offers: Vec<Value> = client.get("/api/v1/data-offers").await.unwrap();
        assert_eq!(offers.len(), 2);
    }

    // contracts: the rules decide each request, and the contract records the decision
    let ask = |offer: &str, mode: &str, site: &str| json!({"offer": offer, "mode": mode, "purpose": "credit_risk", "site": site});
    let federated: Value = lab
        .post(
            "/api/v1/contracts",
            &ask("hk-card-features-risk", "federated", "shenzhen-qianhai"),
        )
        .await
        .unwrap();
    assert_eq!(federated["state"], "pending", "{federated}");
    assert_eq!(federated["decision"]["allowed"], true);
    let id = federated["id"].as_str().unwrap().to_string();
    // the other holder cannot see it, a regulator can but may not revoke it
    error_of(
        lender
            .post::<_, Value>(&format!("/api/v1/contracts/{id}/approve"), &json!({}))
            .await,
        404,
    );
    let seen: Vec<Value> = regulator.get("/api/v1/contracts").await.unwrap();
    assert_eq!(seen.len(), 1);
    error_of(
        regulator
            .post::<_, Value>(&format!("/api/v1/contracts/{id}/revoke"), &json!({}))
            .await,
        403,
    );
    let approved: Value = issuer
        .post(&format!("/api/v1/contracts/{id}/approve"), &json!({}))
        .await
        .unwrap();
    assert_eq!(approved["state"], "active");
    let revoked: Value = lab
        .post(&format!("/api/v1/contracts/{id}/revoke"), &json!({}))
        .await
        .unwrap();
    assert_eq!(revoked["state"], "revoked");
    error_of(
        lab.post::<_, Value>(&format!("/api/v1/contracts/{id}/revoke"), &json!({}))
            .await,
        409,
    );
    // a mode, purpose or site the offer does not allow is refused by name
    for (bad, field) in [
        (
            ask("hk-card-features-risk", "remote_access", "shaoguan"),
            "mode",
        ),
        (ask("hk-card-features-risk", "query", "macao"), "site"),
        (ask("nope", "query", "shaoguan"), "offer"),
    ] {
        let (got, _) = error_of(lab.post::<_, Value>("/api/v1/contracts", &bad).await, 400);
        assert_eq!(got.as_deref(), Some(field));
    }
    let mut purpose = ask("hk-card-features-risk", "query", "shaoguan");
    purpose["purpose"] = json!("marketing");
    let (got, _) = error_of(
        lab.post::<_, Value>("/api/v1/contracts", &purpose).await,
        400,
    );
    assert_eq!(got.as_deref(), Some("purpose"));
    // the lender's offer approves itself when the rules allow: a mainland copy is active at
    // once; a copy to Hong Kong is denied, naming what would allow it
    let mainland: Value = lab
        .post(
            "/api/v1/contracts",
            &ask("sz-credit-labels-copy", "copy", "shaoguan"),
        )
        .await
        .unwrap();
    assert_eq!(mainland["state"], "active", "{mainland}");
    let abroad: Value = lab
        .post(
            "/api/v1/contracts",
            &ask("sz-credit-labels-copy", "copy", "hk-cyberport"),
        )
        .await
        .unwrap();
    assert_eq!(abroad["state"], "denied", "{abroad}");
    assert_eq!(abroad["decision"]["denied_by"], json!(["CN-CONSENT"]));
    assert!(abroad["decision"]["remedies"][0]
        .as_str()
        .unwrap()
        .contains("separate_consent"));
    let mine: Vec<Value> = lab.get("/api/v1/contracts").await.unwrap();
    assert_eq!(mine.len(), 3);
    let theirs: Vec<Value> = issuer.get("/api/v1/contracts").await.unwrap();
    assert_eq!(theirs.len(), 1);

    // the job below reads both tables: it needs a copy contract for each at a site
    let contract_at = |offer: &'static str, site: &'static str, purpose: &'static str| {
        let lab = lab.clone();
        let issuer = issuer.clone();
        async move {
            let made: Value = lab
                .post(
                    "/api/v1/contracts",
                    &json!({"offer": offer, "mode": "copy", "purpose": purpose, "site": site}),
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
            made
        }
    };
    // without a contract a site is ruled out, naming the holder
    let quote: QuoteView = lab
        .post("/api/v1/jobs/quote", &job("purpose: credit_risk\n"))
        .await
        .unwrap();
    let (verdict, field, reason) = &verdicts(&quote)["guangzhou-nansha"];
    assert_eq!(verdict, "rejected");
    assert_eq!(field.as_deref(), Some("inputs"));
    assert!(
        reason.contains("no active copy or remote_access contract with sz-lender"),
        "{reason}"
    );
    for site in [
        "shaoguan",
        "shenzhen-qianhai",
        "guangzhou-nansha",
        "zhuhai-hengqin",
    ] {
        contract_at("sz-credit-labels-copy", site, "credit_risk").await;
        contract_at("hk-card-features-risk", site, "credit_risk").await;
    }

    // a job reading both: the Shenzhen lender's personal data may not leave the mainland
    // without the individuals' separate consent, so Hong Kong and Macao are ruled out by
    // the rules, naming the input and what would allow it; every mainland site may take both
    let quote: QuoteView = lab
        .post("/api/v1/jobs/quote", &job("purpose: credit_risk\n"))
        .await
        .unwrap();
    let sites = verdicts(&quote);
    for site in ["hk-cyberport", "macao"] {
        let (verdict, field, reason) = &sites[site];
        assert_eq!(verdict, "rejected", "{site}: {reason}");
        assert_eq!(field.as_deref(), Some("inputs"), "{site}: {reason}");
        assert!(reason.contains("`sz-credit-labels`"), "{reason}");
        assert!(reason.contains("CN-CONSENT"), "{reason}");
        assert!(reason.contains("separate_consent"), "{reason}");
        assert!(
            !reason.contains("`hk-card-features` may not be copied"),
            "{reason}"
        );
    }
    for site in [
        "shaoguan",
        "shenzhen-qianhai",
        "guangzhou-nansha",
        "zhuhai-hengqin",
    ] {
        let (verdict, field, reason) = &sites[site];
        assert_ne!(verdict, "rejected", "{site}: {reason}");
        assert_ne!(field.as_deref(), Some("inputs"), "{site}: {reason}");
    }
    // each candidate's total is its compute, the staging of both tables from their vaults
    // (megabytes, so under a fen at the sample prices) and the green term (weight 0)
    for c in quote
        .quote
        .candidates
        .iter()
        .filter(|c| c.verdict != "rejected")
    {
        let part = |m: Option<baygrid_core::Money>| m.unwrap_or_else(|| panic!("{c:?}")).minor;
        assert_eq!(
            part(c.total_cost_cny),
            part(c.estimated_cost_cny) + part(c.transfer_cost_cny) + part(c.green_cost_cny),
            "{c:?}"
        );
        assert_eq!(part(c.green_cost_cny), 0);
    }

    // kept to Hong Kong, the job cannot run anywhere: rejected at submit with the reasons
    let hk_only = job("purpose: credit_risk\nallowed_jurisdictions: [HK]\n");
    let (_, message) = error_of(lab.post::<_, Value>("/api/v1/jobs", &hk_only).await, 422);
    assert!(message.contains("CN-CONSENT"), "{message}");

    // with the individuals' consent and a filed GBA standard contract, Hong Kong may take it
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
    let quote: QuoteView = lab.post("/api/v1/jobs/quote", &hk_only).await.unwrap();
    let (verdict, _, reason) = &verdicts(&quote)["hk-cyberport"];
    assert_eq!(verdict, "rejected", "{reason}");
    assert!(reason.contains("contract"), "{reason}");
    for offer in ["sz-credit-labels-copy", "hk-card-features-risk"] {
        let made = contract_at(offer, "hk-cyberport", "credit_risk").await;
        assert_ne!(made["state"], "denied", "{made}");
        if offer == "sz-credit-labels-copy" {
            // the lender declared 20,000 card holders; its file holds 30,000, and the
            // export totals count those
            assert_eq!(
                made["decision"]["counts"],
                json!(["personal", 30000]),
                "{made}"
            );
        }
    }
    let quote: QuoteView = lab.post("/api/v1/jobs/quote", &hk_only).await.unwrap();
    let sites = verdicts(&quote);
    let (verdict, _, reason) = &sites["hk-cyberport"];
    assert_ne!(verdict, "rejected", "{reason}");

    // a purpose the card data was not collected for: Hong Kong's DPP3 keeps it home
    // without prescribed consent, so only the Hong Kong site (where the lender's data may
    // now go) is left, and there the lab has no contract for this purpose
    let quote: QuoteView = lab
        .post("/api/v1/jobs/quote", &job("purpose: marketing\n"))
        .await
        .unwrap();
    for (site, (verdict, field, reason)) in verdicts(&quote) {
        if site == "hk-cyberport" {
            assert_eq!(verdict, "rejected", "{reason}");
            assert!(reason.contains("contract"), "{reason}");
            assert!(!reason.contains("HK-DPP3"), "{reason}");
        } else {
            assert_eq!(field.as_deref(), Some("inputs"), "{site}: {reason}");
            assert!(reason.contains("`hk-card-features`"), "{reason}");
            assert!(reason.contains("HK-DPP3"), "{reason}");
            assert!(reason.contains("hk_prescribed_consent"), "{reason}");
        }
    }

    // an unknown input names its place in the spec
    let mut unknown = job("purpose: credit_risk\n");
    unknown.inputs[1] = "nope".into();
    let (field, _) = error_of(lab.post::<_, Value>("/api/v1/jobs", &unknown).await, 400);
    assert_eq!(field.as_deref(), Some("inputs[1]"));

    // registrations are in the audit log's outbox
    let outbox = server.state.store.outbox_from(1, 100_000).await.unwrap();
    assert!(outbox
        .iter()
        .any(|r| r.kind == "catalog.put" && r.payload["kind"] == "dataset"));
    // every contract write is in the log with the decision it carries
    let denied = outbox
        .iter()
        .find(|r| {
            r.kind == "catalog.put"
                && r.payload["kind"] == "contract"
                && r.payload["body"]["state"] == "denied"
        })
        .unwrap();
    assert_eq!(
        denied.payload["body"]["decision"]["denied_by"],
        json!(["CN-CONSENT"])
    );
    server.stop().await;
}

#[tokio::test]
async fn datasets_on_sqlite() {
    datasets(None).await;
}

#[tokio::test]
async fn datasets_on_postgres() {
    let Some(url) = baygrid_store::testing::fresh_postgres_url().await else {
        return;
    };
    datasets(Some(url)).await;
}
