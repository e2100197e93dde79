//! Snapshots of the data volume: one EBS snapshot per request id. Requests come from
//! `spec.snapshot` (on demand), the safety gate ([`super::safety`], before a risky change) and
//! `spec.snapshotPolicy.schedule` (due times, in UTC); one is taken at a time, in that order.
//!
//! While the database serves, the snapshot is consistent: `CHECKPOINT CREATE` over pgwire (QuestDB
//! syncs and keeps a checkpoint of its metadata on the volume; writes go on), CreateSnapshot (EBS
//! fixes the volume's point in time when it accepts the call), `CHECKPOINT RELEASE`. A database
//! made from it recovers exactly the checkpoint ([`crate::build::statefulset::SNAPSHOT_INSTANCE_ENV`]).
//! The checkpoint is a persisted step, like a node replacement: `status.checkpoint` is written
//! before `CHECKPOINT CREATE` runs and cleared only after `CHECKPOINT RELEASE` answered, so an
//! operator stopped anywhere in between releases it when it comes back (a checkpoint left in
//! effect holds back QuestDB's cleanup of old files, and the next CREATE is refused). A database
//! that does not serve (paused, starting, failing) gets a crash-consistent snapshot, marked so.
//!
//! CreateSnapshot takes no ClientToken: each snapshot is tagged with its request at creation and
//! looked for by that tag before one is taken, so a create whose answer was lost is recorded, not
//! repeated. The order of the decisions lives in the pure [`plan`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use qdb_crd::cron::Schedule;
use qdb_crd::{
    Admitted, CheckpointStatus, Consistency, QuestDB, SnapshotPhase, SnapshotReason, SnapshotRequest,
    SnapshotStatus, WaitReason,
};
use serde_json::json;

use super::{Error, Facts, aws_err, kube_err, owner_of};
use crate::aws::{EbsSnapshot, SnapshotState};
use crate::build::Desired;
use crate::context::Context;
use crate::sql;

/// The field manager of `status.snapshots` and `status.checkpoint`: the every-pass status apply
/// (another manager) never removes them.
const SNAPSHOT_MANAGER: &str = "qdb-operator-snapshots";

/// What QuestDB answers a `CHECKPOINT CREATE` while one is in effect: the checkpoint an earlier
/// pass made is still there, which is what the step needs.
const CHECKPOINT_IN_EFFECT: &str = "Waiting for CHECKPOINT RELEASE";

/// How long a serving database may refuse `CHECKPOINT CREATE` (or not answer it) before its
/// snapshot is taken crash-consistent instead: two attempts of [`sql`]'s 15 s and a retry.
pub const CHECKPOINT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the checkpoint step recorded at `since` has waited long enough.
pub fn out_of_patience(since: &Time, now: jiff::Timestamp) -> bool {
    std::time::Duration::try_from(now.duration_since(since.0))
        .is_ok_and(|waited| waited >= CHECKPOINT_PATIENCE)
}

/// The snapshot step's next move.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing asked for and nothing open.
    Idle,
    /// The data volume does not exist yet: nothing to snapshot.
    NoVolume,
    /// A checkpoint may be in effect and its snapshot was taken (or is no longer wanted):
    /// `CHECKPOINT RELEASE`, then clear `status.checkpoint`.
    Release,
    /// EC2 lists the request's snapshot, which status does not record (an earlier pass stopped
    /// between the two): record it.
    Record(EbsSnapshot, Consistency),
    /// The database serves: record the checkpoint step, `CHECKPOINT CREATE`, take a consistent
    /// snapshot.
    Checkpoint,
    /// The database does not serve: take a crash-consistent snapshot.
    Take,
    /// Recorded snapshots are still pending: read their state again.
    Refresh,
}

/// `open` is the request no recorded snapshot answers yet; `listed` what EC2 lists of the
/// database's snapshots (read only when something is open or pending).
pub fn plan(
    open: Option<&SnapshotRequest>,
    recorded: &[SnapshotStatus],
    checkpoint: Option<&CheckpointStatus>,
    listed: &[EbsSnapshot],
    serving: bool,
    has_volume: bool,
) -> Plan {
    // A checkpoint whose request is answered (or replaced by another) is released first.
    if checkpoint.is_some_and(|c| open.is_none_or(|r| r.id != c.request)) {
        return Plan::Release;
    }
    let Some(request) = open else {
        let pending = recorded.iter().any(|s| s.state == SnapshotPhase::Pending);
        return if pending { Plan::Refresh } else { Plan::Idle };
    };
    if let Some(s) = listed.iter().find(|s| s.request.as_deref() == Some(request.id.as_str())) {
        // Taken under the checkpoint step only when one was recorded first.
        let consistency =
            if checkpoint.is_some() { Consistency::Consistent } else { Consistency::CrashConsistent };
        return Plan::Record(s.clone(), consistency);
    }
    if !has_volume {
        Plan::NoVolume
    } else if serving {
        Plan::Checkpoint
    } else {
        Plan::Take
    }
}

