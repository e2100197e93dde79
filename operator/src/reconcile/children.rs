//! The Kubernetes step: every child built by [`crate::build`], server-side applied in a fixed
//! order under the operator's field manager, and only when it differs from what is there (a
//! converged database costs reads, never writes). An object with a child's name that is neither
//! labelled for this database nor owned by it is left alone and reported.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use qdb_crd::{DegradedReason, OPERATOR_MANAGER, WaitReason, keys};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::subset::is_subset;
use super::{Error, Facts, adopt, delete_if_present, kube_err};
use crate::build::Desired;
use crate::build::configmap::{build_config_map, overridden_keys};
use crate::build::ingress::{
    TcpRoute, build_ingress_route, build_ingress_route_tcp, ingress_route_resource,
    ingress_route_tcp_resource,
};
use crate::build::service::build_service;
use crate::build::statefulset::{build_statefulset, image};
use crate::build::volume::{VolumeFacts, build_pv, build_pvc};
use crate::cache::{Absence, Cached};
use crate::context::Context;

/// The reasons of what this step does: it writes Kubernetes objects only, never EC2.
pub const REASONS: &[&str] =
    &["CreatedChild", "UpdatedChild", "AdoptedChild", "ServerConfigKeysIgnored", "DeletedStuckPod"];

/// Whether an existing object may be changed by this database's reconcile: it carries the
/// database's label (a legacy object to adopt) or is owned by the database.
fn is_ours(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, d: &Desired) -> bool {
    let labelled =
        meta.labels.as_ref().and_then(|l| l.get(keys::DATABASE)).is_some_and(|v| v == d.names.db());
    let owned = meta.owner_references.as_ref().is_some_and(|o| o.iter().any(|r| r.uid == d.names.uid()));
    labelled || owned
}

/// Whether `apply` may create a missing object, or only keep an existing one as desired.
#[derive(Clone, Copy, PartialEq)]
enum Create {
    Yes,
    NotYet,
}

/// Server-side applies `desired` if it differs from what is there; returns the object as it now
/// is, or None when it is missing and may not be created yet.
async fn apply<K>(
    ctx: &Context,
    child: &Cached<'_, K>,
    d: &Desired,
    desired: &K,
    facts: &mut Facts,
    create: Create,
) -> Result<Option<K>, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let (api, kind) = (&child.api, child.kind);
    let name = desired.meta().name.clone().unwrap_or_default();
    // A child the cache does not hold may be a foreign object with its name: asked.
    let actual = child
        .get(&ctx.metrics, &name, desired.meta().namespace.as_deref(), Absence::Ask)
        .await
        .map_err(kube_err("children", format!("reading {kind} {name}")))?;
    if actual.is_none() && create == Create::NotYet {
        return Ok(None);
    }
    if let Some(actual) = actual {
        if !is_ours(actual.meta(), d) {
            return Err(Error::NotOurs(format!(
                "{kind} {name} exists but is neither labelled for nor owned by this database; not touching it"
            )));
        }
        if adopt::keep_as_is(d, facts.instance.as_ref()) {
            return take_as_is(ctx, api, desired.meta(), actual, kind, facts).await.map(Some);
        }
        let (want, have) = (serde_json::to_value(desired), serde_json::to_value(&actual));
        if let (Ok(want), Ok(have)) = (want, have)
            && is_subset(&want, &have)
        {
            return Ok(Some(actual));
        }
        facts.did("UpdatedChild", format!("{kind} {name}"));
    } else {
        facts.did("CreatedChild", format!("{kind} {name}"));
    }
    ctx.metrics.kube("apply", kind);
    let params = PatchParams::apply(OPERATOR_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(desired))
        .await
        .map(Some)
        .map_err(kube_err("children", format!("applying {kind} {name}")))
}

