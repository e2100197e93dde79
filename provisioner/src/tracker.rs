//! Tracking: a watch per cluster on QuestDB resources turns the operator's status into gossip
//! for applied instructions (progressing, succeeded, failed), and a sweep catches what a watch
//! missed and fails instructions past their deadline.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use qdb_crd::{QuestDB, keys};
use qdb_proto::v1::Phase;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Shared;
use crate::gossip::{self, Subject};
use crate::journal::{self, JournalError, Open, State};

use crate::progress::{self, Verdict};

/// What a replica knows of one cluster's QuestDB resources.
pub struct ClusterView {
    pub namespace: String,
    pub store: Store<QuestDB>,
    /// The store holds a complete list (the watch has synced at least once).
    pub synced: AtomicBool,
}

impl ClusterView {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn get(&self, database_id: &str) -> Option<Arc<QuestDB>> {
        self.store.get(&ObjectRef::new(database_id).within(&self.namespace))
    }
}

/// Judges one applied instruction and records + announces any change. `qdb` is None when the
/// cluster's state is unknown (not yet synced), Some(None) when the resource is absent.
async fn decide(ctx: &Shared, row: &Open, qdb: Option<Option<&QuestDB>>) -> Result<(), JournalError> {
    let verdict = match qdb {
        Some(q) if row.operation == "snapshot" => progress::judge_snapshot(&row.id, row.generation, q),
        Some(q) if row.operation == "restore" => progress::judge_restore(&row.id, row.generation, q),
        Some(q) => progress::judge(&row.operation, row.generation, q),
        None => Verdict::Wait,
    };
    let qdb = qdb.flatten();
    let subject = Subject {
        instruction_id: row.id.clone(),
        database_id: row.database_id.clone(),
        cluster: row.cluster.clone(),
        sequence: u64::try_from(row.sequence).unwrap_or_default(),
    };
    let status = qdb.map(gossip::database_status);
    let snapshot = qdb.and_then(|q| progress::announced_snapshot(q, &row.operation, &row.id, row.generation));
    // A change delayed by design (EBS's cool-down) keeps its instruction open until then plus its
    // deadline; past that, it fails like any other.
    let delayed = qdb.and_then(progress::delayed_until).filter(|until| {
        let deadline = jiff::SignedDuration::try_from(ctx.deadline(&row.operation)).unwrap_or_default();
        *until + deadline > jiff::Timestamp::now()
    });
    let (state, phase, reason, message) = match verdict {
        Verdict::Succeeded => {
            let message = qdb.and_then(|q| progress::succeeded_message(q, &row.operation, &row.id));
            (State::Succeeded, Phase::Succeeded, String::new(), message.unwrap_or_default())
        }
        Verdict::Failed { reason, message } => (State::Failed, Phase::Failed, reason, message),
        Verdict::Superseded => {
            // The journal knows which instruction came next; the resource only the latest.
            let by = match journal::successor(&ctx.pool, row).await? {
                Some(id) => id,
                None => qdb
                    .and_then(|q| q.metadata.annotations.as_ref()?.get(keys::INSTRUCTION_ID).cloned())
                    .unwrap_or_default(),
            };
            let message = format!("replaced by instruction {by} before its own state was observed Ready");
            let reason = gossip::SUPERSEDED_BY_LATER;
            let announce = [gossip::superseded(&subject, &by, &message, status)];
            if journal::finish(&ctx.pool, None, &row.id, State::Superseded, reason, &message, &announce)
                .await?
            {
                ctx.metrics.count(State::Superseded.as_str());
                ctx.outbox_wake.notify_one();
                info!(instruction = %row.id, database = %row.database_id, by = %by, "instruction superseded");
            }
            return Ok(());
        }
        Verdict::Progress(text) if !row.due || delayed.is_some() => {
            let mut tx = ctx.pool.begin().await.map_err(journal::tx_error)?;
            if let Some(until) = delayed {
                journal::extend_deadline(&mut tx, &row.id, until, ctx.deadline(&row.operation)).await?;
            }
            if journal::set_progress(&mut tx, &row.id, &text).await? {
                let event = gossip::event_about(&subject, Phase::Progressing, "", &text, status, snapshot);
                journal::enqueue(&mut tx, &event).await?;
                ctx.metrics.count("progressing");
            }
            tx.commit().await.map_err(journal::tx_error)?;
            ctx.outbox_wake.notify_one();
            return Ok(());
        }
        Verdict::Wait if !row.due => return Ok(()),
        Verdict::Progress(_) | Verdict::Wait => {
            let last = if row.progress.is_empty() { "none".to_string() } else { row.progress.clone() };
            let message = format!(
                "no outcome within the {} deadline of {}s; last progress: {last}",
                row.operation,
                ctx.deadline(&row.operation).as_secs()
            );
            (State::Failed, Phase::Failed, "DEADLINE_EXCEEDED".to_string(), message)
        }
    };
    let announce = [gossip::event_about(&subject, phase, &reason, &message, status, snapshot)];
    if journal::finish(&ctx.pool, None, &row.id, state, &reason, &message, &announce).await? {
        ctx.metrics.count(state.as_str());
        ctx.outbox_wake.notify_one();
        info!(instruction = %row.id, database = %row.database_id, state = state.as_str(), reason = %reason,
            "instruction finished");
    }
    Ok(())
}

pub async fn evaluate(ctx: &Shared, view: &ClusterView, cluster: &str, database_id: &str) {
    let qdb = view.get(database_id);
    judge_all(ctx, cluster, database_id, qdb.as_deref()).await;
}

