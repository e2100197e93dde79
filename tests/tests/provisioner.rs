//! The provisioner on the local cloud, as separate processes: instructions from Kafka become
//! QuestDB resources in the right cluster, every instruction ends on gossip, bad input is
//! dead-lettered, duplicates and stale sequences have no effect. The test plays the operator by
//! writing CR status.

use std::time::Duration;

use anyhow::{Result, ensure};
use qdb_crd::keys;
use qdb_proto::v1::{self, Phase, instruction::Operation};
use qdb_tests::eventually;
use qdb_tests::rig::{Rig, check_exactly_once, fake_operator, ins, report_converged, workload};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn create_lands_in_the_right_cluster_and_succeeds_when_ready() -> Result<()> {
    let rig = Rig::new("prov-create", 3).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let (a, b) = (rig.questdbs("region-a").await?, rig.questdbs("region-b").await?);

    let in_a = ins::create("db-a", "region-a", 1, "8.2.1");
    let in_b = ins::create("db-b", "region-b", 1, "8.2.2");
    rig.send(&in_a).await?;
    rig.send(&in_b).await?;
    gossip.phase(&in_a.instruction_id, Phase::Applied, T).await?;
    gossip.phase(&in_b.instruction_id, Phase::Applied, T).await?;

    let qa = a.get("db-a").await?;
    assert_eq!(qa.spec.version, "8.2.1");
    assert_eq!(qa.spec.instance_type, "m6i.large");
    assert_eq!(qa.spec.volume.size_gib, 20);
    assert_eq!(qa.spec.server_config["cairo.commit.lag"], "1000");
    let ann = qa.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(ann[keys::INSTRUCTION_ID], in_a.instruction_id);
    assert_eq!(ann[keys::INSTRUCTION_SEQUENCE], "1");
    assert_eq!(b.get("db-b").await?.spec.version, "8.2.2");
    assert!(
        a.get_opt("db-b").await?.is_none() && b.get_opt("db-a").await?.is_none(),
        "each in its own region"
    );
    let managers: Vec<_> =
        qa.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.iter().any(|m| m == qdb_crd::PROVISIONER_MANAGER), "{managers:?}");

    // Progress as the operator reports it, then success once Ready at the applied generation.
    let progressing = serde_json::json!({"status": {"observedGeneration": 0, "conditions": [
        {"type": "Progressing", "status": "True", "reason": "NodeLaunching", "message": "i-0123",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    a.patch_status("db-a", &Default::default(), &kube::api::Patch::Merge(&progressing)).await?;
    let ev = gossip.phase(&in_a.instruction_id, Phase::Progressing, T).await?;
    assert_eq!(ev.message, "NodeLaunching: i-0123");
    report_converged(&a, "db-a").await?;
    report_converged(&b, "db-b").await?;
    let done = gossip.phase(&in_a.instruction_id, Phase::Succeeded, T).await?;
    assert!(done.status.as_ref().is_some_and(|s| s.ready && s.endpoints.is_some()), "{done:?}");
    gossip.phase(&in_b.instruction_id, Phase::Succeeded, T).await?;
    assert_eq!(
        gossip.phases(&in_a.instruction_id),
        vec![Phase::Accepted, Phase::Applied, Phase::Progressing, Phase::Succeeded]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_changes_the_resource_and_ends_terminal() -> Result<()> {
    let rig = Rig::new("prov-ops", 2).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let db = "db-ops";
    let step = |seq, op| ins::new(db, "region-a", seq, op);

    let steps = [
        ins::create(db, "region-a", 1, "8.2.1"),
        ins::version(db, "region-a", 2, "8.2.3"),
        step(
            3,
            Operation::Modify(v1::Modify {
                volume_size_gib: Some(50),
                set_server_config: [("query.timeout.sec".to_string(), "30".to_string())].into(),
                remove_server_config: vec!["cairo.commit.lag".into()],
                ..Default::default()
            }),
        ),
        step(4, Operation::Pause(v1::Pause {})),
        step(5, Operation::Resume(v1::Resume {})),
        step(6, Operation::Restart(v1::Restart {})),
    ];
    for (i, s) in steps.iter().enumerate() {
        rig.send(s).await?;
        gossip.phase(&s.instruction_id, Phase::Succeeded, T).await?;
        let q = api.get(db).await?;
        match i {
            0 => assert_eq!(q.spec.version, "8.2.1"),
            1 => assert_eq!(q.spec.version, "8.2.3"),
            2 => {
                assert_eq!(q.spec.volume.size_gib, 50);
                assert_eq!(q.spec.server_config.get("query.timeout.sec").map(String::as_str), Some("30"));
                assert!(!q.spec.server_config.contains_key("cairo.commit.lag"));
            }
            3 => assert!(q.spec.paused),
            4 => assert!(!q.spec.paused),
            _ => assert_eq!(q.spec.restart_token.as_deref(), Some(s.instruction_id.as_str())),
        }
        assert_eq!(q.metadata.generation, Some(i as i64 + 1), "one generation per instruction");
    }
    let delete = step(7, Operation::Delete(v1::Delete { retain_volume: false, ..Default::default() }));
    rig.send(&delete).await?;
    gossip.phase(&delete.instruction_id, Phase::Succeeded, T).await?;
    ensure!(api.get_opt(db).await?.is_none(), "deleted");
    operator.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_and_stale_sequences_have_no_second_effect() -> Result<()> {
    let rig = Rig::new("prov-dup", 2).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let db = "db-dup";

    let create = ins::create(db, "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    let newer = ins::version(db, "region-a", 5, "8.2.5");
    rig.send(&newer).await?;
    gossip.phase(&newer.instruction_id, Phase::Succeeded, T).await?;
    let stale = ins::version(db, "region-a", 3, "8.2.3");
    rig.send(&stale).await?;
    let ev = gossip.phase(&stale.instruction_id, Phase::Superseded, T).await?;
    assert_eq!(ev.reason, "STALE_SEQUENCE");
    // The create delivered once more after all that: announced again, no effect.
    rig.send(&create).await?;
    gossip
        .wait("create announced again after the stale one", T, |e| {
            e.instruction_id == create.instruction_id
                && e.phase() == Phase::Succeeded
                && e.message.contains("duplicate")
        })
        .await?;
    let q = api.get(db).await?;
    assert_eq!(q.spec.version, "8.2.5");
    assert_eq!(q.metadata.generation, Some(2), "create and the newer modify only");
    let journal = rig.journal().await?;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, state FROM instructions WHERE database_id = $1 ORDER BY sequence")
            .bind(db)
            .fetch_all(&journal)
            .await?;
    assert_eq!(
        rows,
        vec![
            (create.instruction_id.clone(), "succeeded".into()),
            (stale.instruction_id.clone(), "superseded".into()),
            (newer.instruction_id.clone(), "succeeded".into()),
        ]
    );
    operator.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_deleted_behind_the_provisioners_back_is_not_resurrected() -> Result<()> {
    let rig = Rig::new("prov-oob", 1).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let create = ins::create("db-oob", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Applied, T).await?;
    api.delete("db-oob", &Default::default()).await?;
    eventually("deleted", T, || async { Ok(api.get_opt("db-oob").await?.is_none().then_some(())) }).await?;
    let modify = ins::version("db-oob", "region-a", 2, "8.2.2");
    rig.send(&modify).await?;
    let ev = gossip.phase(&modify.instruction_id, Phase::Rejected, T).await?;
    assert_eq!(ev.reason, "DATABASE_NOT_FOUND");
    ensure!(api.get_opt("db-oob").await?.is_none(), "a modify must not create the database again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_cleanly_and_the_next_replica_carries_on() -> Result<()> {
    let rig = Rig::new("prov-term", 2).await?;
    let gossip = rig.gossip()?;
    let mut p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let first = ins::create("db-t1", "region-a", 1, "8.2.1");
    rig.send(&first).await?;
    gossip.phase(&first.instruction_id, Phase::Applied, T).await?;
    let status = p.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit status {status}");

    let p2 = rig.spawn("r2", &[])?;
    p2.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    report_converged(&api, "db-t1").await?;
    gossip.phase(&first.instruction_id, Phase::Succeeded, T).await?;
    let second = ins::create("db-t2", "region-a", 1, "8.2.1");
    rig.send(&second).await?;
    gossip.phase(&second.instruction_id, Phase::Applied, T).await?;
    assert_eq!(gossip.phases(&first.instruction_id).iter().filter(|p| **p == Phase::Accepted).count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioner_identity_may_only_touch_questdb_resources() -> Result<()> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let rig = Rig::new("prov-rbac", 1).await?;
    for c in &rig.cloud.clusters {
        let client = qdb_tests::kube_client(&c.provisioner_kubeconfig).await?;
        let qdbs: kube::Api<qdb_crd::QuestDB> = kube::Api::namespaced(client.clone(), &rig.namespace);
        qdbs.list(&Default::default()).await?;
        let denied = |r: kube::Result<_>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
        let sts: kube::Api<StatefulSet> = kube::Api::namespaced(client.clone(), &rig.namespace);
        assert!(denied(sts.list(&Default::default()).await.map(|_| ())), "{}: statefulsets", c.name);
        let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), &rig.namespace);
        assert!(denied(secrets.list(&Default::default()).await.map(|_| ())), "{}: secrets", c.name);
        let cms: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), &rig.namespace);
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}}))?;
        assert!(denied(cms.create(&Default::default(), &cm).await.map(|_| ())), "{}: configmaps", c.name);
        let status = serde_json::json!({"status": {"phase": "Running"}});
        let _ = &status;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_split_partitions_and_one_finishes_when_the_other_dies() -> Result<()> {
    let rig = Rig::new("prov-pair", 6).await?;
    let gossip = rig.gossip()?;
    let operators =
        [fake_operator(rig.questdbs("region-a").await?), fake_operator(rig.questdbs("region-b").await?)];
    let mut r1 = rig.spawn("r1", &["--lease-secs", "5"])?;
    let r2 = rig.spawn("r2", &["--lease-secs", "5"])?;
    r1.wait_ready().await?;
    r2.wait_ready().await?;
    // Both own partitions once the group settles.
    eventually("both replicas assigned partitions", Duration::from_secs(60), || {
        let logs = [&r1.log, &r2.log].map(|l| std::fs::read_to_string(l).unwrap_or_default());
        let both =
            logs.iter().all(|l| l.lines().any(|x| x.contains("partitions assigned") && !x.contains("[]")));
        async move { Ok(both.then_some(())) }
    })
    .await?;
    let all = workload("db-p", 50, 4);
    rig.send_many(&all).await?;
    gossip
        .wait("60 applied before the kill", Duration::from_secs(120), |_| {
            gossip.all().iter().filter(|e| e.phase() == Phase::Applied).count() >= 60
        })
        .await?;
    r1.kill9()?;
    check_exactly_once(&rig, &all, 4, Duration::from_secs(240)).await?;
    let journal = rig.journal().await?;
    // The dead replica's leases are not released (it was killed) but run out on their own: by
    // now the survivor holds none, and no lease is live.
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM databases WHERE lease_owner IS NOT NULL AND lease_until > now()",
    )
    .fetch_one(&journal)
    .await?;
    ensure!(live <= 1, "live leases left behind: {live}");
    operators.iter().for_each(|o| o.abort());
    Ok(())
}

/// Drops what it holds on a thread of its own, so a drop that blocks cannot hold up the test.
struct DropAside<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> std::ops::Deref for DropAside<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("held until dropped")
    }
}

impl<T: Send + 'static> Drop for DropAside<T> {
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            std::thread::spawn(move || drop(held));
        }
    }
}

