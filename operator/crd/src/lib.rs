//! The `QuestDB` custom resource (`questdbs.cloud.questdb.io`, short name `qdb`): one object is
//! the canonical state of one customer database. The provisioner owns `spec` (its own field
//! manager); the operator owns `status`.
//!
//! The CRD's OpenAPI schema is generated from these types (`crdgen`), so the apiserver itself
//! rejects malformed specs; [`validate`] repeats the checks a schema cannot express well, for the
//! provisioner (before it writes) and the operator (before it acts).

pub mod common;
pub mod cron;
mod validate;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use common::{WATCH_SECS, error_chain, process_identity, watch_read_timeout};
pub use validate::{SpecError, is_dns_label, validate, volume_performance};

/// Labels, annotations and tags shared by the provisioner and the operator.
pub mod keys {
    /// Label (and AWS tag) naming the database an object belongs to.
    pub const DATABASE: &str = "cloud.questdb.io/database";
    /// AWS tag naming the cluster a resource belongs to.
    pub const CLUSTER: &str = "cloud.questdb.io/cluster";
    /// AWS tag naming the namespace of the owning resource: an operator watching one namespace
    /// sweeps only that namespace's orphans.
    pub const NAMESPACE: &str = "cloud.questdb.io/namespace";
    /// AWS tag on an instance: which launch of its database it is (the counter in its
    /// ClientToken).
    pub const LAUNCH: &str = "cloud.questdb.io/launch";
    /// AWS tag on a data volume its database's deletion kept (reclaim policy Retain): the orphan
    /// sweep leaves it alone.
    pub const RETAINED: &str = "cloud.questdb.io/retained";
    /// AWS tag on a data volume a restore replaced (value: the restore request): no longer the
    /// database's data volume, kept until the restored database is Ready, then deleted or, with
    /// reclaim policy Retain, kept ([`RETAINED`]).
    pub const REPLACED: &str = "cloud.questdb.io/replaced-by-restore";
    /// AWS tag on a snapshot: the request (`spec.snapshot.id`) it was taken for, so a snapshot
    /// whose create outlived the operator is found again instead of taken twice.
    pub const SNAPSHOT_REQUEST: &str = "cloud.questdb.io/snapshot-request";
    /// AWS tag with the owning QuestDB resource's UID.
    pub const OWNER_UID: &str = "cloud.questdb.io/owner-uid";
    /// Taint key of a database's dedicated node.
    pub const DEDICATED: &str = "cloud.questdb.io/dedicated";
    /// Annotation: the instruction id the spec reflects (written by the provisioner).
    pub const INSTRUCTION_ID: &str = "cloud.questdb.io/instruction-id";
    /// Annotation: that instruction's per-database sequence number.
    pub const INSTRUCTION_SEQUENCE: &str = "cloud.questdb.io/instruction-sequence";
    /// Label set on every object the operator manages.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
}

/// Field manager of the provisioner (spec).
pub const PROVISIONER_MANAGER: &str = "qdb-provisioner";
/// Field manager of the operator (status and children).
pub const OPERATOR_MANAGER: &str = "qdb-operator";

