//! The operator binary: configuration, logs, metrics server, leader election; the work is in
//! the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use qdb_crd::watch_read_timeout;
use qdb_operator::aws::{Aws, AwsConfig, NodeNetwork};
use qdb_operator::build::userdata::{NodeBootstrap, NodeOs};
use qdb_operator::context::{Context, Settings};
use qdb_operator::health::Watches;
use qdb_operator::http::{Health, router};
use qdb_operator::leader::{Elector, Fence, FenceLayer, Timing};
use qdb_operator::metrics::Metrics;
use qdb_operator::reconcile::zone::ZoneLimits;
use qdb_operator::sweep::OrphanMode;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "qdb-operator",
    about = "Reconciles QuestDB resources into Kubernetes objects and AWS resources"
)]
struct Args {
    /// This cluster's name; tags every AWS resource the operator makes.
    #[arg(long, env = "QDB_CLUSTER")]
    cluster: String,
    /// Route53 zone for database names.
    #[arg(long, env = "QDB_DNS_ZONE")]
    dns_zone: String,
    /// Create the hosted zone when it does not exist (local cloud).
    #[arg(long, env = "QDB_CREATE_HOSTED_ZONE")]
    create_hosted_zone: bool,
    #[arg(long, env = "AWS_REGION")]
    aws_region: String,
    /// AWS endpoint override (the local cloud's emulator).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    aws_endpoint: Option<String>,
    #[arg(long, env = "QDB_EC2_PER_SEC", default_value_t = 20)]
    ec2_per_sec: u32,
    #[arg(long, env = "QDB_ROUTE53_PER_SEC", default_value_t = 5)]
    route53_per_sec: u32,
    /// The EKS cluster's VPC: database security groups are created in it (default: the
    /// account's default VPC).
    #[arg(long, env = "QDB_VPC_ID")]
    vpc_id: Option<String>,
    /// ZONE=SUBNET, one per availability zone nodes may use (repeat, or comma-separated in the
    /// environment); a node launches into its volume's zone's subnet.
    #[arg(long = "subnet", env = "QDB_SUBNETS", value_delimiter = ',')]
    subnets: Vec<String>,
    /// Security groups every node joins besides its database's own (the EKS cluster security
    /// group, so the control plane reaches the kubelet).
    #[arg(long = "extra-security-group", env = "QDB_EXTRA_SECURITY_GROUPS", value_delimiter = ',')]
    extra_security_groups: Vec<String>,
    /// The node instance profile (name or ARN): its role is the one EKS maps to nodes.
    #[arg(long, env = "QDB_INSTANCE_PROFILE")]
    instance_profile: Option<String>,
    /// IMDSv2 hop limit on nodes: 1 keeps the instance metadata from pods off the host network.
    #[arg(long, env = "QDB_IMDS_HOP_LIMIT", default_value_t = 1)]
    imds_hop_limit: u8,
    /// The node image's bootstrap: `al2023` (nodeadm NodeConfig) or `bottlerocket` (TOML).
    #[arg(long, env = "QDB_NODE_OS", value_enum, default_value_t = NodeOs::Al2023)]
    node_os: NodeOs,
    /// The EKS cluster nodes join (default: --cluster).
    #[arg(long, env = "QDB_EKS_CLUSTER_NAME")]
    eks_cluster_name: Option<String>,
    /// The EKS cluster's API server endpoint, as `aws eks describe-cluster` shows it.
    #[arg(long, env = "QDB_EKS_ENDPOINT")]
    eks_endpoint: String,
    /// The EKS cluster's certificate authority, base64 (describe-cluster's certificateAuthority.data).
    #[arg(long, env = "QDB_EKS_CA")]
    eks_ca: String,
    /// The EKS cluster's service CIDR (describe-cluster's kubernetesNetworkConfig.serviceIpv4Cidr).
    #[arg(long, env = "QDB_EKS_SERVICE_CIDR")]
    eks_service_cidr: String,
    /// KEY=VALUE tags on every instance, volume, network interface and security group (repeat,
    /// or comma-separated in the environment).
    #[arg(long = "tag", env = "QDB_TAGS", value_delimiter = ',')]
    tags: Vec<String>,
    /// Kubeconfig file (default: in-cluster or $KUBECONFIG).
    #[arg(long, env = "QDB_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Only QuestDB resources in this namespace (default: all namespaces).
    #[arg(long, env = "QDB_WATCH_NAMESPACE")]
    namespace: Option<String>,
    #[arg(long, env = "QDB_LISTEN", default_value = "127.0.0.1:9465")]
    listen: SocketAddr,
    #[arg(long, env = "QDB_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "QDB_LEASE_NAME", default_value = "qdb-operator")]
    lease_name: String,
    /// Leader identity (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the leader's claim lasts without renewal: a standby takes over once the lease
    /// has not changed for this long (by its own clock).
    #[arg(long, env = "QDB_LEASE_SECS", default_value_t = 15)]
    lease_secs: u64,
    /// The leader stops (and writes nothing) this long after its last successful renewal; under
    /// the lease (default: two thirds of it, client-go's 10 s of 15 s).
    #[arg(long, env = "QDB_RENEW_DEADLINE_SECS")]
    renew_deadline_secs: Option<u64>,
    /// How often the leader renews and a standby looks (default: a sixth of the lease).
    #[arg(long, env = "QDB_RETRY_PERIOD_SECS")]
    retry_period_secs: Option<u64>,
    #[arg(long, env = "QDB_RESYNC_SECS", default_value_t = 300)]
    resync_secs: u64,
    #[arg(long, env = "QDB_POLL_SECS", default_value_t = 3)]
    poll_secs: u64,
    /// A database whose node is not Ready this long is moved to a new node.
    #[arg(long, env = "QDB_FAILOVER_AFTER_SECS", default_value_t = 10)]
    failover_after_secs: u64,
    /// Node image / instance type upgrades in progress at once.
    #[arg(long, env = "QDB_REPLACEMENT_BUDGET", default_value_t = 2)]
    replacement_budget: usize,
    /// A replacement whose node is not Ready this long is terminated and launched again.
    #[arg(long, env = "QDB_REPLACEMENT_JOIN_TIMEOUT_SECS", default_value_t = 600)]
    replacement_join_timeout_secs: u64,
    /// Databases reconciled at once. Each pass holds its built objects while it waits on AWS's
    /// request budget, so this bounds memory; more would only queue on the budget.
    #[arg(long, env = "QDB_MAX_CONCURRENT_RECONCILES", default_value_t = 32)]
    max_concurrent_reconciles: u16,
    /// A zone is unhealthy when more than this share of its database nodes is NotReady at once
    /// (as kube-controller-manager's --unhealthy-zone-threshold)...
    #[arg(long, env = "QDB_UNHEALTHY_ZONE_THRESHOLD", default_value_t = 0.55)]
    unhealthy_zone_threshold: f64,
    /// ...and at least this many are.
    #[arg(long, env = "QDB_UNHEALTHY_ZONE_MIN_NOT_READY", default_value_t = 3)]
    unhealthy_zone_min_not_ready: usize,
    /// Failovers that may start per interval in an unhealthy zone (0: none until it recovers).
    #[arg(long, env = "QDB_UNHEALTHY_ZONE_FAILOVERS", default_value_t = 1)]
    unhealthy_zone_failovers: usize,
    #[arg(long, env = "QDB_UNHEALTHY_ZONE_INTERVAL_SECS", default_value_t = 100)]
    unhealthy_zone_interval_secs: u64,
    /// InsufficientInstanceCapacity is retried this many times in a row before Failed.
    #[arg(long, env = "QDB_CAPACITY_RETRIES", default_value_t = 5)]
    capacity_retries: u32,
    /// What the orphan sweep does with AWS resources tagged for this cluster whose owner is gone.
    #[arg(long, env = "QDB_ORPHANS", value_enum, default_value_t = OrphanMode::Delete)]
    orphans: OrphanMode,
    #[arg(long, env = "QDB_ORPHAN_SWEEP_SECS", default_value_t = 300)]
    orphan_sweep_secs: u64,
}

