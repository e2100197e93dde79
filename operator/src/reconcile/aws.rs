//! The AWS step: security group, dedicated instance, data volume and its attachment, each found
//! again by the resource's UID tag before anything is created. Also reads the node the instance
//! joined as, since the volume attaches only to a running instance and the pod runs only on a
//! Ready node.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use qdb_crd::{QuestDB, keys};

use super::node_move;
use super::replace::{NodeSeen, Plan, Seen, Why, plan};
use super::zone::{self, Gate, ZoneHealth};
use super::{Error, Facts, aws_err, kube_err, owner_of};
use crate::aws::inventory::LISTING_LAG;
use crate::aws::{
    Attachment, AttachmentState, AwsError, DATA_DEVICE, Instance, InstanceState, Launch, VolumeState,
    launch_of,
};
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
    known_volume: Option<&str>,
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
            let sg = creating(facts, aws.create_security_group(&owner))
                .await
                .map_err(aws_err("creating the security group"))?;
            ctx.inventory.created_group(uid, &sg);
            facts.did("CreatedSecurityGroup", sg.id.clone());
            sg
        }
    };
    // Ingress nobody asked for (all ports, all protocols, IPv6, other groups: what a hand-added
    // 0.0.0.0/0 usually is) is closed like a stray rule; the docs promise only the allowed CIDRs.
    if !sg.foreign.is_empty() {
        aws.revoke_foreign(&sg).await.map_err(aws_err("revoking foreign security group rules"))?;
        facts.did(
            "RevokedForeignIngress",
            format!("{} permission(s) nobody asked for on {}", sg.foreign.len(), sg.id),
        );
    }
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
    let listed: Vec<u32> = instances.iter().filter_map(launch_of).collect();
    let age = facts.last_create.map(|t| jiff::Timestamp::now().duration_since(t));
    let age = age.and_then(|a| std::time::Duration::try_from(a).ok());
    facts.launches = next_launch(facts.launches, &listed, age);
    facts.instances = instances.iter().filter(|i| i.state != InstanceState::Terminated).cloned().collect();
    facts.volume = volume.clone();
    if d.spec.paused {
        // Compute is released after the pod is gone (release_if_paused); the volume stays. A move
        // under way has nothing left to move.
        facts.instance = instances.into_iter().find(is_live);
        facts.replacement = None;
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
    // A move under way goes on from its recorded step. One started by an operator that died
    // before recording it is taken up from what EC2 and the nodes show.
    if facts.replacement.is_none() {
        let instance = match plan(active, &seen, ctx.settings.failover_after.as_secs()) {
            Plan::Launch => {
                let i = launch(ctx, d, &owner, &sg_id, zone.as_deref(), facts).await?;
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
                let serving =
                    find(&lost).ok_or_else(|| Error::NotOurs(format!("instance {lost} vanished")))?;
                let held = match why {
                    Why::Failover => hold_failover(ctx, &serving.zone).await?,
                    Why::Upgrade => None,
                };
                if why == Why::Upgrade && !take_budget(ctx, uid) {
                    facts.wait("UpgradeQueued", format!("{reason}; waiting for the replacement budget"));
                } else if let Some(message) = held {
                    facts.wait("FailoverHeld", message.clone());
                    facts.held = Some(message);
                } else {
                    let i = launch(ctx, d, &owner, &sg_id, zone.as_deref(), facts).await?;
                    facts.did("LaunchedReplacement", format!("{} to replace {lost}: {reason}", i.id));
                    facts.wait("ReplacingNode", format!("{reason}; replacement {} launched", i.id));
                    facts.replacement = Some(node_move::record(&lost, &i.id, why, reason));
                }
                serving
            }
            Plan::AwaitReplacement { lost, replacement, why } => {
                let reason = format!("{lost} is being replaced by {replacement}");
                facts.replacement = Some(node_move::record(&lost, &replacement, why, reason));
                find(&lost).ok_or_else(|| Error::NotOurs(format!("instance {lost} vanished")))?
            }
            Plan::Fence { lost, replacement, reason, why, .. } => {
                facts.replacement = Some(node_move::record(&lost, &replacement, why, reason));
                find(&lost).ok_or_else(|| Error::NotOurs(format!("instance {lost} vanished")))?
            }
        };
        if facts.replacement.is_none() || volume.is_none() {
            // Nothing to move (a volume not made yet goes where the instance is).
            facts.replacement = None;
            return finish(ctx, d, instance, volume, known_volume, instances, &nodes, facts).await;
        }
    }
    let (Some(volume), Some(m)) = (volume, facts.replacement.as_ref()) else {
        return Ok(());
    };
    if m.why == Why::Upgrade {
        // Counted even if the budget was taken by an operator that restarted since.
        take_budget_anyway(ctx, uid);
    }
    let instance = node_move::drive(ctx, d, &instances, &nodes, &volume, facts).await?;
    facts.volume_attached = facts.replacement.is_none();
    facts.volume = Some(volume);
    facts.node = instance
        .as_ref()
        .and_then(|i| nodes.get(&i.id))
        .map(|(n, seen)| (n.clone(), *seen == NodeSeen::Ready));
    if facts.node.is_none() {
        facts.wait("NodeJoining", "waiting for the replacement's node");
    }
    facts.instance = instance;
    Ok(())
}

