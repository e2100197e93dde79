//! Progress: what the operator's status says about an applied instruction. Pure, so every case
//! is unit-tested; the tracker feeds it from the clusters' watches.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use qdb_crd::{Phase, QuestDB};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing new to say.
    Wait,
    /// Still converging; the text is announced once per change.
    Progress(String),
    Succeeded,
    /// A later instruction's spec reached the resource before this one's state was observed
    /// Ready: this one's effect is not there, and never will be.
    Superseded,
    Failed {
        reason: String,
        message: String,
    },
}

fn condition<'a>(qdb: &'a QuestDB, type_: &str) -> Option<&'a Condition> {
    qdb.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(qdb: &QuestDB, type_: &str) -> bool {
    condition(qdb, type_).is_some_and(|c| c.status == "True")
}

fn describe(c: &Condition) -> String {
    if c.message.is_empty() { c.reason.clone() } else { format!("{}: {}", c.reason, c.message) }
}

/// Judges an applied instruction of `operation` whose apply produced `generation`, against the
/// resource as the cluster has it now (None = absent).
pub fn judge(operation: &str, generation: Option<i64>, qdb: Option<&QuestDB>) -> Verdict {
    if operation == "delete" {
        return match qdb {
            None => Verdict::Succeeded,
            Some(q) if q.metadata.deletion_timestamp.is_some() => {
                Verdict::Progress(progressing(q).unwrap_or_else(|| "Deleting".to_string()))
            }
            Some(_) => Verdict::Wait,
        };
    }
    let Some(q) = qdb else { return Verdict::Wait };
    let applied = generation.unwrap_or(0);
    let current = q.metadata.generation.unwrap_or(0);
    let observed = q.status.as_ref().and_then(|s| s.observed_generation).unwrap_or(0);
    // Only the operator's word on this very generation says anything about this instruction:
    // a later generation's Ready (or failure) is the later instruction's.
    if observed > applied {
        return Verdict::Superseded;
    }
    let verdict = if observed == applied { settled(operation, q) } else { progress_of(q) };
    match verdict {
        Verdict::Wait | Verdict::Progress(_) if current > applied => Verdict::Superseded,
        v => v,
    }
}

/// The status entry of the snapshot a Snapshot instruction (`request`, its id) asked for.
pub fn snapshot_of<'a>(q: &'a QuestDB, request: &str) -> Option<&'a qdb_crd::SnapshotStatus> {
    q.status.as_ref()?.snapshots.iter().find(|s| s.request == request)
}

/// The snapshot gossip names for an applied instruction: a Snapshot instruction's own; for a
/// create, the snapshot the database starts from (a clone's resolved source); else the safety
/// snapshot the operator took before the risky change of the generation the instruction made
/// (`qdb_crd::safety_request`): the point the backend can go back to.
pub fn announced_snapshot<'a>(
    q: &'a QuestDB,
    operation: &str,
    instruction: &str,
    generation: Option<i64>,
) -> Option<&'a str> {
    let safety = |g| snapshot_of(q, &qdb_crd::safety_request(g)).map(|s| s.id.as_str());
    match (operation, generation) {
        ("snapshot", _) => snapshot_of(q, instruction).map(|s| s.id.as_str()),
        ("restore", _) => {
            q.spec.restore.as_ref().filter(|r| r.id == instruction).map(|r| r.snapshot.as_str())
        }
        ("create", g) => q.spec.volume.from_snapshot.as_deref().or_else(|| g.and_then(safety)),
        (_, g) => g.and_then(safety),
    }
}

/// Judges an applied Snapshot instruction (`request`, its id): done when EBS completed the
/// snapshot, whatever else the database is doing (a paused one is snapshotted too, and is never
/// Ready); superseded only if a later request replaced it before a snapshot was taken for it.
pub fn judge_snapshot(request: &str, generation: Option<i64>, qdb: Option<&QuestDB>) -> Verdict {
    let Some(q) = qdb else { return Verdict::Wait };
    match snapshot_of(q, request) {
        Some(s) => match s.state {
            qdb_crd::SnapshotPhase::Completed => Verdict::Succeeded,
            qdb_crd::SnapshotPhase::Error => Verdict::Failed {
                reason: "SNAPSHOT_FAILED".into(),
                message: format!("EBS failed snapshot {}", s.id),
            },
            qdb_crd::SnapshotPhase::Pending => Verdict::Progress(format!("TakingSnapshot: {} pending", s.id)),
        },
        None if q.spec.snapshot.as_ref().is_none_or(|r| r.id != request) => {
            let replaced = q.metadata.generation.unwrap_or(0) > generation.unwrap_or(0);
            if replaced { Verdict::Superseded } else { Verdict::Wait }
        }
        None if q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Failed) => settled("snapshot", q),
        None => progress_of(q),
    }
}

