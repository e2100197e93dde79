//! Snapshot and restore benchmark on the local cloud (`localcloud up` first, EC2's timing on, a
//! real QuestDB per pod): one database is loaded with `--gib` GiB (1) over ILP/HTTP through its
//! ingress, then snapshotted by the operator (`spec.snapshot`, as a Snapshot instruction sets it)
//! while an ILP client keeps writing small acknowledged batches. It prints:
//! - the write stall that client sees: the longest wait between two acknowledgements while the
//!   snapshot is taken, beside the longest in as long a stretch just before (the target: <= 1 s);
//! - the checkpoint step as a watch of the resource sees it (`status.checkpoint` recorded to
//!   cleared: CHECKPOINT CREATE, CreateSnapshot, CHECKPOINT RELEASE and two status writes);
//! - the request to EBS completing the snapshot;
//! - restore: a database made from the snapshot, create to the first query that returns every
//!   loaded row, by phase.
//!
//! Run: `cargo run -p qdb-tests --bin bench-snapshot -- --gib 1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::api::{DeleteParams, WatchEvent, WatchParams};
use qdb_crd::{QuestDB, SnapshotPhase};
use qdb_tests::bench::{all_settled, apply_all};
use qdb_tests::ingress::Ingress;
use qdb_tests::questdb::{query_pairs, write_rows};
use qdb_tests::rig::Rig;
use qdb_tests::{arg, figure, kube_client};
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;
/// Rows per load batch, and the characters of each row's payload.
const LOAD_BATCH: u64 = 20_000;
const PAYLOAD: usize = 200;
/// Rows per batch of the writer that runs through the snapshot.
const TICK_BATCH: u64 = 100;

fn spec() -> Value {
    json!({"version": "9.3.0", "instanceType": "m6i.large", "nodeImage": "ami-0a0a0a0a0a0a0a0a0",
           "volume": {"sizeGib": 20, "type": "gp3"}, "network": {"allowedCidrs": ["10.0.0.0/8"]}})
}

/// Bytes allocated under `dir` (the volume's storage in the local cloud): not the apparent size,
/// which counts the column files QuestDB maps ahead of its writes.
fn used_bytes(dir: &std::path::Path) -> Result<u64> {
    let out = std::process::Command::new("du").arg("-s").arg("--block-size=1").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().and_then(|n| n.parse().ok()).context("du printed no size")
}

