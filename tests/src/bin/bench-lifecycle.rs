//! Node lifecycle benchmark on the local cloud (`localcloud up` first, with EC2's timing on):
//! downtime as a client sees it. Each database runs a real QuestDB; per database a client probe
//! sends `SELECT 1` over pgwire every 100 ms through the ingress, by the database's DNS name
//! (a new connection after a failure, the name resolved again then), and a second probe does the
//! same but keeps the address it resolved for the record's TTL, as a caching resolver would.
//! For 1 and N databases at once it prints, per step (QuestDB version upgrade, config change,
//! node image upgrade, instance type change, failover after a node is cut off), each database's
//! unavailability: the time from a failed query to the next good one, summed over the step.
//!
//! `--failover-phases` instead fails one database over `--failovers` times (3), with a Node
//! registering `--join-secs` (45) after its instance runs (set through the node simulator's
//! control API: about 60 s from launch, as on EKS), and splits each recovery into its phases
//! (detection, replacement launch, join, fence, volume move, QuestDB start, DNS).
//!
//! Run: `cargo run -p qdb-tests --bin bench-lifecycle -- --databases 5`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::ListParams;
use qdb_crd::{Phase, QuestDB, ReplaceWhy};
use qdb_operator::aws::InstanceState;
use qdb_tests::bench::{all_settled, apply_all};
use qdb_tests::questdb::AvailabilityProbe;
use qdb_tests::rig::Rig;
use qdb_tests::{arg, figure, kube_client, time_spent};
use serde_json::{Value, json};

/// The operator's record TTL (operator/src/build/dns.rs): a caching client keeps the address for
/// this long.
const DNS_TTL: Duration = Duration::from_secs(60);

fn base_spec() -> Value {
    json!({"version": "9.2.3", "instanceType": "m6i.large", "nodeImage": "ami-0a0a0a0a0a0a0a0a0",
           "volume": {"sizeGib": 20, "type": "gp3"}, "network": {"allowedCidrs": ["10.0.0.0/8"]}})
}

