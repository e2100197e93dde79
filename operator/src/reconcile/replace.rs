//! Node replacement, as a pure decision: given the database's live instances and what their
//! nodes say, which instance serves and what to do next. Failover uses it today; node image and
//! instance type changes are the same flow with a different reason to replace.
//!
//! The order is fixed: launch the replacement first, wait until its node is Ready, then fence the
//! lost instance (stop it, confirmed by EC2) before the volume moves. Once fenced, the lost
//! instance is no longer live, the replacement is the only candidate, and the ordinary steps move
//! the volume, start the pod, flip DNS and retire the fenced instance. Everything is derived from
//! what AWS and Kubernetes show, so an operator restart at any step resumes correctly.

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

/// Why a node is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The node is lost: no time to drain.
    Failover,
    /// Node image or instance type changed: drain first, within the replacement budget.
    Upgrade,
}

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
}
