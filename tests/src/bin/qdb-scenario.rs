//! The backend's side of the main job: publishes a scripted scenario of instructions to the local
//! cloud's `instructions` topic, prints every gossip event as it arrives, and ends with a summary
//! table. Exits 0 only if every instruction ended as expected.
//!
//! The databases run a real QuestDB (the node simulator runs the installed releases): before each
//! step the scenario writes rows into region-a's database over ILP/HTTP, after it reads them back
//! over pgwire, and a client probe (`SELECT 1` every 100 ms) measures the unavailability it saw;
//! all of it by the database's DNS name through its node's Traefik, as users reach it.
//! A step that lost an acknowledged row is a mismatch.
//!
//! Needs the local cloud up with an operator per cluster and the provisioner running
//! (`localcloud/localcloud main` does all of it).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use qdb_proto::Message;
use qdb_proto::v1::{self, GossipEvent, Phase, instruction::Operation};
use qdb_tests::ingress::Ingress;
use qdb_tests::rig::{ins, is_terminal};
use qdb_tests::{Cloud, unique};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// QuestDB releases the local cloud installs (QUESTDB_VERSIONS in localcloud/localcloud).
const OLDER: &str = "9.2.3";
const NEWER: &str = "9.3.0";
/// Rows written into region-a's database before each step.
const ROWS_PER_STEP: u64 = 50;
/// The main job's operator in region-a names databases in this zone (localcloud's services).
const ZONE_A: &str = "region-a.questdb.local";

struct Step {
    label: String,
    instruction: v1::Instruction,
    expect: Phase,
    /// A create that starts from the snapshot the last Snapshot step took (its id is known only
    /// once that step succeeded).
    from_last_snapshot: bool,
}

fn scenario(tag: &str) -> Vec<Step> {
    let a = format!("{tag}-a");
    let b = format!("{tag}-b");
    let step = |label: &str, instruction: v1::Instruction, expect: Phase| Step {
        label: label.into(),
        instruction,
        expect,
        from_last_snapshot: false,
    };
    let clone = format!("{tag}-c");
    let op = |db: &str, cluster: &str, seq: u64, o: Operation| ins::new(db, cluster, seq, o);
    let modify = |m: v1::Modify| Operation::Modify(m);
    vec![
        step("create in region-a", ins::create(&a, "region-a", 1, OLDER), Phase::Succeeded),
        step("create in region-b", ins::create(&b, "region-b", 1, OLDER), Phase::Succeeded),
        step("upgrade QuestDB", ins::version(&a, "region-a", 2, NEWER), Phase::Succeeded),
        step(
            "change server config",
            op(
                &a,
                "region-a",
                3,
                modify(v1::Modify {
                    set_server_config: [("query.timeout.sec".to_string(), "30".to_string())].into(),
                    ..Default::default()
                }),
            ),
            Phase::Succeeded,
        ),
        step(
            "grow the volume",
            op(&a, "region-a", 4, modify(v1::Modify { volume_size_gib: Some(40), ..Default::default() })),
            Phase::Succeeded,
        ),
        step("pause", op(&a, "region-a", 5, Operation::Pause(v1::Pause {})), Phase::Succeeded),
        step("resume", op(&a, "region-a", 6, Operation::Resume(v1::Resume {})), Phase::Succeeded),
        step("restart", op(&a, "region-a", 7, Operation::Restart(v1::Restart {})), Phase::Succeeded),
        step(
            "restart after failover",
            op(&a, "region-a", 8, Operation::Restart(v1::Restart {})),
            Phase::Succeeded,
        ),
        step(
            "upgrade the node image",
            op(
                &a,
                "region-a",
                9,
                modify(v1::Modify { node_image: Some("ami-0b0b0b0b0b0b0b0b0".into()), ..Default::default() }),
            ),
            Phase::Succeeded,
        ),
        step(
            "snapshot",
            op(&a, "region-a", 10, Operation::Snapshot(v1::Snapshot { label: Some("demo".into()) })),
            Phase::Succeeded,
        ),
        Step {
            from_last_snapshot: true,
            ..step("clone the snapshot", ins::create(&clone, "region-a", 1, NEWER), Phase::Succeeded)
        },
        step(
            "delete the clone",
            op(
                &clone,
                "region-a",
                2,
                Operation::Delete(v1::Delete { retain_volume: false, ..Default::default() }),
            ),
            Phase::Succeeded,
        ),
        // Back to the snapshot in place: the rows written after it are gone.
        step("restore the snapshot", ins::restore(&a, "region-a", 11, None, None), Phase::Succeeded),
        step("stale sequence", ins::version(&a, "region-a", 2, OLDER), Phase::Superseded),
        step("unknown cluster", ins::create(&format!("{tag}-x"), "mars", 1, NEWER), Phase::Rejected),
        step(
            "delete in region-b",
            op(
                &b,
                "region-b",
                2,
                Operation::Delete(v1::Delete { retain_volume: false, ..Default::default() }),
            ),
            Phase::Succeeded,
        ),
        step(
            "delete in region-a",
            op(
                &a,
                "region-a",
                12,
                Operation::Delete(v1::Delete { retain_volume: false, ..Default::default() }),
            ),
            Phase::Succeeded,
        ),
    ]
}

