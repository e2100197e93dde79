//! Node replacement, as a pure decision: given the database's live instances and what their
//! nodes say, which instance serves and what to do next. Failover uses it today; node image and
//! instance type changes are the same flow with a different reason to replace.
//!
//! The order is fixed: launch the replacement first, then fence the old instance (stop it,
//! confirmed by EC2) before the volume moves, and attach the volume only to a replacement whose
//! node is Ready. An upgrade fences once the replacement is Ready (the old one serves until
//! then); a failover fences at once, while the replacement boots, since the lost machine serves
//! nothing. Once fenced, the lost instance is no longer live, the replacement is the only
//! candidate, and the ordinary steps move the volume, start the pod, flip DNS and retire the
//! fenced instance. Everything is derived from what AWS and Kubernetes show, so an operator
//! restart at any step resumes correctly.

/// What the database's node says about one live (pending or running) instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeSeen {
    /// No node has joined for it (yet).
    Missing,
    Ready,
    /// Not Ready (False or Unknown) for this many seconds.
    NotReady {
        for_secs: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: String,
    pub node: NodeSeen,
    /// Runs the spec's node image and instance type.
    pub current: bool,
}

pub use qdb_crd::ReplaceStep as Step;
/// Why a node is being replaced (recorded in status with the move).
pub use qdb_crd::ReplaceWhy as Why;

use crate::aws::InstanceState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No live instance: launch one.
    Launch,
    /// Serve from this instance (the others, if any, are leftovers to retire).
    Serve(String),
    /// The serving instance is lost or outdated: launch its replacement.
    LaunchReplacement { lost: String, reason: String, why: Why },
    /// The replacement is launched; its node is not Ready yet.
    AwaitReplacement { lost: String, replacement: String, why: Why },
    /// The replacement is Ready: stop the old instance, so it can never write again, before the
    /// volume moves (an upgrade drains the pod off it first).
    Fence { lost: String, replacement: String, reason: String, lost_for_secs: u64, why: Why },
}

/// `live` is in launch order (oldest first); `active` is the instance status says serves.
pub fn plan(active: Option<&str>, live: &[Seen], failover_after_secs: u64) -> Plan {
    let Some(current) = live.iter().find(|s| Some(s.id.as_str()) == active).or_else(|| live.first()) else {
        return Plan::Launch;
    };
    let (why, reason, lost_for) = match current.node {
        NodeSeen::NotReady { for_secs } if for_secs >= failover_after_secs => {
            (Why::Failover, format!("node of {} not Ready for {for_secs}s", current.id), for_secs)
        }
        _ if !current.current => {
            (Why::Upgrade, format!("{} runs an outdated node image or type", current.id), 0)
        }
        _ => return Plan::Serve(current.id.clone()),
    };
    // An upgrade's replacement must itself be current; any other instance will do for failover.
    let candidate = live.iter().rev().find(|s| s.id != current.id && (why == Why::Failover || s.current));
    match candidate {
        None => Plan::LaunchReplacement { lost: current.id.clone(), reason, why },
        Some(r) if r.node == NodeSeen::Ready => Plan::Fence {
            lost: current.id.clone(),
            replacement: r.id.clone(),
            reason,
            lost_for_secs: lost_for,
            why,
        },
        Some(r) => Plan::AwaitReplacement { lost: current.id.clone(), replacement: r.id.clone(), why },
    }
}

/// What EC2 and Kubernetes show of one move under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveSeen {
    /// The old instance's state; `None` when it is no longer listed (the listings leave out
    /// terminated instances, and it is too old to be hidden by EC2's eventual consistency).
    pub old: Option<InstanceState>,
    /// The replacement's state and node; `None` when it is no longer listed.
    pub replacement: Option<(InstanceState, NodeSeen)>,
    pub volume: VolumeSeen,
    /// A pod of the database is still bound to the old node.
    pub pod_on_old: bool,
    /// Seconds since the move started.
    pub age_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSeen {
    /// Not created yet, or still `creating`, or not listed.
    Unknown,
    Available,
    /// Attached (or attaching, `settled: false`) to the old instance.
    OnOld {
        settled: bool,
    },
    /// Attached (or attaching) to the replacement.
    OnReplacement {
        settled: bool,
    },
    /// Being detached from whatever held it.
    Detaching,
    /// Attached to an instance that is neither: someone else's doing.
    Elsewhere(String),
}

