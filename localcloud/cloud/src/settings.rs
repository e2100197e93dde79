//! What the local cloud is made of: the user's QDB_* settings (with the script's defaults), the
//! versions and paths `localcloud/localcloud` resolves for its install steps and hands over
//! (LOCALCLOUD_*, so each version has one source), the run dir's layout and every port.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Each regional cluster lives in its own AWS region of the emulator.
pub const AWS_REGIONS: [(&str, &str); 2] = [("region-a", "us-east-1"), ("region-b", "eu-west-1")];

pub const K8S_BINS: [&str; 4] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Position in QDB_CLUSTERS: picks the cluster's block of ports.
    pub index: u16,
    pub name: String,
}

impl Cluster {
    /// The cluster's VPC: 10.<index+1>.0.0/16, so two regions never share a node address.
    pub fn vpc_cidr(&self) -> String {
        format!("10.{}.0.0/16", self.index + 1)
    }

    /// The VPC router's address (.1, as in AWS): the node bridge's own address on the machine.
    pub fn vpc_gateway(&self) -> String {
        format!("10.{}.0.1/16", self.index + 1)
    }

    pub fn aws_region(&self) -> Option<&'static str> {
        AWS_REGIONS.iter().find(|(c, _)| *c == self.name).map(|(_, r)| *r)
    }

    /// The cluster's part of its env file variables: `region-a` -> `REGION_A`.
    pub fn env_name(&self) -> String {
        self.name.chars().map(|c| if c == '-' { '_' } else { c.to_ascii_uppercase() }).collect()
    }
}

/// Every port of the local cloud, from one base. Each cluster gets a block of 100 ports: etcd 1,
/// etcd peer 2, apiserver 3, controller-manager 4, scheduler 5, nodesim 6, the main job's operator
/// 7, Traefik's entry points websecure 20, pgwire 21, ilp 22 and its API and metrics 23.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    base: u16,
}

/// The highest offset in a cluster's block.
const LAST_CLUSTER_OFFSET: u32 = 23;

impl Ports {
    /// Refuses a base whose highest port (the last cluster's Traefik API) is not a port.
    pub fn new(base: u16, clusters: usize) -> Result<Ports> {
        let top = u32::from(base) + 1000 + 100 * (clusters.max(1) as u32 - 1) + LAST_CLUSTER_OFFSET;
        if top > u32::from(u16::MAX) {
            bail!("QDB_PORT_BASE={base} puts the ports of {clusters} clusters above 65535");
        }
        Ok(Ports { base })
    }

    pub fn base(&self) -> u16 {
        self.base
    }
    pub fn postgres(&self) -> u16 {
        self.base + 432
    }
    pub fn kafka(&self) -> u16 {
        self.base + 92
    }
    pub fn kafka_sasl(&self) -> u16 {
        self.base + 93
    }
    pub fn kafka_controller(&self) -> u16 {
        self.base + 94
    }
    pub fn moto(&self) -> u16 {
        self.base + 500
    }
    pub fn prometheus(&self) -> u16 {
        self.base + 90
    }
    /// The main job's provisioner.
    pub fn provisioner(&self) -> u16 {
        self.base + 10
    }

    // `new` checked that the last cluster's block fits, so none of these overflow.
    fn cluster(&self, c: &Cluster, offset: u16) -> u16 {
        self.base + 1000 + 100 * c.index + offset
    }
    pub fn etcd(&self, c: &Cluster) -> u16 {
        self.cluster(c, 1)
    }
    pub fn etcd_peer(&self, c: &Cluster) -> u16 {
        self.cluster(c, 2)
    }
    pub fn apiserver(&self, c: &Cluster) -> u16 {
        self.cluster(c, 3)
    }
    pub fn controller_manager(&self, c: &Cluster) -> u16 {
        self.cluster(c, 4)
    }
    pub fn scheduler(&self, c: &Cluster) -> u16 {
        self.cluster(c, 5)
    }
    pub fn nodesim(&self, c: &Cluster) -> u16 {
        self.cluster(c, 6)
    }
    /// The main job's operator of that cluster.
    pub fn operator(&self, c: &Cluster) -> u16 {
        self.cluster(c, 7)
    }
    pub fn traefik_websecure(&self, c: &Cluster) -> u16 {
        self.cluster(c, 20)
    }
    pub fn traefik_pgwire(&self, c: &Cluster) -> u16 {
        self.cluster(c, 21)
    }
    pub fn traefik_ilp(&self, c: &Cluster) -> u16 {
        self.cluster(c, 22)
    }
    /// Traefik's API, ping and metrics.
    pub fn traefik_api(&self, c: &Cluster) -> u16 {
        self.cluster(c, LAST_CLUSTER_OFFSET as u16)
    }
}

