//! Reconcile: one QuestDB resource through the pipeline validate -> aws -> children -> dns ->
//! status, each step idempotent and finding what it made before by tags and labels, so a crash
//! anywhere repeats work but never duplicates it. Deletion runs behind a finalizer.

pub mod adopt;
pub mod attachment;
pub mod aws;
pub mod children;
pub mod cleanup;
pub mod dns;
pub mod node_move;
pub mod replace;
pub mod restore;
pub mod safety;
pub mod sizing;
pub mod snapshot;
pub mod status;
pub mod subset;
pub mod zone;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{self, Event as Finalizing};
use kube::{Resource, ResourceExt};
use qdb_crd::{DegradedReason, QuestDB, WaitReason};
use tracing::{info, warn};

use crate::aws::{AwsError, Instance, Outcome, Owner, Volume};
use crate::build::Desired;
use crate::build::dns::DnsRecord;
use crate::context::Context;

pub const FINALIZER: &str = "cloud.questdb.io/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step}: AWS")]
    Aws {
        step: &'static str,
        #[source]
        source: AwsError,
    },
    #[error("{step}: Kubernetes {what}")]
    Kube {
        step: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{step}: the database")]
    Sql {
        step: &'static str,
        #[source]
        source: crate::sql::SqlError,
    },
    #[error("{0}")]
    NotOurs(String),
    /// Cleanup is under way and not finished; the finalizer must stay (kube removes it on Ok).
    #[error("cleanup waiting: {0}")]
    CleanupWaiting(String),
    #[error("finalizer")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

pub fn aws_err(step: &'static str) -> impl FnOnce(AwsError) -> Error {
    move |source| Error::Aws { step, source }
}

pub fn kube_err(step: &'static str, what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { step, what, source }
}

/// The step's error inside the finalizer helper's wrapping.
fn step_error(e: &Error) -> &Error {
    match e {
        Error::Finalizer(f) => match f.as_ref() {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            _ => e,
        },
        e => e,
    }
}

/// An error only a change can cure, as the `attempts`-th failure in a row: the Degraded reason
/// and what AWS said. Everything else is retried with backoff.
pub fn permanent(e: &Error, attempts: u32, capacity_retries: u32) -> Option<(DegradedReason, String)> {
    let Error::Aws { source, .. } = step_error(e) else { return None };
    match source.outcome(attempts, capacity_retries) {
        Outcome::Permanent(reason) => Some((reason, source.aws_message())),
        Outcome::Transient => None,
    }
}

fn failure_key(q: &QuestDB) -> String {
    format!("{}/{}", q.namespace().unwrap_or_default(), q.name_any())
}

pub use qdb_crd::error_chain as chain;

/// What the steps found and did, handed along the pipeline.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub instance: Option<Instance>,
    /// The Kubernetes node of `instance`, and whether it is Ready.
    pub node: Option<(String, bool)>,
    /// The database's nodes that are Ready (a pod bound to one has a kubelet to run or stop it).
    pub ready_nodes: Vec<String>,
    pub volume: Option<Volume>,
    pub volume_attached: bool,
    pub pod_ready: bool,
    /// The pod cannot start for a reason only a change cures (its image cannot be pulled).
    pub pod_failure: Option<(DegradedReason, String)>,
    /// No pod left (pause waits for this before releasing the instance).
    pub pod_gone: bool,
    /// The node the pod is bound to, while a paused database's pod is not gone.
    pub pod_node: Option<String>,
    /// Instances of this database not terminated (pause: none once released).
    pub instances: Vec<Instance>,
    pub dns: Option<DnsRecord>,
    /// A failover started this round.
    pub failover: Option<qdb_crd::FailoverStatus>,
    /// The node replacement under way (from status at the start of the pass, as far as it got).
    pub replacement: Option<qdb_crd::ReplacementStatus>,
    /// What is being waited for, first unmet step first.
    pub waiting: Vec<(WaitReason, String)>,
    /// Changes made this round, announced as events.
    pub actions: Vec<(&'static str, String)>,
    /// The number of the database's next instance launch (status `launches`, brought up to what
    /// EC2 lists).
    pub launches: u32,
    /// When this or an earlier pass last created something in AWS (status `lastAwsCreate`).
    pub last_create: Option<jiff::Timestamp>,
    /// When this or an earlier pass last launched an instance (status `lastLaunch`).
    pub last_launch: Option<jiff::Timestamp>,
    /// The failover this database needs is held back (its zone looks like a blip), and why.
    pub held: Option<String>,
    /// The volume change waits for EBS's modification cool-down until then.
    pub modifiable_at: Option<jiff::Timestamp>,
    /// The database's share of the node its pod runs on (None: the node type is too small).
    pub pod_share: Option<crate::build::resources::Share>,
    /// The instance, volume and security group `spec.adopt` names are this database's now.
    pub adopted: bool,
    /// The risky part of the spec let through (status `admitted`, as the safety gate left it).
    pub admitted: Option<qdb_crd::Admitted>,
    /// The safety snapshot the gate holds a change for.
    pub safety: Option<snapshot::Wanted>,
    /// When the snapshot schedule next fires: the pass is requeued by then.
    pub next_snapshot: Option<jiff::Timestamp>,
    /// The restore under way (status `restore`), as far as it got.
    pub restore: Option<qdb_crd::RestoreStatus>,
    /// The last restore's outcome (status `lastRestore`).
    pub last_restore: Option<qdb_crd::RestoreOutcome>,
    /// The snapshot the data volume was made from by the last completed restore (status
    /// `restoredFrom`).
    pub restored_from: Option<String>,
}

impl Facts {
    pub fn wait(&mut self, reason: WaitReason, message: impl Into<String>) {
        self.waiting.push((reason, message.into()));
    }

    /// Something is about to be created in AWS (or was: a create that timed out may have
    /// happened): cleanup's "nothing left" must wait one listing lag past it.
    pub fn created(&mut self) {
        self.last_create = Some(jiff::Timestamp::now());
    }

    pub fn did(&mut self, reason: &'static str, message: impl Into<String>) {
        let message = message.into();
        info!(reason, %message, "changed");
        self.actions.push((reason, message));
    }
}

/// Whether a pass's next view of EC2 must be newer than the pass: when it did something that
/// may show in EC2's listings, or failed partway. What only wrote Kubernetes objects or a DNS
/// record leaves EC2 as it was; counting those too made most passes of a fleet being created
/// list every instance, volume and group of the cluster again (300 databases: the emulator's
/// listings took all its time). A reason no step lists here counts, so a new one is safe.
pub fn needs_new_view(actions: &[(&'static str, String)], failed: bool) -> bool {
    failed
        || actions
            .iter()
            .any(|(reason, _)| !children::REASONS.contains(reason) && !dns::REASONS.contains(reason))
}

/// A pass's actions as Events: one per reason, its notes joined in the order they happened (a
/// pass that creates eight children writes one CreatedChild event, not eight: each Event is an
/// apiserver write, and on-call reads them by reason).
pub fn events_of(actions: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    let mut events: Vec<(&'static str, String)> = Vec::new();
    for (reason, note) in actions {
        match events.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, notes)) => {
                notes.push_str("; ");
                notes.push_str(&note);
            }
            None => events.push((reason, note)),
        }
    }
    events
}

/// Deletes `name`; true if it was there, false if already gone ("not found" counts as done).
pub async fn delete_if_present<K>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    kind: &str,
    params: &kube::api::DeleteParams,
) -> Result<bool, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ctx.metrics.kube("delete", kind);
    match api.delete(name, params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(kube_err("delete", format!("deleting {kind} {name}"))(e)),
    }
}