/// Kills the database's node through the node simulator and waits until the operator has failed
/// it over (Ready again on a new node).
async fn kill_node(cloud: &Cloud, db: &str) -> Result<()> {
    let c = cloud.cluster("region-a")?;
    let api: kube::Api<qdb_crd::QuestDB> =
        kube::Api::namespaced(qdb_tests::kube_client(&c.kubeconfig).await?, "questdb");
    let old = api.get(db).await?.status.and_then(|s| s.node).map(|n| n.instance_id).unwrap_or_default();
    reqwest::Client::new()
        .post(format!("{}/nodes/{old}/kill", c.nodesim))
        .send()
        .await?
        .error_for_status()?;
    println!("    killed node of {old}; waiting for the failover");
    let t0 = Instant::now();
    loop {
        let s = api.get(db).await?.status.unwrap_or_default();
        let moved = s.node.as_ref().is_some_and(|n| n.instance_id != old);
        if moved && s.phase == Some(qdb_crd::Phase::Running) {
            let n = s.node.map(|n| n.instance_id).unwrap_or_default();
            println!("    {:>6.1}s failed over to {n}", t0.elapsed().as_secs_f64());
            return Ok(());
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(180), "no failover within 180 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What a step did to region-a's data, and what a client saw.
struct Data {
    rows_before: Option<u64>,
    rows_after: Option<u64>,
    unavailable: Option<Duration>,
}

/// The database as its users reach it: its DNS name resolved through Route53, TLS to the
/// node's Traefik. Waits (up to a minute) until that answers for it: after a move the record and
/// the new node's Traefik take a moment.
async fn ingress(aws: &qdb_operator::aws::Aws, dns_name: &str) -> Result<Ingress> {
    Ingress::resolve_serving(aws, ZONE_A, dns_name, Duration::from_secs(60)).await
}

fn phase_name(p: Phase) -> &'static str {
    p.as_str_name().trim_start_matches("PHASE_")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cloud = Cloud::load()?;
    let timeout = Duration::from_secs(
        std::env::var("QDB_SCENARIO_STEP_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(180),
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cloud.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let gossip: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cloud.kafka_brokers)
        .set("group.id", unique("scenario"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .create()?;
    gossip.subscribe(&["gossip"])?;
    // Let the group settle before anything is produced, so no event is missed.
    let settle = Instant::now();
    while gossip.assignment().map(|a| a.count()).unwrap_or(0) == 0
        && settle.elapsed() < Duration::from_secs(30)
    {
        let _ = gossip.poll(Duration::from_millis(200));
    }

    let tag = unique("demo");
    let steps = scenario(&tag);
    let db_a = format!("{tag}-a");
    // The operator's default name: <db>.<namespace>.<zone>.
    let dns_a = format!("{db_a}.questdb.{ZONE_A}");
    let aws_a = cloud.aws("region-a").await?;
    let probe =
        qdb_tests::questdb::AvailabilityProbe::start(aws_a.clone(), ZONE_A.to_string(), dns_a.clone(), None);
    // Whether region-a's database serves (created, not paused, not deleted), and the rows it
    // acknowledged so far.
    let mut serving = false;
    let mut written: u64 = 0;
    // The last snapshot region-a's database took, and the rows it had acknowledged by then.
    let mut last_snapshot: Option<(String, u64)> = None;
    let started = Instant::now();
    let mut results = Vec::new();
    println!("scenario {tag}: {} instructions\n", steps.len());
    for s in &steps {
        let mut i = s.instruction.clone();
        if s.from_last_snapshot
            && let Some(Operation::Create(c)) = i.operation.as_mut()
            && let Some(spec) = c.spec.as_mut()
        {
            spec.volume.get_or_insert_default().from_snapshot_id =
                last_snapshot.as_ref().map(|(id, _)| id.clone());
        }
        let i = &i;
        println!("==> {} ({} {}, sequence {})", s.label, i.cluster, i.database_id, i.sequence);
        let t0 = Instant::now();
        let on_a = i.database_id == db_a;
        // A pause or a delete stops the database on purpose: no outage to measure there.
        let intended_stop = matches!(i.operation, Some(Operation::Pause(_) | Operation::Delete(_)));
        let was_serving = serving && on_a && !intended_stop;
        let rows_before = if serving && on_a {
            let db = ingress(&aws_a, &dns_a).await?;
            qdb_tests::questdb::write_rows(&db, "trades", written, ROWS_PER_STEP).await?;
            written += ROWS_PER_STEP;
            Some(written)
        } else {
            None
        };
        probe.take();
        if s.label == "restart after failover" {
            kill_node(&cloud, &i.database_id).await?;
        }
        producer
            .send(
                FutureRecord::to("instructions").key(i.database_id.as_bytes()).payload(&i.encode_to_vec()),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?;
        let mut terminal = None;
        let mut dots = false;
        while terminal.is_none() && t0.elapsed() < timeout {
            let Some(Ok(m)) = gossip.poll(Duration::from_millis(250)) else {
                // A heartbeat while waiting, so a slow step is visibly alive.
                print!(".");
                let _ = std::io::stdout().flush();
                dots = true;
                continue;
            };
            let Ok(ev) = GossipEvent::decode(m.payload().unwrap_or_default()) else { continue };
            if ev.instruction_id != i.instruction_id {
                continue;
            }
            let detail = if ev.reason.is_empty() {
                ev.message.clone()
            } else {
                format!("{}: {}", ev.reason, ev.message)
            };
            if std::mem::take(&mut dots) {
                println!();
            }
            println!("    {:>6.1}s {:<12} {detail}", t0.elapsed().as_secs_f64(), phase_name(ev.phase()));
            if is_terminal(ev.phase()) {
                terminal = Some(ev.phase());
                if !ev.snapshot_id.is_empty() && ev.phase() == Phase::Succeeded {
                    if matches!(i.operation, Some(Operation::Snapshot(_))) {
                        println!("    snapshot {} of {written} acknowledged rows", ev.snapshot_id);
                        last_snapshot = Some((ev.snapshot_id.clone(), written));
                    } else if matches!(i.operation, Some(Operation::Restore(_))) {
                        println!("    restored snapshot {}", ev.snapshot_id);
                    } else if matches!(i.operation, Some(Operation::Create(_))) {
                        println!("    made from snapshot {}", ev.snapshot_id);
                    } else {
                        println!("    safety snapshot {} taken before the change", ev.snapshot_id);
                    }
                }
            }
        }
        let took = t0.elapsed();
        let (unavailable, _) = probe.take();
        if on_a {
            match &i.operation {
                Some(Operation::Create(_) | Operation::Resume(_)) => {
                    serving = terminal == Some(Phase::Succeeded)
                }
                Some(Operation::Pause(_) | Operation::Delete(_)) => serving = false,
                _ => {}
            }
        }
        // A restore puts the database back to its snapshot's rows: those acknowledged after it
        // are gone, and the next rows are written from there.
        let restored =
            matches!(i.operation, Some(Operation::Restore(_))) && terminal == Some(Phase::Succeeded);
        if let (true, Some((_, at_snapshot))) = (restored, &last_snapshot) {
            println!("    {} rows acknowledged after the snapshot are gone by design", written - at_snapshot);
            written = *at_snapshot;
        }
        let rows_after = if serving && on_a {
            let db = ingress(&aws_a, &dns_a).await?;
            let ids = qdb_tests::questdb::read_ids(&db, "trades").await.unwrap_or_default();
            println!("    rows: {written} acknowledged, {} read back", ids.len());
            Some(ids.len() as u64)
        } else {
            None
        };
        // A clone holds exactly the rows its snapshot had: read through its own name.
        let (rows_after, want) =
            match (&last_snapshot, s.from_last_snapshot && terminal == Some(Phase::Succeeded)) {
                (Some((_, at_snapshot)), true) => {
                    let db = ingress(&aws_a, &format!("{}.questdb.{ZONE_A}", i.database_id)).await?;
                    let ids = qdb_tests::questdb::read_ids(&db, "trades").await.unwrap_or_default();
                    println!("    clone rows: {at_snapshot} in the snapshot, {} read back", ids.len());
                    (Some(ids.len() as u64), *at_snapshot)
                }
                _ => (rows_after, written),
            };
        // Only for a database that served before the step: creating or resuming one is not an outage.
        let data = Data { rows_before, rows_after, unavailable: was_serving.then_some(unavailable) };
        let ok = terminal == Some(s.expect) && rows_after.is_none_or(|n| n == want);
        results.push((s, terminal, took, ok, data));
        if terminal.is_none() {
            println!("\n    no terminal phase within {timeout:?}");
        }
    }

    println!(
        "\n{:<22} {:<28} {:<11} {:<11} {:>8} {:>8} {:>8} {:>9}",
        "instruction", "database", "expected", "actual", "time", "rows in", "rows out", "unavail."
    );
    let mut failures = 0;
    let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    for (s, actual, took, ok, data) in &results {
        failures += usize::from(!ok);
        println!(
            "{:<22} {:<28} {:<11} {:<11} {:>7.1}s {:>8} {:>8} {:>9} {}",
            s.label,
            s.instruction.database_id,
            phase_name(s.expect),
            actual.map(phase_name).unwrap_or("none"),
            took.as_secs_f64(),
            count(data.rows_before),
            count(data.rows_after),
            data.unavailable.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64())),
            if *ok { "ok" } else { "MISMATCH" }
        );
    }
    println!(
        "rows in: acknowledged rows written before the step; rows out: rows read back after it (the \
         clone: its own rows, which must be the snapshot's; after a restore, the snapshot's rows); \
         unavail.: a client's SELECT 1 every 100 ms, time from a failed query to the next good one"
    );
    println!(
        "\n{} of {} as expected in {:.0}s",
        results.len() - failures,
        results.len(),
        started.elapsed().as_secs_f64()
    );
    std::mem::forget(gossip);
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
