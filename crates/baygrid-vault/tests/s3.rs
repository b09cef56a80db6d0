//! A vault on an S3-compatible store (moto's server, started by scripts/start-s3.sh): the
//! same streamed writes and digest-checked reads and copies as a local vault. Its own test
//! binary, since the store's endpoint and keys come from the process's `AWS_*` variables.

use baygrid_vault::{object_key, Vault, VaultError};

fn endpoint() -> Option<String> {
    match std::env::var("BAYGRID_TEST_S3_ENDPOINT") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("no S3 server: CI must run the S3 vault test (scripts/test.sh starts one)")
        }
        _ => {
            eprintln!("\n!!! SKIPPING the S3 vault test: set BAYGRID_TEST_S3_ENDPOINT (scripts/start-s3.sh) !!!\n");
            None
        }
    }
}

#[tokio::test]
async fn an_s3_vault_streams_files_and_checks_their_digests() {
    let Some(endpoint) = endpoint() else {
        return;
    };
    // the only test in this binary: setting the process's variables here is safe
    for (key, value) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "baygrid"),
        ("AWS_SECRET_ACCESS_KEY", "baygrid-secret"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(key, value);
    }
    let bucket = format!(
        "baygrid-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let made = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success(), "{}", made.status());

    let vault = Vault::open(&format!("s3://{bucket}/hk-cyberport")).unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fate/default_credit_hetero_host.csv");
    let key = object_key("hk-card-features", "up-1", "default_credit_hetero_host.csv");
    let stored = vault.put_file(&key, &source).await.unwrap();
    assert_eq!(stored.bytes, std::fs::metadata(&source).unwrap().len());

    // read back through the digest check, and copied into a local vault
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("back.csv");
    vault.get_file(&key, &stored.sha256, &back).await.unwrap();
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&source).unwrap()
    );
    let local = Vault::open(dir.path().join("sz").to_str().unwrap()).unwrap();
    let copied = vault
        .copy_to(
            &key,
            &stored.sha256,
            &local,
            "datasets/copy/uploads/f1/host.csv",
        )
        .await
        .unwrap();
    assert_eq!(copied, stored);

    // the wrong digest: refused, nothing left behind
    let elsewhere = dir.path().join("wrong.csv");
    let err = vault
        .get_file(&key, &"0".repeat(64), &elsewhere)
        .await
        .unwrap_err();
    assert!(matches!(err, VaultError::Checksum { .. }), "{err}");
    assert!(!elsewhere.exists());
}