pub fn owner_of(d: &Desired, cluster: &str) -> Owner {
    Owner {
        cluster: cluster.to_string(),
        namespace: d.names.namespace().to_string(),
        database: d.names.db().to_string(),
        owner_uid: d.names.uid().to_string(),
    }
}

async fn timed<T>(ctx: &Context, step: &str, f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    let t = Instant::now();
    // Boxed: the steps' futures (AWS SDK calls inside) are too large to nest on the stack.
    let r = Box::pin(f).await;
    ctx.metrics.step(step, r.is_ok(), t.elapsed().as_secs_f64());
    r
}

pub async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1024).collect()),
        action: reason.to_string(),
        secondary: None,
    };
    ctx.metrics.kube("create", "Event");
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        warn!(error = %e, reason, "publishing an event failed");
    }
}

async fn apply(qdb: Arc<QuestDB>, ctx: &Context) -> Result<Action, Error> {
    let reference = qdb.object_ref(&());
    let mut d = match Desired::new(&qdb, &ctx.settings.dns_zone) {
        Ok(d) => d,
        Err(invalid) => {
            let message = invalid.to_string();
            let new = status::invalid(&qdb, &message);
            timed(ctx, "status", status::ensure(ctx, &qdb, new)).await?;
            publish(ctx, &reference, EventType::Warning, "InvalidSpec", message).await;
            // Nothing will change until the spec does.
            return Ok(Action::await_change());
        }
    };
    let old = qdb.status.as_ref();
    let mut facts = Facts {
        replacement: old.and_then(|s| s.replacement.clone()),
        // Carried through every pass, a failing one too: the restore's step is persisted here.
        restore: old.and_then(|s| s.restore.clone()),
        last_restore: old.and_then(|s| s.last_restore.clone()),
        restored_from: old.and_then(|s| s.restored_from.clone()),
        launches: old.and_then(|s| s.launches).unwrap_or(0),
        last_create: old.and_then(|s| s.last_aws_create.as_ref()).map(|t| t.0),
        last_launch: old.and_then(|s| s.last_launch.as_ref()).map(|t| t.0),
        ..Facts::default()
    };
    let result = async {
        timed(ctx, "safety", safety::ensure(ctx, &qdb, &mut d, &mut facts)).await?;
        timed(ctx, "restore", restore::ensure(ctx, &qdb, &mut d, &mut facts)).await?;
        let active = qdb.status.as_ref().and_then(|s| s.node.as_ref()).map(|n| n.instance_id.clone());
        // A converged database's pass (a resync, or a watch event) may read EC2 as it was up to
        // a resync ago: what changes EC2 is this operator, and a change forces a new view. One
        // waiting on AWS needs it fresh.
        let settled = qdb.status.as_ref().is_some_and(status::is_converged);
        let max_age = if settled { ctx.settings.resync } else { ctx.settings.poll };
        // The volume a restore replaces is not looked for: EC2 lists it as replaced.
        let replaced = facts.restore.as_ref().map(|r| r.old_volume.clone());
        let known_volume = qdb
            .status
            .as_ref()
            .and_then(|s| s.volume.as_ref())
            .map(|v| v.id.clone())
            .filter(|v| replaced.as_ref() != Some(v));
        let step = aws::ensure(ctx, &d, active.as_deref(), known_volume.as_deref(), max_age, &mut facts);
        timed(ctx, "aws", step).await?;
        timed(ctx, "sizing", sizing::ensure(ctx, &d, &mut facts)).await?;
        timed(ctx, "children", children::ensure(ctx, &d, &mut facts)).await?;
        timed(ctx, "release", aws::release_if_paused(ctx, &d, &mut facts)).await?;
        timed(ctx, "dns", dns::ensure(ctx, &d, &mut facts)).await?;
        timed(ctx, "restore", restore::after(ctx, &d, &mut facts)).await
    }
    .await;
    let result = match result {
        Ok(()) => timed(ctx, "snapshot", snapshot::ensure(ctx, &qdb, &d, &mut facts)).await,
        // A change held for its safety snapshot may be what cures the failure (an instance type
        // EC2 has no capacity for, an image it deregistered): the snapshot is taken anyway
        // (crash-consistent if the database does not serve), or the change would wait forever.
        Err(e) if facts.safety.is_some() => {
            warn!(error = %chain(&e), "a step failed; taking the safety snapshot the held change waits for");
            if let Err(s) = timed(ctx, "snapshot", snapshot::ensure(ctx, &qdb, &d, &mut facts)).await {
                warn!(error = %chain(&s), "the safety snapshot failed too");
            }
            Err(e)
        }
        Err(e) => Err(e),
    };
    if needs_new_view(&facts.actions, result.is_err()) {
        // What this pass did (or may have done before failing) must show in its next view.
        ctx.inventory.changed(d.names.uid());
    }
    for (reason, note) in events_of(std::mem::take(&mut facts.actions)) {
        publish(ctx, &reference, EventType::Normal, reason, note).await;
    }
    let error = result.as_ref().err().map(|e| chain(e));
    let attempts =
        ctx.failures.lock().map(|f| f.get(&failure_key(&qdb)).copied().unwrap_or(0)).unwrap_or(0) + 1;
    let failed = result
        .as_ref()
        .err()
        .and_then(|e| permanent(e, attempts, ctx.settings.capacity_retries))
        .or_else(|| facts.pod_failure.clone());
    let problem = status::Problem {
        error: error.as_deref(),
        failed: failed.as_ref().map(|(reason, message)| (*reason, message.as_str())),
    };
    let new = status::build(&qdb, &d, &facts, &problem);
    if let Some(f) = &facts.failover {
        timed(ctx, "status", status::record_failover(ctx, &qdb, f)).await?;
    } else if let Some((f, took)) = status::recovered(&qdb, &new) {
        timed(ctx, "status", status::record_failover(ctx, &qdb, &f)).await?;
        ctx.metrics.failover_seconds.observe(took.as_secs_f64());
        let note = format!("Ready again {:.0}s after the node was lost", took.as_secs_f64());
        publish(ctx, &reference, EventType::Normal, "FailoverComplete", note).await;
    }
    let transition = status::transition(qdb.status.as_ref(), &new);
    timed(ctx, "status", status::ensure(ctx, &qdb, new.clone())).await?;
    if let Some(note) = transition {
        publish(ctx, &reference, EventType::Normal, "PhaseChanged", note).await;
        if result.is_ok()
            && let Some((reason, message)) = &facts.pod_failure
        {
            publish(ctx, &reference, EventType::Warning, reason.as_str(), message.clone()).await;
        }
    }
    if let Some(note) = facts.held.clone().filter(|_| !status::was_held(qdb.status.as_ref())) {
        ctx.metrics.failovers_held.inc();
        publish(ctx, &reference, EventType::Warning, DegradedReason::FailoverHeld.as_str(), note).await;
    }
    if let Err(e) = result {
        match failed {
            // Named by its reason, with AWS's words: what on-call and the provisioner read.
            Some((reason, message)) => {
                publish(ctx, &reference, EventType::Warning, reason.as_str(), message).await
            }
            None => publish(ctx, &reference, EventType::Warning, "ReconcileFailed", chain(&e)).await,
        }
        return Err(e);
    }
    let check = next_check(&new, &facts.waiting, ctx.settings.resync, ctx.settings.poll);
    Ok(Action::requeue(until_scheduled(check, facts.next_snapshot, jiff::Timestamp::now())))
}

