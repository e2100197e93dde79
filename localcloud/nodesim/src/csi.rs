//! The EBS CSI driver (`ebs.csi.aws.com`), played for the cluster as EKS's add-on runs it: the
//! controller's external-attacher, which attaches and detaches volumes for the VolumeAttachment
//! objects the attach/detach controller (kube-controller-manager) creates and deletes, and the
//! node plugin's registration, the CSINode naming the node's EC2 instance.
//!
//! As the real attacher does: a VolumeAttachment gets the finalizer
//! `external-attacher/ebs-csi-aws-com` and the node id annotation before AttachVolume, and
//! `status.attached` with the device path once EC2 shows the volume attached; a deleted one is
//! detached (DetachVolume) and let go (finalizer removed) once EC2 shows the volume off that
//! instance. The PV gets the same finalizer while attached. The node simulator is the only caller
//! of AttachVolume and DetachVolume in the local cloud, under the driver's own credentials.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use aws_sdk_ec2::types::VolumeAttachmentState;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::ec2;
use crate::sim::{Sim, ebs_volume_id};

pub const DRIVER: &str = "ebs.csi.aws.com";
pub const FINALIZER: &str = "external-attacher/ebs-csi-aws-com";
/// Where the attacher remembers the node's id (for a detach after the node is gone).
pub const NODE_ID_ANNOTATION: &str = "csi.alpha.kubernetes.io/node-id";
/// The node label the EBS node plugin registers (its topology key).
pub const TOPOLOGY_KEY: &str = "topology.ebs.csi.aws.com/zone";
/// The device the driver names for a node's first EBS volume.
pub const DEVICE: &str = "/dev/xvdaa";
/// How long the attacher waits before sending the same attachment's EC2 call again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);
/// Without it the attach/detach controller leaves the node's volumes to the kubelet.
pub const CONTROLLER_MANAGED: &str = "volumes.kubernetes.io/controller-managed-attach-detach";

/// The kubelet's name for a CSI volume in `node.status.volumesInUse` and `volumesAttached`.
pub fn unique_name(volume_handle: &str) -> String {
    format!("kubernetes.io/csi/{DRIVER}^{volume_handle}")
}

/// The CSINode the node plugin's registration makes: the driver with the node's instance id.
pub fn build_csinode(node_name: &str, node_uid: &str, instance_id: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSINode",
        "metadata": {
            "name": node_name,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}],
        },
        "spec": {"drivers": [{
            "name": DRIVER,
            "nodeID": instance_id,
            "topologyKeys": [TOPOLOGY_KEY],
            // EBS's attachment limit of a Nitro instance, less the root volume and an interface.
            "allocatable": {"count": 26},
        }]},
    })
}

/// What EC2 shows of the volume on the VolumeAttachment's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ebs {
    /// Attached (or busy) to this instance.
    Attached,
    Attaching,
    Detaching,
    /// Not on this instance, and on no other either.
    Free,
    /// Attached to another instance.
    Elsewhere(String),
    /// EC2 does not list the volume.
    Missing,
}

/// The attacher's next move for one VolumeAttachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Finalizer and node id first, so nothing is attached that a deletion could forget.
    Claim,
    Attach,
    MarkAttached,
    /// `status.attachError`: the attach cannot be made now.
    Refuse(String),
    Detach,
    /// Off the instance: the finalizer goes, and with it the object.
    Release,
    Wait,
    Nothing,
}

pub fn plan(deleting: bool, claimed: bool, marked_attached: bool, ebs: &Ebs) -> Step {
    if deleting {
        return match (claimed, ebs) {
            (false, _) => Step::Nothing,
            (true, Ebs::Attached) => Step::Detach,
            (true, Ebs::Attaching | Ebs::Detaching) => Step::Wait,
            (true, Ebs::Free | Ebs::Elsewhere(_) | Ebs::Missing) => Step::Release,
        };
    }
    if !claimed {
        return Step::Claim;
    }
    match ebs {
        Ebs::Attached if marked_attached => Step::Nothing,
        Ebs::Attached => Step::MarkAttached,
        Ebs::Attaching | Ebs::Detaching => Step::Wait,
        Ebs::Free => Step::Attach,
        // EBS refuses a second attachment of a volume; the real driver's call would fail so.
        Ebs::Elsewhere(other) => Step::Refuse(format!("the volume is attached to {other}")),
        Ebs::Missing => Step::Refuse("EC2 does not list the volume".into()),
    }
}

