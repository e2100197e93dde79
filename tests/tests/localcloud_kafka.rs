//! The local cloud's Kafka-API broker does what the provisioner relies on: topics, a consumer
//! group with manual offset commits, and a new consumer resuming from the committed offset.

use std::time::Duration;

use anyhow::{Context, Result};
use qdb_tests::{Cloud, unique};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

fn consumer(brokers: &str, group: &str) -> Result<StreamConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

/// Leaves the group, then destroys the client off the runtime's threads. The destroy of this
/// test's consumer (manual commits, messages left unread) blocks for good against Apache Kafka
/// 4.1 exactly as it did against tansu, so it is the client's, not the broker's (rust-rdkafka's
/// drop waits for a close that never completes, cf. its issues #509 and #611): it is given up on
/// after a while, the group membership being released by the unsubscribe already.
async fn close(c: StreamConsumer) -> Result<()> {
    c.unsubscribe();
    let handle = tokio::task::spawn_blocking(move || drop(c));
    if tokio::time::timeout(Duration::from_secs(10), handle).await.is_err() {
        eprintln!("consumer destroy still blocked after 10s; moving on");
    }
    Ok(())
}

async fn next_payload(c: &StreamConsumer) -> Result<(i64, String)> {
    let msg =
        tokio::time::timeout(Duration::from_secs(30), c.recv()).await.context("no message within 30s")??;
    let payload = String::from_utf8(msg.payload().unwrap_or_default().to_vec())?;
    Ok((msg.offset(), payload))
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_group_resumes_from_committed_offsets() -> Result<()> {
    let cloud = Cloud::load()?;
    let topic = unique("lc-kafka");
    let group = unique("lc-group");

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &cloud.kafka_brokers).create()?;
    let created = admin
        .create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cloud.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    for i in 0..10 {
        producer
            .send(
                FutureRecord::to(&topic).key("db-1").payload(&format!("m{i}")),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce m{i}: {e}"))?;
    }

    // The first consumer reads five messages and commits after the fifth, then goes away.
    let first = consumer(&cloud.kafka_brokers, &group)?;
    first.subscribe(&[&topic])?;
    for i in 0..5 {
        let msg = tokio::time::timeout(Duration::from_secs(30), first.recv())
            .await
            .context("first consumer idle")??;
        assert_eq!(msg.payload(), Some(format!("m{i}").as_bytes()));
        if i == 4 {
            first.commit_message(&msg, CommitMode::Sync)?;
        }
    }
    let committed = first.committed(Timeout::After(Duration::from_secs(10)))?;
    let offset = committed.elements_for_topic(&topic).first().map(|e| e.offset());
    assert_eq!(offset, Some(rdkafka::Offset::Offset(5)));
    close(first).await?;

    // A new member of the group starts exactly after the committed offset.
    let second = consumer(&cloud.kafka_brokers, &group)?;
    second.subscribe(&[&topic])?;
    for i in 5..10 {
        let (offset, payload) = next_payload(&second).await?;
        assert_eq!((offset, payload), (i, format!("m{i}")));
    }
    close(second).await?;
    Ok(())
}