/// The outcome of the restore `request` asked for, once the operator recorded it.
fn restore_outcome<'a>(q: &'a QuestDB, request: &str) -> Option<&'a qdb_crd::RestoreOutcome> {
    q.status.as_ref()?.last_restore.as_ref().filter(|l| l.request == request)
}

/// Judges an applied Restore instruction (`request`, its id): done when the operator recorded
/// the restore's outcome (the restored database served on its new volume, or the restore was
/// refused before anything stopped). A later instruction does not supersede it once it is under
/// way: the operator finishes a restore it started.
pub fn judge_restore(request: &str, generation: Option<i64>, qdb: Option<&QuestDB>) -> Verdict {
    let Some(q) = qdb else { return Verdict::Wait };
    if let Some(outcome) = restore_outcome(q, request) {
        return match &outcome.error {
            Some(why) => Verdict::Failed { reason: "RESTORE_REFUSED".into(), message: why.clone() },
            None => Verdict::Succeeded,
        };
    }
    let started = q.status.as_ref().and_then(|s| s.restore.as_ref()).is_some_and(|r| r.request == request);
    if !started && q.spec.restore.as_ref().is_none_or(|r| r.id != request) {
        let replaced = q.metadata.generation.unwrap_or(0) > generation.unwrap_or(0);
        return if replaced { Verdict::Superseded } else { Verdict::Wait };
    }
    // A failure reported before this restore started is the one it may cure (a zone that is
    // down): only the operator's word on the restore's own generation counts.
    let observed = q.status.as_ref().and_then(|s| s.observed_generation).unwrap_or(0);
    let failed = q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Failed);
    if failed && (started || observed >= generation.unwrap_or(0)) {
        return settled("restore", q);
    }
    progress_of(q)
}

/// What a succeeded instruction's gossip says besides SUCCEEDED: for a restore, what came back and
/// how old its data is.
pub fn succeeded_message(q: &QuestDB, operation: &str, instruction: &str) -> Option<String> {
    if operation != "restore" {
        return None;
    }
    let o = restore_outcome(q, instruction)?;
    let age = o.data_taken_at.as_ref().map(|t| {
        let secs = o.at.0.duration_since(t.0).as_secs().max(0);
        format!(
            ": data as of {} ({secs} s before the restore finished)",
            t.0.round(jiff::Unit::Second).unwrap_or(t.0)
        )
    });
    Some(format!(
        "restored {} on {} in {}{}",
        o.snapshot,
        o.volume.as_deref().unwrap_or("a new volume"),
        o.zone.as_deref().unwrap_or("its zone"),
        age.unwrap_or_default()
    ))
}

/// The operator's word on the generation it observed.
fn settled(operation: &str, q: &QuestDB) -> Verdict {
    if q.status.as_ref().and_then(|s| s.phase) == Some(Phase::Failed) {
        // Degraded says why (e.g. an AWS error); Ready only that the database is not serving.
        let degraded = condition(q, "Degraded").filter(|c| c.status == "True");
        let (reason, message) = degraded
            .or_else(|| condition(q, "Ready"))
            .map(|c| (upper_snake(&c.reason), c.message.clone()))
            .unwrap_or_else(|| {
                ("FAILED".to_string(), "the operator reports the database failed".to_string())
            });
        return Verdict::Failed { reason, message };
    }
    // Ready alone is not done: during a node replacement the old node keeps serving while the
    // operator still reports Progressing.
    // A change to a paused database (its config, its snapshot policy) is done once the operator
    // observed it paused: it takes effect when the database is resumed. Waiting for Ready would
    // wait for a resume that may never come, and fail at the deadline.
    let done = if operation == "pause" || q.spec.paused {
        is_true(q, "Paused")
    } else {
        is_true(q, "Ready") && progressing(q).is_none()
    };
    if done {
        return Verdict::Succeeded;
    }
    progress_of(q)
}

