use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use baygrid_api::{ColumnType, QueryTerms};
use datafusion::prelude::SessionContext;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::*;

fn fate(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fate")
        .join(file)
}

fn terms(k: u32, m: u32) -> QueryTerms {
    QueryTerms {
        k_min: k,
        epsilon: 10.0,
        delta: 1e-5,
        refresh: "30days".into(),
        aggregates: vec!["count".into(), "sum".into(), "avg".into()],
        dimensions: vec!["y".into()],
        filters: vec!["x0".into(), "x1".into()],
        ranges: BTreeMap::from([("x1".into(), (-3.0, 3.0)), ("x3".into(), (-3.0, 3.0))]),
        max_rows_per_subject: m,
        shared_epsilon: None,
        shared_delta: None,
    }
}

/// FATE's default-credit guest table (30,000 card holders; `id` the subject).
fn guest() -> Table {
    let mut columns = vec![
        ("id".to_string(), ColumnType::String),
        ("y".to_string(), ColumnType::Int),
    ];
    columns.extend((0..13).map(|i| (format!("x{i}"), ColumnType::Float)));
    Table {
        name: "guest".into(),
        subject: "id".into(),
        columns,
        terms: terms(10, 1),
    }
}

fn host() -> Table {
    let mut columns = vec![("id".to_string(), ColumnType::String)];
    columns.extend((0..10).map(|i| (format!("x{i}"), ColumnType::Float)));
    let mut terms = terms(20, 1);
    terms.dimensions = vec![];
    terms.filters = vec!["x2".into()];
    Table {
        name: "host".into(),
        subject: "id".into(),
        columns,
        terms,
    }
}

async fn refused(sql: &str) -> Refusal {
    match plan(sql, &[guest(), host()]).await {
        Ok(shape) => panic!("`{sql}` was accepted as {shape:?}"),
        Err(r) => r,
    }
}

#[tokio::test]
async fn adversarial_queries_are_refused_with_a_reason() {
    let cases: &[(&str, &str)] = &[
        ("SELECT * FROM guest", "must be an aggregate"),
        ("SELECT id FROM guest", "must be an aggregate"),
        ("SELECT x1, y FROM guest WHERE x0 > 0", "must be an aggregate"),
        ("SELECT id, COUNT(*) FROM guest GROUP BY id", "subject column"),
        ("SELECT x2, COUNT(*) FROM guest GROUP BY x2", "not a dimension"),
        (
            "SELECT COUNT(*) FROM guest WHERE x0 > (SELECT AVG(x0) FROM guest)",
            "subqueries",
        ),
        (
            "SELECT (SELECT COUNT(*) FROM guest) AS n FROM guest",
            "aggregate",
        ),
        ("SELECT COUNT(*) FROM guest WHERE my_udf(x0) > 1", "does not plan"),
        ("SELECT COUNT(*) FROM guest WHERE coalesce(x0, 0) > 1", "function `coalesce`"),
        ("SELECT COUNT(*) FROM guest; SELECT COUNT(*) FROM host", "one statement per query"),
        ("SELEC COUNT(*) FROM guest", "does not parse"),
        ("SELECT COUNT(* FROM guest", "does not parse"),
        ("", "no statement"),
        ("DROP TABLE guest", "only a SELECT"),
        ("SELECT y, COUNT(*) FROM guest GROUP BY y HAVING COUNT(*) > 5", "HAVING"),
        ("SELECT y, COUNT(*) FROM guest GROUP BY y ORDER BY y", "ORDER BY"),
        ("SELECT COUNT(*) FROM guest LIMIT 1", "LIMIT"),
        ("SELECT COUNT(DISTINCT x1) FROM guest", "counts individuals only"),
        ("SELECT SUM(x2) FROM guest", "no declared range"),
        ("SELECT MAX(x1) FROM guest", "not allowed"),
        ("SELECT COUNT(*) FROM guest WHERE x5 > 0", "not a column the offer"),
        ("SELECT COUNT(*) * 2 FROM guest", "no arithmetic"),
        (
            "SELECT guest.y, AVG(host.x3) FROM guest JOIN host ON guest.id = host.id GROUP BY guest.y",
            "per-row linkage",
        ),
        (
            "SELECT COUNT(*) FROM guest JOIN host ON guest.x1 = host.x1",
            "subject columns",
        ),
        (
            "SELECT COUNT(*) FROM guest LEFT JOIN host ON guest.id = host.id",
            "inner join",
        ),
        (
            "SELECT COUNT(*) FROM guest JOIN host ON guest.id = host.id WHERE guest.x0 > host.x2",
            "per-row linkage",
        ),
        ("SELECT COUNT(*) FROM guest g", "aliases"),
        ("SELECT y, COUNT(*) FROM guest GROUP BY ROLLUP(y)", "ROLLUP"),
        ("SELECT COUNT(*) FROM (SELECT * FROM guest) s", "subqueries"),
    ];
    for (sql, reason) in cases {
        let r = refused(sql).await;
        let text = r.to_string();
        assert!(
            text.contains(reason),
            "`{sql}`: expected a reason with `{reason}`, got `{text}`"
        );
    }
    // the reason names the offending expression
    let r = refused("SELECT id, COUNT(*) FROM guest GROUP BY id").await;
    assert_eq!(r.expression.as_deref(), Some("guest.id"));
    let r = refused("SELECT COUNT(*) FROM guest WHERE coalesce(x0, 0) > 1").await;
    assert!(r.expression.unwrap().contains("coalesce"));
}