/// Judges every applied instruction of a database against `qdb` (None: absent).
async fn judge_all(ctx: &Shared, cluster: &str, database_id: &str, qdb: Option<&QuestDB>) {
    let rows = match journal::applied(&ctx.pool, Some(database_id), 100).await {
        Ok(rows) => rows,
        Err(e) => return warn!(database = %database_id, error = %e, "reading applied instructions failed"),
    };
    for row in rows.iter().filter(|r| r.cluster == cluster) {
        if let Err(e) = decide(ctx, row, Some(qdb)).await {
            warn!(instruction = %row.id, error = %e, "recording progress failed; the sweep retries");
        }
    }
}

/// Right after an apply, with the resource the apply returned (fresher than the watch): an
/// earlier instruction still waiting (`earlier_waiting`) is superseded now, and this one is
/// judged at once if the operator already reported on its generation (the status may have come
/// before the journal write). After a delete there is no returned resource: the watch's copy is
/// used. With nothing to decide, the journal is not read again.
pub async fn evaluate_after_apply(
    ctx: &Shared,
    view: &ClusterView,
    head: &Open,
    generation: Option<i64>,
    returned: Option<&QuestDB>,
    earlier_waiting: bool,
) {
    if let Some(q) = returned {
        if earlier_waiting || progress::judge(&head.operation, generation, Some(q)) != Verdict::Wait {
            judge_all(ctx, &head.cluster, &head.database_id, Some(q)).await;
        }
        return;
    }
    if !view.is_synced() {
        return;
    }
    let cached = view.get(&head.database_id);
    if progress::judge(&head.operation, generation, cached.as_deref()) != Verdict::Wait {
        evaluate(ctx, view, &head.cluster, &head.database_id).await;
    }
}

/// Watches one cluster's QuestDB resources until stopped.
pub async fn watch(
    ctx: Arc<Shared>,
    cluster: String,
    writer: reflector::store::Writer<QuestDB>,
    stop: CancellationToken,
) {
    let Some(c) = ctx.registry.get(&cluster).cloned() else { return };
    let Some(view) = ctx.views.get(&cluster) else { return };
    // Field ownership is of no use here and is most of each object's size.
    let objects =
        watcher::watcher(c.watched_questdbs(), watcher::Config::default().timeout(qdb_crd::WATCH_SECS))
            .modify(|q| q.metadata.managed_fields = None)
            .default_backoff();
    let stream = reflector::reflector(writer, objects);
    let mut stream = std::pin::pin!(stream);
    // The last status seen per resource: the provisioner's own spec writes come back as events
    // with an unchanged status, and there is nothing to judge in those.
    let mut seen: HashMap<String, u64> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = stream.next() => e,
        };
        match event {
            Some(Ok(Event::Apply(q))) => {
                let Some(name) = q.metadata.name.clone() else { continue };
                let fingerprint = status_fingerprint(&q);
                if seen.insert(name.clone(), fingerprint) != Some(fingerprint) {
                    evaluate(&ctx, view, &cluster, &name).await;
                }
            }
            Some(Ok(Event::Delete(q))) => {
                if let Some(name) = q.metadata.name.as_deref() {
                    seen.remove(name);
                    evaluate(&ctx, view, &cluster, name).await;
                }
            }
            Some(Ok(Event::InitDone)) => {
                view.synced.store(true, Ordering::Relaxed);
                ctx.sweep_wake.notify_one();
            }
            Some(Ok(Event::Init | Event::InitApply(_))) => {}
            Some(Err(e)) => {
                ctx.metrics.kube(&cluster, "watch", false);
                warn!(cluster = %cluster, error = %e, "watching QuestDB resources failed; retrying");
            }
            None => break,
        }
    }
}

/// A hash of what judging reads: status and the deletion mark.
fn status_fingerprint(q: &QuestDB) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_string(&q.status).unwrap_or_default().hash(&mut h);
    q.metadata.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// Re-judges every applied instruction against the synced views, so nothing waits on a missed
/// event, and fails those past their deadline even when their cluster cannot be reached.
pub async fn sweep(ctx: Arc<Shared>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        match journal::applied(&ctx.pool, None, 5000).await {
            Ok(rows) => {
                for row in &rows {
                    let view = ctx.views.get(&row.cluster);
                    let synced = view.is_some_and(|v| v.synced.load(Ordering::Relaxed));
                    if !synced && !row.due {
                        continue;
                    }
                    let qdb = view.filter(|_| synced).map(|v| v.get(&row.database_id));
                    let qdb = qdb.as_ref().map(|q| q.as_deref());
                    if let Err(e) = decide(&ctx, row, qdb).await {
                        warn!(instruction = %row.id, error = %e, "sweeping failed");
                    }
                }
            }
            Err(e) => warn!(error = %e, "reading applied instructions failed"),
        }
        match journal::backlog(&ctx.pool).await {
            Ok(b) => {
                ctx.metrics.journal_backlog.get_or_create(&state("pending")).set(b.pending);
                ctx.metrics.journal_backlog.get_or_create(&state("applied")).set(b.applied);
                ctx.metrics.outbox_backlog.set(b.outbox);
                ctx.metrics.outbox_lag_seconds.set(b.outbox_age_secs);
            }
            Err(e) => warn!(error = %e, "measuring the backlog failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = ctx.sweep_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
    }
}

fn state(s: &str) -> crate::metrics::StateLabels {
    crate::metrics::StateLabels { state: s.to_string() }
}
