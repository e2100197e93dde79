//! questdbctl: what an on-call engineer needs about one database in one command, and the
//! dead-letter topic (list, replay).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use qdb_crd::QuestDB;
use qdb_operator::aws::{Aws, AwsConfig};
use qdb_proto::Message as _;
use qdb_provisioner::aws_auth::{CredentialCache, KafkaAuth, MskIam};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::Row;

#[derive(Parser)]
#[command(name = "questdbctl", about = "On-call view of QuestDB Cloud databases")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The resource, its conditions, recent events, AWS resources found by tag, and the
    /// instruction history from the provisioner's journal.
    Status {
        database: String,
        #[arg(long, default_value = "questdb")]
        namespace: String,
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: std::path::PathBuf,
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, env = "AWS_REGION")]
        aws_region: Option<String>,
        #[arg(long, env = "AWS_ENDPOINT_URL")]
        aws_endpoint: Option<String>,
    },
    /// The dead-letter topic.
    Dlq {
        #[command(subcommand)]
        command: Dlq,
        #[arg(long, env = "KAFKA_BROKERS", global = true, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long, global = true, default_value = "instructions-dlq")]
        topic: String,
        /// librdkafka property (repeatable), as the provisioner takes them, e.g.
        /// `-X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512`; `QDB_KAFKA_*`
        /// variables too (`QDB_KAFKA_SASL_PASSWORD` is `sasl.password`).
        #[arg(short = 'X', long = "kafka", global = true, value_parser = qdb_provisioner::config::parse_key_value)]
        kafka: Vec<(String, String)>,
        /// Amazon MSK with IAM authentication in this region, as the provisioner's flag.
        #[arg(long, env = "QDB_MSK_IAM_REGION", global = true)]
        msk_iam_region: Option<String>,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// Every dead letter: offset, reason, instruction id (if readable), where it came from.
    List,
    /// Publishes the dead letter at PARTITION:OFFSET (as `list` shows it; a bare OFFSET is in
    /// partition 0) to the instructions topic again, as it was received.
    Replay {
        #[arg(value_parser = parse_position)]
        position: Position,
        #[arg(long, default_value = "instructions")]
        to: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Status { database, namespace, kubeconfig, database_url, aws_region, aws_endpoint } => {
            status(&database, &namespace, &kubeconfig, database_url, aws_region, aws_endpoint).await
        }
        Command::Dlq { command: Dlq::List, brokers, topic, kafka, msk_iam_region } => {
            let (config, auth) = kafka_config(&brokers, &kafka, msk_iam_region).await?;
            for l in read_dlq(&config, auth, &topic)? {
                let id = qdb_proto::v1::Instruction::decode(l.payload.as_slice())
                    .map(|i| format!("{} ({} seq {})", i.instruction_id, i.database_id, i.sequence))
                    .unwrap_or_else(|_| "-".into());
                let h =
                    |k: &str| l.headers.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str()).unwrap_or("");
                println!(
                    "{:>10}  {:<20} {:<45} from {}/{}@{}  {}",
                    format!("{}:{}", l.partition, l.offset),
                    h("qdb.reject.reason"),
                    id,
                    h("qdb.source.topic"),
                    h("qdb.source.partition"),
                    h("qdb.source.offset"),
                    h("qdb.reject.message")
                );
            }
            Ok(())
        }
        Command::Dlq { command: Dlq::Replay { position, to }, brokers, topic, kafka, msk_iam_region } => {
            let (config, auth) = kafka_config(&brokers, &kafka, msk_iam_region).await?;
            let Position { partition, offset } = position;
            let letter = read_dlq(&config, KafkaAuth(auth.0.clone()), &topic)?
                .into_iter()
                .find(|l| l.partition == partition && l.offset == offset)
                .with_context(|| format!("no dead letter at {partition}:{offset}"))?;
            let producer: ThreadedProducer<KafkaAuth> =
                config.clone().set("enable.idempotence", "true").create_with_context(auth)?;
            let headers = OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "qdb.replayed-from",
                value: Some(&format!("{partition}:{offset}")),
            });
            let mut record = BaseRecord::to(&to).payload(&letter.payload).headers(headers);
            if let Some(k) = &letter.key {
                record = record.key(k);
            }
            producer.send(record).map_err(|(e, _)| e)?;
            producer.flush(Duration::from_secs(10))?;
            println!("replayed dead letter {partition}:{offset} to {to}");
            Ok(())
        }
    }
}

struct Letter {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

/// Where a dead letter is: `PARTITION:OFFSET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    partition: i32,
    offset: i64,
}