#[tokio::test]
async fn accepted_shapes_say_what_each_side_answers() {
    let shape = plan(
        "SELECT y AS label, COUNT(*) AS n, AVG(x1) FROM guest WHERE x0 > 0 AND x1 BETWEEN -1 AND 1 GROUP BY y",
        &[guest()],
    )
    .await
    .unwrap();
    assert_eq!(shape.tables, vec!["guest"]);
    let names: Vec<_> = shape.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, vec!["label", "n", "avg(x1)"]);
    let side = shape.side("guest");
    assert_eq!(side.dimensions, vec!["y"]);
    assert_eq!(
        side.aggregates,
        vec![Aggregate::Count, Aggregate::Avg("x1".into())]
    );
    assert_eq!(side.shares(), 1 + 1 + 2);
    let filter = side.filter.unwrap();
    assert!(
        filter.contains("x0 > 0") && filter.contains("BETWEEN"),
        "{filter}"
    );
    let cost = cost(&shape, 1.0, 1e-7, Mechanism::Laplace);
    assert_eq!(cost[0].delta, 1e-7);

    let joined = plan(
        "SELECT COUNT(*) AS n, AVG(guest.x1) AS a, AVG(host.x3) AS b, COUNT(DISTINCT host.id) FROM guest JOIN host ON guest.id = host.id WHERE host.x2 > 0",
        &[guest(), host()],
    )
    .await
    .unwrap();
    assert_eq!(joined.tables, vec!["guest", "host"]);
    assert_eq!(
        joined.side("host").aggregates,
        vec![Aggregate::Avg("x3".into()), Aggregate::Subjects]
    );
    assert_eq!(joined.side("host").filter.as_deref(), Some("((x2 > 0))"));
    assert_eq!(joined.side("guest").filter, None);
    // ungrouped: no δ spent
    assert_eq!(
        super::cost(&joined, 1.0, 1e-7, Mechanism::Laplace)[1].delta,
        0.0
    );
    // Gaussian noise spends δ even without grouping
    assert_eq!(
        super::cost(&joined, 1.0, 1e-7, Mechanism::Gaussian)[1].delta,
        1e-7
    );
}

async fn context(table: &Table, dir: &Path) -> SessionContext {
    let ctx = SessionContext::new();
    register_files(&ctx, table, dir).await.unwrap();
    ctx
}

fn write_csv(dir: &Path, header: &str, rows: impl IntoIterator<Item = String>) {
    let mut text = format!("{header}\n");
    for row in rows {
        text.push_str(&row);
        text.push('\n');
    }
    std::fs::write(dir.join("part-0.csv"), text).unwrap();
}

fn small(k: u32, m: u32) -> Table {
    Table {
        name: "t".into(),
        subject: "id".into(),
        columns: vec![
            ("id".into(), ColumnType::String),
            ("g".into(), ColumnType::String),
            ("v".into(), ColumnType::Float),
        ],
        terms: QueryTerms {
            dimensions: vec!["g".into()],
            filters: vec!["v".into()],
            ranges: BTreeMap::from([("v".into(), (0.0, 10.0))]),
            ..terms(k, m)
        },
    }
}

fn laplace(epsilon: f64) -> Privacy {
    Privacy {
        epsilon,
        delta: 1e-6,
        mechanism: Mechanism::Laplace,
    }
}

