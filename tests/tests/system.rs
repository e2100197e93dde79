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
