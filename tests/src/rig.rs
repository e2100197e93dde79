//! A private provisioner set-up per test on the shared local cloud: its own PostgreSQL database,
//! Kafka topics, consumer group and namespace in every cluster, so tests run in parallel and a
//! killed provisioner in one test cannot disturb another. Also plays the backend (produces
//! instructions, reads gossip) and, where a test needs it, the operator (writes CR status).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use qdb_crd::{QuestDB, keys};
use qdb_proto::Message;
use qdb_proto::v1::{self, GossipEvent, Phase, instruction::Operation};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::{Cloud, eventually, kube_client, unique};

pub struct Rig {
    pub cloud: Cloud,
    pub name: String,
    pub database_url: String,
    pub instructions: String,
    pub gossip: String,
    pub dlq: String,
    pub group: String,
    pub namespace: String,
    pub config: PathBuf,
    pub dir: PathBuf,
    producer: FutureProducer,
}

impl Rig {
    pub async fn new(prefix: &str, partitions: i32) -> Result<Rig> {
        Self::with_instructions_config(prefix, partitions, &[]).await
    }

    /// A rig whose instructions topic has these topic settings (e.g. a larger
    /// `max.message.bytes` than the broker's, as a backend's topic may have).
    pub async fn with_instructions_config(
        prefix: &str,
        partitions: i32,
        instructions_config: &[(&str, &str)],
    ) -> Result<Rig> {
        let cloud = Cloud::load()?;
        let name = unique(prefix);
        let dir = PathBuf::from(cloud.vars.get("QDB_RUN").cloned().unwrap_or_else(|| "/tmp".into()))
            .join("tests")
            .join(&name);
        std::fs::create_dir_all(&dir)?;

        let db = name.replace('-', "_");
        let admin = sqlx::PgPool::connect(&cloud.database_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).execute(&admin).await?;
        admin.close().await;
        let database_url = match cloud.database_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db}"),
            None => bail!("unexpected DATABASE_URL {}", cloud.database_url),
        };

        let (instructions, gossip, dlq) =
            (format!("{name}-instructions"), format!("{name}-gossip"), format!("{name}-dlq"));
        let kafka: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &cloud.kafka_brokers).create()?;
        let mut instructions_topic = NewTopic::new(&instructions, partitions, TopicReplication::Fixed(1));
        for (k, v) in instructions_config {
            instructions_topic = instructions_topic.set(k, v);
        }
        let topics = [
            instructions_topic,
            NewTopic::new(&gossip, 3, TopicReplication::Fixed(1)),
            NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
        ];
        for r in kafka.create_topics(&topics, &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }

        let namespace = name.clone();
        let mut clusters = BTreeMap::new();
        for c in &cloud.clusters {
            let client = kube_client(&c.kubeconfig).await?;
            let ns = restricted_namespace(&namespace);
            Api::<Namespace>::all(client).create(&PostParams::default(), &ns).await?;
            clusters.insert(
                c.name.clone(),
                json!({"kubeconfig": c.provisioner_kubeconfig, "namespace": namespace}),
            );
        }
        let config = dir.join("provisioner.yaml");
        std::fs::write(&config, serde_yaml::to_string(&json!({ "clusters": clusters }))?)?;

        let producer = ClientConfig::new()
            .set("bootstrap.servers", &cloud.kafka_brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()?;
        Ok(Rig {
            group: format!("{name}-group"),
            cloud,
            name,
            database_url,
            instructions,
            gossip,
            dlq,
            namespace,
            config,
            dir,
            producer,
        })
    }

    /// Starts a provisioner replica as its own process.
    pub fn spawn(&self, replica: &str, extra: &[&str]) -> Result<Provisioner> {
        self.spawn_with_brokers(replica, &self.cloud.kafka_brokers, extra)
    }

    /// A replica that reaches Kafka through `brokers` (another listener of the same broker),
    /// with `extra` carrying its security settings (`-X key=value`).
    pub fn spawn_with_brokers(&self, replica: &str, brokers: &str, extra: &[&str]) -> Result<Provisioner> {
        self.spawn_process(replica, brokers, &self.config, &self.database_url, extra)
    }

    /// A replica with its own cluster registry (see `config_through`).
    pub fn spawn_with_config(&self, replica: &str, config: &Path, extra: &[&str]) -> Result<Provisioner> {
        self.spawn_process(replica, &self.cloud.kafka_brokers, config, &self.database_url, extra)
    }

    /// A replica that reaches its journal through `addr` (a proxy in front of PostgreSQL).
    pub fn spawn_with_journal_through(
        &self,
        replica: &str,
        addr: std::net::SocketAddr,
        extra: &[&str],
    ) -> Result<Provisioner> {
        let (_, db) = self.database_url.rsplit_once('/').context("database name in the rig's URL")?;
        let url = format!("postgres://postgres@{addr}/{db}");
        self.spawn_process(replica, &self.cloud.kafka_brokers, &self.config, &url, extra)
    }

    /// The address PostgreSQL listens on.
    pub fn journal_addr(&self) -> Result<std::net::SocketAddr> {
        let (_, rest) = self.database_url.split_once('@').context("host in the rig's URL")?;
        let (hostport, _) = rest.split_once('/').context("database in the rig's URL")?;
        hostport.parse().with_context(|| format!("PostgreSQL address {hostport}"))
    }

    /// A cluster registry like the rig's, except that `cluster`'s apiserver is reached through
    /// `addr` (a proxy in front of it; the apiserver's certificate names 127.0.0.1, so TLS holds).
    pub fn config_through(&self, cluster: &str, addr: std::net::SocketAddr) -> Result<PathBuf> {
        let registry: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&self.config)?)?;
        let original = registry["clusters"][cluster]["kubeconfig"]
            .as_str()
            .context("kubeconfig in the rig's registry")?;
        let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(original)?)?;
        for c in kubeconfig["clusters"].as_sequence_mut().context("clusters in kubeconfig")? {
            c["cluster"]["server"] = format!("https://{addr}").into();
        }
        let kubeconfig_path = self.dir.join(format!("{cluster}-through-{}.kubeconfig", addr.port()));
        std::fs::write(&kubeconfig_path, serde_yaml::to_string(&kubeconfig)?)?;
        self.config_with_kubeconfig(cluster, &kubeconfig_path)
    }

    /// A cluster registry like the rig's, except that `cluster` is reached with `kubeconfig`.
    pub fn config_with_kubeconfig(&self, cluster: &str, kubeconfig: &Path) -> Result<PathBuf> {
        let mut registry: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&self.config)?)?;
        registry["clusters"][cluster]["kubeconfig"] = kubeconfig.display().to_string().into();
        let name = kubeconfig.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let path = self.dir.join(format!("provisioner-{name}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&registry)?)?;
        Ok(path)
    }

    /// The address `cluster`'s apiserver listens on.
    pub fn apiserver_addr(&self, cluster: &str) -> Result<std::net::SocketAddr> {
        let c = self.cloud.clusters.iter().find(|c| c.name == cluster).context("no such cluster")?;
        let kubeconfig: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig)?)?;
        let server =
            kubeconfig["clusters"][0]["cluster"]["server"].as_str().context("server in kubeconfig")?;
        let hostport = server.trim_start_matches("https://").trim_end_matches('/');
        hostport.parse().with_context(|| format!("apiserver address {hostport}"))
    }

    fn spawn_process(
        &self,
        replica: &str,
        brokers: &str,
        config: &Path,
        database_url: &str,
        extra: &[&str],
    ) -> Result<Provisioner> {
        let bin = bin_dir(&self.cloud).join("qdb-provisioner");
        let port = free_port()?;
        let log_path = self.dir.join(format!("{replica}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(&bin)
            .args(["--config", &config.display().to_string()])
            .args(["--brokers", brokers])
            .args(["--group-id", &self.group])
            .args(["--instructions-topic", &self.instructions])
            .args(["--gossip-topic", &self.gossip])
            .args(["--dlq-topic", &self.dlq])
            .args(["--database-url", database_url])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--replica-id", replica])
            .args(extra)
            .env("RUST_LOG", "info,kube_runtime=warn,sqlx=warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} (built by localcloud up)", bin.display()))?;
        Ok(Provisioner { child: Some(child), url: format!("http://127.0.0.1:{port}"), log: log_path })
    }

    /// Has the local cloud's Prometheus scrape `process` (its `/metrics`) as job `job`, until
    /// the rig's target file is removed. Returns the file.
    pub fn scrape(&self, job: &str, process: &Provisioner) -> Result<PathBuf> {
        let dir = self.cloud.vars.get("QDB_PROMETHEUS_TARGETS").context("QDB_PROMETHEUS_TARGETS")?;
        let target = process.url.trim_start_matches("http://");
        let file = PathBuf::from(dir).join(format!("{}-{job}.json", self.name));
        let body = json!([{"targets": [target], "labels": {"job": job, "rig": self.name}}]);
        // Written whole, then renamed: Prometheus may read the directory at any moment.
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&body)?)?;
        std::fs::rename(&tmp, &file)?;
        Ok(file)
    }

    /// The DNS zone this rig's operators use (one per rig: the emulator would make a second
    /// zone of the same name if two operators created it at once).
    pub fn dns_zone(&self) -> String {
        format!("{}.questdb.test", self.name)
    }

    /// Starts an operator for `cluster` as its own process, watching only this rig's namespace.
    pub fn spawn_operator(&self, cluster: &str, identity: &str, extra: &[&str]) -> Result<Operator> {
        let c = self.cloud.cluster(cluster)?;
        let bin = bin_dir(&self.cloud).join("qdb-operator");
        let port = free_port()?;
        let log_path = self.dir.join(format!("operator-{cluster}-{identity}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        // Defaults a caller may override in `extra`: a test may put something (a fault proxy)
        // between the operator and the emulator or the apiserver, a benchmark may resync less often.
        // The lease is the production one (15 s, renew deadline 10 s): with a 6 s lease, a 4 s
        // apiserver stall on a loaded 2-core machine (Lease PUTs answered "Handler timeout")
        // made a test's only operator give up its lease and exit, and its database waited for
        // ever (CI, stop 33). Tests of a handover pass a short lease themselves.
        let kubeconfig = c.operator_kubeconfig.display().to_string();
        let defaults = [
            ("--kubeconfig", kubeconfig.as_str()),
            ("--aws-endpoint", self.cloud.aws_endpoint.as_str()),
            ("--resync-secs", "5"),
            ("--poll-secs", "1"),
        ];
        let defaults = defaults.iter().filter(|(flag, _)| !extra.contains(flag)).flat_map(|(f, v)| [*f, *v]);
        let child = Command::new(&bin)
            .args(["--cluster", cluster])
            .args(["--dns-zone", &self.dns_zone()])
            .arg("--create-hosted-zone")
            .args(["--aws-region", &c.aws_region])
            .args(defaults)
            .args(["--namespace", &self.namespace])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--lease-namespace", &self.namespace])
            .args(["--identity", identity])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            // The cluster's VPC, subnets, node profile: as the main job's operators run.
            .envs(c.network.iter().cloned())
            .env("RUST_LOG", "info,kube_runtime=warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} (built by localcloud up)", bin.display()))?;
        Ok(Operator(Provisioner {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log: log_path,
        }))
    }

    pub async fn send(&self, ins: &v1::Instruction) -> Result<()> {
        self.send_raw(ins.database_id.as_bytes(), &ins.encode_to_vec()).await
    }

    /// Produces all of them at once (queued together, then every delivery awaited), in order
    /// per database.
    pub async fn send_many(&self, all: &[v1::Instruction]) -> Result<()> {
        let payloads: Vec<_> = all.iter().map(|i| (i.database_id.as_bytes(), i.encode_to_vec())).collect();
        let mut deliveries = Vec::with_capacity(all.len());
        for (key, payload) in &payloads {
            let record = FutureRecord::to(&self.instructions).key(*key).payload(payload);
            deliveries
                .push(self.producer.send_result(record).map_err(|(e, _)| anyhow::anyhow!("queueing: {e}"))?);
        }
        for d in deliveries {
            d.await?.map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?;
        }
        Ok(())
    }

    pub async fn send_raw(&self, key: &[u8], payload: &[u8]) -> Result<()> {
        self.producer
            .send(FutureRecord::to(&self.instructions).key(key).payload(payload), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?;
        Ok(())
    }

    /// The broker's SASL_SSL listener (SCRAM-SHA-512, the local CA), as MSK runs Kafka.
    pub fn sasl_brokers(&self) -> Result<String> {
        self.cloud
            .vars
            .get("QDB_SASL_SSL_BROKERS")
            .cloned()
            .context("QDB_SASL_SSL_BROKERS missing from the env file")
    }

    /// `-X` settings for the SASL_SSL listener with `password` (None: the right one), as the
    /// provisioner and questdbctl take them.
    pub fn sasl_settings(&self, password: Option<&str>) -> Result<Vec<String>> {
        let var = |k: &str| {
            self.cloud.vars.get(k).cloned().with_context(|| format!("{k} missing from the env file"))
        };
        let password = match password {
            Some(p) => p.to_string(),
            None => var("QDB_SASL_PASSWORD")?,
        };
        Ok([
            "security.protocol=SASL_SSL".to_string(),
            "sasl.mechanisms=SCRAM-SHA-512".to_string(),
            format!("sasl.username={}", var("QDB_SASL_USER")?),
            format!("sasl.password={password}"),
            format!("ssl.ca.location={}", var("QDB_SASL_SSL_CA")?),
        ]
        .into_iter()
        .flat_map(|kv| ["-X".to_string(), kv])
        .collect())
    }

    /// Starts reading the gossip topic from its beginning.
    pub fn gossip(&self) -> Result<Reader<GossipEvent>> {
        Reader::start(&self.cloud.kafka_brokers, &self.gossip, |payload, _| GossipEvent::decode(payload).ok())
    }

    /// Starts reading the dead-letter topic: (headers, payload) per message.
    pub fn dead_letters(&self) -> Result<Reader<DeadLetter>> {
        self.raw_messages(&self.dlq)
    }

    /// Starts reading `topic` from its beginning, every partition: (headers, payload) per message.
    pub fn raw_messages(&self, topic: &str) -> Result<Reader<DeadLetter>> {
        Reader::start(&self.cloud.kafka_brokers, topic, |payload, headers| {
            Some(DeadLetter { headers: headers.clone(), payload: payload.to_vec() })
        })
    }

    /// QuestDB resources of this rig in `cluster`, as the admin sees them.
    pub async fn questdbs(&self, cluster: &str) -> Result<Api<QuestDB>> {
        let c = self.cloud.cluster(cluster)?;
        Ok(Api::namespaced(kube_client(&c.kubeconfig).await?, &self.namespace))
    }

    /// An AWS client for `cluster`'s region of the emulator, built as the operator builds its own.
    pub async fn aws(&self, cluster: &str) -> Result<qdb_operator::aws::Aws> {
        self.cloud.aws(cluster).await
    }

    /// The journal of this rig's provisioner.
    pub async fn journal(&self) -> Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&self.database_url).await?)
    }
}

