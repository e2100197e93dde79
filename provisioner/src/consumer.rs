//! The instructions consumer: batches of messages are journaled in one transaction, and only
//! then are their offsets stored (`enable.auto.offset.store=false`) for the auto-commit. Offsets
//! are committed synchronously when partitions are revoked and at shutdown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Shared;
use crate::aws_auth::{self, MskIam};
use crate::gossip::Source;
use crate::intake::{self, Verdict};
use crate::journal::{self, JournalError};
use crate::metrics::{Metrics, PartitionLabels};

pub struct IntakeContext {
    metrics: Arc<Metrics>,
    /// The client's last error and the broker's reason (e.g. a refused SASL handshake), so a
    /// failed start-up check can say why rather than only "transport failure".
    last_error: std::sync::Mutex<Option<String>>,
    msk_iam: Option<MskIam>,
    /// Set by the first assignment (empty or not): the replica is in the consumer group.
    joined: Arc<AtomicBool>,
}

impl ClientContext for IntakeContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(&self, _: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        aws_auth::oauth_token(self.msk_iam.as_ref())
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::error!(error = %error, reason, "librdkafka error");
        // "All brokers are down" follows every other failure and says nothing of its cause.
        let says_why = error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown);
        if says_why && let Ok(mut last) = self.last_error.lock() {
            *last = Some(reason.to_string());
        }
    }

    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                let labels = PartitionLabels { topic: topic.clone(), partition };
                if partition < 0 {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    self.metrics.consumer_lag.get_or_create(&labels).set(p.consumer_lag);
                } else {
                    self.metrics.consumer_lag.remove(&labels);
                }
            }
        }
    }
}

impl ConsumerContext for IntakeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Everything stored is journaled: commit it before another replica takes over.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => info!(partitions = tpl.count(), "partitions revoked; offsets committed"),
                Err(e) => debug!(error = %e, "partitions revoked; nothing to commit"),
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            info!(?partitions, "partitions assigned");
            self.joined.store(true, Ordering::Relaxed);
        }
    }
}

pub type IntakeConsumer = StreamConsumer<IntakeContext>;

/// Why the broker could not be used at start.
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", .reason.as_ref().map(|r| format!(" (last client error: {r})")).unwrap_or_default())]
pub struct ConnectError {
    error: rdkafka::error::KafkaError,
    reason: Option<String>,
}

/// Metadata round trips to the instructions topic, for up to 30 s: bad credentials or TLS
/// settings fail here, with the broker's reason, instead of as an endless reconnect loop in the
/// background. The client reports such a reason asynchronously, as an event on its queue, so each
/// failed try serves the queue for a moment; a broker that is merely still starting gets the
/// other tries.
pub async fn check_connection(consumer: &IntakeConsumer, topic: &str) -> Result<(), ConnectError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // A blocking librdkafka call: off the runtime's worker.
        let fetched =
            tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(5)));
        let error = match fetched.map(|m| m.topics().first().and_then(|t| t.error())) {
            Ok(None) => return Ok(()),
            Ok(Some(code)) => rdkafka::error::KafkaError::MetadataFetch(code.into()),
            Err(e) => e,
        };
        // Serving the consumer's queue delivers the client's pending error events (nothing is
        // subscribed yet, so no message can be taken here).
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            debug!(error = %e, "consumer event while checking the connection");
        }
        let reason = consumer.context().last_error.lock().ok().and_then(|l| l.clone());
        if reason.is_some() || tokio::time::Instant::now() >= deadline {
            return Err(ConnectError { error, reason });
        }
    }
}

pub fn consumer(
    brokers: &str,
    group: &str,
    props: &BTreeMap<String, String>,
    metrics: Arc<Metrics>,
    msk_iam: Option<MskIam>,
    joined: Arc<AtomicBool>,
) -> KafkaResult<IntakeConsumer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000");
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg.create_with_context(IntakeContext { metrics, last_error: Default::default(), msk_iam, joined })
}

/// A message's headers as text (values decoded lossily), for dead letters and for people.
pub fn text_headers<M: Message, C: FromIterator<(String, String)>>(m: &M) -> C {
    m.headers()
        .into_iter()
        .flat_map(|h| h.iter())
        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
        .collect()
}

fn source_of(m: &OwnedMessage) -> Source {
    let headers = text_headers(m);
    Source {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
    }
}

/// Journals a batch in one transaction with the answers to every message in it.
async fn journal_batch(ctx: &Shared, batch: &[OwnedMessage]) -> Result<Vec<&'static str>, JournalError> {
    let mut tx = ctx.pool.begin().await.map_err(journal::tx_error)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for m in batch {
        let payload = m.payload().unwrap_or_default();
        let verdict = intake::classify(payload, ctx.max_message_bytes, |c| ctx.registry.contains(c));
        if let Verdict::Reject { reason, message, .. } = &verdict {
            warn!(partition = m.partition(), offset = m.offset(), reason, message = %message, "instruction rejected");
        }
        let outcome =
            intake::record(&mut tx, &verdict, payload, &source_of(m), ctx.publish_max_bytes).await?;
        outcomes.push(outcome.as_str());
    }
    tx.commit().await.map_err(journal::tx_error)?;
    Ok(outcomes)
}

/// Consumes until stopped; then commits what was stored and leaves the group.
pub async fn run(ctx: Arc<Shared>, consumer: IntakeConsumer, topic: String, stop: CancellationToken) {
    if let Err(e) = consumer.subscribe(&[&topic]) {
        warn!(error = %e, topic, "subscribing failed");
        return;
    }
    // Ready only once the group has given this replica its share (IntakeContext::joined): a
    // replica that has merely subscribed takes nothing yet, for as long as the join takes (3 s
    // on a fresh broker, while it creates __consumer_offsets; longer while others rejoin).
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            m = consumer.recv() => m,
        };
        let first = match first {
            Ok(m) => m.detach(),
            Err(e) => {
                warn!(error = %e, "consuming failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Whatever else is already fetched joins the batch: one transaction for many messages.
        let mut batch = vec![first];
        while batch.len() < ctx.intake_batch {
            match tokio::time::timeout(Duration::from_millis(1), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        let mut failures = 0u32;
        let outcomes = loop {
            match journal_batch(&ctx, &batch).await {
                Ok(o) => break Some(o),
                Err(e) => {
                    failures += 1;
                    warn!(error = %crate::error_chain(&e), failures, messages = batch.len(),
                        "journaling failed; offsets not stored, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break None,
                        _ = tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))) => {}
                    }
                }
            }
        };
        let Some(outcomes) = outcomes else { break };
        for o in outcomes {
            ctx.metrics.count(o);
        }
        for m in &batch {
            if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
                // The partition moved on a rebalance: its new owner sees the message again and
                // answers it as a duplicate.
                debug!(error = %e, partition = m.partition(), offset = m.offset(), "storing offset failed");
            }
        }
        ctx.work_wake.notify_one();
        ctx.outbox_wake.notify_one();
    }
    ctx.consuming.store(false, Ordering::Relaxed);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("offsets committed"),
        Err(e) => debug!(error = %e, "nothing to commit at shutdown"),
    }
    consumer.unsubscribe();
    // Destroying the client is a blocking call (it waits for librdkafka's threads).
    if let Err(e) = tokio::task::spawn_blocking(move || drop(consumer)).await {
        warn!(error = %e, "destroying the consumer client failed");
    }
    info!("consumer stopped");
}
