//! From instruction to desired QuestDB resource: pure, so every operation is unit-tested.
//!
//! The provisioner applies whole specs with server-side apply under its own field manager. A
//! partial apply would drop the fields it left out (SSA removes fields a manager stops sending),
//! so a modify is resolved here against the current spec into the full desired spec.

use qdb_crd::{
    AdoptSpec, NetworkSpec, QuestDBSpec, ReclaimPolicy, SnapshotPolicy, SnapshotRequest, SpecError,
    VolumeSpec, VolumeType, is_dns_label, validate,
};
use qdb_proto::v1::{self, instruction::Operation};

/// What to do to the cluster for one instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Server-side apply this full spec.
    Apply(QuestDBSpec),
    /// Delete the resource; with `prepare` that spec is applied first: the volume's reclaim
    /// policy set to Retain (the operator keeps the data volume), the snapshots' to Delete (it
    /// removes them).
    Delete { prepare: Option<QuestDBSpec> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("instruction has no operation this provisioner knows")]
    UnknownOperation,
    #[error("create carries no database spec")]
    MissingSpec,
    #[error("volume type {0} is unknown")]
    UnknownVolumeType(i32),
    #[error("database does not exist in its cluster")]
    NotFound,
    #[error("volume cannot shrink from {from} GiB to {to} GiB")]
    VolumeShrink { from: u32, to: u32 },
    #[error("version {to} is older than {from}: a rollback must set allow_version_downgrade")]
    VersionDowngrade { from: String, to: String },
    #[error("invalid spec: {}", join(.0))]
    Invalid(Vec<SpecError>),
    #[error("database id {0:?} is not a lowercase DNS label of at most 63 characters")]
    InvalidDatabaseId(String),
    #[error("cannot clone database {source_id}: {why}")]
    NoSnapshotToClone { source_id: String, why: String },
    #[error("nothing to restore: {0}")]
    NoSnapshotToRestore(String),
    #[error("the database is paused: resume it, then restore")]
    Paused,
}

impl MapError {
    /// The machine-readable gossip reason.
    pub fn reason(&self) -> &'static str {
        match self {
            MapError::UnknownOperation => "UNKNOWN_OPERATION",
            MapError::NotFound => "DATABASE_NOT_FOUND",
            MapError::MissingSpec
            | MapError::UnknownVolumeType(_)
            | MapError::VolumeShrink { .. }
            | MapError::VersionDowngrade { .. }
            | MapError::Invalid(_) => "INVALID_SPEC",
            MapError::InvalidDatabaseId(_) => "INVALID_DATABASE_ID",
            MapError::NoSnapshotToClone { .. } => "NO_SNAPSHOT_TO_CLONE",
            MapError::NoSnapshotToRestore(_) => "NO_SNAPSHOT_TO_RESTORE",
            MapError::Paused => "DATABASE_PAUSED",
        }
    }
}

