//! Issue 16: a real QuestDB in the database's pod. Rows are written over ILP/HTTP (acknowledged)
//! before each lifecycle step, the step runs through Kafka instructions (provisioner + operator +
//! node simulator), and every acknowledged row is read back over pgwire afterwards. Clients go
//! the users' way: the database's DNS name through Route53, TLS to the node's Traefik, which
//! routes by server name to the pod. A sampler checks all along that no EBS volume is ever open
//! in two processes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams};
use qdb_proto::v1::{self, GossipEvent, Phase, instruction::Operation};
use qdb_tests::ingress::Ingress;
use qdb_tests::questdb::{
    FencingSampler, execute, expect_rows, filesystem_bytes, parameters, query_pairs, query_text, read_ids,
    write_rows,
};
use qdb_tests::rig::{Reader, Rig, ins};
use qdb_tests::{eventually, kube_client};
use serde_json::Value;

const T: Duration = Duration::from_secs(180);
/// How long the ingress may take to reach a restarted pod.
const CATCH_UP: Duration = Duration::from_secs(30);
/// Installed by `localcloud install` (see QUESTDB_VERSIONS in the script).
const OLDER: &str = "9.2.3";
const NEWER: &str = "9.3.0";

/// The database as a client reaches it: its DNS name from status, resolved through Route53, and
/// the ingress there serving it (the node's Traefik has the route and the pod's endpoint).
async fn ingress(rig: &Rig, db: &str) -> Result<Ingress> {
    let q = rig.questdbs("region-a").await?.get(db).await?;
    let name = q.status.and_then(|s| s.dns).map(|d| d.name).context("no DNS name in status")?;
    Ingress::resolve_serving(&rig.aws("region-a").await?, &rig.dns_zone(), &name, Duration::from_secs(60))
        .await
}

/// Waits for the database to serve (Ready) from an instance other than `not`, and returns it as
/// a client reaches it, and its instance.
async fn serving_elsewhere(rig: &Rig, db: &str, not: &str, timeout: Duration) -> Result<(Ingress, String)> {
    let api = rig.questdbs("region-a").await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = api.get(db).await?.status.unwrap_or_default();
        let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        if let Some(node) = status.node.filter(|n| n.instance_id != not && ready) {
            return Ok((ingress(rig, db).await?, node.instance_id));
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{db} not serving from a new node within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The database through its ingress, and the instance it runs on.
async fn node_ip(rig: &Rig, db: &str) -> Result<(Ingress, String)> {
    let q = rig.questdbs("region-a").await?.get(db).await?;
    let node = q.status.and_then(|s| s.node).context("no node in status")?;
    Ok((ingress(rig, db).await?, node.instance_id))
}

/// Deletes a database (and its volume) through Kafka, as the backend would, and waits for SUCCEEDED: its server,
/// node and ingress process go with it, so they do not load the machine for the tests after
/// (left running, the data tests' databases and their nodes' Traefiks kept both cores busy).
async fn delete(rig: &Rig, gossip: &Reader<GossipEvent>, db: &str, sequence: u64) -> Result<()> {
    let delete = ins::new(
        db,
        "region-a",
        sequence,
        Operation::Delete(v1::Delete { retain_volume: false, ..Default::default() }),
    );
    rig.send(&delete).await?;
    gossip.phase(&delete.instruction_id, Phase::Succeeded, T).await.map(drop)
}

/// The real servers the node simulator runs, as its control API lists them.
async fn containers(rig: &Rig) -> Result<Vec<Value>> {
    let nodesim = &rig.cloud.cluster("region-a")?.nodesim;
    Ok(reqwest::get(format!("{nodesim}/containers")).await?.json().await?)
}

async fn pid_of(rig: &Rig, pod: &str) -> Result<Option<u64>> {
    Ok(containers(rig).await?.iter().find(|c| c["pod"] == pod).and_then(|c| c["pid"].as_u64()))
}

fn ebs_dir(rig: &Rig) -> Result<PathBuf> {
    rig.cloud.vars.get("QDB_EBS_DIR").map(PathBuf::from).context("QDB_EBS_DIR missing from the env file")
}

/// Restart, QuestDB version upgrade, then a node killed (a partition: its QuestDB keeps running
/// until EC2 stops its instance): every acknowledged row is there after each, the upgrade really
/// changed the binary, and no volume was ever open in two processes.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_rows_survive_restart_upgrade_and_failover() -> Result<()> {
    let rig = Rig::new("data-life", 1).await?;
    let sampler = FencingSampler::start(ebs_dir(&rig)?);
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-data";
    let pod = format!("{}/{db}-0", rig.namespace);

    let create = ins::create(db, "region-a", 1, OLDER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (ip, first_instance) = node_ip(&rig, db).await?;
    let build = query_text(&ip, "SELECT build()").await?;
    ensure!(build.contains(&format!("QuestDB {OLDER}")), "{build}");
    write_rows(&ip, "trades", 0, 100).await?;
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;

    // Restart: a new process on the same data.
    let before = pid_of(&rig, &pod).await?.context("no QuestDB process for the pod")?;
    // The pod met the namespace's `restricted` Pod Security level, and the server runs as the
    // image's questdb user with no capabilities, writing to a volume it owns only by its group.
    let status = std::fs::read_to_string(format!("/proc/{before}/status"))?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_string()
    };
    ensure!(field("Uid:").split_whitespace().all(|u| u == "10001"), "Uid {}", field("Uid:"));
    ensure!(field("CapEff:") == "0000000000000000" && field("NoNewPrivs:") == "1", "{status}");
    let restart = ins::new(db, "region-a", 2, Operation::Restart(v1::Restart {}));
    rig.send(&restart).await?;
    gossip.phase(&restart.instruction_id, Phase::Succeeded, T).await?;
    // Ready is reported as the pod passes its probe; the node's Traefik learns of the new pod's
    // endpoint a moment later (it applies changes at most every 2 s).
    ip.wait_serving(CATCH_UP).await?;
    let after = pid_of(&rig, &pod).await?.context("no QuestDB process after the restart")?;
    ensure!(after != before, "the restart left the same process {before}");
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 100, 100).await?;

    // Version upgrade: the other jar, the same data.
    upgrade_to_newer(&rig, &gossip, &ip, db, 3).await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 200, 100).await?;
    let old_pid = pid_of(&rig, &pod).await?.context("no QuestDB process after the upgrade")?;

    // Failover: the node is cut off; its QuestDB runs on until EC2 stops the instance, and a
    // writer on that machine (in the pod) keeps writing to it all the while.
    let uid = containers(&rig)
        .await?
        .iter()
        .find(|c| c["pod"] == pod.as_str())
        .and_then(|c| c["uid"].as_str().map(str::to_string))
        .context("the pod's uid")?;
    let port_base = rig.cloud.vars.get("QDB_PORT_BASE").context("QDB_PORT_BASE")?;
    let old_writer = tokio::spawn(write_in_pod(format!("qdb{port_base}-p-{uid}")));
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    let killed = reqwest::Client::new().post(format!("{nodesim}/nodes/{first_instance}/kill")).send().await?;
    ensure!(killed.status().is_success(), "kill: {}", killed.status());
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "a partition must not kill the node's QuestDB"
    );
    let (new_ip, _) = serving_elsewhere(&rig, db, &first_instance, Duration::from_secs(300)).await?;
    ensure!(new_ip.address != ip.address, "the name points at the replacement's address");
    ensure!(
        !std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the partitioned QuestDB must be dead once its instance is stopped"
    );
    expect_rows(&new_ip, "trades", 0..300, Duration::from_secs(30)).await?;

    // Fencing as rows show it: everything the old process acknowledged is on the volume, and its
    // last row comes before the new process's first.
    let acknowledged = old_writer.await??;
    ensure!(acknowledged > 0, "the writer in the partitioned pod got no row acknowledged");
    write_rows(&new_ip, "fence", 1_000_000, 1).await?;
    // A written row is visible once the server has applied its commit, a moment later (a full
    // run read too early once: "new row"); commits apply in order, so with it come all before it.
    let rows = eventually("the new process's row visible", Duration::from_secs(30), || async {
        let rows = query_pairs(&new_ip, "SELECT id, cast(timestamp AS long) FROM fence").await?;
        Ok(rows.iter().any(|(id, _)| *id >= 1_000_000).then_some(rows))
    })
    .await?;
    let old: Vec<&(i64, i64)> = rows.iter().filter(|(id, _)| *id < 1_000_000).collect();
    let first_new =
        rows.iter().filter(|(id, _)| *id >= 1_000_000).map(|(_, ts)| *ts).min().context("new row")?;
    let last_old = old.iter().map(|(_, ts)| *ts).max().context("old rows")?;
    ensure!(
        old.len() as u64 == acknowledged,
        "{} of {acknowledged} rows the old process acknowledged",
        old.len()
    );
    ensure!(
        last_old < first_new,
        "the old process wrote at {last_old}, after the new one's first row at {first_new}"
    );
    println!(
        "the partitioned QuestDB acknowledged {acknowledged} rows; its last {} us before the new one's first",
        first_new - last_old
    );
    let most = sampler.assert_fenced()?;
    println!("most processes per volume at once: {most:?}");
    ensure!(!most.is_empty(), "the sampler never saw a volume open: it proves nothing");
    delete(&rig, &gossip, db, 4).await
}