/// Desired state of one QuestDB database.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloud.questdb.io",
    version = "v1",
    kind = "QuestDB",
    plural = "questdbs",
    shortname = "qdb",
    category = "questdb",
    namespaced,
    status = "QuestDBStatus",
    derive = "PartialEq",
    doc = "One customer's QuestDB database: spec is the desired state (written by the provisioner), status what the operator observed.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
    printcolumn = r#"{"name":"Instance","type":"string","jsonPath":".spec.instanceType"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node.name"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoints.http"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.allowVersionDowngrade) && self.allowVersionDowngrade) || !isSemver(self.version) || !isSemver(oldSelf.version) || !semver(self.version).isLessThan(semver(oldSelf.version))",
    "messageExpression": "'version ' + self.version + ' is older than ' + oldSelf.version + ': a rollback must set allowVersionDowngrade'",
    "reason": "FieldValueForbidden",
    "fieldPath": ".version",
}]))]
pub struct QuestDBSpec {
    /// QuestDB release, e.g. "8.2.1" (the container image tag).
    // The length bound keeps the CEL rule's cost estimate within the apiserver's budget.
    #[schemars(regex(pattern = r"^[0-9]+\.[0-9]+\.[0-9]+$"), length(max = 32))]
    pub version: String,
    /// This spec's version may be older than the one before it: a deliberate rollback. Without
    /// it the apiserver refuses a downgrade.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_version_downgrade: bool,
    /// EC2 instance type of the dedicated node, e.g. "m6i.xlarge".
    #[schemars(regex(pattern = r"^[a-z][a-z0-9-]*\.[a-z0-9]+$"))]
    pub instance_type: String,
    /// Machine image (AMI) of the dedicated node; changing it replaces the node.
    #[schemars(regex(pattern = r"^ami-[0-9a-f]{8,17}$"))]
    pub node_image: String,
    pub volume: VolumeSpec,
    /// server.conf key/values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub server_config: BTreeMap<String, String>,
    /// Scale to zero and release the node; volume, security group and data are kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Changing this value restarts the database once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_token: Option<String>,
    #[serde(default)]
    pub network: NetworkSpec,
    /// Take over a running database another provisioner built: its EC2 instance, volume and
    /// security group are tagged as this database's and its Kubernetes objects (labelled
    /// `cloud.questdb.io/database=<name>`) get owner references; nothing else changes, so the
    /// database keeps running. The spec must state what runs (instance type, image, volume
    /// size and type); the first later change goes the ordinary way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<AdoptSpec>,
    /// Take one snapshot of the data volume: a new `id` asks for a new one (the provisioner uses
    /// the instruction id). `status.snapshots` lists it, with this id as its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRequest>,
    /// Put the database back to one of its snapshots, in place or in another zone: a new `id`
    /// asks for a new restore (the provisioner uses the instruction id). The database stops, its
    /// volume is replaced by one made from the snapshot (the old one is kept until the restored
    /// database is Ready, then follows the reclaim policy), and it starts again on a new node.
    /// `status.restore` shows the step, `status.lastRestore` the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreRequest>,
    /// What becomes of the database's snapshots.
    #[serde(default, skip_serializing_if = "SnapshotPolicy::is_default")]
    pub snapshot_policy: SnapshotPolicy,
}

/// The database's snapshots' lifecycle (see `QuestDBSpec::snapshot_policy`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPolicy {
    /// On deletion: Retain (the default) keeps them, tagged `cloud.questdb.io/retained` so the
    /// orphan sweep leaves them, for a later create to start from; Delete removes them.
    #[serde(default = "retain")]
    pub reclaim_policy: ReclaimPolicy,
    /// How many of the operator's snapshots to keep: the oldest beyond this count are deleted
    /// once newer ones completed. Unset: every snapshot is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: Option<u32>,
    /// Take a snapshot on this schedule: five cron fields (minute hour day-of-month month
    /// day-of-week), in UTC, e.g. "0 3 * * *". A schedule missed while the operator was away is
    /// caught up with one snapshot, not one per missed time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), regex(pattern = r"^[0-9*,/-]+( +[0-9*,/-]+){4}$"))]
    pub schedule: Option<String>,
    /// Before a change of the node image, QuestDB version, instance type or volume type starts,
    /// take a snapshot and wait until EBS completed it (on by default): the point to go back to.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub before_changes: bool,
}

fn retain() -> ReclaimPolicy {
    ReclaimPolicy::Retain
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self { reclaim_policy: retain(), keep: None, schedule: None, before_changes: true }
    }
}

impl SnapshotPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The request id of the safety snapshot taken before the risky change of spec generation
/// `generation` (`SnapshotReason::BeforeChange`): the operator asks for it, the provisioner finds
/// it for the instruction that made that generation.
pub fn safety_request(generation: i64) -> String {
    format!("before-g{generation}")
}

const SCHEDULED_FORMAT: &str = "scheduled-%Y%m%dT%H%MZ";

