//! questdbctl against the local cloud: one database's whole story, and the dead-letter topic.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use qdb_proto::Message;
use qdb_proto::v1::{self, Phase, instruction::Operation};
use qdb_tests::eventually;
use qdb_tests::rig::{Rig, ins};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn questdbctl(rig: &Rig, args: &[&str]) -> Result<String> {
    let bin = std::path::PathBuf::from(rig.cloud.vars.get("QDB_BIN_DIR").context("QDB_BIN_DIR")?)
        .join("questdbctl");
    let out = Command::new(bin)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "questdbctl {args:?} failed: {text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_tells_the_whole_story_and_dead_letters_can_be_listed_and_replayed() -> Result<()> {
    let rig = Rig::new("cli", 1).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    // A real QuestDB (9.3.0), so that the snapshot is taken under its checkpoint.
    let create = ins::create("db-cli", "region-a", 1, "9.3.0");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, Duration::from_secs(90)).await?;
    let snap =
        ins::new("db-cli", "region-a", 2, Operation::Snapshot(v1::Snapshot { label: Some("oncall".into()) }));
    rig.send(&snap).await?;
    let first = gossip.phase(&snap.instruction_id, Phase::Succeeded, Duration::from_secs(90)).await?;
    // Keep one: the next snapshot's completion lets the first go, in EC2 and in status.
    let keep = v1::Modify {
        snapshot_policy: Some(v1::SnapshotPolicy { keep: Some(1), ..Default::default() }),
        ..Default::default()
    };
    let keep = ins::new("db-cli", "region-a", 3, Operation::Modify(keep));
    rig.send(&keep).await?;
    gossip.phase(&keep.instruction_id, Phase::Succeeded, Duration::from_secs(90)).await?;
    let snap =
        ins::new("db-cli", "region-a", 4, Operation::Snapshot(v1::Snapshot { label: Some("oncall".into()) }));
    rig.send(&snap).await?;
    let taken = gossip.phase(&snap.instruction_id, Phase::Succeeded, Duration::from_secs(90)).await?;
    let api = rig.questdbs("region-a").await?;
    eventually("the first snapshot let go", Duration::from_secs(60), || async {
        let status = api.get("db-cli").await?.status.unwrap_or_default();
        let ids: Vec<_> = status.snapshots.iter().map(|s| s.id.clone()).collect();
        Ok((ids == [taken.snapshot_id.clone()]).then_some(()))
    })
    .await?;
    let region_a = &rig.cloud.cluster("region-a")?.aws_region;
    let gone = rig
        .cloud
        .ec2(region_a)
        .await
        .describe_snapshots()
        .owner_ids("self")
        .snapshot_ids(&first.snapshot_id)
        .send()
        .await;
    ensure!(gone.map(|o| o.snapshots().is_empty()).unwrap_or(true), "{} outlived keep 1", first.snapshot_id);

    let c = rig.cloud.cluster("region-a")?;
    let (kubeconfig, region) = (c.kubeconfig.display().to_string(), c.aws_region.clone());
    let out = questdbctl(
        &rig,
        &[
            "status",
            "db-cli",
            "--namespace",
            &rig.namespace,
            "--kubeconfig",
            &kubeconfig,
            "--database-url",
            &rig.database_url,
            "--aws-region",
            &region,
            "--aws-endpoint",
            &rig.cloud.aws_endpoint,
        ],
    )?;
    for expected in [
        "phase Running",
        "Ready",
        "LaunchedInstance",
        "instance i-",
        "volume vol-",
        "security group sg-",
        &create.instruction_id,
        "succeeded",
        "== Snapshots",
        &format!("{} ", taken.snapshot_id),
        "Completed Consistent OnDemand",
        "label \"oncall\"",
    ] {
        ensure!(out.contains(expected), "status lacks {expected:?}:\n{out}");
    }

    let bad = ins::create("db-cli2", "mars", 1, "8.2.1");
    rig.send(&bad).await?;
    gossip.phase(&bad.instruction_id, Phase::Rejected, Duration::from_secs(60)).await?;
    let brokers = rig.cloud.kafka_brokers.clone();
    let list = eventually("the dead letter listed", Duration::from_secs(30), || async {
        let out = questdbctl(&rig, &["dlq", "list", "--brokers", &brokers, "--topic", &rig.dlq])?;
        Ok(out.contains(&bad.instruction_id).then_some(out))
    })
    .await?;
    ensure!(list.contains("UNKNOWN_CLUSTER"), "{list}");
    let offset = list
        .lines()
        .find(|l| l.contains(&bad.instruction_id))
        .and_then(|l| l.split_whitespace().next())
        .context("offset")?;
    questdbctl(
        &rig,
        &["dlq", "replay", offset, "--brokers", &brokers, "--topic", &rig.dlq, "--to", &rig.instructions],
    )?;
    // The replayed message is the same instruction: answered again from the journal.
    gossip
        .wait("the replayed instruction answered again", Duration::from_secs(60), |e| {
            e.instruction_id == bad.instruction_id && e.message.contains("duplicate")
        })
        .await?;
    // Deleted the default way: its snapshot is kept, marked so the orphan sweep leaves it.
    let delete = ins::new("db-cli", "region-a", 5, Operation::Delete(v1::Delete::default()));
    rig.send(&delete).await?;
    gossip.phase(&delete.instruction_id, Phase::Succeeded, Duration::from_secs(120)).await?;
    let ec2 = rig.cloud.ec2(&region).await;
    let kept = ec2.describe_snapshots().owner_ids("self").snapshot_ids(&taken.snapshot_id).send().await?;
    let tags: Vec<_> = kept.snapshots().iter().flat_map(|s| s.tags()).filter_map(|t| t.key()).collect();
    ensure!(tags.contains(&qdb_crd::keys::RETAINED), "{} not kept and marked: {tags:?}", taken.snapshot_id);
    ec2.delete_snapshot().snapshot_id(&taken.snapshot_id).send().await?;
    Ok(())
}