/// Upgrades `db` to the NEWER release through Kafka, as the backend would, and checks that the
/// server its ingress reaches runs that release.
async fn upgrade_to_newer(
    rig: &Rig,
    gossip: &Reader<GossipEvent>,
    ip: &Ingress,
    db: &str,
    sequence: u64,
) -> Result<()> {
    let upgrade = ins::version(db, "region-a", sequence, NEWER);
    rig.send(&upgrade).await?;
    gossip.phase(&upgrade.instruction_id, Phase::Succeeded, T).await?;
    ip.wait_serving(CATCH_UP).await?;
    let build = query_text(ip, "SELECT build()").await?;
    ensure!(build.contains(&format!("QuestDB {NEWER}")), "after the upgrade: {build}");
    Ok(())
}

/// Writes one row a time into `fence` from inside the pod's network namespace (as a process on
/// that machine would, unaffected by the partition) until the server stops answering; returns
/// how many it acknowledged.
async fn write_in_pod(netns: String) -> Result<u64> {
    let mut acknowledged = 0;
    let mut failures = 0;
    for id in 0.. {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-m", "2", "-XPOST", "http://127.0.0.1:9000/write", "--data-binary"])
            .arg(format!("fence,src=old id={id}i"))
            .output()
            .await?;
        if out.stdout == b"204" {
            acknowledged += 1;
            failures = 0;
        } else {
            failures += 1;
            if failures >= 5 && acknowledged > 0 {
                return Ok(acknowledged);
            }
            anyhow::ensure!(id < 3000, "the pod's QuestDB never stopped answering");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!("the loop returns")
}

/// An image whose QuestDB version is not installed cannot be pulled: the pod waits in
/// ImagePullBackOff, and the backend hears FAILED with that reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_that_cannot_be_pulled_fails_on_gossip() -> Result<()> {
    let rig = Rig::new("data-pull", 1).await?;
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let create = ins::create("db-nopull", "region-a", 1, "9.9.9");
    rig.send(&create).await?;
    let end = gossip.end(&create.instruction_id, T).await?;
    ensure!(end.phase() == Phase::Failed, "{end:?}");
    ensure!(end.reason == "IMAGE_PULL_FAILED", "{end:?}");
    ensure!(end.message.contains("questdb/questdb:9.9.9"), "{end:?}");
    // The kubelet says so on the pod too, as `kubectl describe pod` shows it.
    let said: Vec<(String, String, String)> = events(&rig)
        .await?
        .list(&ListParams::default().fields("involvedObject.name=db-nopull-0"))
        .await?
        .into_iter()
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    ensure!(
        said.iter().any(|(t, r, m)| t == "Warning" && r == "Failed" && m.contains("questdb/questdb:9.9.9")),
        "no Failed event for the image: {said:?}"
    );
    ensure!(said.iter().any(|(_, r, _)| r == "BackOff"), "no BackOff event: {said:?}");
    delete(&rig, &gossip, "db-nopull", 2).await
}

/// A value QuestDB must read back exactly as the spec says: a trailing backslash (which, written
/// raw, would join the next line and swallow a pinned key), `#`, `!`, `=`, `:`, Latin-1, the
/// euro sign and a character outside the BMP.
const TRICKY: &str = "a\\b #!=: caf\u{e9} \u{20ac}5 \u{1d11e} end\\";

/// A config change restarts QuestDB on the new server.conf, which reads back exactly (the pinned
/// bind address too); pause then resume keeps the data; a volume growth keeps it too; and a
/// volume kept at deletion brings it back in a new database.
#[tokio::test(flavor = "multi_thread")]
async fn config_change_pause_resume_growth_and_a_kept_volume_keep_every_row() -> Result<()> {
    let rig = Rig::new("data-conf", 1).await?;
    let sampler = FencingSampler::start(ebs_dir(&rig)?);
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-conf";
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (ip, instance) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 100).await?;

    let set = ins::new(
        db,
        "region-a",
        2,
        Operation::Modify(v1::Modify {
            set_server_config: [
                // A free-text key only the legacy BACKUP statement reads.
                ("cairo.sql.backup.dir.tmp.name".to_string(), TRICKY.to_string()),
                ("pg.readonly.user".to_string(), "ro#!=:x".to_string()),
            ]
            .into(),
            ..Default::default()
        }),
    );
    rig.send(&set).await?;
    gossip.phase(&set.instruction_id, Phase::Succeeded, T).await?;
    ip.wait_serving(CATCH_UP).await?;
    let params = parameters(&ip).await?;
    let got = |k: &str| params.get(k).cloned().unwrap_or_default();
    ensure!(
        got("cairo.sql.backup.dir.tmp.name") == TRICKY,
        "read back {:?}",
        got("cairo.sql.backup.dir.tmp.name")
    );
    ensure!(got("pg.readonly.user") == "ro#!=:x", "read back {:?}", got("pg.readonly.user"));
    ensure!(got("http.bind.to") == "0.0.0.0:9000", "the pinned bind address: {:?}", got("http.bind.to"));
    ensure!(got("cairo.commit.lag") == "1000", "the create's key: {:?}", got("cairo.commit.lag"));
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 100, 100).await?;

    let pause = ins::new(db, "region-a", 3, Operation::Pause(v1::Pause {}));
    rig.send(&pause).await?;
    gossip.phase(&pause.instruction_id, Phase::Succeeded, T).await?;
    let resume = ins::new(db, "region-a", 4, Operation::Resume(v1::Resume {}));
    rig.send(&resume).await?;
    gossip.phase(&resume.instruction_id, Phase::Succeeded, T).await?;
    let (ip, _) = serving_elsewhere(&rig, db, &instance, Duration::from_secs(60)).await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 200, 100).await?;

    // The volume is a filesystem of its own, of the volume's size (20 GiB at create).
    let pod = format!("{}/{db}-0", rig.namespace);
    let server =
        containers(&rig).await?.into_iter().find(|c| c["pod"] == pod.as_str()).context("no server")?;
    let volume = server["volume_id"].as_str().context("the server has no volume")?.to_string();
    let root = ebs_dir(&rig)?.join(&volume);
    let before = filesystem_bytes(&root)?;
    ensure!((19 * GIB..=20 * GIB).contains(&before), "{volume} is {before} bytes before growing");
    let grow = ins::new(
        db,
        "region-a",
        5,
        Operation::Modify(v1::Modify { volume_size_gib: Some(30), ..Default::default() }),
    );
    rig.send(&grow).await?;
    gossip.phase(&grow.instruction_id, Phase::Succeeded, T).await?;
    ip.wait_serving(CATCH_UP).await?;
    expect_rows(&ip, "trades", 0..300, Duration::from_secs(10)).await?;
    // Grown online, under the running server: the same process, a larger filesystem.
    let grown = eventually("the filesystem to grow", Duration::from_secs(30), || async {
        let now = filesystem_bytes(&root)?;
        Ok((now > 29 * GIB).then_some(now))
    })
    .await?;
    ensure!(grown <= 30 * GIB, "{volume} is {grown} bytes after growing to 30 GiB");
    ensure!(pid_of(&rig, &pod).await? == server["pid"].as_u64(), "the server restarted to grow its volume");
    write_rows(&ip, "trades", 300, 100).await?;
    expect_rows(&ip, "trades", 0..400, Duration::from_secs(10)).await?;

    // "Keep my data": deleted with its volume kept, the rows come back in a new database created
    // from that volume (its node in the volume's zone).
    let keep = ins::new(
        db,
        "region-a",
        6,
        Operation::Delete(v1::Delete { retain_volume: true, ..Default::default() }),
    );
    rig.send(&keep).await?;
    gossip.phase(&keep.instruction_id, Phase::Succeeded, T).await?;
    let again = "db-conf-again";
    let mut create = ins::create(again, "region-a", 1, NEWER);
    if let Some(Operation::Create(c)) = create.operation.as_mut() {
        let spec = c.spec.as_mut().context("the create has a spec")?;
        spec.volume.get_or_insert_default().from_volume_id = Some(volume.clone());
    }
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let q = rig.questdbs("region-a").await?.get(again).await?;
    let taken = q.status.and_then(|s| s.volume).context("no volume in status")?;
    ensure!(taken.id == volume && taken.size_gib == 30, "not the kept volume: {taken:?}");
    let (ip, _) = node_ip(&rig, again).await?;
    expect_rows(&ip, "trades", 0..400, Duration::from_secs(30)).await?;
    sampler.assert_fenced()?;
    delete(&rig, &gossip, again, 2).await
}

