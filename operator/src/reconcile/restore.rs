//! Restore: the database put back to one of its snapshots (`spec.restore`), in place or into
//! another zone (out of a zone that is down). A persisted step, like a node replacement:
//! `status.restore` records how far it got, so an operator stopped anywhere goes on from there.
//!
//! 1. Checked before anything stops: the snapshot must be completed and the cluster's; a restore
//!    refused here leaves the database running as it was (`status.lastRestore.error`).
//! 2. `Stopping`: the pass runs as a pause does: the pod stops, the node is released (a node that
//!    is lost is fenced first), until EC2 shows the old volume free. Then the old volume is
//!    marked replaced ([`keys::REPLACED`]; it keeps its owner tag, so cleanup and the orphan sweep
//!    still see it) and its PersistentVolume and claim are deleted (a PV's volume handle cannot
//!    change).
//! 3. `Starting`: the pass runs as a create from the snapshot does: a node in the restore's zone,
//!    a volume made from the snapshot there (its own ClientToken per request), and the pod with
//!    the snapshot's id as QuestDB's snapshot instance id, so it recovers the checkpoint.
//! 4. Ready on the new volume: the old one follows the reclaim policy (deleted, or kept and marked
//!    [`keys::RETAINED`]), and `status.lastRestore` says what was restored and how old the data is.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams};
use qdb_crd::{
    QuestDB, ReclaimPolicy, RestoreOutcome, RestoreRequest, RestoreStatus, RestoreStep, WaitReason, keys,
};

use super::aws::plan::{FromSnapshot, from_snapshot};
use super::{Error, Facts, aws_err, delete_if_present, kube_err};
use crate::aws::EbsSnapshot;
use crate::build::Desired;
use crate::context::Context;

/// What to do about `spec.restore` at the start of a pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing asked, or asked and answered.
    Pass,
    /// A new request: check it, then start.
    Check(RestoreRequest),
    /// Go on with the restore under way (a newer request waits for it to end).
    Continue(RestoreStatus),
}

pub fn plan(
    request: Option<&RestoreRequest>,
    progress: Option<&RestoreStatus>,
    last: Option<&RestoreOutcome>,
) -> Plan {
    if let Some(p) = progress {
        return Plan::Continue(p.clone());
    }
    match request {
        Some(r) if last.is_none_or(|l| l.request != r.id) => Plan::Check(r.clone()),
        _ => Plan::Pass,
    }
}

/// The answer to a new request, from what EC2 lists for its snapshot and what the database is.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    Start(RestoreStatus),
    /// Not yet (the snapshot is pending): the database serves on meanwhile.
    Wait(String),
    /// Never as asked: recorded as the restore's outcome; the database serves on.
    Refuse(String),
}

/// `volume` is the database's data volume (id, zone) as status has it; `paused` its spec;
/// `placeable` whether the operator can launch a node in a zone (one of its configured subnets).
pub fn begin(
    request: &RestoreRequest,
    snapshot: Option<&EbsSnapshot>,
    volume: Option<(&str, &str)>,
    paused: bool,
    placeable: impl Fn(&str) -> bool,
    now: jiff::Timestamp,
) -> Begin {
    if paused {
        return Begin::Refuse("the database is paused: resume it, then restore".into());
    }
    if let Some(zone) = request.zone.as_deref().filter(|z| !placeable(z)) {
        // Checked now: once stopped, a node that cannot launch there would leave it down.
        return Begin::Refuse(format!(
            "no subnet is configured for zone {zone}: the node could not launch there"
        ));
    }
    // A pass that failed before it found the volume writes none to status: not a refusal.
    let Some((old_volume, old_zone)) = volume else {
        return Begin::Wait("the database's volume is not known yet".into());
    };
    // Listed long ago if it is the database's own (status lists it once EBS completed it).
    match from_snapshot(snapshot, &request.snapshot, 0, std::time::Duration::MAX) {
        FromSnapshot::Restore(_) => Begin::Start(RestoreStatus {
            request: request.id.clone(),
            snapshot: request.snapshot.clone(),
            zone: request.zone.clone().unwrap_or_else(|| old_zone.to_string()),
            step: RestoreStep::Stopping,
            old_volume: old_volume.to_string(),
            started_at: Time(now),
            data_taken_at: snapshot.and_then(|s| s.started).map(Time),
        }),
        FromSnapshot::Wait(why) => Begin::Wait(why),
        FromSnapshot::Refuse(why) => Begin::Refuse(why),
    }
}

