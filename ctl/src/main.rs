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
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
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
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// Every dead letter: offset, reason, instruction id (if readable), where it came from.
    List,
    /// Publishes the dead letter at OFFSET to the instructions topic again, as it was received.
    Replay {
        offset: i64,
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
        Command::Dlq { command: Dlq::List, brokers, topic } => {
            for l in read_dlq(&brokers, &topic)? {
                let id = qdb_proto::v1::Instruction::decode(l.payload.as_slice())
                    .map(|i| format!("{} ({} seq {})", i.instruction_id, i.database_id, i.sequence))
                    .unwrap_or_else(|_| "-".into());
                let h =
                    |k: &str| l.headers.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str()).unwrap_or("");
                println!(
                    "{:>6}  {:<20} {:<45} from {}/{}@{}  {}",
                    l.offset,
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
        Command::Dlq { command: Dlq::Replay { offset, to }, brokers, topic } => {
            let letter = read_dlq(&brokers, &topic)?
                .into_iter()
                .find(|l| l.offset == offset)
                .with_context(|| format!("no dead letter at offset {offset}"))?;
            let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("enable.idempotence", "true")
                .create()?;
            let headers = OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "qdb.replayed-from",
                value: Some(&offset.to_string()),
            });
            let mut record = BaseRecord::to(&to).payload(&letter.payload).headers(headers);
            if let Some(k) = &letter.key {
                record = record.key(k);
            }
            producer.send(record).map_err(|(e, _)| e)?;
            producer.flush(Duration::from_secs(10))?;
            println!("replayed dead letter {offset} to {to}");
            Ok(())
        }
    }
}

struct Letter {
    offset: i64,
    key: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

/// The whole dead-letter topic (partition 0), read without joining any group.
fn read_dlq(brokers: &str, topic: &str) -> Result<Vec<Letter>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "questdbctl")
        .set("enable.auto.commit", "false")
        .create()?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.last().map_or(low, |l: &Letter| l.offset + 1) < high {
        if std::time::Instant::now() > deadline {
            bail!("read {} of {} dead letters in 30 s", out.len(), high - low);
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
        let m = m?;
        let headers = qdb_provisioner::consumer::text_headers(&m);
        out.push(Letter {
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    drop(consumer);
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
