//! The PostgreSQL journal. Accepting an instruction is one transaction: record it under its id
//! (the idempotency key), pass it through the per-database sequence fence, and queue the gossip
//! that reports the outcome, so the Kafka offset can be stored as soon as it commits.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row};

use crate::lease::holds_lease;
// The outbox and the leases have modules of their own; what the journal's callers used from
// here stays reachable here.
pub use crate::lease::{claim, release, release_all};
pub use crate::outbox::{Outgoing, Topic, enqueue, outbox_batch, outbox_delete, outbox_park};

#[derive(Debug, thiserror::Error)]
#[error("journal: {what}")]
pub struct JournalError {
    what: &'static str,
    #[source]
    source: sqlx::Error,
}

pub(crate) fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> JournalError {
    move |source| JournalError { what, source }
}

/// How long a provisioner session may sit idle inside a transaction before PostgreSQL ends it.
/// A replica frozen mid-transaction otherwise holds its row and advisory locks (the outbox
/// drain's among them) until it wakes. Above the longest legitimate idle gap: the outbox drain
/// waits inside its transaction for Kafka's delivery reports, up to the producer's 30 s
/// `message.timeout.ms`.
pub const IDLE_IN_TRANSACTION_LIMIT: Duration = Duration::from_secs(60);

/// The journal's connection pool; every session ends a transaction left idle past `idle_limit`.
pub async fn connect(url: &str, max_connections: u32, idle_limit: Duration) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .options([("idle_in_transaction_session_timeout", format!("{}ms", idle_limit.as_millis()))]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// For beginning and committing transactions.
pub fn tx_error(source: sqlx::Error) -> JournalError {
    JournalError { what: "transaction", source }
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

/// An instruction's state in the journal (the `instructions.state` column and its CHECK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Journaled, waiting for its turn to be applied.
    Pending,
    /// Written to the cluster, waiting for the operator's word.
    Applied,
    Succeeded,
    Failed,
    Rejected,
    Superseded,
}

impl State {
    pub const ALL: [State; 6] =
        [State::Pending, State::Applied, State::Succeeded, State::Failed, State::Rejected, State::Superseded];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Applied => "applied",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Rejected => "rejected",
            State::Superseded => "superseded",
        }
    }

    /// The column's text; the CHECK constraint allows nothing else.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// What the journal already says about an instruction id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub state: State,
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

