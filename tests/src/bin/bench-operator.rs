//! Operator benchmark on the local cloud (`localcloud up` first). Prints, from one run:
//! apiserver writes per database from create to Ready (from the apiserver's own
//! `apiserver_request_total`, background writes of the other components subtracted), writes
//! during a steady-state resync (target 0), time for N databases to converge against the time the
//! apiserver's write capacity allows for the same writes (target >= 0.8), and the operator's RSS
//! with N databases (target <= 64 MiB).
//!
//! Run: `cargo run -p qdb-tests --bin bench-operator -- --databases 200` (add `--paused` for
//! paused databases: every Kubernetes object and a security group, no node, volume or DNS).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use qdb_crd::{Phase, QuestDB};
use qdb_tests::rig::Rig;
use qdb_tests::{arg, figure, kube_client, metric_total, time_spent};
use serde_json::json;
use tokio::sync::Semaphore;

/// Kinds the operator writes, as the apiserver labels them. Other components write some of
/// these too (the PV binder updates volumes and claims; controllers emit events); their own
/// status subresources (StatefulSet status, Node heartbeats, Leases, Pods) are left out.
const OPERATOR_KINDS: [&str; 9] = [
    "questdbs",
    "statefulsets",
    "services",
    "configmaps",
    "persistentvolumes",
    "persistentvolumeclaims",
    "ingressroutes",
    "ingressroutetcps",
    "events",
];

/// The operator's AWS request budgets in this run (its defaults, passed explicitly).
const EC2_PER_SEC: u32 = 20;
const ROUTE53_PER_SEC: u32 = 5;

