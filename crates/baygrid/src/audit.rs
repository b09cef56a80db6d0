//! `baygrid audit …`: what a regulator who trusts nothing but the log's public key runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use baygrid_audit::{
    parse_verifier_key, verify_checkpoint, verify_consistency, verify_inclusion, Entry, Hash, Tree,
};
use clap::Subcommand;
use serde::Deserialize;

use crate::cli::client;
use crate::Args;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the latest signed checkpoint.
    Checkpoint,
    /// Fetch an entry and its inclusion proof, and check both against the signed checkpoint.
    Prove {
        /// The entry's index in the log, from 0.
        index: u64,
    },
    /// Write entries, checkpoint, public key and inclusion proofs to DIR.
    Export {
        /// Where to write the export (made if missing).
        dir: PathBuf,
        /// Read a stopped server's data directory (`--data-dir`) instead of asking the
        /// server: the entries come from its store, and the checkpoint is signed with the
        /// log key kept there.
        #[arg(long)]
        offline: bool,
        /// With `--offline`: the store URL, when the server did not use the SQLite store
        /// in its data directory.
        #[arg(long, requires = "offline")]
        store: Option<String>,
    },
    /// Watch a log: verify its new checkpoint and its consistency with the last one this
    /// witness saw, then cosign it. A fork is refused and the last good checkpoint kept.
    Witness {
        /// The log's server URL.
        #[arg(long)]
        log: String,
        /// The witness's Ed25519 key (32 hex bytes), made when missing; its state (the last
        /// checkpoint seen and the log's key, pinned on first use) lives beside it.
        #[arg(long)]
        key: PathBuf,
        /// The witness's name on its cosignatures.
        #[arg(long, default_value = "baygrid-witness")]
        name: String,
    },
    /// Verify an export offline: signature, every entry, the root; optionally consistency
    /// with an earlier checkpoint. Names the first bad entry.
    Verify {
        /// A folder `audit export` wrote.
        dir: PathBuf,
        /// An earlier checkpoint of the same log, which the export must extend.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

#[derive(Debug, Deserialize)]
struct EntryView {
    index: u64,
    canonical: String,
}

#[derive(Debug, Deserialize)]
struct ProofView {
    proof: Vec<String>,
}

fn unhex(text: &str) -> anyhow::Result<Hash> {
    baygrid_audit::hash_from_hex(text)
        .with_context(|| format!("`{text}` is not a 32-byte hex hash"))
}

/// Fetches a proof from the log and decodes its hashes.
async fn fetch_proof(client: &baygrid_api::Client, path: &str) -> anyhow::Result<Vec<Hash>> {
    let proof: ProofView = client.get(path).await?;
    proof.proof.iter().map(|h| unhex(h)).collect()
}

fn checkpoint_size(note: &str) -> anyhow::Result<u64> {
    note.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .context("checkpoint has no tree size line")
}

pub async fn run(args: &Args, cmd: &AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Checkpoint => {
            let note = text(args, "/api/v1/audit/checkpoint").await?;
            print!("{note}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prove { index } => prove(args, *index).await,
        AuditCommand::Export {
            dir,
            offline: false,
            ..
        } => export(args, dir).await,
        AuditCommand::Export {
            dir,
            offline: true,
            store,
        } => export_offline(args, dir, store.as_deref()).await,
        AuditCommand::Verify { dir, previous } => verify(dir, previous.as_deref()),
        AuditCommand::Witness { log, key, name } => witness(args, log, key, name).await,
    }
}

async fn text(args: &Args, path: &str) -> anyhow::Result<String> {
    text_from(&client(args)?, path).await
}

async fn text_from(client: &baygrid_api::Client, path: &str) -> anyhow::Result<String> {
    let bytes = client.get_bytes(path).await?;
    String::from_utf8(bytes.to_vec()).with_context(|| format!("{path}: the answer is not text"))
}

async fn prove(args: &Args, index: u64) -> anyhow::Result<ExitCode> {
    let client = client(args)?;
    let note = text(args, "/api/v1/audit/checkpoint").await?;
    let (name, key) = parse_verifier_key(&text(args, "/api/v1/audit/key").await?)?;
    let checkpoint = verify_checkpoint(&note, &name, &key)?;
    let entry: EntryView = client
        .get(&format!("/api/v1/audit/entries/{index}"))
        .await?;
    let proof = fetch_proof(
        &client,
        &format!(
            "/api/v1/audit/proof/inclusion?index={index}&size={}",
            checkpoint.size
        ),
    )
    .await?;
    let leaf = baygrid_audit::leaf_hash(entry.canonical.as_bytes());
    verify_inclusion(&leaf, index, checkpoint.size, &proof, &checkpoint.root).with_context(
        || {
            format!(
                "entry {index} is not in the log at size {}",
                checkpoint.size
            )
        },
    )?;
    println!("{}", entry.canonical);
    println!(
        "entry {index} is included in the log of {} entries signed by {name} ({} proof hashes)",
        checkpoint.size,
        proof.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn export(args: &Args, dir: &Path) -> anyhow::Result<ExitCode> {
    let client = client(args)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let note = text(args, "/api/v1/audit/checkpoint").await?;
    let size = checkpoint_size(&note)?;
    let key = text(args, "/api/v1/audit/key").await?;
    let mut entries = std::io::BufWriter::new(std::fs::File::create(dir.join("entries.jsonl"))?);
    let mut next = 0;
    while next < size {
        let page: Vec<EntryView> = client
            .get(&format!("/api/v1/audit/entries?from={next}&limit=10000"))
            .await?;
        anyhow::ensure!(
            !page.is_empty(),
            "the log returned no entry at {next} below size {size}"
        );
        for entry in page.into_iter().take((size - next) as usize) {
            anyhow::ensure!(
                entry.index == next,
                "the log returned entry {} where {next} was expected",
                entry.index
            );
            writeln!(entries, "{}", entry.canonical)?;
            next += 1;
        }
    }
    entries.flush()?;
    let mut proofs = std::io::BufWriter::new(std::fs::File::create(dir.join("proofs.jsonl"))?);
    for index in 0..size {
        let proof: ProofView = client
            .get(&format!(
                "/api/v1/audit/proof/inclusion?index={index}&size={size}"
            ))
            .await?;
        writeln!(proofs, "{}", serde_json::to_string(&proof.proof)?)?;
    }
    proofs.flush()?;
    std::fs::write(dir.join("checkpoint"), &note)?;
    std::fs::write(dir.join("log.pub"), &key)?;
    println!(
        "exported {size} entries, their inclusion proofs, the checkpoint and the public key to {}",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The same export as [`export`], from a stopped server's data directory.
async fn export_offline(args: &Args, dir: &Path, store: Option<&str>) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir();
    let public = std::fs::read_to_string(data_dir.join("audit.pub")).with_context(|| {
        format!(
            "{} holds no audit log (no audit.pub): give the server's --data-dir",
            data_dir.display()
        )
    })?;
    let (origin, _) = parse_verifier_key(&public)?;
    let url = match store {
        Some(url) => url.to_string(),
        None => baygrid_server::ServerConfig {
            data_dir: data_dir.clone(),
            ..Default::default()
        }
        .store_url(),
    };
    let store = baygrid_store::Store::open(&url)
        .await
        .with_context(|| format!("cannot open the store at {url}"))?;
    let log = baygrid_server::audit::AuditLog::open(&data_dir, &origin)
        .with_context(|| format!("cannot read the log key in {}", data_dir.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut entries = std::io::BufWriter::new(std::fs::File::create(dir.join("entries.jsonl"))?);
    let mut tree = Tree::new();
    loop {
        let rows = store.outbox_from(tree.len() as i64 + 1, 10_000).await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            anyhow::ensure!(
                row.seq == tree.len() as i64 + 1,
                "the store's outbox has a gap before seq {}",
                row.seq
            );
            let entry = baygrid_server::audit::entry(row);
            let canonical = entry.canonical();
            tree.push(&canonical);
            entries.write_all(&canonical)?;
            entries.write_all(b"\n")?;
        }
    }
    entries.flush()?;
    let size = tree.len();
    let mut proofs = std::io::BufWriter::new(std::fs::File::create(dir.join("proofs.jsonl"))?);
    for index in 0..size {
        let proof: Vec<String> = tree
            .inclusion_proof(index, size)?
            .iter()
            .map(|h| baygrid_audit::to_hex(h))
            .collect();
        writeln!(proofs, "{}", serde_json::to_string(&proof)?)?;
    }
    proofs.flush()?;
    std::fs::write(dir.join("checkpoint"), log.sign(&tree))?;
    std::fs::write(dir.join("log.pub"), log.verifier_key() + "\n")?;
    println!(
        "exported {size} entries from {} (offline), their inclusion proofs, a checkpoint and the public key to {}",
        data_dir.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Offline: needs only the export directory.
fn verify(dir: &Path, previous: Option<&Path>) -> anyhow::Result<ExitCode> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("cannot read {}", dir.join(name).display()))
    };
    let (name, key) = parse_verifier_key(&read("log.pub")?)?;
    let checkpoint = match verify_checkpoint(&read("checkpoint")?, &name, &key) {
        Ok(c) => c,
        Err(e) => return fail(&format!("checkpoint: {e}")),
    };
    println!("checkpoint: signed by {name}, {} entries", checkpoint.size);
    let entries = read("entries.jsonl")?;
    let lines: Vec<&str> = entries.lines().collect();
    let mut tree = Tree::new();
    let mut kinds = Vec::new();
    for (line_no, line) in lines.iter().take(checkpoint.size as usize).enumerate() {
        let entry: Entry = match serde_json::from_str(line) {
            Ok(entry) => entry,
            Err(e) => return fail(&format!("entry {line_no}: not an entry ({e})")),
        };
        if entry.index != line_no as u64 {
            return fail(&format!(
                "entry {line_no}: carries index {}: entries were dropped or reordered",
                entry.index
            ));
        }
        if entry.canonical() != line.as_bytes() {
            return fail(&format!(
                "entry {line_no} ({}): not in canonical form: it was altered",
                entry.kind
            ));
        }
        kinds.push(entry.kind);
        tree.push(line.as_bytes());
    }
    if tree.len() < checkpoint.size {
        return fail(&format!(
            "the export holds {} entries; the checkpoint covers {}",
            lines.len(),
            checkpoint.size
        ));
    }
    if tree.root() != checkpoint.root {
        // the log's inclusion proofs name the first entry that is not the one it signed
        let proofs = read("proofs.jsonl").unwrap_or_default();
        for (index, proof) in proofs.lines().enumerate().take(checkpoint.size as usize) {
            let proof: Vec<String> = serde_json::from_str(proof).unwrap_or_default();
            let proof: Vec<Hash> = proof.iter().filter_map(|h| unhex(h).ok()).collect();
            let leaf = tree.leaf(index as u64).expect("index below size");
            if verify_inclusion(
                &leaf,
                index as u64,
                checkpoint.size,
                &proof,
                &checkpoint.root,
            )
            .is_err()
            {
                return fail(&format!(
                    "entry {index} ({}) is not the entry the log signed",
                    kinds[index]
                ));
            }
        }
        return fail("the entries do not hash to the signed root");
    }
    println!(
        "entries: {} recomputed; the root matches the signed checkpoint",
        checkpoint.size
    );
    if let Some(previous) = previous {
        let text = std::fs::read_to_string(previous)
            .with_context(|| format!("cannot read {}", previous.display()))?;
        let old = match verify_checkpoint(&text, &name, &key) {
            Ok(old) => old,
            Err(e) => return fail(&format!("previous checkpoint: {e}")),
        };
        if old.size > checkpoint.size {
            return fail(&format!(
                "the previous checkpoint ({} entries) is larger than this one ({})",
                old.size, checkpoint.size
            ));
        }
        if old.size > 0 {
            let proof = tree
                .consistency_proof(old.size, checkpoint.size)
                .expect("sizes checked");
            if verify_consistency(
                old.size,
                checkpoint.size,
                &proof,
                &old.root,
                &checkpoint.root,
            )
            .is_err()
            {
                return fail(&format!(
                    "fork: the first {} entries differ from the previous checkpoint's",
                    old.size
                ));
            }
        }
        println!(
            "previous checkpoint of {} entries: consistent (append-only)",
            old.size
        );
    }
    println!("OK");
    Ok(ExitCode::SUCCESS)
}

fn fail(message: &str) -> anyhow::Result<ExitCode> {
    println!("FAIL: {message}");
    Ok(ExitCode::FAILURE)
}

fn load_or_make_key(path: &Path) -> anyhow::Result<baygrid_audit::SigningKey> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(baygrid_audit::SigningKey::from_bytes(
            &unhex(text.trim()).context("witness key")?,
        ));
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading randomness for the witness key")?;
    let text = baygrid_audit::to_hex(&bytes);
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(baygrid_audit::SigningKey::from_bytes(&bytes))
}

async fn witness(args: &Args, log: &str, key_path: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let key = load_or_make_key(key_path)?;
    let state_dir = key_path.with_extension("state");
    std::fs::create_dir_all(&state_dir)?;
    let log_client = baygrid_api::Client::new(log, Some(crate::cli::bearer_token(args)?));
    let vkey_text = text_from(&log_client, "/api/v1/audit/key").await?;
    let pinned_path = state_dir.join("log.pub");
    let pinned = match std::fs::read_to_string(&pinned_path) {
        Ok(pinned) => pinned,
        Err(_) => {
            std::fs::write(&pinned_path, &vkey_text)?;
            vkey_text.clone()
        }
    };
    if pinned.trim() != vkey_text.trim() {
        println!(
            "REFUSED: the log now presents key {} but this witness pinned {}",
            vkey_text.trim(),
            pinned.trim()
        );
        return Ok(ExitCode::FAILURE);
    }
    let (log_name, log_key) = parse_verifier_key(&pinned)?;
    let note = text_from(&log_client, "/api/v1/audit/checkpoint").await?;
    let new = match verify_checkpoint(&note, &log_name, &log_key) {
        Ok(c) => c,
        Err(e) => {
            println!("REFUSED: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let last_path = state_dir.join("last.checkpoint");
    if let Ok(last_note) = std::fs::read_to_string(&last_path) {
        let last = verify_checkpoint(&last_note, &log_name, &log_key)
            .context("the witness's own state is corrupt")?;
        if new.size < last.size {
            println!(
                "REFUSED: the log shrank from {} to {} entries",
                last.size, new.size
            );
            return Ok(ExitCode::FAILURE);
        }
        if new.size == last.size && new.root != last.root {
            println!(
                "REFUSED: fork: two different roots for {} entries",
                new.size
            );
            return Ok(ExitCode::FAILURE);
        }
        if new.size > last.size && last.size > 0 {
            let proof = fetch_proof(
                &log_client,
                &format!(
                    "/api/v1/audit/proof/consistency?from={}&to={}",
                    last.size, new.size
                ),
            )
            .await?;
            if verify_consistency(last.size, new.size, &proof, &last.root, &new.root).is_err() {
                println!("REFUSED: fork: the log at {} entries does not extend the checkpoint of {} entries this witness saw", new.size, last.size);
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    // cosign: the witness signs the same checkpoint text under its own name
    let body = &note[..note
        .find("\n\n")
        .context("checkpoint has no signature block")?
        + 1];
    let cosigned = baygrid_audit::sign_note(body, name, &key);
    let signature_line = cosigned.lines().last().unwrap_or_default();
    let with_cosignature = format!("{note}{signature_line}\n");
    std::fs::write(&last_path, &note)?;
    std::fs::write(state_dir.join("cosigned.checkpoint"), &with_cosignature)?;
    print!("{with_cosignature}");
    println!(
        "cosigned {} entries of {log_name}; witness key {}",
        new.size,
        baygrid_audit::verifier_key(name, &key.verifying_key())
    );
    Ok(ExitCode::SUCCESS)
}
