//! The container runtime: which pods run a real process, and those processes.
//!
//! A pod of image `questdb/questdb:<version>` runs the real server when that version's jar is
//! installed (from Maven Central, by `localcloud install`), in a network namespace of its own,
//! with its data directory on the storage of its EBS volume. A version that is neither installed
//! nor of a stand-in major fails like an image pull (ImagePullBackOff). A pod of image
//! `traefik:<tag>` (the ingress DaemonSet) runs the local cloud's Traefik binary in its node's
//! namespace, which is what its hostPorts amount to. Every other image, the stand-in majors
//! (tests that prove control-plane behaviour without data) and every pod under
//! `--runtime simulated` (scale benchmarks) are simulated: Ready once their volumes attach.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use thiserror::Error;
use tracing::{info, warn};

pub const QUESTDB_REPOSITORY: &str = "questdb/questdb";
pub const TRAEFIK_REPOSITORY: &str = "traefik";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Installed QuestDB versions run for real.
    Real,
    /// Every pod is simulated (no process), for scale benchmarks.
    Simulated,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub java: PathBuf,
    /// The Traefik binary `traefik:` images run; without it they are simulated.
    pub traefik: Option<PathBuf>,
    /// Installed QuestDB versions and their jars.
    pub installed: BTreeMap<String, PathBuf>,
    /// QuestDB majors whose images run simulated (no release of them is installed).
    pub simulated_majors: Vec<u32>,
    /// Container logs: `<dir>/<namespace>_<pod>_<uid>.log`.
    pub logs_dir: PathBuf,
}

/// What running a container of `image` means here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlan {
    Simulated,
    QuestDb {
        version: String,
        jar: PathBuf,
    },
    Traefik {
        bin: PathBuf,
    },
    /// The image cannot be pulled; the message says why, as a kubelet's event would.
    PullBackOff(String),
}

pub fn plan_image(cfg: &Config, image: &str) -> ImagePlan {
    if cfg.mode == Mode::Simulated {
        return ImagePlan::Simulated;
    }
    let traefik_tag = image.strip_prefix(TRAEFIK_REPOSITORY).and_then(|r| r.strip_prefix(':'));
    if let (Some(bin), Some(_)) = (&cfg.traefik, traefik_tag) {
        return ImagePlan::Traefik { bin: bin.clone() };
    }
    let Some(version) = image.strip_prefix(QUESTDB_REPOSITORY).and_then(|rest| rest.strip_prefix(':')) else {
        return ImagePlan::Simulated;
    };
    if let Some(jar) = cfg.installed.get(version) {
        return ImagePlan::QuestDb { version: version.to_string(), jar: jar.clone() };
    }
    let major = version.split('.').next().and_then(|m| m.parse::<u32>().ok());
    if major.is_some_and(|m| cfg.simulated_majors.contains(&m)) {
        return ImagePlan::Simulated;
    }
    let installed: Vec<&str> = cfg.installed.keys().map(String::as_str).collect();
    ImagePlan::PullBackOff(format!(
        "Back-off pulling image \"{image}\": manifest for {image} not found (QuestDB versions installed here: {})",
        if installed.is_empty() { "none".to_string() } else { installed.join(", ") }
    ))
}

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("starting {image} for {pod}: {source}")]
    Start { image: String, pod: String, source: std::io::Error },
}

/// The JVM and server settings of a small machine: a pod's memory limit, where set, sizes the
/// heap (a quarter) and QuestDB's own RAM limit (half); otherwise 256 MiB and 512 MiB.
pub fn memory_settings(limit_bytes: Option<u64>) -> (String, u64) {
    const MIB: u64 = 1 << 20;
    match limit_bytes {
        Some(limit) => (format!("-Xmx{}m", (limit / 4 / MIB).max(64)), limit / 2),
        None => ("-Xmx256m".to_string(), 512 * MIB),
    }
}

/// A memory quantity in bytes (`512Mi`, `2Gi`, `1G`, `1048576`); `None` for forms not used here.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// QuestDB's command line, from QuestDB's own service docs (Java 23+ flags; Temurin 25 here).
pub fn java_args(jar: &Path, root: &Path, heap: &str) -> Vec<String> {
    let mut args: Vec<String> =
        ["-Xms64m", heap, "--sun-misc-unsafe-memory-access=allow"].iter().map(|s| s.to_string()).collect();
    args.push("--enable-native-access=io.questdb".into());
    for open in ["java.lang", "java.lang.reflect", "java.nio", "java.time.zone"] {
        args.push(format!("--add-opens=java.base/{open}=io.questdb"));
    }
    args.push("--add-exports=java.base/jdk.internal.vm=io.questdb".into());
    args.push(format!("-Djava.io.tmpdir={}", root.join("tmp").display()));
    args.extend([
        "-p".into(),
        jar.display().to_string(),
        "-m".into(),
        "io.questdb/io.questdb.ServerMain".into(),
    ]);
    args.extend(["-d".into(), root.display().to_string()]);
    args
}