/// Issue 18, restore: a database created from an EBS snapshot of another starts with exactly the
/// rows the snapshot holds. The snapshot is taken the consistent way (CHECKPOINT CREATE, which
/// syncs; CreateSnapshot; CHECKPOINT RELEASE), by the test for now, tagged with the cluster as
/// the operator's own will be; rows written after CHECKPOINT CREATE must not be in the clone,
/// which starts with QuestDB's checkpoint recovery. The local cloud's
/// AWS layer copies the volume's storage when CreateSnapshot is accepted, and the snapshot is
/// pending for a while first, as on EBS: the clone waits for it (SnapshotPending).
#[tokio::test(flavor = "multi_thread")]
async fn a_clone_from_a_snapshot_has_exactly_the_rows_of_the_snapshot() -> Result<()> {
    use qdb_crd::keys;

    let rig = Rig::new("data-snap", 1).await?;
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-snap";
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (ip, _) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 100).await?;
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;
    let q = rig.questdbs("region-a").await?.get(db).await?;
    let volume = q.status.and_then(|s| s.volume).context("no volume in status")?.id;

    let region = rig.cloud.cluster("region-a")?;
    let ec2 = rig.cloud.ec2(&region.aws_region).await;
    execute(&ip, "CHECKPOINT CREATE").await?;
    // Rows written after the checkpoint and before the snapshot are on the device the snapshot
    // copies; the clone must recover the checkpoint without them.
    write_rows(&ip, "trades", 100, 50).await?;
    expect_rows(&ip, "trades", 0..150, Duration::from_secs(10)).await?;
    let tags = aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
        .tags(aws_sdk_ec2::types::Tag::builder().key(keys::CLUSTER).value(&region.name).build())
        .build();
    let taken = ec2.create_snapshot().volume_id(&volume).tag_specifications(tags).send().await;
    execute(&ip, "CHECKPOINT RELEASE").await?;
    let snapshot = taken?.snapshot_id.context("no snapshot id")?;
    write_rows(&ip, "trades", 150, 50).await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;

    let clone = "db-snap-clone";
    let create = ins::create_from_snapshot(clone, "region-a", 1, NEWER, &snapshot);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let q = rig.questdbs("region-a").await?.get(clone).await?;
    let restored = q.status.and_then(|s| s.volume).context("no volume in status")?;
    ensure!(restored.id != volume, "the clone took the source's volume {volume}");
    let (clone_ip, _) = node_ip(&rig, clone).await?;
    expect_rows(&clone_ip, "trades", 0..100, Duration::from_secs(30)).await?;
    // The clone is a database of its own: it takes writes, and the source keeps its 200 rows.
    write_rows(&clone_ip, "trades", 500, 10).await?;
    expect_rows(&clone_ip, "trades", (0..100).chain(500..510), Duration::from_secs(10)).await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;

    // A snapshot id the cluster does not have fails the create with the reason.
    let wrong = "db-snap-wrong";
    let create = ins::create_from_snapshot(wrong, "region-a", 1, NEWER, "snap-0123456789abcdef0");
    rig.send(&create).await?;
    let failed = gossip.phase(&create.instruction_id, Phase::Failed, T).await?;
    ensure!(failed.message.contains("snap-0123456789abcdef0"), "failed with {:?}", failed.message);

    delete(&rig, &gossip, clone, 2).await?;
    delete(&rig, &gossip, wrong, 2).await?;
    delete(&rig, &gossip, db, 2).await?;
    ec2.delete_snapshot().snapshot_id(&snapshot).send().await?;
    Ok(())
}

