//! Operator benchmark on the local cloud (`localcloud up` first). Prints, from one run:
//! - its API economy, from the operator's own client metrics by verb and kind: mutating requests
//!   per database from create to converged (target <= children + 4), and requests per database
//!   over two resyncs of steady state (target 0 writes, 0 GET/LIST), each cross-checked with the
//!   apiserver's `apiserver_request_total` on the kinds only the operator writes (the harness's
//!   own requests taken out); AWS calls per database per hour of steady state (target <= 1);
//! - time for N databases to converge against the time the tighter of the apiserver's write
//!   capacity and the AWS request budgets allows for the same requests (target >= 0.8);
//! - the operator's RSS with N databases (target <= 64 MiB) and its CPU per database per hour of
//!   steady state.
//!
//! Run: `cargo run -p qdb-tests --bin bench-operator -- --databases 200` (add `--paused` for
//! paused databases: every Kubernetes object and a security group, no node, volume or DNS).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolume, PersistentVolumeClaim, Service};
use kube::Api;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use qdb_crd::{Phase, QuestDB};
use qdb_operator::build::ingress::{ingress_route_resource, ingress_route_tcp_resource};
use qdb_tests::rig::Rig;
use qdb_tests::{arg, counters, figure, kube_client, label, metric_total, time_spent};
use serde_json::json;
use tokio::sync::Semaphore;

/// Resyncs (and orphan sweeps) an hour at the operator's default 300 s.
const PRODUCTION_PASSES_PER_HOUR: f64 = 12.0;

/// The operator's AWS request budgets in this run (its defaults, passed explicitly).
const EC2_PER_SEC: u32 = 20;
const ROUTE53_PER_SEC: u32 = 5;

/// What the apiserver served, by (verb, resource, subresource), from its own metrics.
async fn apiserver_requests(client: &kube::Client) -> Result<BTreeMap<(String, String, String), f64>> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    let mut out = BTreeMap::new();
    for (labels, v) in counters(&text, "apiserver_request_total") {
        let get = |n| label(&labels, n).unwrap_or_default().to_string();
        *out.entry((get("verb"), get("resource"), get("subresource"))).or_default() += v;
    }
    Ok(out)
}

/// Requests the operator made, by (verb, kind), from its `qdb_operator_kube_requests_total`.
fn operator_requests(metrics: &str) -> BTreeMap<(String, String), f64> {
    counters(metrics, "qdb_operator_kube_requests_total")
        .into_iter()
        .filter_map(|(labels, v)| {
            Some(((label(&labels, "verb")?.to_string(), label(&labels, "kind")?.to_string()), v))
        })
        .collect()
}

fn diff<K: Ord + Clone>(before: &BTreeMap<K, f64>, after: &BTreeMap<K, f64>) -> BTreeMap<K, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).unwrap_or(&0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn is_read(verb: &str) -> bool {
    matches!(verb, "get" | "list" | "GET" | "LIST")
}

/// The apiserver's (resource, subresource) for a kind as the operator labels it
/// ("StatefulSet" -> statefulsets, "QuestDB/status" -> questdbs status).
fn resource_of(kind: &str) -> (String, String) {
    let (kind, sub) = kind.split_once('/').unwrap_or((kind, ""));
    (format!("{}s", kind.to_lowercase()), sub.to_string())
}

/// Kinds nothing but the operator (and this harness, for QuestDB) writes in this run: their
/// apiserver counts check the operator's own. Volumes and claims (the PV binder), Events (every
/// controller), Nodes and Pods (the node simulator) are not.
const ONLY_OPERATOR: [&str; 7] =
    ["StatefulSet", "Service", "ConfigMap", "IngressRoute", "IngressRouteTCP", "QuestDB", "QuestDB/status"];

/// The same for GET/LIST, less ConfigMaps: the node simulator, as a kubelet, reads each pod's
/// ConfigMap to mount it.
const ONLY_OPERATOR_READS: [&str; 6] =
    ["StatefulSet", "Service", "IngressRoute", "IngressRouteTCP", "QuestDB", "QuestDB/status"];

/// (operator's own count, the apiserver's) of requests on `ONLY_OPERATOR` kinds (writes) or
/// `ONLY_OPERATOR_READS` kinds (GET/LIST).
fn cross_check(
    operator: &BTreeMap<(String, String), f64>,
    apiserver: &BTreeMap<(String, String, String), f64>,
    read: bool,
) -> (f64, f64) {
    let kinds: &[&str] = if read { &ONLY_OPERATOR_READS } else { &ONLY_OPERATOR };
    let ours = operator
        .iter()
        .filter(|((verb, kind), _)| is_read(verb) == read && kinds.contains(&kind.as_str()))
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0;
    let resources: Vec<_> = kinds.iter().map(|k| resource_of(k)).collect();
    let theirs = apiserver
        .iter()
        .filter(|((verb, res, sub), _)| {
            verb != "WATCH" && is_read(verb) == read && resources.contains(&(res.clone(), sub.clone()))
        })
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0;
    (ours, theirs)
}

/// "apply StatefulSet 1.0, get Pod 0.5" per database.
fn per_db_line(counts: &BTreeMap<(String, String), f64>, n: usize, keep: impl Fn(&str) -> bool) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|((verb, _), _)| keep(verb))
        .map(|((verb, kind), v)| format!("{verb} {kind} {:.2}", v / n as f64))
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

