//! The status step: phase, conditions and details, built purely from the facts of this round,
//! written (server-side apply on the status subresource) only when something changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use qdb_crd::{
    DegradedReason, FailoverStatus, NodeStatus, OPERATOR_MANAGER, Phase, QuestDB, QuestDBStatus,
    VolumeStatus, WaitReason, keys,
};
use serde_json::json;

use super::{Error, Facts, kube_err};
use crate::build::Desired;
use crate::build::dns::endpoints;
use crate::context::Context;

fn condition(type_: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        // Never empty: an empty message in a merge patch becomes null on Kubernetes 1.20.
        message: if message.is_empty() { reason.to_string() } else { message.to_string() },
        last_transition_time: Time(jiff::Timestamp::now()),
        observed_generation: generation,
    }
}

/// Keeps each condition's transition time when its status did not change.
fn carry_times(mut new: Vec<Condition>, old: Option<&QuestDBStatus>) -> Vec<Condition> {
    for c in &mut new {
        if let Some(prev) = old.and_then(|o| o.conditions.iter().find(|p| p.type_ == c.type_))
            && prev.status == c.status
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
    }
    new
}

fn instruction(q: &QuestDB) -> Option<String> {
    q.annotations().get(keys::INSTRUCTION_ID).cloned()
}

/// Status of a resource whose spec cannot be reconciled.
pub fn invalid(q: &QuestDB, message: &str) -> QuestDBStatus {
    let g = q.metadata.generation;
    let old = q.status.as_ref();
    QuestDBStatus {
        phase: Some(Phase::Failed),
        conditions: carry_times(
            vec![
                condition("Ready", false, DegradedReason::InvalidSpec.as_str(), message, g),
                condition("Degraded", true, DegradedReason::InvalidSpec.as_str(), message, g),
                condition(
                    "Progressing",
                    false,
                    DegradedReason::InvalidSpec.as_str(),
                    "waiting for a valid spec",
                    g,
                ),
            ],
            old,
        ),
        observed_generation: g,
        observed_instruction: instruction(q),
        ..old.cloned().unwrap_or_default()
    }
}

/// What went wrong in a pass, if anything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Problem<'a> {
    /// The pass's error, with its causes.
    pub error: Option<&'a str>,
    /// That error can only be cured by a change: phase Failed, with this Degraded reason and
    /// AWS's message.
    pub failed: Option<(DegradedReason, &'a str)>,
}

/// Whether the status says a failover is held back (so the event is sent once per hold).
pub fn was_held(s: Option<&QuestDBStatus>) -> bool {
    s.is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == "Degraded" && c.status == "True" && c.reason == DegradedReason::FailoverHeld.as_str()
        })
    })
}