/// The request id of the scheduled snapshot due at `fire` (`SnapshotReason::Scheduled`).
pub fn scheduled_request(fire: jiff::Timestamp) -> String {
    fire.strftime(SCHEDULED_FORMAT).to_string()
}

/// The time a scheduled snapshot's request id names (None: not such an id).
pub fn scheduled_fire(request: &str) -> Option<jiff::Timestamp> {
    let at = jiff::civil::DateTime::strptime(SCHEDULED_FORMAT, request).ok()?;
    jiff::tz::TimeZone::UTC.to_timestamp(at).ok()
}

/// The part of the spec whose change is risky (a new node, a new QuestDB, a volume migration),
/// as the operator last let it through: see `QuestDBStatus::admitted`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Admitted {
    pub version: String,
    pub node_image: String,
    pub instance_type: String,
    pub volume_type: VolumeType,
    /// Held along with the volume type: they are valid only for their type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_iops: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_throughput_mibps: Option<u32>,
}

impl Admitted {
    pub fn of(spec: &QuestDBSpec) -> Self {
        Admitted {
            version: spec.version.clone(),
            node_image: spec.node_image.clone(),
            instance_type: spec.instance_type.clone(),
            volume_type: spec.volume.type_,
            volume_iops: spec.volume.iops,
            volume_throughput_mibps: spec.volume.throughput_mibps,
        }
    }

    /// What changes from `self` to `to` that a safety snapshot must precede, in words
    /// (empty: nothing risky; IOPS and throughput alone change in place).
    pub fn risky_changes(&self, to: &Admitted) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |what: &str, a: &str, b: &str| {
            if a != b {
                out.push(format!("{what} {a} -> {b}"));
            }
        };
        diff("node image", &self.node_image, &to.node_image);
        diff("version", &self.version, &to.version);
        diff("instance type", &self.instance_type, &to.instance_type);
        diff("volume type", self.volume_type.as_str(), to.volume_type.as_str());
        out
    }

    /// `spec` with this part in place of its own: the change held back.
    pub fn hold(&self, spec: &mut QuestDBSpec) {
        spec.version = self.version.clone();
        spec.node_image = self.node_image.clone();
        spec.instance_type = self.instance_type.clone();
        spec.volume.type_ = self.volume_type;
        spec.volume.iops = self.volume_iops;
        spec.volume.throughput_mibps = self.volume_throughput_mibps;
    }
}

/// An on-demand snapshot (see `QuestDBSpec::snapshot`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRequest {
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// Free text kept with the snapshot (its status entry and a tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub label: Option<String>,
}

/// A restore (see `QuestDBSpec::restore`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRequest {
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// The EBS snapshot to restore: one of this cluster's, completed.
    #[schemars(regex(pattern = r"^snap-[0-9a-f]{8,17}$"))]
    pub snapshot: String,
    /// The availability zone to restore into (a zone move, e.g. out of a zone that is down).
    /// Unset: the zone the volume is in now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub zone: Option<String>,
}

/// The AWS resources of a running database to take over (see `QuestDBSpec::adopt`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdoptSpec {
    #[schemars(regex(pattern = r"^i-[0-9a-f]{8,17}$"))]
    pub instance_id: String,
    #[schemars(regex(pattern = r"^vol-[0-9a-f]{8,17}$"))]
    pub volume_id: String,
    #[schemars(regex(pattern = r"^sg-[0-9a-f]{8,17}$"))]
    pub security_group_id: String,
}

