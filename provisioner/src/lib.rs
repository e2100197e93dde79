//! The provisioner: Kafka instructions become QuestDB resources in regional clusters.
//!
//! ```text
//! consumer --batch--> intake (classify, journal, answer) --offsets stored after commit
//! journal (PostgreSQL) --claimed per database--> worker (server-side apply / delete)
//! cluster watches --status--> tracker --> outbox --> gossip / dead-letter topics
//! ```
//! The journal is the only queue: every step reads and writes it, so any replica can carry on
//! after another dies, and nothing waits in memory.

pub mod aws_auth;
pub mod clusters;
pub mod config;
pub mod consumer;
pub mod gossip;
pub mod http;
pub mod intake;
pub mod journal;
pub mod lease;
pub mod mapping;
pub mod metrics;
pub mod outbox;
pub mod progress;
pub mod retention;
pub mod tracker;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kube::runtime::reflector;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::clusters::Registry;
use crate::config::{Config, ConfigError, FileConfig};
use crate::metrics::Metrics;
use crate::tracker::ClusterView;

/// What every task of one replica shares.
pub struct Shared {
    pub pool: PgPool,
    pub registry: Registry,
    pub views: BTreeMap<String, ClusterView>,
    pub metrics: Arc<Metrics>,
    pub replica: String,
    pub instructions_topic: String,
    pub gossip_topic: String,
    pub dlq_topic: String,
    pub max_parallel: usize,
    pub intake_batch: usize,
    pub max_message_bytes: usize,
    pub publish_max_bytes: usize,
    pub lease: Duration,
    pub max_retry_delay: Duration,
    pub journal_retention: Duration,
    /// Signs Kafka's OAUTHBEARER tokens when the brokers are MSK with IAM.
    pub msk_iam: Option<aws_auth::MskIam>,
    deadlines: BTreeMap<String, Duration>,
    default_deadline: Duration,
    /// In the consumer group (its first assignment came) and not stopping.
    pub consuming: Arc<AtomicBool>,
    pub work_wake: Notify,
    pub outbox_wake: Notify,
    pub sweep_wake: Notify,
}