/// A snapshot asked for, and why.
pub type Wanted = (SnapshotRequest, SnapshotReason);

/// The first request no recorded snapshot answers yet.
pub fn open_request<'a>(wanted: &'a [Wanted], recorded: &[SnapshotStatus]) -> Option<&'a Wanted> {
    wanted.iter().find(|(r, _)| !recorded.iter().any(|s| s.request == r.id))
}

/// The scheduled snapshot due at `now`, if any: the schedule's first time after the last
/// scheduled snapshot that is not in the future. Its request id is that time, so a pass that took
/// it but stopped before recording it asks for the same one again and finds it by its tag. Times
/// missed while the operator was away are caught up with this one snapshot.
///
/// The last scheduled snapshot counts from the later of the time it was due (its id) and when EBS
/// started it: an EBS clock behind the operator's would otherwise put it before its own due time,
/// which would then be due forever under an id already recorded. With none recorded (never taken,
/// or pruned by `keep` for newer snapshots of other reasons) the newest snapshot of any reason
/// counts, else `since` (the database's creation).
pub fn scheduled(
    schedule: &Schedule,
    recorded: &[SnapshotStatus],
    since: jiff::Timestamp,
    now: jiff::Timestamp,
) -> Option<SnapshotRequest> {
    let at = |s: &SnapshotStatus| {
        qdb_crd::scheduled_fire(&s.request).map_or(s.taken_at.0, |f| f.max(s.taken_at.0))
    };
    let scheduled = recorded.iter().filter(|s| s.reason == SnapshotReason::Scheduled).map(at).max();
    let last = scheduled.or_else(|| recorded.iter().map(|s| s.taken_at.0).max()).unwrap_or(since);
    let due = schedule.next_after(last).filter(|due| *due <= now)?;
    Some(SnapshotRequest { id: qdb_crd::scheduled_request(due), label: None })
}

fn phase_of(state: SnapshotState) -> SnapshotPhase {
    match state {
        SnapshotState::Completed => SnapshotPhase::Completed,
        SnapshotState::Error => SnapshotPhase::Error,
        SnapshotState::Pending | SnapshotState::Unknown => SnapshotPhase::Pending,
    }
}

/// The status entry of a snapshot just taken or found.
pub fn entry(s: &EbsSnapshot, (request, reason): &Wanted, consistency: Consistency) -> SnapshotStatus {
    SnapshotStatus {
        id: s.id.clone(),
        request: request.id.clone(),
        label: request.label.clone(),
        taken_at: Time(s.started.unwrap_or_else(jiff::Timestamp::now)),
        size_gib: s.volume_size_gib,
        state: phase_of(s.state),
        consistency,
        reason: *reason,
    }
}

/// The snapshots `keep` lets go, oldest first: every completed one beyond the newest `keep`
/// completed, and every failed one. Never a pending one (its completion is not known yet), nor
/// one answering a `current` request (the spec's, the safety gate's): status must go on
/// recording it, or the request would be taken again.
pub fn prune(recorded: &[SnapshotStatus], keep: Option<u32>, current: &[&str]) -> Vec<String> {
    let Some(keep) = keep else { return Vec::new() };
    let mut completed: Vec<&SnapshotStatus> =
        recorded.iter().filter(|s| s.state == SnapshotPhase::Completed).collect();
    completed.sort_by_key(|s| s.taken_at.0);
    let beyond = completed.len().saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
    let mut out: Vec<&SnapshotStatus> = completed.into_iter().take(beyond).collect();
    out.extend(recorded.iter().filter(|s| s.state == SnapshotPhase::Error));
    out.sort_by_key(|s| s.taken_at.0);
    out.into_iter().filter(|s| !current.contains(&s.request.as_str())).map(|s| s.id.clone()).collect()
}

