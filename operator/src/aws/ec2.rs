//! EC2: the database's security group, its dedicated instance and its data volume, each found by
//! the owner-UID tag.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, IpPermission, IpRange, Placement, ResourceType, Tag,
    TagSpecification,
};
use qdb_crd::{VolumeSpec, keys};

use super::{Aws, AwsError, Owner, ROLE, ROLE_DATA, Service};
use crate::build::security_group::Rule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
    Unknown,
}

impl InstanceState {
    fn from_ec2(state: Option<&InstanceStateName>) -> Self {
        match state {
            Some(InstanceStateName::Pending) => Self::Pending,
            Some(InstanceStateName::Running) => Self::Running,
            Some(InstanceStateName::Stopping) => Self::Stopping,
            Some(InstanceStateName::Stopped) => Self::Stopped,
            Some(InstanceStateName::ShuttingDown) => Self::ShuttingDown,
            Some(InstanceStateName::Terminated) => Self::Terminated,
            _ => Self::Unknown,
        }
    }

    /// Fenced: the instance can no longer write to anything (its volume may move).
    pub fn is_fenced(self) -> bool {
        matches!(self, Self::Stopped | Self::Terminated)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    pub private_ip: Option<String>,
    pub private_dns: Option<String>,
    pub zone: String,
    pub image_id: String,
    pub instance_type: String,
    pub launched_at_ms: Option<i64>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub id: String,
    pub zone: String,
    pub size_gib: u32,
    pub volume_type: String,
    /// Provisioned IOPS and throughput (MiB/s), as EC2 reports them.
    pub iops: Option<u32>,
    pub throughput_mibps: Option<u32>,
    pub state: VolumeState,
    pub attachments: Vec<Attachment>,
    pub tags: BTreeMap<String, String>,
}

/// What sizes a node of an instance type: its memory and vCPUs, and its network interfaces and
/// addresses per interface, which bound its pods on EKS (the VPC CNI gives each pod an address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceType {
    pub memory_mib: u64,
    pub vcpus: u32,
    pub network_interfaces: u32,
    pub ipv4_per_interface: u32,
}

/// EBS's answer to a second modification of a volume within six hours.
pub const MODIFICATION_RATE_EXCEEDED: &str = "VolumeModificationRateExceeded";

/// What one ModifyVolume changes; unset fields stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeChange {
    pub size_gib: Option<u32>,
    pub iops: Option<u32>,
    pub throughput_mibps: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Creating,
    Available,
    InUse,
    Deleting,
    Deleted,
    Error,
    Unknown,
}

impl VolumeState {
    /// EC2's name for it, as the console and the CLI show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::InUse => "in-use",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Error => "error",
            Self::Unknown => "unknown",
        }
    }

    fn from_ec2(state: Option<&aws_sdk_ec2::types::VolumeState>) -> Self {
        use aws_sdk_ec2::types::VolumeState as S;
        match state {
            Some(S::Creating) => Self::Creating,
            Some(S::Available) => Self::Available,
            Some(S::InUse) => Self::InUse,
            Some(S::Deleting) => Self::Deleting,
            Some(S::Deleted) => Self::Deleted,
            Some(S::Error) => Self::Error,
            _ => Self::Unknown,
        }
    }
}

/// A data volume made from a snapshot: which one, and the size (at least the snapshot's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub snapshot_id: String,
    pub size_gib: u32,
    /// The restore request (`spec.restore.id`) the volume replaces the old one for; None for a
    /// database's first volume.
    pub request: Option<String>,
}

/// An EBS snapshot a database may start from (`spec.volume.fromSnapshot`).
#[derive(Debug, Clone, PartialEq)]
pub struct EbsSnapshot {
    pub id: String,
    pub state: SnapshotState,
    /// The size of the volume it was taken of: EBS makes no smaller volume from it.
    pub volume_size_gib: u32,
    /// When EBS took it (its StartTime).
    pub started: Option<jiff::Timestamp>,
    /// The `spec.snapshot` request it was taken for (its tag), for the database's own.
    pub request: Option<String>,
    /// Kept past its database's deletion (tagged [`keys::RETAINED`]).
    pub retained: bool,
    /// The owner-UID tag ("" for a snapshot the operator did not take).
    pub owner_uid: String,
}