pub fn build(q: &QuestDB, d: &Desired, f: &Facts, problem: &Problem<'_>) -> QuestDBStatus {
    let error = problem.error;
    let g = q.metadata.generation;
    let old = q.status.as_ref();
    let paused = d.spec.paused;
    // A restore stops the database as a pause does, but it is not paused.
    let released = paused && f.instances.is_empty() && f.restore.is_none();
    let node_ready = f.node.as_ref().is_some_and(|(_, r)| *r);
    let ready =
        !paused && node_ready && f.volume_attached && f.pod_ready && f.dns.is_some() && error.is_none();
    // Serving is not the same as done: during a node replacement the old node keeps serving
    // (Ready) while the change is still under way (Progressing), as a Deployment's Available and
    // Progressing conditions do. The provisioner reports success only once both settle.
    // A snapshot being taken changes nothing the database serves: alone it leaves the database
    // Running (status.snapshots shows it pending), so a schedule does not flap the phase.
    let settled = ready && f.waiting.iter().all(|(r, _)| *r == WaitReason::TakingSnapshot);
    let was_running =
        old.and_then(|o| o.phase).is_some_and(|p| matches!(p, Phase::Running | Phase::Updating));
    let phase = if problem.failed.is_some() {
        Phase::Failed
    } else if released {
        Phase::Paused
    } else if f.replacement.is_some() {
        Phase::Replacing
    } else if f.restore.is_some() {
        Phase::Updating
    } else if settled {
        Phase::Running
    } else if was_running || ready {
        Phase::Updating
    } else {
        Phase::Provisioning
    };
    let (wait_reason, wait_message) = match problem.failed {
        Some((reason, message)) => (reason.as_str(), message),
        None => {
            f.waiting.first().map(|(r, m)| (r.as_str(), m.as_str())).unwrap_or(("Converged", "nothing to do"))
        }
    };
    let progressing = !settled && !released && problem.failed.is_none();
    let mut conditions = vec![
        if ready {
            condition("Ready", true, "Running", "the database is serving", g)
        } else if released {
            condition("Ready", false, "Paused", "paused: no compute is running", g)
        } else {
            condition("Ready", false, wait_reason, wait_message, g)
        },
        condition(
            "Progressing",
            progressing,
            if progressing { wait_reason } else { "Converged" },
            wait_message,
            g,
        ),
        match (problem.failed, error, &f.held) {
            (Some((reason, message)), _, _) => condition("Degraded", true, reason.as_str(), message, g),
            (None, Some(e), _) => condition("Degraded", true, DegradedReason::StepFailed.as_str(), e, g),
            (None, None, Some(why)) => {
                condition("Degraded", true, DegradedReason::FailoverHeld.as_str(), why, g)
            }
            (None, None, None) => {
                condition("Degraded", false, DegradedReason::Healthy.as_str(), "all steps succeeded", g)
            }
        },
        condition("Paused", released, if released { "Paused" } else { "Active" }, "", g),
        match &f.node {
            Some((name, true)) => condition("NodeReady", true, "NodeReady", name, g),
            Some((name, false)) => condition("NodeReady", false, "NodeNotReady", name, g),
            None => condition("NodeReady", false, "NoNode", "no node has joined for this database", g),
        },
        condition(
            "VolumeReady",
            f.volume_attached,
            if f.volume_attached { "Attached" } else { "NotAttached" },
            &f.volume.as_ref().map(|v| v.id.clone()).unwrap_or_default(),
            g,
        ),
        condition(
            "DnsReady",
            f.dns.is_some(),
            if f.dns.is_some() { "RecordSet" } else { "NoRecord" },
            &f.dns.as_ref().map(|r| format!("{} -> {}", r.name, r.target)).unwrap_or_default(),
            g,
        ),
    ];
    conditions = carry_times(conditions, old);
    QuestDBStatus {
        phase: Some(phase),
        conditions,
        observed_generation: g,
        observed_instruction: instruction(q),
        node: f.instance.as_ref().map(|i| NodeStatus {
            name: f
                .node
                .as_ref()
                .map(|(n, _)| n.clone())
                .or_else(|| i.private_dns.clone())
                .unwrap_or_default(),
            instance_id: i.id.clone(),
            private_ip: i.private_ip.clone(),
            public_ip: None,
            image: i.image_id.clone(),
            instance_type: i.instance_type.clone(),
            zone: i.zone.clone(),
        }),
        volume: f.volume.as_ref().map(|v| VolumeStatus {
            id: v.id.clone(),
            size_gib: v.size_gib,
            zone: v.zone.clone(),
            modifiable_at: f.modifiable_at.map(Time),
        }),
        dns: f.dns.as_ref().map(|r| r.status()),
        endpoints: if released { None } else { Some(endpoints(&d.dns_name)) },
        // Written by its own field manager (record_failover): a status built from a stale
        // snapshot must not drop it.
        last_failover: None,
        replacement: f.replacement.clone(),
        restore: f.restore.clone(),
        last_restore: f.last_restore.clone(),
        restored_from: f.restored_from.clone(),
        launches: (f.launches > 0).then_some(f.launches).or(old.and_then(|o| o.launches)),
        last_aws_create: f.last_create.map(Time).or(old.and_then(|o| o.last_aws_create.clone())),
        // Carried in facts from the old status; None once the launches are over (released).
        last_launch: f.last_launch.map(Time),
        adopted_generation: match (d.adopting, f.adopted) {
            (true, true) => g,
            _ => old.and_then(|o| o.adopted_generation),
        },
        // Written by the snapshot step's own field manager (snapshot::record), as lastFailover.
        snapshots: Vec::new(),
        checkpoint: None,
        admitted: None,
    }
}

/// The failover to complete now that the database is Ready again, and the time it took.
pub fn recovered(q: &QuestDB, new: &QuestDBStatus) -> Option<(FailoverStatus, std::time::Duration)> {
    let ready = new.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let mut f = q.status.as_ref()?.last_failover.clone().filter(|f| f.recovered_at.is_none() && ready)?;
    let now = jiff::Timestamp::now();
    f.recovered_at = Some(Time(now));
    let took = std::time::Duration::try_from(now.duration_since(f.at.0)).ok()?;
    Some((f, took))
}

