//! A node replacement under way, carried out one step per pass: what EC2 and the nodes show is
//! read into [`MoveSeen`], the pure [`next_move`] decides, and this module only does what it
//! says and records the step reached in status (`status.replacement`), so an operator killed at
//! any step resumes there.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use qdb_crd::{FailoverStatus, ReplacementStatus, WaitReason};

use super::replace::{MoveAction, MoveSeen, NodeSeen, Step, VolumeSeen, Waiting, Why, next_move};
use super::{Error, Facts, attachment, aws_err, delete_if_present, kube_err};
use crate::aws::{AttachmentState, Instance, Volume, VolumeState};
use crate::build::Desired;
use crate::context::Context;

/// A new move, at its first step.
pub fn record(from: &str, to: &str, why: Why, reason: String) -> ReplacementStatus {
    ReplacementStatus {
        from_instance: from.to_string(),
        to_instance: to.to_string(),
        why,
        reason,
        step: Step::Launched,
        started_at: Time(jiff::Timestamp::now()),
        fenced_at: None,
    }
}

fn volume_seen(v: &Volume, m: &ReplacementStatus) -> VolumeSeen {
    match v.attachments.first() {
        None if v.state == VolumeState::Available => VolumeSeen::Available,
        None => VolumeSeen::Unknown,
        Some(a) if matches!(a.state, AttachmentState::Detaching | AttachmentState::Detached) => {
            VolumeSeen::Detaching
        }
        Some(a) => {
            let settled = a.state == AttachmentState::Attached;
            if a.instance_id == m.from_instance {
                VolumeSeen::OnOld { settled }
            } else if a.instance_id == m.to_instance {
                VolumeSeen::OnReplacement { settled }
            } else {
                VolumeSeen::Elsewhere(a.instance_id.clone())
            }
        }
    }
}

fn waiting(w: Waiting, m: &ReplacementStatus, volume: &str) -> (WaitReason, String) {
    let (from, to) = (&m.from_instance, &m.to_instance);
    match w {
        Waiting::ReplacementJoining => {
            (WaitReason::ReplacingNode, format!("waiting for replacement {to}'s node to be Ready"))
        }
        Waiting::Draining => {
            (WaitReason::DrainingOldNode, format!("stopping the database on {from} before the move"))
        }
        Waiting::Fencing => {
            (WaitReason::FencingOldNode, format!("waiting for EC2 to confirm {from} stopped"))
        }
        Waiting::VolumeDetaching => (
            WaitReason::VolumeDetaching,
            format!("waiting for the EBS CSI driver to detach {volume} from {from}"),
        ),
        Waiting::VolumeAttaching => (
            WaitReason::VolumeAttaching,
            format!("waiting for the EBS CSI driver to attach {volume} to {to}"),
        ),
        Waiting::VolumeElsewhere => (
            WaitReason::VolumeInUse,
            format!("{volume} is attached to an instance this move does not know; not touched"),
        ),
    }
}

