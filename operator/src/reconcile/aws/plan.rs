//! The AWS step's decisions, pure: which launch number comes next, and what the data volume
//! needs this pass. The safety rule lives here: the volume leaves only an instance EC2 shows
//! fenced (stopped or terminated); moving it off a live one is the node move's job, which fences
//! first.

use qdb_crd::{VolumeSpec, WaitReason, keys};

use crate::aws::inventory::LISTING_LAG;
use crate::aws::{
    AttachmentState, EbsSnapshot, Instance, InstanceState, Restore, SnapshotState, Volume, VolumeChange,
    VolumeState,
};

pub fn is_live(i: &Instance) -> bool {
    matches!(i.state, InstanceState::Pending | InstanceState::Running)
}

/// The number of the next launch (its ClientToken, see [`crate::aws::launch_token`]): one past
/// every launch status recorded (`recorded` is that count) or EC2 lists. One exception: the last
/// recorded launch is not listed and the database's last launch was within the listing lag
/// (`last_launch_age`). EC2 may simply not show it yet (an operator restarted right after
/// launching lost its memory of it), so that launch is tried again under its own token: EC2
/// answers with its instance rather than starting a second. (Counted from any create before, a
/// volume or snapshot made within the lag sent a relaunch after a restore or a pause to a launch
/// long terminated: EC2 answers such a token with that instance, or refuses it.)
pub fn next_launch(recorded: u32, listed: &[u32], last_launch_age: Option<std::time::Duration>) -> u32 {
    let past_listed = listed.iter().max().map_or(0, |n| n.saturating_add(1));
    let next = recorded.max(past_listed);
    let last = next.checked_sub(1);
    let young = last_launch_age.is_some_and(|a| a < LISTING_LAG);
    match last {
        Some(last) if young && !listed.contains(&last) => last,
        _ => next,
    }
}

/// EC2's answer to a ClientToken used before with other parameters.
pub const IDEMPOTENT_MISMATCH: &str = "IdempotentParameterMismatch";

/// Whether EC2's answer to a launch (the instance, or the error code) shows its number used up by
/// an earlier launch: an instance launched before the listing lag or already going (a token
/// stays valid 24 hours past its instance's termination), or the token refused as another
/// launch's. Then the next number is a new launch.
pub fn launch_used_up(answer: Result<&Instance, Option<&str>>, now: jiff::Timestamp) -> bool {
    match answer {
        Err(code) => code == Some(IDEMPOTENT_MISMATCH),
        Ok(i) => {
            let launched = i.launched_at_ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok());
            let old = launched
                .and_then(|t| std::time::Duration::try_from(now.duration_since(t)).ok())
                .is_some_and(|a| a > LISTING_LAG);
            old || matches!(i.state, InstanceState::ShuttingDown | InstanceState::Terminated)
        }
    }
}

/// EBS allows one modification of a volume per six hours, counted from the start of the last.
pub const MODIFICATION_COOLDOWN: jiff::SignedDuration = jiff::SignedDuration::from_hours(6);

/// When the volume may be modified again, if not now: `last` is when its latest modification
/// started (EC2's DescribeVolumesModifications).
pub fn modifiable_at(last: Option<jiff::Timestamp>, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
    let next = last? + MODIFICATION_COOLDOWN;
    (next > now).then_some(next)
}

/// One thing the data volume needs, in the order to do them.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumeAction {
    /// Status names a volume EC2 does not list: wait for the listing, never make another (an
    /// empty volume in its place would lose the data).
    AwaitListing(String),
    Create,
    /// Grow it and change its provisioned performance, in one ModifyVolume.
    Modify(VolumeChange),
    /// From a holder EC2 shows fenced: its attachment goes, and the EBS CSI driver detaches.
    Detach {
        from: String,
    },
    Wait(WaitReason, String),
}

/// What may be done with a resource a database is to take over: the volume `spec.volume.fromVolume`
/// names, or a part `spec.adopt` names ([`super::super::adopt`]; it never waits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Taken by an earlier pass (its tags name this database already).
    AlreadyOurs,
    Take,
    Wait(String),
    /// Only a change of the spec cures it.
    Refuse(String),
}