async fn run(table: &Table, dir: &Path, sql: &str, epsilon: f64, seed: u64) -> Released {
    let shape = plan(sql, std::slice::from_ref(table)).await.unwrap();
    let ctx = context(table, dir).await;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let side = shape.side(&table.name);
    let a = answer(&ctx, table, &side, laplace(epsilon), None, &mut rng)
        .await
        .unwrap();
    assemble(&shape, &[a]).unwrap()
}

#[tokio::test]
async fn groups_below_k_are_suppressed_on_the_exact_boundary() {
    // groups of k-1, k and k+1 individuals, noise made tiny with a large ε
    let k = 10;
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let mut id = 0;
    for (group, size) in [("below", k - 1), ("at", k), ("above", k + 1)] {
        for _ in 0..size {
            rows.push(format!("s{id},{group},1.0"));
            id += 1;
        }
    }
    write_csv(dir.path(), "id,g,v", rows);
    let table = small(k, 1);
    let mut at = 0;
    let runs = 400;
    for seed in 0..runs {
        let r = run(
            &table,
            dir.path(),
            "SELECT g, COUNT(*) FROM t GROUP BY g",
            100.0,
            seed,
        )
        .await;
        let groups: Vec<&str> = r.rows.iter().map(|row| row[0].as_str().unwrap()).collect();
        assert!(!groups.contains(&"below"), "seed {seed}: {groups:?}");
        assert!(groups.contains(&"above"), "seed {seed}: {groups:?}");
        at += groups.contains(&"at") as u32;
        // the released rows never tell how many groups were held back
        assert_eq!(r.columns, vec!["g", "count(*)"]);
    }
    // exactly k: the noisy count is above k half the time
    let expected = runs as f64 * noise::release_probability(k as f64, k as f64, 1.0 / 50.0);
    let sd = (runs as f64 * 0.25).sqrt();
    assert!(
        (at as f64 - expected).abs() < 4.0 * sd,
        "released at k {at} of {runs} times, expected about {expected}"
    );
}

#[tokio::test]
async fn an_ungrouped_answer_below_k_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_csv(dir.path(), "id,g,v", (0..9).map(|i| format!("s{i},a,1")));
    let r = run(
        &small(10, 1),
        dir.path(),
        "SELECT COUNT(*) FROM t",
        100.0,
        1,
    )
    .await;
    assert!(r.rows.is_empty());
    let empty = tempfile::tempdir().unwrap();
    write_csv(empty.path(), "id,g,v", std::iter::empty());
    let r = run(
        &small(10, 1),
        empty.path(),
        "SELECT COUNT(*) FROM t",
        100.0,
        1,
    )
    .await;
    assert!(r.rows.is_empty());
}

#[tokio::test]
async fn each_individual_counts_at_most_max_rows_per_subject() {
    // 20 individuals with one row each and one with 1,000 rows of the top value
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<String> = (0..20).map(|i| format!("s{i},a,5")).collect();
    rows.extend((0..1000).map(|_| "heavy,a,1000".to_string()));
    write_csv(dir.path(), "id,g,v", rows);
    let table = small(10, 3);
    let r = run(
        &table,
        dir.path(),
        "SELECT COUNT(*) AS n, SUM(v) AS s, AVG(v) AS a, COUNT(DISTINCT id) AS people FROM t",
        100.0,
        7,
    )
    .await;
    let row = &r.rows[0];
    let n = row[0].as_f64().unwrap();
    let s = row[1].as_f64().unwrap();
    let a = row[2].as_f64().unwrap();
    let people = row[3].as_f64().unwrap();
    // 20 + 3 rows; 20·5 + 3·10 (clamped to 10)
    assert!((n - 23.0).abs() <= 2.0, "{n}");
    assert!((s - 130.0).abs() < 10.0, "{s}");
    assert!((a - 130.0 / 23.0).abs() < 0.5, "{a}");
    assert!((people - 21.0).abs() <= 1.0, "{people}");
}

#[tokio::test]
async fn an_individual_in_many_groups_counts_in_at_most_m_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for g in 0..50 {
        for i in 0..12 {
            rows.push(format!("p{g}-{i},g{g},1"));
        }
        rows.push(format!("roamer,g{g},1"));
    }
    write_csv(dir.path(), "id,g,v", rows);
    let table = small(10, 2);
    let ctx = context(&table, dir.path()).await;
    let shape = plan(
        "SELECT g, COUNT(DISTINCT id) FROM t GROUP BY g",
        std::slice::from_ref(&table),
    )
    .await
    .unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let a = answer(
        &ctx,
        &table,
        &shape.side("t"),
        laplace(100.0),
        None,
        &mut rng,
    )
    .await
    .unwrap();
    assert_eq!(a.groups.len(), 50);
    let with_roamer = a.groups.iter().filter(|g| g.subjects > 12.5).count();
    assert_eq!(with_roamer, 2);
}