/// The apiserver itself refuses a shrink (a CEL transition rule), whoever writes the spec: EBS
/// volumes and their filesystems only grow. Likewise the snapshot a database started from: its
/// volume's create is retried under one ClientToken, which EC2 answers with an error if the
/// parameters changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.sizeGib >= oldSelf.sizeGib",
    "message": "volume.sizeGib can only grow",
    "reason": "FieldValueForbidden",
}, {
    "rule": "has(self.fromSnapshot) == has(oldSelf.fromSnapshot) && (!has(self.fromSnapshot) || self.fromSnapshot == oldSelf.fromSnapshot)",
    "message": "volume.fromSnapshot cannot change",
    "reason": "FieldValueForbidden",
}]))]
pub struct VolumeSpec {
    /// Size of the EBS data volume in GiB; it can only grow.
    #[schemars(range(min = 1, max = 16384))]
    pub size_gib: u32,
    #[serde(rename = "type")]
    pub type_: VolumeType,
    /// Provisioned IOPS: gp3 3000-16000 (at most 500 per GiB; unset means 3000), io2 100-256000
    /// (at most 1000 per GiB; required), none for gp2. Changed in place, without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 256000))]
    pub iops: Option<u32>,
    /// Provisioned throughput in MiB/s, gp3 only: 125-1000, at most 0.25 per IOPS (unset means 125).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 125, max = 1000))]
    pub throughput_mibps: Option<u32>,
    /// What happens to the volume when the database is deleted.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    /// Start from this EBS volume, with its data, instead of a new empty one: a volume of this
    /// cluster that a deleted database kept (reclaim policy Retain). Read once, while the
    /// database has no volume yet; the node goes to the volume's zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^vol-[0-9a-f]{8,17}$"))]
    pub from_volume: Option<String>,
    /// Start from this EBS snapshot of the cluster, with its data, instead of an empty volume
    /// (a clone, or a database brought back from its snapshot): read while the database has no
    /// volume yet; the new volume is at least the snapshot's size, in the zone the node launches
    /// in. It cannot change once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^snap-[0-9a-f]{8,17}$"))]
    pub from_snapshot: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    Gp3,
    Gp2,
    Io2,
}

