//! The whole module against the local cloud's AWS emulator (moto): ignored by a plain test run,
//! run by `localcloud test` (or `cargo nextest run -p qdb-operator --run-ignored all aws`). Each
//! run uses a fresh owner UID, so runs neither see nor disturb each other's resources.

use aws_sdk_ec2::config::Credentials;
use prometheus_client::registry::Registry;

use super::*;
use crate::build::security_group::Rule;

const DEVICE: &str = "/dev/xvdaa";

async fn emulator() -> Aws {
    let cfg = AwsConfig {
        region: "eu-west-1".into(),
        endpoint: Some(std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:17500".into())),
        ..AwsConfig::default()
    };
    let sdk = sdk_loader(&cfg)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "emulator"))
        .load()
        .await;
    Aws::from_sdk_config(&sdk, &cfg)
}

/// Polls `f` until it returns `Some`, as a client of EC2 must: states change over seconds and a
/// Describe can lag a write (the local cloud's emulator has EC2's timing).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what} not seen within 60 s");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

fn owner() -> Owner {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let uid = format!("00000000-test-{nanos:x}");
    Owner {
        cluster: "aws-test".into(),
        namespace: "questdb".into(),
        database: "db-test".into(),
        owner_uid: uid,
    }
}

#[tokio::test]
#[ignore = "needs the local cloud's AWS emulator"]
async fn ec2_lifecycle() {
    let aws = emulator().await;
    let owner = owner();

    // Security group: nothing yet, create, authorize (twice: idempotent), find, revoke.
    assert_eq!(aws.find_security_group(&owner.owner_uid).await.unwrap(), None);
    let sg = aws.create_security_group(&owner).await.unwrap();
    eventually("the new security group", || async {
        aws.find_security_group(&owner.owner_uid).await.unwrap()
    })
    .await;
    let rules = vec![
        Rule { port: 8812, cidr: "10.0.0.0/8".into() },
        Rule { port: 9000, cidr: "10.0.0.0/8".into() },
        Rule { port: 9000, cidr: "203.0.113.0/24".into() },
    ];
    aws.authorize_ingress(&sg.id, &rules).await.unwrap();
    aws.authorize_ingress(&sg.id, &rules).await.unwrap();
    let found = aws.find_security_group(&owner.owner_uid).await.unwrap().unwrap();
    assert_eq!((found.id.as_str(), &found.rules, found.foreign.len()), (sg.id.as_str(), &rules, 0));
    aws.revoke_ingress(&sg.id, &rules[2..]).await.unwrap();
    aws.revoke_ingress(&sg.id, &rules[2..]).await.unwrap();
    assert_eq!(aws.find_security_group(&owner.owner_uid).await.unwrap().unwrap().rules, rules[..2]);

    // Instance, tagged for the node simulator's cluster filter.
    let launch = Launch {
        image_id: "ami-0123456789abcdef0",
        instance_type: "m6i.large",
        security_group_id: &sg.id,
        user_data: "#!/bin/sh\necho hello\n",
        zone: None,
        extra_tags: &[("cloud.questdb.io/purpose", "test")],
        launch: 0,
    };
    let instance = aws.launch_instance(&owner, &launch).await.unwrap();
    // The same launch tried again (after a timeout, by a restarted operator) carries the same
    // ClientToken: EC2 answers with the first instance instead of starting a second.
    let again = aws.launch_instance(&owner, &launch).await.unwrap();
    assert_eq!(again.id, instance.id, "a retried launch started a second instance");
    assert_eq!(launch_of(&instance), Some(0));
    assert_eq!(instance.tags[keys::CLUSTER], "aws-test");
    assert_eq!(instance.tags["cloud.questdb.io/purpose"], "test");
    assert_eq!(instance.tags["Name"], "qdb-questdb-db-test");
    assert!(instance.private_ip.is_some() && !instance.zone.is_empty());
    let found = eventually("the instance running", || async {
        let found = aws.find_instances(&owner.owner_uid).await.unwrap();
        found.iter().any(|i| i.state == InstanceState::Running).then_some(found)
    })
    .await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, instance.id);
    assert_eq!(found[0].state, InstanceState::Running);
    assert_eq!(found[0].instance_type, "m6i.large");

    // Data volume in the instance's zone, attached, found with its attachment, detached.
    assert_eq!(aws.find_volume(&owner.owner_uid).await.unwrap(), None, "root volumes are not data volumes");
    let want: qdb_crd::VolumeSpec = serde_json::from_value(
        serde_json::json!({"sizeGib": 20, "type": "gp3", "iops": 4000, "throughputMibps": 250}),
    )
    .unwrap();
    let volume = aws.create_volume(&owner, &instance.zone, &want, None).await.unwrap();
    assert_eq!((volume.size_gib, volume.volume_type.as_str()), (20, "gp3"));
    eventually("the volume available", || async {
        aws.find_volume(&owner.owner_uid).await.unwrap().filter(|v| v.state == VolumeState::Available)
    })
    .await;
    // The EBS CSI driver's call in a cluster; made here directly (the operator makes none).
    aws.ec2
        .attach_volume()
        .volume_id(&volume.id)
        .instance_id(&instance.id)
        .device(DEVICE)
        .send()
        .await
        .unwrap();
    let found = eventually("the attachment", || async {
        let v = aws.find_volume(&owner.owner_uid).await.unwrap()?;
        v.attachments.iter().any(|a| a.state == AttachmentState::Attached).then_some(v)
    })
    .await;
    assert_eq!(found.id, volume.id);
    assert_eq!(found.tags[ROLE], ROLE_DATA);
    assert_eq!(found.attachments.len(), 1);
    assert_eq!(
        (found.attachments[0].instance_id.as_str(), found.attachments[0].device.as_str()),
        (instance.id.as_str(), DEVICE)
    );
    let listed = aws.find_volume(&owner.owner_uid).await.unwrap().expect("listed");
    assert_eq!((listed.iops, listed.throughput_mibps), (Some(4000), Some(250)), "sent and listed back");
    let change =
        crate::aws::VolumeChange { size_gib: Some(30), iops: Some(5000), throughput_mibps: Some(500) };
    aws.modify_volume(&volume.id, &change).await.unwrap();
    let listed = aws.find_volume(&owner.owner_uid).await.unwrap().expect("listed");
    assert_eq!((listed.size_gib, listed.iops, listed.throughput_mibps), (30, Some(5000), Some(500)));

    // Stopped first (as the operator fences), then detached: the volume is released only once
    // the machine is really stopped.
    aws.stop_instance(&instance.id, true).await.unwrap();
    eventually("the instance stopped", || async {
        let i = aws.describe_instance(&instance.id).await.unwrap()?;
        (i.state == InstanceState::Stopped).then_some(())
    })
    .await;
    aws.ec2.detach_volume().volume_id(&volume.id).instance_id(&instance.id).send().await.unwrap();
    let found = eventually("the volume detached", || async {
        aws.find_volume(&owner.owner_uid).await.unwrap().filter(|v| v.state == VolumeState::Available)
    })
    .await;
    assert!(found.attachments.is_empty(), "{found:?}");
    assert_eq!(found.size_gib, 30);

    // Terminate (twice), gone from the owner's instances; the volume outlives it.
    aws.terminate_instance(&instance.id).await.unwrap();
    aws.terminate_instance(&instance.id).await.unwrap();
    eventually("the instance terminated", || async {
        aws.find_instances(&owner.owner_uid).await.unwrap().is_empty().then_some(())
    })
    .await;
    assert_eq!(aws.describe_instance("i-0000000000000dead").await.unwrap(), None);

    aws.delete_volume(&volume.id).await.unwrap();
    aws.delete_volume(&volume.id).await.unwrap();
    assert_eq!(aws.find_volume(&owner.owner_uid).await.unwrap(), None);
    aws.delete_security_group(&sg.id).await.unwrap();
    aws.delete_security_group(&sg.id).await.unwrap();
    assert_eq!(aws.find_security_group(&owner.owner_uid).await.unwrap(), None);

    // Every attempt was counted (the launch and its retry).
    let mut registry = Registry::with_prefix("qdb_operator");
    aws.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            r#"qdb_operator_aws_calls_total{service="ec2",operation="RunInstances",outcome="ok"} 2"#
        ),
        "{text}"
    );
}