/// "p50 .., max .." and the max.
fn summary(mut v: Vec<f64>) -> (String, f64) {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v.get(((v.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    (format!("p50 {:.1} s, max {:.1} s", p(0.5), p(1.0)), p(1.0))
}

struct Probes {
    fresh: Vec<AvailabilityProbe>,
    caching: Vec<AvailabilityProbe>,
}

impl Probes {
    /// Resets every probe's tally (the outage of the step before is not this one's).
    fn reset(&self) {
        for p in self.fresh.iter().chain(&self.caching) {
            p.take();
        }
    }

    fn take(&self) -> (Vec<f64>, Vec<f64>) {
        let secs = |ps: &[AvailabilityProbe]| ps.iter().map(|p| p.take().0.as_secs_f64()).collect();
        (secs(&self.fresh), secs(&self.caching))
    }
}

/// Cuts every database's node off and waits until each serves from a new node.
async fn fail_over(rig: &Rig, api: &Api<QuestDB>, names: &[String]) -> Result<()> {
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    let mut old = HashMap::new();
    for n in names {
        let q = api.get(n).await?;
        old.insert(n.clone(), q.status.and_then(|s| s.node).context("node")?.instance_id);
    }
    let http = reqwest::Client::new();
    for id in old.values() {
        http.post(format!("{nodesim}/nodes/{id}/kill")).send().await?.error_for_status()?;
    }
    let t0 = Instant::now();
    loop {
        let mut moved = 0;
        for n in names {
            let s = api.get(n).await?.status.unwrap_or_default();
            let elsewhere = s.node.is_some_and(|node| Some(&node.instance_id) != old.get(n));
            moved += usize::from(elsewhere && s.phase == Some(Phase::Running));
        }
        if moved == names.len() {
            return Ok(());
        }
        ensure!(t0.elapsed() < Duration::from_secs(300), "only {moved} of {} failed over", names.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// When each step of one failover was first seen, polled every 100 ms from the harness's clock.
#[derive(Default, Debug)]
struct Failover {
    killed: Option<Instant>,
    not_ready: Option<Instant>,
    launched: Option<Instant>,
    running: Option<Instant>,
    fenced: Option<Instant>,
    joined: Option<Instant>,
    started: Option<Instant>,
    ready: Option<Instant>,
    dns: Option<Instant>,
    served: Option<Instant>,
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn seen(at: &mut Option<Instant>, now: bool) {
    if now && at.is_none() {
        *at = Some(Instant::now());
    }
}

impl Failover {
    /// Cuts `db`'s node off and follows the recovery to the first good query of a client that
    /// resolves the name again on every new connection.
    async fn run(rig: &Rig, api: &Api<QuestDB>, db: &str, probe: &AvailabilityProbe) -> Result<Failover> {
        let admin = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
        let (nodes, pods): (Api<Node>, Api<Pod>) =
            (Api::all(admin.clone()), Api::namespaced(admin, &rig.namespace));
        let aws = rig.aws("region-a").await?;
        let before = api.get(db).await?.status.unwrap_or_default();
        let old = before.node.context("node")?;
        let old_target = before.dns.map(|d| d.target);
        let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
        let selector = ListParams::default().labels(&format!("{}={db}", qdb_crd::keys::DATABASE));
        reqwest::Client::new()
            .post(format!("{nodesim}/nodes/{}/kill", old.instance_id))
            .send()
            .await?
            .error_for_status()?;
        let mut f = Failover { killed: Some(Instant::now()), ..Default::default() };
        let mut to: Option<String> = None;
        let mut down = false;
        let deadline = Instant::now() + Duration::from_secs(900);
        while f.served.is_none() {
            ensure!(Instant::now() < deadline, "{db} did not recover in 15 minutes: {f:?}");
            let s = api.get(db).await?.status.unwrap_or_default();
            if f.not_ready.is_none() {
                let n = nodes.get_opt(&old.name).await?;
                seen(&mut f.not_ready, n.is_none_or(|n| !node_ready(&n)));
            }
            if let Some(r) = s.replacement.as_ref().filter(|r| r.why == ReplaceWhy::Failover) {
                to.get_or_insert_with(|| r.to_instance.clone());
                seen(&mut f.launched, true);
                seen(&mut f.fenced, r.fenced_at.is_some());
            }
            let new_node = s.node.as_ref().filter(|n| n.instance_id != old.instance_id);
            if let Some(n) = new_node {
                to.get_or_insert_with(|| n.instance_id.clone());
                // The replacement ended: whatever was not seen happened by now.
                for at in [&mut f.launched, &mut f.fenced] {
                    seen(at, s.replacement.is_none());
                }
            }
            if let Some(id) = to.clone() {
                if f.running.is_none() {
                    let i = aws.describe_instance(&id).await?;
                    seen(&mut f.running, i.is_some_and(|i| i.state == InstanceState::Running));
                }
                if f.joined.is_none() {
                    let joined = nodes.list(&ListParams::default()).await?.items.iter().any(|n| {
                        n.spec
                            .as_ref()
                            .and_then(|s| s.provider_id.as_deref())
                            .is_some_and(|p| p.ends_with(&id))
                            && node_ready(n)
                    });
                    seen(&mut f.joined, joined);
                }
            }
            if let Some(n) = new_node {
                let pod =
                    pods.list(&selector).await?.items.into_iter().find(|p| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(n.name.as_str())
                    });
                let status = pod.as_ref().and_then(|p| p.status.as_ref());
                let started = status.and_then(|s| s.container_statuses.as_ref()).is_some_and(|cs| {
                    cs.iter().any(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
                });
                let ready = status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                seen(&mut f.started, started);
                seen(&mut f.ready, ready && started);
            }
            seen(&mut f.dns, s.dns.as_ref().is_some_and(|d| Some(&d.target) != old_target.as_ref()));
            down |= !probe.is_up();
            seen(&mut f.served, down && probe.is_up());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(f)
    }

    /// (phase, seconds) in the order they happen; a phase whose ends were not both seen is left out.
    fn phases(&self) -> Vec<(&'static str, f64)> {
        let d = |a: Option<Instant>, b: Option<Instant>| Some(b?.checked_duration_since(a?)?.as_secs_f64());
        let moved_from = match (self.joined, self.fenced) {
            (Some(j), Some(f)) => Some(j.max(f)),
            (j, f) => j.or(f),
        };
        [
            ("detection: node NotReady (node-monitor grace)", d(self.killed, self.not_ready)),
            (
                "detection: failover decided (--failover-after-secs, next pass)",
                d(self.not_ready, self.launched),
            ),
            ("replacement launch: RunInstances to running", d(self.launched, self.running)),
            ("join: running to Node Ready", d(self.running, self.joined)),
            ("fence: old instance stopped (beside launch and join)", d(self.launched, self.fenced)),
            (
                "volume move and pod start: joined and fenced to container running",
                d(moved_from, self.started),
            ),
            ("QuestDB start: container running to pod Ready", d(self.started, self.ready)),
            ("DNS: record updated after pod Ready", d(self.ready, self.dns)),
            ("client: pod Ready to first good query", d(self.ready, self.served)),
            ("total: node cut off to first good query", d(self.killed, self.served)),
        ]
        .into_iter()
        .filter_map(|(p, v)| Some((p, v?)))
        .collect()
    }
}

/// Failover with production timing (a local cloud with EC2's timing, QDB_AWS_TIMING=realistic):
/// a Node registers `join_secs` after its instance runs, as EKS's boot and join take; one
/// database, cut off `times` times in a row, each recovery split into its phases.
async fn failover_phases(times: usize, join_secs: usize) -> Result<()> {
    let rig = Rig::new("bench-phases", 1).await?;
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    reqwest::Client::new()
        .put(format!("{nodesim}/join-delay/{join_secs}"))
        .send()
        .await?
        .error_for_status()?;
    let admin = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let api: Api<QuestDB> = Api::namespaced(admin, &rig.namespace);
    let aws = rig.aws("region-a").await?;
    // The operator's production settings: failover after 10 s not Ready.
    let _op = rig.spawn_operator("region-a", "bench", &[])?;
    let db = "ph-db0".to_string();
    apply_all(&api, std::slice::from_ref(&db), &base_spec()).await?;
    all_settled(&api, std::slice::from_ref(&db), Duration::from_secs(600)).await?;
    let dns = format!("{db}.{}.{}", rig.namespace, rig.dns_zone());
    let probe = AvailabilityProbe::start(aws, rig.dns_zone(), dns, None);
    let timing = rig.cloud.vars.get("QDB_AWS_TIMING").map_or("realistic", String::as_str);
    println!(
        "failover phases with production timing: EC2's timing {timing}, a Node registers {join_secs} s after its \
         instance runs, node-monitor grace 20 s, operator defaults (failover after 10 s); one database, \
         real QuestDB, {times} failovers in a row"
    );
    let mut all: Vec<Vec<(&str, f64)>> = Vec::new();
    for k in 0..times {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(probe.is_up(), "the database does not serve before failover {k}");
        let f = Failover::run(&rig, &api, &db, &probe).await?;
        all_settled(&api, std::slice::from_ref(&db), Duration::from_secs(600)).await?;
        let phases = f.phases();
        println!("  failover {}:", k + 1);
        for (p, secs) in &phases {
            println!("    {p:<72} {secs:>6.1} s");
        }
        all.push(phases);
    }
    for (phase, _) in all.first().cloned().unwrap_or_default() {
        let values: Vec<f64> =
            all.iter().filter_map(|ph| ph.iter().find(|(p, _)| *p == phase).map(|(_, v)| *v)).collect();
        let (line, _) = summary(values);
        figure(&format!("failover with production timing: {phase}"), line, "", None);
    }
    delete_all(&api, std::slice::from_ref(&db)).await
}

/// Deletes the databases and waits (up to 5 minutes) until they are gone: a round's servers and
/// nodes left running would take CPU from the next, and the operator must outlive the deletes, or
/// their machines run on.
async fn delete_all(api: &Api<QuestDB>, names: &[String]) -> Result<()> {
    for name in names {
        let _ = api.delete(name, &Default::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline && !api.list(&Default::default()).await?.items.is_empty() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--failover-phases") {
        return failover_phases(arg("--failovers", 3), arg("--join-secs", 45)).await;
    }
    let many = arg("--databases", 5);
    let rig = Rig::new("bench-life", 1).await?;
    let admin = kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let api: Api<QuestDB> = Api::namespaced(admin.clone(), &rig.namespace);
    let aws = rig.aws("region-a").await?;
    let op = rig.spawn_operator(
        "region-a",
        "bench",
        &["--failover-after-secs", "5", "--replacement-budget", &many.to_string()],
    )?;
    println!(
        "node lifecycle benchmark: client-observed unavailability through the ingress (one operator, \
         2-core machine, real QuestDB per database, EC2's timing {}; failover after 5 s not Ready, \
         node-monitor grace 20 s)",
        rig.cloud.vars.get("QDB_AWS_TIMING").map_or("realistic", String::as_str)
    );
    for (round, n) in [1, many].into_iter().enumerate() {
        let names: Vec<String> = (0..n).map(|i| format!("r{round}-db{i}")).collect();
        let mut spec = base_spec();
        apply_all(&api, &names, &spec).await?;
        all_settled(&api, &names, Duration::from_secs(300)).await?;
        let probes = Probes {
            fresh: names
                .iter()
                .map(|db| {
                    let dns = format!("{db}.{}.{}", rig.namespace, rig.dns_zone());
                    AvailabilityProbe::start(aws.clone(), rig.dns_zone(), dns, None)
                })
                .collect(),
            caching: names
                .iter()
                .map(|db| {
                    let dns = format!("{db}.{}.{}", rig.namespace, rig.dns_zone());
                    AvailabilityProbe::start(aws.clone(), rig.dns_zone(), dns, Some(DNS_TTL))
                })
                .collect(),
        };
        // Both probes must be serving before anything is measured.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The targets: a node move <= 10 s, a failover <= the node-monitor grace (20 s)
        // + 25 s; a restart in place (version, config) is reported only.
        let steps: [(&str, &str, Option<f64>); 5] = [
            ("QuestDB version upgrade", "version", None),
            ("config change", "serverConfig", None),
            ("node image upgrade", "nodeImage", Some(10.0)),
            ("instance type change", "instanceType", Some(10.0)),
            ("failover (node cut off)", "failover", Some(45.0)),
        ];
        for (label, what, target) in steps {
            probes.reset();
            let before = op.metrics().await.unwrap_or_default();
            let t0 = Instant::now();
            match what {
                "version" => spec["version"] = json!("9.3.0"),
                "serverConfig" => spec["serverConfig"] = json!({"query.timeout.sec": "30"}),
                "nodeImage" => spec["nodeImage"] = json!("ami-0b0b0b0b0b0b0b0b0"),
                "instanceType" => spec["instanceType"] = json!("m6i.xlarge"),
                _ => {}
            }
            if what == "failover" {
                fail_over(&rig, &api, &names).await?;
            } else {
                apply_all(&api, &names, &spec).await?;
            }
            all_settled(&api, &names, Duration::from_secs(600)).await?;
            let took = t0.elapsed().as_secs_f64();
            // A caching client may still be on the old address: its outage ends when its cache
            // does, so every client is waited for (up to the TTL and a margin).
            let deadline = Instant::now() + DNS_TTL + Duration::from_secs(15);
            tokio::time::sleep(Duration::from_secs(2)).await;
            while !probes.fresh.iter().chain(&probes.caching).all(AvailabilityProbe::is_up)
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (fresh, caching) = probes.take();
            let (fresh_s, fresh_worst) = summary(fresh);
            let (caching_s, _) = summary(caching);
            let goal = target.map_or(String::new(), |t| format!(" (target <= {t:.0} s)"));
            println!(
                "  {n:>2} database(s) {label}: done in {took:.0} s; unavailable {fresh_s}{goal}; \
                 a client caching DNS for the TTL: {caching_s}"
            );
            println!(
                "      where the operator's time went: {}",
                time_spent(&before, &op.metrics().await.unwrap_or_default())
            );
            figure(
                &format!("lifecycle: client-observed unavailability, {label}, {n} database(s) at once"),
                fresh_s,
                &target.map_or(String::new(), |t| format!("<= {t:.0} s")),
                target.map(|t| fresh_worst <= t),
            );
            figure(
                &format!("lifecycle: the same for a client caching DNS for the {} s TTL", DNS_TTL.as_secs()),
                caching_s,
                "",
                None,
            );
        }
        drop(probes);
        delete_all(&api, &names).await?;
    }
    Ok(())
}
