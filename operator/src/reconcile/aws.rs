//! The AWS step: security group, dedicated instance, data volume and its attachment, each found
//! again by the resource's UID tag before anything is created. Also reads the node the instance
//! joined as, since the volume attaches only to a running instance and the pod runs only on a
//! Ready node.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use qdb_crd::FailoverStatus;

use super::replace::{NodeSeen, Plan, Seen, Why, plan};

use super::{Error, Facts, aws_err, delete_if_present, kube_err, owner_of};
use crate::aws::{DATA_DEVICE, Instance, InstanceState, Launch};
use crate::build::Desired;
use crate::build::security_group::{desired_rules, sg_diff};
use crate::build::userdata::build_user_data;
use crate::context::Context;

fn is_live(i: &Instance) -> bool {
    matches!(i.state, InstanceState::Pending | InstanceState::Running)
}

pub async fn ensure(
    ctx: &Context,
    d: &Desired,
    active: Option<&str>,
    max_age: std::time::Duration,
    facts: &mut Facts,
) -> Result<(), Error> {
    let aws = &ctx.aws;
    let owner = owner_of(d, &ctx.settings.cluster);
    let uid = d.names.uid();

    let found =
        ctx.inventory.lookup(aws, uid, max_age).await.map_err(aws_err("finding the EC2 resources"))?;
    let sg = match found.security_group {
        Some(sg) => sg,
        None => {
            let sg =
                aws.create_security_group(&owner).await.map_err(aws_err("creating the security group"))?;
            facts.did("CreatedSecurityGroup", sg.id.clone());
            sg
        }
    };
    let (add, remove) = sg_diff(&sg.rules, &desired_rules(&d.spec.network.allowed_cidrs));
    if !add.is_empty() {
        aws.authorize_ingress(&sg.id, &add).await.map_err(aws_err("opening security group rules"))?;
        facts.did("OpenedIngress", format!("{} rules on {}", add.len(), sg.id));
    }
    if !remove.is_empty() {
        aws.revoke_ingress(&sg.id, &remove).await.map_err(aws_err("closing security group rules"))?;
        facts.did("ClosedIngress", format!("{} rules on {}", remove.len(), sg.id));
    }
    let sg_id = sg.id;

    let (volume, instances) = (found.volume, found.instances);
    facts.instances = instances.iter().filter(|i| i.state != InstanceState::Terminated).cloned().collect();
    facts.volume = volume.clone();
    if d.spec.paused {
        // Compute is released after the pod is gone (release_if_paused); the volume stays.
        facts.instance = instances.into_iter().find(is_live);
        return Ok(());
    }

    let nodes = nodes_of(ctx, d).await?;
    let live: Vec<&Instance> = instances.iter().filter(|i| is_live(i)).collect();
    let seen: Vec<Seen> = live
        .iter()
        .map(|i| Seen {
            id: i.id.clone(),
            node: nodes.get(&i.id).map(|n| n.1).unwrap_or(NodeSeen::Missing),
            current: i.image_id == d.spec.node_image && i.instance_type == d.spec.instance_type,
        })
        .collect();
    let find = |id: &str| live.iter().find(|i| i.id == id).map(|i| (*i).clone());
    let zone = volume.as_ref().map(|v| v.zone.clone());
    let instance = match plan(active, &seen, ctx.settings.failover_after.as_secs()) {
        Plan::Launch => {
            let i = launch(ctx, d, &owner, &sg_id, zone.as_deref()).await?;
            facts.did(
                "LaunchedInstance",
                format!("{} ({}, {}) in {}", i.id, i.instance_type, i.image_id, i.zone),
            );
            i
        }
        Plan::Serve(id) => {
            if live.len() == 1 {
                release_budget(ctx, uid);
            }
            find(&id).ok_or_else(|| Error::NotOurs(format!("instance {id} vanished")))?
        }
        Plan::LaunchReplacement { lost, reason, why } => {
            let serving = find(&lost).ok_or_else(|| Error::NotOurs(format!("instance {lost} vanished")))?;
            if why == Why::Upgrade && !take_budget(ctx, uid) {
                facts.wait("UpgradeQueued", format!("{reason}; waiting for the replacement budget"));
                serving
            } else {
                let i = launch(ctx, d, &owner, &sg_id, zone.as_deref()).await?;
                facts.did("LaunchedReplacement", format!("{} to replace {lost}: {reason}", i.id));
                facts.wait("ReplacingNode", format!("{reason}; replacement {} launched", i.id));
                serving
            }
        }
        Plan::AwaitReplacement { lost, replacement, why } => {
            if why == Why::Upgrade {
                // Counted even if the budget was taken by an operator that restarted since.
                take_budget_anyway(ctx, uid);
            }
            facts.wait("ReplacingNode", format!("waiting for replacement {replacement}'s node to be Ready"));
            find(&lost).ok_or_else(|| Error::NotOurs(format!("instance {lost} vanished")))?
        }
        Plan::Fence { lost, replacement, reason, lost_for_secs, why } => {
            let from_node = nodes.get(&lost).map(|n| n.0.clone()).unwrap_or_else(|| lost.clone());
            let to_node = nodes.get(&replacement).map(|n| n.0.clone());
            if why == Why::Upgrade && !drained(ctx, d, &from_node, facts).await? {
                facts
                    .wait("DrainingOldNode", format!("stopping the database on {from_node} before the move"));
                find(&lost).ok_or_else(|| Error::NotOurs(format!("instance {lost} vanished")))?
            } else {
                // The old instance may still be writing to the volume: stopped before anything moves.
                ctx.aws.stop_instance(&lost).await.map_err(aws_err("fencing the old instance"))?;
                taint_out_of_service(ctx, &from_node).await;
                facts.did("FencedInstance", format!("{lost} stopped; {reason}; moving to {replacement}"));
                if why == Why::Failover {
                    let at = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(lost_for_secs as i64);
                    facts.failover =
                        Some(FailoverStatus { at: Time(at), reason, from_node, to_node, recovered_at: None });
                }
                find(&replacement)
                    .ok_or_else(|| Error::NotOurs(format!("instance {replacement} vanished")))?
            }
        }
    };
    let serving_plan = facts.waiting.is_empty();

    let mut volume = match volume {
        Some(v) => v,
        None => {
            let v = aws
                .create_volume(&owner, &instance.zone, d.spec.volume.size_gib, d.spec.volume.type_.as_str())
                .await
                .map_err(aws_err("creating the volume"))?;
            facts.did("CreatedVolume", format!("{} ({} GiB) in {}", v.id, v.size_gib, v.zone));
            v
        }
    };
    if volume.size_gib < d.spec.volume.size_gib {
        aws.modify_volume_size(&volume.id, d.spec.volume.size_gib)
            .await
            .map_err(aws_err("growing the volume"))?;
        facts.did(
            "GrewVolume",
            format!("{} from {} to {} GiB", volume.id, volume.size_gib, d.spec.volume.size_gib),
        );
        volume.size_gib = d.spec.volume.size_gib;
    }

    let attached_here = volume.attachments.iter().any(|a| a.instance_id == instance.id);
    let elsewhere: Vec<String> = volume
        .attachments
        .iter()
        .filter(|a| a.instance_id != instance.id)
        .map(|a| a.instance_id.clone())
        .collect();
    if attached_here {
        facts.volume_attached = true;
    } else if !elsewhere.is_empty() {
        for other in elsewhere {
            let still_live = instances.iter().any(|i| i.id == other && is_live(i));
            if still_live {
                // Moving the volume off a running instance is node replacement's job, which fences
                // the old instance first; never detach under a running database.
                facts.wait("VolumeInUse", format!("{} is attached to running instance {other}", volume.id));
            } else {
                aws.detach_volume(&volume.id, &other)
                    .await
                    .map_err(aws_err("detaching from a dead instance"))?;
                facts.did("DetachedVolume", format!("{} from stopped instance {other}", volume.id));
            }
        }
    } else if instance.state == InstanceState::Running {
        aws.attach_volume(&volume.id, &instance.id, DATA_DEVICE)
            .await
            .map_err(aws_err("attaching the volume"))?;
        facts.did("AttachedVolume", format!("{} to {}", volume.id, instance.id));
        facts.volume_attached = true;
    } else {
        facts.wait("InstanceStarting", format!("{} is {:?}", instance.id, instance.state));
    }
    facts.volume = Some(volume);

    facts.node = nodes.get(&instance.id).map(|(name, seen)| (name.clone(), *seen == NodeSeen::Ready));
    match &facts.node {
        None => facts.wait("NodeJoining", format!("waiting for {} to join the cluster", instance.id)),
        Some((name, false)) => facts.wait("NodeNotReady", format!("node {name} is not Ready")),
        Some(_) => {}
    }
    // Leftovers (a fenced instance once the volume left it, a replacement no longer needed):
    // retired only while serving normally and holding no volume.
    if serving_plan && facts.volume_attached {
        let holding: Vec<String> =
            facts.volume.iter().flat_map(|v| v.attachments.iter().map(|a| a.instance_id.clone())).collect();
        for other in instances.iter().filter(|i| i.id != instance.id && i.state != InstanceState::Terminated)
        {
            if !holding.contains(&other.id) {
                ctx.aws.terminate_instance(&other.id).await.map_err(aws_err("retiring an old instance"))?;
                facts.did("RetiredInstance", format!("{} terminated", other.id));
            }
        }
    }
    facts.instance = Some(instance);
    Ok(())
}

