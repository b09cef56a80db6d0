//! Fresh stores for tests: a SQLite file in a temporary directory, or a new database on
//! the PostgreSQL server named by `BAYGRID_TEST_POSTGRES_URL`.

use sqlx::Connection;

/// The environment variable naming a PostgreSQL server for tests, e.g.
/// `postgres://baygrid:baygrid@127.0.0.1:5432/postgres`.
pub const POSTGRES_ENV: &str = "BAYGRID_TEST_POSTGRES_URL";

/// A URL for a new, empty PostgreSQL database, or `None` when no server is configured.
/// Under CI (`CI` set) a missing server is a failure, never a skip.
pub async fn fresh_postgres_url() -> Option<String> {
    let Ok(admin_url) = std::env::var(POSTGRES_ENV) else {
        if std::env::var_os("CI").is_some() {
            panic!("{POSTGRES_ENV} is not set: CI must run the PostgreSQL store tests (.ci/run starts the server)");
        }
        eprintln!(
            "\n!!! SKIPPING PostgreSQL tests: {POSTGRES_ENV} is not set. \
             Run `bash .ci/run` (it starts PostgreSQL) to include them. !!!\n"
        );
        return None;
    };
    Some(
        create_database(&admin_url, "baygrid_test")
            .await
            .unwrap_or_else(|e| {
                panic!("cannot create a test database through {POSTGRES_ENV}: {e}")
            }),
    )
}

/// Creates a new database named `PREFIX_<ulid>` on the server of `admin_url` (a URL ending
/// in an existing database's name) and returns its URL.
pub async fn create_database(admin_url: &str, prefix: &str) -> Result<String, sqlx::Error> {
    let name = format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base.to_string())
        .ok_or_else(|| {
            sqlx::Error::Configuration("postgres url must end with a database name".into())
        })?;
    Ok(format!("{base}/{name}"))
}

/// A URL for a SQLite store in `dir`.
pub fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("baygrid.db").display())
}
