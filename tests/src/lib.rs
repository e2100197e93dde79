//! Shared helpers for tests that run against the local cloud (`localcloud up`): where its servers
//! are, clients for them, and polling with a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aws_config::{BehaviorVersion, Region};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub mod bench;
pub mod cpu;
pub mod ec2_calls;
pub mod faults;
pub mod iam;
pub mod ingress;
pub mod kube_proxy;
pub mod questdb;
pub mod rig;
pub mod scripted;

/// The env file `localcloud up` wrote: `$QDB_ENV`, else the default location for this user.
pub fn env_file() -> PathBuf {
    if let Ok(p) = std::env::var("QDB_ENV") {
        return PathBuf::from(p);
    }
    let root = if let Ok(c) = std::env::var("QDB_CACHE") {
        PathBuf::from(c)
    } else if is_root() {
        PathBuf::from("/var/cache/qdb-cloud")
    } else {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/qdb-cloud")
    };
    root.join("run/env")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Parses `export KEY=VALUE` lines.
pub fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The env file's per-cluster settings of the operator (the EKS coordinates and the network of
/// `localcloud/aws/network.py`), without the cluster part.
const NETWORK_VARS: [&str; 10] = [
    "QDB_EKS_CLUSTER_NAME",
    "QDB_EKS_ENDPOINT",
    "QDB_EKS_CA",
    "QDB_EKS_SERVICE_CIDR",
    "QDB_VPC_ID",
    "QDB_VPC_CIDR",
    "QDB_SUBNETS",
    "QDB_EXTRA_SECURITY_GROUPS",
    "QDB_INSTANCE_PROFILE",
    "QDB_INSTANCE_PROFILE_ARN",
];

#[derive(Debug, Clone)]
pub struct ClusterEnv {
    pub name: String,
    pub kubeconfig: PathBuf,
    pub operator_kubeconfig: PathBuf,
    pub provisioner_kubeconfig: PathBuf,
    pub aws_region: String,
    pub nodesim: String,
    /// The cluster's network in the emulator, as the operator's environment has it (QDB_VPC_ID,
    /// QDB_SUBNETS, QDB_EXTRA_SECURITY_GROUPS, QDB_INSTANCE_PROFILE, QDB_VPC_CIDR, ...).
    pub network: Vec<(String, String)>,
}

impl ClusterEnv {
    /// One of [`Self::network`] by the operator's variable name, e.g. `QDB_VPC_ID`.
    pub fn network_var(&self, key: &str) -> Option<&str> {
        self.network.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Kills the node of `instance_id` through the node simulator: its kubelet stops reporting
    /// (NotReady) while its processes run on, as in a partition, until EC2 stops the instance.
    pub async fn kill_node(&self, instance_id: &str) -> Result<()> {
        reqwest::Client::new()
            .post(format!("{}/nodes/{instance_id}/kill", self.nodesim))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Cloud {
    pub vars: HashMap<String, String>,
    pub database_url: String,
    pub kafka_brokers: String,
    pub aws_endpoint: String,
    pub clusters: Vec<ClusterEnv>,
}

impl Cloud {
    /// Reads the running local cloud's env file; fails with how to start it when it is missing.
    pub fn load() -> Result<Self> {
        Self::from_file(&env_file())
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("reading {} (start the local cloud: localcloud/localcloud up)", path.display())
        })?;
        let vars = parse_env(&text);
        let get =
            |k: &str| vars.get(k).cloned().with_context(|| format!("{k} missing from {}", path.display()));
        let mut clusters = Vec::new();
        for name in get("QDB_CLUSTERS")?.split(',').filter(|s| !s.is_empty()) {
            let up = name.to_uppercase().replace('-', "_");
            clusters.push(ClusterEnv {
                name: name.to_string(),
                kubeconfig: get(&format!("QDB_{up}_KUBECONFIG"))?.into(),
                operator_kubeconfig: get(&format!("QDB_{up}_OPERATOR_KUBECONFIG"))?.into(),
                provisioner_kubeconfig: get(&format!("QDB_{up}_PROVISIONER_KUBECONFIG"))?.into(),
                aws_region: get(&format!("QDB_{up}_AWS_REGION"))?,
                nodesim: get(&format!("QDB_{up}_NODESIM"))?,
                network: vars
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((format!("QDB_{}", k.strip_prefix(&format!("QDB_{up}_"))?), v.clone()))
                    })
                    .filter(|(k, _)| NETWORK_VARS.contains(&k.as_str()))
                    .collect(),
            });
        }
        Ok(Self {
            database_url: get("DATABASE_URL")?,
            kafka_brokers: get("KAFKA_BROKERS")?,
            aws_endpoint: get("AWS_ENDPOINT_URL")?,
            clusters,
            vars,
        })
    }

    /// An AWS client for `cluster`'s region of the emulator, built as the operator builds its own.
    pub async fn aws(&self, cluster: &str) -> Result<qdb_operator::aws::Aws> {
        let c = self.cluster(cluster)?;
        let var = |k: &str| c.network_var(k).map(str::to_string);
        let list = |k: &str| -> Vec<String> {
            var(k).map(|v| v.split(',').map(str::to_string).collect()).unwrap_or_default()
        };
        let network = qdb_operator::aws::NodeNetwork::from_flags(
            var("QDB_VPC_ID"),
            &list("QDB_SUBNETS"),
            list("QDB_EXTRA_SECURITY_GROUPS"),
            var("QDB_INSTANCE_PROFILE"),
            1,
            &[],
        )?;
        let cfg = qdb_operator::aws::AwsConfig {
            region: c.aws_region.clone(),
            endpoint: Some(self.aws_endpoint.clone()),
            ec2_per_sec: 50,
            route53_per_sec: 50,
            network,
        };
        let credentials =
            aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "localcloud");
        let sdk = qdb_operator::aws::sdk_loader(&cfg).credentials_provider(credentials).load().await;
        Ok(qdb_operator::aws::Aws::from_sdk_config(&sdk, &cfg))
    }

    /// Starts measuring the CPU of every server of the local cloud, of this process (the
    /// benchmark's own clients) and of `extra` processes it started.
    pub fn cpu_meter(&self, extra: &[(&str, Option<u32>)]) -> cpu::CpuMeter {
        let run = self.vars.get("QDB_RUN").map(PathBuf::from).unwrap_or_default();
        let mut names = cpu::servers(&run);
        names.push(("benchmark".into(), std::process::id()));
        names.extend(extra.iter().filter_map(|(n, pid)| Some((n.to_string(), (*pid)?))));
        cpu::CpuMeter::start(names)
    }

    /// Gives `cluster`'s apiserver and etcd CPU 0 to themselves and every other server of the
    /// local cloud, this benchmark and whatever it starts CPU 1, so two runs that load the
    /// apiserver differently give it the same CPU. Undone when the guard drops.
    pub fn pin_apiserver(&self, cluster: &str) -> Result<cpu::Pinned> {
        let run = self.vars.get("QDB_RUN").map(PathBuf::from).unwrap_or_default();
        let servers = cpu::servers(&run);
        ensure!(std::thread::available_parallelism()?.get() >= 2, "pinning needs two CPUs");
        let apiserver = [format!("{cluster}-apiserver"), format!("{cluster}-etcd")];
        ensure!(
            apiserver.iter().all(|n| servers.iter().any(|(s, _)| s == n)),
            "no pid files for {apiserver:?} under {}",
            run.display()
        );
        let mut pinned = cpu::Pinned::default();
        for (name, pid) in servers {
            pinned.pin(pid, if apiserver.contains(&name) { "0" } else { "1" })?;
        }
        pinned.pin(std::process::id(), "1")?;
        Ok(pinned)
    }

    pub fn cluster(&self, name: &str) -> Result<&ClusterEnv> {
        self.clusters.iter().find(|c| c.name == name).with_context(|| format!("no cluster {name}"))
    }

    pub async fn aws_config(&self, region: &str) -> aws_config::SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.aws_endpoint)
            .region(Region::new(region.to_string()))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "localcloud",
            ))
            .load()
            .await
    }

    pub async fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.aws_config(region).await)
    }
}