/// What the journal recorded for an instruction id seen before.
async fn recorded(conn: &mut PgConnection, id: &str) -> Result<Recorded, JournalError> {
    let row = sqlx::query("SELECT state, reason, message FROM instructions WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .map_err(err("reading duplicate instruction"))?;
    let text: String = row.get("state");
    let state = State::parse(&text).ok_or(JournalError {
        what: "reading duplicate instruction",
        source: sqlx::Error::Decode(format!("unknown journal state {text:?}").into()),
    })?;
    Ok(Recorded { state, reason: row.get("reason"), message: row.get("message") })
}

/// Journals `ins`, and when it is new, queues `accepted` (the gossip that says so) in the same
/// statement: the instruction, the sequence fence and the outbox row were three round trips per
/// message. A duplicate or stale instruction queues nothing here; its caller announces it. Run
/// it inside the transaction that commits the batch with its offsets.
pub async fn accept(
    conn: &mut PgConnection,
    ins: &NewInstruction<'_>,
    accepted: &Outgoing,
) -> Result<Accepted, JournalError> {
    // The row lock taken by the fence's upsert serialises concurrent instructions of one database.
    let (inserted, raised): (bool, bool) = sqlx::query_as(
        "WITH journaled AS (
             INSERT INTO instructions
                 (id, database_id, cluster, sequence, operation, payload, state, source_partition, source_offset)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)
             ON CONFLICT (id) DO NOTHING
             RETURNING database_id),
         fence AS (
             INSERT INTO databases (database_id, cluster, last_sequence)
             SELECT database_id, $3, $4 FROM journaled
             ON CONFLICT (database_id) DO UPDATE SET last_sequence = EXCLUDED.last_sequence
                 WHERE databases.last_sequence < EXCLUDED.last_sequence
             RETURNING database_id),
         queued AS (
             INSERT INTO outbox (topic, database_id, key, headers, payload)
             SELECT $9, database_id, $10, $11, $12 FROM fence)
         SELECT EXISTS (SELECT 1 FROM journaled), EXISTS (SELECT 1 FROM fence)",
    )
    .bind(ins.id)
    .bind(ins.database_id)
    .bind(ins.cluster)
    .bind(ins.sequence)
    .bind(ins.operation)
    .bind(ins.payload)
    .bind(ins.source_partition)
    .bind(ins.source_offset)
    .bind(accepted.topic.as_str())
    .bind(accepted.key.as_deref())
    .bind(sqlx::types::Json(&accepted.headers))
    .bind(&accepted.payload)
    .fetch_one(&mut *conn)
    .await
    .map_err(err("recording instruction"))?;
    if !inserted {
        return Ok(Accepted::Duplicate(recorded(conn, ins.id).await?));
    }
    if raised {
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

/// Records an instruction rejected on arrival under its id, so a redelivery is answered with
/// the same rejection. Returns the earlier record if the id was journaled before.
pub async fn reject(
    conn: &mut PgConnection,
    ins: &NewInstruction<'_>,
    reason: &str,
    message: &str,
) -> Result<Option<Recorded>, JournalError> {
    let inserted = sqlx::query(
        "INSERT INTO instructions
             (id, database_id, cluster, sequence, operation, payload, state, reason, message,
              finished_at, source_partition, source_offset)
         VALUES ($1, $2, $3, $4, $5, $6, 'rejected', $7, $8, now(), $9, $10)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ins.id)
    .bind(ins.database_id)
    .bind(ins.cluster)
    .bind(ins.sequence)
    .bind(ins.operation)
    .bind(ins.payload)
    .bind(reason)
    .bind(message)
    .bind(ins.source_partition)
    .bind(ins.source_offset)
    .execute(&mut *conn)
    .await
    .map_err(err("recording rejected instruction"))?;
    if inserted.rows_affected() == 1 {
        return Ok(None);
    }
    Ok(Some(recorded(conn, ins.id).await?))
}

/// A journaled instruction that is not yet terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub id: String,
    pub database_id: String,
    pub cluster: String,
    pub sequence: i64,
    pub operation: String,
    pub payload: Vec<u8>,
    pub attempts: i32,
    pub generation: Option<i64>,
    pub progress: String,
    /// Due now (pending) or past its deadline (applied).
    pub due: bool,
    /// Since the instruction was journaled: the deadline of one not yet applied counts from here.
    pub age: Duration,
    /// Where it was consumed from (-1 when unknown), for its dead-letter copy.
    pub source_partition: i32,
    pub source_offset: i64,
}

fn open_from(r: &sqlx::postgres::PgRow) -> Open {
    Open {
        id: r.get("id"),
        database_id: r.get("database_id"),
        cluster: r.get("cluster"),
        sequence: r.get("sequence"),
        operation: r.get("operation"),
        payload: r.get("payload"),
        attempts: r.get("attempts"),
        generation: r.get("generation"),
        progress: r.get("progress"),
        due: r.get("due"),
        age: Duration::try_from_secs_f64(r.get::<f64, _>("age_secs")).unwrap_or_default(),
        source_partition: r.get("source_partition"),
        source_offset: r.get("source_offset"),
    }
}

macro_rules! open_columns {
    () => {
        "id, database_id, cluster, sequence, operation, payload, attempts, generation, progress,
         greatest(extract(epoch FROM now() - received_at), 0)::float8 AS age_secs,
         coalesce(source_partition, -1) AS source_partition, coalesce(source_offset, -1) AS source_offset"
    };
}

/// What a worker holding a database's lease does next.
// One value per step, moved once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Apply this instruction (the pending one with the lowest sequence, due now), knowing the
    /// spec last applied to the database; the lease was renewed.
    Apply(Open, Option<qdb_crd::QuestDBSpec>),
    /// Nothing is due (no pending instruction, or the next one waits for its retry): the lease
    /// was given back, so another replica may take the database as soon as something is due.
    Released,
    /// The lease ran out or another replica holds it now: stop; anything written would be
    /// refused anyway.
    LeaseLost,
}

