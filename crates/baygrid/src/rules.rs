//! `baygrid rules …`: the GBA cross-border rule pack, run locally on a flow request.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use baygrid_rules::{FlowRequest, RulePack};
use clap::Subcommand;

use crate::output::{emit, table};
use crate::Args;

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// List the pack's rule ids.
    Ls,
    /// Decide a flow request (TOML or JSON: today, exporter, recipient, data, flow,
    /// evidence) and explain the decision.
    Decide { file: PathBuf },
}

fn read_request(path: &Path) -> anyhow::Result<FlowRequest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json = path.extension().and_then(|e| e.to_str()) == Some("json");
    if json {
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))
    } else {
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

pub fn run(args: &Args, cmd: &RulesCommand) -> anyhow::Result<ExitCode> {
    let pack = RulePack::load()?;
    match cmd {
        RulesCommand::Ls => {
            let ids = pack.rule_ids().to_vec();
            emit(args.output, &ids, |ids| {
                table(
                    &["RULE"],
                    &ids.iter().map(|i| vec![i.clone()]).collect::<Vec<_>>(),
                )
            });
        }
        RulesCommand::Decide { file } => {
            let request = read_request(file)?;
            let decision = pack.decide(&request)?;
            emit(args.output, &decision, |d| {
                println!("{}", if d.allowed { "ALLOW" } else { "DENY" });
                println!("rules applied: {}", d.rules.join(", "));
                if !d.denied_by.is_empty() {
                    println!("denied by: {}", d.denied_by.join(", "));
                }
                for remedy in &d.remedies {
                    println!("to allow it: {remedy}");
                }
                for o in &d.obligations {
                    match o.due {
                        Some(due) => println!("obligation: {} ({}), due {due}", o.id, o.rule),
                        None => println!("obligation: {} ({})", o.id, o.rule),
                    }
                }
                if !d.evidence_used.is_empty() {
                    println!("evidence used: {}", d.evidence_used.join(", "));
                }
                for note in &d.notes {
                    println!("note: {note}");
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