#[tokio::test]
#[ignore = "needs the local cloud's AWS emulator"]
async fn route53_record_lifecycle() {
    let aws = emulator().await;
    let zone_name = format!("{}.questdb.example", owner().owner_uid);
    assert_eq!(aws.hosted_zone(&zone_name, false).await.unwrap(), None);
    let zone = aws.hosted_zone(&zone_name, true).await.unwrap().unwrap();
    assert_eq!(aws.hosted_zone(&zone_name, true).await.unwrap().as_deref(), Some(zone.as_str()));
    assert_eq!(
        aws.hosted_zone(&format!("{zone_name}."), false).await.unwrap().as_deref(),
        Some(zone.as_str())
    );

    let name = format!("db-test.questdb.{zone_name}");
    assert_eq!(aws.get_a_record(&zone, &name).await.unwrap(), None);
    aws.upsert_a_record(&zone, &name, "10.0.1.17", 60).await.unwrap();
    assert_eq!(aws.get_a_record(&zone, &name).await.unwrap(), Some(("10.0.1.17".into(), 60)));
    aws.upsert_a_record(&zone, &name, "10.0.1.18", 60).await.unwrap();
    assert_eq!(aws.get_a_record(&zone, &name).await.unwrap(), Some(("10.0.1.18".into(), 60)));
    // A neighbour sorting right after it is not mistaken for it.
    assert_eq!(aws.get_a_record(&zone, &format!("a.{name}")).await.unwrap(), None);
    aws.delete_a_record(&zone, &name).await.unwrap();
    aws.delete_a_record(&zone, &name).await.unwrap();
    assert_eq!(aws.get_a_record(&zone, &name).await.unwrap(), None);
}