/// Renews `owner`'s lease and reads the database's next due instruction, or gives the lease
/// back when nothing is due, in one statement: a worker's every step otherwise cost three round
/// trips (renew, read, release), a third of PostgreSQL's work per instruction.
pub async fn next(
    pool: &PgPool,
    owner: &str,
    database_id: &str,
    lease: Duration,
) -> Result<Next, JournalError> {
    let row = sqlx::query(concat!(
        "WITH head AS (
             SELECT ",
        open_columns!(),
        ", next_attempt_at <= now() AS due
             FROM instructions
             WHERE database_id = $1 AND state = 'pending' ORDER BY sequence LIMIT 1),
         lease AS (
             UPDATE databases d
             SET lease_until = CASE WHEN EXISTS (SELECT 1 FROM head WHERE due)
                                    THEN now() + make_interval(secs => $3) END,
                 lease_owner = CASE WHEN EXISTS (SELECT 1 FROM head WHERE due) THEN d.lease_owner END
             WHERE d.database_id = $1 AND d.lease_owner = $2 AND d.lease_until > now()
             RETURNING d.spec, d.lease_owner IS NOT NULL AS held)
         SELECT lease.held, lease.spec, head.* FROM lease LEFT JOIN head ON lease.held"
    ))
    .bind(database_id)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
    .map_err(err("reading the next instruction"))?;
    let Some(r) = row else { return Ok(Next::LeaseLost) };
    if !r.get::<bool, _>("held") {
        return Ok(Next::Released);
    }
    let spec: Option<sqlx::types::Json<qdb_crd::QuestDBSpec>> = r.get("spec");
    Ok(Next::Apply(open_from(&r), spec.map(|j| j.0)))
}

/// Applied instructions waiting for the cluster to report their outcome; `due` means the
/// deadline has passed. With `database_id` None, all of them (oldest first, at most `limit`).
pub async fn applied(
    pool: &PgPool,
    database_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Open>, JournalError> {
    // Two statements, not one with `$1 IS NULL OR database_id = $1`: PostgreSQL's generic plan
    // for that form reads every applied row, also for the one database a watch event is about.
    let query = match database_id {
        Some(db) => sqlx::query(concat!(
            "SELECT ",
            open_columns!(),
            ", deadline_at <= now() AS due FROM instructions
             WHERE state = 'applied' AND database_id = $1 ORDER BY applied_at LIMIT $2"
        ))
        .bind(db),
        None => sqlx::query(concat!(
            "SELECT ",
            open_columns!(),
            ", deadline_at <= now() AS due FROM instructions
             WHERE state = 'applied' ORDER BY applied_at LIMIT $1"
        )),
    };
    let rows = query.bind(limit).fetch_all(pool).await.map_err(err("reading applied instructions"))?;
    Ok(rows.iter().map(open_from).collect())
}

/// What recording an apply found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordedApply {
    /// Since the instruction was received.
    pub secs: f64,
    /// Earlier instructions of the database are still applied, waiting for their outcome (the
    /// new spec may supersede them).
    pub earlier_waiting: bool,
}