fn parse_position(s: &str) -> Result<Position, String> {
    let bad = || format!("{s:?} is not PARTITION:OFFSET (or an OFFSET of partition 0)");
    let (partition, offset) = match s.split_once(':') {
        Some((p, o)) => (p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?),
        None => (0, s.parse().map_err(|_| bad())?),
    };
    if partition < 0 || offset < 0 {
        return Err(bad());
    }
    Ok(Position { partition, offset })
}

/// A client configuration for `brokers` with the properties of `-X` and `QDB_KAFKA_*`, and MSK
/// IAM's token signer where asked for.
async fn kafka_config(
    brokers: &str,
    flags: &[(String, String)],
    msk_iam_region: Option<String>,
) -> Result<(ClientConfig, KafkaAuth)> {
    let mut props =
        qdb_provisioner::config::stack_kafka_properties(&Default::default(), std::env::vars(), flags);
    let mut auth = KafkaAuth(None);
    if let Some(region) = msk_iam_region {
        props = qdb_provisioner::config::with_msk_iam(props)?;
        let credentials = CredentialCache::load(&region).await?;
        auth = KafkaAuth(Some(MskIam { region, credentials }));
    }
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in props {
        config.set(k, v);
    }
    Ok((config, auth))
}

/// The whole dead-letter topic, every partition, read without joining any group.
fn read_dlq(config: &ClientConfig, auth: KafkaAuth, topic: &str) -> Result<Vec<Letter>> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer<KafkaAuth> = config
        .clone()
        .set("group.id", "questdbctl")
        .set("enable.auto.commit", "false")
        .create_with_context(auth)?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout).context("reading the topic's metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions: does it exist?");
    }
    // Where each partition ends now; letters arriving while this reads are for the next listing.
    let mut ends = std::collections::BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            ends.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            bail!("read {} dead letters in 30 s; partitions {:?} not to their end", out.len(), ends.keys());
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
        let m = m?;
        if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
            ends.remove(&m.partition());
        }
        out.push(Letter {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            headers: qdb_provisioner::consumer::text_headers(&m),
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    drop(consumer);
    out.sort_by_key(|l| (l.partition, l.offset));
    Ok(out)
}

async fn status(
    database: &str,
    namespace: &str,
    kubeconfig: &std::path::Path,
    database_url: Option<String>,
    aws_region: Option<String>,
    aws_endpoint: Option<String>,
) -> Result<()> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?,
    )?;
    let api: Api<QuestDB> = Api::namespaced(client.clone(), namespace);
    let q = api.get_opt(database).await?;
    println!("== QuestDB {namespace}/{database}");
    let uid = match &q {
        None => {
            println!("   not found in the cluster");
            None
        }
        Some(q) => {
            let s = q.status.clone().unwrap_or_default();
            println!(
                "   phase {}  version {}  instance {}  image {}  generation {} (observed {})",
                s.phase.map(|p| p.as_str()).unwrap_or("-"),
                q.spec.version,
                q.spec.instance_type,
                q.spec.node_image,
                q.metadata.generation.unwrap_or_default(),
                s.observed_generation.unwrap_or_default()
            );
            if let Some(n) = &s.node {
                println!(
                    "   node {} ({}, {}) ip {}",
                    n.name,
                    n.instance_id,
                    n.zone,
                    n.private_ip.clone().unwrap_or_default()
                );
            }
            if let Some(v) = &s.volume {
                println!("   volume {} {} GiB", v.id, v.size_gib);
            }
            if let Some(e) = &s.endpoints {
                println!("   endpoints {} | {} | {}", e.http, e.pgwire, e.ilp);
            }
            if let Some(f) = &s.last_failover {
                println!("   last failover at {} from {}: {}", f.at.0, f.from_node, f.reason);
            }
            if let Some(r) = &s.restore {
                println!(
                    "   restore under way: {} into {}, step {:?}, old volume {}, since {}",
                    r.snapshot, r.zone, r.step, r.old_volume, r.started_at.0
                );
            }
            if let Some(r) = &s.last_restore {
                match &r.error {
                    Some(why) => println!("   last restore of {} at {} refused: {why}", r.snapshot, r.at.0),
                    None => println!(
                        "   last restore: {} at {} on {} in {}, data as of {}",
                        r.snapshot,
                        r.at.0,
                        r.volume.as_deref().unwrap_or("-"),
                        r.zone.as_deref().unwrap_or("-"),
                        r.data_taken_at.as_ref().map_or_else(|| "-".to_string(), |t| t.0.to_string())
                    ),
                }
            }
            println!("== Snapshots");
            for line in snapshot_lines(&s.snapshots, s.checkpoint.as_ref()) {
                println!("   {line}");
            }
            println!("== Conditions");
            for c in &s.conditions {
                println!("   {:<12} {:<6} {:<20} {}", c.type_, c.status, c.reason, c.message);
            }
            q.metadata.uid.clone()
        }
    };
    println!("== Events");
    let events: Api<Event> = Api::namespaced(client, namespace);
    let mut list = events.list(&ListParams::default()).await?.items;
    list.retain(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(database));
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    for e in list.iter().rev().take(20).rev() {
        let at = e.event_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        println!(
            "   {at} {:<8} {:<22} {}",
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.note.clone().unwrap_or_default()
        );
    }
    if let (Some(uid), Some(region)) = (&uid, aws_region) {
        println!("== AWS (tag cloud.questdb.io/owner-uid={uid})");
        let cfg = AwsConfig { region, endpoint: aws_endpoint, ..AwsConfig::default() };
        let aws = Aws::new(&cfg).await;
        for i in aws.find_instances(uid).await? {
            println!(
                "   instance {} {:?} {} {} {}",
                i.id,
                i.state,
                i.instance_type,
                i.image_id,
                i.private_ip.unwrap_or_default()
            );
        }
        if let Some(v) = aws.find_volume(uid).await? {
            let to: Vec<String> =
                v.attachments.iter().map(|a| format!("{} ({})", a.instance_id, a.state.as_str())).collect();
            println!(
                "   volume {} {} GiB {} attached to [{}]",
                v.id,
                v.size_gib,
                v.state.as_str(),
                to.join(", ")
            );
        }
        if let Some(g) = aws.find_security_group(uid).await? {
            println!("   security group {} with {} rules", g.id, g.rules.len());
        }
    }
    if let Some(url) = database_url {
        println!("== Instructions (journal)");
        let pool = sqlx::PgPool::connect(&url).await?;
        let rows = sqlx::query(
            "SELECT id, sequence, operation, state, reason, message, received_at::text AS at FROM instructions
             WHERE database_id = $1 ORDER BY sequence, received_at",
        )
        .bind(database)
        .fetch_all(&pool)
        .await?;
        for r in rows {
            let (id, seq, op, state): (String, i64, String, String) =
                (r.get("id"), r.get("sequence"), r.get("operation"), r.get("state"));
            let (reason, message, at): (String, String, String) =
                (r.get("reason"), r.get("message"), r.get("at"));
            println!("   {at} seq {seq:<4} {op:<8} {state:<10} {id} {reason} {message}");
        }
    }
    Ok(())
}