/// Issue 18: Snapshot instructions. A serving database is snapshotted under CHECKPOINT CREATE
/// and released at once (a CHECKPOINT CREATE of the test's right after is accepted, which QuestDB
/// refuses while one is in effect); a paused one crash-consistently. Each instruction succeeds
/// once EBS completed its snapshot, naming it on gossip; status lists both. A clone of the first
/// has exactly the rows written before it. A delete with remove_snapshots removes them all.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_instructions_take_consistent_snapshots_and_crash_consistent_ones_when_paused() -> Result<()>
{
    use qdb_crd::{Consistency, SnapshotPhase};

    let rig = Rig::new("data-snapins", 1).await?;
    let gossip = rig.gossip()?;
    let mut op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-snapins";
    let mut snapshots = Vec::new();
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (ip, _) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 100).await?;
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;

    let label = Some("before-more-rows".to_string());
    let first = ins::new(db, "region-a", 2, Operation::Snapshot(v1::Snapshot { label: label.clone() }));
    rig.send(&first).await?;
    let done = gossip.phase(&first.instruction_id, Phase::Succeeded, T).await?;
    ensure!(done.snapshot_id.starts_with("snap-"), "no snapshot id on gossip: {done:?}");
    execute(&ip, "CHECKPOINT CREATE").await.context("the operator left its checkpoint in effect")?;
    execute(&ip, "CHECKPOINT RELEASE").await?;
    write_rows(&ip, "trades", 100, 100).await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;

    // The operator killed with its checkpoint step open: the next one releases it and records
    // the one snapshot the request took. The step is open for tens of milliseconds, so the kill
    // follows a watch of the resource and is tried until one lands inside it.
    let api = rig.questdbs("region-a").await?;
    let region = rig.cloud.cluster("region-a")?;
    let ec2 = rig.cloud.ec2(&region.aws_region).await;
    let (mut sequence, mut landed, mut tries) = (3, false, 0);
    while !landed {
        ensure!(tries < 4, "no kill landed while the checkpoint step was open, in {tries} tries");
        tries += 1;
        let version = api.get(db).await?.metadata.resource_version.unwrap_or_default();
        let params = kube::api::WatchParams::default().fields(&format!("metadata.name={db}"));
        let mut events = api.watch(&params, &version).await?.boxed();
        let snap = ins::new(db, "region-a", sequence, Operation::Snapshot(v1::Snapshot { label: None }));
        sequence += 1;
        rig.send(&snap).await?;
        let opened = tokio::time::timeout(T, async {
            while let Some(event) = events.try_next().await? {
                if let kube::api::WatchEvent::Modified(q) = event
                    && q.status.as_ref().is_some_and(|s| s.checkpoint.is_some())
                {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("the watch ended")
        });
        opened.await.context("no checkpoint step recorded")??;
        op.kill9()?;
        landed = api.get(db).await?.status.is_some_and(|s| s.checkpoint.is_some());
        op = rig.spawn_operator("region-a", &format!("a{}", tries + 1), &[])?;
        let taken = gossip.phase(&snap.instruction_id, Phase::Succeeded, T).await?;
        let status = api.get(db).await?.status.context("no status")?;
        ensure!(
            status.checkpoint.is_none(),
            "the checkpoint step is still open after {}",
            snap.instruction_id
        );
        let for_it: Vec<_> = status.snapshots.iter().filter(|s| s.request == snap.instruction_id).collect();
        ensure!(
            for_it.len() == 1 && for_it[0].id == taken.snapshot_id,
            "{for_it:?} vs {}",
            taken.snapshot_id
        );
        let by_request = aws_sdk_ec2::types::Filter::builder()
            .name(format!("tag:{}", qdb_crd::keys::SNAPSHOT_REQUEST))
            .values(&snap.instruction_id)
            .build();
        let tagged = ec2.describe_snapshots().owner_ids("self").filters(by_request).send().await?;
        ensure!(tagged.snapshots().len() == 1, "{} snapshots for one request", tagged.snapshots().len());
        execute(&ip, "CHECKPOINT CREATE").await.context("the checkpoint stayed in effect past the kill")?;
        execute(&ip, "CHECKPOINT RELEASE").await?;
        snapshots.push(taken.snapshot_id);
    }

    let pause = ins::new(db, "region-a", sequence, Operation::Pause(v1::Pause {}));
    rig.send(&pause).await?;
    gossip.phase(&pause.instruction_id, Phase::Succeeded, T).await?;
    let second = ins::new(db, "region-a", sequence + 1, Operation::Snapshot(v1::Snapshot { label: None }));
    rig.send(&second).await?;
    let paused = gossip.phase(&second.instruction_id, Phase::Succeeded, T).await?;
    ensure!(paused.snapshot_id.starts_with("snap-") && paused.snapshot_id != done.snapshot_id, "{paused:?}");

    let status = rig.questdbs("region-a").await?.get(db).await?.status.context("no status")?;
    ensure!(status.checkpoint.is_none(), "a checkpoint step is still open: {:?}", status.checkpoint);
    let listed: Vec<_> = status.snapshots.iter().map(|s| (s.id.as_str(), s.consistency, s.state)).collect();
    let consistent = (Consistency::Consistent, SnapshotPhase::Completed);
    let mut want = vec![(done.snapshot_id.as_str(), consistent.0, consistent.1)];
    want.extend(snapshots.iter().map(|id| (id.as_str(), consistent.0, consistent.1)));
    want.push((paused.snapshot_id.as_str(), Consistency::CrashConsistent, SnapshotPhase::Completed));
    ensure!(listed == want, "status lists {listed:?}, want {want:?}");
    ensure!(status.snapshots[0].request == first.instruction_id, "{:?}", status.snapshots[0]);
    ensure!(
        status.snapshots.last().is_some_and(|s| s.request == second.instruction_id),
        "{:?}",
        status.snapshots
    );
    ensure!(status.snapshots[0].label == label, "label {:?}", status.snapshots[0].label);

    let clone = "db-snapins-clone";
    let create = ins::create_from_snapshot(clone, "region-a", 1, NEWER, &done.snapshot_id);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (clone_ip, _) = node_ip(&rig, clone).await?;
    expect_rows(&clone_ip, "trades", 0..100, Duration::from_secs(30)).await?;

    delete(&rig, &gossip, clone, 2).await?;
    // Deleted with its snapshots: none of them is left.
    let remove = v1::Delete { remove_snapshots: true, ..Default::default() };
    let delete = ins::new(db, "region-a", sequence + 2, Operation::Delete(remove));
    rig.send(&delete).await?;
    gossip.phase(&delete.instruction_id, Phase::Succeeded, T).await?;
    for snapshot in snapshots.iter().chain([&done.snapshot_id, &paused.snapshot_id]) {
        let left = ec2.describe_snapshots().owner_ids("self").snapshot_ids(snapshot).send().await;
        let left = left.map(|o| o.snapshots().len()).unwrap_or(0);
        ensure!(left == 0, "{snapshot} outlived its database's delete with remove_snapshots");
    }
    Ok(())
}

/// Issue 18: a snapshot taken while an ILP writer runs is consistent. The writer sends batches
/// of 1000 rows back to back, each acknowledged before the next; a Snapshot instruction is sent
/// in the middle. A database made from the snapshot has a whole prefix of the batches: every row
/// acknowledged before the instruction was sent, no batch in part, nothing never acknowledged, and
/// its table reads. The clone is asked for as a clone of the database (its latest completed
/// snapshot, which the provisioner resolves and gossip names); asked for before any snapshot, it
/// is rejected. The writer's longest wait for an acknowledgement while the snapshot was taken
/// is printed (the write stall as a client sees it; measured, not asserted).
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_taken_while_an_ilp_writer_runs_holds_a_whole_prefix_of_its_batches() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const BATCH: u64 = 1000;
    let rig = Rig::new("data-snapilp", 1).await?;
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-snapilp";
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (writer_db, _) = node_ip(&rig, db).await?;
    let clone = "db-snapilp-clone";
    let early = ins::create_clone_of(clone, "region-a", 1, NEWER, db);
    rig.send(&early).await?;
    let rejected = gossip.phase(&early.instruction_id, Phase::Rejected, T).await?;
    ensure!(
        rejected.reason == "NO_SNAPSHOT_TO_CLONE" && rejected.message.contains("no completed snapshot"),
        "{rejected:?}"
    );
    let (acked, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            // (when each batch was acknowledged, rows acknowledged by then)
            let mut acks = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let from = acked.load(Ordering::SeqCst);
                write_rows(&writer_db, "trades", from, BATCH).await?;
                acked.store(from + BATCH, Ordering::SeqCst);
                acks.push(std::time::Instant::now());
            }
            anyhow::Ok(acks)
        })
    };
    while acked.load(Ordering::SeqCst) < 20 * BATCH {
        ensure!(!writer.is_finished(), "the writer stopped: {:?}", writer.await?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snap = ins::new(db, "region-a", 2, Operation::Snapshot(v1::Snapshot { label: None }));
    let (before, sent) = (acked.load(Ordering::SeqCst), std::time::Instant::now());
    rig.send(&snap).await?;
    let taken = gossip.phase(&snap.instruction_id, Phase::Succeeded, T).await?;
    let (after, done) = (acked.load(Ordering::SeqCst), std::time::Instant::now());
    stop.store(true, Ordering::SeqCst);
    let acks = writer.await??;
    let during: Vec<_> = acks.iter().filter(|t| **t >= sent && **t <= done).collect();
    let longest = during.windows(2).map(|w| w[1].duration_since(*w[0])).max().unwrap_or_default();
    println!(
        "snapshot {} taken while writing: {} batches acknowledged during the instruction ({:.1} s), longest wait between two {:.0} ms",
        taken.snapshot_id,
        during.len(),
        done.duration_since(sent).as_secs_f64(),
        longest.as_secs_f64() * 1000.0
    );
    ensure!(during.len() >= 2, "the writer made no progress while the snapshot was taken");

    let create = ins::create_clone_of(clone, "region-a", 2, NEWER, db);
    rig.send(&create).await?;
    let cloned = gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    ensure!(cloned.snapshot_id == taken.snapshot_id, "cloned from {:?}", cloned.snapshot_id);
    let (clone_db, _) = node_ip(&rig, clone).await?;
    // WAL tables apply committed transactions in the background: wait until every row
    // acknowledged before the instruction is readable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ids = loop {
        let ids = read_ids(&clone_db, "trades").await.unwrap_or_default();
        if ids.len() as u64 >= before || tokio::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rows = ids.len() as u64;
    ensure!(
        ids.iter().enumerate().all(|(i, id)| *id == i as i64),
        "the clone's rows are not a prefix 0..{rows}: {:?}",
        ids.iter().enumerate().find(|(i, id)| **id != *i as i64)
    );
    ensure!(rows.is_multiple_of(BATCH), "the clone has {rows} rows: a batch in part");
    ensure!(rows >= before, "the clone has {rows} rows, {before} were acknowledged before the snapshot");
    ensure!(rows <= after, "the clone has {rows} rows, only {after} were acknowledged by its success");
    println!(
        "the clone holds {rows} rows: {before} acknowledged before the instruction, {after} by its success"
    );
    delete(&rig, &gossip, clone, 3).await?;
    delete(&rig, &gossip, db, 3).await
}

/// Issue 18, schedules and retention: a database whose policy takes a snapshot every minute and
/// keeps one has, after the second, only that one, in status and in EC2 (the first deleted).
/// Scheduled snapshots of a serving database are consistent. A schedule that is not cron is
/// rejected on gossip with the field at fault, and the database keeps its policy.
#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_takes_snapshots_and_retention_keeps_the_newest() -> Result<()> {
    use qdb_crd::{Consistency, SnapshotPhase, SnapshotReason};

    let rig = Rig::new("data-sched", 1).await?;
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-sched";
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (ip, _) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 10).await?;

    let bad = v1::SnapshotPolicy { schedule: Some("61 * * * *".into()), ..Default::default() };
    let modify = v1::Modify { snapshot_policy: Some(bad), ..Default::default() };
    let refused = ins::new(db, "region-a", 2, Operation::Modify(modify));
    rig.send(&refused).await?;
    let rejected = gossip.phase(&refused.instruction_id, Phase::Rejected, T).await?;
    ensure!(rejected.message.contains("minute \"61\""), "refused with {:?}", rejected.message);
    // Set on a serving database, whose creation is a scheduled time ago: the first snapshot is
    // taken at once (the time missed since creation), the next at the next minute.
    let every_minute = Some("* * * * *".to_string());
    let policy = v1::SnapshotPolicy { keep: Some(1), schedule: every_minute, before_changes: None };
    let modify = v1::Modify { snapshot_policy: Some(policy), ..Default::default() };
    let scheduled = ins::new(db, "region-a", 3, Operation::Modify(modify));
    rig.send(&scheduled).await?;
    gossip.phase(&scheduled.instruction_id, Phase::Succeeded, T).await?;

    // Every id a scheduled snapshot had, until the second one completed.
    let api = rig.questdbs("region-a").await?;
    let region = rig.cloud.cluster("region-a")?;
    let ec2 = rig.cloud.ec2(&region.aws_region).await;
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(200);
    let last = loop {
        let status = api.get(db).await?.status.unwrap_or_default();
        for s in &status.snapshots {
            ensure!(s.reason == SnapshotReason::Scheduled, "{s:?}");
            ensure!(s.consistency == Consistency::Consistent, "a serving database's snapshot: {s:?}");
            if !seen.contains(&s.id) {
                seen.push(s.id.clone());
            }
        }
        let completed: Vec<_> =
            status.snapshots.iter().filter(|s| s.state == SnapshotPhase::Completed).collect();
        if seen.len() >= 2
            && completed.len() == 1
            && status.snapshots.len() == 1
            && completed[0].id != seen[0]
        {
            break completed[0].id.clone();
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "in 200 s: seen {seen:?}, status {:?}",
            status.snapshots
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let uid = api.get(db).await?.metadata.uid.context("no uid")?;
    let owned = aws_sdk_ec2::types::Filter::builder()
        .name(format!("tag:{}", qdb_crd::keys::OWNER_UID))
        .values(&uid)
        .build();
    let listed = ec2.describe_snapshots().owner_ids("self").filters(owned).send().await?;
    let listed: Vec<&str> = listed.snapshots().iter().filter_map(|s| s.snapshot_id()).collect();
    ensure!(listed == [last.as_str()], "EC2 lists {listed:?}, status keeps {last} (seen {seen:?})");
    delete(&rig, &gossip, db, 4).await
}

const GIB: u64 = 1 << 30;

/// The Events of the test's namespace in region-a.
async fn events(rig: &Rig) -> Result<Api<Event>> {
    let c = rig.cloud.cluster("region-a")?;
    Ok(Api::namespaced(kube_client(&c.kubeconfig).await?, &rig.namespace))
}

/// The database's pod requests `memory` (also its limit) and `cpu`, fits its node's allocatable
/// as the scheduler saw it, and its QuestDB runs with a quarter of the limit as heap.
async fn expect_sized(rig: &Rig, db: &str, memory: &str, cpu: &str) -> Result<()> {
    let c = rig.cloud.cluster("region-a")?;
    let client = kube_client(&c.kubeconfig).await?;
    let pod: Pod = Api::namespaced(client.clone(), &rig.namespace).get(&format!("{db}-0")).await?;
    let spec = pod.spec.context("pod spec")?;
    let r = spec.containers[0].resources.clone().context("no resources")?;
    let get = |m: &Option<std::collections::BTreeMap<String, Quantity>>, k: &str| {
        m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone()).unwrap_or_default()
    };
    ensure!(get(&r.requests, "memory") == memory && get(&r.limits, "memory") == memory, "{r:?}");
    ensure!(get(&r.requests, "cpu") == cpu && get(&r.limits, "cpu").is_empty(), "{r:?}");
    let node: Node = Api::all(client).get(spec.node_name.as_deref().context("unscheduled")?).await?;
    let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
    ensure!(allocatable.contains_key("memory") && allocatable.contains_key("pods"), "{allocatable:?}");
    let mib: u64 = memory.trim_end_matches("Mi").parse()?;
    let pid = pid_of(rig, &format!("{}/{db}-0", rig.namespace)).await?.context("no QuestDB process")?;
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?.replace('\0', " ");
    ensure!(cmdline.contains(&format!("-Xmx{}m", mib / 4)), "heap not from the limit: {cmdline}");
    Ok(())
}