impl VolumeType {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeType::Gp3 => "gp3",
            VolumeType::Gp2 => "gp2",
            VolumeType::Io2 => "io2",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReclaimPolicy {
    #[default]
    Delete,
    Retain,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Client networks allowed to reach the database (IPv4 CIDRs); empty = closed.
    #[serde(default)]
    #[schemars(inner(regex(pattern = r"^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$")))]
    pub allowed_cidrs: Vec<String>,
    /// Public DNS name of the database; defaults to `<name>.<namespace>.<operator's zone>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"))]
    pub dns_name: Option<String>,
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuestDBStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, Progressing, Degraded, Paused, NodeReady, VolumeReady, DnsReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The instruction id (annotation) of the spec generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_instruction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverStatus>,
    /// A node replacement under way (failover, node image or instance type change): the step it
    /// reached, so an operator restarted at any point resumes there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<ReplacementStatus>,
    /// Instances launched for this database so far. Launch number n carries the ClientToken
    /// `<uid>-node-<n>`: a launch retried after a timeout reuses it (EC2 answers with the first
    /// instance), a deliberate new one (a replacement) takes the next number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launches: Option<u32>,
    /// When this operator last created something in AWS for this database: cleanup trusts a
    /// "nothing left" listing only once it is an eventual-consistency window newer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_aws_create: Option<Time>,
    /// When this operator last launched an instance for the database: within EC2's listing lag
    /// after it, the last launch not listed yet is tried again under its own ClientToken rather
    /// than a second instance started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_launch: Option<Time>,
    /// The spec generation at which the operator took over the running database `spec.adopt`
    /// names. While the spec stays at it, the adopted objects are kept as they are (owner
    /// references added, nothing else); the next change of the spec goes the ordinary way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_generation: Option<i64>,
    /// The database's snapshots, oldest first (written by the operator's snapshot step under its
    /// own field manager).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotStatus>,
    /// A `CHECKPOINT CREATE` may be in effect on the database for this request: recorded before
    /// the statement runs, cleared after `CHECKPOINT RELEASE`, so an operator restarted at any
    /// point in between still releases it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,
    /// The node image, version, instance type and volume type the operator last let through.
    /// A spec that differs in one of them waits, with this part held, until its safety snapshot
    /// completed (`spec.snapshotPolicy.beforeChanges`). Written with `snapshots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted: Option<Admitted>,
    /// A restore under way (`spec.restore`): the step it reached, so an operator restarted at any
    /// point goes on from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// The last restore's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore: Option<RestoreOutcome>,
    /// The snapshot the data volume was made from by the last restore that completed: QuestDB
    /// runs with it as its snapshot instance id for the volume's life (a refused restore later
    /// does not change it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// The EBS snapshot id (`snap-...`).
    pub id: String,
    /// The `spec.snapshot.id` it was taken for.
    pub request: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// When EBS took it: the data is the database's at this moment (at its checkpoint, if
    /// consistent).
    pub taken_at: Time,
    pub size_gib: u32,
    pub state: SnapshotPhase,
    pub consistency: Consistency,
    pub reason: SnapshotReason,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotPhase {
    /// EBS is still copying; no volume can be made from it yet.
    Pending,
    Completed,
    /// EBS failed it: it holds nothing usable.
    Error,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Consistency {
    /// Taken under `CHECKPOINT CREATE`: a database made from it recovers exactly the checkpoint.
    Consistent,
    /// Taken while the database was not serving (paused, stopped, failing): what the device held,
    /// as after a power cut; QuestDB replays its own write-ahead state at start.
    CrashConsistent,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotReason {
    /// Asked for by `spec.snapshot` (a Snapshot instruction).
    OnDemand,
    /// Due by `spec.snapshotPolicy.schedule`.
    Scheduled,
    /// Taken before a risky change started (`spec.snapshotPolicy.beforeChanges`); its label
    /// names the change.
    BeforeChange,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    pub request: String,
    pub since: Time,
}

impl QuestDB {
    /// Whether the reconcile only takes over what runs (see `QuestDBStatus::adopted_generation`):
    /// the spec adopts and has not changed since the adoption, if it happened yet.
    pub fn adopting(&self) -> bool {
        let adopted = self.status.as_ref().and_then(|s| s.adopted_generation);
        self.spec.adopt.is_some() && adopted.is_none_or(|g| Some(g) == self.metadata.generation)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Building the node, volume and workload for the first time.
    Provisioning,
    /// Serving and Ready.
    Running,
    /// Applying a spec change (version, config, restart, volume size).
    Updating,
    /// Moving to a new node (failover, image upgrade, instance type change).
    Replacing,
    /// No compute runs; the volume is kept.
    Paused,
    /// Cannot make progress without a change (invalid spec, repeated AWS failure).
    Failed,
    /// Deleted; the finalizer is removing what the database had in AWS and the cluster.
    Deleting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provisioning => "Provisioning",
            Phase::Running => "Running",
            Phase::Updating => "Updating",
            Phase::Replacing => "Replacing",
            Phase::Paused => "Paused",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    pub image: String,
    pub instance_type: String,
    pub zone: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub id: String,
    pub size_gib: u32,
    pub zone: String,
    /// A volume change waits for EBS's six hours since the last modification: when it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modifiable_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsStatus {
    /// The record's name.
    pub name: String,
    /// The address it points at.
    pub target: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Web console and REST API (9000).
    pub http: String,
    /// PostgreSQL wire protocol (8812).
    pub pgwire: String,
    /// InfluxDB line protocol (9009).
    pub ilp: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    pub at: Time,
    pub reason: String,
    pub from_node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_node: Option<String>,
    /// When the database was Ready again; minus `at` is the time to recover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The `spec.restore.id` it runs for.
    pub request: String,
    pub snapshot: String,
    /// The zone the new volume and node go to.
    pub zone: String,
    pub step: RestoreStep,
    /// The volume the database ran on before: untagged as its data volume once it is free, kept
    /// until the restored database is Ready.
    pub old_volume: String,
    pub started_at: Time,
    /// When EBS took the snapshot: the data comes back as of then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_taken_at: Option<Time>,
}

/// The steps of a restore, in their fixed order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestoreStep {
    /// The database is stopped and its node released, as for a pause, until EC2 shows the old
    /// volume free: nothing can write to it any more.
    Stopping,
    /// The old volume is no longer the database's; a volume made from the snapshot in the zone,
    /// a node there, and the database starting with QuestDB's checkpoint recovery.
    Starting,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreOutcome {
    pub request: String,
    pub snapshot: String,
    /// Set when the restore was refused before anything stopped (the snapshot does not exist, is
    /// not completed, or belongs to another cluster): the database runs on as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The volume made from the snapshot, and its zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// When EBS took the snapshot: the data is the database's as of then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_taken_at: Option<Time>,
    /// When the restored database was Ready (or the restore refused).
    pub at: Time,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplacementStatus {
    /// The instance being replaced.
    pub from_instance: String,
    /// The instance that takes over.
    pub to_instance: String,
    pub why: ReplaceWhy,
    pub reason: String,
    pub step: ReplaceStep,
    pub started_at: Time,
    /// When EC2 confirmed the old instance stopped or terminated: from then on nothing else can
    /// write to the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReplaceWhy {
    /// The node is lost: no time to drain.
    Failover,
    /// Node image or instance type changed: drained first, within the replacement budget.
    Upgrade,
}

/// The reason of the `Degraded` condition. With phase `Failed` it names a problem that retrying
/// cannot cure (the provisioner reports it as the instruction's failure reason); otherwise the
/// database is still being worked on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DegradedReason {
    /// Every step succeeded.
    Healthy,
    /// A step failed in a way a retry may cure; retried with backoff.
    StepFailed,
    /// The spec cannot be reconciled (the operator's own checks).
    InvalidSpec,
    /// EC2 does not know the node image (InvalidAMIID.*).
    ImageNotFound,
    /// The node cannot pull the database's QuestDB image (the kubelet's ImagePullBackOff,
    /// ErrImagePull, InvalidImageName): no such release.
    ImagePullFailed,
    /// The operator's AWS identity may not do what the database needs (UnauthorizedOperation,
    /// AuthFailure, OptInRequired, Blocked).
    Unauthorized,
    /// EC2 has no capacity for the instance type in the zone, still after retries.
    InsufficientCapacity,
    /// An account limit (instances, vCPUs, volumes, security groups) is reached.
    QuotaExceeded,
    /// EC2 refuses the request as given (an instance type or parameter it does not support).
    InvalidRequest,
    /// Failover of this database is held back: too many of its zone's database nodes are not
    /// Ready at once (a zone-wide blip, not a lost machine).
    FailoverHeld,
    /// The running database `spec.adopt` names cannot be taken over as it is: another database
    /// owns a part of it, it is not running, or it is not what the spec says.
    AdoptionRefused,
}

impl DegradedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::StepFailed => "StepFailed",
            Self::InvalidSpec => "InvalidSpec",
            Self::ImageNotFound => "ImageNotFound",
            Self::ImagePullFailed => "ImagePullFailed",
            Self::Unauthorized => "Unauthorized",
            Self::InsufficientCapacity => "InsufficientCapacity",
            Self::QuotaExceeded => "QuotaExceeded",
            Self::InvalidRequest => "InvalidRequest",
            Self::FailoverHeld => "FailoverHeld",
            Self::AdoptionRefused => "AdoptionRefused",
        }
    }

    /// The reason as written in a condition; `None` for a reason this version does not know.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Healthy,
            Self::StepFailed,
            Self::InvalidSpec,
            Self::ImageNotFound,
            Self::ImagePullFailed,
            Self::Unauthorized,
            Self::InsufficientCapacity,
            Self::QuotaExceeded,
            Self::InvalidRequest,
            Self::FailoverHeld,
            Self::AdoptionRefused,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// What a database that is not settled waits for: the reason of its Ready=False and
/// Progressing=True conditions (the message says which object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// The DNS zone the record belongs in does not exist in Route53.
    NoHostedZone,
    /// The volume binder has not bound the claim to the database's volume yet.
    BindingVolume,
    /// The node or the volume is not there yet for the database's pod.
    PlacingDatabase,
    /// The database's pod is not Ready yet.
    StartingDatabase,
    /// A node image upgrade waits for the replacement budget.
    UpgradeQueued,
    /// A failover is held back while the zone looks unhealthy.
    FailoverHeld,
    /// A node replacement is under way.
    ReplacingNode,
    /// The database is being stopped on the old node before its volume moves.
    DrainingOldNode,
    /// Waiting for EC2 to confirm the old instance stopped.
    FencingOldNode,
    /// The instance has not joined the cluster as a node yet.
    NodeJoining,
    /// The database's node is not Ready.
    NodeNotReady,
    /// The instance is not running yet.
    InstanceStarting,
    /// The data volume is not available yet.
    VolumeCreating,
    /// The snapshot the database starts from is not completed yet (EBS makes no volume from a
    /// pending one).
    SnapshotPending,
    /// A snapshot (on demand, scheduled, or a safety snapshot) is being taken, or EBS has not
    /// completed it yet. Alone it leaves a serving database Running: a snapshot changes nothing
    /// the database serves.
    TakingSnapshot,
    /// A change of the node image, version, instance type or volume type waits for its safety
    /// snapshot (`spec.snapshotPolicy.beforeChanges`).
    ChangeHeld,
    /// A restore (`spec.restore`) is under way: the database is stopped and comes back on a
    /// volume made from the snapshot.
    Restoring,
    /// The data volume is attaching.
    VolumeAttaching,
    /// The data volume is being released by an instance.
    VolumeDetaching,
    /// The data volume is attached to an instance the operator does not know; left alone.
    VolumeInUse,
    /// The data volume named in status is not listed by EC2 yet (its listing lags); never
    /// replaced by an empty one meanwhile.
    VolumeNotListed,
    /// Waiting for EC2 to confirm a retired instance terminated.
    RetiringInstance,
    /// Pause waits for the pod to stop before releasing the node.
    StoppingDatabase,
    /// Pause waits for EC2 to confirm the instance terminated.
    ReleasingNode,
    /// EBS allows one modification of a volume per six hours: the volume change waits until
    /// `status.volume.modifiableAt`, and is made then.
    StorageResizeBlocked,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoHostedZone => "NoHostedZone",
            Self::BindingVolume => "BindingVolume",
            Self::PlacingDatabase => "PlacingDatabase",
            Self::StartingDatabase => "StartingDatabase",
            Self::UpgradeQueued => "UpgradeQueued",
            Self::ChangeHeld => "ChangeHeld",
            Self::Restoring => "Restoring",
            Self::FailoverHeld => "FailoverHeld",
            Self::ReplacingNode => "ReplacingNode",
            Self::DrainingOldNode => "DrainingOldNode",
            Self::FencingOldNode => "FencingOldNode",
            Self::NodeJoining => "NodeJoining",
            Self::NodeNotReady => "NodeNotReady",
            Self::InstanceStarting => "InstanceStarting",
            Self::VolumeCreating => "VolumeCreating",
            Self::SnapshotPending => "SnapshotPending",
            Self::TakingSnapshot => "TakingSnapshot",
            Self::VolumeAttaching => "VolumeAttaching",
            Self::VolumeDetaching => "VolumeDetaching",
            Self::VolumeInUse => "VolumeInUse",
            Self::VolumeNotListed => "VolumeNotListed",
            Self::RetiringInstance => "RetiringInstance",
            Self::StoppingDatabase => "StoppingDatabase",
            Self::ReleasingNode => "ReleasingNode",
            Self::StorageResizeBlocked => "StorageResizeBlocked",
        }
    }
}

/// The steps of a node replacement, in their fixed order (the design's fencing order).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum ReplaceStep {
    /// The replacement is launched; waiting for its node to be Ready.
    Launched,
    /// Upgrade only: the database is being stopped on the old node.
    Draining,
    /// StopInstances sent for the old instance; waiting for EC2 to say stopped or terminated.
    StopIssued,
    /// EC2 confirmed the old instance stopped: out-of-service taint and pod force-delete done.
    Fenced,
    /// The attachment to the fenced node deleted; waiting for the EBS CSI driver's detach.
    Detaching,
    /// Waiting for the EBS CSI driver to attach the volume to the replacement.
    Attaching,
}

/// The CRD as YAML, exactly as `crdgen` writes it to deploy/.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&QuestDB::crd())?;
    Ok(format!("# Generated by `cargo run -p qdb-crd --bin crdgen`; do not edit.\n{body}"))
}