/// Where the installed parts are; the script knows their versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// kube-apiserver & co and kubectl (a KUBEBUILDER_ASSETS dir or the cache's build).
    pub k8s_bin: PathBuf,
    pub etcd: PathBuf,
    pub kafka_home: PathBuf,
    pub moto_venv: PathBuf,
    pub traefik_home: PathBuf,
    /// Debian's newest PostgreSQL server; none when it is not installed.
    pub pg_bin: Option<PathBuf>,
    /// The JVM the databases' QuestDB servers run on (Temurin 25: QuestDB's flags need 23+).
    pub java: Option<PathBuf>,
    /// Installed QuestDB releases, `VERSION=JAR,...` as the node simulator takes them.
    pub questdb: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cache: PathBuf,
    pub run: PathBuf,
    pub ports: Ports,
    pub clusters: Vec<Cluster>,
    pub instruction_partitions: u32,
    pub gossip_partitions: u32,
    pub k8s_version: String,
    /// How the AWS emulator times EC2's state changes: `timed_moto.py` reads it, `instant` (the
    /// scale benchmarks) turns the delays off and anything else is realistic; it is handed on
    /// and written to the env file as given.
    pub aws_timing: String,
    /// The node simulator's runtime: `real` (installed QuestDB versions run) or `simulated`
    /// (no process; the scale benchmarks).
    pub node_runtime: String,
    /// Whether each cluster's Traefik runs (`QDB_ROUTES=off` leaves it down). The scale
    /// benchmarks measure the control plane, which only writes the routes: at 1000 databases the
    /// loopback Traefik took 0.41 of the two cores rebuilding its configuration from every route on
    /// each change, CPU that in production belongs to the cluster's own ingress nodes.
    pub routes: bool,
    pub tools: Tools,
    /// The repository's `localcloud/` directory: the script, Kafka's log config, the emulator,
    /// the RBAC bindings.
    pub localcloud_dir: PathBuf,
    pub cargo_target_dir: PathBuf,
    /// Which build of the local cloud's own server (the node simulator) runs.
    pub cloud_profile: Profile,
    /// PostgreSQL refuses to run as root: as root its own system user runs it.
    pub as_root: bool,
}

