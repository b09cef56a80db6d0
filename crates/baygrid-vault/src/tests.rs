use super::*;

fn shared(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fate")
        .join(file)
}

fn example_schema(name: &str) -> Vec<Column> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/datasets")
        .join(format!("{name}.yaml"));
    let spec: baygrid_api::DatasetSpec =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    spec.schema
}

#[tokio::test]
async fn files_round_trip_with_their_digest_and_a_changed_object_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vault = Vault::open(dir.path().join("vault").to_str().unwrap()).unwrap();
    let source = shared("breast_hetero_host.csv");
    let key = object_key("breast-host", "u1", "breast_hetero_host.csv");
    let stored = vault.put_file(&key, &source).await.unwrap();
    let original = std::fs::read(&source).unwrap();
    assert_eq!(stored.bytes, original.len() as u64);
    assert_eq!(stored.sha256, hex::encode(Sha256::digest(&original)));

    let copy = dir.path().join("staged/host.csv");
    let got = vault.get_file(&key, &stored.sha256, &copy).await.unwrap();
    assert_eq!(got, stored);
    assert_eq!(std::fs::read(&copy).unwrap(), original);

    // someone edits the object in place: the read fails and leaves nothing behind
    let object = dir.path().join("vault").join(&key);
    let mut edited = original.clone();
    edited[100] ^= 1;
    std::fs::write(&object, &edited).unwrap();
    let elsewhere = dir.path().join("staged/again.csv");
    let err = vault
        .get_file(&key, &stored.sha256, &elsewhere)
        .await
        .unwrap_err();
    assert!(matches!(err, VaultError::Checksum { .. }), "{err}");
    assert!(!elsewhere.exists());
    assert!(!elsewhere.with_extension("partial").exists());
}

#[test]
fn urls_are_checked() {
    for url in ["relative/dir", "ftp://host/x", "s3://"] {
        assert!(
            matches!(Vault::open(url), Err(VaultError::Url { .. })),
            "{url}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("v").display());
    Vault::open(&url).unwrap();
    assert!(dir.path().join("v").is_dir());
}

#[test]
fn the_shared_credit_tables_match_their_example_schemas() {
    let guest = inspect(
        &shared("default_credit_hetero_guest.csv"),
        &example_schema("sz-credit-labels"),
    )
    .unwrap();
    assert_eq!(
        guest,
        Inspected {
            format: Format::Csv,
            rows: 30000
        }
    );
    let host = inspect(
        &shared("default_credit_hetero_host.csv"),
        &example_schema("hk-card-features"),
    )
    .unwrap();
    assert_eq!(host.rows, 30000);
    // the individuals: 30,000 card holders in each table, the same ones
    let (_, mut in_guest) = inspect_counting(
        &shared("default_credit_hetero_guest.csv"),
        &example_schema("sz-credit-labels"),
        Some("id"),
    )
    .unwrap();
    assert_eq!(in_guest.count(), 30000);
    let (_, in_host) = inspect_counting(
        &shared("default_credit_hetero_host.csv"),
        &example_schema("hk-card-features"),
        Some("id"),
    )
    .unwrap();
    in_guest.merge(in_host);
    assert_eq!(in_guest.count(), 30000);
    let err = inspect_counting(
        &shared("default_credit_hetero_guest.csv"),
        &example_schema("sz-credit-labels"),
        Some("card_no"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("`card_no` is not in the schema"),
        "{err}"
    );
    // the other party's file is not this dataset
    let err = inspect(
        &shared("default_credit_hetero_host.csv"),
        &example_schema("sz-credit-labels"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("column 2"), "{err}");
}

#[test]
fn ragged_rows_and_other_formats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let schema = vec![
        Column {
            name: "id".into(),
            kind: ColumnType::String,
        },
        Column {
            name: "x".into(),
            kind: ColumnType::Float,
        },
    ];
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "id,x\n1,0.5\n2\n").unwrap();
    let err = inspect(&csv, &schema).unwrap_err().to_string();
    assert!(err.contains("line 3"), "{err}");
    let json = dir.path().join("t.json");
    std::fs::write(&json, "{}").unwrap();
    assert!(inspect(&json, &schema).is_err());
    let fake = dir.path().join("t.parquet");
    std::fs::write(&fake, "id,x\n").unwrap();
    let err = inspect(&fake, &schema).unwrap_err().to_string();
    assert!(err.contains("not a Parquet file"), "{err}");
}

#[test]
fn parquet_files_are_checked_by_their_footer() {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let message = "message t { REQUIRED BYTE_ARRAY id (UTF8); REQUIRED DOUBLE x; }";
    let file_schema = std::sync::Arc::new(parse_message_type(message).unwrap());
    let props = std::sync::Arc::new(WriterProperties::builder().build());
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), file_schema, props)
            .unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    column
        .typed::<ByteArrayType>()
        .write_batch(
            &[
                ByteArray::from("a"),
                ByteArray::from("b"),
                ByteArray::from("a"),
            ],
            None,
            None,
        )
        .unwrap();
    column.close().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    column
        .typed::<DoubleType>()
        .write_batch(&[0.1, 0.2, 0.3], None, None)
        .unwrap();
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();

    let mut schema = vec![
        Column {
            name: "id".into(),
            kind: ColumnType::String,
        },
        Column {
            name: "x".into(),
            kind: ColumnType::Float,
        },
    ];
    assert_eq!(
        inspect(&path, &schema).unwrap(),
        Inspected {
            format: Format::Parquet,
            rows: 3
        }
    );
    // two individuals in three rows, read from the subject column alone
    let (_, subjects) = inspect_counting(&path, &schema, Some("id")).unwrap();
    assert_eq!(subjects.count(), 2);
    schema[1].kind = ColumnType::Bool;
    let err = inspect(&path, &schema).unwrap_err().to_string();
    assert!(err.contains("cannot hold"), "{err}");
    schema[1] = Column {
        name: "y".into(),
        kind: ColumnType::Float,
    };
    let err = inspect(&path, &schema).unwrap_err().to_string();
    assert!(err.contains("column 2 is `x`"), "{err}");
}

#[tokio::test]
async fn copies_between_vaults_check_the_digest_and_leave_nothing_on_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let from = Vault::open(dir.path().join("sz").to_str().unwrap()).unwrap();
    let to = Vault::open(dir.path().join("hk").to_str().unwrap()).unwrap();
    let source = shared("breast_hetero_guest.csv");
    let key = object_key("breast-guest", "u1", "breast_hetero_guest.csv");
    let stored = from.put_file(&key, &source).await.unwrap();
    let target = object_key("breast-guest-hk", "t1", "breast_hetero_guest.csv");
    let copied = from
        .copy_to(&key, &stored.sha256, &to, &target)
        .await
        .unwrap();
    assert_eq!(copied, stored);
    assert_eq!(
        std::fs::read(dir.path().join("hk").join(&target)).unwrap(),
        std::fs::read(&source).unwrap()
    );
    // a digest that does not match: nothing stays at the target
    let other = object_key("breast-guest-hk", "t2", "breast_hetero_guest.csv");
    let err = from
        .copy_to(&key, &"0".repeat(64), &to, &other)
        .await
        .unwrap_err();
    assert!(matches!(err, VaultError::Checksum { .. }), "{err}");
    assert!(!dir.path().join("hk").join(&other).exists());
}
