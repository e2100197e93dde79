//! Provisioner benchmark on the local cloud (`localcloud up` first). region-a's apiserver and
//! etcd get CPU 0 to themselves, everything else (broker, PostgreSQL, the provisioner, this
//! harness) CPU 1, in both runs, so the apiserver has the same CPU in each. Prints, from one run:
//! - raw server-side-apply writes/s with the provisioner's client and concurrency, and the
//!   provisioner's end-to-end instructions/s (2000 instructions over 500 databases, distinct
//!   instructions that reached APPLIED), their ratio (target >= 0.9);
//! - the control plane's overhead: CPU of the provisioner, PostgreSQL and the broker per
//!   instruction against the apiserver's and etcd's CPU per raw write (target <= 0.5);
//! - latency under light load (a paced producer at 5 % of the apiserver's measured capacity, before
//!   the loaded run, so the journal holds nothing else): produce ->
//!   APPLIED (the event's emission time) and produce -> gossip received by a backend consumer,
//!   p50/p99, against raw SSA at the same rate (target p99 <= raw p99 + 25 ms).
//!
//! Run: `cargo run -p qdb-tests --bin bench-provisioner` (add `-- --databases N --steps S`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams};
use qdb_crd::{PROVISIONER_MANAGER, QuestDB};
use qdb_proto::v1::{self, GossipEvent, Phase};
use qdb_provisioner::mapping::{Action, desired};
use qdb_provisioner::worker::build_resource;
use qdb_tests::rig::{Reader, Rig, ins, now_ms};
use qdb_tests::{arg, figure, kube_client};
use tokio::sync::Semaphore;

const PARALLEL: usize = 64;

/// Light load is this share of the capacity the raw run measured.
const LIGHT_SHARE: f64 = 0.05;

/// Paced instructions sent before the light-load measurement and left out of it.
const WARM_UP: usize = 20;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// The server-side apply of one instruction, as the provisioner would make it.
async fn apply(
    api: &Api<QuestDB>,
    i: &v1::Instruction,
    spec: Option<&qdb_crd::QuestDBSpec>,
) -> Result<qdb_crd::QuestDBSpec> {
    let Action::Apply(next) = desired(i, spec)? else { anyhow::bail!("not an apply") };
    let params = PatchParams::apply(PROVISIONER_MANAGER).force();
    api.patch(&i.database_id, &params, &Patch::Apply(&build_resource(i, next.clone()))).await?;
    Ok(next)
}

/// `n` creates of databases `<prefix>-<k>`, one every `period`, each stamped when sent.
async fn send_paced(rig: &Rig, prefix: &str, n: usize, period: Duration) -> Result<Vec<v1::Instruction>> {
    let mut sent = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(period);
    for k in 0..n {
        tick.tick().await;
        let mut i = ins::create(&format!("{prefix}-{k}"), "region-a", 1, "8.2.1");
        i.issued_at_ms = now_ms() as i64;
        rig.send_many(std::slice::from_ref(&i)).await?;
        sent.push(i);
    }
    Ok(sent)
}

/// First APPLIED event of each instruction: (emitted at, received at), in wall-clock ms.
#[derive(Default)]
struct Applied {
    seen: usize,
    first: HashMap<String, (u64, u64)>,
}

impl Applied {
    /// Reads what arrived since the last call; returns how many of `ids` are still not applied.
    fn missing(&mut self, gossip: &Reader<GossipEvent>, ids: &[&str]) -> usize {
        let new = gossip.after(self.seen);
        self.seen += new.len();
        for (received, e) in new {
            if e.phase() == Phase::Applied {
                self.first.entry(e.instruction_id.clone()).or_insert((e.emitted_at_ms as u64, received));
            }
        }
        ids.iter().filter(|id| !self.first.contains_key(**id)).count()
    }

