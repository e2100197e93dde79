//! Work leases: a replica works on a database only while it holds its lease in `databases`;
//! every journal write after a claim carries `holds_lease!`, so a replica that lost its lease
//! writes nothing.

use std::time::Duration;

use sqlx::PgPool;

use crate::journal::{JournalError, err};

/// Takes up to `limit` databases that have instructions due and no live lease.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<String>, JournalError> {
    sqlx::query_scalar(
        "WITH due AS (
             SELECT d.database_id FROM databases d
             WHERE d.database_id IN (SELECT i.database_id FROM instructions i
                                     WHERE i.state = 'pending' AND i.next_attempt_at <= now())
               AND (d.lease_until IS NULL OR d.lease_until < now())
             LIMIT $2
             FOR UPDATE OF d SKIP LOCKED)
         UPDATE databases d SET lease_owner = $1, lease_until = now() + make_interval(secs => $3)
         FROM due WHERE d.database_id = due.database_id
         RETURNING d.database_id",
    )
    .bind(owner)
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
    .map_err(err("claiming databases"))
}

/// The condition every journal write after a claim carries (`$lease` is the owner, or NULL for
/// writes that need no lease): the writer still holds a live lease on the database.
macro_rules! holds_lease {
    ($owner:literal) => {
        concat!(
            "(",
            $owner,
            "::text IS NULL OR EXISTS (SELECT 1 FROM databases l
               WHERE l.database_id = instructions.database_id AND l.lease_owner = ",
            $owner,
            " AND l.lease_until > now()))"
        )
    };
}

pub(crate) use holds_lease;

pub async fn release(pool: &PgPool, owner: &str, database_id: &str) -> Result<(), JournalError> {
    sqlx::query(
        "UPDATE databases SET lease_owner = NULL, lease_until = NULL
         WHERE database_id = $1 AND lease_owner = $2",
    )
    .bind(database_id)
    .bind(owner)
    .execute(pool)
    .await
    .map_err(err("releasing database"))?;
    Ok(())
}

/// Gives up every lease of `owner` (at shutdown), so other replicas continue at once.
pub async fn release_all(pool: &PgPool, owner: &str) -> Result<u64, JournalError> {
    let done =
        sqlx::query("UPDATE databases SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1")
            .bind(owner)
            .execute(pool)
            .await
            .map_err(err("releasing databases"))?;
    Ok(done.rows_affected())
}