/// An adopted object as it is, with the database's labels and owner reference added (a merge
/// patch, not an apply: an apply of only the metadata would drop every field the applying
/// manager set before).
async fn take_as_is<K>(
    ctx: &Context,
    api: &Api<K>,
    want: &ObjectMeta,
    actual: K,
    kind: &str,
    facts: &mut Facts,
) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let have = actual.meta();
    let labels = want.labels.clone().unwrap_or_default();
    let mut owners = have.owner_references.clone().unwrap_or_default();
    let missing_labels = labels.iter().any(|(k, v)| have.labels.as_ref().and_then(|l| l.get(k)) != Some(v));
    let mut changed = missing_labels;
    for o in want.owner_references.iter().flatten() {
        if !owners.iter().any(|h| h.uid == o.uid) {
            owners.push(o.clone());
            changed = true;
        }
    }
    if !changed {
        return Ok(actual);
    }
    let name = have.name.clone().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {"labels": labels, "ownerReferences": owners}});
    ctx.metrics.kube("patch", kind);
    let patched = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err("children", format!("adopting {kind} {name}")))?;
    facts.did("AdoptedChild", format!("{kind} {name}"));
    Ok(patched)
}

pub async fn ensure(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    use Create::{NotYet, Yes};
    let ns = d.names.namespace();
    let client = ctx.client.clone();
    let c = &ctx.caches;
    let config_maps = Cached {
        api: Api::namespaced(client.clone(), ns),
        store: &c.config_maps,
        dyntype: (),
        kind: "ConfigMap",
    };
    let before = facts.actions.len();
    apply(ctx, &config_maps, d, &build_config_map(d), facts, Yes).await?;
    let ignored = overridden_keys(&d.spec.server_config);
    if facts.actions.len() > before && !ignored.is_empty() {
        // Said when the config is written, not every pass: the pinned bind addresses are what
        // the Service, the probes and Traefik reach, so the user's values for them are dropped.
        facts.did("ServerConfigKeysIgnored", format!("set by the operator: {}", ignored.join(", ")));
    }
    let services =
        Cached { api: Api::namespaced(client.clone(), ns), store: &c.services, dyntype: (), kind: "Service" };
    apply(ctx, &services, d, &build_service(d), facts, Yes).await?;
    let mut claim_bound = false;
    if let Some(v) = &facts.volume {
        let volume = VolumeFacts { volume_id: v.id.clone(), zone: v.zone.clone() };
        let pvs = Cached {
            api: Api::all(client.clone()),
            store: &c.volumes,
            dyntype: (),
            kind: "PersistentVolume",
        };
        let pv = apply(ctx, &pvs, d, &build_pv(d, &volume), facts, Yes).await?;
        if pv.as_ref().is_some_and(binder_has_seen) {
            let pvcs = Cached {
                api: Api::namespaced(client.clone(), ns),
                store: &c.claims,
                dyntype: (),
                kind: "PersistentVolumeClaim",
            };
            let pvc = apply(ctx, &pvcs, d, &build_pvc(d), facts, Yes).await?;
            claim_bound = pvc.as_ref().is_some_and(is_bound);
        } else {
            facts.wait(
                WaitReason::BindingVolume,
                format!("waiting for the volume binder to see {}", d.names.pv()),
            );
        }
    }
    remove_stuck_pod(ctx, d, facts).await?;
    // A first pod that cannot be scheduled yet (no node, claim unbound) fails scheduling, and the
    // scheduler backs it off for up to 10 s per failure: the StatefulSet is created only once
    // its pod can be placed, then the node and claim watches bring the next pass. Not once the
    // volume is attached: the EBS CSI driver attaches it because the pod is scheduled there.
    let node_ready = facts.node.as_ref().is_some_and(|(_, ready)| *ready);
    let placeable = d.spec.paused || (node_ready && claim_bound);
    let sts_api = Cached {
        api: Api::namespaced(client.clone(), ns),
        store: &c.statefulsets,
        dyntype: (),
        kind: "StatefulSet",
    };
    let create_sts = if placeable { Yes } else { NotYet };
    // Without a share (a node type too small, said as the pod's failure) the StatefulSet stays
    // as it is: nothing better can be built.
    let sts = match facts.pod_share {
        Some(share) => apply(ctx, &sts_api, d, &build_statefulset(d, &share), facts, create_sts).await?,
        None => None,
    };
    let (http, tcp) = (ingress_route_resource(), ingress_route_tcp_resource());
    let routes = Cached {
        api: Api::namespaced_with(client.clone(), ns, &http),
        store: &c.routes,
        dyntype: http,
        kind: "IngressRoute",
    };
    apply(ctx, &routes, d, &build_ingress_route(d), facts, Yes).await?;
    let tcp = Cached {
        api: Api::namespaced_with(client.clone(), ns, &tcp),
        store: &c.tcp_routes,
        dyntype: tcp,
        kind: "IngressRouteTCP",
    };
    apply(ctx, &tcp, d, &build_ingress_route_tcp(d, TcpRoute::Pgwire), facts, Yes).await?;
    apply(ctx, &tcp, d, &build_ingress_route_tcp(d, TcpRoute::Ilp), facts, Yes).await?;

    facts.pod_ready = sts.as_ref().is_some_and(rolled_out_and_ready);
    let pods = Api::<Pod>::namespaced(client, ns);
    if d.spec.paused {
        // The instance is released only once the pod is gone: asked of the apiserver, not the
        // cache, while there is an instance to release.
        let pod = if facts.instances.is_empty() {
            cached_pod(ctx, d).await?
        } else {
            ctx.metrics.kube("get", "Pod");
            pods.get_opt(&d.names.pod()).await.map_err(kube_err("children", "reading the pod"))?
        };
        facts.pod_gone = pod.is_none();
        facts.pod_node = pod.and_then(|p| p.spec.and_then(|s| s.node_name));
    } else if sts.is_none() {
        facts.wait(
            WaitReason::PlacingDatabase,
            "waiting for the node and the volume before starting the database",
        );
    } else if !facts.pod_ready {
        facts.wait(WaitReason::StartingDatabase, format!("waiting for pod {} to be Ready", d.names.pod()));
        match (cached_pod(ctx, d).await?, &sts) {
            (Some(pod), Some(sts)) if stuck_on_an_old_revision(&pod, sts) => {
                // A StatefulSet never replaces a pod that is not Ready on a template it no longer
                // has (Kubernetes' "forced rollback"): once the template is right again (drift
                // repaired, a bad version rolled back), the stuck pod is deleted so it comes back
                // from the template.
                let revision = pod.labels().get(REVISION_LABEL).cloned().unwrap_or_default();
                delete_if_present(ctx, &pods, &d.names.pod(), "Pod", &DeleteParams::default()).await?;
                facts.did(
                    "DeletedStuckPod",
                    format!(
                        "{} was not Ready on revision {revision}, which the StatefulSet no longer has",
                        d.names.pod()
                    ),
                );
            }
            (Some(pod), _) => facts.pod_failure = pod_failure(&pod, &image(d)),
            (None, _) => {}
        }
    }
    Ok(())
}

