//! Pure builders: from a validated [`Desired`] (plus the AWS facts a builder needs) to the object
//! the apply step sends with server-side apply. Nothing here talks to an API, so every decision
//! about the shape of a child is unit-tested here.

pub mod configmap;
pub mod dns;
pub mod ingress;
pub mod resources;
pub mod security_group;
pub mod service;
pub mod statefulset;
pub mod userdata;
pub mod volume;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use qdb_crd::{QuestDB, QuestDBSpec, SpecError};

use crate::names::{NameError, Names};

pub const HTTP_PORT: u16 = 9000;
pub const PGWIRE_PORT: u16 = 8812;
pub const ILP_PORT: u16 = 9009;
/// QuestDB's minimal HTTP server, whose `GET /` answers once the database serves.
pub const HEALTH_PORT: u16 = 9003;
/// QDB_ROOT of the official image: the data volume is mounted here.
pub const DATA_DIR: &str = "/var/lib/questdb";

/// A QuestDB resource checked once, so that no builder has to handle a missing name or a bad spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub names: Names,
    /// Controller reference to the QuestDB, for every namespaced child.
    pub owner: OwnerReference,
    pub spec: QuestDBSpec,
    /// `spec.network.dnsName`, or the default under the operator's zone.
    pub dns_name: String,
    /// Taking over a running database: existing children only gain owner references
    /// ([`QuestDB::adopting`]).
    pub adopting: bool,
    /// When the apiserver created the resource (None only for objects built in tests).
    pub created: Option<jiff::Timestamp>,
    /// The restore whose new volume and node are being made (its request and zone): set by the
    /// restore step for its starting step only.
    pub restoring: Option<qdb_crd::RestoreStatus>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("the resource has no metadata.{0}; only objects read from the API server can be built")]
    Missing(&'static str),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("invalid spec: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Spec(Vec<SpecError>),
}

impl Desired {
    /// `dns_zone` is the operator's zone for default DNS names (e.g. `region-a.questdb.example`).
    pub fn new(qdb: &QuestDB, dns_zone: &str) -> Result<Self, Invalid> {
        let meta = &qdb.metadata;
        let name = meta.name.as_deref().ok_or(Invalid::Missing("name"))?;
        let namespace = meta.namespace.as_deref().ok_or(Invalid::Missing("namespace"))?;
        let uid = meta.uid.as_deref().ok_or(Invalid::Missing("uid"))?;
        let names = Names::new(namespace, name, uid)?;
        qdb_crd::validate(&qdb.spec).map_err(Invalid::Spec)?;
        let owner = OwnerReference {
            block_owner_deletion: Some(true),
            ..qdb.controller_owner_ref(&()).ok_or(Invalid::Missing("uid"))?
        };
        let dns_name = dns::dns_name(&names, &qdb.spec, dns_zone);
        let created = meta.creation_timestamp.as_ref().map(|t| t.0);
        Ok(Self {
            names,
            owner,
            spec: qdb.spec.clone(),
            dns_name,
            adopting: qdb.adopting(),
            created,
            restoring: None,
        })
    }

    /// Metadata of a namespaced child: its name, the common labels and the controller reference.
    pub fn metadata(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.names.namespace().to_string()),
            labels: Some(self.names.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use qdb_crd::{NetworkSpec, QuestDB, QuestDBSpec, ReclaimPolicy, VolumeSpec, VolumeType};

    use super::Desired;

    pub const UID: &str = "6f1c2b4e-0000-4000-8000-000000000001";
    /// An m6i.xlarge's share ([`super::resources`]).
    pub const SHARE: super::resources::Share =
        super::resources::Share { memory_mib: 13895, cpu_millis: 3670 };

    pub fn questdb() -> QuestDB {
        let mut q = QuestDB::new(
            "db-7f3a",
            QuestDBSpec {
                version: "8.2.1".into(),
                instance_type: "m6i.xlarge".into(),
                node_image: "ami-0123456789abcdef0".into(),
                volume: VolumeSpec {
                    size_gib: 100,
                    type_: VolumeType::Gp3,
                    iops: None,
                    throughput_mibps: None,
                    reclaim_policy: ReclaimPolicy::Delete,
                    from_volume: None,
                    from_snapshot: None,
                },
                server_config: [("cairo.commit.lag".to_string(), "1000".to_string())].into(),
                paused: false,
                restart_token: None,
                allow_version_downgrade: false,
                network: NetworkSpec { allowed_cidrs: vec!["203.0.113.0/24".into()], dns_name: None },
                adopt: None,
                snapshot: None,
                restore: None,
                snapshot_policy: Default::default(),
            },
        );
        q.metadata.namespace = Some("questdb".into());
        q.metadata.uid = Some(UID.into());
        q
    }

    pub fn desired() -> Desired {
        desired_of(&questdb())
    }

    pub fn desired_of(q: &QuestDB) -> Desired {
        Desired::new(q, "region-a.questdb.example").unwrap()
    }

    /// Asserts the metadata every namespaced child carries.
    pub fn assert_child_meta(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
        let d = desired();
        assert_eq!(meta.namespace.as_deref(), Some("questdb"));
        assert_eq!(meta.labels.as_ref(), Some(&d.names.labels()));
        let owners = meta.owner_references.as_deref().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        let o = &owners[0];
        assert_eq!((o.kind.as_str(), o.name.as_str(), o.uid.as_str()), ("QuestDB", "db-7f3a", UID));
        assert_eq!(o.api_version, "cloud.questdb.io/v1");
        assert_eq!((o.controller, o.block_owner_deletion), (Some(true), Some(true)));
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn a_stored_resource_becomes_desired() {
        let d = desired();
        assert_eq!(d.names.db(), "db-7f3a");
        assert_eq!(d.dns_name, "db-7f3a.questdb.region-a.questdb.example");
        assert_child_meta(&d.metadata("x".into()));
    }

    #[test]
    fn incomplete_or_invalid_resources_are_refused() {
        let mut q = questdb();
        q.metadata.uid = None;
        assert_eq!(Desired::new(&q, "z.example"), Err(Invalid::Missing("uid")));
        let mut q = questdb();
        q.spec.version = "8".into();
        q.spec.volume.size_gib = 0;
        let err = Desired::new(&q, "z.example").unwrap_err();
        assert!(matches!(&err, Invalid::Spec(e) if e.len() == 2), "{err}");
        assert!(err.to_string().contains("; "), "{err}");
        let mut q = questdb();
        q.metadata.name = Some("Bad".into());
        assert!(matches!(Desired::new(&q, "z.example"), Err(Invalid::Name(_))));
    }
}