/// Only a volume a deleted database kept (tagged [`keys::RETAINED`] by its deletion) is taken:
/// one a live database owns, or one made outside the operator, is not this database's to take.
pub fn take_volume(v: Option<&Volume>, id: &str, uid: &str) -> Take {
    let Some(v) = v else {
        return Take::Refuse(format!("EC2 lists no volume {id} in this cluster"));
    };
    if v.tags.get(keys::OWNER_UID).is_some_and(|o| o == uid) {
        return Take::AlreadyOurs;
    }
    if !v.tags.contains_key(keys::RETAINED) {
        let owner = v.tags.get(keys::DATABASE).map_or("no database", String::as_str);
        return Take::Refuse(format!(
            "{id} belongs to {owner}, which has not released it: only a volume a deleted database kept can be taken"
        ));
    }
    match v.attachments.first() {
        Some(a) => Take::Wait(format!("{id} is still attached to {}", a.instance_id)),
        None => Take::Take,
    }
}

/// What a database that starts from a snapshot (`spec.volume.fromSnapshot`) may do while it has
/// no volume: decided before its instance launches, so a wrong id fails the database at once and
/// a pending snapshot holds the launch back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromSnapshot {
    /// Its volume is made from the snapshot, at least the snapshot's size.
    Restore(Restore),
    Wait(String),
    /// Only a change of the spec cures it.
    Refuse(String),
}

/// `snapshot` is what EC2 lists for the id among the cluster's snapshots; `age` how long the
/// database has existed. A snapshot taken a moment before the create may not be listed yet
/// (EC2's Describe calls lag its writes): missing counts as wrong only after [`LISTING_LAG`].
pub fn from_snapshot(
    snapshot: Option<&EbsSnapshot>,
    id: &str,
    size_gib: u32,
    age: std::time::Duration,
) -> FromSnapshot {
    let Some(s) = snapshot else {
        if age < LISTING_LAG {
            return FromSnapshot::Wait(format!("EC2 does not list snapshot {id} yet"));
        }
        return FromSnapshot::Refuse(format!("EC2 lists no snapshot {id} of this cluster"));
    };
    match s.state {
        SnapshotState::Completed => FromSnapshot::Restore(Restore {
            request: None,
            snapshot_id: id.to_string(),
            // EBS refuses a volume smaller than the snapshot's; volumes only grow.
            size_gib: size_gib.max(s.volume_size_gib),
        }),
        SnapshotState::Pending => {
            FromSnapshot::Wait(format!("{id} is pending: EBS makes volumes only from completed snapshots"))
        }
        SnapshotState::Error => FromSnapshot::Refuse(format!("{id} failed (EBS reports it in error)")),
        SnapshotState::Unknown => {
            FromSnapshot::Wait(format!("{id} is in a state this operator does not know"))
        }
    }
}

/// What a listed volume lacks of the spec: more size, other provisioned IOPS or throughput (a
/// performance the spec leaves unset is whatever the volume has). None when nothing.
pub fn volume_change(v: &Volume, want: &VolumeSpec) -> Option<VolumeChange> {
    let differs = |want: Option<u32>, have: Option<u32>| want.filter(|w| have != Some(*w));
    let change = VolumeChange {
        size_gib: Some(want.size_gib).filter(|w| *w > v.size_gib),
        iops: differs(want.iops, v.iops),
        throughput_mibps: differs(want.throughput_mibps, v.throughput_mibps),
    };
    (change != VolumeChange::default()).then_some(change)
}

