//! `baygrid fusion eval`: a fusion task with every party on this machine, each
//! holding only its own table, talking through the same protocols the
//! workers use (PSI over loopback TCP, masked aggregation, shares), with
//! the centralised baseline trained by the same code on the pooled rows.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use baygrid_core::SpecError;
use baygrid_fusion::data::Table;
use baygrid_fusion::hetero::{self, HeteroConfig};
use baygrid_fusion::homo;
use baygrid_fusion::metrics::Scores;
use baygrid_fusion::psi::{self, Reveal};
use serde::{Deserialize, Serialize};

use crate::output::{emit, table};
use crate::Args;

#[derive(Debug, clap::Subcommand)]
pub enum FusionCommand {
    /// Run a fusion task (psi, homo-lr, homo-mlp, hetero-lr) described by a YAML file,
    /// every party in this process with only its own table, and report AUC, KS and
    /// accuracy against the centralised baseline trained by the same code.
    Eval {
        /// The task file (see examples/fusion/).
        file: PathBuf,
    },
    #[command(flatten)]
    Exchange(crate::fusion_run::RunCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Task {
    Psi,
    HomoLr,
    HomoMlp,
    HeteroLr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartySpec {
    name: String,
    /// A CSV with an `id` column, `y` for labelled parties, then features.
    file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PsiSpec {
    /// Drop this seeded fraction of each party's rows before aligning.
    #[serde(default)]
    drop: f64,
    #[serde(default = "both")]
    reveal: Reveal,
    #[serde(default = "batch")]
    batch: usize,
    #[serde(default)]
    seed: u64,
}

fn both() -> Reveal {
    Reveal::Both
}
fn batch() -> usize {
    psi::DEFAULT_BATCH
}

impl Default for PsiSpec {
    fn default() -> Self {
        PsiSpec {
            drop: 0.0,
            reveal: Reveal::Both,
            batch: psi::DEFAULT_BATCH,
            seed: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FusionSpec {
    task: Task,
    parties: Vec<PartySpec>,
    /// Held-out files scored by horizontal models.
    #[serde(default)]
    test: Vec<PathBuf>,
    /// Hold out this seeded fraction of the aligned rows (vertical tasks).
    #[serde(default)]
    holdout: Option<f64>,
    #[serde(default)]
    holdout_seed: u64,
    #[serde(default)]
    psi: PsiSpec,
    /// Hyper-parameters: the fields of the task's trainer.
    #[serde(default)]
    settings: serde_yaml::Mapping,
}

#[derive(Debug, Serialize)]
struct Row {
    setting: String,
    model: String,
    scores: Scores,
}

#[derive(Debug, Serialize)]
struct Report {
    task: Task,
    psi: Option<PsiSummary>,
    aggregation: Option<String>,
    dp: Option<(f64, f64)>,
    rounds: usize,
    seconds_per_round: f64,
    bytes_per_round: f64,
    results: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct PsiSummary {
    guest_ids: usize,
    host_ids: usize,
    intersection: usize,
    matches_plain: bool,
    seconds: f64,
    bytes: u64,
}

fn read_spec(path: &Path) -> anyhow::Result<FusionSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let de = serde_yaml::Deserializer::from_str(&text);
    let spec: FusionSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let e = SpecError::at(e.path(), &e.inner().to_string(), "spec");
        anyhow::anyhow!("{}: {e}", path.display())
    })?;
    if !(0.0..1.0).contains(&spec.psi.drop) {
        bail!(
            "{}: psi.drop: must be in [0, 1), got {}",
            path.display(),
            spec.psi.drop
        );
    }
    if let Some(h) = spec.holdout {
        if !(0.0 < h && h < 1.0) {
            bail!("{}: holdout: must be in (0, 1), got {h}", path.display());
        }
    }
    Ok(spec)
}

fn settings<T: serde::de::DeserializeOwned>(
    path: &Path,
    map: serde_yaml::Mapping,
) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(serde_yaml::Value::Mapping(map)).map_err(|e| {
        let e = SpecError::at(e.path(), &e.inner().to_string(), "");
        match e.field.as_str() {
            "" => anyhow::anyhow!("{}: settings: {}", path.display(), e.problem),
            field => anyhow::anyhow!("{}: settings.{field}: {}", path.display(), e.problem),
        }
    })
}

pub async fn run(args: &Args, cmd: &FusionCommand) -> anyhow::Result<ExitCode> {
    let file = match cmd {
        FusionCommand::Eval { file } => file,
        FusionCommand::Exchange(c) => return crate::fusion_run::run(args, c).await,
    };
    let spec = read_spec(file)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut tables = Vec::new();
    for (i, p) in spec.parties.iter().enumerate() {
        let t = Table::read_csv(&resolve(&p.file))
            .with_context(|| format!("{}: parties[{i}] ({})", file.display(), p.name))?;
        tables.push(t);
    }
    let report = match spec.task {
        Task::Psi | Task::HeteroLr => {
            if tables.len() != 2 {
                bail!(
                    "{}: parties: {:?} takes exactly two parties (guest, host), got {}",
                    file.display(),
                    spec.task,
                    tables.len()
                );
            }
            vertical(file, &spec, &tables)?
        }
        Task::HomoLr | Task::HomoMlp => horizontal(file, &spec, &tables, &resolve)?,
    };
    emit(args.output, &report, render);
    Ok(ExitCode::SUCCESS)
}

fn render(r: &Report) {
    if let Some(p) = &r.psi {
        println!(
            "psi: guest {} ids, host {} ids, intersection {} ({}), {:.2} s, {} bytes",
            p.guest_ids,
            p.host_ids,
            p.intersection,
            if p.matches_plain {
                "matches the plain intersection"
            } else {
                "DIFFERS from the plain intersection"
            },
            p.seconds,
            p.bytes
        );
    }
    if let Some(a) = &r.aggregation {
        println!("aggregation: {a}");
    }
    if let Some((eps, delta)) = r.dp {
        println!("differential privacy: ε = {eps:.3} at δ = {delta:e} (RDP accountant)");
    }
    if r.rounds > 0 {
        println!(
            "{} rounds, {:.4} s and {:.0} bytes per round",
            r.rounds, r.seconds_per_round, r.bytes_per_round
        );
    }
    if !r.results.is_empty() {
        let rows: Vec<Vec<String>> = r
            .results
            .iter()
            .map(|row| {
                vec![
                    row.setting.clone(),
                    row.model.clone(),
                    row.scores.rows.to_string(),
                    format!("{:.6}", row.scores.auc),
                    format!("{:.4}", row.scores.ks),
                    format!("{:.4}", row.scores.accuracy),
                ]
            })
            .collect();
        table(
            &["SETTING", "MODEL", "ROWS", "AUC", "KS", "ACCURACY"],
            &rows,
        );
    }
}

fn vertical(file: &Path, spec: &FusionSpec, tables: &[Table]) -> anyhow::Result<Report> {
    let (mut guest, mut host) = (tables[0].clone(), tables[1].clone());
    if spec.psi.drop > 0.0 {
        guest = guest.sample(1.0 - spec.psi.drop, spec.psi.seed.wrapping_mul(2) + 1);
        host = host.sample(1.0 - spec.psi.drop, spec.psi.seed.wrapping_mul(2) + 2);
    }
    let start = Instant::now();
    let (g, _h) = psi::run_loopback(&guest.ids, &host.ids, spec.psi.reveal, spec.psi.batch)?;
    let seconds = start.elapsed().as_secs_f64();
    let ids = g
        .intersection
        .context("the guest was not told the intersection")?;
    let host_set: HashSet<&String> = host.ids.iter().collect();
    let mut seen = HashSet::new();
    let plain: Vec<&String> = guest
        .ids
        .iter()
        .filter(|id| host_set.contains(id) && seen.insert(*id))
        .collect();
    let summary = PsiSummary {
        guest_ids: g.own_size,
        host_ids: g.peer_size,
        intersection: ids.len(),
        matches_plain: plain.len() == ids.len() && plain.iter().zip(&ids).all(|(a, b)| *a == b),
        seconds,
        bytes: g.bytes_sent + g.bytes_received,
    };
    let mut report = Report {
        task: spec.task,
        psi: Some(summary),
        aggregation: None,
        dp: None,
        rounds: 0,
        seconds_per_round: 0.0,
        bytes_per_round: 0.0,
        results: Vec::new(),
    };
    if spec.task == Task::Psi {
        return Ok(report);
    }
    let cfg: HeteroConfig = settings(file, spec.settings.clone())?;
    let guest = guest.select(&psi::align(&guest.ids, &ids));
    let host = host.select(&psi::align(&host.ids, &ids));
    let (gtrain, gtest) = match spec.holdout {
        Some(f) => {
            let (test, train) = guest.split(f, spec.holdout_seed);
            (train, Some(test))
        }
        None => (guest.clone(), None),
    };
    let htrain = host.select(&psi::align(&host.ids, &gtrain.ids));
    let trained = hetero::train(&cfg, &gtrain, &htrain, |s| {
        eprintln!(
            "iteration {:>3}: {:.4} s, {} bytes, guest gradient norm {:.5}",
            s.iteration, s.seconds, s.bytes, s.guest_gradient_norm
        )
    })?;
    let pooled_train = gtrain.join_columns(&htrain)?;
    let central = hetero::train_central(&cfg, &pooled_train)?;
    report.rounds = trained.iterations.len();
    report.seconds_per_round =
        trained.iterations.iter().map(|s| s.seconds).sum::<f64>() / report.rounds.max(1) as f64;
    report.bytes_per_round = trained
        .iterations
        .iter()
        .map(|s| s.bytes as f64)
        .sum::<f64>()
        / report.rounds.max(1) as f64;
    report.aggregation = Some("additive shares with a dealer (guest, host, dealer)".into());
    let mut pair = |setting: &str, federated: Scores, centralised: Scores| {
        for (model, scores) in [("federated", federated), ("centralised", centralised)] {
            report.results.push(Row {
                setting: setting.into(),
                model: model.into(),
                scores,
            });
        }
    };
    pair(
        "train",
        hetero::score(&trained.model, &gtrain, &htrain)?,
        hetero::score_central(&central, &pooled_train)?,
    );
    if let Some(gtest) = gtest {
        let htest = host.select(&psi::align(&host.ids, &gtest.ids));
        pair(
            "held-out",
            hetero::score(&trained.model, &gtest, &htest)?,
            hetero::score_central(&central, &gtest.join_columns(&htest)?)?,
        );
    }
    Ok(report)
}

fn horizontal(
    file: &Path,
    spec: &FusionSpec,
    tables: &[Table],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> anyhow::Result<Report> {
    let map = match serde_json::to_value(&spec.settings) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => bail!("{}: settings: must be a mapping", file.display()),
    };
    let cfg = homo::config_from(spec.task == Task::HomoMlp, map, None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let device = homo::device();
    let trained = homo::train(&cfg, tables, &device, |s| {
        eprintln!(
            "round {:>3}: loss {:.5}, {:.4} s ({:.4} s aggregating), {} bytes",
            s.round, s.loss, s.seconds, s.aggregation_seconds, s.bytes
        )
    })?;
    let mut pooled = tables[0].clone();
    for t in &tables[1..] {
        pooled = pooled.concat(t)?;
    }
    let central = homo::train(&cfg, std::slice::from_ref(&pooled), &device, |_| {})?;
    let rounds = trained.rounds.len();
    let mut report = Report {
        task: spec.task,
        psi: None,
        aggregation: Some(match trained.aggregation {
            homo::Aggregation::Plain if tables.len() < 3 => format!(
                "plain FedAvg: {} parties, secure aggregation needs at least 3",
                tables.len()
            ),
            homo::Aggregation::Plain => "plain FedAvg (secure aggregation turned off)".into(),
            homo::Aggregation::Secure { threshold } => format!(
                "secure aggregation, {} parties, threshold {threshold}",
                tables.len()
            ),
        }),
        dp: trained.dp,
        rounds,
        seconds_per_round: trained.rounds.iter().map(|s| s.seconds).sum::<f64>()
            / rounds.max(1) as f64,
        bytes_per_round: trained.rounds.iter().map(|s| s.bytes as f64).sum::<f64>()
            / rounds.max(1) as f64,
        results: Vec::new(),
    };
    for (i, t) in tables.iter().enumerate() {
        report.results.push(Row {
            setting: format!("train: {}", spec.parties[i].name),
            model: "federated".into(),
            scores: homo::score(cfg.arch, &trained.params, t, &device)?,
        });
    }
    for (label, params) in [
        ("federated", &trained.params),
        ("centralised", &central.params),
    ] {
        report.results.push(Row {
            setting: "train: pooled".into(),
            model: label.into(),
            scores: homo::score(cfg.arch, params, &pooled, &device)?,
        });
    }
    for path in &spec.test {
        let t =
            Table::read_csv(&resolve(path)).with_context(|| format!("{}: test", file.display()))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        for (label, params) in [
            ("federated", &trained.params),
            ("centralised", &central.params),
        ] {
            report.results.push(Row {
                setting: format!("held-out: {name}"),
                model: label.into(),
                scores: homo::score(cfg.arch, params, &t, &device)?,
            });
        }
    }
    Ok(report)
}