/// A cargo build profile. The benchmarks run the node simulator's release build: its debug build,
/// playing 300 kubelets and the EC2 side of their machines, took one of the machine's two cores
/// (perf: JSON and XML parsing with debug assertions) beside the control plane it measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        Settings::from_lookup(|k| std::env::var(k).ok(), effective_uid()? == 0)
    }

    /// Unset and empty are the same, as `${VAR:-default}` in the script. The run dir, ports and
    /// clusters have their defaults in the script, which needs them too (install, fuzz, bench).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>, as_root: bool) -> Result<Settings> {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        let required = |k: &str| {
            get(k).with_context(|| format!("{k} is not set: run this through localcloud/localcloud"))
        };
        let handed = |k: &str| required(k).map(PathBuf::from);
        let number = |k: &str, default: u32| -> Result<u32> {
            get(k).map_or(Ok(default), |v| v.parse().with_context(|| format!("{k}={v} is not a number")))
        };
        let cache = handed("QDB_CACHE")?;
        let run = handed("QDB_RUN")?;
        let clusters = parse_clusters(&required("QDB_CLUSTERS")?)?;
        let port_base = required("QDB_PORT_BASE")?;
        let port_base: u16 =
            port_base.parse().with_context(|| format!("QDB_PORT_BASE={port_base} is not a port number"))?;
        let aws_timing = get("QDB_AWS_TIMING").unwrap_or_else(|| "realistic".into());
        Ok(Settings {
            ports: Ports::new(port_base, clusters.len())?,
            instruction_partitions: number("QDB_INSTRUCTION_PARTITIONS", 6)?,
            gossip_partitions: number("QDB_GOSSIP_PARTITIONS", 3)?,
            k8s_version: required("QDB_K8S_VERSION")?,
            aws_timing,
            node_runtime: get("QDB_NODE_RUNTIME").unwrap_or_else(|| "real".into()),
            routes: match get("QDB_ROUTES").as_deref() {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => bail!("QDB_ROUTES={other}: expected on or off"),
            },
            tools: Tools {
                k8s_bin: handed("LOCALCLOUD_K8S_BIN")?,
                etcd: handed("LOCALCLOUD_ETCD")?,
                kafka_home: handed("LOCALCLOUD_KAFKA_HOME")?,
                moto_venv: handed("LOCALCLOUD_MOTO_VENV")?,
                traefik_home: handed("LOCALCLOUD_TRAEFIK_HOME")?,
                pg_bin: get("LOCALCLOUD_PG_BIN").map(PathBuf::from),
                java: get("LOCALCLOUD_JAVA").map(PathBuf::from),
                questdb: get("LOCALCLOUD_QUESTDB").unwrap_or_default(),
            },
            localcloud_dir: handed("LOCALCLOUD_DIR")?,
            cargo_target_dir: handed("CARGO_TARGET_DIR")?,
            cloud_profile: match get("QDB_CLOUD_PROFILE").as_deref() {
                None | Some("debug") => Profile::Debug,
                Some("release") => Profile::Release,
                Some(other) => bail!("QDB_CLOUD_PROFILE={other}: expected debug or release"),
            },
            cache,
            run,
            clusters,
            as_root,
        })
    }

    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.run.join("pids").join(format!("{name}.pid"))
    }

    /// A cluster's data, logs, PKI and kubeconfigs.
    pub fn cluster_dir(&self, c: &Cluster) -> PathBuf {
        self.run.join(&c.name)
    }

    pub fn env_file(&self) -> PathBuf {
        self.run.join("env")
    }

    /// The workspace's debug binaries (the control plane, as the tests build it).
    pub fn bin_dir(&self) -> PathBuf {
        self.cargo_target_dir.join("debug")
    }

    /// The node simulator of the chosen build.
    pub fn nodesim_bin(&self) -> PathBuf {
        let profile = match self.cloud_profile {
            Profile::Debug => "debug",
            Profile::Release => "release",
        };
        self.cargo_target_dir.join(profile).join("nodesim")
    }

    pub fn traefik(&self) -> PathBuf {
        self.tools.traefik_home.join("traefik")
    }

    pub fn kafka_log_config(&self) -> PathBuf {
        self.localcloud_dir.join("kafka/log4j2.properties")
    }

    /// The repository root (deploy/ holds the CRDs and roles).
    pub fn repo(&self) -> &Path {
        self.localcloud_dir.parent().unwrap_or(Path::new("/"))
    }
}

/// The clusters in QDB_CLUSTERS order (their index picks their ports); empty names are skipped.
fn parse_clusters(list: &str) -> Result<Vec<Cluster>> {
    list.split(',')
        .filter(|name| !name.is_empty())
        .enumerate()
        .map(|(i, name)| {
            let index = u16::try_from(i).context("too many clusters in QDB_CLUSTERS")?;
            Ok(Cluster { index, name: name.to_string() })
        })
        .collect()
}

