//! The transactional outbox: messages queued in the transaction of the state change they
//! report, and the drainer that publishes committed gossip and dead-letter copies with an
//! idempotent producer, then deletes them. At-least-once: a crash between publish and delete
//! publishes again (events carry unique ids for consumers to drop repeats).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use sqlx::{PgConnection, Row};

use crate::aws_auth::{KafkaAuth, MskIam};
use crate::journal::{self, JournalError, err};
use crate::metrics::{OutcomeLabels, ParkedLabels};
use crate::{Shared, gossip};

/// Which topic an outbox row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Gossip,
    DeadLetter,
}

impl Topic {
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Gossip => "gossip",
            Topic::DeadLetter => "dlq",
        }
    }

    fn parse(s: &str) -> Topic {
        if s == "dlq" { Topic::DeadLetter } else { Topic::Gossip }
    }
}

/// One message to publish once the transaction that queued it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub id: i64,
    pub topic: Topic,
    pub database_id: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Queues a message in the outbox.
pub async fn enqueue(conn: &mut PgConnection, out: &Outgoing) -> Result<(), JournalError> {
    sqlx::query("INSERT INTO outbox (topic, database_id, key, headers, payload) VALUES ($1, $2, $3, $4, $5)")
        .bind(out.topic.as_str())
        .bind(&out.database_id)
        .bind(out.key.as_deref())
        .bind(sqlx::types::Json(&out.headers))
        .bind(&out.payload)
        .execute(conn)
        .await
        .map_err(err("queueing outgoing message"))?;
    Ok(())
}

/// The oldest queued messages, locked for this transaction, if this transaction got the
/// drainers' advisory lock `lock` (taken in the same statement, a round trip less per drain;
/// none if another drainer holds it).
pub async fn outbox_batch(
    conn: &mut PgConnection,
    lock: i64,
    limit: i64,
) -> Result<Vec<Outgoing>, JournalError> {
    // A WITH query that calls a volatile function runs once, before the rows are read.
    let rows = sqlx::query(
        "WITH drainer AS (SELECT pg_try_advisory_xact_lock($1) AS held)
         SELECT id, topic, database_id, key, headers, payload FROM outbox
         WHERE (SELECT held FROM drainer)
         ORDER BY id LIMIT $2 FOR UPDATE OF outbox SKIP LOCKED",
    )
    .bind(lock)
    .bind(limit)
    .fetch_all(conn)
    .await
    .map_err(err("reading the outbox"))?;
    Ok(rows
        .into_iter()
        .map(|r| Outgoing {
            id: r.get("id"),
            topic: Topic::parse(r.get("topic")),
            database_id: r.get("database_id"),
            key: r.get("key"),
            headers: r.get::<sqlx::types::Json<Vec<(String, String)>>, _>("headers").0,
            payload: r.get("payload"),
        })
        .collect())
}

pub async fn outbox_delete(conn: &mut PgConnection, ids: &[i64]) -> Result<(), JournalError> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await
        .map_err(err("removing published messages"))?;
    Ok(())
}

/// Moves a message that can never be published out of the outbox, with the reason.
pub async fn outbox_park(conn: &mut PgConnection, id: i64, reason: &str) -> Result<(), JournalError> {
    sqlx::query(
        "WITH gone AS (DELETE FROM outbox WHERE id = $1 RETURNING *)
         INSERT INTO outbox_parked (id, topic, database_id, key, headers, payload, created_at, reason)
         SELECT id, topic, database_id, key, headers, payload, created_at, $2 FROM gone",
    )
    .bind(id)
    .bind(reason)
    .execute(conn)
    .await
    .map_err(err("setting aside an unpublishable message"))?;
    Ok(())
}

/// One drainer at a time across replicas keeps each database's events in order; the row locks
/// (FOR UPDATE SKIP LOCKED) keep a row from being taken twice even without it.
pub const DRAIN_LOCK: i64 = 0x71db_0001;
const BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("publishing to {topic}")]
    Publish { topic: String, source: KafkaError },
}

pub type Publisher = FutureProducer<KafkaAuth>;

pub fn producer(props: &BTreeMap<String, String>, msk_iam: Option<MskIam>) -> Result<Publisher, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000");
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg.create_with_context(KafkaAuth(msk_iam))
}

/// Whether a publish that failed with `code` can never succeed for this record, whatever the
/// number of tries: the broker (or the client before it) refuses the record itself. Everything
/// else (timeouts, leaders moving, authorization being fixed) is worth another try.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::BadMessage
    )
}

fn permanent(e: &KafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(is_permanent)
}

/// What became of one outbox row in a drain.
enum Fate {
    Delivered,
    /// Set aside with this reason: it would block everything behind it forever.
    Parked(String),
    /// Stays for the next drain.
    Again(OutboxError),
}