/// The pass's requeue, brought forward to the snapshot schedule's next time (a second past it,
/// so the pass finds it due).
pub fn until_scheduled(check: Duration, next: Option<jiff::Timestamp>, now: jiff::Timestamp) -> Duration {
    let Some(next) = next else { return check };
    let until = Duration::try_from(next.duration_since(now)).unwrap_or_default() + Duration::from_secs(1);
    check.min(until)
}

/// How often an upgrade queued behind the replacement budget asks again. Polling a thousand
/// queued databases every few seconds would load the apiserver for nothing.
const QUEUED_RECHECK: Duration = Duration::from_secs(30);

/// How often a node move that waits on EC2 (the old instance stopping, the volume detaching or
/// attaching) looks again: each of these takes seconds and the database is down meanwhile, so a
/// 3 s poll added about 1.5 s to each wait of a failover. Moves at once are few (the replacement
/// budget, the zone gate), so the extra describes are too.
const MOVE_POLL: Duration = Duration::from_secs(1);

/// When to look again.
/// - Converged with nothing awaited: at the resync. The watches bring any change sooner.
/// - Waiting on something: polled. A database may be serving (phase Running) while it waits, for
///   example on a replacement, and AWS state such as an instance stopping or a volume detaching
///   has no watch; a move waiting on EC2 at [`MOVE_POLL`].
/// - Only queued for the upgrade budget: at [`QUEUED_RECHECK`].
pub fn next_check(
    new: &qdb_crd::QuestDBStatus,
    waiting: &[(WaitReason, String)],
    resync: Duration,
    poll: Duration,
) -> Duration {
    if waiting.is_empty() {
        if status::is_converged(new) { resync } else { poll }
    } else if waiting.iter().all(|(reason, _)| *reason == WaitReason::StorageResizeBlocked) {
        // Hours away, and nothing else to do: the resync will find the time has come.
        resync
    } else if waiting.iter().all(|(reason, _)| *reason == WaitReason::UpgradeQueued) {
        QUEUED_RECHECK.min(resync).max(poll)
    } else if waiting.iter().any(|(reason, _)| {
        matches!(
            reason,
            WaitReason::FencingOldNode | WaitReason::VolumeDetaching | WaitReason::VolumeAttaching
        )
    }) {
        MOVE_POLL.min(poll)
    } else {
        poll
    }
}

