//! The provisioner against the broker's SASL_SSL listener (SCRAM-SHA-512, the local CA), the way
//! MSK and most managed Kafka run: it consumes and publishes there, and a wrong password is
//! refused at start with the broker's reason instead of a silent reconnect loop.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use qdb_proto::v1::Phase;
use qdb_tests::rig::{Rig, ins};

#[tokio::test(flavor = "multi_thread")]
async fn provisioner_consumes_and_publishes_over_sasl_ssl_with_scram() -> Result<()> {
    let rig = Rig::new("kafka-sasl", 1).await?;
    let gossip = rig.gossip()?;
    let settings = rig.sasl_settings(None)?;
    let args: Vec<&str> = settings.iter().map(String::as_str).collect();
    let p = rig.spawn_with_brokers("r1", &rig.sasl_brokers()?, &args)?;
    p.wait_ready().await?;

    // Produced over plaintext by the backend; consumed, and answered on gossip, over SASL_SSL.
    let create = ins::create("db-sasl", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Applied, Duration::from_secs(60)).await?;
    let log = p.log_text();
    ensure!(!log.contains("Authentication failed"), "unexpected authentication failure: {log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_kafka_password_is_refused_at_start_with_the_reason() -> Result<()> {
    let rig = Rig::new("kafka-badpw", 1).await?;
    let settings = rig.sasl_settings(Some("not-the-password"))?;
    let args: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut p = rig.spawn_with_brokers("r1", &rig.sasl_brokers()?, &args)?;
    let status = p.wait_exit(Duration::from_secs(60)).await?;
    ensure!(!status.success(), "a provisioner with a wrong password must not start");
    let log = p.log_text();
    let failure =
        log.lines().find(|l| l.contains("provisioner failed")).context("no start-up failure logged")?;
    ensure!(failure.contains("cannot reach Kafka at"), "unclear start-up error: {failure}");
    ensure!(failure.contains("Authentication failed"), "the broker's reason is missing: {failure}");
    Ok(())
}