#[test]
fn laplace_draws_match_their_scale() {
    // Kolmogorov–Smirnov against the Laplace CDF, and the moments, with a fixed seed
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let b = 2.5;
    let n = 200_000;
    let mut draws: Vec<f64> = (0..n).map(|_| noise::laplace(&mut rng, b)).collect();
    let mean = draws.iter().sum::<f64>() / n as f64;
    let mean_abs = draws.iter().map(|x| x.abs()).sum::<f64>() / n as f64;
    let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.03, "mean {mean}");
    assert!((mean_abs / b - 1.0).abs() < 0.01, "E|x| {mean_abs}");
    assert!((var / (2.0 * b * b) - 1.0).abs() < 0.02, "var {var}");
    draws.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let cdf = |x: f64| {
        if x < 0.0 {
            0.5 * (x / b).exp()
        } else {
            1.0 - 0.5 * (-x / b).exp()
        }
    };
    let d = draws
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let f = cdf(*x);
            (f - i as f64 / n as f64)
                .abs()
                .max(((i + 1) as f64 / n as f64 - f).abs())
        })
        .fold(0.0, f64::max);
    // the 0.1% critical value of the one-sample KS statistic: 1.95 / √n
    assert!(d < 1.95 / (n as f64).sqrt(), "KS distance {d}");
}

#[tokio::test]
async fn differencing_two_queries_shows_only_the_noise() {
    // two tables that differ by one individual: the difference between the released counts
    // has the spread of two independent draws at the calibrated scale
    let with = tempfile::tempdir().unwrap();
    let without = tempfile::tempdir().unwrap();
    write_csv(with.path(), "id,g,v", (0..200).map(|i| format!("s{i},a,1")));
    write_csv(
        without.path(),
        "id,g,v",
        (1..200).map(|i| format!("s{i},a,1")),
    );
    let table = small(10, 1);
    let epsilon = 1.0;
    let sql = "SELECT COUNT(*) FROM t";
    let mut diffs = Vec::new();
    let mut scale = 0.0;
    for seed in 0..300u64 {
        let a = run(&table, with.path(), sql, epsilon, 2 * seed).await;
        let b = run(&table, without.path(), sql, epsilon, 2 * seed + 1).await;
        scale = a.noise[0].scale;
        diffs.push(a.rows[0][0].as_f64().unwrap() - b.rows[0][0].as_f64().unwrap());
    }
    // ε split in two: the threshold count and the count itself
    assert_eq!(scale, 2.0);
    let n = diffs.len() as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    let expected = (2.0 * 2.0 * scale * scale).sqrt(); // two Laplace draws: var 2b² each
    assert!(
        (sd / expected - 1.0).abs() < 0.15,
        "sd {sd}, expected {expected}"
    );
    assert!(
        (mean - 1.0).abs() < 4.0 * expected / n.sqrt(),
        "mean {mean}"
    );
}

#[tokio::test]
async fn fate_averages_come_back_near_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fate("default_credit_hetero_guest.csv"),
        dir.path().join("guest.csv"),
    )
    .unwrap();
    let table = guest();
    let r = run(
        &table,
        dir.path(),
        "SELECT y, COUNT(*) AS n, AVG(x1) AS a FROM guest GROUP BY y",
        1.0,
        11,
    )
    .await;
    assert_eq!(r.rows.len(), 2);
    // exact figures from the file: the default rate is 22.12% (6,636 of 30,000)
    let total: f64 = r.rows.iter().map(|row| row[1].as_f64().unwrap()).sum();
    assert!((total - 30_000.0).abs() < 100.0, "{total}");
    let defaults = r
        .rows
        .iter()
        .find(|row| row[0] == serde_json::json!(1))
        .unwrap();
    assert!((defaults[1].as_f64().unwrap() - 6636.0).abs() < 50.0);
}