/// One running container.
pub struct Container {
    pub pod: String,
    pub image: String,
    pub instance_id: String,
    /// The EBS volume it runs on (QuestDB).
    pub volume_id: Option<String>,
    pub pod_ip: String,
    /// It has a host of its own (`Network::pod_netns`), to remove with the pod.
    pub own_host: bool,
    pub started_at: String,
    pub restarts: i32,
    pub ready: bool,
    child: tokio::process::Child,
    readiness: ProbeState,
    liveness: ProbeState,
}

#[derive(Default)]
struct ProbeState {
    last: Option<Instant>,
    successes: i32,
    failures: i32,
}

/// A container to start: everything the runtime needs, gathered by the simulator.
pub struct Launch {
    pub pod: String,
    pub uid: String,
    pub image: String,
    pub instance_id: String,
    /// The namespace it runs in: its own, or its node's.
    pub netns: String,
    pub pod_ip: String,
    pub own_host: bool,
    pub volume_id: Option<String>,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub started_at: String,
    pub restarts: i32,
    /// The user it runs as; `None`: root.
    pub identity: Option<crate::security::Identity>,
}

/// Makes the QuestDB root on the volume's filesystem (`root`) with the pod's files in it (its
/// ConfigMap as conf/server.conf).
pub fn prepare_questdb_root(root: &Path, files: &[(PathBuf, String)]) -> Result<(), RuntimeError> {
    for dir in [root.join("conf"), root.join("tmp")] {
        std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Write { path: dir.clone(), source })?;
    }
    for (rel, content) in files {
        let path = root.join(rel);
        std::fs::write(&path, content)
            .map_err(|source| RuntimeError::Write { path: path.clone(), source })?;
    }
    Ok(())
}

/// QuestDB's program, arguments and environment: a small machine's worker pools (env overrides
/// leave server.conf exactly as rendered) and the memory the pod's limit allows.
pub fn questdb_command(
    cfg: &Config,
    jar: &Path,
    root: &Path,
    memory_limit: Option<u64>,
) -> (PathBuf, Vec<String>, Vec<(String, String)>) {
    let (heap, ram_limit) = memory_settings(memory_limit);
    let env = [
        ("QDB_SHARED_NETWORK_WORKER_COUNT", "1".to_string()),
        ("QDB_SHARED_QUERY_WORKER_COUNT", "1".to_string()),
        ("QDB_SHARED_WRITE_WORKER_COUNT", "1".to_string()),
        ("QDB_TELEMETRY_ENABLED", "false".to_string()),
        ("QDB_RAM_USAGE_LIMIT_BYTES", ram_limit.to_string()),
    ];
    (
        cfg.java.clone(),
        java_args(jar, root, &heap),
        env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    )
}

/// Traefik as the DaemonSet runs it: the container's own arguments, and the apiserver reached the
/// way a pod does (the node's `kubernetes` Service address, the service account's token, the
/// cluster CA), given as the provider's flags since no in-cluster files exist here.
pub fn traefik_command(
    bin: &Path,
    container_args: &[String],
    token: &str,
    ca_file: &Path,
) -> (PathBuf, Vec<String>) {
    let mut args = container_args.to_vec();
    args.push(format!("--providers.kubernetescrd.endpoint=https://{}", crate::relay::IN_NODE));
    args.push(format!("--providers.kubernetescrd.token={token}"));
    args.push(format!("--providers.kubernetescrd.certauthfilepath={}", ca_file.display()));
    (bin.to_path_buf(), args)
}

/// What a probe is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unchanged,
    BecameReady,
    BecameUnready,
    /// The liveness probe failed its threshold: the kubelet restarts the container.
    Unhealthy,
}

#[derive(Default)]
pub struct Runtime {
    pub containers: HashMap<String, Container>,
}