/// A replica is ready only once the consumer group has given it its share. While the group's
/// rebalance waits on a member that does not rejoin, the replica has subscribed but takes nothing:
/// /readyz says so (it said ready at subscribe, and a rollout would have gone on on that word).
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_is_ready_only_once_it_is_in_the_consumer_group() -> Result<()> {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let rig = Rig::new("prov-join", 3).await?;
    let gossip = rig.gossip()?;
    // A member of the provisioners' group that stops polling once it has its partitions: the
    // next rebalance waits for it to rejoin until its max.poll.interval.ms runs out.
    let stale: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &rig.cloud.kafka_brokers)
        .set("group.id", &rig.group)
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "15000")
        .create()?;
    stale.subscribe(&[&rig.instructions])?;
    // Closing a member the group has expelled can wait forever (rdkafka's drop polls until the
    // close completes: once, beside the whole suite, this test hung there for its 360 s bound, on
    // success or on an error, which then went unseen). The test ends either way.
    let stale = DropAside(Some(stale));
    eventually("the stale member assigned", T, || {
        let _ = stale.poll(Duration::from_millis(100));
        let assigned = stale.assignment().map(|a| a.count() > 0).unwrap_or(false);
        async move { Ok(assigned.then_some(())) }
    })
    .await?;
    let p = rig.spawn("r1", &[])?;
    eventually("the replica serving probes", T, || async {
        Ok(p.probe("/healthz").await.ok().filter(|(code, _)| *code == 200).map(|_| ()))
    })
    .await?;
    let (code, body) = p.probe("/readyz").await?;
    ensure!(code == 503 && body.contains("consumer group"), "ready before joining the group: {code} {body}");
    // The stale member is dropped from the group at its max.poll.interval.ms: the replica joins,
    // is ready, and works.
    p.wait_ready().await?;
    let i = ins::create("db-join", "region-a", 1, "8.2.1");
    rig.send(&i).await?;
    gossip.phase(&i.instruction_id, Phase::Applied, T).await?;
    Ok(())
}