/// Drives the move in `facts.replacement` as far as this pass can; returns the instance that
/// serves now (the old one until it is fenced, then the replacement).
pub async fn drive(
    ctx: &Context,
    d: &Desired,
    instances: &[Instance],
    nodes: &HashMap<String, (String, NodeSeen)>,
    volume: &Volume,
    facts: &mut Facts,
) -> Result<Option<Instance>, Error> {
    let Some(mut m) = facts.replacement.clone() else { return Ok(None) };
    let find = |id: &str| instances.iter().find(|i| i.id == id);
    let from_node = nodes.get(&m.from_instance).map(|n| n.0.clone());
    let pod = read_pod(ctx, d).await?;
    let pod_node = pod.as_ref().and_then(|p| p.spec.as_ref()?.node_name.clone());
    let age = jiff::Timestamp::now().duration_since(m.started_at.0).as_secs().max(0) as u64;
    let seen = MoveSeen {
        old: find(&m.from_instance).map(|i| i.state),
        replacement: find(&m.to_instance)
            .map(|i| (i.state, nodes.get(&i.id).map(|n| n.1).unwrap_or(NodeSeen::Missing))),
        volume: volume_seen(volume, &m),
        pod_on_old: pod_node.is_some() && pod_node == from_node,
        age_secs: age,
    };
    let timeout = ctx.settings.replacement_join_timeout.as_secs();
    let (mut step, mut action) = next_move(m.step, m.why, &seen, timeout);
    if action == MoveAction::MarkFenced {
        // Nothing to wait for after it: go on to the volume in the same pass.
        mark_fenced(ctx, d, &m, from_node.as_deref(), pod_node.as_deref(), facts).await?;
        m.fenced_at = Some(Time(jiff::Timestamp::now()));
        (step, action) = next_move(step, m.why, &seen, timeout);
    }
    let was = m.step;
    m.step = step;
    let serving = if step >= Step::Fenced { &m.to_instance } else { &m.from_instance };
    let serving = find(serving).or_else(|| find(&m.to_instance)).cloned();
    match action {
        MoveAction::Wait(w) => {
            let (reason, message) = waiting(w, &m, &volume.id);
            facts.wait(reason, message);
        }
        MoveAction::GiveUpReplacement => {
            if find(&m.to_instance).is_some() {
                ctx.aws
                    .terminate_instance(&m.to_instance)
                    .await
                    .map_err(aws_err("retiring a replacement"))?;
                ctx.inventory.terminated_instance(d.names.uid(), &m.to_instance);
            }
            facts.did(
                "ReplacementGivenUp",
                format!(
                    "{} did not join as a Ready node within {timeout}s; launching another",
                    m.to_instance
                ),
            );
            facts.wait(WaitReason::ReplacingNode, "launching another replacement");
            facts.replacement = None;
            return Ok(find(&m.from_instance).cloned());
        }
        MoveAction::Drain => {
            if let Some(node) = &from_node {
                drain(ctx, d, node, pod.as_ref(), facts).await?;
            }
            facts.wait(
                WaitReason::DrainingOldNode,
                format!("stopping the database on {} before the move", m.from_instance),
            );
        }
        MoveAction::Stop { force } => {
            ctx.aws
                .stop_instance(&m.from_instance, force)
                .await
                .map_err(aws_err("fencing the old instance"))?;
            facts.did(
                "StoppingOldInstance",
                format!("{}: {}; moving to {}", m.from_instance, m.reason, m.to_instance),
            );
            if m.why == Why::Failover && was < Step::StopIssued {
                let lost_for = match nodes.get(&m.from_instance).map(|n| n.1) {
                    Some(NodeSeen::NotReady { for_secs }) => for_secs,
                    _ => 0,
                };
                let at = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(lost_for as i64);
                facts.failover = Some(FailoverStatus {
                    at: Time(at),
                    reason: m.reason.clone(),
                    from_node: from_node.clone().unwrap_or_else(|| m.from_instance.clone()),
                    to_node: nodes.get(&m.to_instance).map(|n| n.0.clone()),
                    recovered_at: None,
                });
            }
            let (reason, message) = waiting(Waiting::Fencing, &m, &volume.id);
            facts.wait(reason, message);
        }
        // Done above, before the second look.
        MoveAction::MarkFenced => {}
        MoveAction::Detach => {
            // The EBS CSI driver detaches what its attachment to the fenced node held.
            // The attach/detach controller may have deleted it first (the node is out of service
            // and its pod gone): said once either way.
            attachment::release(ctx, &d.names.pv(), &m.from_instance, from_node.as_deref()).await?;
            if was < Step::Detaching {
                facts.did(
                    "ReleasedVolume",
                    format!(
                        "{} leaves fenced instance {} (its attachment deleted)",
                        volume.id, m.from_instance
                    ),
                );
            }
            let (reason, message) = waiting(Waiting::VolumeDetaching, &m, &volume.id);
            facts.wait(reason, message);
        }
        MoveAction::Attach => {
            // The pod's node is the replacement's: the attach/detach controller and the EBS CSI
            // driver attach the volume there.
            let (reason, message) = waiting(Waiting::VolumeAttaching, &m, &volume.id);
            facts.wait(reason, message);
        }
        MoveAction::Done => {
            facts.did(
                "ReplacedNode",
                format!("{} now serves; {} is retired next", m.to_instance, m.from_instance),
            );
            // The old instance is retired by the next pass; until EC2 confirms it terminated the
            // change is not over (status stays Progressing).
            facts.wait(WaitReason::RetiringInstance, format!("{} is retired next", m.from_instance));
            facts.replacement = None;
            return Ok(serving);
        }
    }
    facts.replacement = Some(m);
    Ok(serving)
}

