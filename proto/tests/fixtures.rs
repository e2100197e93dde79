//! Golden fixtures: committed encodings of one message per operation and per phase must keep
//! decoding to the same values (and re-encode to the same bytes), so a change to the .proto files
//! that breaks what is already on the topics fails here. Also: newer messages (unknown fields,
//! enum values, operations) decode without error.
//!
//! New fixtures are written with `QDB_BLESS=1 cargo test -p qdb-proto --test fixtures`; existing
//! ones must never change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qdb_proto::Message;
use qdb_proto::v1::{
    CidrList, Create, DatabaseSpec, DatabaseStatus, Delete, Endpoints, GossipEvent, Instruction, Modify,
    Pause, Phase, Restart, Restore, Resume, Snapshot, Volume, VolumeType, instruction::Operation,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn spec() -> DatabaseSpec {
    DatabaseSpec {
        questdb_version: "8.2.1".into(),
        instance_type: "m6i.xlarge".into(),
        node_image: "ami-0123456789abcdef0".into(),
        volume: Some(Volume { size_gib: 100, r#type: VolumeType::Gp3 as i32, ..Default::default() }),
        server_config: BTreeMap::from([
            ("cairo.commit.lag".to_string(), "1000".to_string()),
            ("pg.select.cache.enabled".to_string(), "false".to_string()),
        ]),
        allowed_cidrs: vec!["203.0.113.0/24".into(), "198.51.100.7/32".into()],
        snapshot_policy: None,
    }
}

fn instruction(n: u64, op: Operation) -> Instruction {
    Instruction {
        instruction_id: format!("00000000-0000-4000-8000-00000000000{n}"),
        database_id: "db-7f3a".into(),
        cluster: "region-a".into(),
        sequence: n,
        issued_at_ms: 1_764_000_000_000 + n as i64,
        operation: Some(op),
    }
}

fn instructions() -> Vec<(&'static str, Instruction)> {
    vec![
        ("instruction-create", instruction(1, Operation::Create(Create { adopt: None, spec: Some(spec()) }))),
        (
            "instruction-modify",
            instruction(
                2,
                Operation::Modify(Modify {
                    questdb_version: Some("8.3.0".into()),
                    instance_type: None,
                    node_image: Some("ami-0fedcba9876543210".into()),
                    volume_size_gib: Some(200),
                    set_server_config: BTreeMap::from([("line.tcp.enabled".to_string(), "true".to_string())]),
                    remove_server_config: vec!["cairo.commit.lag".into()],
                    allowed_cidrs: Some(CidrList { cidrs: vec!["192.0.2.0/24".into()] }),
                    allow_version_downgrade: false,
                    volume_iops: None,
                    volume_throughput_mibps: None,
                    snapshot_policy: None,
                }),
            ),
        ),
        ("instruction-pause", instruction(3, Operation::Pause(Pause {}))),
        ("instruction-resume", instruction(4, Operation::Resume(Resume {}))),
        ("instruction-restart", instruction(5, Operation::Restart(Restart {}))),
        (
            "instruction-delete",
            instruction(6, Operation::Delete(Delete { retain_volume: true, remove_snapshots: false })),
        ),
        (
            "instruction-snapshot",
            instruction(7, Operation::Snapshot(Snapshot { label: Some("before-upgrade".into()) })),
        ),
        (
            "instruction-restore",
            instruction(
                8,
                Operation::Restore(Restore {
                    snapshot_id: Some("snap-0123456789abcdef0".into()),
                    zone: Some("us-east-1b".into()),
                }),
            ),
        ),
    ]
}

fn gossip(phase: Phase, reason: &str, with_status: bool) -> GossipEvent {
    GossipEvent {
        event_id: format!("10000000-0000-4000-8000-{:012}", phase as i32),
        instruction_id: "00000000-0000-4000-8000-000000000001".into(),
        database_id: "db-7f3a".into(),
        cluster: "region-a".into(),
        sequence: 1,
        phase: phase as i32,
        reason: reason.into(),
        message: format!("{reason} for test"),
        status: with_status.then(|| DatabaseStatus {
            phase: "Running".into(),
            ready: true,
            questdb_version: "8.2.1".into(),
            node_ip: "10.0.1.17".into(),
            dns_name: "db-7f3a.region-a.questdb.example".into(),
            endpoints: Some(Endpoints {
                http: "https://db-7f3a.region-a.questdb.example".into(),
                pgwire: "db-7f3a.region-a.questdb.example:8812".into(),
                ilp: "db-7f3a.region-a.questdb.example:9009".into(),
            }),
            observed_generation: 3,
        }),
        emitted_at_ms: 1_764_000_001_000,
        superseded_by: String::new(),
        snapshot_id: String::new(),
    }
}

fn gossip_events() -> Vec<(&'static str, GossipEvent)> {
    vec![
        ("gossip-accepted", gossip(Phase::Accepted, "ACCEPTED", false)),
        ("gossip-rejected", gossip(Phase::Rejected, "INVALID_SPEC", false)),
        ("gossip-applied", gossip(Phase::Applied, "APPLIED", false)),
        ("gossip-progressing", gossip(Phase::Progressing, "PROVISIONING", true)),
        ("gossip-succeeded", gossip(Phase::Succeeded, "READY", true)),
        ("gossip-failed", gossip(Phase::Failed, "DEADLINE_EXCEEDED", true)),
        ("gossip-superseded", gossip(Phase::Superseded, "STALE_SEQUENCE", false)),
        (
            "gossip-snapshot-succeeded",
            GossipEvent {
                snapshot_id: "snap-0123456789abcdef0".into(),
                ..gossip(Phase::Succeeded, "SNAPSHOT_COMPLETED", true)
            },
        ),
    ]
}

fn check<M: Message + Default + PartialEq + std::fmt::Debug>(name: &str, expected: &M) {
    let path = dir().join(format!("{name}.bin"));
    if std::env::var_os("QDB_BLESS").is_some() && !path.exists() {
        std::fs::write(&path, expected.encode_to_vec()).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let decoded = M::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{name} no longer decodes: {e}"));
    assert_eq!(&decoded, expected, "{name} decodes to something else");
    assert_eq!(decoded.encode_to_vec(), bytes, "{name} re-encodes differently");
}

#[test]
fn instruction_fixtures_decode() {
    for (name, msg) in instructions() {
        check(name, &msg);
    }
}

#[test]
fn gossip_fixtures_decode() {
    for (name, msg) in gossip_events() {
        check(name, &msg);
    }
}

#[test]
fn round_trip_every_operation_and_phase() {
    for (_, msg) in instructions() {
        assert_eq!(Instruction::decode(msg.encode_to_vec().as_slice()).unwrap(), msg);
    }
    for (_, msg) in gossip_events() {
        assert_eq!(GossipEvent::decode(msg.encode_to_vec().as_slice()).unwrap(), msg);
    }
}

/// Appends a field this version does not know: tag `field`, wire type varint.
fn with_unknown_varint(mut bytes: Vec<u8>, field: u32, value: u8) -> Vec<u8> {
    prost::encoding::encode_key(field, prost::encoding::WireType::Varint, &mut bytes);
    bytes.push(value);
    bytes
}

#[test]
fn newer_messages_still_decode() {
    // An unknown top-level field is skipped.
    let (_, create) = instructions().remove(0);
    let bytes = with_unknown_varint(create.encode_to_vec(), 99, 7);
    assert_eq!(Instruction::decode(bytes.as_slice()).unwrap(), create);

    // An operation added later (oneof case 18) reads as "no operation", which is rejected by the
    // provisioner as unknown, never mistaken for another one.
    let mut op_less = create.clone();
    op_less.operation = None;
    let bytes = with_unknown_varint(op_less.encode_to_vec(), 18, 1);
    assert_eq!(Instruction::decode(bytes.as_slice()).unwrap().operation, None);

    // An unknown enum number is kept as a number and reads as unspecified through the accessor.
    let volume = Volume { size_gib: 10, r#type: 42, ..Default::default() };
    let decoded = Volume::decode(volume.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.r#type, 42);
    assert_eq!(decoded.r#type(), VolumeType::Unspecified);
    let event = GossipEvent { phase: 99, ..gossip(Phase::Accepted, "X", false) };
    let decoded = GossipEvent::decode(event.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded.phase(), Phase::Unspecified);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bytes in [&b"\xff\xff\xff\xff"[..], b"\x0a\x05ab", b"not protobuf at all"] {
        assert!(Instruction::decode(bytes).is_err(), "{bytes:?}");
    }
}