/// Writes `LOAD_BATCH`-row batches of wide rows into `big` until the volume holds `target` bytes;
/// returns the rows written.
async fn load(db: &Ingress, volume_dir: &std::path::Path, target: u64) -> Result<u64> {
    let payload = "x".repeat(PAYLOAD);
    let (mut rows, t0) = (0u64, Instant::now());
    while used_bytes(volume_dir)? < target {
        for _ in 0..10 {
            let mut body = String::with_capacity((LOAD_BATCH as usize) * (PAYLOAD + 40));
            for id in rows..rows + LOAD_BATCH {
                body.push_str(&format!("big,src=load id={id}i,payload=\"{payload}\"\n"));
            }
            let resp = db.http(reqwest::Method::POST, "/write").body(body).send().await?;
            ensure!(resp.status().as_u16() == 204, "load: {}", resp.text().await.unwrap_or_default());
            rows += LOAD_BATCH;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "loaded {rows} rows ({PAYLOAD}-character payload) in {secs:.0} s: {:.2} GiB on the volume",
        used_bytes(volume_dir)? as f64 / GIB as f64
    );
    Ok(rows)
}

/// The longest wait between two consecutive acknowledgements inside `[from, to]`.
fn longest_gap(acks: &[Instant], from: Instant, to: Instant) -> Duration {
    let inside: Vec<&Instant> = acks.iter().filter(|t| **t >= from && **t <= to).collect();
    inside.windows(2).map(|w| w[1].duration_since(*w[0])).max().unwrap_or_default()
}

/// When the watch first saw each step of the snapshot request `id`.
#[derive(Debug, Default)]
struct Seen {
    checkpoint_open: Option<Instant>,
    checkpoint_closed: Option<Instant>,
    taken: Option<Instant>,
    completed: Option<Instant>,
    snapshot: Option<String>,
}

async fn follow(api: Api<QuestDB>, db: String, id: String, version: String) -> Result<Seen> {
    let params = WatchParams::default().fields(&format!("metadata.name={db}"));
    let mut events = api.watch(&params, &version).await?.boxed();
    let mut seen = Seen::default();
    while let Some(event) = events.try_next().await? {
        let WatchEvent::Modified(q) = event else { continue };
        let Some(s) = q.status else { continue };
        let now = Instant::now();
        if s.checkpoint.as_ref().is_some_and(|c| c.request == id) {
            seen.checkpoint_open.get_or_insert(now);
        } else if seen.checkpoint_open.is_some() {
            seen.checkpoint_closed.get_or_insert(now);
        }
        if let Some(e) = s.snapshots.iter().find(|e| e.request == id) {
            seen.taken.get_or_insert(now);
            seen.snapshot = Some(e.id.clone());
            if e.state == SnapshotPhase::Completed {
                seen.completed = Some(now);
                if seen.checkpoint_closed.is_some() || seen.checkpoint_open.is_none() {
                    return Ok(seen);
                }
            }
        }
    }
    anyhow::bail!("the watch ended: {seen:?}")
}

#[tokio::main]
async fn main() -> Result<()> {
    let gib = arg("--gib", 1) as u64;
    let rig = Rig::new("bench-snap", 1).await?;
    let admin = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let api: Api<QuestDB> = Api::namespaced(admin, &rig.namespace);
    let aws = rig.aws("region-a").await?;
    let ebs = rig.cloud.vars.get("QDB_EBS_DIR").map(std::path::PathBuf::from).context("QDB_EBS_DIR")?;
    let _op = rig.spawn_operator("region-a", "bench", &[])?;
    println!(
        "snapshot and restore benchmark: one database with {gib} GiB, snapshotted while an ILP client \
         writes {TICK_BATCH}-row batches back to back (one operator, 2-core machine, real QuestDB \
         9.3.0, EC2's timing {})",
        rig.cloud.vars.get("QDB_AWS_TIMING").map_or("realistic", String::as_str)
    );
    let (source, clone) = ("snap-src".to_string(), "snap-clone".to_string());
    let mut spec = spec();
    apply_all(&api, std::slice::from_ref(&source), &spec).await?;
    all_settled(&api, std::slice::from_ref(&source), Duration::from_secs(300)).await?;
    let dns = |db: &str| format!("{db}.{}.{}", rig.namespace, rig.dns_zone());
    let db = Ingress::resolve_serving(&aws, &rig.dns_zone(), &dns(&source), Duration::from_secs(60)).await?;
    let volume = api.get(&source).await?.status.and_then(|s| s.volume).context("no volume")?.id;
    let rows = load(&db, &ebs.join(&volume), gib * GIB).await?;

    // The writer, through the snapshot.
    let writer_db = Ingress::resolve(&aws, &rig.dns_zone(), &dns(&source)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acks, mut next) = (Vec::new(), 0);
            while !stop.load(Ordering::SeqCst) {
                write_rows(&writer_db, "ticks", next, TICK_BATCH).await?;
                next += TICK_BATCH;
                acks.push(Instant::now());
            }
            anyhow::Ok(acks)
        })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    let version = api.get(&source).await?.metadata.resource_version.unwrap_or_default();
    let request = "bench-snapshot-1".to_string();
    let watch = tokio::spawn(follow(api.clone(), source.clone(), request.clone(), version));
    spec["snapshot"] = json!({"id": request});
    let asked = Instant::now();
    apply_all(&api, std::slice::from_ref(&source), &spec).await?;
    let seen =
        tokio::time::timeout(Duration::from_secs(600), watch).await.context("no snapshot in 600 s")???;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let acks = writer.await??;
    let completed = seen.completed.context("never completed")?;
    let snapshot = seen.snapshot.clone().context("no snapshot id")?;
    let taking = completed.duration_since(asked);
    let stall = longest_gap(&acks, asked, completed);
    let baseline = longest_gap(&acks, asked - taking.min(Duration::from_secs(8)), asked);
    let batches = acks.iter().filter(|t| **t >= asked && **t <= completed).count();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let step = match (seen.checkpoint_open, seen.checkpoint_closed) {
        (Some(open), Some(closed)) => format!("{:.0} ms", ms(closed.duration_since(open))),
        _ => "not seen (crash-consistent)".to_string(),
    };
    println!(
        "snapshot {snapshot}: request to EBS completed {:.1} s; checkpoint step {step}; the writer \
         had {batches} batches acknowledged meanwhile, longest wait {:.0} ms (just before: {:.0} ms)",
        taking.as_secs_f64(),
        ms(stall),
        ms(baseline)
    );
    figure(
        &format!("snapshot: write stall an ILP client sees while a {gib} GiB database is snapshotted"),
        format!("{:.0} ms (longest wait before it: {:.0} ms)", ms(stall), ms(baseline)),
        "<= 1 s",
        Some(stall <= Duration::from_secs(1)),
    );
    figure("snapshot: checkpoint step (CHECKPOINT CREATE to RELEASE, as a watch sees it)", step, "", None);
    figure(
        "snapshot: request to EBS completed (the emulator's pending time; EBS takes minutes)",
        format!("{:.1} s", taking.as_secs_f64()),
        "",
        None,
    );

    // Restore: a database made from the snapshot, to the first query with every loaded row.
    let mut from = self::spec();
    from["volume"]["fromSnapshot"] = json!(snapshot);
    let t0 = Instant::now();
    apply_all(&api, std::slice::from_ref(&clone), &from).await?;
    let (mut volume_at, mut ready_at) = (None, None);
    let deadline = t0 + Duration::from_secs(900);
    let first_good = loop {
        ensure!(Instant::now() < deadline, "the restored database did not answer in 15 minutes");
        let s = api.get(&clone).await?.status.unwrap_or_default();
        if s.volume.is_some() {
            volume_at.get_or_insert_with(Instant::now);
        }
        let ready = s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            ready_at.get_or_insert_with(Instant::now);
            if let Ok(restored) = Ingress::resolve(&aws, &rig.dns_zone(), &dns(&clone)).await
                && let Ok(count) = query_pairs(&restored, "SELECT count(), max(id) FROM big").await
                && count.first().is_some_and(|(n, _)| *n as u64 == rows)
            {
                break Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = |t: Option<Instant>| t.map_or(f64::NAN, |t| t.duration_since(t0).as_secs_f64());
    let total = first_good.duration_since(t0).as_secs_f64();
    println!(
        "restore of {gib} GiB: create to first good query {total:.1} s (volume from the snapshot at \
         {:.1} s, Ready at {:.1} s; the node's launch and join are EC2's timing)",
        secs(volume_at),
        secs(ready_at)
    );
    figure(
        &format!("restore: {gib} GiB database from its snapshot, create to first query with every row"),
        format!("{total:.1} s (volume {:.1} s, Ready {:.1} s)", secs(volume_at), secs(ready_at)),
        "",
        None,
    );
    for name in [&clone, &source] {
        api.delete(name, &DeleteParams::default()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline && !api.list(&Default::default()).await?.items.is_empty() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
