//! The PostgreSQL journal. Accepting an instruction is one transaction: record it under its id
//! (the idempotency key), pass it through the per-database sequence fence, and queue the gossip
//! that reports the outcome, so the Kafka offset can be stored as soon as it commits.

use sqlx::{PgConnection, Row};

#[derive(Debug, thiserror::Error)]
#[error("journal: {what}")]
pub struct JournalError {
    what: &'static str,
    #[source]
    source: sqlx::Error,
}

fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> JournalError {
    move |source| JournalError { what, source }
}

/// An instruction as the journal records it.
#[derive(Debug, Clone)]
pub struct NewInstruction<'a> {
    pub id: &'a str,
    pub database_id: &'a str,
    pub cluster: &'a str,
    pub sequence: i64,
    pub operation: &'a str,
    /// The encoded message as received.
    pub payload: &'a [u8],
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
}

/// What the journal already says about an instruction id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub state: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// First sight, above the fence: pending, to be applied in sequence order.
    New,
    /// The id was journaled before: no new effect; its outcome is to be announced again.
    Duplicate(Recorded),
    /// At or below the highest sequence already accepted for the database: recorded as
    /// superseded, never applied.
    Stale { last_sequence: i64 },
}

/// Journals `ins`. Run it inside a transaction together with the outbox insert of the gossip
/// that reports the result, so either both happen or neither.
pub async fn accept(conn: &mut PgConnection, ins: &NewInstruction<'_>) -> Result<Accepted, JournalError> {
    let inserted = sqlx::query(
        "INSERT INTO instructions
             (id, database_id, cluster, sequence, operation, payload, state, source_partition, source_offset)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ins.id)
    .bind(ins.database_id)
    .bind(ins.cluster)
    .bind(ins.sequence)
    .bind(ins.operation)
    .bind(ins.payload)
    .bind(ins.source_partition)
    .bind(ins.source_offset)
    .execute(&mut *conn)
    .await
    .map_err(err("recording instruction"))?;
    if inserted.rows_affected() == 0 {
        let row = sqlx::query("SELECT state, reason, message FROM instructions WHERE id = $1")
            .bind(ins.id)
            .fetch_one(&mut *conn)
            .await
            .map_err(err("reading duplicate instruction"))?;
        return Ok(Accepted::Duplicate(Recorded {
            state: row.get("state"),
            reason: row.get("reason"),
            message: row.get("message"),
        }));
    }
    // The row lock taken by the upsert serialises concurrent instructions of one database.
    let raised = sqlx::query(
        "INSERT INTO databases (database_id, cluster, last_sequence) VALUES ($1, $2, $3)
         ON CONFLICT (database_id) DO UPDATE SET last_sequence = EXCLUDED.last_sequence
             WHERE databases.last_sequence < EXCLUDED.last_sequence
         RETURNING last_sequence",
    )
    .bind(ins.database_id)
    .bind(ins.cluster)
    .bind(ins.sequence)
    .fetch_optional(&mut *conn)
    .await
    .map_err(err("raising the sequence fence"))?;
    if raised.is_some() {
        return Ok(Accepted::New);
    }
    let last_sequence: i64 = sqlx::query_scalar("SELECT last_sequence FROM databases WHERE database_id = $1")
        .bind(ins.database_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(err("reading the sequence fence"))?;
    sqlx::query(
        "UPDATE instructions SET state = 'superseded', reason = 'STALE_SEQUENCE',
             message = $2, finished_at = now()
         WHERE id = $1",
    )
    .bind(ins.id)
    .bind(format!("sequence {} is not above {last_sequence}, already accepted", ins.sequence))
    .execute(&mut *conn)
    .await
    .map_err(err("superseding stale instruction"))?;
    Ok(Accepted::Stale { last_sequence })
}

/// Queues one encoded gossip event for the outbox drainer.
pub async fn enqueue_gossip(
    conn: &mut PgConnection,
    database_id: &str,
    payload: &[u8],
) -> Result<(), JournalError> {
    sqlx::query("INSERT INTO gossip_outbox (database_id, payload) VALUES ($1, $2)")
        .bind(database_id)
        .bind(payload)
        .execute(conn)
        .await
        .map_err(err("queueing gossip"))?;
    Ok(())
}