impl Runtime {
    pub fn start(&mut self, cfg: &Config, l: Launch) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(&cfg.logs_dir)
            .map_err(|source| RuntimeError::Write { path: cfg.logs_dir.clone(), source })?;
        let log_path = cfg.logs_dir.join(format!("{}_{}.log", l.pod.replace('/', "_"), l.uid));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| RuntimeError::Write { path: log_path.clone(), source })?;
        let err = log.try_clone().map_err(|source| RuntimeError::Write { path: log_path.clone(), source })?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &l.netns])
            .args(l.identity.as_ref().map(crate::security::setpriv_args).unwrap_or_default())
            .arg(&l.program)
            .args(&l.args)
            .envs(l.env.iter().map(|(k, v)| (k, v)))
            // A pod finds the apiserver through its flags, never through the simulator's env.
            .env_remove("KUBERNETES_SERVICE_HOST")
            // A user the image's passwd does not name gets HOME=/ from the runtime, not the
            // simulator's (root's, which that user may not even read).
            .envs(l.identity.as_ref().map(|_| ("HOME", "/")))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: prctl(2) only, between fork and exec. The process dies with the simulator, as
        // containers die with their machine; `ip netns exec` execs it in place, so it applies.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RuntimeError::Start { image: l.image.clone(), pod: l.pod.clone(), source })?;
        info!(
            pod = l.pod,
            image = l.image,
            volume = l.volume_id,
            ip = l.pod_ip,
            pid = child.id(),
            "container started"
        );
        self.containers.insert(
            l.uid,
            Container {
                pod: l.pod,
                image: l.image,
                instance_id: l.instance_id,
                volume_id: l.volume_id,
                pod_ip: l.pod_ip,
                own_host: l.own_host,
                started_at: l.started_at,
                restarts: l.restarts,
                ready: false,
                child,
                readiness: ProbeState::default(),
                liveness: ProbeState::default(),
            },
        );
        Ok(())
    }

    /// Takes the container out of the table, for a probe or a stop ([`Runtime::put`] returns it).
    pub fn take(&mut self, uid: &str) -> Option<Container> {
        self.containers.remove(uid)
    }

    pub fn put(&mut self, uid: &str, c: Container) {
        self.containers.insert(uid.to_string(), c);
    }

    /// Uids of the containers running on an instance.
    pub fn on_instance(&self, instance_id: &str) -> Vec<String> {
        self.containers.iter().filter(|(_, c)| c.instance_id == instance_id).map(|(u, _)| u.clone()).collect()
    }
}

impl Container {
    /// Whether the server's process has exited (a crash, or killed from outside).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the server as the kubelet does: SIGTERM, then SIGKILL after the grace period.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            warn!(pod = self.pod, "the container ignored SIGTERM for the grace period; killing it");
            let _ = self.child.kill().await;
        }
        info!(pod = self.pod, image = self.image, "container stopped");
    }

    /// Power lost: SIGKILL at once.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
        info!(pod = self.pod, image = self.image, "container killed with its machine");
    }
}

/// The probes' HTTP GETs a kubelet would send for `pod`'s first container, at `ip`.
pub struct Probes {
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
}

pub fn probes(pod: &Pod) -> Probes {
    let c = pod.spec.as_ref().and_then(|s| s.containers.first());
    Probes {
        readiness: c.and_then(|c| c.readiness_probe.clone()),
        liveness: c.and_then(|c| c.liveness_probe.clone()),
    }
}

pub fn probe_url(p: &Probe, ip: &str) -> Option<String> {
    let get = p.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(n) => *n,
        // Named ports are not used by the operator's pods; treat them as unreachable.
        IntOrString::String(_) => return None,
    };
    Some(format!("http://{ip}:{port}{}", get.path.as_deref().unwrap_or("/")))
}

/// Runs the due probes of a container once; a kubelet's period, thresholds and timeout apply.
pub async fn run_probes(http: &reqwest::Client, c: &mut Container, probes: &Probes, ip: &str) -> Verdict {
    let mut verdict = Verdict::Unchanged;
    if let Some(p) = &probes.readiness {
        if let Some(ok) = probe_due(http, &mut c.readiness, p, ip).await {
            let ready = if ok {
                c.ready || c.readiness.successes >= p.success_threshold.unwrap_or(1)
            } else {
                c.ready && c.readiness.failures < p.failure_threshold.unwrap_or(3)
            };
            if ready != c.ready {
                c.ready = ready;
                verdict = if ready { Verdict::BecameReady } else { Verdict::BecameUnready };
            }
        }
    } else if !c.ready {
        c.ready = true;
        verdict = Verdict::BecameReady;
    }
    if let Some(p) = &probes.liveness
        && probe_due(http, &mut c.liveness, p, ip).await == Some(false)
        && c.liveness.failures >= p.failure_threshold.unwrap_or(3)
    {
        return Verdict::Unhealthy;
    }
    verdict
}

