//! The PersistentVolume naming the database's EBS volume, and the claim pre-bound to it.
//!
//! Static binding (`claimRef` <-> `volumeName`, no storage class) because the operator creates the
//! EBS volume itself (in the zone, with the tags and performance it decides); no provisioner may
//! make another. The EBS CSI driver attaches, mounts and grows it, as for any EBS PV on EKS. The PV's
//! reclaim policy is always Retain: whether the EBS volume outlives the database
//! (`spec.volume.reclaimPolicy`) is decided and done by the operator's deletion step.
//!
//! The PV has no owner reference: a cluster-scoped object cannot be owned by a namespaced one
//! (the garbage collector treats the reference as unresolvable). It carries the common labels, so
//! the deletion step finds it by `cloud.questdb.io/owner-uid`.

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeSpec,
    VolumeNodeAffinity, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Desired;

pub const CSI_DRIVER: &str = "ebs.csi.aws.com";
pub const FS_TYPE: &str = "ext4";
/// Node label with the availability zone (set by the cloud, and by nodesim in the local cloud).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// What the claim requests. Fixed and minimal on purpose: the apiserver refuses to resize a claim
/// without an expandable storage class, so growing the volume changes only the PV's capacity.
pub const CLAIM_REQUEST: &str = "1Gi";

/// What AWS says about the database's volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    pub volume_id: String,
    pub zone: String,
}

pub fn build_pv(d: &Desired, volume: &VolumeFacts) -> PersistentVolume {
    let names = &d.names;
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(names.pv()),
            labels: Some(names.labels()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(
                [("storage".to_string(), Quantity(format!("{}Gi", d.spec.volume.size_gib)))].into(),
            ),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            volume_mode: Some("Filesystem".into()),
            csi: Some(CSIPersistentVolumeSource {
                driver: CSI_DRIVER.into(),
                volume_handle: volume.volume_id.clone(),
                fs_type: Some(FS_TYPE.into()),
                ..CSIPersistentVolumeSource::default()
            }),
            // An EBS volume attaches only within its zone; this keeps the scheduler honest even
            // though the nodeSelector already pins the pod.
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: ZONE_LABEL.into(),
                            operator: "In".into(),
                            values: Some(vec![volume.zone.clone()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(names.namespace().to_string()),
                name: Some(names.pvc()),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

pub fn build_pvc(d: &Desired) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: d.metadata(d.names.pvc()),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            // "" rather than absent: absent would let the default storage class claim it.
            storage_class_name: Some(String::new()),
            volume_name: Some(d.names.pv()),
            volume_mode: Some("Filesystem".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_string(), Quantity(CLAIM_REQUEST.into()))].into()),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    fn facts() -> VolumeFacts {
        VolumeFacts { volume_id: "vol-0abc".into(), zone: "us-east-1a".into() }
    }

    #[test]
    fn pv_names_the_ebs_volume_the_way_nodesim_reads_it() {
        let d = desired();
        let pv = build_pv(&d, &facts());
        assert_eq!(pv.metadata.name.as_deref(), Some("qdb-questdb.db-7f3a"));
        assert_eq!(pv.metadata.labels.as_ref(), Some(&d.names.labels()));
        assert_eq!(pv.metadata.owner_references, None);
        let spec = pv.spec.unwrap();
        let csi = spec.csi.unwrap();
        assert_eq!((csi.driver.as_str(), csi.volume_handle.as_str()), ("ebs.csi.aws.com", "vol-0abc"));
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert_eq!(spec.capacity.unwrap()["storage"], Quantity("100Gi".into()));
        assert_eq!(spec.persistent_volume_reclaim_policy.as_deref(), Some("Retain"));
        let term = &spec.node_affinity.unwrap().required.unwrap().node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (req.key.as_str(), req.values.as_deref()),
            (ZONE_LABEL, Some(&["us-east-1a".to_string()][..]))
        );
        let claim = spec.claim_ref.unwrap();
        assert_eq!(
            (claim.namespace.as_deref(), claim.name.as_deref()),
            (Some("questdb"), Some("db-7f3a-data"))
        );
    }

    #[test]
    fn pvc_is_pre_bound_and_never_resized() {
        let mut q = questdb();
        let small = build_pvc(&desired_of(&q));
        assert_child_meta(&small.metadata);
        assert_eq!(small.metadata.name.as_deref(), Some("db-7f3a-data"));
        let spec = small.spec.as_ref().unwrap();
        assert_eq!(spec.volume_name.as_deref(), Some("qdb-questdb.db-7f3a"));
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        q.spec.volume.size_gib = 500;
        assert_eq!(build_pvc(&desired_of(&q)), small);
        let pv = build_pv(&desired_of(&q), &facts());
        assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"], Quantity("500Gi".into()));
    }
}
