//! The outbox drainer: publishes committed gossip and dead-letter copies with an idempotent
//! producer, then deletes them. At-least-once: a crash between publish and delete publishes
//! again (events carry unique ids for consumers to drop repeats).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Shared;
use crate::journal::{self, JournalError, Topic};
use crate::metrics::OutcomeLabels;

/// One drainer at a time across replicas keeps each database's events in order; the row locks
/// (FOR UPDATE SKIP LOCKED) keep a row from being taken twice even without it.
const DRAIN_LOCK: i64 = 0x71db_0001;
const BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("publishing to {topic}")]
    Publish { topic: String, source: KafkaError },
}

pub fn producer(props: &BTreeMap<String, String>) -> Result<FutureProducer, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000");
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg.create()
}

/// Publishes one batch; returns how many messages went out.
async fn drain_once(ctx: &Shared, producer: &FutureProducer) -> Result<usize, OutboxError> {
    let mut tx = ctx.pool.begin().await.map_err(journal::tx_error)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(DRAIN_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(journal::tx_error)?;
    if !locked {
        return Ok(0);
    }
    let batch = journal::outbox_batch(&mut tx, BATCH).await?;
    if batch.is_empty() {
        return Ok(0);
    }
    let mut deliveries = Vec::with_capacity(batch.len());
    for out in &batch {
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
        let delivery = producer
            .send_result(record)
            .map_err(|(source, _)| OutboxError::Publish { topic: topic.clone(), source })?;
        deliveries.push((topic, out.topic, delivery));
    }
    for (topic, role, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {
                let role = if role == Topic::Gossip { "gossip" } else { "dlq" };
                ctx.metrics.published.get_or_create(&OutcomeLabels { outcome: role.into() }).inc();
            }
            Ok(Err((source, _))) => return Err(OutboxError::Publish { topic: topic.clone(), source }),
            Err(_) => {
                return Err(OutboxError::Publish { topic: topic.clone(), source: KafkaError::Canceled });
            }
        }
    }
    let ids: Vec<i64> = batch.iter().map(|o| o.id).collect();
    journal::outbox_delete(&mut tx, &ids).await?;
    tx.commit().await.map_err(journal::tx_error)?;
    Ok(batch.len())
}

/// Drains until stopped, then flushes what is left (bounded) before returning.
pub async fn run(ctx: Arc<Shared>, props: BTreeMap<String, String>, stop: CancellationToken) {
    let mut producer: Option<FutureProducer> = None;
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
            None => match self::producer(&props) {
                Ok(p) => producer.insert(p),
                Err(e) => {
                    warn!(error = %e, "creating the producer failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        match drain_once(&ctx, p).await {
            Ok(n) if n > 0 => {
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
