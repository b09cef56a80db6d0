//! `baygrid bench query`: what enforcement and noise cost over plain DataFusion on the same
//! aggregate over a large seeded Parquet table, and a small query's latency end to end
//! through the API (server, agent at the vault, release), in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use baygrid_api::{Client, ColumnType, QueryTerms, QueryView};
use baygrid_core::{Jurisdiction, Role};
use baygrid_query::datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use baygrid_query::datafusion::arrow::datatypes::{DataType, Field, Schema};
use baygrid_query::datafusion::arrow::record_batch::RecordBatch;
use baygrid_query::datafusion::parquet::arrow::ArrowWriter;
use baygrid_query::datafusion::prelude::SessionContext;
use baygrid_query::Table;
use rand::{Rng, SeedableRng};

const REGIONS: [&str; 5] = ["guangzhou", "shenzhen", "hong-kong", "macao", "zhuhai"];

/// Writes `rows` rows of card payments: 3 to 5 rows per card holder, a region, an amount
/// and an age, from `seed`, card holder by card holder or (`shuffled`) in a seeded random
/// order. Returns the card holders written.
fn generate(
    path: &std::path::Path,
    rows: usize,
    seed: u64,
    shuffled: bool,
) -> anyhow::Result<usize> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("holder", DataType::Int64, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("age", DataType::Int64, false),
    ]));
    let file = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), None)?;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut holder = 0i64;
    let mut left_for_holder = 0u32;
    let mut region = 0usize;
    let mut age = 0i64;
    let mut written = 0;
    // shuffled: every row is drawn first, then written in a permuted order
    let chunk = if shuffled { rows.max(1) } else { 1 << 20 };
    while written < rows {
        let n = (rows - written).min(chunk);
        let mut holders = Vec::with_capacity(n);
        let mut regions = Vec::with_capacity(n);
        let mut amounts = Vec::with_capacity(n);
        let mut ages = Vec::with_capacity(n);
        for _ in 0..n {
            if left_for_holder == 0 {
                holder += 1;
                left_for_holder = rng.gen_range(3..=5);
                region = rng.gen_range(0..REGIONS.len());
                age = rng.gen_range(18..80);
            }
            left_for_holder -= 1;
            holders.push(holder);
            regions.push(REGIONS[region]);
            // payments skewed like spending: mostly small, a long tail
            let u: f64 = rng.gen_range(0.0001..1.0);
            amounts.push((-u.ln() * 300.0).min(20_000.0));
            ages.push(age);
        }
        let mut order: Vec<usize> = (0..n).collect();
        if shuffled {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rng);
        }
        for part in order.chunks(1 << 20) {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values(
                        part.iter().map(|&i| holders[i]),
                    )) as ArrayRef,
                    Arc::new(StringArray::from_iter_values(
                        part.iter().map(|&i| regions[i]),
                    )),
                    Arc::new(Float64Array::from_iter_values(
                        part.iter().map(|&i| amounts[i]),
                    )),
                    Arc::new(Int64Array::from_iter_values(part.iter().map(|&i| ages[i]))),
                ],
            )?;
            writer.write(&batch)?;
        }
        written += n;
    }
    writer.close()?;
    Ok(holder as usize)
}

