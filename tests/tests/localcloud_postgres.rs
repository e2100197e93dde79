//! The local cloud's PostgreSQL takes the project's migrations.

use anyhow::Result;
use qdb_tests::Cloud;
use sqlx::postgres::PgPoolOptions;

#[tokio::test]
async fn migrations_apply_and_are_recorded() -> Result<()> {
    let cloud = Cloud::load()?;
    let pool = PgPoolOptions::new().max_connections(2).connect(&cloud.database_url).await?;
    let migrator = sqlx::migrate!("../migrations");
    migrator.run(&pool).await?;
    // Running them again is a no-op, as it must be for every replica's start-up.
    migrator.run(&pool).await?;
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(&pool).await?;
    assert_eq!(applied, migrator.iter().count() as i64);
    assert!(applied >= 1, "the journal migration exists");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    for t in ["databases", "instructions", "outbox"] {
        assert!(tables.iter().any(|x| x == t), "table {t} missing: {tables:?}");
    }
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&pool).await?;
    assert!(!version.is_empty());
    Ok(())
}
