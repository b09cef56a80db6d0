//! The audit log: the outbox, in order, as an RFC 9162 Merkle tree, with a signed
//! checkpoint re-published whenever the tree has grown. Every state change writes its outbox
//! row in its own transaction, so the log holds every decision and nothing else.

use std::path::Path;
use std::sync::{Mutex, RwLock};

use axum::extract::{Path as UrlPath, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use baygrid_audit::{
    hash_from_hex, sign_checkpoint, to_hex as hex, verifier_key, Entry, SigningKey, Tree,
};
use baygrid_core::{Principal, Role};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::auth::require;
use crate::body::QueryParams;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The log's state in the server.
pub struct AuditLog {
    /// The log's name: the checkpoint's origin line and the key's name.
    pub origin: String,
    key: SigningKey,
    tree: Mutex<Tree>,
    checkpoint: RwLock<String>,
    /// The tree size the current checkpoint signs.
    published: std::sync::atomic::AtomicU64,
}

impl AuditLog {
    /// Loads the signing key from `data_dir/audit.key`, or makes one at first start, and
    /// writes the verifier key to `data_dir/audit.pub`.
    pub fn open(data_dir: &Path, origin: &str) -> std::io::Result<AuditLog> {
        let key_path = data_dir.join("audit.key");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(text) => {
                let bytes = hash_from_hex(&text).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "audit.key is not 32 hex bytes",
                    )
                })?;
                SigningKey::from_bytes(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut bytes);
                crate::write_private(&key_path, &hex(&bytes))?;
                SigningKey::from_bytes(&bytes)
            }
            Err(e) => return Err(e),
        };
        std::fs::write(
            data_dir.join("audit.pub"),
            verifier_key(origin, &key.verifying_key()) + "\n",
        )?;
        let log = AuditLog {
            origin: origin.to_string(),
            key,
            tree: Mutex::new(Tree::new()),
            checkpoint: RwLock::new(String::new()),
            published: std::sync::atomic::AtomicU64::new(0),
        };
        log.publish();
        Ok(log)
    }

    pub fn verifier_key(&self) -> String {
        verifier_key(&self.origin, &self.key.verifying_key())
    }

    fn publish(&self) {
        let tree = self.tree.lock().expect("audit tree lock");
        let note = sign_checkpoint(&self.origin, tree.len(), &tree.root(), &self.key);
        *self.checkpoint.write().expect("checkpoint lock") = note;
        self.published
            .store(tree.len(), std::sync::atomic::Ordering::SeqCst);
    }

    pub fn checkpoint(&self) -> String {
        self.checkpoint.read().expect("checkpoint lock").clone()
    }

    pub fn size(&self) -> u64 {
        self.tree.lock().expect("audit tree lock").len()
    }

    /// A checkpoint for `tree`, signed with this log's key (for offline exports).
    pub fn sign(&self, tree: &Tree) -> String {
        sign_checkpoint(&self.origin, tree.len(), &tree.root(), &self.key)
    }
}

/// An entry as the API shows it.
fn entry_view(row: &baygrid_store::OutboxRow) -> EntryView {
    let entry = entry(row);
    EntryView {
        index: entry.index,
        canonical: String::from_utf8_lossy(&entry.canonical()).into_owned(),
        leaf_hash: hex(&entry.leaf_hash()),
    }
}

/// An outbox row as a log entry.
pub fn entry(row: &baygrid_store::OutboxRow) -> Entry {
    Entry {
        index: (row.seq - 1) as u64,
        at: row.at_ms,
        kind: row.kind.clone(),
        actor: row.actor.clone(),
        payload: row.payload.clone(),
    }
}

/// Appends every outbox row the tree does not hold yet, then re-signs the checkpoint.
pub async fn sync(state: &AppState) -> Result<u64, ApiError> {
    let log = &state.audit;
    let mut appended = 0;
    loop {
        let next = log.size() as i64 + 1;
        let rows = state.store.outbox_from(next, 5_000).await?;
        if rows.is_empty() {
            break;
        }
        let mut tree = log.tree.lock().expect("audit tree lock");
        for row in &rows {
            // A concurrent sync (the background one and a reader's) may have appended
            // these rows while this one was reading them: they are already in the tree.
            if row.seq <= tree.len() as i64 {
                continue;
            }
            if row.seq != tree.len() as i64 + 1 {
                return Err(ApiError::Unavailable(format!(
                    "outbox has a gap before seq {}",
                    row.seq
                )));
            }
            tree.push_leaf_hash(entry(row).leaf_hash());
            appended += 1;
        }
    }
    // Also when a concurrent sync appended and has not signed yet: a reader never gets a
    // checkpoint older than the tree it synced.
    if appended > 0 || log.published.load(std::sync::atomic::Ordering::SeqCst) != log.size() {
        log.publish();
    }
    Ok(appended)
}

