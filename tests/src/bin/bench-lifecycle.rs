//! Node lifecycle benchmark on the local cloud (`localcloud up` first). Prints, from one run, for
//! 1 and for N databases at once: failover time to recover (node killed -> Ready on a new node;
//! target <= the controller manager's node-monitor grace period (20 s) + 20 s) and each
//! database's unavailability during a node image upgrade (pod not Ready; target <= 15 s).
//!
//! Run: `cargo run -p qdb-tests --bin bench-lifecycle -- --databases 20`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use qdb_crd::{Phase, QuestDB};
use qdb_tests::rig::Rig;
use qdb_tests::{arg, figure, kube_client, time_spent};
use serde_json::json;

fn questdb(name: &str, image: &str) -> Result<QuestDB> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "metadata": {"name": name},
        "spec": {"version": "8.2.1", "instanceType": "m6i.large", "nodeImage": image,
                 "volume": {"sizeGib": 20, "type": "gp3"}, "network": {"allowedCidrs": ["10.0.0.0/8"]}}
    }))?)
}

async fn apply_all(api: &Api<QuestDB>, names: &[String], image: &str) -> Result<()> {
    for n in names {
        api.patch(n, &PatchParams::apply("qdb-provisioner").force(), &Patch::Apply(&questdb(n, image)?))
            .await?;
    }
    Ok(())
}

async fn all_running(api: &Api<QuestDB>, names: &[String], image: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = api.list(&ListParams::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|q| names.iter().any(|n| Some(n) == q.metadata.name.as_ref()))
            .filter(|q| {
                let s = q.status.clone().unwrap_or_default();
                s.phase == Some(Phase::Running)
                    && s.observed_generation == q.metadata.generation
                    && s.node.is_some_and(|n| n.image == image)
            })
            .count();
        if done == names.len() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{done} of {} Running on {image}", names.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// "p50 .., max .." and the max.
fn summary(mut v: Vec<f64>) -> (String, f64) {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v.get(((v.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    (format!("p50 {:.1} s, max {:.1} s", p(0.5), p(1.0)), p(1.0))
}

async fn failover(rig: &Rig, api: &Api<QuestDB>, names: &[String]) -> Result<Vec<f64>> {
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    let mut old = HashMap::new();
    for n in names {
        let q = api.get(n).await?;
        old.insert(n.clone(), q.status.and_then(|s| s.node).context("node")?.instance_id);
    }
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    for id in old.values() {
        http.post(format!("{nodesim}/nodes/{id}/kill")).send().await?;
    }
    let mut recovered: HashMap<String, f64> = HashMap::new();
    while recovered.len() < names.len() {
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "only {} of {} recovered",
            recovered.len(),
            names.len()
        );
        for q in api.list(&ListParams::default()).await?.items {
            let Some(name) = q.metadata.name.clone() else { continue };
            let s = q.status.unwrap_or_default();
            let moved = s.node.is_some_and(|n| Some(&n.instance_id) != old.get(&name));
            if old.contains_key(&name) && moved && s.phase == Some(Phase::Running) {
                recovered.entry(name).or_insert_with(|| t0.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(recovered.into_values().collect())
}

async fn upgrade(
    api: &Api<QuestDB>,
    sts: &Api<StatefulSet>,
    names: &[String],
    image: &str,
) -> Result<Vec<f64>> {
    let mut down: HashMap<String, f64> = names.iter().map(|n| (n.clone(), 0.0)).collect();
    apply_all(api, names, image).await?;
    let t0 = Instant::now();
    let mut last = Instant::now();
    loop {
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        for s in sts.list(&ListParams::default()).await?.items {
            let name = s.metadata.name.clone().unwrap_or_default();
            let ready = s.status.and_then(|st| st.ready_replicas).unwrap_or(0) >= 1;
            if let Some(d) = down.get_mut(&name)
                && !ready
            {
                *d += elapsed;
            }
        }
        if all_running(api, names, image, Duration::ZERO).await.is_ok() {
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(600), "upgrade did not finish in 10 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(down.into_values().collect())
}

#[tokio::main]
async fn main() -> Result<()> {
    let many = arg("--databases", 20);
    let rig = Rig::new("bench-life", 1).await?;
    let admin = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let api: Api<QuestDB> = Api::namespaced(admin.clone(), &rig.namespace);
    let sts: Api<StatefulSet> = Api::namespaced(admin, &rig.namespace);
    let op = rig.spawn_operator(
        "region-a",
        "bench",
        &["--failover-after-secs", "5", "--replacement-budget", &many.to_string()],
    )?;
    println!(
        "node lifecycle benchmark (one operator, 2-core machine; failover after 5 s not Ready, node-monitor grace 20 s)"
    );
    for (round, n) in [1, many].into_iter().enumerate() {
        let names: Vec<String> = (0..n).map(|i| format!("r{round}-db{i}")).collect();
        apply_all(&api, &names, "ami-0a0a0a0a0a0a0a0a0").await?;
        all_running(&api, &names, "ami-0a0a0a0a0a0a0a0a0", Duration::from_secs(300)).await?;
        let before = op.metrics().await.unwrap_or_default();
        let (mttr, worst) = summary(failover(&rig, &api, &names).await?);
        println!(
            "      where the operator's time went: {}",
            time_spent(&before, &op.metrics().await.unwrap_or_default())
        );
        println!("  {n:>3} database(s) failover, kill -> Ready elsewhere: {mttr} (target <= 40 s)");
        figure(
            &format!("lifecycle: failover MTTR, {n} database(s) at once"),
            mttr,
            "<= 40 s",
            Some(worst <= 40.0),
        );
        let (down, worst) = summary(upgrade(&api, &sts, &names, "ami-0b0b0b0b0b0b0b0b0").await?);
        println!("  {n:>3} database(s) node image upgrade, pod not Ready: {down} (target <= 15 s)");
        figure(
            &format!("lifecycle: unavailability in a node image upgrade, {n} database(s) at once"),
            down,
            "<= 15 s",
            Some(worst <= 15.0),
        );
        for name in &names {
            let _ = api.delete(name, &Default::default()).await;
        }
    }
    Ok(())
}