/// Brings pending entries up to what EC2 lists; true if any changed.
pub fn refresh(recorded: &mut [SnapshotStatus], listed: &[EbsSnapshot]) -> bool {
    let mut changed = false;
    for r in recorded.iter_mut().filter(|r| r.state == SnapshotPhase::Pending) {
        if let Some(s) = listed.iter().find(|s| s.id == r.id) {
            let phase = phase_of(s.state);
            changed |= phase != r.state;
            r.state = phase;
        }
    }
    changed
}

/// The snapshots this pass wants, in the order they are taken: the safety gate's, the spec's,
/// the schedule's (none for a paused database: its volume does not change). Also notes when the
/// schedule next fires, for the pass's requeue.
fn wanted(d: &Desired, recorded: &[SnapshotStatus], facts: &mut Facts) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = facts.safety.iter().cloned().collect();
    out.extend(d.spec.snapshot.iter().map(|r| (r.clone(), SnapshotReason::OnDemand)));
    // Validated before the pass; a schedule that does not parse is no schedule.
    let schedule = d.spec.snapshot_policy.schedule.as_deref().and_then(|s| s.parse::<Schedule>().ok());
    if let Some(schedule) = schedule.filter(|_| !d.spec.paused) {
        let now = jiff::Timestamp::now();
        facts.next_snapshot = schedule.next_after(now);
        let since = d.created.unwrap_or(now);
        out.extend(scheduled(&schedule, recorded, since, now).map(|r| (r, SnapshotReason::Scheduled)));
    }
    out
}

