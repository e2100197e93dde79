//! The commands: `up` starts the components that need nothing of each other side by side and
//! the rest in order (a cluster's apiserver after its etcd, its CRDs after the apiserver,
//! Traefik after its CRDs, the node simulator after the apiserver and the emulator).

use std::fs;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{self, Proc};
use crate::settings::{AWS_REGIONS, Cluster, K8S_BINS, Settings};
use crate::{
    Aborted, Cloud, aws, cluster, envfile, kafka, log, nodesim, postgres, prometheus, services, traefik,
};

/// Everything `up` needs must be installed before anything starts, so a gap fails at once.
pub fn preflight(s: &Settings) -> Result<()> {
    let mut missing = Vec::new();
    if s.tools.pg_bin.is_none() {
        missing.push("PostgreSQL server (/usr/lib/postgresql/*/bin)".to_string());
    }
    if !s.tools.kafka_home.join(".complete").is_file() {
        missing.push(format!("Apache Kafka ({})", s.tools.kafka_home.display()));
    }
    if !process::executable(&s.tools.etcd) {
        missing.push(format!("etcd ({})", s.tools.etcd.display()));
    }
    if !process::executable(&s.traefik()) {
        missing.push(format!("Traefik ({})", s.tools.traefik_home.display()));
    }
    if !on_path("prometheus") {
        missing.push("prometheus".to_string());
    }
    if !process::executable(&s.tools.moto_venv.join("bin/moto_server")) {
        missing.push(format!("moto_server ({}/bin)", s.tools.moto_venv.display()));
    }
    for b in K8S_BINS {
        if !process::executable(&s.tools.k8s_bin.join(b)) {
            missing.push(format!("{b} ({})", s.tools.k8s_bin.display()));
        }
    }
    for c in &s.clusters {
        if c.aws_region().is_none() {
            let known: Vec<&str> = AWS_REGIONS.iter().map(|(c, _)| *c).collect();
            bail!("unknown cluster {} in QDB_CLUSTERS (known: {})", c.name, known.join(" "));
        }
    }
    if !missing.is_empty() {
        bail!("not installed: {}; run: localcloud install", missing.join(" "));
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| process::executable(&dir.join(program))))
}

/// The first error of the components started side by side; the others' `Aborted` is its echo.
#[derive(Default)]
struct Failures(Mutex<Vec<anyhow::Error>>);

impl Failures {
    fn run(&self, cloud: &Cloud, f: impl FnOnce() -> Result<()>) -> bool {
        match f() {
            Ok(()) => true,
            Err(e) => {
                cloud.fail();
                if e.downcast_ref::<Aborted>().is_none() {
                    self.0.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
                false
            }
        }
    }

    /// The first error; any other real failure is logged, as the script would have shown it had
    /// it got that far.
    fn into_result(self) -> Result<()> {
        let mut errors = self.0.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter();
        let Some(first) = errors.next() else { return Ok(()) };
        for e in errors {
            log(format!("error: {e:#}"));
        }
        Err(first)
    }
}

const PENDING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

/// A component the others wait for (the emulator, for the node simulators).
struct Gate(AtomicU8);

impl Gate {
    fn open(&self, ok: bool) {
        self.0.store(if ok { READY } else { FAILED }, Ordering::SeqCst);
    }