/// Runs alone (see .config/nextest.toml): it stops a cluster every other test uses.
#[tokio::test(flavor = "multi_thread")]
async fn disruptive_a_dead_cluster_delays_only_its_own_databases() -> Result<()> {
    let rig = Rig::new("prov-dead", 3).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &["--max-retry-delay-secs", "3"])?;
    p.wait_ready().await?;
    let operator_a = fake_operator(rig.questdbs("region-a").await?);
    let frozen = rig.cloud.freeze("QDB_REGION_B_APISERVER_PID_FILE")?;
    let a: Vec<_> = (0..5).map(|i| ins::create(&format!("db-a{i}"), "region-a", 1, "8.2.1")).collect();
    let b: Vec<_> = (0..5).map(|i| ins::create(&format!("db-b{i}"), "region-b", 1, "8.2.1")).collect();
    for (x, y) in a.iter().zip(&b) {
        rig.send(y).await?;
        rig.send(x).await?;
    }
    for i in &a {
        gossip.phase(&i.instruction_id, Phase::Succeeded, T).await?;
    }
    // Long enough for requests to region-b to time out and be retried.
    eventually("region-b applies retried", Duration::from_secs(90), || async {
        let m = p.metrics().await?;
        Ok(m.contains("qdb_provisioner_instructions_total{outcome=\"retried\"}").then_some(()))
    })
    .await?;
    for i in &b {
        ensure!(
            !gossip.phases(&i.instruction_id).contains(&Phase::Applied),
            "applied while region-b is down"
        );
    }
    drop(frozen);
    let operator_b = fake_operator(rig.questdbs("region-b").await?);
    for i in &b {
        gossip.phase(&i.instruction_id, Phase::Succeeded, Duration::from_secs(90)).await?;
    }
    operator_a.abort();
    operator_b.abort();
    Ok(())
}

/// Issue 17 (watches): the status watch outlives a quiet minute. Before, the watch shared the
/// request client's 15 s read timeout, so every 15 s without an event broke it (an error, a
/// back-off and a new watch), and a status change in that gap waited for the next one.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_minute_does_not_break_the_status_watch() -> Result<()> {
    let rig = Rig::new("prov-quiet", 1).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let create = ins::create("db-quiet", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Applied, T).await?;

    tokio::time::sleep(Duration::from_secs(70)).await;
    let watch_errors = |m: &str| {
        qdb_tests::metric_total(m, "qdb_provisioner_kube_requests_total", "verb=\"watch\",outcome=\"error\"")
    };
    let errors = watch_errors(&p.metrics().await?);
    ensure!(errors == 0.0, "{errors} watch errors in a quiet minute");
    let changed = std::time::Instant::now();
    report_converged(&api, "db-quiet").await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, Duration::from_secs(5)).await?;
    println!("status change seen on gossip {:?} after a quiet 70 s", changed.elapsed());
    Ok(())
}