pub async fn kube_client(kubeconfig: &Path) -> Result<kube::Client> {
    let kc =
        Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Polls `f` until it returns `Some`, or fails after `timeout` saying what was awaited and the
/// last thing seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("nothing yet");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `--name N` from the command line of a benchmark binary, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One headline figure of a benchmark, as a line the report (`localcloud bench`) collects into
/// docs/benchmarks.md: `FIGURE|what|value|target|met`. `target` is empty when the figure is only
/// reported.
pub fn figure(what: &str, value: String, target: &str, met: Option<bool>) {
    let met = match met {
        Some(true) => "met",
        Some(false) => "missed",
        None => "",
    };
    println!("FIGURE|{what}|{value}|{target}|{met}");
}

/// The sum of every sample of `metric` whose line contains `filter`, in Prometheus text.
pub fn metric_total(text: &str, metric: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every sample of `family` in Prometheus text, keyed by its label set as written
/// (`verb="apply",kind="StatefulSet"`).
pub fn counters(metrics: &str, family: &str) -> std::collections::BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(family)?.strip_prefix('{'))
        .filter_map(|l| {
            let (labels, value) = l.split_once("} ")?;
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The value of `name` in a label set as `counters` keys it.
pub fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\"")?.strip_suffix('"'))
}

/// Between two scrapes of the operator's /metrics: reconcile passes, mean time per pass in each
/// step, and AWS calls (throttled ones apart).
pub fn time_spent(before: &str, after: &str) -> String {
    let d = |metric: &str, filter: &str| {
        metric_total(after, metric, filter) - metric_total(before, metric, filter)
    };
    let passes = d("qdb_operator_step_seconds_count", "step=\"aws\"");
    let mut out = format!("{passes:.0} passes;");
    for step in ["aws", "children", "release", "dns", "status"] {
        let f = format!("step=\"{step}\"");
        let (sum, n) = (d("qdb_operator_step_seconds_sum", &f), d("qdb_operator_step_seconds_count", &f));
        if n > 0.0 {
            out.push_str(&format!(" {step} {:.0} ms,", 1000.0 * sum / n));
        }
    }
    let calls = d("qdb_operator_aws_calls_total", "");
    let throttled = d("qdb_operator_aws_calls_total", "outcome=\"throttled\"");
    out.push_str(&format!(" {calls:.0} AWS calls ({throttled:.0} throttled)"));
    out
}

/// A name unique to this test run, for objects tests create in shared servers.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{:x}", (nanos as u64) ^ u64::from(std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exports_and_ignores_comments() {
        let vars = parse_env("# c\nexport A=1\nexport B=x=y\nC=2\n");
        assert_eq!(vars.get("A").unwrap(), "1");
        assert_eq!(vars.get("B").unwrap(), "x=y");
        assert!(!vars.contains_key("C"));
    }
}