/// A condition reason (Kubernetes' CamelCase, `ImageNotFound`) as gossip's UPPER_SNAKE_CASE
/// (`IMAGE_NOT_FOUND`): an acronym stays one word (`InvalidAMIID` -> `INVALID_AMIID`).
pub fn upper_snake(reason: &str) -> String {
    let chars: Vec<char> = reason.chars().collect();
    let mut out = String::with_capacity(reason.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| chars[p]);
        let next = chars.get(i + 1);
        let starts_word = c.is_ascii_uppercase()
            && prev.is_some_and(|p| {
                p.is_ascii_lowercase()
                    || p.is_ascii_digit()
                    || (p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()))
            });
        if starts_word {
            out.push('_');
        }
        out.push(if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' });
    }
    out
}

/// Until when the operator says the instruction's change waits on something slow by design:
/// EBS allows one volume modification per six hours (reason `StorageResizeBlocked`, the time in
/// `status.volume.modifiableAt`). The instruction stays open, delayed, instead of failing at its
/// deadline while the change is still to come.
pub fn delayed_until(q: &QuestDB) -> Option<jiff::Timestamp> {
    let blocked = condition(q, "Progressing").is_some_and(|c| {
        c.status == "True" && c.reason == qdb_crd::WaitReason::StorageResizeBlocked.as_str()
    });
    if !blocked {
        return None;
    }
    q.status.as_ref()?.volume.as_ref()?.modifiable_at.as_ref().map(|t| t.0)
}

fn progress_of(q: &QuestDB) -> Verdict {
    progressing(q).map_or(Verdict::Wait, Verdict::Progress)
}