/// Runs the snapshot step for one pass. Without a request, an open checkpoint or a pending
/// snapshot it calls nothing (the steady state costs no AWS call).
pub async fn ensure(ctx: &Context, qdb: &QuestDB, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    let status = qdb.status.as_ref();
    let mut recorded = status.map(|s| s.snapshots.clone()).unwrap_or_default();
    let mut checkpoint = status.and_then(|s| s.checkpoint.clone());
    let admitted = facts.admitted.clone();
    let wanted = wanted(d, &recorded, facts);
    let pending = recorded.iter().any(|s| s.state == SnapshotPhase::Pending);
    // Never pruned: what a current request answers, and the snapshot a restore (asked for or
    // under way) is made from.
    let restoring: Vec<String> = [
        d.spec.restore.as_ref().map(|r| r.snapshot.clone()),
        facts.restore.as_ref().map(|r| r.snapshot.clone()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let restored_requests: Vec<String> =
        recorded.iter().filter(|s| restoring.contains(&s.id)).map(|s| s.request.clone()).collect();
    let current: Vec<&str> = wanted
        .iter()
        .map(|(r, _)| r.id.as_str())
        .chain(restored_requests.iter().map(String::as_str))
        .collect();
    let pruned = prune(&recorded, d.spec.snapshot_policy.keep, &current);
    if open_request(&wanted, &recorded).is_none() && checkpoint.is_none() && !pending && pruned.is_empty() {
        return Ok(());
    }
    let owner = owner_of(d, &ctx.settings.cluster);
    let listed = ctx.aws.owned_snapshots(&owner).await.map_err(aws_err("snapshot"))?;
    let volume = status.and_then(|s| s.volume.as_ref()).map(|v| v.id.clone());
    let pod = if facts.pod_ready { super::children::cached_pod(ctx, d).await? } else { None };
    let ip = pod.and_then(|p| p.status?.pod_ip);
    let credentials = sql::credentials(&d.spec.server_config);
    // Each move changes what the plan sees; a pass makes at most these few (checkpoint, record,
    // release, refresh) and leaves the rest to the next.
    for _ in 0..4 {
        let open = open_request(&wanted, &recorded);
        let next =
            plan(open.map(|w| &w.0), &recorded, checkpoint.as_ref(), &listed, ip.is_some(), volume.is_some());
        let (consistency, why) = match next {
            Plan::Idle => break,
            Plan::NoVolume => {
                facts.wait(WaitReason::TakingSnapshot, "the snapshot waits for the data volume");
                break;
            }
            Plan::Release => {
                match &ip {
                    Some(ip) => sql::execute(ip, &credentials, "CHECKPOINT RELEASE")
                        .await
                        .map_err(|e| Error::Sql { step: "snapshot", source: e })?,
                    // A checkpoint lives in the QuestDB process: without a pod there is none.
                    None if facts.pod_gone || d.spec.paused => {}
                    None => {
                        facts.wait(
                            WaitReason::TakingSnapshot,
                            "releasing the checkpoint once the database serves",
                        );
                        break;
                    }
                }
                let request = checkpoint.take().map(|c| c.request).unwrap_or_default();
                record(ctx, qdb, &recorded, None, admitted.as_ref()).await?;
                facts.did(
                    "ReleasedCheckpoint",
                    format!("CHECKPOINT RELEASE after the snapshot for {request}"),
                );
                continue;
            }
            Plan::Record(s, consistency) => {
                let Some(w) = open else { break };
                recorded.push(entry(&s, w, consistency));
                record(ctx, qdb, &recorded, checkpoint.as_ref(), admitted.as_ref()).await?;
                facts.did(
                    "TookSnapshot",
                    format!("{} of the volume, {consistency:?} (found by its request tag)", s.id),
                );
                continue;
            }
            Plan::Checkpoint => {
                let (Some((r, _)), Some(ip)) = (open, &ip) else { break };
                if checkpoint.as_ref().is_none_or(|c| c.request != r.id) {
                    let step =
                        CheckpointStatus { request: r.id.clone(), since: Time(jiff::Timestamp::now()) };
                    checkpoint = Some(step);
                    record(ctx, qdb, &recorded, checkpoint.as_ref(), admitted.as_ref()).await?;
                }
                match sql::execute(ip, &credentials, "CHECKPOINT CREATE").await {
                    Ok(()) => (Consistency::Consistent, ""),
                    Err(e) if e.message().contains(CHECKPOINT_IN_EFFECT) => (Consistency::Consistent, ""),
                    Err(e)
                        if checkpoint
                            .as_ref()
                            .is_some_and(|c| out_of_patience(&c.since, jiff::Timestamp::now())) =>
                    {
                        // The database serves but does not take the statement (its pgwire
                        // credentials changed, a network policy): a crash-consistent snapshot
                        // beats none. A CREATE that timed out may still have run: released below
                        // on a best-effort basis.
                        facts.did(
                            "CheckpointFailed",
                            format!("{}; taking a crash-consistent snapshot", super::chain(&e)),
                        );
                        checkpoint = None;
                        let _ = sql::execute(ip, &credentials, "CHECKPOINT RELEASE").await;
                        record(ctx, qdb, &recorded, None, admitted.as_ref()).await?;
                        (Consistency::CrashConsistent, "")
                    }
                    Err(e) => return Err(Error::Sql { step: "snapshot", source: e }),
                }
            }
            Plan::Take => (Consistency::CrashConsistent, " (the database is not serving)"),
            Plan::Refresh => {
                if refresh(&mut recorded, &listed) {
                    record(ctx, qdb, &recorded, checkpoint.as_ref(), admitted.as_ref()).await?;
                }
                break;
            }
        };
        // Checkpoint and Take: the snapshot itself, recorded before the next move.
        let (Some(w), Some(vol)) = (open, &volume) else { break };
        facts.created();
        let s = ctx.aws.create_snapshot(&owner, vol, &w.0.id, w.0.label.as_deref()).await;
        let s = s.map_err(aws_err("snapshot"))?;
        recorded.push(entry(&s, w, consistency));
        record(ctx, qdb, &recorded, checkpoint.as_ref(), admitted.as_ref()).await?;
        facts.did("TookSnapshot", format!("{} of {vol}, {:?}, {consistency:?}{why}", s.id, w.1));
    }
    if let Some(s) = recorded.iter().find(|s| s.state == SnapshotPhase::Pending) {
        facts.wait(WaitReason::TakingSnapshot, format!("EBS is completing snapshot {}", s.id));
    }
    // Retention, once nothing is in flight: deleted in EC2 first, then dropped from status (a
    // stop in between deletes an already deleted one again, which counts as done).
    let pruned = prune(&recorded, d.spec.snapshot_policy.keep, &current);
    if checkpoint.is_none() && !pruned.is_empty() {
        for id in &pruned {
            ctx.aws.delete_snapshot(id).await.map_err(aws_err("snapshot"))?;
        }
        recorded.retain(|s| !pruned.contains(&s.id));
        record(ctx, qdb, &recorded, None, admitted.as_ref()).await?;
        let count = d.spec.snapshot_policy.keep.unwrap_or_default();
        facts.did("PrunedSnapshots", format!("{} (keeping the newest {count})", pruned.join(", ")));
    }
    Ok(())
}

/// Writes `status.snapshots`, `status.checkpoint` (removed when None) and `status.admitted`
/// under the snapshot step's own field manager: the persisted part of the step, written before
/// the next move. Each write states all three, as a server-side apply removes what its manager
/// stated before and leaves out.
pub(super) async fn record(
    ctx: &Context,
    q: &QuestDB,
    snapshots: &[SnapshotStatus],
    checkpoint: Option<&CheckpointStatus>,
    admitted: Option<&Admitted>,
) -> Result<(), Error> {
    let api: Api<QuestDB> = Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    let mut status = json!({"snapshots": snapshots});
    if let Some(c) = checkpoint {
        status["checkpoint"] = json!(c);
    }
    if let Some(a) = admitted {
        status["admitted"] = json!(a);
    }
    let patch = json!({"apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "status": status});
    ctx.metrics.kube("apply", "QuestDB/status");
    api.patch_status(&q.name_any(), &PatchParams::apply(SNAPSHOT_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(kube_err("snapshot", "recording the snapshot step"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> SnapshotRequest {
        SnapshotRequest { id: id.into(), label: None }
    }

    fn listed(id: &str, request: &str, state: SnapshotState) -> EbsSnapshot {
        EbsSnapshot {
            id: id.into(),
            state,
            volume_size_gib: 10,
            started: None,
            request: Some(request.into()),
            retained: false,
            owner_uid: "u".into(),
        }
    }

    fn recorded(id: &str, request: &str, state: SnapshotPhase) -> SnapshotStatus {
        let wanted = (self::request(request), SnapshotReason::OnDemand);
        let mut e = entry(&listed(id, request, SnapshotState::Pending), &wanted, Consistency::Consistent);
        e.state = state;
        e
    }

    fn step(request: &str) -> CheckpointStatus {
        CheckpointStatus { request: request.into(), since: Time(jiff::Timestamp::UNIX_EPOCH) }
    }

    #[test]
    fn a_serving_database_is_snapshotted_under_a_checkpoint_and_a_stopped_one_as_it_is() {
        let r = request("i-1");
        assert_eq!(plan(Some(&r), &[], None, &[], true, true), Plan::Checkpoint);
        assert_eq!(plan(Some(&r), &[], None, &[], false, true), Plan::Take);
        assert_eq!(plan(Some(&r), &[], None, &[], true, false), Plan::NoVolume);
        assert_eq!(plan(None, &[], None, &[], true, true), Plan::Idle);
    }

    #[test]
    fn an_interrupted_snapshot_is_resumed_never_taken_twice_and_its_checkpoint_always_released() {
        let r = request("i-1");
        // Stopped after the checkpoint step was recorded, before CreateSnapshot: CHECKPOINT
        // CREATE again (QuestDB answers that one is in effect, if it is), then the snapshot.
        assert_eq!(plan(Some(&r), &[], Some(&step("i-1")), &[], true, true), Plan::Checkpoint);
        // Stopped after CreateSnapshot, before recording it: found by its tag, recorded.
        let taken = listed("snap-1", "i-1", SnapshotState::Pending);
        let found = plan(Some(&r), &[], Some(&step("i-1")), std::slice::from_ref(&taken), true, true);
        assert_eq!(found, Plan::Record(taken.clone(), Consistency::Consistent));
        let found = plan(Some(&r), &[], None, &[taken], false, true);
        assert_eq!(
            found,
            Plan::Record(listed("snap-1", "i-1", SnapshotState::Pending), Consistency::CrashConsistent)
        );
        // Recorded, checkpoint still open: released, whatever the snapshot's state.
        let done = [recorded("snap-1", "i-1", SnapshotPhase::Pending)];
        let wanted = [(r.clone(), SnapshotReason::OnDemand)];
        let open = open_request(&wanted, &done).map(|w| &w.0);
        assert_eq!(plan(open, &done, Some(&step("i-1")), &[], true, true), Plan::Release);
        // A newer request replaced the one the checkpoint was for: that checkpoint goes first.
        assert_eq!(plan(Some(&request("i-2")), &[], Some(&step("i-1")), &[], true, true), Plan::Release);
        assert_eq!(plan(None, &[], Some(&step("i-1")), &[], true, true), Plan::Release);
    }

    #[test]
    fn a_database_that_refuses_the_checkpoint_is_snapshotted_crash_consistent_after_a_while() {
        let since = jiff::Timestamp::from_second(1_000_000).unwrap();
        assert!(!out_of_patience(&Time(since), since + jiff::SignedDuration::from_secs(29)));
        assert!(out_of_patience(&Time(since), since + jiff::SignedDuration::from_secs(30)));
    }

    #[test]
    fn retention_lets_go_of_the_oldest_completed_and_the_failed_never_the_pending_or_current() {
        let at = |id: &str, request: &str, state, secs| {
            let mut e = recorded(id, request, state);
            e.taken_at = Time(jiff::Timestamp::from_second(secs).unwrap());
            e
        };
        let snaps = [
            at("snap-3", "i-3", SnapshotPhase::Completed, 30),
            at("snap-1", "i-1", SnapshotPhase::Completed, 10),
            at("snap-2", "i-2", SnapshotPhase::Error, 20),
            at("snap-4", "i-4", SnapshotPhase::Completed, 40),
            at("snap-5", "i-5", SnapshotPhase::Pending, 50),
        ];
        assert!(prune(&snaps, None, &["i-5"]).is_empty(), "no policy: all kept");
        assert_eq!(prune(&snaps, Some(2), &["i-5"]), ["snap-1", "snap-2"]);
        assert_eq!(prune(&snaps, Some(1), &["i-5"]), ["snap-1", "snap-2", "snap-3"]);
        assert_eq!(prune(&snaps, Some(1), &["i-1"]), ["snap-2", "snap-3"], "the current request's stays");
        assert_eq!(prune(&snaps, Some(1), &["i-1", "i-3"]), ["snap-2"], "as does the safety gate's");
        assert_eq!(prune(&snaps, Some(10), &[]), ["snap-2"], "a failed one goes whatever the count");
    }

    #[test]
    fn pending_snapshots_are_followed_until_ebs_completes_them() {
        let r = request("i-1");
        let mut done = vec![recorded("snap-1", "i-1", SnapshotPhase::Pending)];
        let wanted = [(r.clone(), SnapshotReason::OnDemand)];
        assert_eq!(open_request(&wanted, &done), None);
        assert_eq!(plan(None, &done, None, &[], true, true), Plan::Refresh);
        assert!(!refresh(&mut done, &[listed("snap-1", "i-1", SnapshotState::Pending)]));
        assert!(refresh(&mut done, &[listed("snap-1", "i-1", SnapshotState::Completed)]));
        assert_eq!(done[0].state, SnapshotPhase::Completed);
        assert_eq!(
            plan(open_request(&wanted, &done).map(|w| &w.0), &done, None, &[], true, true),
            Plan::Idle
        );
    }

    #[test]
    fn a_schedule_is_due_once_per_time_and_catches_up_once() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let hourly: Schedule = "0 * * * *".parse().unwrap();
        let created = at("2026-12-07T10:20:00Z");
        assert_eq!(scheduled(&hourly, &[], created, at("2026-12-07T10:59:00Z")), None);
        let due = scheduled(&hourly, &[], created, at("2026-12-07T11:00:05Z")).unwrap();
        assert_eq!(due.id, "scheduled-20261207T1100Z");
        let mut taken = recorded("snap-1", &due.id, SnapshotPhase::Pending);
        taken.reason = SnapshotReason::Scheduled;
        taken.taken_at = Time(at("2026-12-07T11:00:06Z"));
        assert_eq!(
            scheduled(&hourly, std::slice::from_ref(&taken), created, at("2026-12-07T11:40:00Z")),
            None
        );
        // Away for three hours: one snapshot, named after the first time missed, so a pass that
        // took it and stopped before recording it asks for the same one.
        let late = scheduled(&hourly, std::slice::from_ref(&taken), created, at("2026-12-07T14:30:00Z"));
        assert_eq!(late.map(|r| r.id).as_deref(), Some("scheduled-20261207T1200Z"));
        // EBS's clock behind the operator's: started "before" it was due, still not due again.
        let mut early = taken.clone();
        early.taken_at = Time(at("2026-12-07T10:59:59Z"));
        assert_eq!(
            scheduled(&hourly, std::slice::from_ref(&early), created, at("2026-12-07T11:40:00Z")),
            None
        );
        // Another reason's snapshot does not stand in for a scheduled one while one is recorded;
        // with none left (pruned by keep), the newest of any reason is where the schedule goes on.
        let mut other = taken.clone();
        other.reason = SnapshotReason::OnDemand;
        other.request = "i-7".into();
        other.taken_at = Time(at("2026-12-07T11:30:00Z"));
        assert_eq!(scheduled(&hourly, &[taken, other.clone()], created, at("2026-12-07T11:40:00Z")), None);
        assert_eq!(
            scheduled(&hourly, std::slice::from_ref(&other), created, at("2026-12-07T11:40:00Z")),
            None
        );
        let next = scheduled(&hourly, &[other], created, at("2026-12-07T12:00:30Z"));
        assert_eq!(next.map(|r| r.id).as_deref(), Some("scheduled-20261207T1200Z"));
    }
}