/// `Some(passed)` when the probe was due and ran.
async fn probe_due(http: &reqwest::Client, st: &mut ProbeState, p: &Probe, ip: &str) -> Option<bool> {
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    if st.last.is_some_and(|t| t.elapsed() < period) {
        return None;
    }
    st.last = Some(Instant::now());
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let ok = match probe_url(p, ip) {
        Some(url) => http
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .is_ok_and(|r| (200..400).contains(&r.status().as_u16())),
        None => false,
    };
    if ok {
        st.successes += 1;
        st.failures = 0;
    } else {
        st.failures += 1;
        st.successes = 0;
    }
    Some(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode) -> Config {
        Config {
            mode,
            java: "java".into(),
            traefik: None,
            installed: [("9.3.0".to_string(), PathBuf::from("/q/9.3.0.jar"))].into(),
            simulated_majors: vec![8],
            logs_dir: "/l".into(),
        }
    }

    #[test]
    fn installed_versions_run_real_stand_ins_simulated_others_fail_to_pull() {
        let c = cfg(Mode::Real);
        assert_eq!(
            plan_image(&c, "questdb/questdb:9.3.0"),
            ImagePlan::QuestDb { version: "9.3.0".into(), jar: "/q/9.3.0.jar".into() }
        );
        assert_eq!(plan_image(&c, "questdb/questdb:8.2.1"), ImagePlan::Simulated);
        assert_eq!(plan_image(&c, "traefik:v3.6"), ImagePlan::Simulated, "no Traefik binary given");
        let with_traefik = Config { traefik: Some("/t/traefik".into()), ..cfg(Mode::Real) };
        assert_eq!(
            plan_image(&with_traefik, "traefik:v3.6.12"),
            ImagePlan::Traefik { bin: "/t/traefik".into() }
        );
        assert_eq!(plan_image(&with_traefik, "traefikee:1"), ImagePlan::Simulated);
        let ImagePlan::PullBackOff(why) = plan_image(&c, "questdb/questdb:9.9.9") else {
            panic!("9.9.9 is not installed")
        };
        assert!(why.contains("questdb/questdb:9.9.9") && why.contains("installed here: 9.3.0"), "{why}");
        assert_eq!(plan_image(&cfg(Mode::Simulated), "questdb/questdb:9.3.0"), ImagePlan::Simulated);
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("2G"), Some(2_000_000_000));
        assert_eq!(quantity_bytes("1024"), Some(1024));
        assert_eq!(quantity_bytes("1.5Gi"), None);
    }

    #[test]
    fn memory_follows_the_pod_limit_where_set() {
        assert_eq!(memory_settings(None), ("-Xmx256m".to_string(), 512 << 20));
        assert_eq!(memory_settings(Some(2 << 30)), ("-Xmx512m".to_string(), 1 << 30));
    }

    #[test]
    fn traefik_keeps_the_daemonsets_arguments_and_reaches_the_apiserver_as_a_pod() {
        let (bin, args) = traefik_command(
            Path::new("/t/traefik"),
            &["--entrypoints.pgwire.address=:8812".to_string()],
            "tok",
            Path::new("/r/ca.crt"),
        );
        assert_eq!(bin, PathBuf::from("/t/traefik"));
        assert_eq!(args[0], "--entrypoints.pgwire.address=:8812");
        assert!(args.contains(&"--providers.kubernetescrd.endpoint=https://127.0.0.1:6443".to_string()));
        assert!(args.contains(&"--providers.kubernetescrd.token=tok".to_string()));
    }

    #[test]
    fn the_command_line_is_questdbs_own() {
        let args = java_args(Path::new("/j/questdb.jar"), Path::new("/v/vol-1"), "-Xmx256m");
        let line = args.join(" ");
        assert!(line.contains("-p /j/questdb.jar -m io.questdb/io.questdb.ServerMain -d /v/vol-1"), "{line}");
        assert!(line.contains("-Djava.io.tmpdir=/v/vol-1/tmp"), "{line}");
        assert!(line.contains("--sun-misc-unsafe-memory-access=allow"), "{line}");
    }
}