impl EbsSnapshot {
    fn from_ec2(s: &aws_sdk_ec2::types::Snapshot) -> Self {
        let mut tags = tag_map(s.tags());
        Self {
            id: s.snapshot_id().unwrap_or_default().to_string(),
            state: SnapshotState::from_ec2(s.state()),
            volume_size_gib: from_ec2(s.volume_size()).unwrap_or(0),
            started: timestamp(s.start_time()),
            retained: tags.contains_key(keys::RETAINED),
            owner_uid: owner_of_tags_map(&tags),
            request: tags.remove(keys::SNAPSHOT_REQUEST),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
    Unknown,
}

impl SnapshotState {
    fn from_ec2(state: Option<&aws_sdk_ec2::types::SnapshotState>) -> Self {
        use aws_sdk_ec2::types::SnapshotState as S;
        match state {
            Some(S::Pending) => Self::Pending,
            Some(S::Completed) => Self::Completed,
            Some(S::Error) => Self::Error,
            _ => Self::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub instance_id: String,
    pub device: String,
    pub state: AttachmentState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentState {
    Attaching,
    Attached,
    Detaching,
    Detached,
    Busy,
    Unknown,
}

impl AttachmentState {
    /// EC2's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::Detached => "detached",
            Self::Busy => "busy",
            Self::Unknown => "unknown",
        }
    }

    fn from_ec2(state: Option<&aws_sdk_ec2::types::VolumeAttachmentState>) -> Self {
        use aws_sdk_ec2::types::VolumeAttachmentState as S;
        match state {
            Some(S::Attaching) => Self::Attaching,
            Some(S::Attached) => Self::Attached,
            Some(S::Detaching) => Self::Detaching,
            Some(S::Detached) => Self::Detached,
            Some(S::Busy) => Self::Busy,
            _ => Self::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SecurityGroup {
    pub id: String,
    /// The ingress that maps to [`Rule`]s: TCP, one port, IPv4 CIDRs.
    pub rules: Vec<Rule>,
    /// Ingress that cannot be written as [`Rule`]s (port ranges, other protocols, IPv6, group
    /// references): none of it is ours, so it goes as a whole through [`Aws::revoke_foreign`].
    pub foreign: Vec<IpPermission>,
    pub tags: BTreeMap<String, String>,
}

pub struct Launch<'a> {
    pub image_id: &'a str,
    pub instance_type: &'a str,
    pub security_group_id: &'a str,
    /// The plain script; base64-encoded here as RunInstances wants it.
    pub user_data: &'a str,
    /// None lets EC2 choose (a first launch); a replacement names the volume's zone, since a
    /// volume attaches only within its own.
    pub zone: Option<&'a str>,
    pub extra_tags: &'a [(&'a str, &'a str)],
    /// Which launch of the owner's this is ([`launch_token`]): the same number for every try of
    /// one launch, the next for a deliberate new instance.
    pub launch: u32,
}

/// The ClientToken of launch number `launch` of a database: a RunInstances retried with it (after
/// a timeout, in a later pass, by a restarted operator) gets the first instance back from EC2
/// instead of a second one. 36 (uid) + 6 + at most 10 digits stays within EC2's 64 characters.
pub fn launch_token(owner_uid: &str, launch: u32) -> String {
    format!("{owner_uid}-node-{launch}")
}

/// The launch number an instance carries in its tags ([`keys::LAUNCH`]).
pub fn launch_of(i: &Instance) -> Option<u32> {
    i.tags.get(keys::LAUNCH)?.parse().ok()
}

const TCP: &str = "tcp";

/// An AWS time as a timestamp (None when absent or out of range).
fn timestamp(t: Option<&aws_sdk_ec2::primitives::DateTime>) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_millisecond(t?.to_millis().ok()?).ok()
}

pub fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder().name(format!("tag:{key}")).values(value).build()
}

fn tag_spec(resource: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    let tags = tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build());
    TagSpecification::builder().resource_type(resource).set_tags(Some(tags.collect())).build()
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
        .collect()
}

/// The owner-UID tag from a parsed tag map ("" if it has none).
pub fn owner_of_tags_map(tags: &BTreeMap<String, String>) -> String {
    tags.get(keys::OWNER_UID).cloned().unwrap_or_default()
}

/// Oldest launch first.
pub fn sort_by_launch(instances: &mut [Instance]) {
    instances.sort_by(|a, b| (a.launched_at_ms, &a.id).cmp(&(b.launched_at_ms, &b.id)));
}

/// Of one owner's data volumes (with creation times), the one that may hold data: should a crash
/// have left two, the attached one wins, else the oldest.
pub fn pick_volume(mut volumes: Vec<(Option<i64>, Volume)>) -> Option<Volume> {
    // A volume a restore replaced is no longer the data volume, though it keeps its owner tag
    // (cleanup and the orphan sweep still see it as the database's).
    volumes.retain(|(_, v)| !v.tags.contains_key(keys::REPLACED));
    volumes.sort_by_key(|(created, v)| (v.attachments.is_empty(), *created, v.id.clone()));
    volumes.into_iter().next().map(|(_, v)| v)
}

fn to_instance(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    Some(Instance {
        id: i.instance_id()?.to_string(),
        state: InstanceState::from_ec2(i.state().and_then(|s| s.name())),
        private_ip: i.private_ip_address().filter(|s| !s.is_empty()).map(str::to_string),
        private_dns: i.private_dns_name().filter(|s| !s.is_empty()).map(str::to_string),
        zone: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
        image_id: i.image_id().unwrap_or_default().to_string(),
        instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
        launched_at_ms: i.launch_time().and_then(|t| t.to_millis().ok()),
        tags: tag_map(i.tags()),
    })
}

/// A count EC2 reports (its API's i32) as ours; a negative one is no count.
fn from_ec2(n: Option<i32>) -> Option<u32> {
    n.and_then(|n| u32::try_from(n).ok())
}

/// A count of ours as EC2's i32: one that does not fit fails the call before it is sent.
fn to_ec2(op: &'static str, what: &str, n: Option<u32>) -> Result<Option<i32>, AwsError> {
    n.map(|n| i32::try_from(n).map_err(|_| AwsError::unexpected(op, format!("{what} {n} is out of range"))))
        .transpose()
}

fn to_volume(v: &aws_sdk_ec2::types::Volume) -> Option<Volume> {
    Some(Volume {
        id: v.volume_id()?.to_string(),
        zone: v.availability_zone().unwrap_or_default().to_string(),
        size_gib: from_ec2(v.size()).unwrap_or_default(),
        volume_type: v.volume_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
        iops: from_ec2(v.iops()),
        throughput_mibps: from_ec2(v.throughput()),
        state: VolumeState::from_ec2(v.state()),
        attachments: v
            .attachments()
            .iter()
            .map(|a| Attachment {
                instance_id: a.instance_id().unwrap_or_default().to_string(),
                device: a.device().unwrap_or_default().to_string(),
                state: AttachmentState::from_ec2(a.state()),
            })
            .collect(),
        tags: tag_map(v.tags()),
    })
}

/// Splits EC2's ingress permissions into our rules and everything else.
fn to_rules(permissions: &[IpPermission]) -> (Vec<Rule>, Vec<IpPermission>) {
    let mut rules = Vec::new();
    let mut foreign = Vec::new();
    for p in permissions {
        let single_tcp_port = p.ip_protocol() == Some(TCP)
            && p.from_port().is_some()
            && p.from_port() == p.to_port()
            && p.ipv6_ranges().is_empty()
            && p.user_id_group_pairs().is_empty()
            && p.prefix_list_ids().is_empty();
        match p.from_port().and_then(|port| u16::try_from(port).ok()) {
            Some(port) if single_tcp_port => rules.extend(
                p.ip_ranges().iter().filter_map(|r| Some(Rule { port, cidr: r.cidr_ip()?.to_string() })),
            ),
            _ => foreign.push(p.clone()),
        }
    }
    rules.sort();
    rules.dedup();
    (rules, foreign)
}

/// One permission per port, listing its CIDRs: the fewest permissions for the rules.
fn to_permissions(rules: &[Rule]) -> Vec<IpPermission> {
    let mut by_port: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for r in rules {
        by_port.entry(r.port).or_default().push(&r.cidr);
    }
    by_port
        .into_iter()
        .map(|(port, cidrs)| {
            IpPermission::builder()
                .ip_protocol(TCP)
                .from_port(i32::from(port))
                .to_port(i32::from(port))
                .set_ip_ranges(Some(
                    cidrs.into_iter().map(|c| IpRange::builder().cidr_ip(c).build()).collect(),
                ))
                .build()
        })
        .collect()
}

/// The ClientToken of a database's data volume (UIDs are 36 characters; EC2 allows 64).
fn data_volume_token(owner_uid: &str) -> String {
    format!("{owner_uid}-data")
}

/// The ClientToken of the volume a restore makes: one per request, and never the first
/// volume's (EC2 would answer with the volume being replaced). The request is hashed to fit.
fn restore_volume_token(owner_uid: &str, request: &str) -> String {
    format!("{owner_uid}-r-{:016x}", crate::hash::fnv1a64(request.as_bytes()))
}

/// Volumes that still exist (a deleted volume stays visible for a while).
const LIVE_VOLUME_STATES: [aws_sdk_ec2::types::VolumeState; 4] = {
    use aws_sdk_ec2::types::VolumeState as S;
    [S::Creating, S::Available, S::InUse, S::Error]
};

/// Every state but terminated: a shutting-down instance may still write, so fencing must see it.
const LIVE_INSTANCE_STATES: [InstanceStateName; 5] = [
    InstanceStateName::Pending,
    InstanceStateName::Running,
    InstanceStateName::Stopping,
    InstanceStateName::Stopped,
    InstanceStateName::ShuttingDown,
];

impl Aws {
    pub async fn find_security_group(&self, owner_uid: &str) -> Result<Option<SecurityGroup>, AwsError> {
        let groups = self.list_security_groups(vec![tag_filter(keys::OWNER_UID, owner_uid)]).await?;
        if groups.len() > 1 {
            tracing::warn!(owner_uid, "more than one security group carries this owner; using the first");
        }
        Ok(groups.into_iter().next().map(|(_, g)| g))
    }

    /// Security groups matching every filter, each with its owner-UID tag, in EC2's order.
    pub async fn list_security_groups(
        &self,
        filters: Vec<Filter>,
    ) -> Result<Vec<(String, SecurityGroup)>, AwsError> {
        const OP: &str = "DescribeSecurityGroups";
        let req = self.ec2.describe_security_groups().set_filters(Some(filters));
        let mut groups = Vec::new();
        let mut token = None;
        loop {
            let page = req.clone().set_next_token(token);
            let out = self.call(Service::Ec2, OP, || page.clone().send()).await?;
            groups.extend(out.security_groups().iter().filter_map(|g| {
                let (rules, foreign) = to_rules(g.ip_permissions());
                let tags = tag_map(g.tags());
                let owner = owner_of_tags_map(&tags);
                Some((owner, SecurityGroup { id: g.group_id()?.to_string(), rules, foreign, tags }))
            }));
            token = out.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                return Ok(groups);
            }
        }
    }

    /// What everything made for `owner` is tagged with: its own tags and the configured ones.
    /// Whether a node can be launched in `zone`: one of the configured subnets is there (any
    /// zone, when none is configured: EC2 decides).
    pub fn can_place(&self, zone: &str) -> bool {
        self.network.placement(Some(zone), "").is_ok()
    }

    pub fn tags(&self, owner: &Owner) -> Vec<(String, String)> {
        self.network.tags_with(owner.tags())
    }

    /// In the cluster's VPC (the default one when none is configured), tagged at creation. The
    /// group name carries the owner's UID: names are unique per VPC, and a database created again
    /// under its old name must not collide with the old group still being deleted.
    pub async fn create_security_group(&self, owner: &Owner) -> Result<SecurityGroup, AwsError> {
        const OP: &str = "CreateSecurityGroup";
        let req = self
            .ec2
            .create_security_group()
            .group_name(format!("{}-{}", owner.name(), owner.owner_uid))
            .description(format!("QuestDB {}/{} client access", owner.namespace, owner.database))
            .set_vpc_id(self.network.vpc_id.clone())
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, &self.tags(owner)));
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        let id = out.group_id().ok_or_else(|| AwsError::unexpected(OP, "no group id in the reply"))?;
        let tags = self.tags(owner).into_iter().collect();
        Ok(SecurityGroup { id: id.to_string(), rules: Vec::new(), foreign: Vec::new(), tags })
    }

    pub async fn authorize_ingress(&self, group_id: &str, rules: &[Rule]) -> Result<(), AwsError> {
        const OP: &str = "AuthorizeSecurityGroupIngress";
        if rules.is_empty() {
            return Ok(());
        }
        let req = self
            .ec2
            .authorize_security_group_ingress()
            .group_id(group_id)
            .set_ip_permissions(Some(to_permissions(rules)));
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            // One rule already present fails the whole call; add the rest one by one.
            Err(e) if e.code() == Some("InvalidPermission.Duplicate") && rules.len() > 1 => {
                for rule in rules {
                    let req =
                        req.clone().set_ip_permissions(Some(to_permissions(std::slice::from_ref(rule))));
                    match self.call(Service::Ec2, OP, || req.clone().send()).await {
                        Err(e) if e.code() == Some("InvalidPermission.Duplicate") => {}
                        other => {
                            other?;
                        }
                    }
                }
                Ok(())
            }
            Err(e) if e.code() == Some("InvalidPermission.Duplicate") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Rules that are not there (anymore) count as revoked.
    pub async fn revoke_ingress(&self, group_id: &str, rules: &[Rule]) -> Result<(), AwsError> {
        self.revoke(group_id, to_permissions(rules)).await
    }

    /// Revokes the group's [`SecurityGroup::foreign`] ingress.
    pub async fn revoke_foreign(&self, group: &SecurityGroup) -> Result<(), AwsError> {
        self.revoke(&group.id, group.foreign.clone()).await
    }

    async fn revoke(&self, group_id: &str, permissions: Vec<IpPermission>) -> Result<(), AwsError> {
        const OP: &str = "RevokeSecurityGroupIngress";
        if permissions.is_empty() {
            return Ok(());
        }
        let req =
            self.ec2.revoke_security_group_ingress().group_id(group_id).set_ip_permissions(Some(permissions));
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Not found counts as deleted. A group still in use by an instance fails with
    /// `DependencyViolation` until that instance is gone.
    pub async fn delete_security_group(&self, group_id: &str) -> Result<(), AwsError> {
        const OP: &str = "DeleteSecurityGroup";
        let req = self.ec2.delete_security_group().group_id(group_id);
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Every instance tagged with the UID that is not terminated, oldest launch first.
    pub async fn find_instances(&self, owner_uid: &str) -> Result<Vec<Instance>, AwsError> {
        let mut instances = self.list_instances(vec![tag_filter(keys::OWNER_UID, owner_uid)]).await?;
        sort_by_launch(&mut instances);
        Ok(instances)
    }

    /// Instances matching every filter that are not terminated.
    pub async fn list_instances(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, AwsError> {
        const OP: &str = "DescribeInstances";
        let states = Filter::builder()
            .name("instance-state-name")
            .set_values(Some(LIVE_INSTANCE_STATES.iter().map(|s| s.as_str().to_string()).collect()))
            .build();
        let req = self.ec2.describe_instances().set_filters(Some(filters)).filters(states);
        let mut instances = Vec::new();
        let mut token = None;
        loop {
            let page = req.clone().set_next_token(token);
            let out = self.call(Service::Ec2, OP, || page.clone().send()).await?;
            instances.extend(out.reservations().iter().flat_map(|r| r.instances()).filter_map(to_instance));
            token = out.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                return Ok(instances);
            }
        }
    }

    /// Tags the instance, its root volume and its network interface at launch. The data volume is
    /// separate ([`Self::create_volume`]), so the root volume may go with the instance. Launches
    /// into the configured subnet of its zone ([`super::network`]) with IMDSv2 required.
    pub async fn launch_instance(&self, owner: &Owner, launch: &Launch<'_>) -> Result<Instance, AwsError> {
        const OP: &str = "RunInstances";
        let placement = self
            .network
            .placement(launch.zone, &owner.owner_uid)
            .map_err(|e| AwsError::unexpected(OP, e.to_string()))?;
        let mut tags = self.tags(owner);
        tags.push((keys::LAUNCH.into(), launch.launch.to_string()));
        tags.extend(launch.extra_tags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let user_data = crate::build::userdata::encode_user_data(launch.user_data);
        let mut groups = vec![launch.security_group_id.to_string()];
        groups.extend(self.network.extra_security_groups.iter().cloned());
        // Only the instance's own tokens reach IMDS: no IMDSv1 for an SSRF to use.
        let metadata = InstanceMetadataOptionsRequest::builder()
            .http_endpoint(InstanceMetadataEndpointState::Enabled)
            .http_tokens(HttpTokensState::Required)
            .http_put_response_hop_limit(i32::from(self.network.imds_hop_limit))
            .build();
        let profile = self.network.instance_profile.as_deref().map(|p| {
            let spec = IamInstanceProfileSpecification::builder();
            if p.starts_with("arn:") { spec.arn(p) } else { spec.name(p) }.build()
        });
        let req = self
            .ec2
            .run_instances()
            .image_id(launch.image_id)
            .instance_type(launch.instance_type.into())
            .set_security_group_ids(Some(groups))
            .set_subnet_id(placement.subnet)
            .user_data(user_data)
            .min_count(1)
            .max_count(1)
            .set_placement(placement.zone.map(|z| Placement::builder().availability_zone(z).build()))
            .metadata_options(metadata)
            .set_iam_instance_profile(profile)
            .set_ebs_optimized(super::network::ebs_optimized(launch.instance_type))
            .tag_specifications(tag_spec(ResourceType::Instance, &tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &tags))
            .tag_specifications(tag_spec(ResourceType::NetworkInterface, &tags))
            .client_token(launch_token(&owner.owner_uid, launch.launch));
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        out.instances()
            .iter()
            .find_map(to_instance)
            .ok_or_else(|| AwsError::unexpected(OP, "no instance in the reply"))
    }

    /// None when EC2 does not know the id (anymore); a terminated instance is returned as such.
    pub async fn describe_instance(&self, id: &str) -> Result<Option<Instance>, AwsError> {
        const OP: &str = "DescribeInstances";
        let req = self.ec2.describe_instances().instance_ids(id);
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Ok(out) => Ok(out.reservations().iter().flat_map(|r| r.instances()).find_map(to_instance)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The fencing step. `force` for a lost node: a machine that may be unreachable may never
    /// finish a graceful shutdown, and its database is already gone.
    pub async fn stop_instance(&self, id: &str, force: bool) -> Result<(), AwsError> {
        const OP: &str = "StopInstances";
        let req = self.ec2.stop_instances().instance_ids(id).force(force);
        self.call(Service::Ec2, OP, || req.clone().send()).await.map(|_| ())
    }

    /// Not found counts as terminated.
    pub async fn terminate_instance(&self, id: &str) -> Result<(), AwsError> {
        const OP: &str = "TerminateInstances";
        let req = self.ec2.terminate_instances().instance_ids(id);
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The data volume of the owner, ignoring deleted ones (see [`pick_volume`]).
    pub async fn find_volume(&self, owner_uid: &str) -> Result<Option<Volume>, AwsError> {
        let volumes = self.list_volumes(vec![tag_filter(keys::OWNER_UID, owner_uid)]).await?;
        if volumes.len() > 1 {
            tracing::warn!(owner_uid, count = volumes.len(), "more than one data volume carries this owner");
        }
        Ok(pick_volume(volumes))
    }

    /// Every data volume carrying the owner's tag: its data volume and any a restore replaced
    /// and has not let go yet.
    pub async fn owned_volumes(&self, owner_uid: &str) -> Result<Vec<Volume>, AwsError> {
        let volumes = self.list_volumes(vec![tag_filter(keys::OWNER_UID, owner_uid)]).await?;
        Ok(volumes.into_iter().map(|(_, v)| v).collect())
    }

    /// Data volumes matching every filter that still exist, with their creation time.
    pub async fn list_volumes(&self, filters: Vec<Filter>) -> Result<Vec<(Option<i64>, Volume)>, AwsError> {
        const OP: &str = "DescribeVolumes";
        let states = Filter::builder()
            .name("status")
            .set_values(Some(LIVE_VOLUME_STATES.iter().map(|s| s.as_str().to_string()).collect()))
            .build();
        let req = self
            .ec2
            .describe_volumes()
            .set_filters(Some(filters))
            .filters(tag_filter(ROLE, ROLE_DATA))
            .filters(states);
        let mut volumes = Vec::new();
        let mut token = None;
        loop {
            let page = req.clone().set_next_token(token);
            let out = self.call(Service::Ec2, OP, || page.clone().send()).await?;
            volumes.extend(
                out.volumes()
                    .iter()
                    .filter_map(|v| Some((v.create_time().and_then(|t| t.to_millis().ok()), to_volume(v)?))),
            );
            token = out.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                return Ok(volumes);
            }
        }
    }

    /// Encrypted, tagged as the owner's data volume at creation, with the spec's size, type and
    /// provisioned performance (unset: EC2's defaults for the type).
    pub async fn create_volume(
        &self,
        owner: &Owner,
        zone: &str,
        want: &VolumeSpec,
        from: Option<&Restore>,
    ) -> Result<Volume, AwsError> {
        const OP: &str = "CreateVolume";
        let size_gib = from.map_or(want.size_gib, |r| r.size_gib);
        let volume_type = want.type_.as_str();
        let size = to_ec2(OP, "size (GiB)", Some(size_gib))?;
        let mut tags = self.tags(owner);
        tags.push((ROLE.into(), ROLE_DATA.into()));
        let req = self
            .ec2
            .create_volume()
            .availability_zone(zone)
            .set_size(size)
            .volume_type(volume_type.into())
            .set_iops(to_ec2(OP, "iops", want.iops)?)
            .set_throughput(to_ec2(OP, "throughput (MiB/s)", want.throughput_mibps)?)
            .encrypted(true)
            .set_snapshot_id(from.map(|r| r.snapshot_id.clone()))
            .tag_specifications(tag_spec(ResourceType::Volume, &tags))
            // A database has one data volume per restore: the same token for every try, so a
            // create that timed out and is tried again (in a later pass) cannot make a second.
            .client_token(match from.and_then(|r| r.request.as_deref()) {
                Some(request) => restore_volume_token(&owner.owner_uid, request),
                None => data_volume_token(&owner.owner_uid),
            });
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        let id = out.volume_id().ok_or_else(|| AwsError::unexpected(OP, "no volume id in the reply"))?;
        Ok(Volume {
            id: id.to_string(),
            zone: out.availability_zone().unwrap_or(zone).to_string(),
            size_gib: from_ec2(out.size()).unwrap_or(size_gib),
            volume_type: out.volume_type().map_or(volume_type, |t| t.as_str()).to_string(),
            iops: from_ec2(out.iops()).or(want.iops),
            throughput_mibps: from_ec2(out.throughput()).or(want.throughput_mibps),
            state: out.state().map_or(VolumeState::Creating, |s| VolumeState::from_ec2(Some(s))),
            attachments: Vec::new(),
            tags: if out.tags().is_empty() { tags.into_iter().collect() } else { tag_map(out.tags()) },
        })
    }

    /// The snapshot `id` if EC2 lists it among the cluster's (tagged with `cluster`), else None:
    /// a database starts only from its own cluster's snapshots (the IAM policy says the same).
    pub async fn find_snapshot(&self, id: &str, cluster: &str) -> Result<Option<EbsSnapshot>, AwsError> {
        const OP: &str = "DescribeSnapshots";
        let by_id = Filter::builder().name("snapshot-id").values(id).build();
        // The account's own: without an owner, EC2 also searches every public snapshot.
        let req = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(by_id)
            .filters(tag_filter(keys::CLUSTER, cluster));
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        Ok(out.snapshots().iter().find(|s| s.snapshot_id() == Some(id)).map(EbsSnapshot::from_ec2))
    }

    /// The database's own snapshots (tagged with its UID), as EC2 lists them now.
    pub async fn owned_snapshots(&self, owner: &Owner) -> Result<Vec<EbsSnapshot>, AwsError> {
        const OP: &str = "DescribeSnapshots";
        let req = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag_filter(keys::CLUSTER, &owner.cluster))
            .filters(tag_filter(keys::OWNER_UID, &owner.owner_uid));
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        Ok(out.snapshots().iter().map(EbsSnapshot::from_ec2).collect())
    }

    /// The snapshots tagged for `cluster` (and `namespace`, for an operator that watches one):
    /// what the orphan sweep looks through.
    pub async fn cluster_snapshots(
        &self,
        cluster: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<EbsSnapshot>, AwsError> {
        const OP: &str = "DescribeSnapshots";
        let mut req =
            self.ec2.describe_snapshots().owner_ids("self").filters(tag_filter(keys::CLUSTER, cluster));
        if let Some(ns) = namespace {
            req = req.filters(tag_filter(keys::NAMESPACE, ns));
        }
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        Ok(out.snapshots().iter().map(EbsSnapshot::from_ec2).collect())
    }

    /// Starts a snapshot of `volume_id` for the request `request`, tagged at creation (the
    /// database's tags and the request), so that it is found again by tag: CreateSnapshot takes
    /// no ClientToken, and a retry after a lost answer must not take a second one.
    pub async fn create_snapshot(
        &self,
        owner: &Owner,
        volume_id: &str,
        request: &str,
        label: Option<&str>,
    ) -> Result<EbsSnapshot, AwsError> {
        const OP: &str = "CreateSnapshot";
        let mut tags = self.tags(owner);
        tags.push((keys::SNAPSHOT_REQUEST.to_string(), request.to_string()));
        let description =
            format!("QuestDB {}/{}: {}", owner.namespace, owner.database, label.unwrap_or(request));
        let req = self
            .ec2
            .create_snapshot()
            .volume_id(volume_id)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Snapshot, &tags));
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        Ok(EbsSnapshot {
            id: out.snapshot_id().unwrap_or_default().to_string(),
            state: SnapshotState::from_ec2(out.state()),
            volume_size_gib: from_ec2(out.volume_size()).unwrap_or(0),
            started: timestamp(out.start_time()),
            request: Some(request.to_string()),
            retained: false,
            owner_uid: owner.owner_uid.clone(),
        })
    }

    /// Tags an existing resource: `tags` set (replacing their values), the `remove` keys deleted.
    /// Marks (a kept volume) and take-overs (a kept or adopted resource); the tags a resource is
    /// found by are otherwise set at creation (see the module docs).
    pub async fn retag(&self, id: &str, tags: &[(String, String)], remove: &[&str]) -> Result<(), AwsError> {
        const OP: &str = "CreateTags";
        let set: Vec<Tag> = tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
        let req = self.ec2.create_tags().resources(id).set_tags(Some(set));
        self.call(Service::Ec2, OP, || req.clone().send()).await?;
        if !remove.is_empty() {
            const DELETE: &str = "DeleteTags";
            let keys: Vec<Tag> = remove.iter().map(|k| Tag::builder().key(*k).build()).collect();
            let req = self.ec2.delete_tags().resources(id).set_tags(Some(keys));
            self.call(Service::Ec2, DELETE, || req.clone().send()).await?;
        }
        Ok(())
    }

    /// Grows the volume and changes its provisioned performance, in one call: EBS allows one
    /// modification per volume every six hours (a second is refused with
    /// [`MODIFICATION_RATE_EXCEEDED`]). The filesystem is grown on the node.
    pub async fn modify_volume(&self, volume_id: &str, change: &VolumeChange) -> Result<(), AwsError> {
        const OP: &str = "ModifyVolume";
        let req = self
            .ec2
            .modify_volume()
            .volume_id(volume_id)
            .set_size(to_ec2(OP, "size (GiB)", change.size_gib)?)
            .set_iops(to_ec2(OP, "iops", change.iops)?)
            .set_throughput(to_ec2(OP, "throughput (MiB/s)", change.throughput_mibps)?);
        self.call(Service::Ec2, OP, || req.clone().send()).await.map(|_| ())
    }

    /// When the volume's latest modification started, if it had one (EBS allows the next one
    /// six hours after).
    pub async fn last_modification(&self, volume_id: &str) -> Result<Option<jiff::Timestamp>, AwsError> {
        const OP: &str = "DescribeVolumesModifications";
        let req = self.ec2.describe_volumes_modifications().volume_ids(volume_id);
        let out = self.call(Service::Ec2, OP, || req.clone().send()).await?;
        Ok(out.volumes_modifications().iter().filter_map(|m| timestamp(m.start_time())).max())
    }

    /// What EC2 says sizes an instance type (memory, vCPUs, network interfaces); None for a
    /// type it does not know.
    pub async fn describe_instance_type(&self, name: &str) -> Result<Option<InstanceType>, AwsError> {
        const OP: &str = "DescribeInstanceTypes";
        let req = self.ec2.describe_instance_types().instance_types(name.into());
        let out = match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Err(e) if e.code() == Some("InvalidInstanceType") => return Ok(None),
            other => other?,
        };
        let count = |n: Option<i32>| n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        Ok(out.instance_types().first().map(|t| InstanceType {
            memory_mib: t
                .memory_info()
                .and_then(|m| m.size_in_mib())
                .and_then(|m| u64::try_from(m).ok())
                .unwrap_or(0),
            vcpus: count(t.v_cpu_info().and_then(|v| v.default_v_cpus())),
            network_interfaces: count(t.network_info().and_then(|n| n.maximum_network_interfaces())),
            ipv4_per_interface: count(t.network_info().and_then(|n| n.ipv4_addresses_per_interface())),
        }))
    }

    /// Not found counts as deleted.
    pub async fn delete_volume(&self, volume_id: &str) -> Result<(), AwsError> {
        const OP: &str = "DeleteVolume";
        let req = self.ec2.delete_volume().volume_id(volume_id);
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Deletes a snapshot; one already gone counts as deleted.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AwsError> {
        const OP: &str = "DeleteSnapshot";
        let req = self.ec2.delete_snapshot().snapshot_id(snapshot_id);
        match self.call(Service::Ec2, OP, || req.clone().send()).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{Ipv6Range, UserIdGroupPair};

    fn rule(port: u16, cidr: &str) -> Rule {
        Rule { port, cidr: cidr.into() }
    }

    #[test]
    fn counts_cross_the_api_only_when_they_fit() {
        assert_eq!(from_ec2(Some(3000)), Some(3000));
        assert_eq!(from_ec2(Some(-1)), None);
        assert_eq!(to_ec2("ModifyVolume", "iops", Some(16_000)).unwrap(), Some(16_000));
        assert_eq!(to_ec2("ModifyVolume", "iops", None).unwrap(), None);
        let err = to_ec2("ModifyVolume", "iops", Some(u32::MAX)).unwrap_err();
        assert!(err.to_string().contains("iops 4294967295 is out of range"), "{err}");
    }

    #[test]
    fn state_mapping() {
        use InstanceStateName as N;
        let cases = [
            (N::Pending, InstanceState::Pending),
            (N::Running, InstanceState::Running),
            (N::Stopping, InstanceState::Stopping),
            (N::Stopped, InstanceState::Stopped),
            (N::ShuttingDown, InstanceState::ShuttingDown),
            (N::Terminated, InstanceState::Terminated),
            (N::from("rebooting"), InstanceState::Unknown),
        ];
        for (ec2, ours) in cases {
            assert_eq!(InstanceState::from_ec2(Some(&ec2)), ours, "{ec2:?}");
        }
        assert_eq!(InstanceState::from_ec2(None), InstanceState::Unknown);
        assert!(InstanceState::Stopped.is_fenced() && InstanceState::Terminated.is_fenced());
        assert!(!InstanceState::Stopping.is_fenced() && !InstanceState::ShuttingDown.is_fenced());
    }

    #[test]
    fn rules_round_trip_through_permissions() {
        let rules = vec![rule(8812, "10.0.0.0/8"), rule(9000, "10.0.0.0/8"), rule(9000, "203.0.113.0/24")];
        let permissions = to_permissions(&rules);
        assert_eq!(permissions.len(), 2, "one permission per port");
        assert_eq!(to_rules(&permissions), (rules, vec![]));
    }

    #[test]
    fn what_rules_cannot_express_is_foreign() {
        let range = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(0)
            .to_port(65535)
            .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
            .build();
        let all = IpPermission::builder()
            .ip_protocol("-1")
            .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
            .build();
        let v6 = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(9000)
            .to_port(9000)
            .ipv6_ranges(Ipv6Range::builder().cidr_ipv6("::/0").build())
            .build();
        let group = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(22)
            .to_port(22)
            .user_id_group_pairs(UserIdGroupPair::builder().group_id("sg-1").build())
            .build();
        let mut permissions = vec![range, all, v6, group];
        let foreign = permissions.clone();
        permissions.extend(to_permissions(&[rule(9009, "1.2.3.4/32")]));
        assert_eq!(to_rules(&permissions), (vec![rule(9009, "1.2.3.4/32")], foreign));
    }

    #[test]
    fn owner_tags() {
        let owner = Owner {
            cluster: "region-a".into(),
            namespace: "questdb".into(),
            database: "db-7f3a".into(),
            owner_uid: "6f1c2b4e-0000-4000-8000-000000000001".into(),
        };
        let tags: BTreeMap<_, _> = owner.tags().into_iter().collect();
        assert_eq!(tags["Name"], "qdb-questdb-db-7f3a");
        assert_eq!(tags[keys::CLUSTER], "region-a");
        assert_eq!(tags[keys::OWNER_UID], owner.owner_uid);
        assert_eq!(tags[keys::DATABASE], "db-7f3a");
        assert_eq!(tags[keys::NAMESPACE], "questdb");
        assert!(launch_token(&owner.owner_uid, u32::MAX).len() <= 64);
        assert_eq!(launch_token("u", 0), "u-node-0");
    }
}