/// How many pods the database's StatefulSet has created so far, from its controller's events.
async fn pods_created(rig: &Rig, db: &str) -> Result<i32> {
    let list =
        events(rig).await?.list(&ListParams::default().fields(&format!("involvedObject.name={db}"))).await?;
    Ok(list
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SuccessfulCreate"))
        .map(|e| e.count.unwrap_or(1))
        .sum())
}

/// Node image upgrade and instance type change move the database to a new machine; then a
/// failover whose operator is killed mid-way: a new operator finishes it. Every acknowledged
/// row is there after each, and no volume was ever open in two processes.
///
/// Issue 18, the safety snapshot: the node image upgrade starts only once its safety snapshot
/// completed (a watch of the resource sees no replacement and no new image before that), gossip
/// names it, and a database made from it has exactly the rows from before the upgrade (until the
/// Restore operation exists, a clone is how the backend goes back to it). The instance type
/// change is asked for with the policy's beforeChanges off: no snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn node_moves_and_a_failover_with_the_operator_killed_keep_every_row() -> Result<()> {
    let rig = Rig::new("data-move", 1).await?;
    let sampler = FencingSampler::start(ebs_dir(&rig)?);
    let gossip = rig.gossip()?;
    let mut op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-move";
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let (ip, instance) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 100).await?;

    let image = ins::new(
        db,
        "region-a",
        2,
        Operation::Modify(v1::Modify {
            node_image: Some("ami-0b0b0b0b0b0b0b0b0".into()),
            ..Default::default()
        }),
    );
    let created = pods_created(&rig, db).await?;
    let api = rig.questdbs("region-a").await?;
    let order = tokio::spawn(no_move_before_a_safety_snapshot(api.clone(), db.to_string()));
    rig.send(&image).await?;
    let upgraded = gossip.phase(&image.instruction_id, Phase::Succeeded, T).await?;
    ensure!(!order.is_finished(), "the watch of the upgrade ended: {:?}", order.await?);
    order.abort();
    let safety = upgraded.snapshot_id.clone();
    let status = api.get(db).await?.status.context("no status")?;
    let entry = status.snapshots.iter().find(|s| s.id == safety);
    let entry =
        entry.with_context(|| format!("gossip names {safety:?}, status lists {:?}", status.snapshots))?;
    ensure!(
        entry.reason == qdb_crd::SnapshotReason::BeforeChange
            && entry.consistency == qdb_crd::Consistency::Consistent
            && entry.label.as_deref()
                == Some("before node image ami-0a0a0a0a0a0a0a0a0 -> ami-0b0b0b0b0b0b0b0b0"),
        "{entry:?}"
    );
    let (ip, instance) = {
        let now = node_ip(&rig, db).await?;
        ensure!(now.1 != instance, "the node image upgrade kept instance {instance}");
        now
    };
    // One new pod for the move (the drained one is recreated on the replacement, where it
    // waits for the volume); not one per pass while the move waits on EC2.
    let recreated = pods_created(&rig, db).await? - created;
    ensure!(recreated <= 2, "the pod was created {recreated} times during one node move");
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 100, 100).await?;

    // The pod is sized for its node (an m6i.large: 8192 MiB, 2 vCPUs, 29 pods), and the real
    // QuestDB takes its heap from that limit.
    expect_sized(&rig, db, "6514Mi", "1680m").await?;
    let resize = ins::new(
        db,
        "region-a",
        3,
        Operation::Modify(v1::Modify {
            instance_type: Some("m6i.xlarge".into()),
            snapshot_policy: Some(v1::SnapshotPolicy { before_changes: Some(false), ..Default::default() }),
            ..Default::default()
        }),
    );
    let created = pods_created(&rig, db).await?;
    rig.send(&resize).await?;
    let resized = gossip.phase(&resize.instruction_id, Phase::Succeeded, T).await?;
    ensure!(resized.snapshot_id.is_empty(), "a safety snapshot with beforeChanges off: {resized:?}");
    let listed = api.get(db).await?.status.map(|s| s.snapshots.len()).unwrap_or_default();
    ensure!(listed == 1, "{listed} snapshots after one safety snapshot");
    let (ip, instance) = {
        let now = node_ip(&rig, db).await?;
        ensure!(now.1 != instance, "the instance type change kept instance {instance}");
        now
    };
    // Resized once, on the new node: not restarted on the old one first.
    let recreated = pods_created(&rig, db).await? - created;
    ensure!(recreated <= 2, "the pod was created {recreated} times during the instance type change");
    expect_sized(&rig, db, "13895Mi", "3670m").await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 200, 100).await?;

    // Failover, the operator killed once the replacement is under way.
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    let killed = reqwest::Client::new().post(format!("{nodesim}/nodes/{instance}/kill")).send().await?;
    ensure!(killed.status().is_success(), "kill: {}", killed.status());
    let api = rig.questdbs("region-a").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let status = api.get(db).await?.status.unwrap_or_default();
        if status.replacement.is_some() {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "no failover started within 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    op.kill9()?;
    let _op2 = rig.spawn_operator("region-a", "a2", &[])?;
    let (ip, _) = serving_elsewhere(&rig, db, &instance, Duration::from_secs(300)).await?;
    expect_rows(&ip, "trades", 0..300, Duration::from_secs(30)).await?;
    sampler.assert_fenced()?;

    // Back to the point before the upgrade with one Restore naming the safety snapshot, in place:
    // exactly the rows written before it, on a new volume; the old one deleted (reclaim Delete).
    let old_volume = api.get(db).await?.status.and_then(|s| s.volume).context("no volume")?.id;
    let launched = notes(&rig, db, "LaunchedInstance").await?;
    let restore = ins::restore(db, "region-a", 4, Some(&safety), None);
    rig.send(&restore).await?;
    let restored = gossip.end(&restore.instruction_id, T).await?;
    ensure!(restored.phase == Phase::Succeeded as i32, "{restored:?}");
    ensure!(restored.snapshot_id == safety && restored.message.contains("data as of"), "{restored:?}");
    let s = api.get(db).await?.status.context("no status")?;
    let volume = s.volume.context("no volume after the restore")?;
    ensure!(volume.id != old_volume, "the restore kept volume {old_volume}");
    let last = s.last_restore.context("no lastRestore")?;
    ensure!(last.snapshot == safety && last.volume.as_deref() == Some(volume.id.as_str()), "{last:?}");
    ensure!(s.restore.is_none(), "a restore still under way: {:?}", s.restore);
    // One new node: not first the failover's node, terminated by the stop, under its own launch
    // token (EC2 answers with that instance; the operator then waited a minute for a node).
    let new: Vec<String> =
        notes(&rig, db, "LaunchedInstance").await?.into_iter().filter(|n| !launched.contains(n)).collect();
    ensure!(new.len() == 1, "the restore launched {new:?}");
    let (ip, _) = node_ip(&rig, db).await?;
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(30)).await?;
    ensure!(volume_gone(&rig, &old_volume).await?, "the replaced volume {old_volume} is still there");
    sampler.assert_fenced()?;
    delete(&rig, &gossip, db, 5).await
}