/// Issue 17: questdbctl reads every partition of the dead-letter topic, and takes the Kafka
/// security settings the provisioner takes (here SASL_SSL with SCRAM-SHA-512, as on MSK). Before,
/// it read partition 0 only, and over PLAINTEXT only.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_every_partition_are_listed_and_replayed_over_sasl_ssl() -> Result<()> {
    let rig = Rig::new("cli-dlq", 1).await?;
    // A dead-letter topic of three partitions, as production's may have (the rig's has one, so
    // tests can read letters in order).
    let dlq = format!("{}-3", rig.dlq);
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &rig.cloud.kafka_brokers).create()?;
    for r in admin
        .create_topics(&[NewTopic::new(&dlq, 3, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &rig.cloud.kafka_brokers).create()?;
    for partition in [1, 2] {
        let letter = ins::create(&format!("db-p{partition}"), "mars", 1, "8.2.1");
        let headers = OwnedHeaders::new()
            .insert(Header { key: "qdb.reject.reason", value: Some(&format!("TEST_PARTITION_{partition}")) });
        let payload = letter.encode_to_vec();
        let record = FutureRecord::to(&dlq)
            .partition(partition)
            .key(letter.database_id.as_bytes())
            .payload(&payload)
            .headers(headers);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    }
    let sasl_brokers = rig.sasl_brokers()?;
    let settings = rig.sasl_settings(None)?;
    let with_settings = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(settings.iter().cloned());
        all
    };
    let list = with_settings(&["dlq", "list", "--brokers", &sasl_brokers, "--topic", &dlq]);
    let out = questdbctl(&rig, &list.iter().map(String::as_str).collect::<Vec<_>>())?;
    for expected in ["1:0", "TEST_PARTITION_1", "2:0", "TEST_PARTITION_2", "db-p2-1-"] {
        ensure!(out.contains(expected), "the listing lacks {expected:?}:\n{out}");
    }
    let replayed = rig.raw_messages(&rig.instructions)?;
    let replay = with_settings(&[
        "dlq",
        "replay",
        "2:0",
        "--brokers",
        &sasl_brokers,
        "--topic",
        &dlq,
        "--to",
        &rig.instructions,
    ]);
    questdbctl(&rig, &replay.iter().map(String::as_str).collect::<Vec<_>>())?;
    let message = replayed
        .wait("the replayed letter", Duration::from_secs(30), |m| {
            m.headers.get("qdb.replayed-from").map(String::as_str) == Some("2:0")
        })
        .await?;
    let instruction = v1::Instruction::decode(message.payload.as_slice())?;
    assert_eq!(instruction.database_id, "db-p2", "the letter of partition 2, as it was");
    Ok(())
}