fn table() -> Table {
    Table {
        name: "payments".into(),
        subject: "holder".into(),
        columns: vec![
            ("holder".into(), ColumnType::Int),
            ("region".into(), ColumnType::String),
            ("amount".into(), ColumnType::Float),
            ("age".into(), ColumnType::Int),
        ],
        terms: QueryTerms {
            k_min: 20,
            epsilon: 10.0,
            delta: 1e-5,
            refresh: "30days".into(),
            aggregates: vec!["count".into(), "sum".into(), "avg".into()],
            dimensions: vec!["region".into()],
            filters: vec!["age".into()],
            ranges: [("amount".to_string(), (0.0, 5000.0))].into(),
            max_rows_per_subject: 5,
            shared_epsilon: None,
            shared_delta: None,
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

pub async fn run(
    rows: usize,
    repeats: usize,
    api_queries: usize,
    shuffled: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("payments");
    std::fs::create_dir_all(&data)?;
    let started = Instant::now();
    let holders = generate(&data.join("part-0.parquet"), rows, 2026, shuffled)?;
    println!(
        "generated {rows} rows for {holders} card holders ({:.1} rows each{}) in {:.1} s",
        rows as f64 / holders as f64,
        if shuffled {
            ", shuffled"
        } else {
            ", holder by holder"
        },
        started.elapsed().as_secs_f64()
    );
    let table = table();
    let ctx = SessionContext::new();
    baygrid_query::register_files(&ctx, &table, &data).await?;
    let sql = "SELECT region, COUNT(*) AS payments, AVG(amount) AS mean_amount FROM payments WHERE age >= 30 GROUP BY region";
    let shape = baygrid_query::plan(sql, std::slice::from_ref(&table))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let side = shape.side("payments");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let (mut plain, mut private) = (Vec::new(), Vec::new());
    let mut released = 0;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let batches = ctx.sql(sql).await?.collect().await?;
        plain.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(batches.iter().map(|b| b.num_rows()).sum::<usize>() == REGIONS.len());
        let t = Instant::now();
        let answer = baygrid_query::answer(
            &ctx,
            &table,
            &side,
            baygrid_query::Privacy {
                epsilon: 1.0,
                delta: 1e-6,
                mechanism: baygrid_query::Mechanism::Laplace,
            },
            None,
            &mut rng,
        )
        .await?;
        private.push(t.elapsed().as_secs_f64());
        released = answer.groups.len();
    }
    let (p, q) = (median(plain), median(private));
    println!(
        "query over {rows} rows: plain DataFusion {:.0} ms, with bounding + distinct-individual threshold + noise {:.0} ms (median of {}); overhead {:.2}x; {released} of {} groups released",
        p * 1e3,
        q * 1e3,
        repeats.max(1),
        q / p,
        REGIONS.len()
    );
    if api_queries > 0 {
        api_latency(dir.path(), api_queries).await?;
    }
    Ok(())
}

/// Small queries through the API: a server and the Cyberport agent in this process, FATE's
/// default_credit guest table in the Hong Kong vault.
async fn api_latency(dir: &std::path::Path, count: usize) -> anyhow::Result<()> {
    let config = baygrid_server::ServerConfig {
        listen: "127.0.0.1:0".parse().expect("literal"),
        data_dir: dir.join("server"),
        sites_file: "sample".into(),
        ..baygrid_server::ServerConfig::default()
    };
    let server = baygrid_server::start(config).await?;
    let url = server.url();
    let operator = Client::new(&url, Some(server.operator_token.clone()));
    let _: serde_json::Value = operator
        .post(
            "/api/v1/parties",
            &serde_json::json!({"name": "hk-bank", "jurisdiction": "HK", "city": "hong-kong"}),
        )
        .await?;
    let bank = operator.issue(Role::DataHolder, Some("hk-bank")).await?;
    let spec: baygrid_api::DatasetSpec = serde_yaml::from_str(include_str!(
        "../../../examples/datasets/hk-credit-history.yaml"
    ))?;
    let _: serde_json::Value = bank.post("/api/v1/datasets", &spec).await?;
    let csv = std::path::Path::new("../shared/data/fate/default_credit_hetero_guest.csv");
    anyhow::ensure!(
        csv.exists(),
        "run from the repository root: {} is missing",
        csv.display()
    );
    baygrid_vault::upload(&bank, "hk-credit-history", &[csv.to_path_buf()]).await?;
    let mut offer: serde_json::Value = serde_yaml::from_str(include_str!(
        "../../../examples/data-offers/hk-credit-history.yaml"
    ))?;
    offer["query"]["epsilon"] = serde_json::json!(100.0);
    offer["query"]["shared_epsilon"] = serde_json::json!(100.0);
    let _: serde_json::Value = bank.post("/api/v1/data-offers", &offer).await?;
    let lab = operator
        .add_tenant(
            "bench-lab",
            Jurisdiction::HK,
            "hong-kong",
            "100000.00 CNY".parse()?,
        )
        .await?;
    let _: serde_json::Value = lab
        .post(
            "/api/v1/contracts",
            &serde_json::json!({"offer": "hk-credit-history-query", "mode": "query", "purpose": "credit_risk", "site": "hk-cyberport"}),
        )
        .await?;
    let issued = operator.issue(Role::Agent, Some("cyberport-h800")).await?;
    let agent_config = baygrid_agent::AgentConfig {
        max_running: 8,
        poll_interval: Duration::from_millis(500),
        ..baygrid_agent::AgentConfig::local(
            url,
            issued.token().map(str::to_string),
            dir.join("agent"),
        )
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(baygrid_agent::run(agent_config, stopped));
    let ask = serde_json::json!({
        "dataset": "hk-credit-history",
        "sql": "SELECT y, COUNT(*) AS n, AVG(x1) AS mean_x1 FROM hk_credit_history WHERE x0 > 0 GROUP BY y",
        "epsilon": 0.5,
    });
    // the first query stages the files into the agent's cache; it is timed apart
    let t = Instant::now();
    let first: QueryView = lab.post("/api/v1/queries", &ask).await?;
    let cold = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        first.state == baygrid_api::QueryState::Released,
        "the first query ended {:?}: {:?}",
        first.state,
        first.error
    );
    let mut times = Vec::new();
    for _ in 0..count {
        let t = Instant::now();
        let view: QueryView = lab.post("/api/v1/queries", &ask).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            view.state == baygrid_api::QueryState::Released,
            "{:?}",
            view.error
        );
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "end to end through the API ({count} queries over 30,000 rows, warm vault cache): p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; first (staging the files) {:.0} ms",
        at(0.5),
        at(0.95),
        times[times.len() - 1],
        cold * 1e3
    );
    let _ = stop.send(true);
    let _ = agent.await;
    server.stop().await;
    Ok(())
}