/// The label the StatefulSet controller puts on each pod: the template revision it came from.
const REVISION_LABEL: &str = "controller-revision-hash";

/// A pod not Ready, from a template revision other than the one the StatefulSet now rolls out
/// (judged only once the controller has seen the current template).
pub fn stuck_on_an_old_revision(pod: &Pod, sts: &StatefulSet) -> bool {
    let Some(status) = &sts.status else { return false };
    let seen = status.observed_generation.is_some() && status.observed_generation >= sts.metadata.generation;
    let Some(update) = status.update_revision.as_deref().filter(|_| seen) else { return false };
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    pod.metadata.deletion_timestamp.is_none()
        && !ready
        && pod.labels().get(REVISION_LABEL).is_some_and(|r| r != update)
}

/// Why the pod can never start as it is, from its containers' waiting reasons: the database's
/// own image (`image`) the node cannot pull. Other waits (ContainerCreating, a crash loop) may
/// pass on their own, and another image is drift the operator repairs, not the spec's fault.
pub fn pod_failure(pod: &Pod, image: &str) -> Option<(DegradedReason, String)> {
    const PULL: [&str; 3] = ["ImagePullBackOff", "ErrImagePull", "InvalidImageName"];
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().filter(|c| c.image == image).find_map(|c| {
        let w = c.state.as_ref()?.waiting.as_ref()?;
        let reason = w.reason.as_deref()?;
        PULL.contains(&reason).then(|| {
            (DegradedReason::ImagePullFailed, format!("{reason}: {}", w.message.as_deref().unwrap_or(reason)))
        })
    })
}

