//! Signed checkpoints in the C2SP formats: a tlog-checkpoint body (origin, tree size, base64
//! root) inside a signed note, signed with Ed25519. The key is named by the log's origin and
//! identified by the first four bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::Hash;

const ED25519: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("checkpoint is malformed: {0}")]
    Malformed(String),
    #[error("no signature by key `{0}` verifies")]
    BadSignature(String),
    #[error("verifier key is malformed: {0}")]
    BadKey(String),
}

/// A verified checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// The 4-byte key id of an Ed25519 key named `name`.
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ED25519]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The checkpoint body: origin, size and base64 root, one per line.
pub fn checkpoint_body(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// Signs a note: the text, a blank line, and one signature line.
pub fn sign_note(text: &str, name: &str, key: &SigningKey) -> String {
    let signature = key.sign(text.as_bytes());
    let mut blob = key_id(name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&signature.to_bytes());
    format!("{text}\n\u{2014} {name} {}\n", B64.encode(blob))
}

/// A signed checkpoint for a tree.
pub fn sign_checkpoint(origin: &str, size: u64, root: &Hash, key: &SigningKey) -> String {
    sign_note(&checkpoint_body(origin, size, root), origin, key)
}

/// The verifier key string `name+keyid+base64(0x01 ‖ key)`, as published for the log.
pub fn verifier_key(name: &str, key: &VerifyingKey) -> String {
    let mut blob = vec![ED25519];
    blob.extend_from_slice(key.as_bytes());
    format!(
        "{name}+{}+{}",
        crate::to_hex(&key_id(name, key)),
        B64.encode(blob)
    )
}

/// Parses a verifier key string into its name and key.
pub fn parse_verifier_key(text: &str) -> Result<(String, VerifyingKey), NoteError> {
    let mut parts = text.trim().splitn(3, '+');
    let (Some(name), Some(id), Some(blob)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NoteError::BadKey("expected NAME+KEYID+KEY".into()));
    };
    let blob = B64
        .decode(blob)
        .map_err(|e| NoteError::BadKey(e.to_string()))?;
    if blob.len() != 33 || blob[0] != ED25519 {
        return Err(NoteError::BadKey("not an Ed25519 key".into()));
    }
    let bytes: [u8; 32] = blob[1..].try_into().expect("length checked");
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| NoteError::BadKey(e.to_string()))?;
    if crate::to_hex(&key_id(name, &key)) != id {
        return Err(NoteError::BadKey("key id does not match the key".into()));
    }
    Ok((name.to_string(), key))
}

/// Verifies a signed checkpoint by the log's key and parses it. The origin line must be the
/// key's name.
pub fn verify_checkpoint(
    note: &str,
    name: &str,
    key: &VerifyingKey,
) -> Result<Checkpoint, NoteError> {
    let split = note
        .find("\n\n")
        .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
    let text = &note[..split + 1];
    let signatures = &note[split + 2..];
    let wanted_id = key_id(name, key);
    let mut verified = false;
    for line in signatures.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            return Err(NoteError::Malformed(format!(
                "signature line `{line}` does not start with an em dash"
            )));
        };
        let Some((line_name, blob)) = rest.rsplit_once(' ') else {
            continue;
        };
        if line_name != name {
            continue;
        }
        let Ok(blob) = B64.decode(blob) else { continue };
        if blob.len() != 68 || blob[..4] != wanted_id {
            continue;
        }
        let signature = Signature::from_bytes(blob[4..].try_into().expect("length checked"));
        if key.verify(text.as_bytes(), &signature).is_ok() {
            verified = true;
        }
    }
    if !verified {
        return Err(NoteError::BadSignature(name.to_string()));
    }
    let mut lines = text.lines();
    let origin = lines.next().unwrap_or_default().to_string();
    if origin != name {
        return Err(NoteError::Malformed(format!(
            "origin `{origin}` is not the key's name `{name}`"
        )));
    }
    let size = lines
        .next()
        .and_then(|l| l.parse::<u64>().ok())
        .ok_or_else(|| NoteError::Malformed("second line is not a tree size".into()))?;
    let root = lines
        .next()
        .and_then(|l| B64.decode(l).ok())
        .and_then(|b| <Hash>::try_from(b.as_slice()).ok())
        .ok_or_else(|| NoteError::Malformed("third line is not a base64 SHA-256 root".into()))?;
    Ok(Checkpoint { origin, size, root })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn sign_and_verify_a_checkpoint() {
        let root = crate::leaf_hash(b"x");
        let note = sign_checkpoint("baygrid.example/log", 45, &root, &key());
        assert!(note.starts_with("baygrid.example/log\n45\n"));
        assert!(note.contains("\n\n\u{2014} baygrid.example/log "));
        assert!(note.ends_with('\n'));
        let vkey = verifier_key("baygrid.example/log", &key().verifying_key());
        let (name, public) = parse_verifier_key(&vkey).unwrap();
        let checkpoint = verify_checkpoint(&note, &name, &public).unwrap();
        assert_eq!(
            checkpoint,
            Checkpoint {
                origin: name.clone(),
                size: 45,
                root
            }
        );
        // any change to the body breaks the signature
        assert!(matches!(
            verify_checkpoint(&note.replace("\n45\n", "\n46\n"), &name, &public),
            Err(NoteError::BadSignature(_))
        ));
        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(verify_checkpoint(&note, &name, &other.verifying_key()).is_err());
        assert!(parse_verifier_key(&vkey.replace("+", "-")).is_err());
    }
}