/// Mutating requests the apiserver has served for the operator's kinds, from its own metrics.
async fn apiserver_writes(client: &kube::Client) -> Result<f64> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            ["\"POST\"", "\"PUT\"", "\"PATCH\"", "\"DELETE\""]
                .iter()
                .any(|v| l.contains(&format!("verb={v}")))
        })
        .filter(|l| OPERATOR_KINDS.iter().any(|k| l.contains(&format!("resource=\"{k}\""))))
        .filter(|l| !l.contains("subresource=\"status\"") || l.contains("resource=\"questdbs\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum())
}

/// Writes the operator itself counted (server-side applies, creates, deletes, patches).
fn operator_writes(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("qdb_operator_kube_requests_total{"))
        .filter(|l| !l.contains("verb=\"get\"") && !l.contains("verb=\"list\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
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

    // Background: what other components write to the same kinds on their own, subtracted later.
    let w0 = apiserver_writes(&admin).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let background = (apiserver_writes(&admin).await? - w0) / 10.0;

    // The apiserver's write capacity here: ConfigMap creates, 32 at a time (measured before the
    // baseline of the run below, so these writes are not counted in it).
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
    // (every resync reads each database's objects back).
    let resync_secs = arg("--resync-secs", 10) as u64;
    let resync = resync_secs.to_string();
    let args = ["--ec2-per-sec", &ec2_rate, "--route53-per-sec", &route53_rate, "--resync-secs", &resync];
    let op = rig.spawn_operator("region-a", "bench", &args)?;
    op.wait_ready().await?;
    let api: Api<QuestDB> = Api::namespaced(admin.clone(), &rig.namespace);
    let cpu = rig.cloud.cpu_meter(&[("operator", op.pid())]);
    let w_start = apiserver_writes(&admin).await?;
    let metrics_start = op.metrics().await?;
    let op_start = operator_writes(&metrics_start);
    let t0 = Instant::now();
    let slots = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (api, slots) = (api.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let _p = slots.acquire_owned().await?;
            let q: QuestDB = serde_json::from_value(json!({
                "apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "metadata": {"name": format!("db-{i}")},
                "spec": {"version": "8.2.1", "instanceType": "m6i.large", "nodeImage": "ami-0a0a0a0a0a0a0a0a0",
                         "volume": {"sizeGib": 20, "type": "gp3"}, "network": {"allowedCidrs": ["10.0.0.0/8"]},
                         "paused": paused}
            }))?;
            api.patch(&format!("db-{i}"), &PatchParams::apply("qdb-provisioner").force(), &Patch::Apply(&q)).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let list = api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|q| q.status.as_ref().is_some_and(|s| s.phase == Some(converged)))
            .count();
        if ready == n {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {ready} of {n} {converged:?} after 30 minutes");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let converge = t0.elapsed().as_secs_f64();
    let cpu = cpu.since();
    let writes = apiserver_writes(&admin).await? - w_start - background * converge;
    let metrics_end = op.metrics().await?;
    let op_writes = operator_writes(&metrics_end) - op_start;
    let calls = |service: &str| {
        let f = format!("service=\"{service}\"");
        metric_total(&metrics_end, "qdb_operator_aws_calls_total", &f)
            - metric_total(&metrics_start, "qdb_operator_aws_calls_total", &f)
    };
    let (ec2, route53) = (calls("ec2"), calls("route53"));
    let rss = op.pid().map(rss_mib).unwrap_or(0.0);

    // Steady state: two resync periods with nothing to do.
    let steady_secs = 2 * resync_secs;
    let w_steady = apiserver_writes(&admin).await?;
    let op_steady = operator_writes(&op.metrics().await?);
    tokio::time::sleep(Duration::from_secs(steady_secs)).await;
    let steady = apiserver_writes(&admin).await? - w_steady - background * steady_secs as f64;
    let op_steady = operator_writes(&op.metrics().await?) - op_steady;

    let per_db = writes / n as f64;
    let ideal = writes / write_limit;
    // The AWS budgets bound convergence too: the same calls at the account's request rates.
    let aws_bound = (ec2 / EC2_PER_SEC as f64).max(route53 / ROUTE53_PER_SEC as f64);
    println!("operator benchmark ({n} {what}databases, one apiserver, one operator)");
    println!("  apiserver write capacity:      {write_limit:.0} writes/s (ConfigMap creates, 32 at a time)");
    println!("  background writes (others):    {background:.1} writes/s, subtracted below");
    println!(
        "  writes per database to Ready:  {per_db:.1} (apiserver count); operator's own count {:.1}",
        op_writes / n as f64
    );
    println!(
        "  steady-state writes in {steady_secs} s:   {:.0} (apiserver count, ~0 expected); operator's own count {op_steady:.0} (target 0)",
        steady.max(0.0)
    );
    println!(
        "  converged in:                  {converge:.1} s; the same writes at capacity: {ideal:.1} s; ratio {:.2} (target >= 0.8)",
        ideal / converge
    );
    println!("  operator RSS at {n} databases: {rss:.1} MiB (target <= 64 MiB)");
    println!("  CPU while converging:          {}", cpu.line());
    println!("  operator's time:               {}", time_spent(&metrics_start, &metrics_end));
    println!(
        "  AWS calls:                     {ec2:.0} EC2 ({:.1} per database), {route53:.0} Route53; at the budgets ({EC2_PER_SEC}/s, {ROUTE53_PER_SEC}/s) they take {aws_bound:.1} s",
        ec2 / n as f64
    );
    println!(
        "  convergence vs the tighter of the write capacity and the AWS budgets: {:.2}",
        ideal.max(aws_bound) / converge
    );
    let ratio = ideal / converge;
    figure(
        &format!("operator: apiserver writes per {what}database, create to converged"),
        format!("{per_db:.1}"),
        "",
        None,
    );
    figure(
        &format!(
            "operator: apiserver writes in {steady_secs} s of steady state, 2 resyncs ({n} {what}databases)"
        ),
        format!("{:.0}", steady.max(0.0)),
        "0",
        Some(steady < 1.0),
    );
    figure(
        &format!("operator: convergence of {n} {what}databases vs the apiserver's write capacity"),
        format!("{ratio:.2}"),
        ">= 0.8",
        Some(ratio >= 0.8),
    );
    figure(
        &format!(
            "operator: convergence of {n} {what}databases vs the tighter of write capacity and AWS budgets"
        ),
        format!("{:.2}", ideal.max(aws_bound) / converge),
        "",
        None,
    );
    figure(
        &format!("operator: RSS at {n} {what}databases"),
        format!("{rss:.1} MiB"),
        "<= 64 MiB",
        Some(rss <= 64.0),
    );

    // Leave the cloud as found: every database deleted (the operator cleans AWS up).
    for i in 0..n {
        let _ = api.delete(&format!("db-{i}"), &Default::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    while !api.list(&ListParams::default()).await?.items.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let left = api.list(&ListParams::default()).await?.items.len();
    println!("  cleanup: {left} databases left after deletion");
    let _ =
        Api::<Namespace>::all(admin).delete(&scratch, &Default::default()).await.context("scratch namespace");
    Ok(())
}