/// The finalizer helper answers "wait for the change" after adding the finalizer, trusting the
/// watch event of its own patch to bring the next pass. With a thousand databases one such event
/// was lost and its database never got a status, so its answer becomes a poll. (A pass of ours
/// may still wait for a change on purpose: an invalid spec.)
pub fn look_again(action: Action, poll: Duration) -> Action {
    if action == Action::await_change() { Action::requeue(poll) } else { action }
}

/// The controller's reconcile: apply or, once deleted, clean up behind the finalizer.
pub async fn reconcile(qdb: Arc<QuestDB>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = qdb.namespace().unwrap_or_default();
    let api: Api<QuestDB> = Api::namespaced(ctx.client.clone(), &ns);
    let key = format!("{ns}/{}", qdb.name_any());
    ctx.metrics.in_flight.inc();
    // Whether a pass of ours ran, or the finalizer helper answered on its own.
    let ours = AtomicBool::new(false);
    // The helper's own writes: it adds the finalizer (and answers alone), and removes it once
    // cleanup is done. Counted here, as every other request is.
    if qdb.meta().deletion_timestamp.is_none() && !qdb.finalizers().iter().any(|f| f == FINALIZER) {
        ctx.metrics.kube("patch", "QuestDB");
    }
    let result = finalizer::finalizer(&api, FINALIZER, qdb, |event| async {
        ours.store(true, Ordering::Relaxed);
        match event {
            Finalizing::Apply(q) => apply(q, &ctx).await,
            Finalizing::Cleanup(q) => {
                let uid = q.uid().unwrap_or_default();
                let done = cleanup::run(q, &ctx).await;
                // Kept until cleanup is over: its last listing must wait out what was created.
                if done.is_ok() {
                    ctx.inventory.forget(&uid);
                    ctx.budget.release(&uid);
                    ctx.metrics.kube("patch", "QuestDB");
                }
                done
            }
        }
    })
    .await
    .map(|action| if ours.load(Ordering::Relaxed) { action } else { look_again(action, ctx.settings.poll) })
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.in_flight.dec();
    if result.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&key);
    }
    result
}

