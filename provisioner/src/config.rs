//! Configuration: flags and environment (clap) for the process, plus a YAML file for the cluster
//! registry and librdkafka properties. librdkafka properties stack file < `QDB_KAFKA_*` env <
//! `-X` flags, so TLS/SASL secrets can come from a mounted Secret as environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

#[derive(Debug, Clone, Parser)]
#[command(name = "qdb-provisioner", about = "Kafka instructions -> QuestDB resources, with gossip")]
pub struct Config {
    /// YAML file with `clusters` (name -> kubeconfig, context, namespace) and optional `kafka`
    /// (librdkafka properties).
    #[arg(long, env = "QDB_PROVISIONER_CONFIG")]
    pub config: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: String,
    #[arg(long, env = "QDB_GROUP_ID", default_value = "qdb-provisioner")]
    pub group_id: String,
    #[arg(long, env = "QDB_INSTRUCTIONS_TOPIC", default_value = "instructions")]
    pub instructions_topic: String,
    #[arg(long, env = "QDB_GOSSIP_TOPIC", default_value = "gossip")]
    pub gossip_topic: String,
    #[arg(long, env = "QDB_DLQ_TOPIC", default_value = "instructions-dlq")]
    pub dlq_topic: String,
    /// librdkafka property for every client, as key=value (repeatable), e.g.
    /// `-X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512`.
    #[arg(short = 'X', long = "kafka", value_parser = parse_key_value)]
    pub kafka: Vec<(String, String)>,
    /// Authenticate to Amazon MSK with IAM: SASL/OAUTHBEARER tokens signed with the standard
    /// AWS credential chain (IRSA, EKS Pod Identity, environment) for the cluster's region.
    /// Sets `security.protocol=SASL_SSL` and `sasl.mechanisms=OAUTHBEARER` unless given.
    #[arg(long, env = "QDB_MSK_IAM_REGION")]
    pub msk_iam_region: Option<String>,
    /// PostgreSQL journal.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, env = "QDB_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: u32,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "QDB_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// This replica's name in work leases (default: host name and process id).
    #[arg(long, env = "QDB_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Databases worked on at once by this replica.
    #[arg(long, env = "QDB_MAX_PARALLEL", default_value_t = 64)]
    pub max_parallel: usize,
    /// Messages consumed and journaled in one transaction at most.
    #[arg(long, env = "QDB_INTAKE_BATCH", default_value_t = 256)]
    pub intake_batch: usize,
    /// Larger instructions are rejected as oversized.
    #[arg(long, env = "QDB_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024)]
    pub max_message_bytes: usize,
    /// The largest record this replica publishes (the producer's `message.max.bytes`; keep it
    /// at or under the broker's and the topics' limits). Dead-letter copies are cut to fit it.
    #[arg(long, env = "QDB_PUBLISH_MAX_BYTES", default_value_t = 1_000_000)]
    pub publish_max_bytes: usize,
    /// Time an applied instruction may take to succeed before it is failed, in seconds.
    #[arg(long, env = "QDB_DEADLINE_SECS", default_value_t = 1800)]
    pub deadline_secs: u64,
    /// Per-operation deadline override, as operation=seconds (repeatable), e.g. `delete=600`.
    #[arg(long = "deadline", value_parser = parse_key_value)]
    pub deadlines: Vec<(String, String)>,
    /// How long a replica keeps a database after taking it; a dead replica's work moves on
    /// after this.
    #[arg(long, env = "QDB_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// Longest wait between retries of an instruction whose cluster is failing.
    #[arg(long, env = "QDB_MAX_RETRY_DELAY_SECS", default_value_t = 10)]
    pub max_retry_delay_secs: u64,
    /// How long a finished instruction stays in the journal (7 days: Kafka's default retention,
    /// so a redelivered message still finds its id; past it the sequence fence still stops it).
    #[arg(long, env = "QDB_JOURNAL_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub journal_retention_secs: u64,
}

/// A `key=value` flag (`-X`), as librdkafka properties are given.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub kubeconfig: PathBuf,
    #[serde(default)]
    pub context: Option<String>,
    /// Namespace of the cluster's QuestDB resources.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "questdb".to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config file {path}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("MSK IAM needs sasl.mechanisms=OAUTHBEARER, not {0}")]
    MskIamMechanism(String),
    #[error("config file {0} names no clusters")]
    NoClusters(PathBuf),
    #[error("deadline override {0:?}: expected operation=seconds")]
    Deadline(String),
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let file: FileConfig = serde_yaml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        if file.clusters.is_empty() {
            return Err(ConfigError::NoClusters(path.to_path_buf()));
        }
        Ok(file)
    }
}

