//! The AWS step: security group, dedicated instance, data volume and its attachment, each found
//! again by the resource's UID tag before anything is created. Also reads the node the instance
//! joined as, since the volume attaches only to a running instance and the pod runs only on a
//! Ready node. The effects live here; what they read besides the inventory is in [`facts`], and
//! what they decide in [`plan`].

pub(super) mod facts;
pub mod plan;

use std::collections::HashMap;
use std::time::Instant;

use qdb_crd::{DegradedReason, WaitReason, keys};

use self::facts::{by_instance, nodes_of, zone_health};
use self::plan::{
    FromSnapshot, MODIFICATION_COOLDOWN, Take, VolumeAction, from_snapshot, is_live, launch_used_up,
    modifiable_at, next_launch, plan_volume, take_volume,
};
use super::node_move;
use super::replace::{NodeSeen, Plan, Seen, Why, plan};
use super::zone::{self, Gate};
use super::{Error, Facts, adopt, attachment, aws_err, owner_of};
use crate::aws::ec2::tag_filter;
use crate::aws::{
    AttachmentState, Aws, AwsError, Instance, InstanceState, Launch, MODIFICATION_RATE_EXCEEDED, Owner,
    Restore, Volume, VolumeChange, launch_of,
};
use crate::build::Desired;
use crate::build::security_group::{desired_rules, sg_diff};
use crate::build::userdata::build_user_data;
use crate::context::Context;

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

    let mut found =
        ctx.inventory.lookup(aws, uid, max_age).await.map_err(aws_err("finding the EC2 resources"))?;
    // The volume a restore replaced is never the data volume again, even if a listing lagging
    // behind its replaced-by-restore tag shows it so.
    if let Some(r) = &d.restoring
        && found.volume.as_ref().is_some_and(|v| v.id == r.old_volume)
    {
        found.volume = None;
    }
    if d.adopting && !adopt::take_over(ctx, d, &owner, &mut found, facts).await? {
        return Ok(());
    }
    facts.adopted = d.adopting;
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

    let (mut volume, instances) = (found.volume, found.instances);
    if volume.is_none()
        && known_volume.is_none()
        && let Some(id) = &d.spec.volume.from_volume
    {
        volume = take_kept_volume(ctx, &owner, id, facts).await?;
        if volume.is_none() {
            return Ok(());
        }
    }
    let mut restore = None;
    if volume.is_none()
        && known_volume.is_none()
        && let Some(id) = &d.spec.volume.from_snapshot
    {
        restore = restore_from(ctx, d, &owner, id, facts).await?;
        if let Some(r) = restore.as_mut() {
            r.request = d.restoring.as_ref().map(|s| s.request.clone());
        }
        if restore.is_none() {
            return Ok(());
        }
    }
    let listed: Vec<u32> = instances.iter().filter_map(launch_of).collect();
    facts.launches = next_launch(facts.launches, &listed, facts.last_launch.and_then(age));
    facts.instances = instances.iter().filter(|i| i.state != InstanceState::Terminated).cloned().collect();
    facts.volume = volume.clone();
    if d.spec.paused {
        // Compute is released after the pod is gone (release_if_paused); the volume stays. A move
        // under way has nothing left to move.
        if instances.iter().filter(|i| is_live(i)).count() <= 1 {
            ctx.budget.release(uid);
        }
        facts.instance = instances.into_iter().find(is_live);
        facts.replacement = None;
        return Ok(());
    }

    let mut nodes = nodes_of(ctx, d).await?;
    if let Some(a) = d.spec.adopt.as_ref().filter(|_| d.adopting)
        && !nodes.contains_key(&a.instance_id)
        && instances.iter().any(|i| i.id == a.instance_id && is_live(i))
    {
        // The node as patched: the node cache may not have seen the new label yet.
        if let Some(node) = adopt::label_node(ctx, d, &a.instance_id, facts).await? {
            nodes.extend(by_instance(vec![node]));
        }
    }
    facts.ready_nodes =
        nodes.values().filter(|(_, seen)| *seen == NodeSeen::Ready).map(|(name, _)| name.clone()).collect();
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
    // A restore names the zone of its new volume; otherwise a first launch goes where EC2 puts it.
    let zone =
        volume.as_ref().map(|v| v.zone.clone()).or_else(|| d.restoring.as_ref().map(|r| r.zone.clone()));
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
                    ctx.budget.release(uid);
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
                if why == Why::Upgrade && !ctx.budget.take(uid) {
                    facts.wait(
                        WaitReason::UpgradeQueued,
                        format!("{reason}; waiting for the replacement budget"),
                    );
                } else if let Some(message) = held {
                    facts.wait(WaitReason::FailoverHeld, message.clone());
                    facts.held = Some(message);
                } else {
                    let i = launch(ctx, d, &owner, &sg_id, zone.as_deref(), facts).await?;
                    facts.did("LaunchedReplacement", format!("{} to replace {lost}: {reason}", i.id));
                    facts.wait(WaitReason::ReplacingNode, format!("{reason}; replacement {} launched", i.id));
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
            return finish(
                ctx,
                d,
                instance,
                volume,
                known_volume,
                restore.as_ref(),
                instances,
                &nodes,
                facts,
            )
            .await;
        }
    }
    let (Some(volume), Some(m)) = (volume, facts.replacement.as_ref()) else {
        return Ok(());
    };
    if m.why == Why::Upgrade {
        // Counted even if the budget was taken by an operator that restarted since.
        ctx.budget.hold(uid);
    }
    let instance = node_move::drive(ctx, d, &instances, &nodes, &volume, facts).await?;
    facts.volume_attached = facts.replacement.is_none();
    facts.volume = Some(volume);
    facts.node = instance
        .as_ref()
        .and_then(|i| nodes.get(&i.id))
        .map(|(n, seen)| (n.clone(), *seen == NodeSeen::Ready));
    if facts.node.is_none() {
        facts.wait(WaitReason::NodeJoining, "waiting for the replacement's node");
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
    // How a volume yet to be made starts: from this snapshot, else empty.
    restore: Option<&Restore>,
    instances: Vec<Instance>,
    nodes: &HashMap<String, (String, NodeSeen)>,
    facts: &mut Facts,
) -> Result<(), Error> {
    let aws = &ctx.aws;
    let owner = owner_of(d, &ctx.settings.cluster);
    let serving_plan = facts.waiting.is_empty();

    let mut volume = volume;
    // Planned again after a create, so the new volume's attach is decided by the same rules.
    for _ in 0..2 {
        let steps = plan_volume(volume.as_ref(), known_volume, &d.spec.volume, &instance, &instances);
        let mut created = false;
        for step in steps {
            match step {
                VolumeAction::AwaitListing(id) => {
                    facts.wait(
                        WaitReason::VolumeNotListed,
                        format!("{id} (in status) is not listed by EC2; not creating another"),
                    );
                    facts.instance = Some(instance);
                    return Ok(());
                }
                VolumeAction::Create => {
                    let create = aws.create_volume(&owner, &instance.zone, &d.spec.volume, restore);
                    let v = creating(facts, create).await.map_err(aws_err("creating the volume"))?;
                    ctx.inventory.created_volume(d.names.uid(), &v);
                    let from = restore.map(|r| format!(" from {}", r.snapshot_id)).unwrap_or_default();
                    facts.did("CreatedVolume", format!("{} ({} GiB) in {}{from}", v.id, v.size_gib, v.zone));
                    volume = Some(v);
                    created = true;
                }
                VolumeAction::Modify(change) => {
                    let Some(v) = volume.as_mut() else { continue };
                    if let Some(at) = modification_blocked(ctx, aws, &v.id).await? {
                        block_modification(ctx, facts, v, &change, at);
                        continue;
                    }
                    match aws.modify_volume(&v.id, &change).await {
                        // Modified since we looked (another operator, a person): the same wait.
                        Err(e) if e.code() == Some(MODIFICATION_RATE_EXCEEDED) => {
                            let at = jiff::Timestamp::now() + MODIFICATION_COOLDOWN;
                            block_modification(ctx, facts, v, &change, at);
                            continue;
                        }
                        other => other.map_err(aws_err("modifying the volume"))?,
                    }
                    if let Some(to) = change.size_gib {
                        facts.did("GrewVolume", format!("{} from {} to {to} GiB", v.id, v.size_gib));
                        v.size_gib = to;
                    }
                    if change.iops.is_some() || change.throughput_mibps.is_some() {
                        let show =
                            |n: Option<u32>| n.map_or_else(|| "unchanged".to_string(), |n| n.to_string());
                        let (iops, throughput) = (show(change.iops), show(change.throughput_mibps));
                        facts.did("TunedVolume", format!("{}: {iops} IOPS, {throughput} MiB/s", v.id));
                        v.iops = change.iops.or(v.iops);
                        v.throughput_mibps = change.throughput_mibps.or(v.throughput_mibps);
                    }
                }
                VolumeAction::Detach { from } => {
                    let Some(v) = volume.as_ref() else { continue };
                    let node = nodes.get(&from).map(|n| n.0.as_str());
                    if attachment::release(ctx, &d.names.pv(), &from, node).await? > 0 {
                        facts.did(
                            "ReleasedVolume",
                            format!("{}'s attachment to stopped instance {from} deleted", v.id),
                        );
                    }
                    facts.wait(
                        WaitReason::VolumeDetaching,
                        format!("waiting for the EBS CSI driver to detach {} from {from}", v.id),
                    );
                }
                VolumeAction::Wait(reason, message) => facts.wait(reason, message),
            }
        }
        if !created {
            break;
        }
    }
    let Some(volume) = volume else {
        facts.instance = Some(instance);
        return Ok(());
    };
    facts.volume_attached = volume
        .attachments
        .iter()
        .any(|a| a.instance_id == instance.id && a.state == AttachmentState::Attached);
    facts.volume = Some(volume);

    facts.node = nodes.get(&instance.id).map(|(name, seen)| (name.clone(), *seen == NodeSeen::Ready));
    match &facts.node {
        None => {
            facts.wait(WaitReason::NodeJoining, format!("waiting for {} to join the cluster", instance.id))
        }
        Some((name, false)) => facts.wait(WaitReason::NodeNotReady, format!("node {name} is not Ready")),
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
            facts.wait(
                WaitReason::RetiringInstance,
                format!("waiting for EC2 to confirm {} terminated", other.id),
            );
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

async fn launch(
    ctx: &Context,
    d: &Desired,
    owner: &crate::aws::Owner,
    sg_id: &str,
    zone: Option<&str>,
    facts: &mut Facts,
) -> Result<Instance, Error> {
    let user_data = build_user_data(&d.names, &ctx.settings.bootstrap);
    let mut launch = Launch {
        image_id: &d.spec.node_image,
        instance_type: &d.spec.instance_type,
        security_group_id: sg_id,
        user_data: &user_data,
        // An EBS volume attaches only in its own zone.
        zone,
        extra_tags: &[],
        launch: facts.launches,
    };
    // A launch number tried again (next_launch: EC2 may not list it yet) may turn out used up:
    // EC2 answers with an instance launched before the listing lag, or one already going (a
    // token stays valid 24 hours past its instance's termination), or refuses the token because
    // it was another launch's (other parameters). The next numbers are new launches; status may
    // have missed a few (a pass stopped before its write), whose instances EC2 no longer lists.
    let before = facts.last_launch;
    facts.last_launch = Some(jiff::Timestamp::now());
    let mut tries = 0;
    let result = loop {
        let result = creating(facts, ctx.aws.launch_instance(owner, &launch)).await;
        let used_up = launch_used_up(result.as_ref().map_err(|e| e.code()), jiff::Timestamp::now());
        tries += 1;
        if !used_up || tries == MAX_USED_UP {
            break result;
        }
        launch.launch = launch.launch.saturating_add(1);
    };
    if result.as_ref().err().is_some_and(AwsError::was_refused) {
        facts.last_launch = before;
    }
    let i = result.map_err(aws_err("launching an instance"))?;
    ctx.inventory.created_instance(d.names.uid(), &i);
    facts.launches = launch.launch.saturating_add(1);
    Ok(i)
}

/// How many launch numbers one launch tries when they turn out used up.
const MAX_USED_UP: u32 = 8;

/// Whether the failover of a database in `zone` must wait ([`zone::gate`]), and why. A failover
/// let through counts against the zone's rate at once, so reconciles deciding together cannot
/// all pass.
async fn hold_failover(ctx: &Context, zone: &str) -> Result<Option<String>, Error> {
    let health = zone_health(ctx, zone).await?;
    let limits = ctx.settings.zone_limits;
    let now = Instant::now();
    let Ok(mut starts) = ctx.failover_starts.lock() else { return Ok(None) };
    let started = starts.recent(zone, now, limits.interval);
    Ok(match zone::gate(health, started, starts.since_held(zone, now), &limits) {
        Gate::Proceed => {
            starts.record(zone, now);
            None
        }
        Gate::Hold { health, started } => {
            starts.held(zone, now);
            Some(zone::hold_message(zone, health, started, &limits))
        }
        Gate::Recovering { ago } => Some(zone::recovering_message(zone, ago)),
    })
}

/// Pause: once the pod is gone, the instances are terminated; volume and security group stay.
pub async fn release_if_paused(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    if !d.spec.paused {
        return Ok(());
    }
    if !facts.pod_gone {
        let stranded = match facts.pod_node.as_deref() {
            Some(name) => !facts::is_ready(&facts::database_nodes(ctx, d).await?, name),
            None => false,
        };
        if !stranded {
            facts.wait(WaitReason::StoppingDatabase, "waiting for the pod to stop before releasing the node");
            return Ok(());
        }
        // Its node is lost (NotReady or gone): no kubelet will confirm the pod stopped. Fenced
        // first, as a failover is: the instances are terminated below, and once EC2 shows them
        // terminated nothing can still write, so the pod is deleted outright.
        if facts.instances.is_empty() {
            let why = format!("was on lost node {}", facts.pod_node.clone().unwrap_or_default());
            super::children::delete_stuck_pod(ctx, d, facts, why).await?;
        }
        facts.wait(
            WaitReason::StoppingDatabase,
            format!(
                "the pod's node {} is lost: fencing it before deleting the pod",
                facts.pod_node.clone().unwrap_or_default()
            ),
        );
    }
    // The kubelet's report of the unmount lets the attach/detach controller detach at once; a
    // node terminated before it leaves the controller waiting six minutes (the resume would wait
    // with it). A node that is not Ready reports nothing more and is not waited for.
    if let Some(v) = facts.volume.as_ref().filter(|_| !facts.instances.is_empty())
        && let Some(node) = attachment::mounted_on(ctx, d, &v.id).await?
    {
        facts.wait(
            WaitReason::VolumeDetaching,
            format!("waiting for the kubelet on {node} to unmount {} before releasing the node", v.id),
        );
        return Ok(());
    }
    // The instances the AWS step found this round (not terminated). Terminating releases the
    // volume (its attachment is not deleted on termination) once the machine is really gone;
    // a detach first would pull the disk from a machine that may still be running.
    // Paused is reported once EC2 no longer lists them (terminated).
    for i in facts.instances.clone() {
        // Every launch is over and accounted for: the next (a resume, a restore) takes a new
        // number even within the listing lag of the last one, not that one's token again.
        facts.last_launch = None;
        if i.state != InstanceState::ShuttingDown {
            ctx.aws.terminate_instance(&i.id).await.map_err(aws_err("releasing the instance"))?;
            facts.did("ReleasedInstance", format!("{} terminated while paused", i.id));
        }
        facts.wait(WaitReason::ReleasingNode, format!("waiting for EC2 to confirm {} terminated", i.id));
    }
    if facts.instances.is_empty() {
        attachment::release_all(ctx, &d.names.pv()).await?;
    }
    facts.instance = None;
    facts.node = None;
    facts.volume_attached = false;
    Ok(())
}

/// `spec.volume.fromVolume`, for a database with no volume yet: the kept volume becomes its own
/// (its tags name the new owner, the kept mark goes), with its data and in its zone. None when it
/// cannot be taken (yet); `facts` says why.
async fn take_kept_volume(
    ctx: &Context,
    owner: &Owner,
    id: &str,
    facts: &mut Facts,
) -> Result<Option<Volume>, Error> {
    let by_id = aws_sdk_ec2::types::Filter::builder().name("volume-id").values(id).build();
    let filters = vec![by_id, tag_filter(keys::CLUSTER, &owner.cluster)];
    let listed = ctx.aws.list_volumes(filters).await.map_err(aws_err("reading the volume to start from"))?;
    let found = listed.into_iter().map(|(_, v)| v).next();
    match (take_volume(found.as_ref(), id, &owner.owner_uid), found) {
        (Take::AlreadyOurs, found) => Ok(found),
        (Take::Take, Some(mut v)) => {
            ctx.aws
                .retag(id, &ctx.aws.tags(owner), &[keys::RETAINED, keys::REPLACED])
                .await
                .map_err(aws_err("taking the kept volume"))?;
            ctx.inventory.changed(&owner.owner_uid);
            let from = v.tags.get(keys::DATABASE).cloned().unwrap_or_default();
            facts.did("TookVolume", format!("{id}, kept by deleted database {from}, with its data"));
            v.tags.extend(ctx.aws.tags(owner));
            v.tags.remove(keys::RETAINED);
            v.tags.remove(keys::REPLACED);
            Ok(Some(v))
        }
        (Take::Wait(message), _) => {
            facts.wait(WaitReason::VolumeInUse, message);
            Ok(None)
        }
        (Take::Refuse(message), _) => {
            facts.pod_failure = Some((DegradedReason::InvalidSpec, message));
            Ok(None)
        }
        // take_volume takes only a volume it was given.
        (Take::Take, None) => Ok(None),
    }
}

/// How long ago `t` was; None if it is in the future (clocks disagree).
fn age(t: jiff::Timestamp) -> Option<std::time::Duration> {
    std::time::Duration::try_from(jiff::Timestamp::now().duration_since(t)).ok()
}

/// The snapshot a new database starts from, read while it has no volume (DescribeSnapshots by
/// id among the cluster's): the restore to make, or None when the pass waits or the spec is wrong.
async fn restore_from(
    ctx: &Context,
    d: &Desired,
    owner: &Owner,
    id: &str,
    facts: &mut Facts,
) -> Result<Option<Restore>, Error> {
    let found = ctx
        .aws
        .find_snapshot(id, &owner.cluster)
        .await
        .map_err(aws_err("reading the snapshot to start from"))?;
    let age = d.created.and_then(age).unwrap_or_default();
    match from_snapshot(found.as_ref(), id, d.spec.volume.size_gib, age) {
        FromSnapshot::Restore(r) => Ok(Some(r)),
        FromSnapshot::Wait(message) => {
            facts.wait(WaitReason::SnapshotPending, message);
            Ok(None)
        }
        FromSnapshot::Refuse(message) => {
            facts.pod_failure = Some((DegradedReason::InvalidSpec, message));
            Ok(None)
        }
    }
}

/// When a volume change must wait for EBS's modification cool-down, and until when. Asked of
/// EC2 once per planned change and remembered while it holds, so a blocked change costs no call
/// per pass for six hours.
async fn modification_blocked(
    ctx: &Context,
    aws: &Aws,
    volume_id: &str,
) -> Result<Option<jiff::Timestamp>, Error> {
    let now = jiff::Timestamp::now();
    let remembered = ctx.modifiable_at.lock().unwrap_or_else(|e| e.into_inner()).get(volume_id).copied();
    if let Some(at) = remembered.filter(|at| *at > now) {
        return Ok(Some(at));
    }
    let last =
        aws.last_modification(volume_id).await.map_err(aws_err("reading the volume's modifications"))?;
    let at = modifiable_at(last, now);
    if at.is_none() {
        ctx.modifiable_at.lock().unwrap_or_else(|e| e.into_inner()).remove(volume_id);
    }
    Ok(at)
}

/// Holds the change until `at`, remembered so the passes until then ask EC2 nothing.
fn block_modification(
    ctx: &Context,
    facts: &mut Facts,
    v: &Volume,
    change: &VolumeChange,
    at: jiff::Timestamp,
) {
    ctx.modifiable_at.lock().unwrap_or_else(|e| e.into_inner()).insert(v.id.clone(), at);
    let what = match change.size_gib {
        Some(to) => format!("growing {} from {} to {to} GiB", v.id, v.size_gib),
        None => format!("changing {}'s performance", v.id),
    };
    facts.modifiable_at = Some(at);
    facts.wait(
        WaitReason::StorageResizeBlocked,
        format!(
            "{what} at {} (EBS allows one modification per volume every 6 hours)",
            at.round(jiff::Unit::Second).unwrap_or(at)
        ),
    );
}