/// Records `lastFailover` under its own field manager, so the every-round status apply never
/// removes it.
pub async fn record_failover(ctx: &Context, q: &QuestDB, f: &FailoverStatus) -> Result<(), Error> {
    let api: Api<QuestDB> = Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    let patch =
        json!({"apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "status": {"lastFailover": f}});
    ctx.metrics.kube("apply", "QuestDB/status");
    let params = PatchParams::apply(FAILOVER_MANAGER).force();
    api.patch_status(&q.name_any(), &params, &Patch::Apply(&patch))
        .await
        .map_err(kube_err("status", "recording the failover"))?;
    Ok(())
}

const FAILOVER_MANAGER: &str = "qdb-operator-failover";

pub fn is_converged(s: &QuestDBStatus) -> bool {
    matches!(s.phase, Some(Phase::Running | Phase::Paused))
}

/// A note for the event trail when the phase changes.
pub fn transition(old: Option<&QuestDBStatus>, new: &QuestDBStatus) -> Option<String> {
    let from = old.and_then(|o| o.phase);
    (from != new.phase).then(|| {
        let name = |p: Option<Phase>| p.map(Phase::as_str).unwrap_or("None");
        format!("{} -> {}", name(from), name(new.phase))
    })
}

pub async fn ensure(ctx: &Context, q: &QuestDB, new: QuestDBStatus) -> Result<(), Error> {
    let current = q.status.clone().map(|s| QuestDBStatus {
        last_failover: None,
        snapshots: Vec::new(),
        checkpoint: None,
        admitted: None,
        ..s
    });
    if current.as_ref() == Some(&new) {
        return Ok(());
    }
    let api: Api<QuestDB> = Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "status": new});
    ctx.metrics.kube("apply", "QuestDB/status");
    api.patch_status(&q.name_any(), &PatchParams::apply(OPERATOR_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(kube_err("status", "writing status"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::dns::DnsRecord;
    use crate::build::fixtures::{desired, questdb};
    use qdb_crd::WaitReason;

    fn serving() -> Facts {
        Facts {
            node: Some(("ip-10-0-0-1".into(), true)),
            volume_attached: true,
            pod_ready: true,
            dns: Some(DnsRecord { name: "db.example".into(), target: "10.0.0.1".into(), ttl: 60 }),
            ..Facts::default()
        }
    }

    fn get<'a>(s: &'a QuestDBStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn serving_with_nothing_awaited_is_running_and_settled() {
        let s = build(&questdb(), &desired(), &serving(), &Problem::default());
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(
            (get(&s, "Progressing").status.as_str(), get(&s, "Progressing").reason.as_str()),
            ("False", "Converged")
        );
    }

    #[test]
    fn a_snapshot_being_taken_leaves_a_serving_database_running_a_held_change_does_not() {
        let mut f = serving();
        f.wait(WaitReason::TakingSnapshot, "EBS is completing snapshot snap-1");
        let s = build(&questdb(), &desired(), &f, &Problem::default());
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(get(&s, "Progressing").status, "False");
        f.wait(WaitReason::ChangeHeld, "EBS is completing the safety snapshot snap-1 before ...");
        let s = build(&questdb(), &desired(), &f, &Problem::default());
        assert_eq!(s.phase, Some(Phase::Updating));
        assert_eq!(get(&s, "Progressing").status, "True");
    }

    #[test]
    fn serving_during_a_replacement_is_ready_but_still_progressing() {
        let mut f = serving();
        f.wait(WaitReason::ReplacingNode, "waiting for replacement i-2's node to be Ready");
        let s = build(&questdb(), &desired(), &f, &Problem::default());
        assert_eq!(get(&s, "Ready").status, "True");
        let p = get(&s, "Progressing");
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("True", "ReplacingNode"));
        assert_eq!(s.phase, Some(Phase::Updating));
    }

    #[test]
    fn a_permanent_aws_error_is_failed_with_its_reason_and_message() {
        let mut f = Facts::default();
        f.wait(WaitReason::NodeJoining, "waiting for an instance");
        let message = "RunInstances: InvalidAMIID.NotFound: The image id '[ami-0dead]' does not exist";
        let problem = Problem {
            error: Some("launching an instance: AWS: ..."),
            failed: Some((DegradedReason::ImageNotFound, message)),
        };
        let s = build(&questdb(), &desired(), &f, &problem);
        assert_eq!(s.phase, Some(Phase::Failed));
        let degraded = get(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str(), degraded.message.as_str()),
            ("True", "ImageNotFound", message)
        );
        assert_eq!(get(&s, "Progressing").status, "False", "nothing moves until a change");
        // A transient error is worked on: Degraded, but not Failed.
        let transient = Problem { error: Some("RequestLimitExceeded"), failed: None };
        let s = build(&questdb(), &desired(), &f, &transient);
        assert_eq!(s.phase, Some(Phase::Provisioning));
        assert_eq!(get(&s, "Degraded").reason, "StepFailed");
    }

    #[test]
    fn a_held_failover_is_degraded_and_says_why() {
        let mut f = serving();
        f.node = Some(("ip-10-0-0-1".into(), false));
        f.held = Some("3 of 5 database nodes in zone a are NotReady".into());
        let s = build(&questdb(), &desired(), &f, &Problem::default());
        let degraded = get(&s, "Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "FailoverHeld"));
        assert!(was_held(Some(&s)));
        assert!(!was_held(Some(&build(&questdb(), &desired(), &serving(), &Problem::default()))));
    }

    #[test]
    fn not_yet_serving_is_provisioning() {
        let mut f = Facts::default();
        f.wait(WaitReason::NodeJoining, "waiting for i-1 to join the cluster");
        let s = build(&questdb(), &desired(), &f, &Problem::default());
        assert_eq!(s.phase, Some(Phase::Provisioning));
        assert_eq!(get(&s, "Ready").status, "False");
        assert_eq!(get(&s, "Progressing").reason, "NodeJoining");
    }
}