/// From /proc, as std has no geteuid.
fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .context("no effective uid in /proc/self/status")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    pub fn vars(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut v: HashMap<String, String> = [
            ("QDB_CACHE", "/cache"),
            ("QDB_RUN", "/cache/run"),
            ("QDB_PORT_BASE", "17000"),
            ("QDB_CLUSTERS", "region-a,region-b"),
            ("QDB_K8S_VERSION", "1.37.2"),
            ("LOCALCLOUD_K8S_BIN", "/cache/k8s-1.37.2/bin"),
            ("LOCALCLOUD_ETCD", "/cache/etcd-3.6.16/bin/etcd"),
            ("LOCALCLOUD_KAFKA_HOME", "/cache/kafka-4.1.1"),
            ("LOCALCLOUD_MOTO_VENV", "/cache/moto-venv"),
            ("LOCALCLOUD_TRAEFIK_HOME", "/cache/traefik-3.6.12"),
            ("LOCALCLOUD_PG_BIN", "/usr/lib/postgresql/15/bin"),
            ("LOCALCLOUD_JAVA", "/usr/lib/jvm/temurin-25-jdk-amd64/bin/java"),
            ("LOCALCLOUD_QUESTDB", "9.3.0=/cache/questdb-9.3.0/questdb.jar"),
            ("LOCALCLOUD_DIR", "/repo/localcloud"),
            ("CARGO_TARGET_DIR", "/cache/target"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, val) in extra {
            v.insert(k.to_string(), val.to_string());
        }
        v
    }

    pub fn settings(extra: &[(&str, &str)]) -> Settings {
        let v = vars(extra);
        Settings::from_lookup(|k| v.get(k).cloned(), true).expect("settings")
    }

    #[test]
    fn handed_settings_and_defaults() {
        let s = settings(&[]);
        assert_eq!(s.run, PathBuf::from("/cache/run"));
        assert_eq!(s.ports.base(), 17000);
        assert_eq!(s.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["region-a", "region-b"]);
        assert_eq!((s.instruction_partitions, s.gossip_partitions), (6, 3));
        assert_eq!(s.aws_timing, "realistic");
        assert_eq!(s.repo(), Path::new("/repo"));
        // Empty is unset, as ${VAR:-default}.
        let s = settings(&[("QDB_INSTRUCTION_PARTITIONS", ""), ("QDB_AWS_TIMING", "instant")]);
        assert_eq!((s.instruction_partitions, s.aws_timing.as_str()), (6, "instant"));
    }

    #[test]
    fn the_node_simulator_runs_from_the_chosen_build() {
        assert_eq!(settings(&[]).nodesim_bin(), PathBuf::from("/cache/target/debug/nodesim"));
        let release = settings(&[("QDB_CLOUD_PROFILE", "release")]);
        assert_eq!(release.nodesim_bin(), PathBuf::from("/cache/target/release/nodesim"));
        let v = vars(&[("QDB_CLOUD_PROFILE", "fast")]);
        let e = Settings::from_lookup(|k| v.get(k).cloned(), true).expect_err("an unknown profile");
        assert!(e.to_string().contains("QDB_CLOUD_PROFILE=fast"), "{e}");
    }

    #[test]
    fn the_routes_run_unless_turned_off() {
        assert!(settings(&[]).routes);
        assert!(!settings(&[("QDB_ROUTES", "off")]).routes);
        let v = vars(&[("QDB_ROUTES", "no")]);
        let e = Settings::from_lookup(|k| v.get(k).cloned(), true).expect_err("an unknown value");
        assert!(e.to_string().contains("QDB_ROUTES=no"), "{e}");
    }

    #[test]
    fn ports_are_the_scripts() {
        let s = settings(&[]);
        let p = s.ports;
        let (a, b) = (&s.clusters[0], &s.clusters[1]);
        assert_eq!(
            [p.postgres(), p.kafka(), p.kafka_sasl(), p.kafka_controller(), p.moto(), p.prometheus()],
            [17432, 17092, 17093, 17094, 17500, 17090]
        );
        assert_eq!(p.provisioner(), 17010);
        assert_eq!(
            [
                p.etcd(a),
                p.etcd_peer(a),
                p.apiserver(a),
                p.controller_manager(a),
                p.scheduler(a),
                p.nodesim(a)
            ],
            [18001, 18002, 18003, 18004, 18005, 18006]
        );
        assert_eq!(p.operator(a), 18007);
        assert_eq!(
            [p.traefik_websecure(b), p.traefik_pgwire(b), p.traefik_ilp(b), p.traefik_api(b)],
            [18120, 18121, 18122, 18123]
        );
        assert_eq!(settings(&[("QDB_PORT_BASE", "27000")]).ports.apiserver(b), 28103);
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            [("QDB_PORT_BASE", "x")],
            [("QDB_PORT_BASE", "64600")],
            [("QDB_GOSSIP_PARTITIONS", "three")],
            [("QDB_PORT_BASE", "")],
        ] {
            let v = vars(&bad);
            assert!(Settings::from_lookup(|k| v.get(k).cloned(), false).is_err(), "{bad:?}");
        }
        let v = vars(&[]);
        assert!(
            Settings::from_lookup(|k| if k == "LOCALCLOUD_ETCD" { None } else { v.get(k).cloned() }, false)
                .is_err()
        );
    }

    #[test]
    fn clusters_and_their_names() {
        let s = settings(&[("QDB_CLUSTERS", "region-b,,region-a,")]);
        assert_eq!(s.clusters[1], Cluster { index: 1, name: "region-a".into() });
        assert_eq!(s.clusters[0].aws_region(), Some("eu-west-1"));
        assert_eq!(s.clusters[0].env_name(), "REGION_B");
        assert_eq!(Cluster { index: 0, name: "elsewhere".into() }.aws_region(), None);
    }
}