/// Pending -> applied, in one statement: records the spec now on the cluster (None after a
/// delete) and queues the gossip `applied` event. None if it was no longer pending or `owner`
/// no longer holds the lease.
#[allow(clippy::too_many_arguments)]
pub async fn record_applied(
    pool: &PgPool,
    owner: &str,
    id: &str,
    generation: Option<i64>,
    deadline: Duration,
    spec: Option<&qdb_crd::QuestDBSpec>,
    gossip: &Outgoing,
) -> Result<Option<RecordedApply>, JournalError> {
    // The statement's snapshot is from before its update: `earlier` sees this one as pending.
    let row: Option<(f64, bool)> = sqlx::query_as(concat!(
        "WITH done AS (
             UPDATE instructions SET state = 'applied', generation = $2, applied_at = now(),
                 deadline_at = now() + make_interval(secs => $3), attempts = attempts + 1, message = ''
             WHERE id = $1 AND state = 'pending' AND ",
        holds_lease!("$8"),
        "
             RETURNING database_id, extract(epoch FROM now() - received_at)::float8 AS secs),
         known AS (
             UPDATE databases SET spec = $4 WHERE database_id IN (SELECT database_id FROM done)),
         queued AS (
             INSERT INTO outbox (topic, database_id, key, headers, payload)
             SELECT 'gossip', database_id, $5, $6, $7 FROM done)
         SELECT secs, EXISTS (SELECT 1 FROM instructions e
                              WHERE e.database_id = done.database_id AND e.state = 'applied') AS earlier
         FROM done"
    ))
    .bind(id)
    .bind(generation)
    .bind(deadline.as_secs_f64())
    .bind(spec.map(sqlx::types::Json))
    .bind(gossip.key.as_deref())
    .bind(sqlx::types::Json(&gossip.headers))
    .bind(&gossip.payload)
    .bind(owner)
    .fetch_optional(pool)
    .await
    .map_err(err("recording the apply"))?;
    Ok(row.map(|(secs, earlier_waiting)| RecordedApply { secs, earlier_waiting }))
}

/// Open -> terminal, and `announce` queued for the outbox, in one statement (a transaction of
/// two writes cost four round trips, and every instruction ends here once). False if another
/// replica got there first, or (`lease` Some) the writer no longer holds the database's lease:
/// nothing is announced then. The tracker judges applied instructions from the resource's
/// status and needs no lease (`None`).
#[allow(clippy::too_many_arguments)]
pub async fn finish<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    lease: Option<&str>,
    id: &str,
    state: State,
    reason: &str,
    message: &str,
    announce: &[Outgoing],
) -> Result<bool, JournalError> {
    let finished: Option<bool> = sqlx::query_scalar(concat!(
        "WITH done AS (
             UPDATE instructions SET state = $2, reason = $3, message = $4, finished_at = now()
             WHERE id = $1 AND state IN ('pending', 'applied') AND ",
        holds_lease!("$5"),
        "
             RETURNING id),
         queued AS (
             INSERT INTO outbox (topic, database_id, key, headers, payload)
             SELECT o.topic, o.database_id, o.key, o.headers, o.payload
             FROM unnest($6::text[], $7::text[], $8::bytea[], $9::jsonb[], $10::bytea[])
                  AS o(topic, database_id, key, headers, payload)
             WHERE EXISTS (SELECT 1 FROM done))
         SELECT true FROM done"
    ))
    .bind(id)
    .bind(state.as_str())
    .bind(reason)
    .bind(message)
    .bind(lease)
    .bind(announce.iter().map(|o| o.topic.as_str()).collect::<Vec<_>>())
    .bind(announce.iter().map(|o| o.database_id.as_str()).collect::<Vec<_>>())
    .bind(announce.iter().map(|o| o.key.clone()).collect::<Vec<_>>())
    .bind(announce.iter().map(|o| sqlx::types::Json(&o.headers)).collect::<Vec<_>>())
    .bind(announce.iter().map(|o| o.payload.as_slice()).collect::<Vec<_>>())
    .fetch_optional(conn)
    .await
    .map_err(err("finishing instruction"))?;
    Ok(finished.is_some())
}

/// The query of `successor` (its parameters: database, sequence, generation), public for the
/// test that it reads one database's rows through an index.
pub const SUCCESSOR: &str = "SELECT id FROM instructions
     WHERE database_id = $1 AND sequence > $2 AND applied_at IS NOT NULL
       AND (generation IS NULL OR generation > coalesce($3, 0))
     ORDER BY sequence LIMIT 1";

/// The instruction that replaced `row`: the next one applied after it that changed the spec
/// again, or deleted it (None if the journal knows of none, e.g. the spec was written by hand).
pub async fn successor(pool: &PgPool, row: &Open) -> Result<Option<String>, JournalError> {
    sqlx::query_scalar(SUCCESSOR)
        .bind(&row.database_id)
        .bind(row.sequence)
        .bind(row.generation)
        .fetch_optional(pool)
        .await
        .map_err(err("reading the superseding instruction"))
}