/// A Kubernetes client whose every request is bounded: connecting and writing by `timeout`, the
/// response by `read_timeout` from the moment the request was written. It retries nothing itself:
/// a write must pass the `fence` (when given) on every attempt, and the reconcile retries anyway.
async fn kube_client(
    path: &Option<PathBuf>,
    timeout: Duration,
    read_timeout: Duration,
    fence: Option<Arc<Fence>>,
) -> anyhow::Result<kube::Client> {
    let mut config = match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).with_context(|| format!("reading {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    config.connect_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    config.read_timeout = Some(read_timeout);
    config.reset_reader_on_write = true;
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(match fence {
        Some(fence) => builder.with_layer(&FenceLayer(fence)).build(),
        None => builder.build(),
    })
}

fn main() -> anyhow::Result<()> {
    // The AWS SDK's futures are large; in debug builds a reconcile nests deeper than tokio's
    // default 2 MiB worker stack.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(16 << 20)
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_runtime=warn".into()),
        )
        .init();
    let args = Args::parse();
    let secs = Duration::from_secs;
    let timing = Timing::new(
        secs(args.lease_secs.max(3)),
        args.renew_deadline_secs.map(secs),
        args.retry_period_secs.map(secs),
    )?;
    let fence = Fence::new(timing);
    let timeout = timing.request_timeout();
    // Three clients: the reconcile's (fenced, short), the watches' (fenced, reads that last as
    // long as a quiet watch) and the election's (not fenced: renewing is how the fence opens).
    let client = kube_client(&args.kubeconfig, timeout, timeout, Some(fence.clone())).await?;
    let watch_client =
        kube_client(&args.kubeconfig, timeout, watch_read_timeout(), Some(fence.clone())).await?;
    let lease_client = kube_client(&args.kubeconfig, timeout, timeout, None).await?;
    let aws = Aws::new(&AwsConfig {
        region: args.aws_region.clone(),
        endpoint: args.aws_endpoint.clone(),
        ec2_per_sec: args.ec2_per_sec,
        route53_per_sec: args.route53_per_sec,
        network: NodeNetwork::from_flags(
            args.vpc_id.clone(),
            &args.subnets,
            args.extra_security_groups.clone(),
            args.instance_profile.clone(),
            args.imds_hop_limit,
            &args.tags,
        )
        .context("the node network settings")?,
    })
    .await
    .with_fence(fence.clone());
    let mut metrics = Metrics::new();
    aws.register_metrics(&mut metrics.registry);
    let metrics = Arc::new(metrics);

    let identity = args.identity.clone().unwrap_or_else(qdb_crd::process_identity);
    let elector =
        Elector::new(lease_client, &args.lease_namespace, &args.lease_name, &identity, fence.clone());
    let watches = Arc::new(Watches::default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let app = router(Health {
        metrics: metrics.clone(),
        election: elector.health(),
        fence: fence.clone(),
        watches: watches.clone(),
        started: Instant::now(),
        grace: timing.lease * 2,
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            stop.cancel();
        }
    });

    tokio::select! {
        _ = elector.acquire() => {}
        _ = stop.cancelled() => return Ok(()),
    }
    metrics.leader.set(1);
    let settings = Settings {
        cluster: args.cluster.clone(),
        dns_zone: args.dns_zone.clone(),
        create_hosted_zone: args.create_hosted_zone,
        resync: Duration::from_secs(args.resync_secs),
        poll: Duration::from_secs(args.poll_secs.max(1)),
        failover_after: Duration::from_secs(args.failover_after_secs),
        replacement_budget: args.replacement_budget.max(1),
        replacement_join_timeout: Duration::from_secs(args.replacement_join_timeout_secs),
        concurrency: args.max_concurrent_reconciles.max(1),
        namespace: args.namespace.clone(),
        zone_limits: ZoneLimits {
            threshold: args.unhealthy_zone_threshold,
            min_not_ready: args.unhealthy_zone_min_not_ready,
            failovers: args.unhealthy_zone_failovers,
            interval: Duration::from_secs(args.unhealthy_zone_interval_secs.max(1)),
        },
        capacity_retries: args.capacity_retries,
        bootstrap: NodeBootstrap {
            os: args.node_os,
            cluster_name: args.eks_cluster_name.clone().unwrap_or_else(|| args.cluster.clone()),
            api_server: args.eks_endpoint.clone(),
            certificate_authority: args.eks_ca.clone(),
            service_cidr: args.eks_service_cidr.clone(),
        },
    };
    let ctx = Arc::new(Context::new(client, aws, settings, metrics.clone()));
    let ctx_sweep = ctx.clone();
    let lost = CancellationToken::new();
    let controller = qdb_operator::controller::run(ctx, watch_client, args.namespace.clone(), watches, {
        let (stop, lost) = (stop.clone(), lost.clone());
        async move {
            tokio::select! { _ = stop.cancelled() => {}, _ = lost.cancelled() => {} }
        }
    });
    // Leader-only like the controller, and stopped with it.
    let sweep = qdb_operator::sweep::run(
        &ctx_sweep,
        args.namespace.clone(),
        args.orphans,
        Duration::from_secs(args.orphan_sweep_secs.max(1)),
    );
    tokio::select! {
        _ = controller => {}
        _ = sweep => {}
        why = elector.hold() => {
            // The fence is shut already, so nothing more is written; the process ends so that a
            // restart starts clean (no reconcile of the old term half-way through its steps).
            lost.cancel();
            metrics.leader.set(0);
            anyhow::bail!("lost leadership: {why:?}");
        }
    }
    Ok(())
}