/// What the pass saw of the database, for the step under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Instances of the database EC2 lists as not terminated.
    pub instances: usize,
    pub pod_gone: bool,
    /// The old volume as the database's data volume (None once marked replaced): whether it has
    /// no attachment and is available.
    pub old_volume_free: Option<bool>,
    /// The PersistentVolume and claim of the old volume are gone.
    pub claims_gone: bool,
    /// The pod is Ready on a volume other than the old one, attached.
    pub serving_new: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Wait(String),
    /// Mark the old volume replaced: it is free, nothing can write to it any more.
    MarkReplaced,
    /// Delete the old volume's PersistentVolume and claim (then wait for them to go).
    DeleteClaims,
    /// Start the database on a volume from the snapshot.
    Start,
    /// The restored database serves: the old volume follows the reclaim policy.
    Complete,
}

pub fn next(r: &RestoreStatus, seen: &Seen) -> Next {
    match r.step {
        RestoreStep::Stopping => match seen.old_volume_free {
            Some(_) if !seen.pod_gone => Next::Wait("stopping the database".into()),
            Some(_) if seen.instances > 0 => {
                Next::Wait(format!("releasing the node before replacing {}", r.old_volume))
            }
            Some(false) => Next::Wait(format!("waiting for EC2 to show {} free", r.old_volume)),
            Some(true) => Next::MarkReplaced,
            None if !seen.claims_gone => Next::DeleteClaims,
            None => Next::Start,
        },
        RestoreStep::Starting if seen.serving_new => Next::Complete,
        RestoreStep::Starting => {
            Next::Wait(format!("starting the database in {} on a volume made from {}", r.zone, r.snapshot))
        }
    }
}

/// The step before the pipeline: starts a new restore after checking it, and shapes the pass for
/// the step under way (paused while stopping; from the snapshot, in its zone, while starting).
pub async fn ensure(ctx: &Context, q: &QuestDB, d: &mut Desired, facts: &mut Facts) -> Result<(), Error> {
    let status = q.status.as_ref();
    if let Some(snapshot) = &facts.restored_from {
        // The volume is the snapshot's: QuestDB runs with its id as the snapshot instance id for
        // the volume's life (its checkpoint recovery keys on it).
        d.spec.volume.from_snapshot = Some(snapshot.clone());
        // Not the kept volume a create started from: that is the one the restore replaced.
        d.spec.volume.from_volume = None;
    }
    match plan(d.spec.restore.as_ref(), facts.restore.as_ref(), facts.last_restore.as_ref()) {
        Plan::Pass => return Ok(()),
        Plan::Continue(_) => {}
        Plan::Check(request) => {
            let found = ctx
                .aws
                .find_snapshot(&request.snapshot, &ctx.settings.cluster)
                .await
                .map_err(aws_err("reading the snapshot to restore"))?;
            let volume = status.and_then(|s| s.volume.as_ref()).map(|v| (v.id.as_str(), v.zone.as_str()));
            let placeable = |zone: &str| ctx.aws.can_place(zone);
            match begin(&request, found.as_ref(), volume, d.spec.paused, placeable, jiff::Timestamp::now()) {
                Begin::Start(r) => {
                    facts.did(
                        "RestoreStarted",
                        format!("{} into {}: stopping the database on {}", r.snapshot, r.zone, r.old_volume),
                    );
                    facts.restore = Some(r);
                }
                Begin::Wait(why) => {
                    facts.wait(WaitReason::SnapshotPending, format!("restore {}: {why}", request.id));
                    return Ok(());
                }
                Begin::Refuse(why) => {
                    facts.did("RestoreRefused", format!("{}: {why}", request.snapshot));
                    facts.last_restore = Some(RestoreOutcome {
                        request: request.id,
                        snapshot: request.snapshot,
                        error: Some(why),
                        volume: None,
                        zone: None,
                        data_taken_at: None,
                        at: Time(jiff::Timestamp::now()),
                    });
                    return Ok(());
                }
            }
        }
    }
    let Some(r) = facts.restore.clone() else { return Ok(()) };
    match r.step {
        RestoreStep::Stopping => {
            d.spec.paused = true;
            // Nothing is made while stopping: once the old volume is marked replaced the pass has
            // no volume, and must not make one from what the database was created from.
            d.spec.volume.from_snapshot = None;
            d.spec.volume.from_volume = None;
            facts.wait(
                WaitReason::Restoring,
                format!("restoring {}: stopping the database to replace {}", r.snapshot, r.old_volume),
            );
        }
        RestoreStep::Starting => {
            // A pause asked for meanwhile waits for the restore: paused now, it would never end.
            d.spec.paused = false;
            d.spec.volume.from_snapshot = Some(r.snapshot.clone());
            d.spec.volume.from_volume = None;
            d.restoring = Some(r.clone());
        }
    }
    Ok(())
}