fn may_read(who: &Principal) -> ApiResult<()> {
    require(who, &[Role::Operator, Role::Regulator])
}

/// The latest signed checkpoint (a C2SP signed note, text/plain).
#[utoipa::path(get, path = "/api/v1/audit/checkpoint", responses((status = 200, content_type = "text/plain", body = String)), security(("bearer" = [])))]
pub async fn checkpoint(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<impl IntoResponse> {
    may_read(&who)?;
    sync(&state).await?;
    Ok((
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.audit.checkpoint(),
    ))
}

/// The log's verifier key: `NAME+KEYID+BASE64`.
#[utoipa::path(get, path = "/api/v1/audit/key", responses((status = 200, content_type = "text/plain", body = String)), security(("bearer" = [])))]
pub async fn key(State(state): State<AppState>, who: Principal) -> ApiResult<impl IntoResponse> {
    may_read(&who)?;
    Ok((
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.audit.verifier_key() + "\n",
    ))
}

/// One entry with its canonical bytes and leaf hash.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntryView {
    pub index: u64,
    /// The canonical encoding, as text.
    pub canonical: String,
    pub leaf_hash: String,
}

#[utoipa::path(get, path = "/api/v1/audit/entries/{index}", params(("index" = u64, Path)), responses((status = 200, body = EntryView), (status = 404, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn get_entry(
    State(state): State<AppState>,
    who: Principal,
    UrlPath(index): UrlPath<u64>,
) -> ApiResult<Json<EntryView>> {
    may_read(&who)?;
    sync(&state).await?;
    let rows = state.store.outbox_from(index as i64 + 1, 1).await?;
    let row = rows
        .first()
        .filter(|r| r.seq == index as i64 + 1)
        .ok_or_else(|| ApiError::NotFound(format!("no entry {index}")))?;
    Ok(Json(entry_view(row)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EntriesQuery {
    /// First index (default 0).
    pub from: Option<u64>,
    /// At most this many (default 1000, at most 10000).
    pub limit: Option<i64>,
}

/// Entries in order, for export.
#[utoipa::path(get, path = "/api/v1/audit/entries", params(EntriesQuery), responses((status = 200, body = [EntryView])), security(("bearer" = [])))]
pub async fn list_entries(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<EntriesQuery>,
) -> ApiResult<Json<Vec<EntryView>>> {
    may_read(&who)?;
    let limit = query.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad("limit", "must be between 1 and 10000"));
    }
    let rows = state
        .store
        .outbox_from(query.from.unwrap_or(0) as i64 + 1, limit)
        .await?;
    Ok(Json(rows.iter().map(entry_view).collect()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InclusionQuery {
    pub index: u64,
    /// Tree size the proof is for (default: the current size).
    pub size: Option<u64>,
}

/// A proof, as hex hashes.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProofView {
    pub from: u64,
    pub to: u64,
    pub proof: Vec<String>,
}

fn proof_error(e: baygrid_audit::ProofError) -> ApiError {
    ApiError::bad("size", e.to_string())
}

/// PATH(index, size).
#[utoipa::path(get, path = "/api/v1/audit/proof/inclusion", params(InclusionQuery), responses((status = 200, body = ProofView), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn inclusion(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<InclusionQuery>,
) -> ApiResult<Json<ProofView>> {
    may_read(&who)?;
    sync(&state).await?;
    let tree = state.audit.tree.lock().expect("audit tree lock");
    let size = query.size.unwrap_or(tree.len());
    let proof = tree
        .inclusion_proof(query.index, size)
        .map_err(proof_error)?;
    Ok(Json(ProofView {
        from: query.index,
        to: size,
        proof: proof.iter().map(|h| hex(h)).collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyQuery {
    pub from: u64,
    /// Default: the current size.
    pub to: Option<u64>,
}

/// PROOF(from, to).
#[utoipa::path(get, path = "/api/v1/audit/proof/consistency", params(ConsistencyQuery), responses((status = 200, body = ProofView), (status = 400, body = baygrid_api::ErrorBody)), security(("bearer" = [])))]
pub async fn consistency(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(query): QueryParams<ConsistencyQuery>,
) -> ApiResult<Json<ProofView>> {
    may_read(&who)?;
    sync(&state).await?;
    let tree = state.audit.tree.lock().expect("audit tree lock");
    let to = query.to.unwrap_or(tree.len());
    let proof = tree
        .consistency_proof(query.from, to)
        .map_err(proof_error)?;
    Ok(Json(ProofView {
        from: query.from,
        to,
        proof: proof.iter().map(|h| hex(h)).collect(),
    }))
}