fn is_bound(pvc: &PersistentVolumeClaim) -> bool {
    pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

/// Whether the PersistentVolume controller has seen the volume: it sets the phase (Available, or
/// Bound) once the volume is in its cache. A claim created before that is bound only at the
/// controller's next periodic resync (15 s by default): its claim-side sync finds no volume, and
/// the volume's later arrival does not requeue the claim. So the claim comes after.
fn binder_has_seen(pv: &PersistentVolume) -> bool {
    pv.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p != "Pending")
}

/// The database's pod from the pod cache, which holds every pod the operator's StatefulSets make
/// (they carry its label), so absence there is absence.
pub(crate) async fn cached_pod(ctx: &Context, d: &Desired) -> Result<Option<Pod>, Error> {
    let ns = d.names.namespace();
    let pods = Cached {
        api: Api::namespaced(ctx.client.clone(), ns),
        store: &ctx.caches.pods,
        dyntype: (),
        kind: "Pod",
    };
    pods.get(&ctx.metrics, &d.names.pod(), Some(ns), Absence::Trusted)
        .await
        .map_err(kube_err("children", "reading the pod"))
}

/// After a failover the pod is still bound to the lost node and never goes away on its own (no
/// kubelet confirms its deletion): once the database serves from another node, it is deleted
/// outright so the StatefulSet recreates it there.
async fn remove_stuck_pod(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    let Some((active_node, _)) = &facts.node else { return Ok(()) };
    let Some(pod) = cached_pod(ctx, d).await? else {
        return Ok(());
    };
    let bound = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if !is_stuck(bound.as_deref(), active_node, &facts.ready_nodes) {
        return Ok(());
    }
    delete_stuck_pod(ctx, d, facts, format!("was bound to {}", bound.unwrap_or_default())).await
}

/// Deletes the database's pod outright (no grace: no kubelet is left to confirm a graceful
/// deletion), once what it ran on is fenced; `why` completes the event's note.
pub(super) async fn delete_stuck_pod(
    ctx: &Context,
    d: &Desired,
    facts: &mut Facts,
    why: String,
) -> Result<(), Error> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), d.names.namespace());
    let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    delete_if_present(ctx, &pods, &d.names.pod(), "Pod", &params).await?;
    facts.did("DeletedStuckPod", format!("{} {why}", d.names.pod()));
    Ok(())
}

/// A pod bound to a node other than the serving one, which has no kubelet to stop it (the node
/// is lost or gone). A pod already on a Ready node is left alone: during an upgrade the drained
/// pod is recreated on the replacement before the volume moves there, and deleting it again on
/// every pass only churned it (once a second while the move waited on EC2).
pub fn is_stuck(bound: Option<&str>, active_node: &str, ready_nodes: &[String]) -> bool {
    bound.is_some_and(|b| b != active_node && !ready_nodes.iter().any(|r| r == b))
}

