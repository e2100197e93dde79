//! The fault suite: the whole system keeps its promises while processes die, servers restart,
//! AWS throttles and messages are garbage. For each fault: nothing lost, nothing applied twice,
//! every instruction terminal on gossip, no AWS resource left behind. Tests named `disruptive_`
//! stop a server every other test shares, so they run alone (.config/nextest.toml).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use qdb_proto::Message;
use qdb_proto::v1::{self, Phase, instruction::Operation};
use qdb_tests::eventually;
use qdb_tests::faults::{FaultProxy, Frozen, Rng, TcpHold};
use qdb_tests::rig::{
    Reader, Rig, check_exactly_once, fake_operator, ins, is_terminal, nothing_left_in_ec2, workload,
};

const T: Duration = Duration::from_secs(60);
/// A whole run under a fault, on a busy two-core machine.
const RUN: Duration = Duration::from_secs(300);

/// How many distinct instructions have reached `phase`.
fn count(gossip: &Reader<v1::GossipEvent>, phase: Phase) -> usize {
    gossip
        .all()
        .iter()
        .filter(|e| e.phase() == phase)
        .map(|e| e.instruction_id.clone())
        .collect::<HashSet<_>>()
        .len()
}

async fn wait_count(gossip: &Reader<v1::GossipEvent>, phase: Phase, n: usize) -> Result<()> {
    gossip.wait(&format!("{n} {phase:?}"), RUN, |_| count(gossip, phase) >= n).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_points_of_1000_instructions_loses_nothing_and_applies_nothing_twice() -> Result<()>
{
    let rig = Rig::new("fault-kill", 6).await?;
    let gossip = rig.gossip()?;
    let operators =
        [fake_operator(rig.questdbs("region-a").await?), fake_operator(rig.questdbs("region-b").await?)];
    // Three kills at random points of the run (by instructions applied so far).
    let mut rng = Rng::from_env();
    let mut kills: Vec<usize> = (0..3).map(|_| 100 + rng.below(800) as usize).collect();
    kills.sort_unstable();
    println!("killing at {kills:?} applied");
    let all = workload("db-k", 200, 5);
    let mut p = rig.spawn("r0", &["--lease-secs", "5"])?;
    p.wait_ready().await?;
    rig.send_many(&all).await?;
    for (n, at) in kills.iter().enumerate() {
        wait_count(&gossip, Phase::Applied, *at).await?;
        p.kill9()?;
        // The next replica joins at once, while the killed member's session still holds its
        // partitions: the broker rebalances them to it when that session expires.
        p = rig.spawn(&format!("r{}", n + 1), &["--lease-secs", "5"])?;
        p.wait_ready().await?;
    }
    check_exactly_once(&rig, &all, 5, RUN).await?;
    operators.iter().for_each(|o| o.abort());
    Ok(())
}

/// 300 instructions over 60 databases; `component` is restarted (stopped, then started on the
/// same data) once a third of them are applied, while the rest are still arriving.
async fn restart_mid_run(prefix: &str, component: &str) -> Result<()> {
    let rig = Rig::new(prefix, 3).await?;
    let gossip = rig.gossip()?;
    let operators =
        [fake_operator(rig.questdbs("region-a").await?), fake_operator(rig.questdbs("region-b").await?)];
    let p = rig.spawn("r1", &["--lease-secs", "5", "--max-retry-delay-secs", "3"])?;
    p.wait_ready().await?;
    let all = workload(prefix, 60, 5);
    let (first, rest) = all.split_at(150);
    rig.send_many(first).await?;
    wait_count(&gossip, Phase::Applied, 100).await?;
    rig.cloud.restart(component)?;
    rig.send_many(rest).await?;
    check_exactly_once(&rig, &all, 5, RUN).await?;
    // The same process rode it out: no restart of the provisioner was needed.
    p.wait_ready().await?;
    operators.iter().for_each(|o| o.abort());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn disruptive_broker_restart_mid_run() -> Result<()> {
    restart_mid_run("fault-kafka", "kafka").await
}

#[tokio::test(flavor = "multi_thread")]
async fn disruptive_postgres_restart_mid_run() -> Result<()> {
    restart_mid_run("fault-pg", "postgres").await
}

#[tokio::test(flavor = "multi_thread")]
async fn disruptive_apiserver_restart_mid_run() -> Result<()> {
    restart_mid_run("fault-api", "region-b-apiserver").await
}

async fn all_succeed(gossip: &Reader<v1::GossipEvent>, batch: &[v1::Instruction]) -> Result<()> {
    let ids: Vec<String> = batch.iter().map(|i| i.instruction_id.clone()).collect();
    let terminal = gossip.terminal(&ids, RUN).await?;
    let not_ok: Vec<_> = terminal.values().filter(|e| e.phase() != Phase::Succeeded).collect();
    ensure!(not_ok.is_empty(), "not succeeded: {not_ok:?}");
    Ok(())
}

/// The whole system with a real operator in region-a: `n` databases are created, upgraded and
/// deleted through Kafka. `fault` runs once the creates are applied, while the operator builds.
/// Every instruction must succeed exactly once and AWS must hold nothing of them at the end.
async fn lifecycle_under<F, Fut>(rig: &Rig, n: usize, fault: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &["--max-retry-delay-secs", "3"])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let dbs: Vec<String> = (0..n).map(|i| format!("db{i}")).collect();
    let creates: Vec<_> = dbs.iter().map(|d| ins::create(d, "region-a", 1, "8.2.1")).collect();
    rig.send_many(&creates).await?;
    let mut uids = Vec::new();
    for (d, c) in dbs.iter().zip(&creates) {
        gossip.phase(&c.instruction_id, Phase::Applied, T).await?;
        uids.push(api.get(d).await?.metadata.uid.context("uid")?);
    }
    fault().await?;
    all_succeed(&gossip, &creates).await?;
    let upgrades: Vec<_> = dbs.iter().map(|d| ins::version(d, "region-a", 2, "8.2.2")).collect();
    rig.send_many(&upgrades).await?;
    all_succeed(&gossip, &upgrades).await?;
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let sts: kube::Api<k8s_openapi::api::apps::v1::StatefulSet> =
        kube::Api::namespaced(client, &rig.namespace);
    for d in &dbs {
        let s = sts.get(d).await?;
        let image = s.spec.and_then(|s| s.template.spec).and_then(|p| p.containers.first().cloned()?.image);
        ensure!(image.as_deref().is_some_and(|i| i.ends_with(":8.2.2")), "{d} runs {image:?}");
    }
    let deletes: Vec<_> =
        dbs.iter().map(|d| ins::new(d, "region-a", 3, Operation::Delete(v1::Delete::default()))).collect();
    rig.send_many(&deletes).await?;
    all_succeed(&gossip, &deletes).await?;

    // Nothing applied twice: every instruction journaled once, and it succeeded.
    let journal = rig.journal().await?;
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM instructions GROUP BY state").fetch_all(&journal).await?;
    assert_eq!(states, vec![("succeeded".to_string(), 3 * n as i64)]);
    // Nothing leaked.
    let aws = rig.aws("region-a").await?;
    for uid in &uids {
        nothing_left_in_ec2(&aws, uid).await?;
    }
    let zone = aws.hosted_zone(&rig.dns_zone(), false).await?.context("zone")?;
    for d in &dbs {
        let name = format!("{d}.{}", rig.dns_zone());
        ensure!(aws.get_a_record(&zone, &name).await?.is_none(), "DNS record left: {name}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_throttling_on_a_fifth_of_calls_is_absorbed() -> Result<()> {
    let rig = Rig::new("fault-throttle", 2).await?;
    let proxy = FaultProxy::start(&rig.cloud.aws_endpoint, 20, Rng::from_env()).await?;
    let op = rig.spawn_operator("region-a", "a1", &["--aws-endpoint", &proxy.url])?;
    lifecycle_under(&rig, 3, || async { Ok(()) }).await?;
    let (injected, forwarded) = (proxy.injected(), proxy.forwarded());
    println!("fault proxy: {injected} throttled, {forwarded} forwarded");
    ensure!(injected > 0 && forwarded > 0, "the proxy saw no traffic");
    let m = op.metrics().await?;
    ensure!(
        m.lines()
            .any(|l| l.starts_with("qdb_operator_aws_calls_total") && l.contains("outcome=\"throttled\"")),
        "throttled calls not counted: {m}"
    );
    Ok(())
}

/// The emulator keeps its state only in memory, so its outage is played by freezing it: every
/// AWS call (and the node simulator's polling) hangs for 20 s, then it comes back as it was.
#[tokio::test(flavor = "multi_thread")]
async fn disruptive_aws_emulator_outage_mid_run() -> Result<()> {
    let rig = Rig::new("fault-moto", 2).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    lifecycle_under(&rig, 2, || async {
        let frozen = rig.cloud.freeze("QDB_MOTO_PID_FILE")?;
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(frozen);
        Ok(())
    })
    .await
}

/// Every kind of bad input in one partition, each followed by more: rejected with its reason on
/// gossip, kept on the dead-letter topic, and the partition keeps going. Unknown fields are not
/// bad input (a newer backend may send them) and duplicates and stale sequences have no effect.
#[tokio::test(flavor = "multi_thread")]
async fn the_bad_input_corpus_is_rejected_dead_lettered_and_the_partition_keeps_going() -> Result<()> {
    let rig = Rig::new("fault-bad", 1).await?;
    let gossip = rig.gossip()?;
    let dlq = rig.dead_letters()?;
    let operator = fake_operator(rig.questdbs("region-a").await?);
    let p = rig.spawn("r1", &["--max-message-bytes", "4096"])?;
    p.wait_ready().await?;

    let garbage = b"\x0a\xff\xff\xff\xff garbage".to_vec();
    rig.send_raw(b"junk", &garbage).await?;
    let whole = ins::create("db-t", "region-a", 1, "8.2.1").encode_to_vec();
    let truncated = whole[..whole.len() - 3].to_vec();
    rig.send_raw(b"db-t", &truncated).await?;
    rig.send_raw(b"empty", b"").await?;
    let unknown = ins::create("db-x", "mars", 1, "8.2.1");
    rig.send(&unknown).await?;
    let invalid = ins::create("db-y", "region-a", 1, "not-a-version!");
    rig.send(&invalid).await?;
    let bad_id = ins::create("Not_A_Name", "region-a", 1, "8.2.1");
    rig.send(&bad_id).await?;
    let mut no_op = ins::create("db-n", "region-a", 1, "8.2.1");
    no_op.operation = None;
    rig.send(&no_op).await?;
    let mut oversized = ins::create("db-z", "region-a", 1, "8.2.1");
    if let Some(Operation::Create(c)) = &mut oversized.operation {
        c.spec.as_mut().map(|s| s.server_config.insert("padding".into(), "x".repeat(8000)));
    }
    rig.send(&oversized).await?;
    let no_such = ins::version("db-never-created", "region-a", 1, "8.2.2");
    rig.send(&no_such).await?;

    // Not bad: an unknown field (tag 99, a varint) from a newer backend is ignored.
    let newer = ins::create("db-newer", "region-a", 1, "8.2.1");
    let mut bytes = newer.encode_to_vec();
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
    rig.send_raw(b"db-newer", &bytes).await?;
    // Duplicates and a stale sequence: one effect.
    let create = ins::create("db-dup", "region-a", 1, "8.2.1");
    let later = ins::version("db-dup", "region-a", 3, "8.2.3");
    let stale = ins::version("db-dup", "region-a", 2, "8.2.2");
    for i in [&create, &create, &later, &stale, &later] {
        rig.send(i).await?;
    }
    let good = ins::create("db-good", "region-a", 1, "8.2.1");
    rig.send(&good).await?;

    for (i, reason) in [
        (&unknown, "UNKNOWN_CLUSTER"),
        (&invalid, "INVALID_SPEC"),
        (&bad_id, "INVALID_DATABASE_ID"),
        (&no_op, "UNKNOWN_OPERATION"),
        (&oversized, "OVERSIZED"),
        (&no_such, "DATABASE_NOT_FOUND"),
    ] {
        let ev = gossip.phase(&i.instruction_id, Phase::Rejected, T).await?;
        assert_eq!(ev.reason, reason, "{ev:?}");
        assert!(!ev.message.is_empty());
    }
    for i in [&newer, &later, &good] {
        gossip.phase(&i.instruction_id, Phase::Succeeded, T).await?;
    }
    // The later version was applied right after the create: the create ends SUCCEEDED only if
    // its own generation was seen Ready first, else SUPERSEDED by the later one.
    let end = gossip
        .wait("the create terminal", T, |e| {
            e.instruction_id == create.instruction_id && is_terminal(e.phase())
        })
        .await?;
    match end.phase() {
        Phase::Succeeded => {}
        Phase::Superseded => assert_eq!(end.superseded_by, later.instruction_id, "{end:?}"),
        other => panic!("the create ended {other:?}: {end:?}"),
    }
    let ev = gossip.phase(&stale.instruction_id, Phase::Superseded, T).await?;
    assert_eq!(ev.reason, "STALE_SEQUENCE");

    let letters = dlq.wait("nine dead letters", T, |_| dlq.all().len() >= 9).await.map(|_| dlq.all())?;
    let reasons: Vec<&str> = letters.iter().map(|l| l.headers["qdb.reject.reason"].as_str()).collect();
    assert_eq!(
        reasons,
        [
            "UNDECODABLE",
            "UNDECODABLE",
            "MISSING_ID",
            "UNKNOWN_CLUSTER",
            "INVALID_SPEC",
            "INVALID_DATABASE_ID",
            "UNKNOWN_OPERATION",
            "OVERSIZED",
            "DATABASE_NOT_FOUND"
        ]
    );
    assert_eq!(letters[0].payload, garbage, "kept as received");
    assert_eq!(letters[1].payload, truncated, "kept as received");
    assert_eq!(letters[0].headers["qdb.source.offset"], "0");

    let api = rig.questdbs("region-a").await?;
    let q = api.get("db-dup").await?;
    assert_eq!(q.spec.version, "8.2.3");
    assert_eq!(q.metadata.generation, Some(2), "the create and the later modify, once each");
    for absent in ["db-x", "db-y", "db-n", "db-z", "db-never-created"] {
        ensure!(api.get_opt(absent).await?.is_none(), "{absent} must not exist");
    }
    let m = p.metrics().await?;
    assert!(m.contains("qdb_provisioner_instructions_total{outcome=\"rejected\"} 9"), "{m}");
    operator.abort();
    Ok(())
}

/// Issue 14, item 1: a replica frozen mid-apply past its lease while another replica finishes
/// newer instructions cannot land its older spec when it resumes: the cluster refuses the lower
/// sequence (deploy/crd/sequence-policy.yaml) and the journal refuses its writes (its lease is
/// gone). Without the policy the held apply would put 8.2.3 back over 8.2.4; without the lease
/// fence the resumed replica would journal and gossip its own outcome for an instruction another
/// replica already finished.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_frozen_mid_apply_past_its_lease_cannot_land_an_older_spec() -> Result<()> {
    let rig = Rig::new("fault-freeze", 1).await?;
    let gossip = rig.gossip()?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let proxy = TcpHold::start(rig.apiserver_addr("region-a")?).await?;
    let through = rig.config_through("region-a", proxy.addr)?;
    let lease = ["--lease-secs", "5"];
    let a = rig.spawn_with_config("a", &through, &lease)?;
    a.wait_ready().await?;
    let db = "db-freeze";
    let create = ins::create(db, "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;

    // A's next apply is sent into a partition and parked there.
    proxy.hold();
    let older = ins::version(db, "region-a", 2, "8.2.3");
    rig.send(&older).await?;
    let journal = rig.journal().await?;
    eventually("a claims the database and sends its apply", T, || async {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT lease_owner FROM databases WHERE database_id = $1 AND lease_until > now()",
        )
        .bind(db)
        .fetch_optional(&journal)
        .await?
        .flatten();
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instructions WHERE id = $1 AND state = 'pending'")
                .bind(&older.instruction_id)
                .fetch_one(&journal)
                .await?;
        Ok((owner.as_deref() == Some("a") && pending == 1 && proxy.waiting() > 0).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let parked = proxy.waiting();
    let frozen = Frozen::pid(&a.pid().context("a's pid")?.to_string())?;

    // B carries on once A's lease and Kafka session run out, and finishes a newer instruction.
    let b = rig.spawn("b", &lease)?;
    b.wait_ready().await?;
    let newer = ins::version(db, "region-a", 3, "8.2.4");
    rig.send(&newer).await?;
    let done = gossip.terminal(&[older.instruction_id.clone(), newer.instruction_id.clone()], RUN).await?;
    ensure!(
        done[&newer.instruction_id].phase() == Phase::Succeeded,
        "newer: {:?}",
        done[&newer.instruction_id]
    );
    ensure!(api.get(db).await?.spec.version == "8.2.4", "b applied the newer spec");

    // The parked apply reaches the apiserver now, behind the newer one; then A wakes up.
    proxy.release();
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(frozen);
    eventually("a notices it lost the lease", T, || {
        let log = a.log_text();
        async move { Ok(log.contains("lease lost").then_some(()).or(log.contains("lease gone").then_some(()))) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = a.log_text();
    println!(
        "parked {parked} bytes; a saw the cluster refuse its stale apply: {}",
        log.contains("stale instruction sequence 2")
    );

    let q = api.get(db).await?;
    let ann = q.metadata.annotations.clone().unwrap_or_default();
    ensure!(q.spec.version == "8.2.4", "the resource went back to {}", q.spec.version);
    ensure!(
        ann[qdb_crd::keys::INSTRUCTION_SEQUENCE] == "3",
        "resource at sequence {}",
        ann[qdb_crd::keys::INSTRUCTION_SEQUENCE]
    );
    let states: Vec<(i64, String)> =
        sqlx::query_as("SELECT sequence, state FROM instructions WHERE database_id = $1 ORDER BY sequence")
            .bind(db)
            .fetch_all(&journal)
            .await?;
    ensure!(states.last() == Some(&(3, "succeeded".to_string())), "journal: {states:?}");
    ensure!(!matches!(states[1].1.as_str(), "rejected" | "failed" | "pending"), "journal: {states:?}");
    // Gossip tells one story per instruction: nothing after its terminal event, and nothing from A
    // about the older instruction once B had ended it.
    for i in [&older, &newer] {
        let phases = gossip.phases(&i.instruction_id);
        let ends = phases.iter().filter(|p| is_terminal(**p)).count();
        ensure!(ends == 1 && phases.last().is_some_and(|p| is_terminal(*p)), "{phases:?}");
        ensure!(!phases.contains(&Phase::Rejected), "{phases:?}");
    }
    drop(b);
    operator.abort();
    Ok(())
}

/// Issue 14 (Also): the provisioner's /healthz says whether its journal answers. A replica cut
/// off from PostgreSQL (every byte held in a proxy) turns unhealthy within a probe's timeout and
/// healthy again once the journal answers; before, /healthz said "ok" whatever the journal did.
#[tokio::test(flavor = "multi_thread")]
async fn provisioner_health_follows_its_journal() -> Result<()> {
    let rig = Rig::new("fault-health", 1).await?;
    let pg = TcpHold::start(rig.journal_addr()?).await?;
    let p = rig.spawn_with_journal_through("h", pg.addr, &[])?;
    p.wait_ready().await?;
    ensure!(p.probe("/healthz").await? == (200, "ok".to_string()), "healthy with its journal");
    pg.hold();
    let (code, why) = eventually("unhealthy while the journal is cut off", T, || async {
        Ok(Some(p.probe("/healthz").await?).filter(|(code, _)| *code == 503))
    })
    .await?;
    println!("/healthz {code}: {why}");
    ensure!(why.contains("journal"), "says why: {why}");
    ensure!(p.probe("/readyz").await?.0 == 503, "not ready either");
    pg.release();
    eventually("healthy again", T, || async { Ok((p.probe("/healthz").await?.0 == 200).then_some(())) })
        .await?;
    Ok(())
}
