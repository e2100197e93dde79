//! Deletion, behind the finalizer, in reverse order: the database pod (StatefulSet and claim,
//! so the database stops before its node goes), DNS, instances, volume (unless its reclaim policy
//! is Retain), snapshots (only with the snapshot policy's Delete; else marked kept), security
//! group, the cluster-scoped PV. "Not found" counts as done; the finalizer
//! goes only when AWS shows nothing left. Other namespaced children go with the owner reference.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Resource;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use qdb_crd::{Phase, QuestDB, ReclaimPolicy, keys};

use super::{Error, aws_err, delete_if_present, kube_err, publish};
use crate::aws::InstanceState;
use crate::aws::inventory::LISTING_LAG;
use crate::build::Desired;
use crate::build::dns::dns_name;
use crate::context::Context;
use crate::names::Names;

/// Ok only when everything is gone: the finalizer helper removes the finalizer on Ok, so
/// unfinished work returns [`Error::CleanupWaiting`].
pub async fn run(q: Arc<QuestDB>, ctx: &Context) -> Result<Action, Error> {
    let reference = q.object_ref(&());
    let (Some(ns), Some(name), Some(uid)) = (&q.metadata.namespace, &q.metadata.name, &q.metadata.uid) else {
        return Ok(Action::await_change());
    };
    let Ok(names) = Names::new(ns, name, uid) else {
        // Such a resource never got anything made for it.
        return Ok(Action::await_change());
    };
    if q.status.as_ref().and_then(|s| s.phase) != Some(Phase::Deleting) {
        // `kubectl get questdb` shows the database going, not the last phase it had; the
        // provisioner waits for the resource to be gone either way.
        let status =
            qdb_crd::QuestDBStatus { phase: Some(Phase::Deleting), ..q.status.clone().unwrap_or_default() };
        super::status::ensure(ctx, &q, status).await?;
    }
    if !stop_database(ctx, &names).await? {
        return Err(Error::CleanupWaiting(format!("pod {} still running", names.pod())));
    }
    let aws = &ctx.aws;
    if let Some(zone) = super::dns::hosted_zone(ctx).await? {
        let record = Desired::new(&q, &ctx.settings.dns_zone)
            .map(|d| d.dns_name)
            .unwrap_or_else(|_| dns_name(&names, &q.spec, &ctx.settings.dns_zone));
        aws.delete_a_record(&zone, &record).await.map_err(aws_err("deleting the DNS record"))?;
        ctx.dns_records.saw(&record, None).await;
    }
    let instances = aws.find_instances(uid).await.map_err(aws_err("finding instances to delete"))?;
    let mut remaining = 0;
    for i in &instances {
        if i.state != InstanceState::Terminated {
            aws.terminate_instance(&i.id).await.map_err(aws_err("terminating the instance"))?;
            remaining += 1;
        }
    }
    if remaining > 0 {
        publish(
            ctx,
            &reference,
            EventType::Normal,
            "TerminatingInstances",
            format!("{remaining} instance(s)"),
        )
        .await;
        // Detaching and deleting wait until the instances are gone.
        let again = aws.find_instances(uid).await.map_err(aws_err("checking instances"))?;
        if again.iter().any(|i| i.state != InstanceState::Terminated) {
            return Err(Error::CleanupWaiting("instances still shutting down".into()));
        }
    }
    // Every instance is gone: what the attach/detach controller still records of them goes too.
    super::attachment::release_all(ctx, &names.pv()).await?;
    // The data volume, and one a restore under way replaced and has not let go yet (its data is
    // newer than the snapshot's): both follow the reclaim policy.
    for v in aws.owned_volumes(uid).await.map_err(aws_err("finding the volumes"))? {
        // The instances are gone, and with them their attachments (EC2 detaches at termination);
        // one that remains is another machine's, detached by whoever attached it (the EBS CSI
        // driver, once the pod is gone): wait for it rather than pull it away.
        if let Some(a) = v.attachments.first() {
            return Err(Error::CleanupWaiting(format!("{} is still attached to {}", v.id, a.instance_id)));
        }
        if q.spec.volume.reclaim_policy == ReclaimPolicy::Delete {
            aws.delete_volume(&v.id).await.map_err(aws_err("deleting the volume"))?;
            publish(ctx, &reference, EventType::Normal, "DeletedVolume", v.id.clone()).await;
        } else {
            // Marked, so the orphan sweep knows it was kept on purpose once its owner is gone.
            aws.retag(&v.id, &[(keys::RETAINED.into(), "true".into())], &[])
                .await
                .map_err(aws_err("marking the volume kept"))?;
            publish(ctx, &reference, EventType::Normal, "RetainedVolume", v.id.clone()).await;
        }
    }
    // The snapshots outlive the volume unless the delete asked for them to go: marked, so the
    // orphan sweep knows they were kept on purpose.
    let owner = crate::aws::Owner {
        cluster: ctx.settings.cluster.clone(),
        namespace: ns.clone(),
        database: name.clone(),
        owner_uid: uid.clone(),
    };
    let remove = q.spec.snapshot_policy.reclaim_policy == ReclaimPolicy::Delete;
    let snapshots = aws.owned_snapshots(&owner).await.map_err(aws_err("finding the snapshots"))?;
    let (mut deleted, mut kept) = (Vec::new(), Vec::new());
    for s in snapshots.iter().filter(|s| remove || !s.retained) {
        if remove {
            aws.delete_snapshot(&s.id).await.map_err(aws_err("deleting a snapshot"))?;
            deleted.push(s.id.as_str());
        } else {
            aws.retag(&s.id, &[(keys::RETAINED.into(), "true".into())], &[])
                .await
                .map_err(aws_err("marking a snapshot kept"))?;
            kept.push(s.id.as_str());
        }
    }
    for (reason, ids) in [("DeletedSnapshots", deleted), ("RetainedSnapshots", kept)] {
        if !ids.is_empty() {
            publish(ctx, &reference, EventType::Normal, reason, ids.join(", ")).await;
        }
    }
    if let Some(sg) = aws.find_security_group(uid).await.map_err(aws_err("finding the security group"))? {
        aws.delete_security_group(&sg.id).await.map_err(aws_err("deleting the security group"))?;
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    delete_if_present(ctx, &pvs, &names.pv(), "PersistentVolume", &DeleteParams::default()).await?;
    // Only what AWS still shows decides whether the finalizer may go, and only a listing that
    // began an eventual-consistency window after the last create: a younger one may simply not
    // show an instance launched a moment ago, which would then run forever, owned by nothing.
    let persisted = q.status.as_ref().and_then(|s| s.last_aws_create.as_ref()).map(|t| t.0);
    let age = last_create_age(persisted, ctx.inventory.last_created(uid), jiff::Timestamp::now());
    if let Some(wait) = listing_settles_in(age) {
        return Err(Error::CleanupWaiting(format!(
            "{}s more before EC2's listings are sure to show everything created",
            wait.as_secs().max(1)
        )));
    }
    let left_instances = aws
        .find_instances(uid)
        .await
        .map_err(aws_err("verifying"))?
        .iter()
        .any(|i| i.state != InstanceState::Terminated);
    let left_sg = aws.find_security_group(uid).await.map_err(aws_err("verifying"))?.is_some();
    let left_volume = q.spec.volume.reclaim_policy == ReclaimPolicy::Delete
        && !aws.owned_volumes(uid).await.map_err(aws_err("verifying"))?.is_empty();
    let left_snapshots =
        remove && !aws.owned_snapshots(&owner).await.map_err(aws_err("verifying"))?.is_empty();
    if left_instances || left_sg || left_volume || left_snapshots {
        return Err(Error::CleanupWaiting(format!(
            "AWS still shows instances: {left_instances}, security group: {left_sg}, volume: {left_volume}, \
             snapshots: {left_snapshots}"
        )));
    }
    publish(ctx, &reference, EventType::Normal, "CleanedUp", "every AWS resource is gone".into()).await;
    Ok(Action::await_change())
}

/// How long ago the last create was, from the time status recorded and (newer, if this process
/// made it) the inventory's memory; `None` if nothing was ever created.
pub fn last_create_age(
    persisted: Option<jiff::Timestamp>,
    remembered: Option<Duration>,
    now: jiff::Timestamp,
) -> Option<Duration> {
    let persisted = persisted.map(|t| Duration::try_from(now.duration_since(t)).unwrap_or(Duration::ZERO));
    match (persisted, remembered) {
        (Some(p), Some(r)) => Some(p.min(r)),
        (p, r) => p.or(r),
    }
}

/// How much longer until a listing begun now may be trusted to show everything created
/// `last_create_age` ago; `None` when one may be trusted already.
pub fn listing_settles_in(last_create_age: Option<Duration>) -> Option<Duration> {
    let age = last_create_age?;
    (age < LISTING_LAG).then(|| LISTING_LAG - age)
}

/// Deletes the StatefulSet and the claim; true once the pod is gone.
async fn stop_database(ctx: &Context, names: &Names) -> Result<bool, Error> {
    let ns = names.namespace();
    let client = ctx.client.clone();
    delete_if_present(
        ctx,
        &Api::<StatefulSet>::namespaced(client.clone(), ns),
        &names.statefulset(),
        "StatefulSet",
        &DeleteParams::default(),
    )
    .await?;
    delete_if_present(
        ctx,
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        &names.pvc(),
        "PersistentVolumeClaim",
        &DeleteParams::default(),
    )
    .await?;
    ctx.metrics.kube("get", "Pod");
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let Some(pod) = pods.get_opt(&names.pod()).await.map_err(kube_err("cleanup", "reading the pod"))? else {
        return Ok(true);
    };
    // A pod on a lost node never finishes a graceful deletion (no kubelet confirms it): its
    // instance is terminated next anyway, so it is removed outright.
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let node_ready = match &node {
        Some(n) => Api::<Node>::all(client)
            .get_opt(n)
            .await
            .map_err(kube_err("cleanup", "reading the node"))?
            .is_some_and(|n| super::aws::facts::node_ready(&n)),
        None => false,
    };
    if !node_ready {
        let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
        delete_if_present(ctx, &pods, &names.pod(), "Pod", &params).await?;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_left_is_trusted_only_a_listing_lag_after_the_last_create() {
        let now = jiff::Timestamp::now();
        assert_eq!(listing_settles_in(None), None, "nothing was ever created");
        let ten = Duration::from_secs(10);
        assert_eq!(listing_settles_in(Some(ten)), Some(LISTING_LAG - ten));
        assert_eq!(listing_settles_in(Some(LISTING_LAG)), None);
        let long_ago = now - jiff::SignedDuration::from_secs(3600);
        assert_eq!(last_create_age(Some(long_ago), None, now), Some(Duration::from_secs(3600)));
        // This process created something since the status was written: the newer one counts.
        assert_eq!(last_create_age(Some(long_ago), Some(ten), now), Some(ten));
        assert_eq!(last_create_age(None, Some(ten), now), Some(ten));
        // A timestamp from a clock ahead of ours is "just now", never a negative age.
        let ahead = now + jiff::SignedDuration::from_secs(5);
        assert_eq!(last_create_age(Some(ahead), None, now), Some(Duration::ZERO));
    }
}
