//! nodesim: plays the kubelet and the node bootstrap of one regional cluster for the EC2
//! instances that the AWS emulator holds for that cluster.

mod csi;
mod ec2;
mod events;
mod http;
mod net;
mod objects;
mod relay;
mod runtime;
mod security;
mod sim;
mod storage;
mod userdata;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use aws_config::{BehaviorVersion, Region};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Cluster name; instances tagged `<tag-key>=<cluster>` become this cluster's nodes.
    #[arg(long, env = "NODESIM_CLUSTER")]
    cluster: String,
    #[arg(long, env = "NODESIM_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// AWS region whose instances are watched (also the nodes' topology region label).
    #[arg(long, env = "NODESIM_AWS_REGION")]
    aws_region: String,
    /// EC2 endpoint (the emulator); credentials come from the standard AWS environment.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    aws_endpoint: String,
    #[arg(long, default_value = "cloud.questdb.io/cluster")]
    tag_key: String,
    /// Control API address (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = "5", value_parser = secs)]
    heartbeat: Duration,
    #[arg(long, default_value = "0.5", value_parser = secs)]
    tick: Duration,
    /// Delay between an instance running and its Node registering.
    #[arg(long, default_value = "0", value_parser = secs)]
    join_delay: Duration,
    /// `real` runs installed QuestDB versions; `simulated` runs no process at all (scale benchmarks).
    #[arg(long, env = "NODESIM_RUNTIME", value_enum, default_value = "real")]
    runtime: runtime::Mode,
    /// The Traefik binary pods of `traefik:` images run (the ingress DaemonSet); simulated without.
    #[arg(long, env = "NODESIM_TRAEFIK")]
    traefik: Option<PathBuf>,
    /// The JVM QuestDB runs on (Java 23+ for its flags).
    #[arg(long, env = "NODESIM_JAVA", default_value = "java")]
    java: PathBuf,
    /// An installed QuestDB release, VERSION=JAR (repeat, or comma-separated).
    #[arg(long = "questdb", env = "NODESIM_QUESTDB", value_delimiter = ',', value_parser = version_jar)]
    questdb: Vec<(String, PathBuf)>,
    /// QuestDB majors whose images run simulated (stand-ins for tests that prove no data).
    #[arg(long = "simulated-major", env = "NODESIM_SIMULATED_MAJORS", value_delimiter = ',')]
    simulated_majors: Vec<u32>,
    /// EBS volume storage: `<dir>/<volume id>` is what pods mount.
    #[arg(long, env = "NODESIM_VOLUMES_DIR")]
    volumes_dir: PathBuf,
    /// The volumes' block devices (images), for `--volume-storage xfs-image`.
    #[arg(long, env = "NODESIM_VOLUME_IMAGES_DIR")]
    volume_images_dir: PathBuf,
    /// How volumes are stored: XFS images grown online where the machine allows, else directories.
    #[arg(long, env = "NODESIM_VOLUME_STORAGE", value_enum, default_value = "auto")]
    volume_storage: storage::Kind,
    /// Container logs.
    #[arg(long, env = "NODESIM_LOGS_DIR")]
    logs_dir: PathBuf,
    /// The cluster's bridge, made on first use; nodes are hosts on it.
    #[arg(long, env = "NODESIM_BRIDGE")]
    bridge: String,
    /// The bridge's own address and the VPC's prefix length, e.g. 10.1.0.1/16.
    #[arg(long, env = "NODESIM_BRIDGE_ADDRESS")]
    bridge_address: String,
    /// Prefix of the nodes' network namespace names (unique per simulator).
    #[arg(long, env = "NODESIM_NETNS_PREFIX")]
    netns_prefix: String,
}

fn version_jar(s: &str) -> Result<(String, PathBuf), String> {
    let (v, jar) = s.split_once('=').ok_or_else(|| format!("want VERSION=JAR, got {s:?}"))?;
    Ok((v.to_string(), PathBuf::from(jar)))
}

fn secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .map_err(|e| e.to_string())
        .and_then(|f| Duration::try_from_secs_f64(f).map_err(|e| e.to_string()))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .json()
        .init();
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        anyhow::bail!("--listen must be a loopback address, got {}", args.listen);
    }
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    // Pods that talk to the apiserver (Traefik) reach it through their node's relay, and trust
    // the cluster CA.
    let apiserver = config
        .cluster_url
        .authority()
        .and_then(|a| a.as_str().parse::<std::net::SocketAddr>().ok())
        .with_context(|| format!("the apiserver URL {} is not host:port of an IP", config.cluster_url))?;
    let ca_file = args.logs_dir.join("cluster-ca.crt");
    let ca = config.root_cert.iter().flatten().map(|der| pem("CERTIFICATE", der)).collect::<String>();
    std::fs::create_dir_all(&args.logs_dir)
        .with_context(|| format!("creating {}", args.logs_dir.display()))?;
    std::fs::write(&ca_file, ca).with_context(|| format!("writing {}", ca_file.display()))?;
    let kube = kube::Client::try_from(config).context("building Kubernetes client")?;
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&args.aws_endpoint)
        .region(Region::new(args.aws_region.clone()))
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);

    let state = Arc::new(Mutex::new(sim::State { join_delay: args.join_delay, ..Default::default() }));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding control API on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, cluster = args.cluster, "nodesim control API listening");
    let runtime = Arc::new(Mutex::new(runtime::Runtime::default()));
    let api = axum::serve(listener, http::router(state.clone(), runtime.clone()));

    let network = net::Network::new(args.bridge, &args.bridge_address, args.netns_prefix)?;
    // What an earlier simulator left (it was killed): its servers died with it, their hosts not.
    network.sweep(false).await;
    let storage =
        storage::Storage::new(args.volume_storage, args.volumes_dir, args.volume_images_dir).await?;
    let sim = sim::Sim {
        cfg: sim::Config {
            cluster: args.cluster,
            region: args.aws_region,
            tag_key: args.tag_key,
            heartbeat: args.heartbeat,
            tick: args.tick,
            runtime: runtime::Config {
                mode: args.runtime,
                java: args.java,
                traefik: args.traefik,
                installed: args.questdb.into_iter().collect(),
                simulated_majors: args.simulated_majors,
                logs_dir: args.logs_dir,
            },
            network,
            apiserver,
            ca_file,
        },
        kube,
        ec2,
        state,
        runtime,
        http: reqwest::Client::new(),
        relays: Mutex::default(),
        storage,
        grown_at: Mutex::default(),
        machine_types: Mutex::default(),
        pvs_checked_at: Mutex::default(),
        attacher_tries: Mutex::default(),
        mounted: Mutex::default(),
        stopping: Mutex::default(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        r = api => r.context("control API stopped"),
        _ = sim.run() => Ok(()),
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); Ok(()) }
        _ = term.recv() => { tracing::info!("terminated"); Ok(()) }
    };
    sim.shutdown().await;
    result
}

/// DER as PEM, 64 columns.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
