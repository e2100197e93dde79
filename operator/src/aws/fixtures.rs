//! EC2 resources as tests build them: a running m6i.large and an unattached 20 GiB gp3 volume in
//! us-east-1a, untagged; each test changes what it is about with struct update syntax.

use std::collections::BTreeMap;

use qdb_crd::keys;

use super::{Attachment, AttachmentState, Instance, InstanceState, Volume, VolumeState};

pub fn instance(id: &str) -> Instance {
    Instance {
        id: id.into(),
        state: InstanceState::Running,
        private_ip: None,
        private_dns: None,
        zone: "us-east-1a".into(),
        image_id: "ami-1".into(),
        instance_type: "m6i.large".into(),
        launched_at_ms: None,
        tags: BTreeMap::new(),
    }
}

pub fn volume(id: &str) -> Volume {
    Volume {
        id: id.into(),
        zone: "us-east-1a".into(),
        size_gib: 20,
        volume_type: "gp3".into(),
        iops: None,
        throughput_mibps: None,
        state: VolumeState::Available,
        attachments: vec![],
        tags: BTreeMap::new(),
    }
}

pub fn attachment(instance_id: &str, state: AttachmentState) -> Attachment {
    Attachment { instance_id: instance_id.into(), device: "/dev/sdf".into(), state }
}

/// The tags of a resource of database `owner_uid`.
pub fn owned_by(owner_uid: &str) -> BTreeMap<String, String> {
    [(keys::OWNER_UID.to_string(), owner_uid.to_string())].into()
}