/// The ordinary steps once no move is under way: the volume is created, grown, attached, and
/// leftover instances retired.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Context,
    d: &Desired,
    instance: Instance,
    volume: Option<crate::aws::Volume>,
    known_volume: Option<&str>,
    instances: Vec<Instance>,
    nodes: &HashMap<String, (String, NodeSeen)>,
    facts: &mut Facts,
) -> Result<(), Error> {
    let aws = &ctx.aws;
    let owner = owner_of(d, &ctx.settings.cluster);
    let serving_plan = facts.waiting.is_empty();

    let mut volume = match volume {
        Some(v) => v,
        None if let Some(id) = known_volume => {
            // Status names a data volume that EC2 does not list: never replace it with an empty
            // one. It may be EC2's listing lagging (it shows up), or it was deleted by hand.
            facts.wait(
                "VolumeNotListed",
                format!("{id} (in status) is not listed by EC2; not creating another"),
            );
            facts.instance = Some(instance);
            return Ok(());
        }
        None => {
            let size = d.spec.volume.size_gib;
            let create = aws.create_volume(&owner, &instance.zone, size, d.spec.volume.type_.as_str());
            let v = creating(facts, create).await.map_err(aws_err("creating the volume"))?;
            ctx.inventory.created_volume(d.names.uid(), &v);
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

    let here = volume.attachments.iter().find(|a| a.instance_id == instance.id);
    let elsewhere: Vec<&Attachment> =
        volume.attachments.iter().filter(|a| a.instance_id != instance.id).collect();
    if let Some(a) = here {
        facts.volume_attached = a.state == AttachmentState::Attached;
        if !facts.volume_attached {
            facts.wait("VolumeAttaching", format!("{} is {:?} on {}", volume.id, a.state, instance.id));
        }
    } else if !elsewhere.is_empty() {
        for a in elsewhere {
            // Only a holder EC2 shows stopped or terminated (or no longer lists) lets go of the
            // volume: one stopping or running may still be writing. Moving it off a live
            // instance is the node replacement's job (node_move), which fences first.
            let holder = instances.iter().find(|i| i.id == a.instance_id);
            if holder.is_some_and(|i| !i.state.is_fenced()) {
                let state = holder.map(|i| i.state).unwrap_or(InstanceState::Unknown);
                facts.wait(
                    "VolumeInUse",
                    format!("{} is attached to {} ({state:?})", volume.id, a.instance_id),
                );
            } else if a.state == AttachmentState::Detaching {
                facts
                    .wait("VolumeDetaching", format!("{} is being released by {}", volume.id, a.instance_id));
            } else {
                aws.detach_volume(&volume.id, &a.instance_id)
                    .await
                    .map_err(aws_err("detaching from a fenced instance"))?;
                facts.did("DetachedVolume", format!("{} from stopped instance {}", volume.id, a.instance_id));
            }
        }
    } else if volume.state != VolumeState::Available {
        facts.wait("VolumeCreating", format!("{} is {:?}", volume.id, volume.state));
    } else if instance.state == InstanceState::Running {
        aws.attach_volume(&volume.id, &instance.id, DATA_DEVICE)
            .await
            .map_err(aws_err("attaching the volume"))?;
        facts.did("AttachedVolume", format!("{} to {}", volume.id, instance.id));
        facts.wait("VolumeAttaching", format!("{} attaching to {}", volume.id, instance.id));
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
            if holding.contains(&other.id) {
                continue;
            }
            if other.state != InstanceState::ShuttingDown {
                ctx.aws.terminate_instance(&other.id).await.map_err(aws_err("retiring an old instance"))?;
                ctx.inventory.terminated_instance(d.names.uid(), &other.id);
                facts.did("RetiredInstance", format!("{} terminated", other.id));
            }
            // Done once EC2 says so: a change that replaced the node ends with the old one gone.
            facts.wait("RetiringInstance", format!("waiting for EC2 to confirm {} terminated", other.id));
        }
    }
    facts.instance = Some(instance);
    Ok(())
}

/// Runs a create, counted as one for cleanup's listing lag ([`Facts::created`]) unless AWS
/// refused it outright: a create that timed out may still have happened.
async fn creating<T>(
    facts: &mut Facts,
    create: impl std::future::Future<Output = Result<T, AwsError>>,
) -> Result<T, AwsError> {
    let before = facts.last_create;
    facts.created();
    let result = create.await;
    if result.as_ref().err().is_some_and(AwsError::was_refused) {
        facts.last_create = before;
    }
    result
}

/// The number of the next launch (its ClientToken, see [`crate::aws::launch_token`]): one past
/// every launch status recorded (`recorded` is that count) or EC2 lists. One exception: the last
/// recorded launch is not listed and something was created for the database within the listing
/// lag (`last_create_age`). EC2 may simply not show it yet (an operator restarted right after
/// launching lost its memory of it), so that launch is tried again under its own token: EC2
/// answers with its instance rather than starting a second.
pub fn next_launch(recorded: u32, listed: &[u32], last_create_age: Option<std::time::Duration>) -> u32 {
    let past_listed = listed.iter().max().map_or(0, |n| n.saturating_add(1));
    let next = recorded.max(past_listed);
    let last = next.checked_sub(1);
    let young = last_create_age.is_some_and(|a| a < LISTING_LAG);
    match last {
        Some(last) if young && !listed.contains(&last) => last,
        _ => next,
    }
}

async fn launch(
    ctx: &Context,
    d: &Desired,
    owner: &crate::aws::Owner,
    sg_id: &str,
    zone: Option<&str>,
    facts: &mut Facts,
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
        launch: facts.launches,
    };
    let i = creating(facts, ctx.aws.launch_instance(owner, &launch))
        .await
        .map_err(aws_err("launching an instance"))?;
    ctx.inventory.created_instance(d.names.uid(), &i);
    facts.launches = launch.launch.saturating_add(1);
    Ok(i)
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

/// Whether the failover of a database in `zone` must wait ([`zone::gate`]), and why. A failover
/// let through counts against the zone's rate at once, so reconciles deciding together cannot
/// all pass.
async fn hold_failover(ctx: &Context, zone: &str) -> Result<Option<String>, Error> {
    let health = zone_health(ctx, zone).await?;
    let limits = ctx.settings.zone_limits;
    let now = Instant::now();
    let Ok(mut starts) = ctx.failover_starts.lock() else { return Ok(None) };
    let started = starts.recent(zone, now, limits.interval);
    Ok(match zone::gate(health, started, &limits) {
        Gate::Proceed => {
            starts.record(zone, now);
            None
        }
        Gate::Hold { health, started } => Some(zone::hold_message(zone, health, started, &limits)),
    })
}

/// The dedicated nodes in `zone` of the databases this operator manages (only its namespace's,
/// when it watches one), and how many are not Ready. Read only when a failover is about to start.
async fn zone_health(ctx: &Context, zone: &str) -> Result<ZoneHealth, Error> {
    let questdbs: Api<QuestDB> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    ctx.metrics.kube("list", "QuestDB");
    let ours: HashSet<String> = questdbs
        .list_metadata(&ListParams::default())
        .await
        .map_err(kube_err("aws", "listing databases for the zone's health"))?
        .items
        .into_iter()
        .filter_map(|q| q.metadata.uid)
        .collect();
    ctx.metrics.kube("list", "Node");
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default().labels(keys::DEDICATED))
        .await
        .map_err(kube_err("aws", "listing database nodes for the zone's health"))?;
    let mut health = ZoneHealth { nodes: 0, not_ready: 0 };
    for n in nodes.items {
        let owner = n.metadata.labels.as_ref().and_then(|l| l.get(keys::DEDICATED));
        // providerID is aws:///<zone>/<instance-id>.
        let node_zone = n
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(|p| p.strip_prefix("aws:///").and_then(|rest| rest.split('/').next()));
        if !owner.is_some_and(|o| ours.contains(o)) || node_zone != Some(zone) {
            continue;
        }
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        health.nodes += 1;
        health.not_ready += usize::from(!ready);
    }
    Ok(health)
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

/// Pause: once the pod is gone, the instances are terminated; volume and security group stay.
pub async fn release_if_paused(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    if !d.spec.paused {
        return Ok(());
    }
    if !facts.pod_gone {
        facts.wait("StoppingDatabase", "waiting for the pod to stop before releasing the node");
        return Ok(());
    }
    // The instances the AWS step found this round (not terminated). Terminating releases the
    // volume (its attachment is not deleted on termination) once the machine is really gone;
    // a detach first would pull the disk from a machine that may still be running.
    // Paused is reported once EC2 no longer lists them (terminated).
    for i in facts.instances.clone() {
        if i.state != InstanceState::ShuttingDown {
            ctx.aws.terminate_instance(&i.id).await.map_err(aws_err("releasing the instance"))?;
            facts.did("ReleasedInstance", format!("{} terminated while paused", i.id));
        }
        facts.wait("ReleasingNode", format!("waiting for EC2 to confirm {} terminated", i.id));
    }
    facts.instance = None;
    facts.node = None;
    facts.volume_attached = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_deliberate_launch_takes_the_next_number() {
        assert_eq!(next_launch(0, &[], None), 0, "the first launch");
        assert_eq!(next_launch(1, &[0], Some(Duration::from_secs(5))), 1, "a replacement");
        assert_eq!(next_launch(1, &[], Some(Duration::from_secs(600))), 1, "launch 0 is long gone");
        assert_eq!(next_launch(3, &[1], None), 3);
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
}