fn progressing(q: &QuestDB) -> Option<String> {
    condition(q, "Progressing").filter(|c| c.status == "True").map(describe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use qdb_crd::QuestDBStatus;

    fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    fn qdb(observed: i64, phase: Phase, conditions: Vec<Condition>) -> QuestDB {
        let spec = serde_json::from_value(serde_json::json!({
            "version": "8.2.1", "instanceType": "m6i.xlarge", "nodeImage": "ami-0123456789abcdef0",
            "volume": {"sizeGib": 10, "type": "gp3"}
        }))
        .unwrap();
        let mut q = QuestDB::new("db-1", spec);
        q.status = Some(QuestDBStatus {
            phase: Some(phase),
            conditions,
            observed_generation: Some(observed),
            ..Default::default()
        });
        q
    }

    #[test]
    fn a_snapshot_succeeds_once_ebs_completed_it_and_names_it() {
        let mut q = qdb(2, Phase::Paused, vec![cond("Progressing", "True", "TakingSnapshot", "")]);
        q.spec.snapshot = Some(qdb_crd::SnapshotRequest { id: "i-9".into(), label: None });
        assert_eq!(judge_snapshot("i-9", Some(2), Some(&q)), Verdict::Progress("TakingSnapshot".into()));
        let entry = |state| qdb_crd::SnapshotStatus {
            id: "snap-1".into(),
            request: "i-9".into(),
            label: None,
            taken_at: Time(jiff::Timestamp::UNIX_EPOCH),
            size_gib: 10,
            state,
            consistency: qdb_crd::Consistency::CrashConsistent,
            reason: qdb_crd::SnapshotReason::OnDemand,
        };
        q.status.as_mut().unwrap().snapshots = vec![entry(qdb_crd::SnapshotPhase::Pending)];
        assert_eq!(
            judge_snapshot("i-9", Some(2), Some(&q)),
            Verdict::Progress("TakingSnapshot: snap-1 pending".into())
        );
        q.status.as_mut().unwrap().snapshots = vec![entry(qdb_crd::SnapshotPhase::Completed)];
        // Paused, so never Ready: the snapshot alone decides.
        assert_eq!(judge_snapshot("i-9", Some(2), Some(&q)), Verdict::Succeeded);
        assert_eq!(snapshot_of(&q, "i-9").map(|s| s.id.as_str()), Some("snap-1"));
        q.status.as_mut().unwrap().snapshots = vec![entry(qdb_crd::SnapshotPhase::Error)];
        assert!(
            matches!(judge_snapshot("i-9", Some(2), Some(&q)), Verdict::Failed { reason, .. } if reason == "SNAPSHOT_FAILED")
        );
        // A later request replaced this one before anything was taken for it.
        q.status.as_mut().unwrap().snapshots.clear();
        q.spec.snapshot = Some(qdb_crd::SnapshotRequest { id: "i-10".into(), label: None });
        q.metadata.generation = Some(3);
        assert_eq!(judge_snapshot("i-9", Some(2), Some(&q)), Verdict::Superseded);
    }

    #[test]
    fn a_restore_is_judged_by_its_recorded_outcome() {
        let mut q = qdb(3, Phase::Running, vec![cond("Ready", "True", "Running", "")]);
        q.metadata.generation = Some(3);
        q.spec.restore =
            Some(qdb_crd::RestoreRequest { id: "i-7".into(), snapshot: "snap-1".into(), zone: None });
        // Observed and Ready, but not restored yet: a pass before the restore started.
        assert_eq!(judge_restore("i-7", Some(3), Some(&q)), Verdict::Wait);
        assert_eq!(announced_snapshot(&q, "restore", "i-7", Some(3)), Some("snap-1"));
        let at = |s| Time(jiff::Timestamp::from_second(s).unwrap());
        let outcome = qdb_crd::RestoreOutcome {
            request: "i-7".into(),
            snapshot: "snap-1".into(),
            error: None,
            volume: Some("vol-2".into()),
            zone: Some("us-east-1b".into()),
            data_taken_at: Some(at(1000)),
            at: at(1090),
        };
        q.status.as_mut().unwrap().last_restore = Some(outcome.clone());
        assert_eq!(judge_restore("i-7", Some(3), Some(&q)), Verdict::Succeeded);
        assert_eq!(
            succeeded_message(&q, "restore", "i-7").as_deref(),
            Some(
                "restored snap-1 on vol-2 in us-east-1b: data as of 1970-01-01T00:16:40Z (90 s before the restore finished)"
            )
        );
        // Refused before anything stopped.
        q.status.as_mut().unwrap().last_restore =
            Some(qdb_crd::RestoreOutcome { error: Some("snap-1 failed".into()), ..outcome });
        assert!(
            matches!(judge_restore("i-7", Some(3), Some(&q)), Verdict::Failed { reason, .. } if reason == "RESTORE_REFUSED")
        );
        // A database Failed before the restore (its zone down): not the restore's failure.
        q.status.as_mut().unwrap().last_restore = None;
        q.status.as_mut().unwrap().phase = Some(Phase::Failed);
        q.status.as_mut().unwrap().observed_generation = Some(2);
        assert!(!matches!(judge_restore("i-7", Some(3), Some(&q)), Verdict::Failed { .. }));
        q.status.as_mut().unwrap().observed_generation = Some(3);
        assert!(
            matches!(judge_restore("i-7", Some(3), Some(&q)), Verdict::Failed { .. }),
            "its own generation"
        );
        // Replaced by a later restore before it started: superseded.
        q.status.as_mut().unwrap().last_restore = None;
        q.spec.restore =
            Some(qdb_crd::RestoreRequest { id: "i-8".into(), snapshot: "snap-1".into(), zone: None });
        q.metadata.generation = Some(4);
        assert_eq!(judge_restore("i-7", Some(3), Some(&q)), Verdict::Superseded);
    }

    #[test]
    fn a_change_names_the_safety_snapshot_taken_before_its_generation() {
        let mut q = qdb(4, Phase::Running, vec![]);
        let entry = |id: &str, request: &str| qdb_crd::SnapshotStatus {
            id: id.into(),
            request: request.into(),
            label: None,
            taken_at: Time(jiff::Timestamp::UNIX_EPOCH),
            size_gib: 10,
            state: qdb_crd::SnapshotPhase::Completed,
            consistency: qdb_crd::Consistency::Consistent,
            reason: qdb_crd::SnapshotReason::BeforeChange,
        };
        q.status.as_mut().unwrap().snapshots =
            vec![entry("snap-3", &qdb_crd::safety_request(3)), entry("snap-4", "i-4")];
        let named = |op, id, g| announced_snapshot(&q, op, id, g).map(String::from);
        assert_eq!(named("modify", "i-3", Some(3)).as_deref(), Some("snap-3"));
        assert_eq!(named("modify", "i-5", Some(5)), None, "a change with no safety snapshot names none");
        assert_eq!(named("snapshot", "i-4", Some(4)).as_deref(), Some("snap-4"));
        assert_eq!(named("create", "i-1", None), None);
        let mut clone = q.clone();
        clone.spec.volume.from_snapshot = Some("snap-9".into());
        assert_eq!(announced_snapshot(&clone, "create", "i-1", Some(1)), Some("snap-9"), "a clone's source");
    }

    #[test]
    fn succeeds_only_at_the_applied_generation_and_ready() {
        let ready = vec![cond("Ready", "True", "Running", "")];
        assert_eq!(judge("create", Some(2), Some(&qdb(1, Phase::Running, ready.clone()))), Verdict::Wait);
        assert_eq!(
            judge("create", Some(2), Some(&qdb(2, Phase::Running, ready.clone()))),
            Verdict::Succeeded
        );
        assert_eq!(judge("create", Some(1), None), Verdict::Wait);
    }

    #[test]
    fn progress_comes_from_the_progressing_condition() {
        let q = qdb(
            1,
            Phase::Provisioning,
            vec![
                cond("Ready", "False", "Provisioning", ""),
                cond("Progressing", "True", "NodeLaunching", "i-1"),
            ],
        );
        assert_eq!(judge("create", Some(2), Some(&q)), Verdict::Progress("NodeLaunching: i-1".into()));
        assert_eq!(judge("create", Some(1), Some(&q)), Verdict::Progress("NodeLaunching: i-1".into()));
        let idle = qdb(1, Phase::Provisioning, vec![cond("Progressing", "False", "Idle", "")]);
        assert_eq!(judge("create", Some(1), Some(&idle)), Verdict::Wait);
    }

    #[test]
    fn serving_while_still_progressing_is_not_yet_success() {
        let replacing = qdb(
            2,
            Phase::Updating,
            vec![
                cond("Ready", "True", "Running", "the database is serving"),
                cond(
                    "Progressing",
                    "True",
                    "ReplacingNode",
                    "waiting for replacement i-2's node to be Ready",
                ),
            ],
        );
        assert_eq!(
            judge("modify", Some(2), Some(&replacing)),
            Verdict::Progress("ReplacingNode: waiting for replacement i-2's node to be Ready".into())
        );
        let settled = qdb(
            2,
            Phase::Running,
            vec![cond("Ready", "True", "Running", ""), cond("Progressing", "False", "Converged", "")],
        );
        assert_eq!(judge("modify", Some(2), Some(&settled)), Verdict::Succeeded);
    }

    #[test]
    fn failed_phase_fails_with_the_operators_reason() {
        let q = qdb(3, Phase::Failed, vec![cond("Ready", "False", "InsufficientCapacity", "no m6i.xlarge")]);
        assert_eq!(
            judge("create", Some(3), Some(&q)),
            Verdict::Failed { reason: "INSUFFICIENT_CAPACITY".into(), message: "no m6i.xlarge".into() }
        );
        // A failure of an older generation says nothing about this one yet.
        assert_eq!(judge("create", Some(4), Some(&q)), Verdict::Wait);
    }

    fn at(mut q: QuestDB, generation: i64) -> QuestDB {
        q.metadata.generation = Some(generation);
        q
    }

    #[test]
    fn a_later_generation_supersedes_unless_this_one_was_seen_ready() {
        let ready = vec![cond("Ready", "True", "Running", ""), cond("Progressing", "False", "Converged", "")];
        // Upgrade at 2, rollback at 3, the operator only ever saw 3: the upgrade never happened.
        assert_eq!(
            judge("modify", Some(2), Some(&at(qdb(3, Phase::Running, ready.clone()), 3))),
            Verdict::Superseded
        );
        // The rollback is written but not yet observed: the upgrade is already replaced.
        let converging = vec![cond("Progressing", "True", "Updating", "8.2.2")];
        assert_eq!(
            judge("modify", Some(2), Some(&at(qdb(1, Phase::Updating, converging), 3))),
            Verdict::Superseded
        );
        // Seen Ready at its own generation: it happened, whatever came after.
        assert_eq!(
            judge("modify", Some(2), Some(&at(qdb(2, Phase::Running, ready.clone()), 3))),
            Verdict::Succeeded
        );
        assert_eq!(judge("modify", Some(3), Some(&at(qdb(3, Phase::Running, ready), 3))), Verdict::Succeeded);
        // A later instruction's failure is not this one's.
        let failed = vec![
            cond("Ready", "False", "Failed", ""),
            cond("Degraded", "True", "InvalidAMIID", "no such AMI"),
        ];
        assert_eq!(
            judge("modify", Some(2), Some(&at(qdb(3, Phase::Failed, failed), 3))),
            Verdict::Superseded
        );
    }

    #[test]
    fn failed_prefers_the_degraded_reason() {
        let q = qdb(
            2,
            Phase::Failed,
            vec![
                cond("Ready", "False", "Failed", "not serving"),
                cond("Degraded", "True", "UnauthorizedOperation", "ec2:RunInstances denied"),
            ],
        );
        assert_eq!(
            judge("create", Some(2), Some(&q)),
            Verdict::Failed {
                reason: "UNAUTHORIZED_OPERATION".into(),
                message: "ec2:RunInstances denied".into()
            }
        );
    }

    #[test]
    fn operator_reasons_become_gossip_reasons() {
        for (condition, gossip) in [
            ("ImageNotFound", "IMAGE_NOT_FOUND"),
            ("InvalidAMIID", "INVALID_AMIID"),
            ("UnauthorizedOperation", "UNAUTHORIZED_OPERATION"),
            ("InvalidSpec", "INVALID_SPEC"),
            ("EBSVolumeLimit", "EBS_VOLUME_LIMIT"),
            ("Failed", "FAILED"),
            ("already-upper", "ALREADY_UPPER"),
        ] {
            assert_eq!(upper_snake(condition), gossip);
        }
    }

    #[test]
    fn pause_succeeds_when_paused_not_ready() {
        let q = qdb(
            2,
            Phase::Paused,
            vec![cond("Ready", "False", "Paused", ""), cond("Paused", "True", "Paused", "")],
        );
        assert_eq!(judge("pause", Some(2), Some(&q)), Verdict::Succeeded);
        assert_eq!(judge("resume", Some(2), Some(&q)), Verdict::Wait);
    }

    #[test]
    fn a_change_to_a_paused_database_succeeds_once_it_is_observed_paused() {
        let mut q = qdb(
            3,
            Phase::Paused,
            vec![cond("Ready", "False", "Paused", ""), cond("Paused", "True", "Paused", "")],
        );
        q.spec.paused = true;
        assert_eq!(judge("modify", Some(3), Some(&q)), Verdict::Succeeded);
        assert_eq!(judge("modify", Some(4), Some(&q)), Verdict::Wait, "not observed yet");
    }

    #[test]
    fn delete_succeeds_when_gone() {
        assert_eq!(judge("delete", None, None), Verdict::Succeeded);
        let mut q = qdb(1, Phase::Deleting, vec![]);
        assert_eq!(judge("delete", None, Some(&q)), Verdict::Wait);
        q.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(judge("delete", None, Some(&q)), Verdict::Progress("Deleting".into()));
    }

    #[test]
    fn a_volume_change_blocked_by_the_ebs_cool_down_is_delayed_until_it_clears() {
        let mut q = qdb(
            2,
            Phase::Running,
            vec![
                cond("Ready", "True", "Serving", ""),
                cond(
                    "Progressing",
                    "True",
                    "StorageResizeBlocked",
                    "growing vol-1 from 30 to 40 GiB at 2026-12-06T18:00:00Z",
                ),
            ],
        );
        assert_eq!(delayed_until(&q), None, "no time in status: not delayed");
        let at: jiff::Timestamp = "2026-12-06T18:00:00Z".parse().unwrap();
        q.status.as_mut().unwrap().volume = Some(qdb_crd::VolumeStatus {
            id: "vol-1".into(),
            size_gib: 30,
            zone: "us-east-1a".into(),
            modifiable_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at)),
        });
        assert_eq!(delayed_until(&q), Some(at));
        assert_eq!(
            judge("modify", Some(2), Some(&q)),
            Verdict::Progress(
                "StorageResizeBlocked: growing vol-1 from 30 to 40 GiB at 2026-12-06T18:00:00Z".into()
            )
        );
        // Another wait is no delay, even with the time still in status.
        q.status.as_mut().unwrap().conditions[1].reason = "NodeJoining".into();
        assert_eq!(delayed_until(&q), None);
    }
}