fn join(errors: &[SpecError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// The database a create clones (`volume.clone_of_database`), if it names one.
pub fn clone_of(instruction: &v1::Instruction) -> Option<&str> {
    match instruction.operation.as_ref()? {
        Operation::Create(c) => c.spec.as_ref()?.volume.as_ref()?.clone_of_database.as_deref(),
        _ => None,
    }
}

/// A create that clones another database, as a create from that database's latest completed
/// snapshot (`source`: the other database's resource, None if absent). Once the clone exists
/// (`current`), the snapshot it was made from stays: `volume.fromSnapshot` cannot change, and a
/// replayed create must not pick a newer one.
pub fn resolve_clone(
    instruction: &v1::Instruction,
    current: Option<&QuestDBSpec>,
    source: Option<&qdb_crd::QuestDB>,
) -> Result<v1::Instruction, MapError> {
    let mut out = instruction.clone();
    let Some(Operation::Create(c)) = out.operation.as_mut() else { return Ok(out) };
    let Some(volume) = c.spec.as_mut().and_then(|s| s.volume.as_mut()) else { return Ok(out) };
    let Some(source_id) = volume.clone_of_database.take() else { return Ok(out) };
    let refuse = |why: &str| MapError::NoSnapshotToClone { source_id: source_id.clone(), why: why.into() };
    if volume.from_volume_id.is_some() || volume.from_snapshot_id.is_some() {
        return Err(refuse("a create clones a database or starts from a volume or snapshot, not both"));
    }
    if let Some(made_from) = current.and_then(|c| c.volume.from_snapshot.clone()) {
        volume.from_snapshot_id = Some(made_from);
        return Ok(out);
    }
    let source = source.ok_or_else(|| refuse("it does not exist in the cluster"))?;
    let latest = completed_snapshots(source)
        .max_by_key(|s| s.taken_at.0)
        .ok_or_else(|| refuse("it has no completed snapshot"))?;
    volume.from_snapshot_id = Some(latest.id.clone());
    Ok(out)
}

/// The snapshots EBS completed of a database, as its status lists them.
fn completed_snapshots(q: &qdb_crd::QuestDB) -> impl Iterator<Item = &qdb_crd::SnapshotStatus> {
    q.status.iter().flat_map(|s| &s.snapshots).filter(|s| s.state == qdb_crd::SnapshotPhase::Completed)
}

/// A restore, with its snapshot resolved against the database (`current`, None if absent): the
/// snapshot it names, or its latest, must be one of its completed snapshots. A replayed restore
/// keeps the snapshot its first apply chose.
pub fn resolve_restore(
    instruction: &v1::Instruction,
    current: Option<&qdb_crd::QuestDB>,
) -> Result<v1::Instruction, MapError> {
    let mut out = instruction.clone();
    let Some(Operation::Restore(r)) = out.operation.as_mut() else { return Ok(out) };
    let q = current.ok_or(MapError::NotFound)?;
    if let Some(applied) = q.spec.restore.as_ref().filter(|a| a.id == instruction.instruction_id) {
        r.snapshot_id = Some(applied.snapshot.clone());
        return Ok(out);
    }
    if q.spec.paused {
        return Err(MapError::Paused);
    }
    let chosen = match &r.snapshot_id {
        Some(id) => completed_snapshots(q).find(|s| &s.id == id).ok_or_else(|| {
            MapError::NoSnapshotToRestore(format!("{id} is not a completed snapshot of this database"))
        })?,
        None => completed_snapshots(q)
            .max_by_key(|s| s.taken_at.0)
            .ok_or_else(|| MapError::NoSnapshotToRestore("the database has no completed snapshot".into()))?,
    };
    r.snapshot_id = Some(chosen.id.clone());
    Ok(out)
}

/// The desired state for `instruction`, given the resource's current spec (None = absent).
pub fn desired(instruction: &v1::Instruction, current: Option<&QuestDBSpec>) -> Result<Action, MapError> {
    let op = instruction.operation.as_ref().ok_or(MapError::UnknownOperation)?;
    let existing = || current.cloned().ok_or(MapError::NotFound);
    let spec = match op {
        // A create of an existing database states its whole desired spec again: applied as is.
        Operation::Create(create) => {
            let mut spec = from_proto(create.spec.as_ref().ok_or(MapError::MissingSpec)?)?;
            if let Some(a) = &create.adopt {
                spec.adopt = Some(AdoptSpec {
                    instance_id: a.instance_id.clone(),
                    volume_id: a.volume_id.clone(),
                    security_group_id: a.security_group_id.clone(),
                });
                spec.network.dns_name.clone_from(&a.dns_name);
            }
            if let Some(cur) = current {
                spec.paused = cur.paused;
                spec.restart_token = cur.restart_token.clone();
                spec.snapshot = cur.snapshot.clone();
                spec.restore = cur.restore.clone();
            }
            spec
        }
        Operation::Modify(m) => {
            let mut spec = existing()?;
            if let Some(v) = &m.questdb_version {
                spec.version = v.clone();
            }
            if let Some(t) = &m.instance_type {
                spec.instance_type = t.clone();
            }
            if let Some(i) = &m.node_image {
                spec.node_image = i.clone();
            }
            if let Some(size) = m.volume_size_gib {
                spec.volume.size_gib = size;
            }
            if let Some(iops) = m.volume_iops {
                spec.volume.iops = Some(iops);
            }
            if let Some(throughput) = m.volume_throughput_mibps {
                spec.volume.throughput_mibps = Some(throughput);
            }
            for key in &m.remove_server_config {
                spec.server_config.remove(key);
            }
            spec.server_config.extend(m.set_server_config.iter().map(|(k, v)| (k.clone(), v.clone())));
            if let Some(cidrs) = &m.allowed_cidrs {
                spec.network.allowed_cidrs = cidrs.cidrs.clone();
            }
            if let Some(policy) = &m.snapshot_policy {
                spec.snapshot_policy = policy_of(policy, spec.snapshot_policy.reclaim_policy);
            }
            spec.allow_version_downgrade = m.allow_version_downgrade;
            spec
        }
        // Only the instruction that rolls back carries the permission: it is not left behind.
        Operation::Pause(_) => QuestDBSpec { paused: true, allow_version_downgrade: false, ..existing()? },
        Operation::Resume(_) => QuestDBSpec { paused: false, allow_version_downgrade: false, ..existing()? },
        // The instruction id is unique, so each restart instruction changes the token once.
        Operation::Restart(_) => QuestDBSpec {
            restart_token: Some(instruction.instruction_id.clone()),
            allow_version_downgrade: false,
            ..existing()?
        },
        // The instruction id is unique, so each snapshot instruction asks for one snapshot.
        Operation::Snapshot(snap) => QuestDBSpec {
            snapshot: Some(SnapshotRequest {
                id: instruction.instruction_id.clone(),
                label: snap.label.clone(),
            }),
            allow_version_downgrade: false,
            ..existing()?
        },
        // Resolved first (resolve_restore): the snapshot is named.
        Operation::Restore(r) => QuestDBSpec {
            restore: Some(qdb_crd::RestoreRequest {
                id: instruction.instruction_id.clone(),
                snapshot: r
                    .snapshot_id
                    .clone()
                    .ok_or_else(|| MapError::NoSnapshotToRestore("the restore names no snapshot".into()))?,
                zone: r.zone.clone(),
            }),
            allow_version_downgrade: false,
            ..existing()?
        },
        Operation::Delete(d) => {
            let prepare = current.filter(|_| d.retain_volume || d.remove_snapshots).map(|cur| {
                let mut spec = cur.clone();
                if d.retain_volume {
                    spec.volume.reclaim_policy = ReclaimPolicy::Retain;
                }
                if d.remove_snapshots {
                    spec.snapshot_policy.reclaim_policy = ReclaimPolicy::Delete;
                }
                spec
            });
            return Ok(Action::Delete { prepare });
        }
    };
    // Validity first: a transition is only judged between valid specs.
    validate(&spec).map_err(MapError::Invalid)?;
    if let Some(cur) = current {
        check_transition(cur, &spec)?;
    }
    Ok(Action::Apply(spec))
}

/// Everything that can be checked before the current resource is known, so bad instructions
/// are rejected when they arrive instead of when their turn comes. Checks against the current
/// spec (existence, volume growth) happen at apply time.
pub fn precheck(instruction: &v1::Instruction) -> Result<(), MapError> {
    if !is_dns_label(&instruction.database_id) {
        return Err(MapError::InvalidDatabaseId(instruction.database_id.clone()));
    }
    let reference = QuestDBSpec {
        version: "9.0.0".into(),
        instance_type: "m7g.large".into(),
        node_image: "ami-0123456789abcdef0".into(),
        volume: VolumeSpec {
            size_gib: 1,
            type_: VolumeType::Gp3,
            iops: None,
            throughput_mibps: None,
            reclaim_policy: ReclaimPolicy::Delete,
            from_volume: None,
            from_snapshot: None,
        },
        server_config: Default::default(),
        paused: false,
        restart_token: None,
        allow_version_downgrade: false,
        network: NetworkSpec::default(),
        adopt: None,
        snapshot: None,
        restore: None,
        snapshot_policy: Default::default(),
    };
    let current = match instruction.operation {
        Some(Operation::Create(_) | Operation::Delete(_)) => None,
        _ => Some(&reference),
    };
    // A restore that names no snapshot is given its latest when applied; checked as if named.
    let mut named;
    let instruction = match &instruction.operation {
        Some(Operation::Restore(r)) if r.snapshot_id.is_none() => {
            named = instruction.clone();
            if let Some(Operation::Restore(r)) = named.operation.as_mut() {
                r.snapshot_id = Some("snap-00000000".into());
            }
            &named
        }
        _ => instruction,
    };
    match desired(instruction, current) {
        Ok(_)
        | Err(MapError::NotFound | MapError::VolumeShrink { .. } | MapError::VersionDowngrade { .. }) => {
            Ok(())
        }
        // A modify's IOPS and throughput are judged against the volume's real size and type.
        Err(MapError::Invalid(errors))
            if current.is_some() && errors.iter().all(|e| matches!(e, SpecError::VolumePerformance(_))) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// What the cluster's transition rules refuse (deploy/crd: volume only grows, no silent
/// version downgrade), refused here first with the instruction's own words.
fn check_transition(current: &QuestDBSpec, next: &QuestDBSpec) -> Result<(), MapError> {
    if next.volume.size_gib < current.volume.size_gib {
        return Err(MapError::VolumeShrink { from: current.volume.size_gib, to: next.volume.size_gib });
    }
    if !next.allow_version_downgrade && semver(&next.version) < semver(&current.version) {
        return Err(MapError::VersionDowngrade { from: current.version.clone(), to: next.version.clone() });
    }
    Ok(())
}

/// A validated `major.minor.patch` as numbers (anything else sorts first and is caught by
/// `validate`).
fn semver(v: &str) -> [u64; 3] {
    let mut out = [0; 3];
    for (slot, part) in out.iter_mut().zip(v.split('.')) {
        *slot = part.parse().unwrap_or(0);
    }
    out
}

/// A protobuf database spec as a resource spec (not yet validated).
pub fn from_proto(spec: &v1::DatabaseSpec) -> Result<QuestDBSpec, MapError> {
    let volume = spec.volume.clone().unwrap_or_default();
    let type_ = match v1::VolumeType::try_from(volume.r#type) {
        Ok(v1::VolumeType::Gp3) => VolumeType::Gp3,
        Ok(v1::VolumeType::Gp2) => VolumeType::Gp2,
        Ok(v1::VolumeType::Io2) => VolumeType::Io2,
        Ok(v1::VolumeType::Unspecified) | Err(_) => return Err(MapError::UnknownVolumeType(volume.r#type)),
    };
    Ok(QuestDBSpec {
        version: spec.questdb_version.clone(),
        instance_type: spec.instance_type.clone(),
        node_image: spec.node_image.clone(),
        volume: VolumeSpec {
            size_gib: volume.size_gib,
            type_,
            iops: volume.iops,
            throughput_mibps: volume.throughput_mibps,
            reclaim_policy: ReclaimPolicy::Delete,
            from_volume: volume.from_volume_id.clone(),
            from_snapshot: volume.from_snapshot_id.clone(),
        },
        server_config: spec.server_config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        paused: false,
        restart_token: None,
        allow_version_downgrade: false,
        network: NetworkSpec { allowed_cidrs: spec.allowed_cidrs.clone(), dns_name: None },
        adopt: None,
        snapshot: None,
        restore: None,
        snapshot_policy: spec
            .snapshot_policy
            .as_ref()
            .map(|p| policy_of(p, SnapshotPolicy::default().reclaim_policy))
            .unwrap_or_default(),
    })
}

/// The instruction's snapshot policy; what becomes of the snapshots on deletion is the delete
/// instruction's to say, so `reclaim` is kept.
fn policy_of(p: &v1::SnapshotPolicy, reclaim: ReclaimPolicy) -> SnapshotPolicy {
    SnapshotPolicy {
        reclaim_policy: reclaim,
        keep: p.keep,
        schedule: p.schedule.clone(),
        before_changes: p.before_changes.unwrap_or(true),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use qdb_proto::v1::{CidrList, Create, Delete, Instruction, Modify, Pause, Restart, Resume, Volume};

    fn proto_spec() -> v1::DatabaseSpec {
        v1::DatabaseSpec {
            questdb_version: "8.2.1".into(),
            instance_type: "m6i.xlarge".into(),
            node_image: "ami-0123456789abcdef0".into(),
            volume: Some(Volume { size_gib: 100, r#type: v1::VolumeType::Gp3 as i32, ..Default::default() }),
            server_config: BTreeMap::from([("cairo.commit.lag".to_string(), "1000".to_string())]),
            allowed_cidrs: vec!["203.0.113.0/24".into()],
            snapshot_policy: None,
        }
    }

    fn ins(op: Operation) -> Instruction {
        Instruction {
            instruction_id: "i-42".into(),
            database_id: "db-1".into(),
            cluster: "region-a".into(),
            sequence: 7,
            issued_at_ms: 0,
            operation: Some(op),
        }
    }

    fn current() -> QuestDBSpec {
        from_proto(&proto_spec()).unwrap()
    }

    fn applied(action: Result<Action, MapError>) -> QuestDBSpec {
        match action {
            Ok(Action::Apply(spec)) => spec,
            other => panic!("expected an apply, got {other:?}"),
        }
    }

    #[test]
    fn create_maps_every_field() {
        let spec =
            applied(desired(&ins(Operation::Create(Create { adopt: None, spec: Some(proto_spec()) })), None));
        assert_eq!(spec.version, "8.2.1");
        assert_eq!(spec.instance_type, "m6i.xlarge");
        assert_eq!(spec.node_image, "ami-0123456789abcdef0");
        assert_eq!(
            spec.volume,
            VolumeSpec {
                size_gib: 100,
                type_: VolumeType::Gp3,
                iops: None,
                throughput_mibps: None,
                reclaim_policy: ReclaimPolicy::Delete,
                from_volume: None,
                from_snapshot: None,
            }
        );
        assert_eq!(spec.server_config.get("cairo.commit.lag").map(String::as_str), Some("1000"));
        assert_eq!(spec.network.allowed_cidrs, vec!["203.0.113.0/24".to_string()]);
        assert!(!spec.paused);
    }

    #[test]
    fn a_create_from_a_kept_volume_or_a_snapshot_names_it() {
        let mut from = proto_spec();
        if let Some(v) = from.volume.as_mut() {
            v.from_volume_id = Some("vol-0123456789abcdef0".into());
        }
        let spec =
            applied(desired(&ins(Operation::Create(Create { adopt: None, spec: Some(from.clone()) })), None));
        assert_eq!(spec.volume.from_volume.as_deref(), Some("vol-0123456789abcdef0"));
        if let Some(v) = from.volume.as_mut() {
            v.from_volume_id = Some("snap-1".into());
        }
        let bad = desired(&ins(Operation::Create(Create { adopt: None, spec: Some(from.clone()) })), None);
        assert!(matches!(bad, Err(MapError::Invalid(_))), "{bad:?}");
        if let Some(v) = from.volume.as_mut() {
            v.from_volume_id = None;
            v.from_snapshot_id = Some("snap-0123456789abcdef0".into());
        }
        let spec = applied(desired(&ins(Operation::Create(Create { adopt: None, spec: Some(from) })), None));
        assert_eq!(spec.volume.from_snapshot.as_deref(), Some("snap-0123456789abcdef0"));
    }

    /// A status entry: snapshot `id` (its own request) taken at `secs`.
    fn taken(
        id: &str,
        secs: i64,
        state: qdb_crd::SnapshotPhase,
        reason: qdb_crd::SnapshotReason,
    ) -> qdb_crd::SnapshotStatus {
        qdb_crd::SnapshotStatus {
            id: id.into(),
            request: id.into(),
            label: None,
            taken_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(secs).unwrap(),
            ),
            size_gib: 20,
            state,
            consistency: qdb_crd::Consistency::Consistent,
            reason,
        }
    }

    #[test]
    fn a_restore_names_a_completed_snapshot_of_the_database_and_a_replay_keeps_it() {
        let restore = |snapshot_id: Option<&str>| {
            ins(Operation::Restore(v1::Restore { snapshot_id: snapshot_id.map(String::from), zone: None }))
        };
        let refused = |r: Result<v1::Instruction, MapError>| r.err().map(|e| (e.reason(), e.to_string()));
        // At intake: an unnamed snapshot is resolved later; a malformed one or zone is refused.
        assert_eq!(precheck(&restore(None)), Ok(()));
        assert_eq!(precheck(&restore(Some("vol-1"))).map_err(|e| e.reason()), Err("INVALID_SPEC"));
        assert_eq!(refused(resolve_restore(&restore(None), None)).map(|r| r.0), Some("DATABASE_NOT_FOUND"));
        let mut q = qdb_crd::QuestDB::new("db-1", current());
        let (reason, message) = refused(resolve_restore(&restore(None), Some(&q))).unwrap();
        assert_eq!(reason, "NO_SNAPSHOT_TO_RESTORE");
        assert_eq!(message, "nothing to restore: the database has no completed snapshot");
        let taken = |id: &str, secs, state| taken(id, secs, state, qdb_crd::SnapshotReason::BeforeChange);
        q.status = Some(qdb_crd::QuestDBStatus {
            snapshots: vec![
                taken("snap-0000000000000001", 10, qdb_crd::SnapshotPhase::Completed),
                taken("snap-0000000000000002", 20, qdb_crd::SnapshotPhase::Completed),
                taken("snap-0000000000000003", 30, qdb_crd::SnapshotPhase::Pending),
            ],
            ..Default::default()
        });
        let named = |r: Result<v1::Instruction, MapError>| {
            applied(desired(&r.unwrap(), Some(&current()))).restore.map(|r| (r.id, r.snapshot))
        };
        assert_eq!(
            named(resolve_restore(&restore(None), Some(&q))),
            Some(("i-42".into(), "snap-0000000000000002".into())),
            "the latest completed"
        );
        assert_eq!(
            named(resolve_restore(&restore(Some("snap-0000000000000001")), Some(&q))).map(|r| r.1).as_deref(),
            Some("snap-0000000000000001")
        );
        let (reason, _) =
            refused(resolve_restore(&restore(Some("snap-0000000000000003")), Some(&q))).unwrap();
        assert_eq!(reason, "NO_SNAPSHOT_TO_RESTORE", "pending");
        // Replayed after its apply: the snapshot chosen then, though a newer one completed since.
        q.spec.restore = Some(qdb_crd::RestoreRequest {
            id: "i-42".into(),
            snapshot: "snap-0000000000000001".into(),
            zone: None,
        });
        assert_eq!(
            named(resolve_restore(&restore(None), Some(&q))).map(|r| r.1).as_deref(),
            Some("snap-0000000000000001")
        );
        q.spec.restore = None;
        q.spec.paused = true;
        assert_eq!(refused(resolve_restore(&restore(None), Some(&q))).map(|r| r.0), Some("DATABASE_PAUSED"));
        // Other operations pass through untouched.
        let pause = ins(Operation::Pause(v1::Pause {}));
        assert_eq!(resolve_restore(&pause, None).unwrap(), pause);
    }

    #[test]
    fn a_clone_starts_from_the_latest_completed_snapshot_of_its_source_and_keeps_it() {
        let mut from = proto_spec();
        from.volume.as_mut().unwrap().clone_of_database = Some("db-big".into());
        let create = ins(Operation::Create(Create { adopt: None, spec: Some(from) }));
        assert_eq!(clone_of(&create), Some("db-big"));
        let refused = |r: Result<v1::Instruction, MapError>| match r {
            Err(e @ MapError::NoSnapshotToClone { .. }) => (e.reason(), e.to_string()),
            other => panic!("{other:?}"),
        };
        let (reason, message) = refused(resolve_clone(&create, None, None));
        assert_eq!(reason, "NO_SNAPSHOT_TO_CLONE");
        assert_eq!(message, "cannot clone database db-big: it does not exist in the cluster");
        let mut source = qdb_crd::QuestDB::new("db-big", current());
        let (_, message) = refused(resolve_clone(&create, None, Some(&source)));
        assert!(message.ends_with("it has no completed snapshot"), "{message}");
        let taken = |id: &str, secs, state| taken(id, secs, state, qdb_crd::SnapshotReason::OnDemand);
        source.status = Some(qdb_crd::QuestDBStatus {
            snapshots: vec![
                taken("snap-0000000000000002", 20, qdb_crd::SnapshotPhase::Completed),
                taken("snap-0000000000000001", 10, qdb_crd::SnapshotPhase::Completed),
                taken("snap-0000000000000003", 30, qdb_crd::SnapshotPhase::Pending),
            ],
            ..Default::default()
        });
        let resolved = resolve_clone(&create, None, Some(&source)).unwrap();
        assert_eq!(clone_of(&resolved), None);
        let spec = applied(desired(&resolved, None));
        assert_eq!(
            spec.volume.from_snapshot.as_deref(),
            Some("snap-0000000000000002"),
            "the latest completed"
        );
        // Replayed once the clone exists: the snapshot it was made from, not a newer one.
        let mut made = spec.clone();
        made.volume.from_snapshot = Some("snap-0000000000000001".into());
        let again =
            applied(desired(&resolve_clone(&create, Some(&made), Some(&source)).unwrap(), Some(&made)));
        assert_eq!(again.volume.from_snapshot.as_deref(), Some("snap-0000000000000001"));
        let mut both = create.clone();
        if let Some(Operation::Create(c)) = both.operation.as_mut() {
            c.spec.as_mut().unwrap().volume.as_mut().unwrap().from_snapshot_id =
                Some("snap-0123456789abcdef0".into());
        }
        let (_, message) = refused(resolve_clone(&both, None, Some(&source)));
        assert!(message.contains("not both"), "{message}");
    }

    #[test]
    fn a_create_that_adopts_names_the_running_resources_and_their_dns_name() {
        let adopt = v1::Adopt {
            instance_id: "i-0123456789abcdef0".into(),
            volume_id: "vol-0123456789abcdef0".into(),
            security_group_id: "sg-0123456789abcdef0".into(),
            dns_name: Some("legacy-7.db.example.com".into()),
        };
        let create = Create { adopt: Some(adopt.clone()), spec: Some(proto_spec()) };
        let spec = applied(desired(&ins(Operation::Create(create)), None));
        let a = spec.adopt.expect("adopt");
        assert_eq!(
            (a.instance_id.as_str(), a.volume_id.as_str(), a.security_group_id.as_str()),
            ("i-0123456789abcdef0", "vol-0123456789abcdef0", "sg-0123456789abcdef0")
        );
        assert_eq!(spec.network.dns_name.as_deref(), Some("legacy-7.db.example.com"));
        let bad = Create {
            adopt: Some(v1::Adopt { instance_id: "i-1".into(), ..adopt }),
            spec: Some(proto_spec()),
        };
        let refused = desired(&ins(Operation::Create(bad)), None);
        assert!(
            matches!(&refused, Err(MapError::Invalid(e)) if matches!(e[..], [SpecError::Adopt(_)])),
            "{refused:?}"
        );
    }

    #[test]
    fn create_again_keeps_pause_and_restart_state() {
        let mut cur = current();
        cur.paused = true;
        cur.restart_token = Some("t".into());
        let spec = applied(desired(
            &ins(Operation::Create(Create { adopt: None, spec: Some(proto_spec()) })),
            Some(&cur),
        ));
        assert!(spec.paused);
        assert_eq!(spec.restart_token.as_deref(), Some("t"));
    }

    #[test]
    fn create_rejects_bad_input() {
        assert_eq!(
            desired(&ins(Operation::Create(Create { adopt: None, spec: None })), None),
            Err(MapError::MissingSpec)
        );
        let mut bad_type = proto_spec();
        bad_type.volume = Some(Volume { size_gib: 10, r#type: 42, ..Default::default() });
        assert_eq!(
            desired(&ins(Operation::Create(Create { adopt: None, spec: Some(bad_type) })), None),
            Err(MapError::UnknownVolumeType(42))
        );
        let mut invalid = proto_spec();
        invalid.questdb_version = "latest".into();
        invalid.allowed_cidrs = vec!["nope".into()];
        let err =
            desired(&ins(Operation::Create(Create { adopt: None, spec: Some(invalid) })), None).unwrap_err();
        assert_eq!(err.reason(), "INVALID_SPEC");
        assert!(err.to_string().contains("latest") && err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn modify_changes_only_what_it_names() {
        let m = Modify {
            questdb_version: Some("8.3.0".into()),
            volume_size_gib: Some(200),
            set_server_config: BTreeMap::from([("line.tcp.enabled".to_string(), "true".to_string())]),
            remove_server_config: vec!["cairo.commit.lag".into()],
            allowed_cidrs: Some(CidrList { cidrs: vec![] }),
            ..Default::default()
        };
        let spec = applied(desired(&ins(Operation::Modify(m)), Some(&current())));
        assert_eq!(spec.version, "8.3.0");
        assert_eq!(spec.volume.size_gib, 200);
        assert_eq!(spec.instance_type, "m6i.xlarge");
        assert_eq!(
            spec.server_config,
            BTreeMap::from([("line.tcp.enabled".to_string(), "true".to_string())])
        );
        assert!(spec.network.allowed_cidrs.is_empty(), "an empty list closes the database");

        let untouched = applied(desired(&ins(Operation::Modify(Modify::default())), Some(&current())));
        assert_eq!(untouched, current());
    }

    #[test]
    fn volume_performance_is_mapped_and_judged_against_the_real_volume() {
        let mut io2 = proto_spec();
        io2.volume = Some(Volume {
            size_gib: 100,
            r#type: v1::VolumeType::Io2 as i32,
            iops: Some(20_000),
            ..Default::default()
        });
        let spec =
            applied(desired(&ins(Operation::Create(Create { adopt: None, spec: Some(io2.clone()) })), None));
        assert_eq!(
            (spec.volume.type_, spec.volume.iops, spec.volume.throughput_mibps),
            (VolumeType::Io2, Some(20_000), None)
        );
        io2.volume = Some(Volume { size_gib: 100, r#type: v1::VolumeType::Io2 as i32, ..Default::default() });
        let create = ins(Operation::Create(Create { adopt: None, spec: Some(io2) }));
        assert!(
            matches!(precheck(&create), Err(MapError::Invalid(_))),
            "io2 without iops is refused on arrival"
        );

        // 50,000 IOPS is too much for the 100 GiB gp3 volume, not for every volume: the verdict
        // waits for the current spec.
        let tune = ins(Operation::Modify(Modify { volume_iops: Some(50_000), ..Default::default() }));
        assert_eq!(precheck(&tune), Ok(()));
        assert!(matches!(desired(&tune, Some(&current())), Err(MapError::Invalid(e)) if e.len() == 1));
        let tune = ins(Operation::Modify(Modify {
            volume_iops: Some(12_000),
            volume_throughput_mibps: Some(700),
            ..Default::default()
        }));
        let spec = applied(desired(&tune, Some(&current())));
        assert_eq!((spec.volume.iops, spec.volume.throughput_mibps), (Some(12_000), Some(700)));
    }

    #[test]
    fn modify_refuses_shrink_and_missing_database() {
        let shrink = Modify { volume_size_gib: Some(50), ..Default::default() };
        assert_eq!(
            desired(&ins(Operation::Modify(shrink)), Some(&current())),
            Err(MapError::VolumeShrink { from: 100, to: 50 })
        );
        assert_eq!(desired(&ins(Operation::Modify(Modify::default())), None), Err(MapError::NotFound));
    }

    #[test]
    fn a_version_downgrade_needs_its_permission_and_does_not_keep_it() {
        let older = Modify { questdb_version: Some("8.1.9".into()), ..Default::default() };
        assert_eq!(
            desired(&ins(Operation::Modify(older.clone())), Some(&current())),
            Err(MapError::VersionDowngrade { from: "8.2.1".into(), to: "8.1.9".into() })
        );
        // Compared as numbers, not text: 8.10.0 is newer than 8.9.0.
        let mut at_8_9 = current();
        at_8_9.version = "8.9.0".into();
        let newer = Modify { questdb_version: Some("8.10.0".into()), ..Default::default() };
        assert_eq!(applied(desired(&ins(Operation::Modify(newer)), Some(&at_8_9))).version, "8.10.0");

        let rollback = Modify { allow_version_downgrade: true, ..older };
        let rolled = applied(desired(&ins(Operation::Modify(rollback)), Some(&current())));
        assert_eq!(rolled.version, "8.1.9");
        assert!(rolled.allow_version_downgrade);
        let paused = applied(desired(&ins(Operation::Pause(Pause {})), Some(&rolled)));
        assert!(!paused.allow_version_downgrade, "the permission goes with the instruction that used it");
        assert_eq!(paused.version, "8.1.9");
    }

    #[test]
    fn a_snapshot_asks_for_one_snapshot_per_instruction_and_later_instructions_keep_the_request() {
        let label = Some("before-upgrade".to_string());
        let snap = applied(desired(
            &ins(Operation::Snapshot(v1::Snapshot { label: label.clone() })),
            Some(&current()),
        ));
        assert_eq!(snap.snapshot, Some(SnapshotRequest { id: "i-42".into(), label }));
        let mut rest = snap.clone();
        rest.snapshot = None;
        assert_eq!(rest, current(), "nothing else changes");
        let paused = applied(desired(&ins(Operation::Pause(Pause {})), Some(&snap)));
        assert_eq!(paused.snapshot, snap.snapshot, "a later instruction does not ask again, nor withdraw it");
        assert_eq!(
            desired(&ins(Operation::Snapshot(v1::Snapshot { label: None })), None),
            Err(MapError::NotFound)
        );
    }

    #[test]
    fn the_snapshot_policy_is_set_at_create_and_replaced_by_a_modify() {
        let mut create = ins(Operation::Create(Create { spec: Some(proto_spec()), adopt: None }));
        if let Some(Operation::Create(c)) = create.operation.as_mut() {
            let policy = v1::SnapshotPolicy {
                keep: Some(7),
                schedule: Some("0 3 * * *".into()),
                before_changes: None,
            };
            c.spec.as_mut().unwrap().snapshot_policy = Some(policy);
        }
        let policy = applied(desired(&create, None)).snapshot_policy;
        assert_eq!(policy.keep, Some(7));
        assert_eq!(policy.schedule.as_deref(), Some("0 3 * * *"));
        assert!(policy.before_changes, "safety snapshots are on unless turned off");
        let off = ins(Operation::Modify(v1::Modify {
            snapshot_policy: Some(v1::SnapshotPolicy { before_changes: Some(false), ..Default::default() }),
            ..Default::default()
        }));
        let mut scheduled = current();
        scheduled.snapshot_policy.schedule = Some("0 3 * * *".into());
        scheduled.snapshot_policy.reclaim_policy = ReclaimPolicy::Delete;
        let policy = applied(desired(&off, Some(&scheduled))).snapshot_policy;
        assert!(!policy.before_changes);
        assert_eq!(policy.schedule, None, "a modify's policy replaces the whole policy");
        assert_eq!(policy.reclaim_policy, ReclaimPolicy::Delete, "but not what a delete said");
        let keep = |keep| {
            ins(Operation::Modify(v1::Modify {
                snapshot_policy: Some(v1::SnapshotPolicy { keep, ..Default::default() }),
                ..Default::default()
            }))
        };
        assert_eq!(applied(desired(&keep(Some(2)), Some(&current()))).snapshot_policy.keep, Some(2));
        let mut kept = current();
        kept.snapshot_policy.keep = Some(2);
        assert_eq!(
            applied(desired(&keep(None), Some(&kept))).snapshot_policy.keep,
            None,
            "absent keep = all"
        );
        let untouched =
            ins(Operation::Modify(v1::Modify { volume_size_gib: Some(500), ..Default::default() }));
        assert_eq!(applied(desired(&untouched, Some(&kept))).snapshot_policy.keep, Some(2));
        assert!(matches!(desired(&keep(Some(0)), Some(&current())), Err(MapError::Invalid(_))));
    }

    #[test]
    fn pause_resume_restart() {
        let paused = applied(desired(&ins(Operation::Pause(Pause {})), Some(&current())));
        assert!(paused.paused);
        let resumed = applied(desired(&ins(Operation::Resume(Resume {})), Some(&paused)));
        assert!(!resumed.paused);
        let restarted = applied(desired(&ins(Operation::Restart(Restart {})), Some(&current())));
        assert_eq!(restarted.restart_token.as_deref(), Some("i-42"));
        for op in [Operation::Pause(Pause {}), Operation::Resume(Resume {}), Operation::Restart(Restart {})] {
            assert_eq!(desired(&ins(op), None), Err(MapError::NotFound));
        }
    }

    #[test]
    fn delete_keeps_or_removes_the_volume_and_the_snapshots() {
        let delete = |retain_volume, remove_snapshots| {
            ins(Operation::Delete(Delete { retain_volume, remove_snapshots }))
        };
        assert_eq!(desired(&delete(false, false), Some(&current())), Ok(Action::Delete { prepare: None }));
        let Ok(Action::Delete { prepare: Some(spec) }) = desired(&delete(true, false), Some(&current()))
        else {
            panic!("expected a retaining delete");
        };
        assert_eq!(spec.volume.reclaim_policy, ReclaimPolicy::Retain);
        assert_eq!(
            spec.snapshot_policy.reclaim_policy,
            ReclaimPolicy::Retain,
            "snapshots are kept by default"
        );
        let Ok(Action::Delete { prepare: Some(spec) }) = desired(&delete(false, true), Some(&current()))
        else {
            panic!("expected a delete that removes the snapshots");
        };
        assert_eq!(spec.volume.reclaim_policy, ReclaimPolicy::Delete);
        assert_eq!(spec.snapshot_policy.reclaim_policy, ReclaimPolicy::Delete);
        // Deleting what is already gone is fine: the delete is idempotent.
        assert_eq!(desired(&delete(true, true), None), Ok(Action::Delete { prepare: None }));
    }

    #[test]
    fn precheck_catches_bad_values_without_the_current_spec() {
        let mut modify = ins(Operation::Modify(v1::Modify {
            questdb_version: Some("not a version".into()),
            ..Default::default()
        }));
        assert_eq!(precheck(&modify).unwrap_err().reason(), "INVALID_SPEC");
        modify.operation =
            Some(Operation::Modify(v1::Modify { volume_size_gib: Some(1), ..Default::default() }));
        assert_eq!(precheck(&modify), Ok(()), "shrink is only known at apply time");
        assert_eq!(precheck(&ins(Operation::Pause(v1::Pause {}))), Ok(()));
        let mut create = ins(Operation::Create(v1::Create { adopt: None, spec: Some(proto_spec()) }));
        assert_eq!(precheck(&create), Ok(()));
        for bad in ["", "Upper", "-x", "x-", "a_b", &"a".repeat(64)] {
            create.database_id = bad.to_string();
            assert_eq!(precheck(&create).unwrap_err().reason(), "INVALID_DATABASE_ID", "{bad:?}");
        }
    }

    #[test]
    fn no_operation_is_unknown() {
        let mut i = ins(Operation::Pause(Pause {}));
        i.operation = None;
        assert_eq!(desired(&i, Some(&current())), Err(MapError::UnknownOperation));
        assert_eq!(MapError::UnknownOperation.reason(), "UNKNOWN_OPERATION");
    }
}
