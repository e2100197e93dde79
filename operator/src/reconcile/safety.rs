//! The safety snapshot: before a change of the node image, QuestDB version, instance type or
//! volume type starts, a snapshot of the data volume is taken and completed by EBS, so the
//! backend has a point to go back to (`spec.snapshotPolicy.beforeChanges`, on by default).
//!
//! The gate runs first in a pass. `status.admitted` holds the risky part of the spec the
//! operator last let through; while the spec differs from it and the snapshot for the spec's
//! generation (`qdb_crd::safety_request`) is not completed, the pass works with the admitted
//! part in place of the new one, so every step keeps the database as it runs (drift repair,
//! failover and the rest go on) and the snapshot step takes the snapshot. Once EBS completed it,
//! the new part is admitted (written before any step acts on it) and the change goes ahead.

use qdb_crd::{
    Admitted, QuestDB, SnapshotPhase, SnapshotReason, SnapshotRequest, SnapshotStatus, WaitReason,
};

use super::{Error, Facts, snapshot};
use crate::build::Desired;
use crate::context::Context;

/// What the gate lets through this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// The spec's risky part is the admitted one.
    Pass,
    /// Let the spec's risky part through and record it as admitted.
    Admit,
    /// Keep the admitted part until the safety snapshot `request` completed.
    Hold { request: SnapshotRequest, why: String },
}

/// `admitted` is status's (None: a new database, or one an older operator ran); `target` the
/// spec's; `generation` the spec's generation; `has_volume` whether the data volume exists.
pub fn plan(
    admitted: Option<&Admitted>,
    target: &Admitted,
    before_changes: bool,
    has_volume: bool,
    generation: i64,
    recorded: &[SnapshotStatus],
) -> Gate {
    let Some(admitted) = admitted else { return Gate::Admit };
    if admitted == target {
        return Gate::Pass;
    }
    let changes = admitted.risky_changes(target);
    // IOPS or throughput alone change in place; no data volume yet means no data to keep.
    if changes.is_empty() || !before_changes || !has_volume {
        return Gate::Admit;
    }
    let id = qdb_crd::safety_request(generation);
    let request = SnapshotRequest { id: id.clone(), label: Some(format!("before {}", changes.join(", "))) };
    match recorded.iter().find(|s| s.request == id) {
        Some(s) if s.state == SnapshotPhase::Completed => Gate::Admit,
        Some(s) if s.state == SnapshotPhase::Error => Gate::Hold {
            request,
            why: format!(
                "EBS failed the safety snapshot {} before {}: the change waits (a new change \
                 takes a new one; set beforeChanges false to go ahead without)",
                s.id,
                changes.join(", ")
            ),
        },
        Some(s) => Gate::Hold {
            request,
            why: format!("EBS is completing the safety snapshot {} before {}", s.id, changes.join(", ")),
        },
        None => {
            Gate::Hold { request, why: format!("taking a safety snapshot before {}", changes.join(", ")) }
        }
    }
}

