//! Both tiers together on the local cloud: instructions through Kafka, the provisioner, the real
//! operator in region-a with the node simulator, and what the backend hears on gossip.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use qdb_operator::aws::InstanceState;
use qdb_proto::v1::{self, Phase, instruction::Operation};
use qdb_tests::rig::{Rig, ins};

const T: Duration = Duration::from_secs(120);

/// A node image upgrade replaces the node while the old one keeps serving, so the database is
/// Ready at the new generation long before the change is done. The backend must hear SUCCEEDED
/// only once it serves from the new image, with the old instance gone, and hear progress before.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_image_upgrade_succeeds_only_once_the_new_node_serves() -> Result<()> {
    let rig = Rig::new("sys-upgrade", 1).await?;
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;

    let create = ins::create("db1", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let before = api.get("db1").await?;
    let old = before.status.and_then(|s| s.node).context("no node after create")?;
    let uid = before.metadata.uid.context("uid")?;

    let image = "ami-0b0b0b0b0b0b0b0b0";
    let upgrade = ins::new(
        "db1",
        "region-a",
        2,
        Operation::Modify(v1::Modify { node_image: Some(image.into()), ..Default::default() }),
    );
    rig.send(&upgrade).await?;
    gossip.phase(&upgrade.instruction_id, Phase::Succeeded, T).await?;

    // At the moment of success: serving from a new instance of the new image, the old one gone.
    let now = api.get("db1").await?.status.context("status")?;
    let node = now.node.context("no node after the upgrade")?;
    ensure!(node.image == image && node.instance_id != old.instance_id, "success before the move: {node:?}");
    let live: Vec<_> = rig
        .aws("region-a")
        .await?
        .find_instances(&uid)
        .await?
        .into_iter()
        .filter(|i| !matches!(i.state, InstanceState::Terminated | InstanceState::ShuttingDown))
        .collect();
    ensure!(live.len() == 1 && live[0].id == node.instance_id, "instances at success: {live:?}");
    let phases = gossip.phases(&upgrade.instruction_id);
    ensure!(phases.contains(&Phase::Progressing), "no progress reported before success: {phases:?}");
    let progress: Vec<_> = gossip
        .events(&upgrade.instruction_id)
        .into_iter()
        .filter(|e| e.phase() == Phase::Progressing)
        .map(|e| e.message)
        .collect();
    println!("upgrade progress on gossip: {progress:?}");
    ensure!(progress.iter().any(|m| m.starts_with("ReplacingNode")), "{progress:?}");
    Ok(())
}

/// Issue 14 item 5, both tiers: a create whose image AWS does not know ends FAILED on gossip with
/// AWS's reason, written by the real operator (before, only a hand-patched status ever failed an
/// instruction, and the operator's CamelCase reason reached gossip unconverted).
#[tokio::test(flavor = "multi_thread")]
async fn a_create_with_an_image_aws_does_not_know_fails_on_gossip_with_the_aws_reason() -> Result<()> {
    const UNKNOWN: &str = "ami-0dead0dead0dead1";
    let rig = Rig::new("sys-badami", 1).await?;
    let gossip = rig.gossip()?;
    // The emulator launches any image id: the proxy answers as EC2 does for one that does not exist.
    let proxy = qdb_tests::scripted::unknown_image(&rig.cloud.aws_endpoint, UNKNOWN).await?;
    let _op = rig.spawn_operator("region-a", "a1", &["--aws-endpoint", &proxy.url])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;

    let mut create = ins::create("db-badami", "region-a", 1, "8.2.1");
    if let Some(Operation::Create(c)) = create.operation.as_mut() {
        c.spec.as_mut().context("spec")?.node_image = UNKNOWN.into();
    }
    rig.send(&create).await?;
    let end = gossip.end(&create.instruction_id, T).await?;
    ensure!(end.phase() == Phase::Failed, "{end:?}");
    ensure!(end.reason == "IMAGE_NOT_FOUND", "the operator's reason in gossip's case: {end:?}");
    ensure!(end.message.contains("InvalidAMIID.NotFound") && end.message.contains(UNKNOWN), "{end:?}");
    let state: String = sqlx::query_scalar("SELECT state FROM instructions WHERE id = $1")
        .bind(&create.instruction_id)
        .fetch_one(&rig.journal().await?)
        .await?;
    ensure!(state == "failed", "journal: {state}");
    Ok(())
}