/// The notes of the operator's events of `reason` about database `db`.
async fn notes(rig: &Rig, db: &str, reason: &str) -> Result<Vec<String>> {
    let params = ListParams::default().fields(&format!("involvedObject.name={db},reason={reason}"));
    Ok(events(rig).await?.list(&params).await?.into_iter().filter_map(|e| e.message).collect())
}

/// Whether EC2 no longer lists the volume (or lists it deleting).
async fn volume_gone(rig: &Rig, id: &str) -> Result<bool> {
    let region = rig.cloud.cluster("region-a")?;
    let ec2 = rig.cloud.ec2(&region.aws_region).await;
    let by_id = aws_sdk_ec2::types::Filter::builder().name("volume-id").values(id).build();
    let out = ec2.describe_volumes().filters(by_id).send().await?;
    Ok(out.volumes().iter().all(|v| {
        matches!(
            v.state(),
            Some(aws_sdk_ec2::types::VolumeState::Deleting | aws_sdk_ec2::types::VolumeState::Deleted)
        )
    }))
}

/// Issue 18: a zone move. The database's zone goes down: EC2 refuses every launch there (a proxy
/// answers RunInstances as EC2 does without capacity) and its node dies, so the failover cannot
/// bring it back. A Restore into another zone does: the latest snapshot's rows (and none written
/// after it), on a node and volume in that zone, reached by its DNS name; gossip says how old the
/// data is; the old volume is deleted once the restored database serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_zone_move_brings_a_database_back_from_a_zone_that_is_down() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use qdb_tests::scripted::{Answer, ScriptedProxy, form_value};

    let rig = Rig::new("data-zone", 1).await?;
    let region = rig.cloud.cluster("region-a")?;
    let subnets = region.network_var("QDB_SUBNETS").context("subnets")?.to_string();
    let zones: Vec<(String, String)> = subnets
        .split(',')
        .filter_map(|p| p.split_once('=').map(|(z, s)| (z.to_string(), s.to_string())))
        .collect();
    ensure!(zones.len() >= 2, "one zone configured: {subnets}");
    let down: Arc<std::sync::Mutex<Option<(String, String)>>> = Arc::default();
    let refusing = Arc::new(AtomicBool::new(false));
    let script = {
        let (down, refusing) = (down.clone(), refusing.clone());
        Box::new(move |action: &str, body: &str| {
            let zone = down.lock().ok().and_then(|d| d.clone());
            match zone {
                Some((zone, subnet))
                    if action == "RunInstances"
                        && refusing.load(Ordering::Relaxed)
                        && (form_value(body, "SubnetId") == Some(subnet.as_str())
                            || form_value(body, "Placement.AvailabilityZone") == Some(zone.as_str())) =>
                {
                    Answer::Error {
                        status: http::StatusCode::INTERNAL_SERVER_ERROR,
                        code: "InsufficientInstanceCapacity",
                        message: format!(
                            "We currently do not have sufficient m6i.large capacity in the Availability Zone you requested ({zone})."
                        ),
                    }
                }
                _ => Answer::Forward,
            }
        })
    };
    let proxy = ScriptedProxy::start(&rig.cloud.aws_endpoint, script).await?;
    let gossip = rig.gossip()?;
    let args = ["--failover-after-secs", "2", "--aws-endpoint", &proxy.url];
    let _op = rig.spawn_operator("region-a", "a1", &args)?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let db = "db-zone";
    let create = ins::create(db, "region-a", 1, NEWER);
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let api = rig.questdbs("region-a").await?;
    let s = api.get(db).await?.status.context("no status")?;
    let (node, old_volume) = (s.node.context("no node")?, s.volume.context("no volume")?);
    let (ip, _) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 100).await?;
    let snap = ins::new(db, "region-a", 2, Operation::Snapshot(v1::Snapshot { label: None }));
    rig.send(&snap).await?;
    let snapshot = gossip.phase(&snap.instruction_id, Phase::Succeeded, T).await?.snapshot_id;
    write_rows(&ip, "trades", 100, 50).await?;
    expect_rows(&ip, "trades", 0..150, Duration::from_secs(10)).await?;

    // The zone goes down: no launches there, and the node is lost.
    let subnet = zones.iter().find(|(z, _)| *z == node.zone).map(|(_, s)| s.clone()).context("zone")?;
    *down.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some((node.zone.clone(), subnet));
    refusing.store(true, Ordering::Relaxed);
    region.kill_node(&node.instance_id).await?;
    eventually("the failover refused for capacity", T, || async {
        let s = api.get(db).await?.status.unwrap_or_default();
        Ok(s.conditions
            .iter()
            .any(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.message.to_lowercase().contains("capacity")
            })
            .then_some(()))
    })
    .await?;

    let other = zones.iter().map(|(z, _)| z.clone()).find(|z| *z != node.zone).context("another zone")?;
    let moved = ins::restore(db, "region-a", 3, None, Some(&other));
    rig.send(&moved).await?;
    let done = gossip.end(&moved.instruction_id, Duration::from_secs(300)).await?;
    ensure!(done.phase == Phase::Succeeded as i32, "{done:?}");
    ensure!(done.snapshot_id == snapshot, "restored {:?}, the latest is {snapshot}", done.snapshot_id);
    ensure!(done.message.contains("data as of") && done.message.contains(&other), "{:?}", done.message);
    let s = api.get(db).await?.status.context("no status")?;
    let (n, v) = (s.node.context("no node")?, s.volume.context("no volume")?);
    ensure!(n.zone == other && v.zone == other, "node in {}, volume in {}, not {other}", n.zone, v.zone);
    ensure!(n.instance_id != node.instance_id && v.id != old_volume.id, "not a new node and volume");
    // Reached the users' way: the DNS name now resolves to the node in the other zone.
    let (ip, _) = node_ip(&rig, db).await?;
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(30)).await?;
    ensure!(volume_gone(&rig, &old_volume.id).await?, "the volume left in {} is still there", node.zone);
    refusing.store(false, Ordering::Relaxed);
    delete(&rig, &gossip, db, 4).await
}