/// The StatefulSet's one pod runs the current template and is Ready.
pub fn rolled_out_and_ready(sts: &StatefulSet) -> bool {
    let Some(status) = &sts.status else { return false };
    let current = status.observed_generation >= sts.metadata.generation;
    let rolled = status.update_revision.is_some() && status.update_revision == status.current_revision;
    current && rolled && status.ready_replicas.unwrap_or(0) >= 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn only_a_pod_on_a_lost_node_is_stuck() {
        let ready = ["new".to_string()];
        assert!(is_stuck(Some("lost"), "new", &ready), "bound to the lost node after a failover");
        assert!(!is_stuck(Some("new"), "new", &ready));
        assert!(!is_stuck(Some("new"), "old", &ready), "an upgrade's pod waiting on the replacement");
        assert!(!is_stuck(None, "new", &ready), "not scheduled yet");
    }

    #[test]
    fn only_the_databases_own_image_that_cannot_be_pulled_fails_the_pod() {
        let pod = |reason: &str, image: &str| -> Pod {
            serde_json::from_value(serde_json::json!({"status": {"containerStatuses": [{
                "name": "questdb", "image": image, "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": "no such manifest"}},
            }]}}))
            .unwrap()
        };
        let ours = "questdb/questdb:9.9.9";
        let (reason, message) = pod_failure(&pod("ImagePullBackOff", ours), ours).unwrap();
        assert_eq!(
            (reason, message.as_str()),
            (DegradedReason::ImagePullFailed, "ImagePullBackOff: no such manifest")
        );
        assert!(pod_failure(&pod("ErrImagePull", ours), ours).is_some());
        assert_eq!(
            pod_failure(&pod("ImagePullBackOff", "questdb/questdb:evil"), ours),
            None,
            "drift, not the spec"
        );
        assert_eq!(pod_failure(&pod("ContainerCreating", ours), ours), None);
        assert_eq!(pod_failure(&pod("CrashLoopBackOff", ours), ours), None);
        assert_eq!(pod_failure(&Pod::default(), ours), None);
    }

    #[test]
    fn a_pod_not_ready_on_a_revision_the_statefulset_left_is_stuck() {
        let sts = |generation: i64, observed: i64, update: &str| -> StatefulSet {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "db", "generation": generation},
                "status": {"replicas": 1, "observedGeneration": observed, "updateRevision": update},
            }))
            .unwrap()
        };
        let pod = |revision: &str, ready: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "db-0", "labels": {"controller-revision-hash": revision}},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap()
        };
        assert!(stuck_on_an_old_revision(&pod("db-evil", "False"), &sts(3, 3, "db-good")));
        assert!(
            !stuck_on_an_old_revision(&pod("db-good", "False"), &sts(3, 3, "db-good")),
            "starting on the current one"
        );
        assert!(
            !stuck_on_an_old_revision(&pod("db-old", "True"), &sts(3, 3, "db-good")),
            "serving: the controller rolls it"
        );
        assert!(
            !stuck_on_an_old_revision(&pod("db-evil", "False"), &sts(3, 2, "db-evil2")),
            "template not seen yet"
        );
    }

    #[test]
    fn ownership_by_label_or_reference_only() {
        let d = fixtures::desired();
        let mut meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta::default();
        assert!(!is_ours(&meta, &d), "an unlabelled, unowned object is not ours");
        meta.labels = Some([(keys::DATABASE.to_string(), "someone-else".to_string())].into());
        assert!(!is_ours(&meta, &d));
        meta.labels = Some([(keys::DATABASE.to_string(), d.names.db().to_string())].into());
        assert!(is_ours(&meta, &d), "a legacy object labelled for the database is adopted");
        meta.labels = None;
        meta.owner_references = Some(vec![d.owner.clone()]);
        assert!(is_ours(&meta, &d));
    }

    #[test]
    fn the_claim_waits_until_the_binder_has_seen_the_volume() {
        let pv = |phase: Option<&str>| -> PersistentVolume {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": "pv"}, "status": {"phase": phase}}),
            )
            .unwrap()
        };
        assert!(!binder_has_seen(&pv(None)), "just created, no phase yet");
        assert!(!binder_has_seen(&pv(Some("Pending"))));
        assert!(binder_has_seen(&pv(Some("Available"))));
        assert!(binder_has_seen(&pv(Some("Bound"))));
    }

    #[test]
    fn ready_only_when_rolled_out() {
        let mut sts: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "generation": 2},
            "status": {"replicas": 1, "observedGeneration": 2, "readyReplicas": 1,
                       "currentRevision": "r1", "updateRevision": "r2"}
        }))
        .unwrap();
        assert!(!rolled_out_and_ready(&sts));
        sts.status.as_mut().unwrap().current_revision = Some("r2".into());
        assert!(rolled_out_and_ready(&sts));
        sts.metadata.generation = Some(3);
        assert!(!rolled_out_and_ready(&sts));
    }
}