/// Runs the gate: records a newly admitted part, or holds the change in `d` and asks the
/// snapshot step for the safety snapshot (`facts.safety`).
pub async fn ensure(ctx: &Context, qdb: &QuestDB, d: &mut Desired, facts: &mut Facts) -> Result<(), Error> {
    let status = qdb.status.as_ref();
    let admitted = status.and_then(|s| s.admitted.as_ref());
    let target = Admitted::of(&d.spec);
    let recorded = status.map(|s| s.snapshots.as_slice()).unwrap_or_default();
    let has_volume = status.is_some_and(|s| s.volume.is_some());
    let generation = qdb.metadata.generation.unwrap_or_default();
    // A database being adopted runs as it is; what it runs is admitted with it.
    let before_changes = d.spec.snapshot_policy.before_changes && !d.adopting;
    facts.admitted = admitted.cloned();
    match plan(admitted, &target, before_changes, has_volume, generation, recorded) {
        Gate::Pass => {}
        Gate::Admit => {
            if let Some(from) = admitted {
                let changes = from.risky_changes(&target);
                if !changes.is_empty() {
                    facts.did("AdmittedChange", changes.join(", "));
                }
            }
            facts.admitted = Some(target);
            let checkpoint = status.and_then(|s| s.checkpoint.as_ref());
            snapshot::record(ctx, qdb, recorded, checkpoint, facts.admitted.as_ref()).await?;
        }
        Gate::Hold { request, why } => {
            if let Some(admitted) = admitted {
                admitted.hold(&mut d.spec);
            }
            facts.wait(WaitReason::ChangeHeld, why);
            facts.safety = Some((request, SnapshotReason::BeforeChange));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use qdb_crd::{Consistency, VolumeType};

    use super::*;

    fn part(image: &str) -> Admitted {
        Admitted {
            version: "9.3.0".into(),
            node_image: image.into(),
            instance_type: "m6i.large".into(),
            volume_type: VolumeType::Gp3,
            volume_iops: None,
            volume_throughput_mibps: None,
        }
    }

    fn taken(request: &str, state: SnapshotPhase) -> SnapshotStatus {
        SnapshotStatus {
            id: "snap-1".into(),
            request: request.into(),
            label: None,
            taken_at: Time(jiff::Timestamp::UNIX_EPOCH),
            size_gib: 10,
            state,
            consistency: Consistency::Consistent,
            reason: SnapshotReason::BeforeChange,
        }
    }

    #[test]
    fn a_risky_change_waits_for_its_completed_snapshot() {
        let (old, new) = (part("ami-0a0a0a0a"), part("ami-0b0b0b0b"));
        let hold = plan(Some(&old), &new, true, true, 7, &[]);
        let Gate::Hold { request, why } = hold else { panic!("{hold:?}") };
        assert_eq!(request.id, "before-g7");
        assert_eq!(request.label.as_deref(), Some("before node image ami-0a0a0a0a -> ami-0b0b0b0b"));
        assert!(why.contains("taking a safety snapshot"), "{why}");
        let pending = [taken("before-g7", SnapshotPhase::Pending)];
        assert!(
            matches!(plan(Some(&old), &new, true, true, 7, &pending), Gate::Hold { why, .. } if why.contains("completing"))
        );
        let failed = [taken("before-g7", SnapshotPhase::Error)];
        assert!(
            matches!(plan(Some(&old), &new, true, true, 7, &failed), Gate::Hold { why, .. } if why.contains("failed"))
        );
        let done = [taken("before-g7", SnapshotPhase::Completed)];
        assert_eq!(plan(Some(&old), &new, true, true, 7, &done), Gate::Admit);
        // A snapshot for an earlier generation (the same change asked for before, or another)
        // is no safety snapshot for this one.
        let earlier = [taken("before-g5", SnapshotPhase::Completed)];
        assert!(matches!(plan(Some(&old), &new, true, true, 7, &earlier), Gate::Hold { .. }));
    }

    #[test]
    fn nothing_is_held_without_a_risky_change_a_volume_or_the_policy() {
        let old = part("ami-0a0a0a0a");
        assert_eq!(plan(None, &old, true, true, 1, &[]), Gate::Admit, "a new database");
        assert_eq!(plan(Some(&old), &old, true, true, 2, &[]), Gate::Pass);
        let mut faster = old.clone();
        faster.volume_iops = Some(6000);
        assert_eq!(plan(Some(&old), &faster, true, true, 2, &[]), Gate::Admit, "IOPS change in place");
        let new = part("ami-0b0b0b0b");
        assert_eq!(plan(Some(&old), &new, false, true, 2, &[]), Gate::Admit, "the policy is off");
        assert_eq!(plan(Some(&old), &new, true, false, 2, &[]), Gate::Admit, "no data yet");
        for change in [
            Admitted { version: "9.2.3".into(), ..old.clone() },
            Admitted { instance_type: "m6i.xlarge".into(), ..old.clone() },
            Admitted { volume_type: VolumeType::Io2, volume_iops: Some(3000), ..old.clone() },
        ] {
            assert!(matches!(plan(Some(&old), &change, true, true, 2, &[]), Gate::Hold { .. }), "{change:?}");
        }
    }

    #[test]
    fn a_held_change_keeps_the_admitted_part_of_the_spec() {
        let old = Admitted { volume_iops: Some(3000), ..part("ami-0a0a0a0a") };
        let mut spec = crate::build::fixtures::questdb().spec;
        spec.node_image = "ami-0b0b0b0b".into();
        spec.version = "9.9.9".into();
        spec.volume.type_ = VolumeType::Io2;
        spec.volume.iops = Some(20000);
        old.hold(&mut spec);
        assert_eq!(Admitted::of(&spec), old);
    }
}
