//! The EBS CSI driver attaches and detaches the database's volume (one actor, as on EKS): the
//! attach/detach controller makes a VolumeAttachment for the pod's node and the driver's
//! external-attacher calls AttachVolume; the operator never calls AttachVolume or DetachVolume.
//! What stays the operator's is the fencing order: only once EC2 shows the old instance stopped
//! does it delete the attachment to that node, so the driver detaches at once (the controller
//! alone would wait up to six minutes for an unmount a dead kubelet never reports).

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, ListParams};

use super::{Error, delete_if_present, kube_err};
use crate::build::Desired;
use crate::build::volume::CSI_DRIVER;
use crate::context::Context;

/// Where the driver's attacher records the node's instance id.
const NODE_ID_ANNOTATION: &str = "csi.alpha.kubernetes.io/node-id";

/// Whether a VolumeAttachment holds `pv` on the fenced `instance` (known by its node's name, or,
/// once the node is gone, by the instance id the attacher recorded).
pub fn holds(va: &VolumeAttachment, pv: &str, instance: &str, node: Option<&str>) -> bool {
    let on_instance =
        va.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ID_ANNOTATION)).map(String::as_str)
            == Some(instance)
            || node == Some(va.spec.node_name.as_str());
    va.spec.source.persistent_volume_name.as_deref() == Some(pv) && on_instance
}

/// The kubelet's name for an EBS CSI volume in `node.status.volumesInUse`.
pub fn unique_name(volume_id: &str) -> String {
    format!("kubernetes.io/csi/{CSI_DRIVER}^{volume_id}")
}

/// Whether a node is Ready and its kubelet still reports the volume mounted.
pub fn mounted(node: &Node, volume_id: &str) -> bool {
    let name = unique_name(volume_id);
    super::aws::facts::node_ready(node)
        && node.status.as_ref().and_then(|s| s.volumes_in_use.as_ref()).is_some_and(|v| v.contains(&name))
}

/// The database's node whose kubelet still has the volume mounted, if one does: a node released
/// before it reports the unmount leaves the attach/detach controller waiting six minutes for a
/// report that never comes, the volume held by a node that is gone.
pub async fn mounted_on(ctx: &Context, d: &Desired, volume_id: &str) -> Result<Option<String>, Error> {
    let nodes = super::aws::facts::database_nodes(ctx, d).await?;
    Ok(nodes.into_iter().find(|n| mounted(n, volume_id)).and_then(|n| n.metadata.name))
}

/// Deletes every attachment of `pv`: only when no instance of the database is live any more
/// (paused or deleted, all terminated), so the attach/detach controller's record of a node that
/// is gone does not hold the volume (and the PV's finalizer) for its six-minute unmount wait.
pub async fn release_all(ctx: &Context, pv: &str) -> Result<usize, Error> {
    release_where(ctx, |va| va.spec.source.persistent_volume_name.as_deref() == Some(pv)).await
}

/// Deletes the attachments of `pv` to the fenced `instance` (whose node is `node`, if known);
/// the number deleted.
pub async fn release(ctx: &Context, pv: &str, instance: &str, node: Option<&str>) -> Result<usize, Error> {
    release_where(ctx, |va| holds(va, pv, instance, node)).await
}

async fn release_where(ctx: &Context, which: impl Fn(&VolumeAttachment) -> bool) -> Result<usize, Error> {
    let api: Api<VolumeAttachment> = Api::all(ctx.client.clone());
    ctx.metrics.kube("list", "VolumeAttachment");
    let all = api.list(&ListParams::default()).await.map_err(kube_err("aws", "listing VolumeAttachments"))?;
    let mut deleted = 0;
    for va in all.items.iter().filter(|va| va.metadata.deletion_timestamp.is_none()) {
        if !which(va) {
            continue;
        }
        let name = va.metadata.name.clone().unwrap_or_default();
        if delete_if_present(ctx, &api, &name, "VolumeAttachment", &DeleteParams::default()).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::storage::v1::{VolumeAttachmentSource, VolumeAttachmentSpec};
    use kube::api::ObjectMeta;

    use super::*;

    fn va(pv: &str, node: &str, instance: Option<&str>) -> VolumeAttachment {
        VolumeAttachment {
            metadata: ObjectMeta {
                annotations: instance.map(|i| [(NODE_ID_ANNOTATION.to_string(), i.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: VolumeAttachmentSpec {
                attacher: "ebs.csi.aws.com".into(),
                node_name: node.into(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some(pv.into()),
                    ..Default::default()
                },
            },
            status: None,
        }
    }

    #[test]
    fn a_node_holds_the_volume_while_its_kubelet_reports_it_mounted() {
        let node = |ready: &str, in_use: &[&str]| Node {
            status: Some(k8s_openapi::api::core::v1::NodeStatus {
                conditions: Some(vec![k8s_openapi::api::core::v1::NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                volumes_in_use: Some(in_use.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = "kubernetes.io/csi/ebs.csi.aws.com^vol-1";
        assert!(mounted(&node("True", &[name]), "vol-1"));
        assert!(!mounted(&node("True", &[]), "vol-1"), "unmounted");
        assert!(!mounted(&node("Unknown", &[name]), "vol-1"), "a silent kubelet reports nothing more");
    }

    #[test]
    fn only_the_databases_attachment_to_the_fenced_node_goes() {
        assert!(holds(&va("pv-a", "node-old", None), "pv-a", "i-old", Some("node-old")));
        assert!(
            holds(&va("pv-a", "node-gone", Some("i-old")), "pv-a", "i-old", None),
            "node gone: by instance"
        );
        assert!(
            !holds(&va("pv-a", "node-new", Some("i-new")), "pv-a", "i-old", Some("node-old")),
            "the replacement's"
        );
        assert!(!holds(&va("pv-b", "node-old", None), "pv-a", "i-old", Some("node-old")), "another volume");
    }
}