impl Shared {
    pub fn deadline(&self, operation: &str) -> Duration {
        self.deadlines.get(operation).copied().unwrap_or(self.default_deadline)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("connecting to the journal database")]
    Database(#[source] sqlx::Error),
    #[error("running journal migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Registry(#[from] clusters::RegistryError),
    #[error("creating the Kafka consumer")]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// Wrong brokers, TLS settings or credentials: refused at start, not retried forever.
    #[error("cannot reach Kafka at {brokers} (check the brokers and the security settings)")]
    KafkaUnreachable { brokers: String, source: consumer::ConnectError },
    #[error("loading AWS credentials for MSK IAM")]
    Aws(#[source] aws_auth::AuthError),
    #[error("listening on {addr}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
}

pub use qdb_crd::error_chain;

/// Runs one replica until `stop` is cancelled, then shuts down in order: stop consuming and
/// commit, let in-flight applies finish, flush the outbox.
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), StartError> {
    let file = FileConfig::load(&config.config)?;
    let mut deadlines = BTreeMap::new();
    for op in ["create", "modify", "pause", "resume", "restart", "delete"] {
        deadlines.insert(op.to_string(), config.deadline_for(op)?);
    }
    let pool =
        journal::connect(&config.database_url, config.database_pool, journal::IDLE_IN_TRANSACTION_LIMIT)
            .await
            .map_err(StartError::Database)?;
    sqlx::migrate!("../migrations").run(&pool).await.map_err(StartError::Migrate)?;
    let registry = Registry::connect(&file).await?;
    let mut kafka = config.kafka_properties(&file, std::env::vars());
    let msk_iam = match &config.msk_iam_region {
        Some(region) => {
            kafka = config::with_msk_iam(kafka)?;
            let credentials = aws_auth::CredentialCache::load(region).await.map_err(StartError::Aws)?;
            Some(aws_auth::MskIam { region: region.clone(), credentials })
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new());

    let mut views = BTreeMap::new();
    let mut writers = Vec::new();
    for c in registry.iter() {
        let (store, writer) = reflector::store();
        views.insert(
            c.name.clone(),
            ClusterView { namespace: c.namespace.clone(), store, synced: AtomicBool::new(false) },
        );
        writers.push((c.name.clone(), writer));
    }
    let ctx = Arc::new(Shared {
        pool,
        registry,
        views,
        metrics: metrics.clone(),
        replica: config.replica(),
        instructions_topic: config.instructions_topic.clone(),
        gossip_topic: config.gossip_topic.clone(),
        dlq_topic: config.dlq_topic.clone(),
        max_parallel: config.max_parallel.max(1),
        intake_batch: config.intake_batch.max(1),
        max_message_bytes: config.max_message_bytes,
        publish_max_bytes: config.publish_max_bytes.max(64 * 1024),
        lease: Duration::from_secs(config.lease_secs.max(5)),
        max_retry_delay: Duration::from_secs(config.max_retry_delay_secs.max(1)),
        journal_retention: Duration::from_secs(config.journal_retention_secs),
        msk_iam: msk_iam.clone(),
        deadlines,
        default_deadline: Duration::from_secs(config.deadline_secs),
        consuming: Arc::new(AtomicBool::new(false)),
        work_wake: Notify::new(),
        outbox_wake: Notify::new(),
        sweep_wake: Notify::new(),
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let consumer = consumer::consumer(
        &config.brokers,
        &config.group_id,
        &kafka_with(&kafka, &config),
        metrics,
        msk_iam,
        ctx.consuming.clone(),
    )
    .map_err(StartError::Kafka)?;
    consumer::check_connection(&consumer, &config.instructions_topic)
        .await
        .map_err(|source| StartError::KafkaUnreachable { brokers: config.brokers.clone(), source })?;
    info!(replica = %ctx.replica, clusters = ctx.views.len(), listen = %config.listen, "provisioner starting");

    // Tasks stop in order: consumer first, then workers, watches and sweep, the outbox last.
    let stop_work = CancellationToken::new();
    let stop_outbox = CancellationToken::new();
    let http = tokio::spawn({
        let app = http::router(ctx.clone());
        let stop = stop_outbox.clone();
        async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        }
    });
    let mut producer_props =
        BTreeMap::from([("message.max.bytes".to_string(), ctx.publish_max_bytes.to_string())]);
    producer_props.extend(kafka_with(&kafka, &config));
    let outbox = tokio::spawn(outbox::run(ctx.clone(), producer_props, stop_outbox.clone()));
    let workers = tokio::spawn(worker::run(ctx.clone(), stop_work.clone()));
    let sweep = tokio::spawn(tracker::sweep(ctx.clone(), stop_work.clone()));
    let retention = tokio::spawn(retention::run(ctx.clone(), stop_work.clone()));
    let watches: Vec<_> = writers
        .into_iter()
        .map(|(name, writer)| tokio::spawn(tracker::watch(ctx.clone(), name, writer, stop_work.clone())))
        .collect();

    consumer::run(ctx.clone(), consumer, config.instructions_topic.clone(), stop.clone()).await;
    stop_work.cancel();
    let _ = workers.await;
    let _ = sweep.await;
    let _ = retention.await;
    for w in watches {
        let _ = w.await;
    }
    stop_outbox.cancel();
    let _ = outbox.await;
    let _ = http.await;
    info!("provisioner stopped");
    Ok(())
}

fn kafka_with(props: &BTreeMap<String, String>, config: &Config) -> BTreeMap<String, String> {
    let mut all = BTreeMap::from([("bootstrap.servers".to_string(), config.brokers.clone())]);
    all.extend(props.clone());
    all
}