/// Publishes one batch: rows delivered are removed (so a retry never sends them again), rows the
/// broker can never take are set aside, the rest stay. Returns how many rows left the outbox,
/// or the first transient error once the rows done before it are recorded.
async fn drain_once(ctx: &Shared, producer: &Publisher) -> Result<usize, OutboxError> {
    let mut tx = ctx.pool.begin().await.map_err(journal::tx_error)?;
    let batch = outbox_batch(&mut tx, DRAIN_LOCK, BATCH).await?;
    if batch.is_empty() {
        return Ok(0);
    }
    let mut fates = Vec::with_capacity(batch.len());
    let mut deliveries = Vec::with_capacity(batch.len());
    for (i, out) in batch.iter().enumerate() {
        let topic = match out.topic {
            Topic::Gossip => &ctx.gossip_topic,
            Topic::DeadLetter => &ctx.dlq_topic,
        };
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (k, v) in &out.headers {
            headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let mut record = FutureRecord::to(topic).payload(&out.payload).headers(headers);
        if let Some(key) = &out.key {
            record = record.key(key);
        }
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push((i, topic, delivery)),
            Err((source, _)) if permanent(&source) => {
                fates.push((i, Fate::Parked(format!("refused by the client before sending: {source}"))));
            }
            Err((source, _)) => {
                // The queue is full or the client is failing: the rest waits, in order.
                fates.push((i, Fate::Again(OutboxError::Publish { topic: topic.clone(), source })));
                break;
            }
        }
    }
    for (i, topic, delivery) in deliveries {
        let fate = match delivery.await {
            Ok(Ok(_)) => Fate::Delivered,
            Ok(Err((source, _))) if permanent(&source) => {
                Fate::Parked(format!("refused by {topic}: {source}"))
            }
            Ok(Err((source, _))) => Fate::Again(OutboxError::Publish { topic: topic.clone(), source }),
            Err(_) => {
                Fate::Again(OutboxError::Publish { topic: topic.clone(), source: KafkaError::Canceled })
            }
        };
        fates.push((i, fate));
    }
    let mut delivered = Vec::new();
    let mut parked = 0;
    let mut again = None;
    for (i, fate) in fates {
        let out = &batch[i];
        let role = if out.topic == Topic::Gossip { "gossip" } else { "dlq" };
        match fate {
            Fate::Delivered => {
                ctx.metrics.published.get_or_create(&OutcomeLabels { outcome: role.into() }).inc();
                delivered.push(out.id);
            }
            Fate::Parked(reason) => {
                outbox_park(&mut tx, out.id, &reason).await?;
                parked += 1;
                let label = ParkedLabels { topic: role.into(), reason: "refused".into() };
                ctx.metrics.outbox_parked.get_or_create(&label).inc();
                error!(outbox_id = out.id, topic = role, database = %out.database_id,
                    bytes = gossip::record_bytes(out), reason = %reason,
                    "outbox message can never be published; set aside in outbox_parked");
            }
            Fate::Again(e) => {
                again.get_or_insert(e);
            }
        }
    }
    outbox_delete(&mut tx, &delivered).await?;
    tx.commit().await.map_err(journal::tx_error)?;
    match again {
        Some(e) => Err(e),
        None => Ok(delivered.len() + parked),
    }
}

/// Drains until stopped, then flushes what is left (bounded) before returning.
pub async fn run(ctx: Arc<Shared>, props: BTreeMap<String, String>, stop: CancellationToken) {
    let mut producer: Option<Publisher> = None;
    let mut failures = 0;
    let mut flush_until = None;
    loop {
        if stop.is_cancelled() && flush_until.is_none() {
            flush_until = Some(tokio::time::Instant::now() + Duration::from_secs(10));
        }
        if flush_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
            warn!("outbox not empty after 10s of flushing; the rest goes out after restart");
            break;
        }
        let p = match &producer {
            Some(p) => p,
            None => match self::producer(&props, ctx.msk_iam.clone()) {
                Ok(p) => producer.insert(p),
                Err(e) => {
                    warn!(error = %e, "creating the producer failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // While flushing at shutdown, a drain that hangs (a broker that does not answer) is cut
        // off at the flush deadline: SIGTERM always ends the process.
        let drained = match flush_until {
            Some(t) => match tokio::time::timeout_at(t, drain_once(&ctx, p)).await {
                Ok(r) => r,
                Err(_) => {
                    warn!("outbox flush cut off at its deadline; the rest goes out after restart");
                    break;
                }
            },
            None => drain_once(&ctx, p).await,
        };
        match drained {
            // A full batch may have left more behind. A smaller one took everything there was:
            // draining again at once would find nothing (three round trips for it, after every
            // drain under load); whatever is queued since has woken the drainer already.
            Ok(n) if n as i64 >= BATCH || (n > 0 && flush_until.is_some()) => {
                failures = 0;
                continue;
            }
            Ok(_) if flush_until.is_some() => break,
            Ok(_) => {
                failures = 0;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = ctx.outbox_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Err(e) => {
                failures += 1;
                warn!(error = %crate::error_chain(&e), failures, "publishing the outbox failed; retrying");
                // A fatal error leaves an idempotent producer unusable: start a new one.
                if p.client().fatal_error().is_some() || failures % 5 == 0 {
                    producer = None;
                }
                tokio::time::sleep(Duration::from_millis(200 * failures.min(10))).await;
            }
        }
    }
    if let Some(p) = producer {
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
    }
    info!("outbox drainer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_the_record_itself_are_permanent() {
        assert!(is_permanent(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(is_permanent(RDKafkaErrorCode::InvalidRecord));
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert!(!is_permanent(transient), "{transient:?}");
        }
    }
}