#[tokio::test]
async fn a_side_restricted_to_shared_individuals_counts_only_them() {
    let dir = tempfile::tempdir().unwrap();
    write_csv(dir.path(), "id,g,v", (0..100).map(|i| format!("s{i},a,1")));
    let table = small(10, 1);
    let shape = plan("SELECT COUNT(*) FROM t", std::slice::from_ref(&table))
        .await
        .unwrap();
    let ctx = context(&table, dir.path()).await;
    let members: Vec<String> = (50..150).map(|i| format!("s{i}")).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let a = answer(
        &ctx,
        &table,
        &shape.side("t"),
        laplace(100.0),
        Some(&members),
        &mut rng,
    )
    .await
    .unwrap();
    let n = a.groups[0].values[0].as_f64().unwrap();
    assert!((n - 50.0).abs() <= 1.0, "{n}");
}

#[test]
fn the_analytic_gaussian_sigma_is_the_smallest_that_meets_delta() {
    for (epsilon, delta, sensitivity) in [(0.1, 1e-5, 1.0), (1.0, 1e-5, 1.0), (4.0, 1e-7, 3.0)] {
        let sigma = noise::gaussian_sigma(epsilon, delta, sensitivity);
        assert!(noise::gaussian_delta(sigma, epsilon, sensitivity) <= delta);
        assert!(noise::gaussian_delta(sigma * 0.999, epsilon, sensitivity) > delta);
        // it scales with the sensitivity
        let unit = noise::gaussian_sigma(epsilon, delta, 1.0);
        assert!((sigma / unit - sensitivity).abs() < 1e-6 * sensitivity);
        if epsilon < 1.0 {
            // below the classic calibration, which holds only for ε < 1
            let classic = sensitivity * (2.0 * (1.25 / delta).ln()).sqrt() / epsilon;
            assert!(sigma < classic, "{sigma} vs classic {classic}");
        }
    }
    // the normal CDF the profile rests on, at reference points
    for (x, p) in [
        (0.0, 0.5),
        (1.0, 0.841_344_746),
        (-3.0, 0.001_349_898),
        (-5.0, 2.866_516e-7),
    ] {
        assert!(
            (noise::phi(x) - p).abs() <= 1e-7 * p.max(1e-3) + 1e-12,
            "Φ({x})"
        );
    }
}

#[test]
fn gaussian_draws_match_their_sigma() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let sigma = 3.0;
    let n = 200_000;
    let draws: Vec<f64> = (0..n).map(|_| noise::gaussian(&mut rng, sigma)).collect();
    let mean = draws.iter().sum::<f64>() / n as f64;
    let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.03, "mean {mean}");
    assert!((var.sqrt() / sigma - 1.0).abs() < 0.01, "sd {}", var.sqrt());
    let within = draws.iter().filter(|x| x.abs() <= sigma).count() as f64 / n as f64;
    assert!((within - 0.682_689).abs() < 0.005, "{within}");
}

#[tokio::test]
async fn a_gaussian_answer_says_so_and_needs_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    write_csv(
        dir.path(),
        "id,g,v",
        (0..400).map(|i| format!("s{i},a,{}", i % 10)),
    );
    let table = small(10, 1);
    let shape = plan(
        "SELECT COUNT(*), AVG(v) FROM t",
        std::slice::from_ref(&table),
    )
    .await
    .unwrap();
    let ctx = context(&table, dir.path()).await;
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let gaussian = Privacy {
        epsilon: 2.0,
        delta: 1e-6,
        mechanism: Mechanism::Gaussian,
    };
    let a = answer(&ctx, &table, &shape.side("t"), gaussian, None, &mut rng)
        .await
        .unwrap();
    assert_eq!(a.mechanism, Mechanism::Gaussian);
    // ε and δ split in equal shares (the threshold's count, the count, AVG's two): the
    // count's σ for sensitivity 1
    let shares = shape.side("t").shares() as f64;
    assert_eq!(shares, 4.0);
    let expected = noise::gaussian_sigma(2.0 / shares, 1e-6 / shares, 1.0);
    assert!((a.scales[0] - expected).abs() < 1e-9, "{:?}", a.scales);
    let n = a.groups[0].values[0].as_f64().unwrap();
    assert!((n - 400.0).abs() < 8.0 * expected, "{n}");
    let released = assemble(&shape, &[a]).unwrap();
    assert!(released.noise.iter().all(|n| n.mechanism == "gaussian"));
    let refused = answer(
        &ctx,
        &table,
        &shape.side("t"),
        Privacy {
            delta: 0.0,
            ..gaussian
        },
        None,
        &mut rng,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("needs a δ above 0"), "{refused}");
}
