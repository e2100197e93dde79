//! Provisioner benchmark on the local cloud (`localcloud up` first). Prints, from one run:
//! raw server-side-apply writes/s of region-a's apiserver with the provisioner's client and
//! concurrency, provisioner end-to-end instructions/s (2000 instructions over 500 databases,
//! produce -> gossip `applied`), their ratio (target >= 0.9), and p50/p99 produce-to-applied
//! latency.
//!
//! Run: `cargo run -p qdb-tests --bin bench-provisioner` (add `-- --databases N --steps S`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams};
use qdb_crd::{PROVISIONER_MANAGER, QuestDB};
use qdb_proto::v1::Phase;
use qdb_provisioner::mapping::{Action, desired};
use qdb_provisioner::worker::build_resource;
use qdb_tests::rig::{Rig, ins, now_ms};
use qdb_tests::{arg, figure, kube_client};
use tokio::sync::Semaphore;

const PARALLEL: usize = 64;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let databases = arg("--databases", 500);
    let steps = arg("--steps", 4) as u64;
    let total = databases * steps as usize;
    let rig = Rig::new("bench-prov", 6).await?;
    let region = rig.cloud.cluster("region-a")?;

    // 1. The apiserver alone: the same applies, same client identity and timeouts, same bound.
    let client = kube_client(&region.provisioner_kubeconfig).await?;
    let api: Api<QuestDB> = Api::namespaced(client, &rig.namespace);
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let raw_cpu = rig.cloud.cpu_meter(&[]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..databases {
        let (api, slots) = (api.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = slots.acquire_owned().await?;
            let db = format!("raw-{d}");
            let mut spec = None;
            for seq in 1..=steps {
                let i = if seq == 1 {
                    ins::create(&db, "region-a", 1, "8.2.1")
                } else {
                    ins::version(&db, "region-a", seq, &format!("8.2.{seq}"))
                };
                let Action::Apply(next) = desired(&i, spec.as_ref())? else { anyhow::bail!("not an apply") };
                let params = PatchParams::apply(PROVISIONER_MANAGER).force();
                api.patch(&db, &params, &Patch::Apply(&build_resource(&i, next.clone()))).await?;
                spec = Some(next);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let raw_secs = started.elapsed().as_secs_f64();
    let raw_cpu = raw_cpu.since();
    let raw_rate = total as f64 / raw_secs;

    // 2. The provisioner, end to end through Kafka, PostgreSQL and the apiserver.
    let gossip = rig.gossip()?;
    let extra: Vec<String> = std::env::args().skip_while(|a| a != "--").skip(1).collect();
    let mut args = vec!["--max-parallel".to_string(), PARALLEL.to_string()];
    args.extend(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = rig.spawn("bench", &args)?;
    p.wait_ready().await?;
    let mut all = Vec::with_capacity(total);
    for d in 0..databases {
        let db = format!("prov-{d}");
        all.push(ins::create(&db, "region-a", 1, "8.2.1"));
        for seq in 2..=steps {
            all.push(ins::version(&db, "region-a", seq, &format!("8.2.{seq}")));
        }
    }
    let e2e_cpu = rig.cloud.cpu_meter(&[("provisioner", p.pid())]);
    let started_ms = now_ms();
    let started = Instant::now();
    for chunk in all.chunks_mut(500) {
        let now = now_ms() as i64;
        chunk.iter_mut().for_each(|i| i.issued_at_ms = now);
        rig.send_many(chunk).await?;
    }
    let produced_secs = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut max_outbox_lag = 0f64;
    let applied = loop {
        if let Ok(m) = p.metrics().await {
            max_outbox_lag = max_outbox_lag.max(metric(&m, "qdb_provisioner_outbox_lag_seconds"));
        }
        let applied: Vec<_> =
            gossip.all_timed().into_iter().filter(|(_, e)| e.phase() == Phase::Applied).collect();
        if applied.len() >= total || Instant::now() > deadline {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let e2e_cpu = e2e_cpu.since();
    ensure!(applied.len() >= total, "only {} of {total} applied within 10 minutes", applied.len());
    let issued: std::collections::HashMap<_, _> =
        all.iter().map(|i| (i.instruction_id.clone(), i.issued_at_ms as u64)).collect();
    let last_ms = applied.iter().map(|(t, _)| *t).max().unwrap_or(started_ms);
    let e2e_secs = (last_ms - started_ms) as f64 / 1000.0;
    let e2e_rate = total as f64 / e2e_secs;
    let mut latencies: Vec<u64> = applied
        .iter()
        .filter_map(|(t, e)| issued.get(&e.instruction_id).map(|i| t.saturating_sub(*i)))
        .collect();
    latencies.sort_unstable();
    let m = p.metrics().await.unwrap_or_default();
    let apply_mean =
        metric(&m, "qdb_provisioner_apply_seconds_sum") / metric(&m, "qdb_provisioner_apply_seconds_count");

    println!(
        "provisioner benchmark ({databases} databases x {steps} instructions = {total}, {PARALLEL} in parallel, one apiserver)"
    );
    println!("  raw SSA writes:           {total} in {raw_secs:.2} s = {raw_rate:.0} writes/s");
    println!(
        "  provisioner end to end:   {total} in {e2e_secs:.2} s = {e2e_rate:.0} instructions/s (producing took {produced_secs:.2} s)"
    );
    println!("  ratio provisioner/raw:    {:.2} (target >= 0.90)", e2e_rate / raw_rate);
    println!(
        "  produce -> applied:       p50 {} ms, p99 {} ms, max {} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "  inside the provisioner:   journaled -> applied mean {:.0} ms; outbox lag up to {max_outbox_lag:.1} s",
        apply_mean * 1000.0
    );
    // The apiserver and its etcd serve both runs; what else ran beside them took CPU from them.
    let server = |u: &qdb_tests::cpu::CpuUse| u.of("region-a-apiserver") + u.of("region-a-etcd");
    let (raw_share, e2e_share) = (server(&raw_cpu) / raw_cpu.wall_secs, server(&e2e_cpu) / e2e_cpu.wall_secs);
    println!("  CPU, raw run:             {}", raw_cpu.line());
    println!("  CPU, end to end:          {}", e2e_cpu.line());
    println!(
        "  apiserver + etcd got:     {raw_share:.2} cores in the raw run, {e2e_share:.2} end to end; CPU per write {:.1} ms raw, {:.1} ms per instruction end to end",
        server(&raw_cpu) * 1000.0 / total as f64,
        server(&e2e_cpu) * 1000.0 / total as f64
    );
    let ratio = e2e_rate / raw_rate;
    // Per core the apiserver got: what the ratio would be if the servers beside it (broker,
    // PostgreSQL, the provisioner, this harness) ran elsewhere, as they do in production.
    let per_core = ratio * raw_share / e2e_share.max(1e-9);
    println!(
        "  ratio per apiserver core: {per_core:.2} (the ratio with the apiserver's CPU share equal in both runs)"
    );
    figure(
        "provisioner: raw SSA writes/s (same client, same concurrency)",
        format!("{raw_rate:.0}"),
        "",
        None,
    );
    figure(
        &format!("provisioner: end-to-end instructions/s ({total} over {databases} databases)"),
        format!("{e2e_rate:.0}"),
        "",
        None,
    );
    figure("provisioner: ratio end-to-end / raw", format!("{ratio:.2}"), ">= 0.90", Some(ratio >= 0.9));
    figure(
        "provisioner: the same ratio per core of apiserver + etcd CPU",
        format!("{per_core:.2} ({raw_share:.2} vs {e2e_share:.2} cores)"),
        "",
        None,
    );
    figure(
        "provisioner: produce -> applied latency",
        format!("p50 {} ms, p99 {} ms", percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
        "",
        None,
    );
    Ok(())
}

/// The value of an unlabelled sample in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