/// The database's snapshots, oldest first, one line each (what a restore or a clone names), and
/// a checkpoint step left open.
fn snapshot_lines(
    snapshots: &[qdb_crd::SnapshotStatus],
    checkpoint: Option<&qdb_crd::CheckpointStatus>,
) -> Vec<String> {
    let mut lines: Vec<String> = snapshots
        .iter()
        .map(|s| {
            format!(
                "{} {} {} GiB {:?} {:?} {:?} request {}{}",
                s.id,
                s.taken_at.0,
                s.size_gib,
                s.state,
                s.consistency,
                s.reason,
                s.request,
                s.label.as_ref().map(|l| format!(" label {l:?}")).unwrap_or_default()
            )
        })
        .collect();
    if lines.is_empty() {
        lines.push("none".into());
    }
    if let Some(c) = checkpoint {
        lines.push(format!(
            "CHECKPOINT in effect since {} for request {} (released by the operator)",
            c.since.0, c.request
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use qdb_crd::{CheckpointStatus, Consistency, SnapshotPhase, SnapshotReason, SnapshotStatus};

    #[test]
    fn positions_name_a_partition_and_an_offset() {
        assert_eq!(parse_position("2:17"), Ok(Position { partition: 2, offset: 17 }));
        assert_eq!(parse_position("17"), Ok(Position { partition: 0, offset: 17 }), "as before");
        for bad in ["", "a:1", "1:", "-1:3", "1:-3", "1:2:3"] {
            assert!(parse_position(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshots_are_listed_one_per_line_with_an_open_checkpoint_after() {
        assert_eq!(snapshot_lines(&[], None), ["none"]);
        let s = SnapshotStatus {
            id: "snap-1".into(),
            request: "i-1".into(),
            label: Some("nightly".into()),
            taken_at: Time(jiff::Timestamp::UNIX_EPOCH),
            size_gib: 20,
            state: SnapshotPhase::Completed,
            consistency: Consistency::Consistent,
            reason: SnapshotReason::OnDemand,
        };
        let c = CheckpointStatus { request: "i-2".into(), since: Time(jiff::Timestamp::UNIX_EPOCH) };
        let lines = snapshot_lines(&[s], Some(&c));
        assert_eq!(
            lines[0],
            "snap-1 1970-01-01T00:00:00Z 20 GiB Completed Consistent OnDemand request i-1 label \"nightly\""
        );
        assert!(
            lines[1].starts_with("CHECKPOINT in effect since 1970-01-01T00:00:00Z for request i-2"),
            "{}",
            lines[1]
        );
    }
}