async fn launch(
    ctx: &Context,
    d: &Desired,
    owner: &crate::aws::Owner,
    sg_id: &str,
    zone: Option<&str>,
) -> Result<Instance, Error> {
    let user_data = build_user_data(&d.names, &ctx.settings.cluster);
    let launch = Launch {
        image_id: &d.spec.node_image,
        instance_type: &d.spec.instance_type,
        security_group_id: sg_id,
        user_data: &user_data,
        // An EBS volume attaches only in its own zone.
        zone,
        extra_tags: &[],
    };
    ctx.aws.launch_instance(owner, &launch).await.map_err(aws_err("launching an instance"))
}

/// The database's nodes by instance id: (node name, readiness).
async fn nodes_of(ctx: &Context, d: &Desired) -> Result<HashMap<String, (String, NodeSeen)>, Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let selector =
        d.names.node_labels().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    ctx.metrics.kube("list", "Node");
    let list = nodes
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("aws", "listing nodes"))?;
    let now = jiff::Timestamp::now();
    Ok(list
        .items
        .into_iter()
        .filter_map(|n| {
            let provider = n.spec.as_ref().and_then(|s| s.provider_id.clone())?;
            let instance = provider.rsplit('/').next()?.to_string();
            let ready = n.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| {
                c.iter()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| (c.status == "True", c.last_transition_time.clone()))
            });
            let seen = match ready {
                Some((true, _)) => NodeSeen::Ready,
                Some((false, since)) => NodeSeen::NotReady {
                    for_secs: since.map(|t| now.duration_since(t.0).as_secs().max(0) as u64).unwrap_or(0),
                },
                None => NodeSeen::NotReady { for_secs: 0 },
            };
            Some((instance, (n.metadata.name.unwrap_or_default(), seen)))
        })
        .collect())
}