/// Applies a database per name, 32 at a time, as the provisioner would.
async fn create(api: &Api<QuestDB>, names: &[String], paused: bool) -> Result<()> {
    let slots = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for name in names {
        let (api, slots, name) = (api.clone(), slots.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let _p = slots.acquire_owned().await?;
            let q: QuestDB = serde_json::from_value(json!({
                "apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "metadata": {"name": name},
                "spec": {"version": "8.2.1", "instanceType": "m6i.large", "nodeImage": "ami-0a0a0a0a0a0a0a0a0",
                         "volume": {"sizeGib": 20, "type": "gp3"}, "network": {"allowedCidrs": ["10.0.0.0/8"]},
                         "paused": paused}
            }))?;
            api.patch(&name, &PatchParams::apply("qdb-provisioner").force(), &Patch::Apply(&q)).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// How a wait for the databases ended.
struct Waited {
    /// The harness's own lists of the databases.
    lists: f64,
    /// How many were in the phase at the end: all of them, or fewer at the deadline.
    ready: usize,
}

/// How often the harness lists the databases while it waits: once a second, and less often for
/// many, so its lists stay a small share of the CPU the system under test needs (at 1000
/// databases, a list a second took 0.12 of a core in the harness over the run, besides the
/// apiserver's work of serving it). The convergence time is late by at most this.
fn poll_every(n: usize) -> Duration {
    Duration::from_millis((n as u64 * 5).max(1000))
}

/// Waits until `n` databases are in `phase` or `--deadline-secs` pass, listing them every
/// `poll_every(n)`.
async fn wait_for(api: &Api<QuestDB>, n: usize, phase: Phase) -> Result<Waited> {
    let mut lists = 0.0;
    let limit = arg("--deadline-secs", 3600) as u64;
    let deadline = Instant::now() + Duration::from_secs(limit);
    loop {
        let list = api.list(&ListParams::default()).await?;
        lists += 1.0;
        let ready =
            list.items.iter().filter(|q| q.status.as_ref().is_some_and(|s| s.phase == Some(phase))).count();
        if ready == n || Instant::now() >= deadline {
            return Ok(Waited { lists, ready });
        }
        tokio::time::sleep(poll_every(n)).await;
    }
}

/// The AWS calls made between two scrapes of the operator's metrics, by operation.
fn aws_calls_by_operation(before: &str, after: &str) -> Vec<String> {
    let was = counters(before, "qdb_operator_aws_calls_total");
    counters(after, "qdb_operator_aws_calls_total")
        .iter()
        .filter_map(|(labels, v)| {
            let made = v - was.get(labels).copied().unwrap_or(0.0);
            let operation = label(labels, "operation").unwrap_or("?");
            // Failed and throttled calls apart from the answered ones, each saying which.
            let outcome = label(labels, "outcome").filter(|o| *o != "ok").map(|o| format!(" ({o})"));
            (made > 0.0).then(|| format!("{operation}{} {made:.0}", outcome.unwrap_or_default()))
        })
        .collect()
}

async fn delete_all(api: &Api<QuestDB>, n: usize) -> Result<usize> {
    for i in 0..n {
        let _ = api.delete(&format!("db-{i}"), &Default::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    while !api.list(&ListParams::default()).await?.items.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(api.list(&ListParams::default()).await?.items.len())
}

/// Objects labelled for database `db`: its children.
async fn children_of(client: &kube::Client, ns: &str, db: &str) -> Result<usize> {
    let lp = ListParams::default().labels(&format!("{}={db}", qdb_crd::keys::DATABASE));
    let mut n = Api::<StatefulSet>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
    n += Api::<Service>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
    n += Api::<ConfigMap>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
    n += Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
    n += Api::<PersistentVolume>::all(client.clone()).list(&lp).await?.items.len();
    for ar in [ingress_route_resource(), ingress_route_tcp_resource()] {
        n += Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar).list(&lp).await?.items.len();
    }
    Ok(n)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let n = arg("--databases", 200);
    // Paused databases get every Kubernetes object and a security group but no node, volume or
    // DNS record: how the operator scales in objects, without the node simulator's limits.
    let paused = std::env::args().any(|a| a == "--paused");
    let (converged, what) = if paused { (Phase::Paused, "paused ") } else { (Phase::Running, "") };
    let rig = Rig::new("bench-op", 1).await?;
    let admin = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;

    // The apiserver's write capacity here: ConfigMap creates, 32 at a time (before the baseline
    // of the run below, so these writes are not counted in it).
    let scratch = format!("{}-scratch", rig.namespace);
    let ns = qdb_tests::rig::restricted_namespace(&scratch);
    Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await?;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &scratch);
    let slots = Arc::new(Semaphore::new(32));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let (cms, slots) = (cms.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let _p = slots.acquire_owned().await?;
            let cm: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}, "data": {"k": "v"}}))?;
            cms.create(&PostParams::default(), &cm).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let write_limit = 500.0 / t.elapsed().as_secs_f64();

    let (ec2_rate, route53_rate) = (EC2_PER_SEC.to_string(), ROUTE53_PER_SEC.to_string());
    // The steady state below spans two resync intervals; a thousand databases want a longer one
    // (every resync reconciles each database once).
    let resync_secs = arg("--resync-secs", 10) as u64;
    let resync = resync_secs.to_string();
    // The orphan sweep runs at the resync's pace too, so the steady state sees every periodic
    // AWS call; production runs both every 300 s.
    let args = [
        "--ec2-per-sec",
        &ec2_rate,
        "--route53-per-sec",
        &route53_rate,
        "--resync-secs",
        &resync,
        "--orphan-sweep-secs",
        &resync,
    ];
    let op = rig.spawn_operator("region-a", "bench", &args)?;
    op.wait_ready().await?;
    let api: Api<QuestDB> = Api::namespaced(admin.clone(), &rig.namespace);
    // One database alone first: N at once cannot converge faster than one does (each waits on
    // its own chain: security group, instance, node, volume, claim, pod, DNS).
    let t_solo = Instant::now();
    create(&api, &["solo".to_string()], paused).await?;
    anyhow::ensure!(wait_for(&api, 1, converged).await?.ready == 1, "one database alone did not converge");
    let solo = t_solo.elapsed().as_secs_f64();
    api.delete("solo", &Default::default()).await?;
    while !api.list(&ListParams::default()).await?.items.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let cpu = rig.cloud.cpu_meter(&[("operator", op.pid())]);
    let server_start = apiserver_requests(&admin).await?;
    let metrics_start = op.metrics().await?;
    let t0 = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("db-{i}")).collect();
    create(&api, &names, paused).await?;
    // The harness's own requests on the operator's kinds: the applies above and the lists below.
    let waited = wait_for(&api, n, converged).await?;
    let harness_lists = waited.lists;
    let converge = t0.elapsed().as_secs_f64();
    let cpu = cpu.since();
    let metrics_end = op.metrics().await?;
    let header = format!(
        "operator benchmark ({n} {what}databases, one apiserver, one operator, resync {resync_secs} s)"
    );
    let convergence_figure = format!(
        "operator: convergence of {n} {what}databases vs the tighter of write capacity and AWS budgets"
    );
    // Where the time went while converging: printed whether or not the deadline was met.
    let time_went = format!(
        "  CPU while converging:          {}\n  operator's time:               {}",
        cpu.line(),
        time_spent(&metrics_start, &metrics_end)
    );
    if waited.ready < n {
        println!("{header}");
        println!("  NOT converged: {} of {n} {converged:?} after {converge:.0} s", waited.ready);
        println!("{time_went}");
        println!(
            "  AWS calls:                     {}",
            aws_calls_by_operation(&metrics_start, &metrics_end).join(", ")
        );
        println!("  operator RSS:                  {:.1} MiB", op.pid().map(rss_mib).unwrap_or(0.0));
        figure(
            &convergence_figure,
            format!("{} of {n} converged in {converge:.0} s", waited.ready),
            ">= 0.8",
            Some(false),
        );
        println!("  cleanup: {} databases left after deletion", delete_all(&api, n).await?);
        anyhow::bail!("only {} of {n} {converged:?} after {converge:.0} s", waited.ready);
    }
    let server_end = apiserver_requests(&admin).await?;
    let made = diff(&operator_requests(&metrics_start), &operator_requests(&metrics_end));
    let served = diff(&server_start, &server_end);
    let writes: f64 = made.iter().filter(|((verb, _), _)| !is_read(verb)).map(|(_, v)| v).sum();
    let (own_writes, server_writes) = cross_check(&made, &served, false);
    let (own_reads, server_reads) = cross_check(&made, &served, true);
    let calls = |before: &str, after: &str, service: &str| {
        let f = format!("service=\"{service}\"");
        metric_total(after, "qdb_operator_aws_calls_total", &f)
            - metric_total(before, "qdb_operator_aws_calls_total", &f)
    };
    let (ec2, route53) =
        (calls(&metrics_start, &metrics_end, "ec2"), calls(&metrics_start, &metrics_end, "route53"));
    let rss = op.pid().map(rss_mib).unwrap_or(0.0);
    let children = children_of(&admin, &rig.namespace, "db-0").await?;

    // Steady state: two resync periods with nothing to do; the harness makes no request.
    let steady_secs = 2 * resync_secs;
    let steady_cpu = rig.cloud.cpu_meter(&[("operator", op.pid())]);
    let (server_steady, metrics_steady) = (apiserver_requests(&admin).await?, op.metrics().await?);
    tokio::time::sleep(Duration::from_secs(steady_secs)).await;
    let (server_after, metrics_after) = (apiserver_requests(&admin).await?, op.metrics().await?);
    let steady_cpu = steady_cpu.since();
    let quiet = diff(&operator_requests(&metrics_steady), &operator_requests(&metrics_after));
    let quiet_served = diff(&server_steady, &server_after);
    // Sums start at 0.0: an empty f64 sum is -0.0, printed "-0".
    let quiet_writes =
        0.0 + quiet.iter().filter(|((verb, _), _)| !is_read(verb)).map(|(_, v)| v).sum::<f64>();
    let quiet_reads = 0.0 + quiet.iter().filter(|((verb, _), _)| is_read(verb)).map(|(_, v)| v).sum::<f64>();
    let (_, quiet_server_writes) = cross_check(&quiet, &quiet_served, false);
    let (_, quiet_server_reads) = cross_check(&quiet, &quiet_served, true);
    let aws_steady = metric_total(&metrics_after, "qdb_operator_aws_calls_total", "")
        - metric_total(&metrics_steady, "qdb_operator_aws_calls_total", "");
    let aws_ops = aws_calls_by_operation(&metrics_steady, &metrics_after);
    // Per database per hour at production's intervals: the window held two resyncs and two sweeps,
    // production runs twelve of each an hour.
    let per_hour = PRODUCTION_PASSES_PER_HOUR / 2.0 / n as f64;
    let aws_per_db_hour = aws_steady * per_hour;
    let cpu_per_db_hour = steady_cpu.of("operator") * per_hour;

    let per_db = writes / n as f64;
    let write_bound = writes / write_limit;
    // The AWS budgets bound convergence too: the same calls at the account's request rates.
    let aws_bound = (ec2 / EC2_PER_SEC as f64).max(route53 / ROUTE53_PER_SEC as f64);
    let ratio = write_bound.max(aws_bound) / converge;
    let bound = write_bound.max(aws_bound).max(solo);
    let coherent = bound / converge;
    let limit = children as f64 + 4.0;
    println!("{header}");
    println!("  apiserver write capacity:      {write_limit:.0} writes/s (ConfigMap creates, 32 at a time)");
    println!("  children of one database:      {children} (objects labelled for it)");
    println!("  create to converged, per database, the operator's own count:");
    println!(
        "    mutating:                    {per_db:.2} (target <= {limit:.0}): {}",
        per_db_line(&made, n, |v| !is_read(v))
    );
    println!("    GET/LIST:                    {}", per_db_line(&made, n, is_read));
    println!(
        "    cross-check with the apiserver on the kinds only the operator uses: operator {own_writes:.0} writes, apiserver {:.0} ({server_writes:.0} less the harness's {n} applies); reads {own_reads:.0} vs {:.0} ({server_reads:.0} less the harness's {harness_lists:.0} lists)",
        server_writes - n as f64,
        server_reads - harness_lists
    );
    println!("  steady state, {steady_secs} s (2 resyncs):");
    println!(
        "    operator's requests:         {quiet_writes:.0} writes, {quiet_reads:.0} GET/LIST ({}); apiserver on those kinds: {quiet_server_writes:.0} writes, {quiet_server_reads:.0} GET/LIST",
        per_db_line(&quiet, 1, |_| true)
    );
    println!(
        "    AWS calls:                   {aws_steady:.0} ({}): {aws_per_db_hour:.2} per database per hour at production's 300 s resync and sweep",
        if aws_ops.is_empty() { "none".into() } else { aws_ops.join(", ") }
    );
    println!(
        "    operator CPU:                {:.3} s in 2 resyncs: {cpu_per_db_hour:.3} CPU-seconds per database per hour at production's 300 s resync",
        steady_cpu.of("operator")
    );
    println!(
        "  converged in:                  {converge:.1} s (listed every {:.1} s); the same writes at the write capacity: {write_bound:.1} s; the AWS calls at the budgets ({EC2_PER_SEC}/s, {ROUTE53_PER_SEC}/s): {aws_bound:.1} s ({ec2:.0} EC2, {route53:.0} Route53)",
        poll_every(n).as_secs_f64()
    );
    println!("  convergence vs the tighter bound: {ratio:.2} (target >= 0.8)");
    println!(
        "  one database alone converged in {solo:.1} s; against the tightest of the three bounds ({bound:.1} s): {coherent:.2}"
    );
    println!("  operator RSS at {n} databases: {rss:.1} MiB (target <= 64 MiB)");
    println!("{time_went}");
    figure(
        &format!(
            "operator: mutating requests per {what}database, create to converged ({n}, {children} children)"
        ),
        format!("{per_db:.2}"),
        &format!("<= {limit:.0}"),
        Some(per_db <= limit),
    );
    figure(
        &format!("operator: requests in {steady_secs} s of steady state, 2 resyncs ({n} {what}databases)"),
        format!("{quiet_writes:.0} writes, {quiet_reads:.0} GET/LIST"),
        "0, 0",
        Some(quiet_writes == 0.0 && quiet_reads == 0.0),
    );
    figure(
        &format!(
            "operator: AWS calls per {what}database per hour of steady state ({n}, 300 s resync and sweep)"
        ),
        format!("{aws_per_db_hour:.2}"),
        "<= 1",
        Some(aws_per_db_hour <= 1.0),
    );
    figure(&convergence_figure, format!("{ratio:.2}"), ">= 0.8", Some(ratio >= 0.8));
    figure(
        &format!("operator: RSS at {n} {what}databases"),
        format!("{rss:.1} MiB"),
        "<= 64 MiB",
        Some(rss <= 64.0),
    );
    figure(
        &format!("operator: CPU per {what}database per hour of steady state ({n}, 300 s resync)"),
        format!("{cpu_per_db_hour:.3} CPU-s"),
        "",
        None,
    );

    // Leave the cloud as found: every database deleted (the operator cleans AWS up).
    println!("  cleanup: {} databases left after deletion", delete_all(&api, n).await?);
    let _ =
        Api::<Namespace>::all(admin).delete(&scratch, &Default::default()).await.context("scratch namespace");
    Ok(())
}
