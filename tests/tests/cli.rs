//! questdbctl against the local cloud: one database's whole story, and the dead-letter topic.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use qdb_proto::v1::Phase;
use qdb_tests::eventually;
use qdb_tests::rig::{Rig, ins};

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
    let create = ins::create("db-cli", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, Duration::from_secs(90)).await?;

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
    Ok(())
}