/// librdkafka properties stacked: `base` (a file's), then `QDB_KAFKA_*` variables of `env`
/// (`QDB_KAFKA_SASL_USERNAME` is `sasl.username`), then `flags`; later ones win. The provisioner
/// and questdbctl take Kafka settings the same way.
pub fn stack_kafka_properties(
    base: &BTreeMap<String, String>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &[(String, String)],
) -> BTreeMap<String, String> {
    let mut props = base.clone();
    for (k, v) in env {
        if let Some(name) = k.strip_prefix("QDB_KAFKA_") {
            props.insert(name.to_ascii_lowercase().replace('_', "."), v);
        }
    }
    props.extend(flags.iter().cloned());
    props
}

/// The properties MSK IAM needs, added to `props` where absent; a mechanism other than
/// OAUTHBEARER cannot carry the IAM token and is refused.
pub fn with_msk_iam(mut props: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ConfigError> {
    props.entry("security.protocol".into()).or_insert_with(|| "SASL_SSL".into());
    let mechanism = props.entry("sasl.mechanisms".into()).or_insert_with(|| "OAUTHBEARER".into());
    if mechanism != "OAUTHBEARER" {
        return Err(ConfigError::MskIamMechanism(mechanism.clone()));
    }
    Ok(props)
}

impl Config {
    /// librdkafka properties for every client: file, then `QDB_KAFKA_*` env, then flags.
    pub fn kafka_properties(
        &self,
        file: &FileConfig,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> BTreeMap<String, String> {
        stack_kafka_properties(&file.kafka, env, &self.kafka)
    }

    pub fn deadline_for(&self, operation: &str) -> Result<Duration, ConfigError> {
        for (op, secs) in &self.deadlines {
            if op == operation {
                let secs: u64 = secs.parse().map_err(|_| ConfigError::Deadline(format!("{op}={secs}")))?;
                return Ok(Duration::from_secs(secs));
            }
        }
        Ok(Duration::from_secs(self.deadline_secs))
    }

    pub fn replica(&self) -> String {
        self.replica_id.clone().unwrap_or_else(qdb_crd::process_identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv =
            vec!["qdb-provisioner", "--config", "c.yaml", "--brokers", "b:9092", "--database-url", "pg"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn msk_iam_fills_in_oauthbearer_over_tls_and_refuses_another_mechanism() {
        let props = with_msk_iam(BTreeMap::new()).unwrap();
        assert_eq!(props["security.protocol"], "SASL_SSL");
        assert_eq!(props["sasl.mechanisms"], "OAUTHBEARER");
        let scram = BTreeMap::from([("sasl.mechanisms".to_string(), "SCRAM-SHA-512".to_string())]);
        assert_eq!(
            with_msk_iam(scram).unwrap_err().to_string(),
            "MSK IAM needs sasl.mechanisms=OAUTHBEARER, not SCRAM-SHA-512"
        );
    }

    #[test]
    fn kafka_properties_stack_file_env_flags() {
        let file: FileConfig = serde_yaml::from_str(
            "clusters:\n  a: {kubeconfig: /k}\nkafka:\n  security.protocol: SSL\n  sasl.username: file\n",
        )
        .unwrap();
        assert_eq!(file.clusters["a"].namespace, "questdb");
        let c = config(&["-X", "sasl.username=flag", "-X", "ssl.ca.location=/ca.pem"]);
        let env = [
            ("QDB_KAFKA_SASL_PASSWORD".to_string(), "secret".to_string()),
            ("QDB_KAFKA_SASL_USERNAME".to_string(), "env".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let props = c.kafka_properties(&file, env);
        assert_eq!(props["security.protocol"], "SSL");
        assert_eq!(props["sasl.password"], "secret");
        assert_eq!(props["sasl.username"], "flag");
        assert_eq!(props["ssl.ca.location"], "/ca.pem");
        assert_eq!(props.len(), 4);
    }

    #[test]
    fn deadlines_per_operation() {
        let c = config(&["--deadline", "delete=60", "--deadline-secs", "300"]);
        assert_eq!(c.deadline_for("delete").unwrap(), Duration::from_secs(60));
        assert_eq!(c.deadline_for("create").unwrap(), Duration::from_secs(300));
        assert!(config(&["--deadline", "delete=soon"]).deadline_for("delete").is_err());
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(serde_yaml::from_str::<FileConfig>("clusters: {}\nkafak: {}\n").is_err());
    }
}