    fn wait(&self, cloud: &Cloud) -> Result<()> {
        loop {
            match self.0.load(Ordering::SeqCst) {
                READY => return Ok(()),
                FAILED => return Err(Aborted.into()),
                _ if cloud.failed() => return Err(Aborted.into()),
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Traefik needs the cluster's CRDs, the node simulator its apiserver and the emulator; the two
/// need nothing of each other.
fn start_cluster_and_its_servers(cloud: &Cloud, c: &Cluster, emulator: &Gate) -> Result<()> {
    cluster::start(cloud, c)?;
    let failures = Failures::default();
    thread::scope(|scope| {
        if cloud.settings.routes {
            scope.spawn(|| failures.run(cloud, || traefik::start(cloud, c)));
        }
        failures.run(cloud, || {
            emulator.wait(cloud)?;
            aws::network(cloud, c)?;
            nodesim::start(cloud, c)
        });
    });
    failures.into_result()
}

pub fn up(cloud: &Cloud) -> Result<()> {
    let t0 = Instant::now();
    let s = &cloud.settings;
    preflight(s)?;
    fs::create_dir_all(&s.run).with_context(|| format!("creating {}", s.run.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // PostgreSQL runs as its own user and must reach its dir inside.
        fs::set_permissions(&s.run, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", s.run.display()))?;
    }
    let failures = Failures::default();
    let emulator = Gate(AtomicU8::new(PENDING));
    thread::scope(|scope| {
        scope.spawn(|| failures.run(cloud, || postgres::start(cloud)));
        scope.spawn(|| failures.run(cloud, || kafka::start(cloud)));
        scope.spawn(|| emulator.open(failures.run(cloud, || aws::start(cloud))));
        scope.spawn(|| failures.run(cloud, || prometheus::start(cloud)));
        for c in &s.clusters {
            let (failures, emulator) = (&failures, &emulator);
            scope.spawn(move || failures.run(cloud, || start_cluster_and_its_servers(cloud, c, emulator)));
        }
    });
    if let Err(e) = failures.into_result() {
        // Half a cloud is worse than none, and would hold the ports the next `up` needs; what
        // was already up before this `up` stays.
        stop_started(cloud);
        return Err(e);
    }
    envfile::write_provisioner_config(s)?;
    envfile::write_env(cloud)?;
    log(format!("up in {}s; env: {}", t0.elapsed().as_secs(), s.env_file().display()));
    Ok(())
}

fn stop_started(cloud: &Cloud) {
    for p in cloud.take_started() {
        let stopped = if p.name == postgres::NAME {
            postgres::stop(cloud)
        } else {
            process::stop(cloud, &p.name, &p.pattern)
        };
        if let Err(e) = stopped {
            log(format!("error: stopping {}: {e:#}", p.name));
        }
    }
}

/// Every server of `up`, in stop order (dependents first).
pub fn components(s: &Settings) -> Vec<Proc> {
    let mut all = Vec::new();
    for c in &s.clusters {
        all.push(traefik::proc(s, c));
        all.push(nodesim::proc(s, c));
        all.extend(cluster::procs(s, c));
    }
    all.push(prometheus::proc(s));
    all.push(aws::proc(s));
    all.push(kafka::proc(s));
    all.push(Proc::new(postgres::NAME, postgres::PATTERN, s.run.join("postgres/postgres.log")));
    all
}

/// Stops what `up` and the main job started, by PID, and nothing else.
pub fn down(cloud: &Cloud) -> Result<()> {
    services::stop(cloud)?;
    for p in components(&cloud.settings) {
        if p.name == postgres::NAME {
            postgres::stop(cloud)?;
        } else {
            process::stop(cloud, &p.name, &p.pattern)?;
        }
    }
    log("down");
    Ok(())
}

/// One line per component; false when any is down.
pub fn status(cloud: &Cloud) -> bool {
    let s = &cloud.settings;
    let mut all_up = true;
    for p in components(s) {
        match process::alive_pid(cloud, &p.name, &p.pattern) {
            Some(pid) => println!("{:<28} up    pid {pid}", p.name),
            None => {
                println!("{:<28} down", p.name);
                all_up = false;
            }
        }
    }
    for p in services::procs(s) {
        if let Some(pid) = process::alive_pid(cloud, &p.name, &p.pattern) {
            println!("{:<28} up    pid {pid} (main job)", p.name);
        }
    }
    if s.env_file().is_file() {
        println!("env: {}", s.env_file().display());
    }
    all_up
}

/// Stops and starts one server, keeping its data, for fault tests.
pub fn restart(cloud: &Cloud, component: Option<&str>) -> Result<()> {
    let s = &cloud.settings;
    if !s.env_file().is_file() {
        bail!("the local cloud is not up");
    }
    match component {
        Some("kafka") => {
            process::stop(cloud, kafka::NAME, kafka::PATTERN)?;
            kafka::start(cloud)?;
        }
        Some("postgres") => {
            postgres::stop(cloud)?;
            postgres::start(cloud)?;
        }
        Some(name) if name.ends_with("-apiserver") => {
            let Some(c) = s.clusters.iter().find(|c| cluster::apiserver(s, c).name == name) else {
                let names: Vec<&str> = s.clusters.iter().map(|c| c.name.as_str()).collect();
                bail!("no cluster for {name} (clusters: {})", names.join(" "));
            };
            let p = cluster::apiserver(s, c);
            process::stop(cloud, &p.name, &p.pattern)?;
            cluster::start(cloud, c)?;
        }
        _ => bail!("restart what? kafka, postgres or <cluster>-apiserver"),
    }
    log(format!("{} restarted", component.unwrap_or_default()));
    Ok(())
}

/// `down`, then all data (journal, topics, clusters) goes.
pub fn reset(cloud: &Cloud) -> Result<()> {
    down(cloud)?;
    let run = &cloud.settings.run;
    nodesim::unmount_volumes(run)?;
    match fs::remove_dir_all(run) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", run.display()));
        }
        _ => {}
    }
    log(format!("data removed ({})", run.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::tests::settings;

    #[test]
    fn components_in_the_scripts_stop_order() {
        let s = settings(&[]);
        let names: Vec<(String, String)> = components(&s).into_iter().map(|p| (p.name, p.pattern)).collect();
        let expected = [
            ("region-a-traefik", "/cache/traefik-3.6.12/traefik"),
            ("region-a-nodesim", "nodesim"),
            ("region-a-scheduler", "kube-scheduler"),
            ("region-a-controller-manager", "kube-controller-manager"),
            ("region-a-apiserver", "kube-apiserver"),
            ("region-a-etcd", "etcd"),
            ("region-b-traefik", "/cache/traefik-3.6.12/traefik"),
            ("region-b-nodesim", "nodesim"),
            ("region-b-scheduler", "kube-scheduler"),
            ("region-b-controller-manager", "kube-controller-manager"),
            ("region-b-apiserver", "kube-apiserver"),
            ("region-b-etcd", "etcd"),
            ("prometheus", "prometheus"),
            ("moto", "timed_moto"),
            ("kafka", "kafka.Kafka"),
            ("postgres", "postgres"),
        ];
        assert_eq!(names, expected.map(|(n, p)| (n.to_string(), p.to_string())));
        let services: Vec<String> = services::procs(&s).into_iter().map(|p| p.name).collect();
        assert_eq!(services, ["provisioner", "region-a-operator", "region-b-operator"]);
    }

    #[test]
    fn unknown_clusters_are_refused_before_anything_starts() {
        let s = settings(&[("QDB_CLUSTERS", "region-a,region-c")]);
        let e = preflight(&s).expect_err("region-c");
        assert_eq!(e.to_string(), "unknown cluster region-c in QDB_CLUSTERS (known: region-a region-b)");
    }
}