/// EC2 confirmed the old instance stopped: its node is tainted out of service (so Kubernetes
/// detaches what it tracks and garbage-collects its pods) and the database's pod, if still
/// bound there, is force-deleted, since no kubelet will ever confirm it.
async fn mark_fenced(
    ctx: &Context,
    d: &Desired,
    m: &ReplacementStatus,
    from_node: Option<&str>,
    pod_node: Option<&str>,
    facts: &mut Facts,
) -> Result<(), Error> {
    if let Some(node) = from_node {
        taint_out_of_service(ctx, node).await;
    }
    if pod_node.is_some() && pod_node == from_node {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), d.names.namespace());
        delete_if_present(ctx, &pods, &d.names.pod(), "Pod", &DeleteParams::default().grace_period(0))
            .await?;
    }
    facts.did("FencedInstance", format!("EC2 confirms {} stopped; {}", m.from_instance, m.reason));
    Ok(())
}

/// The database's pod, if there is one: read once per pass, for where it runs and whether it is
/// already going.
async fn read_pod(ctx: &Context, d: &Desired) -> Result<Option<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), d.names.namespace());
    ctx.metrics.kube("get", "Pod");
    pods.get_opt(&d.names.pod()).await.map_err(kube_err("aws", "reading the pod"))
}

/// An upgrade stops the database on the old node before fencing it: the node is cordoned and
/// the pod deleted gracefully (QuestDB flushes on SIGTERM); the StatefulSet recreates it on the
/// new node, where it starts once the volume has moved.
async fn drain(
    ctx: &Context,
    d: &Desired,
    old_node: &str,
    pod: Option<&Pod>,
    facts: &mut Facts,
) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    ctx.metrics.kube("patch", "Node");
    let cordon = serde_json::json!({"spec": {"unschedulable": true}});
    if let Err(e) = nodes.patch(old_node, &PatchParams::default(), &Patch::Merge(&cordon)).await {
        tracing::warn!(node = old_node, error = %e, "cordoning the old node failed");
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), d.names.namespace());
    if pod.is_some_and(|p| p.metadata.deletion_timestamp.is_none())
        && delete_if_present(ctx, &pods, &d.names.pod(), "Pod", &DeleteParams::default()).await?
    {
        facts.did("DrainedPod", format!("{} stopped on {old_node}", d.names.pod()));
    }
    Ok(())
}

/// Marks the lost node out of service, for the record and for anything that honours it.
async fn taint_out_of_service(ctx: &Context, node: &str) {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let Ok(Some(n)) = nodes.get_opt(node).await else { return };
    let mut taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    if taints.iter().any(|t| t.key == OUT_OF_SERVICE) {
        return;
    }
    taints.push(Taint {
        key: OUT_OF_SERVICE.into(),
        value: Some("nodeshutdown".into()),
        effect: "NoExecute".into(),
        time_added: None,
    });
    ctx.metrics.kube("patch", "Node");
    let patch = serde_json::json!({"spec": {"taints": taints}});
    if let Err(e) = nodes.patch(node, &PatchParams::default(), &Patch::Strategic(&patch)).await {
        tracing::warn!(node, error = %e, "tainting the lost node failed");
    }
}

const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