/// Per-resource exponential backoff with jitter (backon), reset by the next success.
pub fn error_policy(qdb: Arc<QuestDB>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Finalizer(f) = error
        && let finalizer::Error::CleanupFailed(Error::CleanupWaiting(what)) = f.as_ref()
    {
        tracing::debug!(resource = %qdb.name_any(), what, "cleanup in progress");
        return Action::requeue(ctx.settings.poll);
    }
    let key = failure_key(&qdb);
    let attempts = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    if permanent(error, attempts, ctx.settings.capacity_retries).is_some() {
        // Failed: retrying soon would fail the same way. A spec change brings a pass at once;
        // the resync tries again in case the account was fixed.
        warn!(resource = %key, error = %chain(error), "reconcile failed for good; waiting for a change");
        return Action::requeue(ctx.settings.resync);
    }
    let delay = backoff(attempts);
    warn!(resource = %key, attempts, retry_in_ms = delay.as_millis() as u64, error = %chain(error), "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(attempts: u32) -> Duration {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(60))
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pass_that_touched_ec2_or_failed_needs_a_new_view_of_it() {
        let note = |r: &'static str| (r, String::new());
        assert!(!needs_new_view(&[], false), "nothing done");
        let kube_and_dns =
            [note("CreatedChild"), note("UpdatedChild"), note("UpdatedDns"), note("DeletedStuckPod")];
        assert!(!needs_new_view(&kube_and_dns, false), "Kubernetes objects and DNS leave EC2 as it was");
        assert!(needs_new_view(&kube_and_dns, true), "a failure may have happened mid-EC2");
        assert!(needs_new_view(&[note("CreatedChild"), note("CreatedVolume")], false));
        assert!(needs_new_view(&[note("SomeReasonAddedLater")], false), "unknown reasons count");
    }

    #[test]
    fn a_pass_writes_one_event_per_reason_with_every_note() {
        let actions = vec![
            ("CreatedChild", "StatefulSet db".to_string()),
            ("CreatedSecurityGroup", "sg-1".to_string()),
            ("CreatedChild", "Service db".to_string()),
        ];
        assert_eq!(
            events_of(actions),
            [
                ("CreatedChild", "StatefulSet db; Service db".to_string()),
                ("CreatedSecurityGroup", "sg-1".to_string())
            ]
        );
    }

    #[test]
    fn a_serving_database_that_awaits_something_is_polled() {
        let (resync, poll) = (Duration::from_secs(300), Duration::from_secs(3));
        let running = qdb_crd::QuestDBStatus { phase: Some(qdb_crd::Phase::Running), ..Default::default() };
        assert_eq!(next_check(&running, &[], resync, poll), resync);
        let waiting =
            [(WaitReason::ReplacingNode, "waiting for replacement i-2's node to be Ready".to_string())];
        assert_eq!(next_check(&running, &waiting, resync, poll), poll);
        let updating = qdb_crd::QuestDBStatus { phase: Some(qdb_crd::Phase::Updating), ..Default::default() };
        assert_eq!(next_check(&updating, &[], resync, poll), poll);
        let queued = [(WaitReason::UpgradeQueued, "waiting for the replacement budget".to_string())];
        assert_eq!(next_check(&running, &queued, resync, poll), QUEUED_RECHECK);
        assert_eq!(next_check(&running, &queued, Duration::from_secs(5), poll), Duration::from_secs(5));
        for reason in [WaitReason::FencingOldNode, WaitReason::VolumeDetaching, WaitReason::VolumeAttaching] {
            let moving = [(WaitReason::ReplacingNode, String::new()), (reason, String::new())];
            assert_eq!(next_check(&running, &moving, resync, poll), MOVE_POLL, "{reason:?}");
        }
        // Hours of EBS cool-down alone: the resync finds the time, no poll every few seconds.
        let blocked = [(WaitReason::StorageResizeBlocked, "growing vol-1 at ...".to_string())];
        assert_eq!(next_check(&running, &blocked, resync, poll), resync);
    }

    #[test]
    fn the_finalizer_helpers_wait_for_a_watch_event_becomes_a_poll() {
        let poll = Duration::from_secs(3);
        assert_eq!(look_again(Action::await_change(), poll), Action::requeue(poll));
        let later = Action::requeue(Duration::from_secs(300));
        assert_eq!(look_again(later.clone(), poll), later);
    }

    #[test]
    fn backoff_grows_with_attempts_and_is_bounded() {
        assert!(backoff(1) <= Duration::from_secs(1));
        assert!(backoff(5) >= Duration::from_secs(8));
        assert!(backoff(50) <= Duration::from_secs(120));
    }
}