/// Watches `db` until aborted; fails at the first view in which a node move started (a
/// replacement recorded) or the new image was let through (`status.admitted`) while no
/// completed safety snapshot is listed.
async fn no_move_before_a_safety_snapshot(api: Api<qdb_crd::QuestDB>, db: String) -> Result<()> {
    let version = api.get(&db).await?.metadata.resource_version.unwrap_or_default();
    let params = kube::api::WatchParams::default().fields(&format!("metadata.name={db}"));
    let mut events = api.watch(&params, &version).await?.boxed();
    while let Some(event) = events.try_next().await? {
        let kube::api::WatchEvent::Modified(q) = event else { continue };
        let Some(s) = q.status else { continue };
        let safe = s.snapshots.iter().any(|s| {
            s.reason == qdb_crd::SnapshotReason::BeforeChange && s.state == qdb_crd::SnapshotPhase::Completed
        });
        let moving = s.replacement.is_some()
            || s.admitted.as_ref().is_some_and(|a| a.node_image == "ami-0b0b0b0b0b0b0b0b0");
        ensure!(safe || !moving, "the move started before its safety snapshot completed: {s:?}");
    }
    anyhow::bail!("the watch ended")
}

/// Each database's name reaches that database through the ingress on all three of its ports:
/// HTTPS (console, ILP over HTTP) on 443, pgwire on 8812, ILP over TCP on 9009, all TLS with
/// the name as server name; the name resolves to its node's address; and a second database
/// sees none of the first's tables.
#[tokio::test(flavor = "multi_thread")]
async fn each_name_reaches_its_own_database_on_all_three_ports() -> Result<()> {
    let rig = Rig::new("data-names", 1).await?;
    let gossip = rig.gossip()?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let (x, y) = ("db-x", "db-y");
    let creates = [ins::create(x, "region-a", 1, NEWER), ins::create(y, "region-a", 1, NEWER)];
    rig.send_many(&creates).await?;
    for c in &creates {
        gossip.phase(&c.instruction_id, Phase::Succeeded, T).await?;
    }
    let (x_in, _) = node_ip(&rig, x).await?;
    let (y_in, _) = node_ip(&rig, y).await?;
    let x_node = rig.questdbs("region-a").await?.get(x).await?.status.and_then(|s| s.node).context("node")?;
    ensure!(
        x_node.private_ip.as_deref() == Some(x_in.address.as_str()),
        "{} resolves to {}, its node is {:?}",
        x_in.dns_name,
        x_in.address,
        x_node.private_ip
    );
    ensure!(x_in.address != y_in.address, "two databases, two nodes");

    write_rows(&x_in, "over_https", 0, 10).await?;
    x_in.write_ilp_tcp("over_tcp,src=test id=0i\nover_tcp,src=test id=1i\nover_tcp,src=test id=2i\n").await?;
    expect_rows(&x_in, "over_https", 0..10, Duration::from_secs(10)).await?;
    expect_rows(&x_in, "over_tcp", 0..3, Duration::from_secs(30)).await?;
    for table in ["over_https", "over_tcp"] {
        ensure!(
            read_ids(&y_in, table).await.is_err(),
            "{table} written through {}'s name is visible in {}",
            x_in.dns_name,
            y_in.dns_name
        );
    }
    delete(&rig, &gossip, x, 2).await?;
    delete(&rig, &gossip, y, 2).await
}