/// The control plane's binaries: `QDB_BIN_DIR` of this process (the benchmark report points it
/// at a release build), else the local cloud's debug build.
fn bin_dir(cloud: &Cloud) -> PathBuf {
    if let Ok(d) = std::env::var("QDB_BIN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = cloud.vars.get("QDB_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| "target".into()).join("debug")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A provisioner process; killed when dropped.
pub struct Provisioner {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Provisioner {
    pub async fn wait_ready(&self) -> Result<()> {
        let url = format!("{}/readyz", self.url);
        eventually(&format!("provisioner ready (log {})", self.log.display()), Duration::from_secs(60), || {
            let url = url.clone();
            async move { Ok(reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(|_| ())) }
        })
        .await
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.url)).await?.text().await?)
    }

    /// The status code and body of a GET on `path` (/healthz, /readyz).
    pub async fn probe(&self, path: &str) -> Result<(u16, String)> {
        let r = reqwest::get(format!("{}{path}", self.url)).await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Waits for the process to exit on its own (a start-up refusal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(c) = self.child.as_mut() else { bail!("not running") };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("provisioner still running after {timeout:?} (log {})", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for the exit code.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("not running") };
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                let _ = c.kill();
                bail!("provisioner did not exit within {timeout:?} of SIGTERM (log {})", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An operator process (same handling as a provisioner's); killed when dropped.
pub struct Operator(pub Provisioner);

impl Operator {
    /// `/readyz` or `/healthz`: the status code and the body.
    pub async fn probe(&self, path: &str) -> Result<(u16, String)> {
        let r = reqwest::get(format!("{}{path}", self.url)).await?;
        Ok((r.status().as_u16(), r.text().await?))
    }
}

impl std::ops::Deref for Operator {
    type Target = Provisioner;
    fn deref(&self) -> &Provisioner {
        &self.0
    }
}

impl std::ops::DerefMut for Operator {
    fn deref_mut(&mut self) -> &mut Provisioner {
        &mut self.0
    }
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// Reads a topic from the beginning on its own thread, keeping every decoded message.
pub struct Reader<T> {
    /// Each message with the wall-clock milliseconds it was received at.
    items: Arc<Mutex<Vec<(u64, T)>>>,
    stop: Arc<AtomicBool>,
}

impl<T: Clone + Send + 'static> Reader<T> {
    fn start(
        brokers: &str,
        topic: &str,
        decode: impl Fn(&[u8], &HashMap<String, String>) -> Option<T> + Send + 'static,
    ) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[topic])?;
        let items = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, flag) = (items.clone(), stop.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
                let headers: HashMap<String, String> = qdb_provisioner::consumer::text_headers(&m);
                if let Some(item) = decode(m.payload().unwrap_or_default(), &headers)
                    && let Ok(mut v) = out.lock()
                {
                    v.push((now_ms(), item));
                }
            }
            // Destroying the client can block against the local broker; the thread just ends
            // with the test process.
            std::mem::forget(consumer);
        });
        Ok(Reader { items, stop })
    }

    pub fn all(&self) -> Vec<T> {
        self.items.lock().map(|v| v.iter().map(|(_, t)| t.clone()).collect()).unwrap_or_default()
    }

    /// Every message with the wall-clock milliseconds it was received at.
    pub fn all_timed(&self) -> Vec<(u64, T)> {
        self.items.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Messages received after the first `seen`, with their receive times: a poller that keeps
    /// its own count reads each message once instead of copying them all every time.
    pub fn after(&self, seen: usize) -> Vec<(u64, T)> {
        self.items.lock().map(|v| v.get(seen..).unwrap_or_default().to_vec()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.items.lock().map(|v| v.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until some message matches.
    pub async fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&T) -> bool) -> Result<T> {
        eventually(what, timeout, || {
            let found = self.all().into_iter().find(|t| pred(t));
            async move { Ok(found) }
        })
        .await
    }
}

impl<T> Drop for Reader<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Reader<GossipEvent> {
    /// Waits for `phase` of instruction `id`.
    pub async fn phase(&self, id: &str, phase: Phase, timeout: Duration) -> Result<GossipEvent> {
        self.wait(&format!("{phase:?} for {id} (seen: {:?})", self.phases(id)), timeout, |e| {
            e.instruction_id == id && e.phase() == phase
        })
        .await
        .with_context(|| format!("phases seen for {id}: {:?}", self.phases(id)))
    }

    /// Waits for the terminal event of instruction `id`, whichever phase it is.
    pub async fn end(&self, id: &str, timeout: Duration) -> Result<GossipEvent> {
        self.wait(&format!("terminal for {id}"), timeout, |e| {
            e.instruction_id == id && is_terminal(e.phase())
        })
        .await
    }

    pub fn phases(&self, id: &str) -> Vec<Phase> {
        self.events(id).iter().map(|e| e.phase()).collect()
    }

    /// Every event of instruction `id` so far, in arrival order.
    pub fn events(&self, id: &str) -> Vec<GossipEvent> {
        self.all().into_iter().filter(|e| e.instruction_id == id).collect()
    }

    /// The terminal event of each of `ids`, once all have one.
    pub async fn terminal(&self, ids: &[String], timeout: Duration) -> Result<HashMap<String, GossipEvent>> {
        eventually(&format!("{} instructions terminal", ids.len()), timeout, || {
            let mut done = HashMap::new();
            for e in self.all() {
                if is_terminal(e.phase()) && !done.contains_key(&e.instruction_id) {
                    done.insert(e.instruction_id.clone(), e);
                }
            }
            let missing = ids.iter().filter(|i| !done.contains_key(*i)).count();
            let result = if missing == 0 {
                Ok(Some(done))
            } else {
                Err(anyhow::anyhow!("{missing} of {} not terminal yet", ids.len()))
            };
            async move { result }
        })
        .await
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

pub fn is_terminal(p: Phase) -> bool {
    matches!(p, Phase::Succeeded | Phase::Failed | Phase::Rejected | Phase::Superseded)
}

/// `dbs` databases alternating between the two regions, each: create at sequence 1, then
/// version changes at 2..=steps. Returns the instructions in send order.
pub fn workload(prefix: &str, dbs: usize, steps: u64) -> Vec<v1::Instruction> {
    let mut out = Vec::new();
    for d in 0..dbs {
        let db = format!("{prefix}-{d}");
        let cluster = if d % 2 == 0 { "region-a" } else { "region-b" };
        out.push(ins::create(&db, cluster, 1, "8.2.1"));
        for seq in 2..=steps {
            out.push(ins::version(&db, cluster, seq, &format!("8.2.{seq}")));
        }
    }
    out
}

/// Every database's last instruction succeeded, every earlier one succeeded or was superseded
/// by a later instruction of its database (sent at once, a version can be replaced before the
/// operator ever reports on it), every resource is at its last instruction, and each resource's
/// generation counts exactly its spec changes (an older instruction applied again after a newer
/// one would add generations).
pub async fn check_exactly_once(
    rig: &Rig,
    all: &[v1::Instruction],
    steps: u64,
    timeout: Duration,
) -> Result<()> {
    let gossip = rig.gossip()?;
    let ids: Vec<String> = all.iter().map(|i| i.instruction_id.clone()).collect();
    let terminal = gossip.terminal(&ids, timeout).await?;
    let mut last: HashMap<&str, &v1::Instruction> = HashMap::new();
    for i in all {
        last.insert(&i.database_id, i);
    }
    let sequence: HashMap<&str, &v1::Instruction> =
        all.iter().map(|i| (i.instruction_id.as_str(), i)).collect();
    let not_ok: Vec<_> = terminal
        .values()
        .filter(|e| match e.phase() {
            Phase::Succeeded => false,
            Phase::Superseded => {
                let later = sequence.get(e.superseded_by.as_str());
                !later.is_some_and(|l| l.database_id == e.database_id && l.sequence > e.sequence)
                    || last.get(e.database_id.as_str()).is_some_and(|l| l.instruction_id == e.instruction_id)
            }
            _ => true,
        })
        .collect();
    ensure!(not_ok.is_empty(), "{} not succeeded or superseded, e.g. {:?}", not_ok.len(), not_ok.first());
    let journal = rig.journal().await?;
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM instructions GROUP BY state").fetch_all(&journal).await?;
    let superseded = terminal.values().filter(|e| e.phase() == Phase::Superseded).count() as i64;
    let mut expected = vec![("succeeded".to_string(), all.len() as i64 - superseded)];
    if superseded > 0 {
        expected.push(("superseded".to_string(), superseded));
    }
    let mut states = states;
    states.sort();
    assert_eq!(states, expected);
    for (db, i) in last {
        let api = rig.questdbs(&i.cluster).await?;
        let q = api.get(db).await?;
        assert_eq!(q.spec.version, format!("8.2.{steps}"), "{db}");
        let ann = q.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(ann[keys::INSTRUCTION_ID], i.instruction_id, "{db}");
        assert_eq!(q.metadata.generation, Some(steps as i64), "{db}: one generation per instruction");
    }
    Ok(())
}

/// Nothing of database `uid` is left in EC2: no instance that is not terminated, no data
/// volume, no security group.
pub async fn nothing_left_in_ec2(aws: &qdb_operator::aws::Aws, uid: &str) -> Result<()> {
    use qdb_operator::aws::InstanceState;
    let live: Vec<_> =
        aws.find_instances(uid).await?.into_iter().filter(|i| i.state != InstanceState::Terminated).collect();
    ensure!(live.is_empty(), "instances left for {uid}: {live:?}");
    ensure!(aws.find_volume(uid).await?.is_none(), "volume left for {uid}");
    ensure!(aws.find_security_group(uid).await?.is_none(), "security group left for {uid}");
    Ok(())
}

/// Instructions as the backend writes them.
pub mod ins {
    use super::*;

    pub fn spec(version: &str) -> v1::DatabaseSpec {
        v1::DatabaseSpec {
            questdb_version: version.into(),
            instance_type: "m6i.large".into(),
            node_image: "ami-0a0a0a0a0a0a0a0a0".into(),
            volume: Some(v1::Volume {
                size_gib: 20,
                r#type: v1::VolumeType::Gp3 as i32,
                ..Default::default()
            }),
            server_config: [("cairo.commit.lag".to_string(), "1000".to_string())].into(),
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            snapshot_policy: None,
        }
    }

    pub fn new(db: &str, cluster: &str, sequence: u64, op: Operation) -> v1::Instruction {
        v1::Instruction {
            instruction_id: unique(&format!("{db}-{sequence}")),
            database_id: db.into(),
            cluster: cluster.into(),
            sequence,
            issued_at_ms: 0,
            operation: Some(op),
        }
    }

    pub fn create(db: &str, cluster: &str, sequence: u64, version: &str) -> v1::Instruction {
        new(db, cluster, sequence, Operation::Create(v1::Create { adopt: None, spec: Some(spec(version)) }))
    }

    /// A create whose volume starts from the EBS snapshot `snapshot` (a clone).
    /// A Restore of `db` to `snapshot` (its latest when None), into `zone` (its own when None).
    pub fn restore(
        db: &str,
        cluster: &str,
        sequence: u64,
        snapshot: Option<&str>,
        zone: Option<&str>,
    ) -> v1::Instruction {
        let restore = v1::Restore { snapshot_id: snapshot.map(String::from), zone: zone.map(String::from) };
        new(db, cluster, sequence, Operation::Restore(restore))
    }

    pub fn create_from_snapshot(
        db: &str,
        cluster: &str,
        sequence: u64,
        version: &str,
        snapshot: &str,
    ) -> v1::Instruction {
        let mut spec = spec(version);
        spec.volume.get_or_insert_default().from_snapshot_id = Some(snapshot.into());
        new(db, cluster, sequence, Operation::Create(v1::Create { adopt: None, spec: Some(spec) }))
    }

    /// A create whose volume starts from the latest completed snapshot of database `source`.
    pub fn create_clone_of(
        db: &str,
        cluster: &str,
        sequence: u64,
        version: &str,
        source: &str,
    ) -> v1::Instruction {
        let mut spec = spec(version);
        spec.volume.get_or_insert_default().clone_of_database = Some(source.into());
        new(db, cluster, sequence, Operation::Create(v1::Create { adopt: None, spec: Some(spec) }))
    }

    pub fn version(db: &str, cluster: &str, sequence: u64, version: &str) -> v1::Instruction {
        new(
            db,
            cluster,
            sequence,
            Operation::Modify(v1::Modify { questdb_version: Some(version.into()), ..Default::default() }),
        )
    }
}

/// Writes status as the operator would: observed at the current generation, Ready (or Paused
/// when the spec says so). Condition messages are never empty: Kubernetes 1.20 turns an empty
/// string in a merge patch into null, which the schema then refuses.
pub async fn report_converged(api: &Api<QuestDB>, name: &str) -> Result<()> {
    let q = api.get(name).await?;
    let generation = q.metadata.generation.unwrap_or_default();
    let paused = q.spec.paused;
    let t = "2026-01-01T00:00:00Z";
    let conditions = json!([
        {"type": "Ready", "status": if paused {"False"} else {"True"}, "reason": if paused {"Paused"} else {"Running"},
         "message": "test operator", "lastTransitionTime": t},
        {"type": "Paused", "status": if paused {"True"} else {"False"}, "reason": "Spec", "message": "test operator",
         "lastTransitionTime": t},
        {"type": "Progressing", "status": "False", "reason": "Converged", "message": "test operator",
         "lastTransitionTime": t},
    ]);
    let status = json!({"status": {
        "phase": if paused {"Paused"} else {"Running"},
        "observedGeneration": generation,
        "conditions": conditions,
        "endpoints": {"http": format!("https://{name}.example"), "pgwire": format!("{name}.example:8812"),
                      "ilp": format!("{name}.example:9009")},
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// Plays the operator for every resource in `api`: whatever is not observed at its generation
/// is reported converged. Runs until the returned handle is aborted.
pub fn fake_operator(api: Api<QuestDB>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for q in list {
                    let observed = q.status.as_ref().and_then(|s| s.observed_generation);
                    if observed != q.metadata.generation
                        && let Some(name) = q.metadata.name.as_deref()
                    {
                        let _ = report_converged(&api, name).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// A namespace for databases, labelled as production's (`localcloud/rbac-bindings.yaml`): the
/// apiserver's Pod Security admission refuses any pod below the `restricted` level.
pub fn restricted_namespace(name: &str) -> Namespace {
    let labels = [
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/warn", "restricted"),
    ];
    Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        ..Default::default()
    }
}