/// Records a new progress text; false if it is what was announced last.
pub async fn set_progress(conn: &mut PgConnection, id: &str, progress: &str) -> Result<bool, JournalError> {
    let done = sqlx::query(
        "UPDATE instructions SET progress = $2 WHERE id = $1 AND state = 'applied' AND progress <> $2",
    )
    .bind(id)
    .bind(progress)
    .execute(conn)
    .await
    .map_err(err("recording progress"))?;
    Ok(done.rows_affected() == 1)
}

/// An applied instruction whose change is delayed by design until `until` (EBS's cool-down)
/// gets its deadline counted from then. Never shortened.
pub async fn extend_deadline(
    conn: &mut PgConnection,
    id: &str,
    until: jiff::Timestamp,
    deadline: Duration,
) -> Result<(), JournalError> {
    sqlx::query(
        "UPDATE instructions SET deadline_at = GREATEST(deadline_at, $2::timestamptz + make_interval(secs => $3))
         WHERE id = $1 AND state = 'applied'",
    )
    .bind(id)
    .bind(until.to_string())
    .bind(deadline.as_secs_f64())
    .execute(conn)
    .await
    .map_err(err("extending the deadline"))?;
    Ok(())
}

/// A failed attempt: the database's pending instructions wait `delay`, so its order holds.
/// Written only while `owner` holds the lease; false when it no longer does.
pub async fn retry_later(
    pool: &PgPool,
    owner: &str,
    head: &Open,
    delay: Duration,
    error: &str,
) -> Result<bool, JournalError> {
    let done = sqlx::query(concat!(
        "UPDATE instructions
         SET next_attempt_at = now() + make_interval(secs => $3),
             attempts = attempts + CASE WHEN id = $2 THEN 1 ELSE 0 END,
             message = CASE WHEN id = $2 THEN $4 ELSE message END
         WHERE database_id = $1 AND state = 'pending' AND ",
        holds_lease!("$5")
    ))
    .bind(&head.database_id)
    .bind(&head.id)
    .bind(delay.as_secs_f64())
    .bind(error)
    .bind(owner)
    .execute(pool)
    .await
    .map_err(err("scheduling a retry"))?;
    Ok(done.rows_affected() > 0)
}

/// Deletes up to `limit` finished instructions that ended more than `retention` ago, and says
/// how many. The per-database sequence fence (`databases`) is kept, so a message redelivered
/// after its row went is still stale, never applied again.
pub async fn prune(pool: &PgPool, retention: Duration, limit: i64) -> Result<u64, JournalError> {
    let finished: Vec<&str> = State::ALL
        .into_iter()
        .filter(|s| !matches!(s, State::Pending | State::Applied))
        .map(State::as_str)
        .collect();
    let done = sqlx::query(
        "DELETE FROM instructions WHERE id IN (
             SELECT id FROM instructions
             WHERE state = ANY($1) AND finished_at < now() - make_interval(secs => $2)
             LIMIT $3)",
    )
    .bind(&finished)
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(pool)
    .await
    .map_err(err("pruning finished instructions"))?;
    Ok(done.rows_affected())
}

/// The journal's size in instructions, for /metrics.
pub async fn rows(pool: &PgPool) -> Result<i64, JournalError> {
    sqlx::query_scalar("SELECT count(*) FROM instructions")
        .fetch_one(pool)
        .await
        .map_err(err("counting the journal's rows"))
}

/// Counts for /metrics: open instructions by state and the outbox size and age.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub pending: i64,
    pub applied: i64,
    pub outbox: i64,
    pub outbox_age_secs: f64,
}

pub async fn backlog(pool: &PgPool) -> Result<Backlog, JournalError> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM instructions WHERE state = 'pending') AS pending,
                (SELECT count(*) FROM instructions WHERE state = 'applied') AS applied,
                (SELECT count(*) FROM outbox) AS outbox,
                coalesce((SELECT extract(epoch FROM now() - min(created_at))::float8 FROM outbox), 0)
                    AS outbox_age",
    )
    .fetch_one(pool)
    .await
    .map_err(err("measuring the backlog"))?;
    Ok(Backlog {
        pending: row.get("pending"),
        applied: row.get("applied"),
        outbox: row.get("outbox"),
        outbox_age_secs: row.get("outbox_age"),
    })
}