/// Upgrades replace at most `--replacement-budget` nodes at once, operator-wide.
fn take_budget(ctx: &Context, uid: &str) -> bool {
    let Ok(mut replacing) = ctx.replacing.lock() else { return false };
    if replacing.contains(uid) || replacing.len() < ctx.settings.replacement_budget {
        replacing.insert(uid.to_string());
        return true;
    }
    false
}

fn take_budget_anyway(ctx: &Context, uid: &str) {
    if let Ok(mut replacing) = ctx.replacing.lock() {
        replacing.insert(uid.to_string());
    }
}

fn release_budget(ctx: &Context, uid: &str) {
    if let Ok(mut replacing) = ctx.replacing.lock() {
        replacing.remove(uid);
    }
}

/// An upgrade stops the database on the old node before fencing it: the node is cordoned and
/// the pod deleted gracefully (QuestDB flushes on SIGTERM); the StatefulSet recreates it on the
/// new node, where it starts once the volume has moved. True once no pod runs on the old node.
async fn drained(ctx: &Context, d: &Desired, old_node: &str, facts: &mut Facts) -> Result<bool, Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    ctx.metrics.kube("patch", "Node");
    let cordon = serde_json::json!({"spec": {"unschedulable": true}});
    if let Err(e) = nodes.patch(old_node, &PatchParams::default(), &Patch::Merge(&cordon)).await {
        tracing::warn!(node = old_node, error = %e, "cordoning the old node failed");
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), d.names.namespace());
    ctx.metrics.kube("get", "Pod");
    let pod = pods.get_opt(&d.names.pod()).await.map_err(kube_err("aws", "reading the pod"))?;
    let on_old =
        pod.as_ref().is_some_and(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(old_node));
    if !on_old {
        return Ok(true);
    }
    if pod.as_ref().is_some_and(|p| p.metadata.deletion_timestamp.is_none()) {
        if !delete_if_present(ctx, &pods, &d.names.pod(), "Pod", &DeleteParams::default()).await? {
            return Ok(true);
        }
        facts.did("DrainedPod", format!("{} stopped on {old_node}", d.names.pod()));
    }
    Ok(false)
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

/// Pause: once the pod is gone, the instances are terminated; volume and security group stay.
pub async fn release_if_paused(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    if !d.spec.paused {
        return Ok(());
    }
    if !facts.pod_gone {
        facts.wait("StoppingDatabase", "waiting for the pod to stop before releasing the node");
        return Ok(());
    }
    // The instances the AWS step found this round (not terminated).
    for i in std::mem::take(&mut facts.instances) {
        if let Some(v) = &facts.volume
            && v.attachments.iter().any(|a| a.instance_id == i.id)
        {
            ctx.aws.detach_volume(&v.id, &i.id).await.map_err(aws_err("detaching the volume for pause"))?;
        }
        ctx.aws.terminate_instance(&i.id).await.map_err(aws_err("releasing the instance"))?;
        facts.did("ReleasedInstance", format!("{} terminated while paused", i.id));
    }
    facts.instance = None;
    facts.node = None;
    facts.volume_attached = false;
    Ok(())
}