/// Issue 17, the migration path: a running database another provisioner built is adopted by a
/// create that names its instance, volume and security group. The legacy database is built by
/// hand here: applied straight to the cluster (no provisioner), served by the operator, then
/// stripped of everything that made it the operator's: the resource itself (deleted with its
/// finalizer removed, children orphaned), the owner references on its objects, and the owner
/// tags on its AWS resources (the instance keeps only the cluster tag, by which the node
/// simulator finds its machines). The adoption keeps the same QuestDB process serving every row,
/// makes and replaces nothing in AWS, and the next change (a version upgrade) goes the ordinary
/// way on the adopted node.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_database_is_adopted_without_a_restart_then_upgraded() -> Result<()> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use kube::api::{DeleteParams, Patch, PatchParams, PropagationPolicy};
    use qdb_crd::{QuestDB, keys};

    let rig = Rig::new("data-adopt", 1).await?;
    let gossip = rig.gossip()?;
    let db = "db-legacy";
    let pod_key = format!("{}/{db}-0", rig.namespace);
    let api = rig.questdbs("region-a").await?;
    let mut legacy_op = rig.spawn_operator("region-a", "legacy", &[])?;
    let spec = qdb_provisioner::mapping::from_proto(&ins::spec(OLDER))?;
    api.create(&Default::default(), &QuestDB::new(db, spec)).await?;
    let status = eventually("the legacy database serves", T, || async {
        let s = api.get(db).await?.status.unwrap_or_default();
        let ready = s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(ready.then_some(s))
    })
    .await?;
    let legacy_uid = api.get(db).await?.metadata.uid.context("uid")?;
    let instance = status.node.context("node")?.instance_id;
    let volume = status.volume.context("volume")?.id;
    let aws = rig.aws("region-a").await?;
    let group = aws.find_security_group(&legacy_uid).await?.context("security group")?.id;
    let (ip, _) = node_ip(&rig, db).await?;
    write_rows(&ip, "trades", 0, 100).await?;

    // What the old provisioner leaves: no resource, nobody's owner references, untagged parts.
    legacy_op.terminate(Duration::from_secs(30)).await?;
    api.patch(
        db,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    let orphan = DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..Default::default() };
    api.delete(db, &orphan).await?;
    let client = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &rig.namespace);
    eventually("the objects are orphaned", T, || async {
        let gone = api.get_opt(db).await?.is_none();
        let owners = sets.get(db).await?.metadata.owner_references.unwrap_or_default();
        Ok((gone && owners.is_empty()).then_some(()))
    })
    .await?;
    let ec2 = rig.cloud.ec2(&rig.cloud.cluster("region-a")?.aws_region).await;
    let ours = [keys::OWNER_UID, keys::DATABASE, keys::NAMESPACE, keys::LAUNCH, keys::CLUSTER, "Name"];
    for (id, keep_cluster) in [(&instance, true), (&volume, false), (&group, false)] {
        let remove = ours.iter().filter(|k| !(keep_cluster && **k == keys::CLUSTER));
        let tags = remove.map(|k| aws_sdk_ec2::types::Tag::builder().key(*k).build()).collect();
        ec2.delete_tags().resources(id.as_str()).set_tags(Some(tags)).send().await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &rig.namespace);
    let before = pods.get(&format!("{db}-0")).await?;
    let pid = pid_of(&rig, &pod_key).await?.context("no QuestDB process")?;

    // The adoption, as the backend sends it.
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let mut create = ins::create(db, "region-a", 1, OLDER);
    if let Some(Operation::Create(c)) = create.operation.as_mut() {
        c.adopt = Some(v1::Adopt {
            instance_id: instance.clone(),
            volume_id: volume.clone(),
            security_group_id: group.clone(),
            dns_name: None,
        });
    }
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let q = api.get(db).await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let status = q.status.context("status")?;
    ensure!(status.adopted_generation == q.metadata.generation, "adopted at {:?}", status.adopted_generation);
    ensure!(status.node.map(|n| n.instance_id) == Some(instance.clone()), "not on the adopted instance");
    ensure!(status.volume.map(|v| v.id) == Some(volume.clone()), "not on the adopted volume");
    let after = pods.get(&format!("{db}-0")).await?;
    ensure!(after.metadata.uid == before.metadata.uid, "the adoption replaced the pod");
    let restarts: i32 = after
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    ensure!(restarts == 0, "{restarts} container restarts");
    ensure!(pid_of(&rig, &pod_key).await? == Some(pid), "the QuestDB process changed");
    let owned = sets.get(db).await?.metadata.owner_references.unwrap_or_default();
    ensure!(owned.iter().any(|o| o.uid == uid), "the StatefulSet is not owned: {owned:?}");
    ensure!(aws.find_security_group(&uid).await?.map(|g| g.id) == Some(group.clone()), "group not tagged");
    let tagged: Vec<String> = aws.find_instances(&uid).await?.into_iter().map(|i| i.id).collect();
    ensure!(tagged == [instance.clone()], "instances tagged for the database: {tagged:?}");
    expect_rows(&ip, "trades", 0..100, Duration::from_secs(10)).await?;
    write_rows(&ip, "trades", 100, 100).await?;
    let metrics = op.metrics().await?;
    let called = qdb_tests::iam::ensure_policy_allows(&metrics)?;
    ensure!(called.contains("ec2:CreateTags"), "nothing tagged: {called:?}");
    for made in ["RunInstances", "CreateVolume", "CreateSecurityGroup", "StopInstances", "TerminateInstances"]
        .into_iter()
        .chain(["ModifyVolume", "AuthorizeSecurityGroupIngress", "RevokeSecurityGroupIngress"])
    {
        ensure!(!called.contains(&format!("ec2:{made}")), "the adoption called {made}");
    }
    ensure!(!called.contains("route53:ChangeResourceRecordSets"), "the adoption rewrote the DNS record");

    // The next change goes the ordinary way, on the adopted node.
    upgrade_to_newer(&rig, &gossip, &ip, db, 2).await?;
    expect_rows(&ip, "trades", 0..200, Duration::from_secs(10)).await?;
    let q = api.get(db).await?;
    ensure!(
        q.status.and_then(|s| s.node).map(|n| n.instance_id) == Some(instance),
        "the upgrade moved the node"
    );
    delete(&rig, &gossip, db, 3).await
}