/// What to do next in a move, and the step it brings the move to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveAction {
    /// Nothing to do this pass but wait for what `Waiting` names.
    Wait(Waiting),
    /// The replacement never joined (or vanished): terminate it and start over.
    GiveUpReplacement,
    /// Upgrade: stop the database on the old node (graceful pod delete).
    Drain,
    /// StopInstances for the old instance (`force` on failover: a lost machine may never stop
    /// gracefully).
    Stop { force: bool },
    /// EC2 says the old instance is stopped: taint its node out of service, force-delete its pod.
    MarkFenced,
    /// Delete the volume's attachment to the fenced node: the EBS CSI driver detaches.
    Detach,
    /// The volume is free and the replacement's node Ready: the attach/detach controller and the
    /// driver attach it where the pod is scheduled; wait for it.
    Attach,
    /// The volume is on the replacement: the move is over.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    ReplacementJoining,
    Draining,
    Fencing,
    VolumeDetaching,
    VolumeAttaching,
    /// The volume is attached to an instance this move does not know: never touched.
    VolumeElsewhere,
}

/// The next action of a move that reached `step`. The safety rule is here and nowhere else:
/// nothing touches the volume before EC2 has confirmed the old instance stopped or terminated,
/// whatever step the status claims.
pub fn next_move(step: Step, why: Why, seen: &MoveSeen, join_timeout_secs: u64) -> (Step, MoveAction) {
    let fenced = seen.old.is_none_or(InstanceState::is_fenced);
    // An old instance on its way down was sent its stop (by an operator that died before
    // recording it): resume from there rather than from the status.
    let step = match seen.old {
        Some(InstanceState::Stopping | InstanceState::ShuttingDown) => step.max(Step::StopIssued),
        _ => step,
    };
    if step < Step::StopIssued && !fenced && why == Why::Failover {
        // The lost machine serves nothing: fence it while the replacement boots, not after.
        return (Step::StopIssued, MoveAction::Stop { force: true });
    }
    if step < Step::StopIssued && !fenced {
        match seen.replacement {
            Some((_, NodeSeen::Ready)) => {}
            // Not listed yet is what EC2 shows of a just-launched instance for a few seconds.
            _ if seen.age_secs < join_timeout_secs => {
                return (Step::Launched, MoveAction::Wait(Waiting::ReplacementJoining));
            }
            _ => return (Step::Launched, MoveAction::GiveUpReplacement),
        }
        if why == Why::Upgrade && seen.pod_on_old {
            return (Step::Draining, MoveAction::Drain);
        }
        return (Step::StopIssued, MoveAction::Stop { force: why == Why::Failover });
    }
    if !fenced {
        // Sent, but EC2 shows it running: the stop was lost (or the instance was started
        // again by hand); stopping is idempotent, so ask again.
        return match seen.old {
            Some(InstanceState::Running | InstanceState::Pending) => {
                (Step::StopIssued, MoveAction::Stop { force: why == Why::Failover })
            }
            _ => (Step::StopIssued, MoveAction::Wait(Waiting::Fencing)),
        };
    }
    if step < Step::Fenced {
        return (Step::Fenced, MoveAction::MarkFenced);
    }
    match &seen.volume {
        VolumeSeen::OnOld { .. } => (Step::Detaching, MoveAction::Detach),
        VolumeSeen::Detaching | VolumeSeen::Unknown => {
            (step.max(Step::Detaching), MoveAction::Wait(Waiting::VolumeDetaching))
        }
        VolumeSeen::Elsewhere(_) => (step, MoveAction::Wait(Waiting::VolumeElsewhere)),
        VolumeSeen::Available => match seen.replacement {
            Some((InstanceState::Running, NodeSeen::Ready) | (InstanceState::Stopped, _)) => {
                (Step::Attaching, MoveAction::Attach)
            }
            // A failover fenced before its replacement joined: the volume waits, available,
            // for the node (attached to a machine that never joins, it would serve nothing).
            Some((InstanceState::Running | InstanceState::Pending, _)) | None
                if seen.age_secs < join_timeout_secs =>
            {
                (step, MoveAction::Wait(Waiting::ReplacementJoining))
            }
            // The replacement is gone or never joined: start over with a new one.
            _ => (step, MoveAction::GiveUpReplacement),
        },
        VolumeSeen::OnReplacement { settled: false } => {
            (Step::Attaching, MoveAction::Wait(Waiting::VolumeAttaching))
        }
        VolumeSeen::OnReplacement { settled: true } => (Step::Attaching, MoveAction::Done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, node: NodeSeen) -> Seen {
        Seen { id: id.into(), node, current: true }
    }

    fn outdated(id: &str, node: NodeSeen) -> Seen {
        Seen { id: id.into(), node, current: false }
    }

    #[test]
    fn nothing_live_launches() {
        assert_eq!(plan(None, &[], 10), Plan::Launch);
        assert_eq!(plan(Some("i-old"), &[], 10), Plan::Launch, "a fenced or vanished instance is not live");
    }

    #[test]
    fn a_healthy_or_joining_instance_serves() {
        assert_eq!(plan(None, &[seen("i-1", NodeSeen::Missing)], 10), Plan::Serve("i-1".into()));
        assert_eq!(plan(Some("i-1"), &[seen("i-1", NodeSeen::Ready)], 10), Plan::Serve("i-1".into()));
        let flapping = [seen("i-1", NodeSeen::NotReady { for_secs: 9 })];
        assert_eq!(plan(Some("i-1"), &flapping, 10), Plan::Serve("i-1".into()), "not lost before the delay");
    }

    #[test]
    fn the_status_instance_serves_even_when_not_the_oldest() {
        let live = [seen("i-old", NodeSeen::Ready), seen("i-new", NodeSeen::Ready)];
        assert_eq!(plan(Some("i-new"), &live, 10), Plan::Serve("i-new".into()));
        assert_eq!(plan(None, &live, 10), Plan::Serve("i-old".into()));
    }

    #[test]
    fn failover_launches_waits_then_fences() {
        let lost = seen("i-1", NodeSeen::NotReady { for_secs: 30 });
        assert!(
            matches!(plan(Some("i-1"), std::slice::from_ref(&lost), 10), Plan::LaunchReplacement { lost, .. } if lost == "i-1")
        );
        let joining = [lost.clone(), seen("i-2", NodeSeen::Missing)];
        assert_eq!(
            plan(Some("i-1"), &joining, 10),
            Plan::AwaitReplacement { lost: "i-1".into(), replacement: "i-2".into(), why: Why::Failover }
        );
        let unready = [lost.clone(), seen("i-2", NodeSeen::NotReady { for_secs: 1 })];
        assert!(matches!(plan(Some("i-1"), &unready, 10), Plan::AwaitReplacement { .. }));
        let ready = [lost, seen("i-2", NodeSeen::Ready)];
        assert!(matches!(
            plan(Some("i-1"), &ready, 10),
            Plan::Fence { lost, replacement, lost_for_secs: 30, .. } if lost == "i-1" && replacement == "i-2"
        ));
    }

    #[test]
    fn after_fencing_the_replacement_serves() {
        // The fenced instance is stopped, so no longer live: only the replacement is left.
        assert_eq!(plan(Some("i-1"), &[seen("i-2", NodeSeen::Ready)], 10), Plan::Serve("i-2".into()));
    }

    #[test]
    fn an_outdated_node_is_replaced_by_a_current_one() {
        let old = outdated("i-1", NodeSeen::Ready);
        assert!(matches!(
            plan(Some("i-1"), std::slice::from_ref(&old), 10),
            Plan::LaunchReplacement { why: Why::Upgrade, .. }
        ));
        // Another outdated instance is no replacement.
        let stale = [old.clone(), outdated("i-2", NodeSeen::Ready)];
        assert!(matches!(plan(Some("i-1"), &stale, 10), Plan::LaunchReplacement { why: Why::Upgrade, .. }));
        let joining = [old.clone(), seen("i-3", NodeSeen::Missing)];
        assert!(matches!(plan(Some("i-1"), &joining, 10), Plan::AwaitReplacement { why: Why::Upgrade, .. }));
        let ready = [old, seen("i-3", NodeSeen::Ready)];
        assert!(matches!(
            plan(Some("i-1"), &ready, 10),
            Plan::Fence { why: Why::Upgrade, replacement, .. } if replacement == "i-3"
        ));
        // Rolling back is the same flow: the newer instance is now the outdated one.
        let rolled_back = [seen("i-1", NodeSeen::Ready), outdated("i-3", NodeSeen::Ready)];
        assert_eq!(
            plan(Some("i-3"), &rolled_back, 10),
            Plan::Fence {
                lost: "i-3".into(),
                replacement: "i-1".into(),
                reason: "i-3 runs an outdated node image or type".into(),
                lost_for_secs: 0,
                why: Why::Upgrade,
            }
        );
    }

    #[test]
    fn a_lost_outdated_node_fails_over_without_waiting_for_a_budget() {
        let lost = outdated("i-1", NodeSeen::NotReady { for_secs: 60 });
        assert!(matches!(plan(Some("i-1"), &[lost], 10), Plan::LaunchReplacement { why: Why::Failover, .. }));
    }

    #[test]
    fn the_newest_other_instance_is_the_replacement() {
        let live = [
            seen("i-1", NodeSeen::NotReady { for_secs: 60 }),
            seen("i-2", NodeSeen::NotReady { for_secs: 60 }),
            seen("i-3", NodeSeen::Ready),
        ];
        assert!(
            matches!(plan(Some("i-1"), &live, 10), Plan::Fence { replacement, .. } if replacement == "i-3")
        );
    }

    fn moving(old: Option<InstanceState>, volume: VolumeSeen) -> MoveSeen {
        MoveSeen {
            old,
            replacement: Some((InstanceState::Running, NodeSeen::Ready)),
            volume,
            pod_on_old: false,
            age_secs: 30,
        }
    }

    #[test]
    fn an_upgrade_waits_for_the_replacement_and_gives_up_after_the_timeout() {
        let mut s = moving(Some(InstanceState::Running), VolumeSeen::OnOld { settled: true });
        s.replacement = None;
        assert_eq!(
            next_move(Step::Launched, Why::Upgrade, &s, 600),
            (Step::Launched, MoveAction::Wait(Waiting::ReplacementJoining)),
            "a just-launched instance missing from Describe is eventual consistency, not loss"
        );
        s.replacement = Some((InstanceState::Running, NodeSeen::Missing));
        s.age_secs = 601;
        assert_eq!(
            next_move(Step::Launched, Why::Upgrade, &s, 600),
            (Step::Launched, MoveAction::GiveUpReplacement)
        );
    }

    #[test]
    fn a_failover_fences_while_the_replacement_boots_and_attaches_once_it_joined() {
        let mut s = moving(Some(InstanceState::Running), VolumeSeen::OnOld { settled: true });
        s.replacement = None;
        assert_eq!(
            next_move(Step::Launched, Why::Failover, &s, 600),
            (Step::StopIssued, MoveAction::Stop { force: true }),
            "the lost machine is stopped without waiting for its replacement"
        );
        let fenced = |replacement, age_secs| MoveSeen {
            replacement,
            age_secs,
            ..moving(Some(InstanceState::Stopped), VolumeSeen::Available)
        };
        for joining in [
            None,
            Some((InstanceState::Pending, NodeSeen::Missing)),
            Some((InstanceState::Running, NodeSeen::Missing)),
            Some((InstanceState::Running, NodeSeen::NotReady { for_secs: 5 })),
        ] {
            assert_eq!(
                next_move(Step::Detaching, Why::Failover, &fenced(joining, 20), 600),
                (Step::Detaching, MoveAction::Wait(Waiting::ReplacementJoining)),
                "the volume waits for {joining:?}"
            );
            assert_eq!(
                next_move(Step::Detaching, Why::Failover, &fenced(joining, 601), 600),
                (Step::Detaching, MoveAction::GiveUpReplacement),
                "{joining:?} never joined"
            );
        }
        assert_eq!(
            next_move(
                Step::Detaching,
                Why::Failover,
                &fenced(Some((InstanceState::Running, NodeSeen::Ready)), 20),
                600
            ),
            (Step::Attaching, MoveAction::Attach)
        );
        let gone = fenced(Some((InstanceState::Terminated, NodeSeen::Missing)), 20);
        assert_eq!(
            next_move(Step::Detaching, Why::Failover, &gone, 600),
            (Step::Detaching, MoveAction::GiveUpReplacement)
        );
    }

    #[test]
    fn failover_stops_with_force_upgrade_drains_first() {
        let s = moving(Some(InstanceState::Running), VolumeSeen::OnOld { settled: true });
        assert_eq!(
            next_move(Step::Launched, Why::Failover, &s, 600),
            (Step::StopIssued, MoveAction::Stop { force: true })
        );
        let draining = MoveSeen { pod_on_old: true, ..s.clone() };
        assert_eq!(
            next_move(Step::Launched, Why::Upgrade, &draining, 600),
            (Step::Draining, MoveAction::Drain)
        );
        assert_eq!(
            next_move(Step::Draining, Why::Upgrade, &s, 600),
            (Step::StopIssued, MoveAction::Stop { force: false })
        );
    }

    #[test]
    fn nothing_touches_the_volume_until_ec2_confirms_the_stop() {
        for old in [
            InstanceState::Running,
            InstanceState::Pending,
            InstanceState::Stopping,
            InstanceState::ShuttingDown,
            InstanceState::Unknown,
        ] {
            for step in [Step::StopIssued, Step::Fenced, Step::Detaching, Step::Attaching] {
                for volume in
                    [VolumeSeen::OnOld { settled: true }, VolumeSeen::Available, VolumeSeen::Detaching]
                {
                    let (_, action) = next_move(step, Why::Failover, &moving(Some(old), volume.clone()), 600);
                    assert!(
                        matches!(action, MoveAction::Stop { .. } | MoveAction::Wait(Waiting::Fencing)),
                        "{old:?} at {step:?} with {volume:?}: {action:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_fenced_move_taints_detaches_attaches_in_order() {
        let stopped = Some(InstanceState::Stopped);
        let on_old = VolumeSeen::OnOld { settled: true };
        assert_eq!(
            next_move(Step::StopIssued, Why::Failover, &moving(stopped, on_old.clone()), 600),
            (Step::Fenced, MoveAction::MarkFenced)
        );
        assert_eq!(
            next_move(Step::Fenced, Why::Failover, &moving(stopped, on_old), 600),
            (Step::Detaching, MoveAction::Detach)
        );
        assert_eq!(
            next_move(Step::Detaching, Why::Failover, &moving(stopped, VolumeSeen::Detaching), 600),
            (Step::Detaching, MoveAction::Wait(Waiting::VolumeDetaching))
        );
        assert_eq!(
            next_move(Step::Detaching, Why::Failover, &moving(stopped, VolumeSeen::Available), 600),
            (Step::Attaching, MoveAction::Attach)
        );
        assert_eq!(
            next_move(
                Step::Attaching,
                Why::Failover,
                &moving(stopped, VolumeSeen::OnReplacement { settled: false }),
                600
            ),
            (Step::Attaching, MoveAction::Wait(Waiting::VolumeAttaching))
        );
        assert_eq!(
            next_move(
                Step::Attaching,
                Why::Failover,
                &moving(stopped, VolumeSeen::OnReplacement { settled: true }),
                600
            ),
            (Step::Attaching, MoveAction::Done)
        );
    }

    #[test]
    fn a_vanished_old_instance_counts_as_terminated() {
        assert_eq!(
            next_move(Step::Launched, Why::Failover, &moving(None, VolumeSeen::OnOld { settled: true }), 600),
            (Step::Fenced, MoveAction::MarkFenced)
        );
    }

    #[test]
    fn a_volume_held_by_a_stranger_is_never_touched() {
        let s = moving(Some(InstanceState::Stopped), VolumeSeen::Elsewhere("i-x".into()));
        assert_eq!(
            next_move(Step::Fenced, Why::Failover, &s, 600),
            (Step::Fenced, MoveAction::Wait(Waiting::VolumeElsewhere))
        );
    }

    #[test]
    fn a_restart_resumes_from_what_ec2_shows() {
        // Killed after StopInstances but before the status said so: EC2 shows it stopping.
        let s = moving(Some(InstanceState::Stopping), VolumeSeen::OnOld { settled: true });
        assert_eq!(next_move(Step::Launched, Why::Failover, &s, 600).1, MoveAction::Wait(Waiting::Fencing));
        // Killed after AttachVolume: the volume is on the replacement already.
        let s = moving(Some(InstanceState::Stopped), VolumeSeen::OnReplacement { settled: true });
        assert_eq!(next_move(Step::Detaching, Why::Failover, &s, 600), (Step::Attaching, MoveAction::Done));
    }
}