/// What EC2 shows of `volume` (its attachments) for `instance`.
pub fn ebs_seen(attachments: Option<&Vec<(String, VolumeAttachmentState)>>, instance: &str) -> Ebs {
    let Some(attachments) = attachments else { return Ebs::Missing };
    if let Some((_, state)) = attachments.iter().find(|(i, _)| i == instance) {
        return match state {
            VolumeAttachmentState::Attaching => Ebs::Attaching,
            VolumeAttachmentState::Detaching => Ebs::Detaching,
            VolumeAttachmentState::Detached => Ebs::Free,
            _ => Ebs::Attached,
        };
    }
    match attachments.iter().find(|(_, s)| *s != VolumeAttachmentState::Detached) {
        Some((other, _)) => Ebs::Elsewhere(other.clone()),
        None => Ebs::Free,
    }
}

fn has_finalizer(finalizers: Option<&Vec<String>>) -> bool {
    finalizers.is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

fn with_finalizer(finalizers: Option<&Vec<String>>, on: bool) -> Vec<String> {
    let mut out: Vec<String> =
        finalizers.into_iter().flatten().filter(|f| *f != FINALIZER).cloned().collect();
    if on {
        out.push(FINALIZER.to_string());
    }
    out
}

/// The driver's VolumeAttachments: the ones the attach/detach controller made for it.
pub fn ours(all: Vec<VolumeAttachment>) -> Vec<VolumeAttachment> {
    all.into_iter().filter(|va| va.spec.attacher == DRIVER).collect()
}

/// (PV name, node name) of every attachment the driver has marked attached: what a kubelet
/// waits for before it mounts.
pub fn attached(vas: &[VolumeAttachment]) -> BTreeSet<(String, String)> {
    vas.iter()
        .filter(|va| va.metadata.deletion_timestamp.is_none())
        .filter(|va| va.status.as_ref().is_some_and(|s| s.attached))
        .filter_map(|va| Some((va.spec.source.persistent_volume_name.clone()?, va.spec.node_name.clone())))
        .collect()
}

impl Sim {
    /// One pass of the external-attacher over the driver's VolumeAttachments. Settled ones
    /// (claimed, attached, not deleted) cost nothing: only the others read their PV and EC2.
    pub async fn attach_detach(&self, vas: &[VolumeAttachment]) -> Result<()> {
        let pending: Vec<&VolumeAttachment> = vas
            .iter()
            .filter(|va| {
                let settled = va.metadata.deletion_timestamp.is_none()
                    && has_finalizer(va.metadata.finalizers.as_ref())
                    && va.status.as_ref().is_some_and(|s| s.attached);
                !settled
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let pvs: Api<PersistentVolume> = Api::all(self.kube.clone());
        let mut volumes: BTreeMap<String, (PersistentVolume, String)> = BTreeMap::new();
        for va in &pending {
            let Some(pv_name) = va.spec.source.persistent_volume_name.clone() else { continue };
            if volumes.contains_key(&pv_name) {
                continue;
            }
            if let Some(pv) = pvs.get_opt(&pv_name).await.context("reading a PV")?
                && let Some(handle) = ebs_volume_id(&pv)
            {
                volumes.insert(pv_name, (pv, handle));
            }
        }
        let handles: Vec<String> = volumes.values().map(|(_, h)| h.clone()).collect();
        let ebs = if handles.is_empty() {
            BTreeMap::new()
        } else {
            ec2::volume_attachments(&self.ec2, &handles).await?
        };
        for va in pending {
            let name = va.metadata.name.clone().unwrap_or_default();
            let pv_name = va.spec.source.persistent_volume_name.clone().unwrap_or_default();
            let Some((pv, handle)) = volumes.get(&pv_name) else {
                // A PV that is gone leaves nothing to attach; a deleted attachment is let go.
                if va.metadata.deletion_timestamp.is_some() && has_finalizer(va.metadata.finalizers.as_ref())
                {
                    self.release(&name, va).await?;
                }
                continue;
            };
            let Some(instance) = self.node_id(va) else {
                warn!(attachment = name, node = va.spec.node_name, "no instance known for the node");
                continue;
            };
            let claimed = has_finalizer(va.metadata.finalizers.as_ref());
            let marked = va.status.as_ref().is_some_and(|s| s.attached);
            let step = plan(
                va.metadata.deletion_timestamp.is_some(),
                claimed,
                marked,
                &ebs_seen(ebs.get(handle), &instance),
            );
            if let Err(e) = self.act(&step, &name, va, pv, handle, &instance).await {
                warn!(attachment = name, volume = handle, error = format!("{e:#}"), "attacher step failed");
            }
        }
        Ok(())
    }

    async fn act(
        &self,
        step: &Step,
        name: &str,
        va: &VolumeAttachment,
        pv: &PersistentVolume,
        handle: &str,
        instance: &str,
    ) -> Result<()> {
        let api: Api<VolumeAttachment> = Api::all(self.kube.clone());
        let params = PatchParams::default();
        if matches!(step, Step::Attach | Step::Detach) && !self.may_try(name) {
            return Ok(());
        }
        match step {
            Step::Nothing | Step::Wait => {}
            Step::Claim => {
                // The PV first: a PV deleted while attached must wait for the detach.
                if !has_finalizer(pv.metadata.finalizers.as_ref()) {
                    let pvs: Api<PersistentVolume> = Api::all(self.kube.clone());
                    let patch = json!({"metadata": {
                        "finalizers": with_finalizer(pv.metadata.finalizers.as_ref(), true),
                        "resourceVersion": pv.metadata.resource_version,
                    }});
                    pvs.patch(&pv.metadata.name.clone().unwrap_or_default(), &params, &Patch::Merge(patch))
                        .await
                        .context("adding the PV finalizer")?;
                }
                let patch = json!({"metadata": {
                    "finalizers": with_finalizer(va.metadata.finalizers.as_ref(), true),
                    "annotations": {NODE_ID_ANNOTATION: instance},
                    "resourceVersion": va.metadata.resource_version,
                }});
                api.patch(name, &params, &Patch::Merge(patch)).await.context("claiming the attachment")?;
            }
            Step::Attach => {
                info!(volume = handle, instance, "ControllerPublishVolume: attaching");
                if let Err(e) = ec2::attach_volume(&self.ec2, handle, instance, DEVICE).await {
                    self.error(name, "attachError", &format!("{e:#}")).await?;
                }
            }
            Step::MarkAttached => {
                let patch = json!({"status": {
                    "attached": true,
                    "attachmentMetadata": {"devicePath": DEVICE},
                    "attachError": null,
                }});
                api.patch_status(name, &params, &Patch::Merge(patch)).await.context("marking attached")?;
                info!(volume = handle, instance, "attached");
            }
            Step::Refuse(message) => {
                let same = va
                    .status
                    .as_ref()
                    .and_then(|s| s.attach_error.as_ref())
                    .and_then(|e| e.message.as_deref())
                    == Some(message.as_str());
                if !same {
                    self.error(name, "attachError", message).await?;
                }
            }
            Step::Detach => {
                info!(volume = handle, instance, "ControllerUnpublishVolume: detaching");
                if let Err(e) = ec2::detach_volume(&self.ec2, handle, instance).await {
                    self.error(name, "detachError", &format!("{e:#}")).await?;
                }
            }
            Step::Release => self.release(name, va).await?,
        }
        Ok(())
    }

    /// One EC2 call per attachment per [`RETRY`], as the real attacher backs off: EC2's state
    /// shows a sent call within a tick or two, and a refused one should not be sent every tick.
    fn may_try(&self, name: &str) -> bool {
        let mut tries = self.attacher_tries.lock().expect("tries lock");
        tries.retain(|_, at| at.elapsed() < RETRY * 10);
        match tries.get(name) {
            Some(at) if at.elapsed() < RETRY => false,
            _ => {
                tries.insert(name.to_string(), std::time::Instant::now());
                true
            }
        }
    }

    async fn release(&self, name: &str, va: &VolumeAttachment) -> Result<()> {
        let api: Api<VolumeAttachment> = Api::all(self.kube.clone());
        let patch = json!({"metadata": {
            "finalizers": with_finalizer(va.metadata.finalizers.as_ref(), false),
            "resourceVersion": va.metadata.resource_version,
        }});
        match api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await {
            Ok(_) => {
                info!(attachment = name, "detached; let go");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e).context("removing the attachment's finalizer"),
        }
    }

    async fn error(&self, name: &str, field: &str, message: &str) -> Result<()> {
        warn!(attachment = name, field, message, "attacher error");
        let api: Api<VolumeAttachment> = Api::all(self.kube.clone());
        let at = jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default();
        let patch = json!({"status": {field: {"message": message, "time": at}}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(drop)
            .context("writing the error")
    }

    /// The node's instance: the id the attacher recorded, else the node's own (its CSINode says
    /// the same; the simulator made it).
    fn node_id(&self, va: &VolumeAttachment) -> Option<String> {
        if let Some(id) = va.metadata.annotations.as_ref().and_then(|a| a.get(NODE_ID_ANNOTATION)) {
            return Some(id.clone());
        }
        let st = self.state.lock().expect("state lock");
        st.nodes.values().find(|n| n.node_name == va.spec.node_name).map(|n| n.instance_id.clone())
    }

    /// A PV the driver holds that is being deleted goes once no attachment names it.
    pub async fn release_pvs(&self, vas: &[VolumeAttachment]) -> Result<()> {
        let pvs: Api<PersistentVolume> = Api::all(self.kube.clone());
        let in_use: BTreeSet<String> =
            vas.iter().filter_map(|va| va.spec.source.persistent_volume_name.clone()).collect();
        for pv in pvs.list(&ListParams::default()).await.context("listing PVs")? {
            let name = pv.metadata.name.clone().unwrap_or_default();
            if pv.metadata.deletion_timestamp.is_none()
                || !has_finalizer(pv.metadata.finalizers.as_ref())
                || in_use.contains(&name)
            {
                continue;
            }
            let patch = json!({"metadata": {
                "finalizers": with_finalizer(pv.metadata.finalizers.as_ref(), false),
                "resourceVersion": pv.metadata.resource_version,
            }});
            match pvs.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e).context("removing a PV's finalizer"),
            }
        }
        Ok(())
    }
}

/// Every VolumeAttachment of the cluster, once per tick (the attacher and the kubelets share it).
pub async fn list(kube: &kube::Client) -> Result<Vec<VolumeAttachment>> {
    let api: Api<VolumeAttachment> = Api::all(kube.clone());
    Ok(api.list(&ListParams::default()).await.context("listing VolumeAttachments")?.items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_attached_before_the_finalizer_is_on() {
        assert_eq!(plan(false, false, false, &Ebs::Free), Step::Claim);
        assert_eq!(plan(false, true, false, &Ebs::Free), Step::Attach);
        assert_eq!(plan(false, true, false, &Ebs::Attaching), Step::Wait);
        assert_eq!(plan(false, true, false, &Ebs::Attached), Step::MarkAttached);
        assert_eq!(plan(false, true, true, &Ebs::Attached), Step::Nothing);
        assert!(matches!(plan(false, true, false, &Ebs::Elsewhere("i-1".into())), Step::Refuse(_)));
    }

    #[test]
    fn a_deleted_attachment_goes_only_once_ec2_shows_the_volume_off_the_instance() {
        assert_eq!(plan(true, true, true, &Ebs::Attached), Step::Detach);
        assert_eq!(plan(true, true, true, &Ebs::Detaching), Step::Wait);
        assert_eq!(plan(true, true, true, &Ebs::Free), Step::Release);
        assert_eq!(plan(true, true, true, &Ebs::Elsewhere("i-2".into())), Step::Release);
        assert_eq!(plan(true, false, false, &Ebs::Attached), Step::Nothing, "not ours to detach");
    }

    #[test]
    fn names_as_the_kubelet_writes_them() {
        assert_eq!(unique_name("vol-1"), "kubernetes.io/csi/ebs.csi.aws.com^vol-1");
        let n = build_csinode("ip-10-1-0-5.ec2.internal", "uid-1", "i-1");
        assert_eq!(n["spec"]["drivers"][0]["nodeID"], "i-1");
        assert_eq!(n["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }
}