    async fn wait_for(
        &mut self,
        gossip: &Reader<GossipEvent>,
        ids: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.missing(gossip, ids);
            if missing == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{missing} of {} instructions not applied in {timeout:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let databases = arg("--databases", 500);
    let steps = arg("--steps", 4) as u64;
    let light = arg("--light", 400);
    let total = databases * steps as usize;
    let rig = Rig::new("bench-prov", 6).await?;
    let region = rig.cloud.cluster("region-a")?;
    let mut pinned = rig.cloud.pin_apiserver("region-a")?;

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
                spec = Some(apply(&api, &i, spec.as_ref()).await?);
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

    // The provisioner, end to end through Kafka, PostgreSQL and the apiserver.
    let gossip = rig.gossip()?;
    let extra: Vec<String> = std::env::args().skip_while(|a| a != "--").skip(1).collect();
    let mut args = vec!["--max-parallel".to_string(), PARALLEL.to_string()];
    args.extend(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spawned = Instant::now();
    let p = rig.spawn("bench", &args)?;
    pinned.pin(p.pid().context("the provisioner's pid")?, "1")?;
    p.wait_ready().await?;
    let ready_secs = spawned.elapsed().as_secs_f64();
    // 2. Light load, on a journal holding nothing else yet: one instruction at a time at 5 % of
    // the apiserver's measured capacity, end to end, then the raw applies at the same pace.
    let rate = (raw_rate * LIGHT_SHARE).max(1.0);
    let period = Duration::from_secs_f64(1.0 / rate);
    // A fresh replica's first instructions pay for its cold start (connections, the first
    // claims): WARM_UP of them go first, at the same pace, are waited for, and are left out. The
    // first one's latency is reported on its own.
    let mut applied = Applied::default();
    let warm = send_paced(&rig, "warm", WARM_UP, period).await?;
    let warm_ids: Vec<&str> = warm.iter().map(|i| i.instruction_id.as_str()).collect();
    applied.wait_for(&gossip, &warm_ids, Duration::from_secs(60)).await?;
    let first_ms = applied.first.get(&warm[0].instruction_id).map(|f| f.0).unwrap_or_default();
    let cold_ms = first_ms.saturating_sub(warm[0].issued_at_ms as u64);
    let paced = send_paced(&rig, "light", light, period).await?;
    let light_ids: Vec<&str> = paced.iter().map(|i| i.instruction_id.as_str()).collect();
    applied.wait_for(&gossip, &light_ids, Duration::from_secs(60)).await?;
    let (to_applied, to_gossip): (Vec<u64>, Vec<u64>) = paced
        .iter()
        .filter_map(|i| {
            let (emitted, received) = applied.first.get(&i.instruction_id)?;
            let at = i.issued_at_ms as u64;
            Some((emitted.saturating_sub(at), received.saturating_sub(at)))
        })
        .unzip();
    let (to_applied, to_gossip) = (sorted(to_applied), sorted(to_gossip));
    let mut raw_light = Vec::with_capacity(light);
    let mut tick = tokio::time::interval(period);
    for k in 0..light {
        tick.tick().await;
        let i = ins::create(&format!("raw-light-{k}"), "region-a", 1, "8.2.1");
        let at = Instant::now();
        apply(&api, &i, None).await?;
        raw_light.push(at.elapsed().as_millis() as u64);
    }
    let raw_light = sorted(raw_light);

    // 3. The loaded run: every instruction at once.
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
    let ids: Vec<&str> = all.iter().map(|i| i.instruction_id.as_str()).collect();
    let mut max_outbox_lag = 0f64;
    let deadline = Instant::now() + Duration::from_secs(600);
    // The light run's instructions are in `applied` too: only this run's count.
    while applied.missing(&gossip, &ids) > 0 && Instant::now() < deadline {
        if let Ok(m) = p.metrics().await {
            max_outbox_lag = max_outbox_lag.max(metric(&m, "qdb_provisioner_outbox_lag_seconds"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e2e_cpu = e2e_cpu.since();
    applied.wait_for(&gossip, &ids, Duration::ZERO).await?;
    let issued: HashMap<&str, u64> =
        all.iter().map(|i| (i.instruction_id.as_str(), i.issued_at_ms as u64)).collect();
    let last_ms =
        ids.iter().filter_map(|id| applied.first.get(*id)).map(|(_, r)| *r).max().unwrap_or(started_ms);
    let e2e_secs = (last_ms - started_ms) as f64 / 1000.0;
    let e2e_rate = total as f64 / e2e_secs;
    let loaded = sorted(
        ids.iter().filter_map(|id| Some(applied.first.get(*id)?.0.saturating_sub(issued[id]))).collect(),
    );
    let m = p.metrics().await.unwrap_or_default();
    let apply_mean =
        metric(&m, "qdb_provisioner_apply_seconds_sum") / metric(&m, "qdb_provisioner_apply_seconds_count");

    drop(pinned);

    let server = |u: &qdb_tests::cpu::CpuUse| u.of("region-a-apiserver") + u.of("region-a-etcd");
    let control = |u: &qdb_tests::cpu::CpuUse| u.of("provisioner") + u.of("postgres") + u.of("kafka");
    let raw_per_write = server(&raw_cpu) * 1000.0 / total as f64;
    let control_per_instruction = control(&e2e_cpu) * 1000.0 / total as f64;
    let overhead = control_per_instruction / raw_per_write;
    let ratio = e2e_rate / raw_rate;
    let p99 = |v: &[u64]| percentile(v, 0.99);
    let light_line = |v: &[u64]| format!("p50 {} ms, p99 {} ms", percentile(v, 0.5), p99(v));

    println!(
        "provisioner benchmark ({databases} databases x {steps} instructions = {total}, {PARALLEL} in parallel, one apiserver)"
    );
    println!("  CPUs:                     region-a apiserver + etcd on CPU 0; everything else on CPU 1");
    println!("  raw SSA writes:           {total} in {raw_secs:.2} s = {raw_rate:.0} writes/s");
    println!(
        "  provisioner end to end:   {total} distinct instructions APPLIED in {e2e_secs:.2} s = {e2e_rate:.0} instructions/s (producing took {produced_secs:.2} s)"
    );
    println!("  ratio provisioner/raw:    {ratio:.2} (target >= 0.90)");
    println!(
        "  produce -> applied, loaded: {}, max {} ms",
        light_line(&loaded),
        loaded.last().copied().unwrap_or_default()
    );
    println!(
        "  inside the provisioner:   journaled -> applied mean {:.0} ms; outbox lag up to {max_outbox_lag:.1} s",
        apply_mean * 1000.0
    );
    println!("  CPU, raw run:             {}", raw_cpu.line());
    println!("  CPU, end to end:          {}", e2e_cpu.line());
    println!(
        "  apiserver + etcd got:     {:.2} cores in the raw run, {:.2} end to end",
        server(&raw_cpu) / raw_cpu.wall_secs,
        server(&e2e_cpu) / e2e_cpu.wall_secs
    );
    println!(
        "  overhead:                 provisioner + PostgreSQL + broker {control_per_instruction:.2} ms CPU per instruction, apiserver + etcd {raw_per_write:.2} ms per raw write: {overhead:.2} (target <= 0.5)"
    );
    println!(
        "  light load (run first):   {light} instructions at {rate:.1}/s ({:.0} % of the raw {raw_rate:.0}/s)",
        LIGHT_SHARE * 100.0
    );
    println!("    produce -> APPLIED:     {}", light_line(&to_applied));
    println!("    produce -> gossip read: {}", light_line(&to_gossip));
    println!("    raw SSA at that rate:   {}", light_line(&raw_light));
    println!(
        "  cold start:               replica started -> ready {ready_secs:.1} s; its first instruction produce -> APPLIED {cold_ms} ms ({WARM_UP} warm-up instructions, waited for, left out above)"
    );
    figure(
        "provisioner: raw SSA writes/s (apiserver + etcd pinned to one core)",
        format!("{raw_rate:.0}"),
        "",
        None,
    );
    figure(
        &format!(
            "provisioner: end-to-end instructions/s ({total} distinct over {databases} databases, same pinning)"
        ),
        format!("{e2e_rate:.0}"),
        "",
        None,
    );
    figure("provisioner: ratio end-to-end / raw", format!("{ratio:.2}"), ">= 0.90", Some(ratio >= 0.9));
    figure(
        "provisioner: control-plane CPU per instruction / apiserver + etcd CPU per raw write",
        format!("{overhead:.2} ({control_per_instruction:.2} vs {raw_per_write:.2} ms)"),
        "<= 0.5",
        Some(overhead <= 0.5),
    );
    figure("provisioner: produce -> APPLIED under full load", light_line(&loaded), "", None);
    let target = p99(&raw_light) + 25;
    figure(
        &format!("provisioner: produce -> APPLIED at {rate:.0}/s (5 % of the raw capacity)"),
        light_line(&to_applied),
        &format!("p99 <= {target} ms (raw p99 + 25)"),
        Some(p99(&to_applied) <= target),
    );
    figure(
        &format!("provisioner: produce -> gossip received at {rate:.0}/s"),
        light_line(&to_gossip),
        &format!("p99 <= {target} ms (raw p99 + 25)"),
        Some(p99(&to_gossip) <= target),
    );
    figure(&format!("provisioner: raw SSA latency at {rate:.0}/s"), light_line(&raw_light), "", None);
    figure(
        "provisioner: cold start (replica started -> ready; its first instruction produce -> APPLIED)",
        format!("{ready_secs:.1} s; {cold_ms} ms"),
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