#[tokio::test]
#[ignore = "needs the local cloud's AWS emulator"]
async fn route53_listing_pages_through_the_whole_zone() {
    let aws = emulator().await;
    let zone_name = format!("list-{}.questdb.example", owner().owner_uid);
    let zone = aws.hosted_zone(&zone_name, true).await.unwrap().unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("db-{i}.{zone_name}")).collect();
    for (i, name) in names.iter().enumerate() {
        aws.upsert_a_record(&zone, name, &format!("10.0.2.{i}"), 60).await.unwrap();
    }
    // Two records a page: three pages, and the zone's own NS and SOA records are left out.
    let mut listed = aws.list_a_records_paged(&zone, 2).await.unwrap();
    listed.sort();
    let want: Vec<(String, (String, i64))> =
        names.iter().enumerate().map(|(i, n)| (n.clone(), (format!("10.0.2.{i}"), 60))).collect();
    assert_eq!(listed, want);
    for name in &names {
        aws.delete_a_record(&zone, name).await.unwrap();
    }
    assert_eq!(aws.list_a_records(&zone).await.unwrap(), vec![]);
}

/// As EBS: a snapshot is pending for a while; no volume is made from it until it completes, and
/// then one at least its size; only the cluster's snapshots are found.
#[tokio::test]
#[ignore = "needs the local cloud's AWS emulator"]
async fn a_volume_is_made_only_from_a_completed_snapshot_of_the_cluster() {
    let aws = emulator().await;
    let (source, restored) = (owner(), owner());
    let zone = "eu-west-1a";
    let want: qdb_crd::VolumeSpec =
        serde_json::from_value(serde_json::json!({"sizeGib": 20, "type": "gp3"})).unwrap();
    let volume = aws.create_volume(&source, zone, &want, None).await.unwrap();
    eventually("the volume available", || async {
        aws.find_volume(&source.owner_uid).await.unwrap().filter(|v| v.state == VolumeState::Available)
    })
    .await;
    let tag = |cluster: &str| {
        aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
            .tags(aws_sdk_ec2::types::Tag::builder().key(keys::CLUSTER).value(cluster).build())
            .build()
    };
    let taken = aws.ec2.create_snapshot().volume_id(&volume.id).tag_specifications(tag("aws-test")).send();
    let id = taken.await.unwrap().snapshot_id.unwrap();
    let other = aws.ec2.create_snapshot().volume_id(&volume.id).tag_specifications(tag("elsewhere")).send();
    let other = other.await.unwrap().snapshot_id.unwrap();
    assert_eq!(aws.find_snapshot(&other, "aws-test").await.unwrap(), None, "another cluster's snapshot");

    let found = aws.find_snapshot(&id, "aws-test").await.unwrap().unwrap();
    assert_eq!(found.volume_size_gib, 20);
    let restore = Restore { snapshot_id: id.clone(), size_gib: 30, request: None };
    // With EC2's timing off (the scale benchmarks' emulator) a snapshot completes at once.
    if std::env::var("QDB_AWS_TIMING").as_deref() != Ok("instant") {
        assert_eq!(found.state, SnapshotState::Pending);
        let refused = aws.create_volume(&restored, zone, &want, Some(&restore)).await.unwrap_err();
        assert_eq!(refused.code(), Some("IncorrectState"), "{refused}");
    }
    eventually("the snapshot completed", || async {
        let s = aws.find_snapshot(&id, "aws-test").await.unwrap()?;
        (s.state == SnapshotState::Completed).then_some(s)
    })
    .await;
    let made = aws.create_volume(&restored, zone, &want, Some(&restore)).await.unwrap();
    assert_eq!(made.size_gib, 30);
    assert_ne!(made.id, volume.id);
    for snapshot in [&id, &other] {
        aws.ec2.delete_snapshot().snapshot_id(snapshot).send().await.unwrap();
    }
    for v in [&made.id, &volume.id] {
        eventually("the volume deleted", || async { aws.delete_volume(v).await.ok() }).await;
    }
}