/// The step after the pipeline: moves the restore under way on from what the pass saw.
pub async fn after(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    let Some(mut r) = facts.restore.clone() else { return Ok(()) };
    let ns = d.names.namespace();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let old = facts.volume.as_ref().filter(|v| v.id == r.old_volume);
    let claims_gone = if r.step == RestoreStep::Stopping && old.is_none() {
        ctx.metrics.kube("get", "PersistentVolumeClaim");
        let pvc = pvcs.get_opt(&d.names.pvc()).await.map_err(kube_err("restore", "reading the claim"))?;
        ctx.metrics.kube("get", "PersistentVolume");
        let pv = pvs.get_opt(&d.names.pv()).await.map_err(kube_err("restore", "reading the volume"))?;
        pvc.is_none() && pv.is_none()
    } else {
        false
    };
    let seen = Seen {
        instances: facts.instances.len(),
        pod_gone: facts.pod_gone,
        old_volume_free: old
            .map(|v| v.attachments.is_empty() && v.state == crate::aws::VolumeState::Available),
        claims_gone,
        serving_new: facts.pod_ready
            && facts.volume_attached
            && facts.volume.as_ref().is_some_and(|v| v.id != r.old_volume),
    };
    // The step's own word replaces what the pass said before it knew how far the restore got.
    facts.waiting.retain(|(reason, _)| *reason != WaitReason::Restoring);
    match next(&r, &seen) {
        Next::Wait(why) => facts.wait(WaitReason::Restoring, format!("restoring {}: {why}", r.snapshot)),
        Next::MarkReplaced => {
            ctx.aws
                .retag(&r.old_volume, &[(keys::REPLACED.to_string(), r.request.clone())], &[])
                .await
                .map_err(aws_err("marking the old volume replaced"))?;
            ctx.inventory.changed(d.names.uid());
            facts.did(
                "ReplacedVolume",
                format!("{} is free; replaced by a volume from {}", r.old_volume, r.snapshot),
            );
            // No longer the data volume: status names none until the new one exists.
            facts.volume = None;
            facts.volume_attached = false;
            facts.wait(
                WaitReason::Restoring,
                format!("restoring {}: releasing {}'s claim", r.snapshot, r.old_volume),
            );
        }
        Next::DeleteClaims => {
            delete_if_present(ctx, &pvcs, &d.names.pvc(), "PersistentVolumeClaim", &DeleteParams::default())
                .await?;
            delete_if_present(ctx, &pvs, &d.names.pv(), "PersistentVolume", &DeleteParams::default()).await?;
            facts.wait(
                WaitReason::Restoring,
                format!(
                    "restoring {}: waiting for {}'s PersistentVolume and claim to go",
                    r.snapshot, r.old_volume
                ),
            );
        }
        Next::Start => {
            r.step = RestoreStep::Starting;
            facts.did("RestoreStarting", format!("a volume from {} and a node in {}", r.snapshot, r.zone));
            facts.wait(WaitReason::Restoring, format!("restoring {}: starting in {}", r.snapshot, r.zone));
            facts.restore = Some(r);
        }
        Next::Complete => {
            let kept = d.spec.volume.reclaim_policy == ReclaimPolicy::Retain;
            // The restore is done whatever becomes of the old volume: one its impaired zone will
            // not let go stays the owner's (cleanup takes it with the database).
            let let_go = if kept {
                let tags = [(keys::RETAINED.to_string(), "true".to_string())];
                ctx.aws.retag(&r.old_volume, &tags, &[]).await
            } else {
                ctx.aws.delete_volume(&r.old_volume).await
            };
            if let Err(e) = let_go {
                tracing::warn!(volume = %r.old_volume, error = %super::chain(&e), "letting go of the replaced volume failed");
                facts.did("OldVolumeLeft", format!("{}: {}", r.old_volume, e.aws_message()));
            }
            let now = jiff::Timestamp::now();
            let age = r
                .data_taken_at
                .as_ref()
                .map(|t| {
                    format!(
                        ", data as of {} ({}s old)",
                        t.0.round(jiff::Unit::Second).unwrap_or(t.0),
                        now.duration_since(t.0).as_secs()
                    )
                })
                .unwrap_or_default();
            let volume = facts.volume.as_ref().map(|v| v.id.clone());
            facts.did(
                "Restored",
                format!(
                    "{} on {} in {}{age}; old volume {} {}",
                    r.snapshot,
                    volume.clone().unwrap_or_default(),
                    r.zone,
                    r.old_volume,
                    if kept { "kept (reclaim policy Retain)" } else { "deleted" }
                ),
            );
            facts.restored_from = Some(r.snapshot.clone());
            facts.last_restore = Some(RestoreOutcome {
                request: r.request,
                snapshot: r.snapshot,
                error: None,
                volume,
                zone: Some(r.zone),
                data_taken_at: r.data_taken_at,
                at: Time(now),
            });
            facts.restore = None;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::SnapshotState;

    fn request(id: &str) -> RestoreRequest {
        RestoreRequest { id: id.into(), snapshot: "snap-0000000000000001".into(), zone: None }
    }

    fn snapshot(state: SnapshotState) -> EbsSnapshot {
        EbsSnapshot {
            id: "snap-0000000000000001".into(),
            state,
            volume_size_gib: 10,
            started: Some(jiff::Timestamp::UNIX_EPOCH),
            request: None,
            retained: false,
            owner_uid: "uid".into(),
        }
    }

    fn outcome(request: &str) -> RestoreOutcome {
        RestoreOutcome {
            request: request.into(),
            snapshot: "snap-0000000000000001".into(),
            error: None,
            volume: None,
            zone: None,
            data_taken_at: None,
            at: Time(jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_request_is_answered_once_and_a_restore_under_way_goes_on_first() {
        assert_eq!(plan(None, None, None), Plan::Pass);
        assert_eq!(plan(Some(&request("i-1")), None, None), Plan::Check(request("i-1")));
        assert_eq!(plan(Some(&request("i-1")), None, Some(&outcome("i-1"))), Plan::Pass, "answered");
        assert_eq!(plan(Some(&request("i-2")), None, Some(&outcome("i-1"))), Plan::Check(request("i-2")));
        let now = jiff::Timestamp::UNIX_EPOCH;
        let Begin::Start(under_way) = begin(
            &request("i-1"),
            Some(&snapshot(SnapshotState::Completed)),
            Some(("vol-1", "a")),
            false,
            |_| true,
            now,
        ) else {
            panic!("not started")
        };
        // A newer request waits for the one under way (its old volume is already let go).
        assert_eq!(plan(Some(&request("i-2")), Some(&under_way), None), Plan::Continue(under_way.clone()));
        assert_eq!(plan(None, Some(&under_way), None), Plan::Continue(under_way));
    }

    #[test]
    fn a_restore_starts_only_from_a_completed_snapshot_of_a_running_database_with_a_volume() {
        let now = jiff::Timestamp::UNIX_EPOCH;
        let completed = snapshot(SnapshotState::Completed);
        let volume = Some(("vol-1", "us-east-1a"));
        match begin(&request("i-1"), Some(&completed), volume, false, |_| true, now) {
            Begin::Start(r) => {
                assert_eq!(
                    (r.step, r.old_volume.as_str(), r.zone.as_str()),
                    (RestoreStep::Stopping, "vol-1", "us-east-1a")
                );
                assert_eq!(r.data_taken_at, Some(Time(jiff::Timestamp::UNIX_EPOCH)));
            }
            other => panic!("{other:?}"),
        }
        let elsewhere = RestoreRequest { zone: Some("us-east-1b".into()), ..request("i-1") };
        assert!(
            matches!(begin(&elsewhere, Some(&completed), volume, false, |_| true, now), Begin::Start(r) if r.zone == "us-east-1b")
        );
        assert!(matches!(
            begin(&request("i-1"), Some(&snapshot(SnapshotState::Pending)), volume, false, |_| true, now),
            Begin::Wait(_)
        ));
        assert!(matches!(
            begin(&request("i-1"), Some(&snapshot(SnapshotState::Error)), volume, false, |_| true, now),
            Begin::Refuse(_)
        ));
        assert!(
            matches!(begin(&request("i-1"), None, volume, false, |_| true, now), Begin::Refuse(m) if m.contains("lists no snapshot"))
        );
        assert!(
            matches!(begin(&request("i-1"), Some(&completed), volume, true, |_| true, now), Begin::Refuse(m) if m.contains("paused"))
        );
        assert!(matches!(
            begin(&request("i-1"), Some(&completed), None, false, |_| true, now),
            Begin::Wait(_)
        ));
        let nowhere = RestoreRequest { zone: Some("us-east-1z".into()), ..request("i-1") };
        let placeable = |z: &str| z != "us-east-1z";
        assert!(
            matches!(begin(&nowhere, Some(&completed), volume, false, placeable, now), Begin::Refuse(m) if m.contains("no subnet"))
        );
    }

    #[test]
    fn the_old_volume_is_let_go_only_once_nothing_can_write_to_it() {
        let Begin::Start(mut r) = begin(
            &request("i-1"),
            Some(&snapshot(SnapshotState::Completed)),
            Some(("vol-1", "a")),
            false,
            |_| true,
            jiff::Timestamp::UNIX_EPOCH,
        ) else {
            panic!("not started")
        };
        let seen = |instances, pod_gone, old_volume_free, claims_gone, serving_new| Seen {
            instances,
            pod_gone,
            old_volume_free,
            claims_gone,
            serving_new,
        };
        assert!(matches!(next(&r, &seen(1, false, Some(false), false, false)), Next::Wait(_)), "pod running");
        assert!(
            matches!(next(&r, &seen(1, true, Some(false), false, false)), Next::Wait(_)),
            "node not released"
        );
        assert!(
            matches!(next(&r, &seen(0, true, Some(false), false, false)), Next::Wait(_)),
            "still attached"
        );
        assert_eq!(next(&r, &seen(0, true, Some(true), false, false)), Next::MarkReplaced);
        assert_eq!(next(&r, &seen(0, true, None, false, false)), Next::DeleteClaims);
        assert_eq!(next(&r, &seen(0, true, None, true, false)), Next::Start);
        r.step = RestoreStep::Starting;
        assert!(matches!(next(&r, &seen(1, false, None, false, false)), Next::Wait(_)));
        assert_eq!(next(&r, &seen(1, false, None, false, true)), Next::Complete);
    }
}