/// What the data volume needs for `instance` to serve from it. `volume` is what EC2 lists,
/// `known` the volume status names, `instances` every instance of the database EC2 lists.
pub fn plan_volume(
    volume: Option<&Volume>,
    known: Option<&str>,
    want: &VolumeSpec,
    instance: &Instance,
    instances: &[Instance],
) -> Vec<VolumeAction> {
    use VolumeAction::*;
    let Some(v) = volume else {
        return vec![match known {
            Some(id) => AwaitListing(id.to_string()),
            None => Create,
        }];
    };
    let mut out = Vec::new();
    if let Some(change) = volume_change(v, want) {
        out.push(Modify(change));
    }
    let here = v.attachments.iter().find(|a| a.instance_id == instance.id);
    let elsewhere: Vec<_> = v.attachments.iter().filter(|a| a.instance_id != instance.id).collect();
    if let Some(a) = here {
        if a.state != AttachmentState::Attached {
            out.push(Wait(
                WaitReason::VolumeAttaching,
                format!("{} is {:?} on {}", v.id, a.state, instance.id),
            ));
        }
    } else if !elsewhere.is_empty() {
        for a in elsewhere {
            // A holder that is stopping or running may still be writing; one EC2 no longer
            // lists is gone.
            let holder = instances.iter().find(|i| i.id == a.instance_id);
            if let Some(h) = holder.filter(|h| !h.state.is_fenced()) {
                out.push(Wait(
                    WaitReason::VolumeInUse,
                    format!("{} is attached to {} ({:?})", v.id, a.instance_id, h.state),
                ));
            } else if a.state == AttachmentState::Detaching {
                out.push(Wait(
                    WaitReason::VolumeDetaching,
                    format!("{} is being released by {}", v.id, a.instance_id),
                ));
            } else {
                out.push(Detach { from: a.instance_id.clone() });
            }
        }
    } else if v.state != VolumeState::Available {
        out.push(Wait(WaitReason::VolumeCreating, format!("{} is {:?}", v.id, v.state)));
    } else if instance.state == InstanceState::Running {
        // Attached by the EBS CSI driver once the pod is scheduled on the instance's node.
        out.push(Wait(
            WaitReason::VolumeAttaching,
            format!("waiting for the EBS CSI driver to attach {} to {}", v.id, instance.id),
        ));
    } else {
        out.push(Wait(WaitReason::InstanceStarting, format!("{} is {:?}", instance.id, instance.state)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn snapshot(state: SnapshotState, volume_size_gib: u32) -> EbsSnapshot {
        EbsSnapshot {
            id: "snap-1".into(),
            state,
            volume_size_gib,
            started: None,
            request: None,
            retained: false,
            owner_uid: String::new(),
        }
    }

    #[test]
    fn a_database_starts_only_from_a_completed_snapshot_of_its_cluster() {
        let old = LISTING_LAG + Duration::from_secs(1);
        let restore = |size_gib| {
            FromSnapshot::Restore(Restore { snapshot_id: "snap-1".into(), size_gib, request: None })
        };
        let plan = |state, volume_size_gib, size_gib| {
            from_snapshot(Some(&snapshot(state, volume_size_gib)), "snap-1", size_gib, old)
        };
        assert_eq!(plan(SnapshotState::Completed, 20, 30), restore(30));
        // Never smaller than the volume the snapshot was taken of.
        assert_eq!(plan(SnapshotState::Completed, 50, 30), restore(50));
        assert!(
            matches!(plan(SnapshotState::Pending, 20, 20), FromSnapshot::Wait(m) if m.contains("pending"))
        );
        assert!(matches!(plan(SnapshotState::Error, 20, 20), FromSnapshot::Refuse(_)));
        // Missing: perhaps not listed yet while the database is young, wrong after that.
        let young = LISTING_LAG - Duration::from_secs(1);
        assert!(
            matches!(from_snapshot(None, "snap-1", 20, young), FromSnapshot::Wait(m) if m.contains("snap-1"))
        );
        assert!(
            matches!(from_snapshot(None, "snap-1", 20, old), FromSnapshot::Refuse(m) if m.contains("snap-1"))
        );
    }
    use crate::aws::fixtures;

    #[test]
    fn each_deliberate_launch_takes_the_next_number() {
        assert_eq!(next_launch(0, &[], None), 0, "the first launch");
        assert_eq!(next_launch(1, &[0], Some(Duration::from_secs(5))), 1, "a replacement");
        assert_eq!(next_launch(1, &[], Some(Duration::from_secs(600))), 1, "launch 0 is long gone");
        assert_eq!(next_launch(3, &[1], None), 3);
    }

    #[test]
    fn a_launch_answered_with_an_old_or_gone_instance_or_refused_as_another_is_used_up() {
        let now = jiff::Timestamp::from_second(10_000).unwrap();
        let mut i = fixtures::instance("i-1");
        i.launched_at_ms = Some((10_000 - 5) * 1000);
        assert!(!launch_used_up(Ok(&i), now), "launched 5 s ago: this launch");
        i.launched_at_ms = Some((10_000 - 600) * 1000);
        assert!(launch_used_up(Ok(&i), now), "launched 10 min ago: an earlier one");
        i.launched_at_ms = Some((10_000 - 5) * 1000);
        i.state = InstanceState::Terminated;
        assert!(launch_used_up(Ok(&i), now));
        assert!(launch_used_up(Err(Some("IdempotentParameterMismatch")), now));
        assert!(!launch_used_up(Err(Some("InsufficientInstanceCapacity")), now));
        assert!(!launch_used_up(Err(None), now), "a timeout may have launched it");
    }

    #[test]
    fn what_ec2_lists_counts_even_if_status_missed_it() {
        // The status write after a launch was lost: the tag still tells.
        assert_eq!(next_launch(0, &[0], Some(Duration::from_secs(5))), 1);
        assert_eq!(next_launch(1, &[0, 3], None), 4);
    }

    #[test]
    fn a_recent_launch_not_listed_yet_is_retried_under_its_own_token() {
        assert_eq!(next_launch(1, &[], Some(Duration::from_secs(2))), 0);
        assert_eq!(next_launch(2, &[0], Some(Duration::from_secs(2))), 1);
        assert_eq!(next_launch(2, &[0], Some(LISTING_LAG)), 2, "past the lag it is gone, not unlisted");
    }

    fn instance(id: &str, state: InstanceState) -> Instance {
        Instance { state, ..fixtures::instance(id) }
    }

    fn volume(state: VolumeState, size_gib: u32, attachments: &[(&str, AttachmentState)]) -> Volume {
        Volume {
            size_gib,
            iops: Some(3000),
            throughput_mibps: Some(125),
            state,
            attachments: attachments.iter().map(|(i, s)| fixtures::attachment(i, *s)).collect(),
            ..fixtures::volume("vol-1")
        }
    }

    fn gib(size_gib: u32) -> VolumeSpec {
        VolumeSpec {
            size_gib,
            type_: qdb_crd::VolumeType::Gp3,
            iops: None,
            throughput_mibps: None,
            reclaim_policy: qdb_crd::ReclaimPolicy::Delete,
            from_volume: None,
            from_snapshot: None,
        }
    }

    #[test]
    fn a_volume_modified_less_than_six_hours_ago_waits_until_then() {
        let t: jiff::Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let hours = |h: i64| jiff::SignedDuration::from_hours(h);
        assert_eq!(modifiable_at(None, t), None, "never modified");
        assert_eq!(modifiable_at(Some(t - hours(1)), t), Some(t + hours(5)));
        assert_eq!(modifiable_at(Some(t - hours(6)), t), None, "exactly six hours later");
        assert_eq!(modifiable_at(Some(t - hours(7)), t), None);
    }

    #[test]
    fn performance_changes_ride_with_growth_in_one_modification() {
        let v = volume(VolumeState::InUse, 100, &[]);
        assert_eq!(volume_change(&v, &gib(100)), None, "unset performance keeps what the volume has");
        assert_eq!(volume_change(&v, &gib(50)), None, "never shrinks");
        let want = VolumeSpec { iops: Some(3000), throughput_mibps: Some(125), ..gib(100) };
        assert_eq!(volume_change(&v, &want), None, "already so");
        let want = VolumeSpec { iops: Some(6000), throughput_mibps: Some(125), ..gib(200) };
        assert_eq!(
            volume_change(&v, &want),
            Some(VolumeChange { size_gib: Some(200), iops: Some(6000), throughput_mibps: None })
        );
        // EC2 not reporting a value is no reason to skip one the spec asks for.
        let unknown = Volume { iops: None, ..v };
        assert_eq!(
            volume_change(&unknown, &VolumeSpec { iops: Some(3000), ..gib(100) }),
            Some(VolumeChange { iops: Some(3000), ..Default::default() })
        );
    }

    const STATES: [InstanceState; 7] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::ShuttingDown,
        InstanceState::Terminated,
        InstanceState::Unknown,
    ];

    fn attaches(step: &VolumeAction) -> bool {
        matches!(step, VolumeAction::Wait(WaitReason::VolumeAttaching, _))
    }

    #[test]
    fn the_volume_leaves_only_a_holder_ec2_shows_fenced() {
        let new = instance("i-new", InstanceState::Running);
        for holder_state in STATES {
            for attachment in [AttachmentState::Attached, AttachmentState::Attaching, AttachmentState::Busy] {
                let v = volume(VolumeState::InUse, 10, &[("i-old", attachment)]);
                let all = [instance("i-old", holder_state), new.clone()];
                let steps = plan_volume(Some(&v), Some("vol-1"), &gib(10), &new, &all);
                let detaches = steps.iter().any(|s| matches!(s, VolumeAction::Detach { .. }));
                assert_eq!(detaches, holder_state.is_fenced(), "{holder_state:?} {attachment:?}: {steps:?}");
                assert!(!steps.iter().any(attaches), "never attached while held: {steps:?}");
            }
        }
        // A holder EC2 no longer lists at all is gone.
        let v = volume(VolumeState::InUse, 10, &[("i-gone", AttachmentState::Attached)]);
        let steps = plan_volume(Some(&v), Some("vol-1"), &gib(10), &new, std::slice::from_ref(&new));
        assert_eq!(steps, [VolumeAction::Detach { from: "i-gone".into() }]);
    }

    #[test]
    fn only_a_volume_a_deleted_database_kept_is_taken() {
        let tagged = |tags: &[(&str, &str)], attachments: &[(&str, AttachmentState)]| Volume {
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..volume(VolumeState::Available, 10, attachments)
        };
        let kept =
            tagged(&[(keys::OWNER_UID, "old"), (keys::DATABASE, "db-a"), (keys::RETAINED, "true")], &[]);
        assert_eq!(take_volume(Some(&kept), "vol-1", "new"), Take::Take);
        let live = tagged(&[(keys::OWNER_UID, "old"), (keys::DATABASE, "db-a")], &[]);
        assert!(matches!(take_volume(Some(&live), "vol-1", "new"), Take::Refuse(m) if m.contains("db-a")));
        assert!(
            matches!(take_volume(Some(&tagged(&[], &[])), "vol-1", "new"), Take::Refuse(_)),
            "not ours to take"
        );
        assert!(matches!(take_volume(None, "vol-1", "new"), Take::Refuse(_)));
        let taken = tagged(&[(keys::OWNER_UID, "new")], &[]);
        assert_eq!(take_volume(Some(&taken), "vol-1", "new"), Take::AlreadyOurs, "an earlier pass took it");
        let held = tagged(
            &[(keys::OWNER_UID, "old"), (keys::RETAINED, "true")],
            &[("i-old", AttachmentState::Detaching)],
        );
        assert!(matches!(take_volume(Some(&held), "vol-1", "new"), Take::Wait(_)));
    }

    #[test]
    fn a_volume_named_in_status_is_never_replaced_by_an_empty_one() {
        let i = instance("i-1", InstanceState::Running);
        assert_eq!(
            plan_volume(None, Some("vol-9"), &gib(10), &i, &[]),
            [VolumeAction::AwaitListing("vol-9".into())]
        );
        assert_eq!(plan_volume(None, None, &gib(10), &i, &[]), [VolumeAction::Create]);
    }

    #[test]
    fn an_available_volume_attaches_only_to_a_running_instance_and_only_grows() {
        let v = volume(VolumeState::Available, 10, &[]);
        for state in STATES {
            let i = instance("i-1", state);
            let steps = plan_volume(Some(&v), None, &gib(20), &i, std::slice::from_ref(&i));
            let grow = VolumeChange { size_gib: Some(20), ..Default::default() };
            assert_eq!(steps[0], VolumeAction::Modify(grow));
            assert_eq!(steps.iter().any(attaches), state == InstanceState::Running, "{state:?}");
        }
        let i = instance("i-1", InstanceState::Running);
        let attached = volume(VolumeState::InUse, 30, &[("i-1", AttachmentState::Attached)]);
        assert_eq!(plan_volume(Some(&attached), None, &gib(20), &i, std::slice::from_ref(&i)), []);
        let creating = volume(VolumeState::Creating, 20, &[]);
        let steps = plan_volume(Some(&creating), None, &gib(20), &i, std::slice::from_ref(&i));
        assert!(matches!(steps[..], [VolumeAction::Wait(WaitReason::VolumeCreating, _)]), "{steps:?}");
    }
}
