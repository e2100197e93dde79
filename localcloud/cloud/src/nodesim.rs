//! The node simulator of a cluster (`localcloud/nodesim`): plays the kubelet and the node
//! bootstrap for the emulator's instances tagged for that cluster.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process::{self, Proc, need_port};
use crate::settings::{Cluster, Settings};
use crate::{Cloud, aws, cluster, probe};

/// QuestDB 8.x images run simulated: tests that prove the control plane, not data, use them.
/// No 8.x release is installed, so there is no ambiguity with a real server.
const STAND_IN_MAJOR: &str = "8";
/// The access key the node simulator signs with: it plays the EBS CSI driver, the one caller of
/// AttachVolume and DetachVolume.
pub const EBS_CSI_DRIVER_KEY: &str = "ebs-csi-driver";

/// The EBS volumes' storage: one directory per volume id, shared by the clusters (volume ids
/// are unique in the emulator).
pub fn volumes_dir(s: &Settings) -> std::path::PathBuf {
    s.run.join("ebs")
}

/// The volumes' block devices (XFS images), where the machine can loop-mount them.
pub fn volume_images_dir(s: &Settings) -> std::path::PathBuf {
    s.run.join("ebs-images")
}

/// The EBS snapshots' copies of their volumes' storage, kept by the AWS emulator (ebs_data.py).
pub fn snapshots_dir(s: &Settings) -> std::path::PathBuf {
    s.run.join("ebs-snapshots")
}

/// Unmounts every volume mounted under `dir` (the simulators mount XFS images there; a killed
/// one leaves its mounts), so the directory can be removed.
pub fn unmount_volumes(dir: &std::path::Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let Ok(dir) = dir.canonicalize() else { return Ok(()) };
    let prefix = format!("{}/", dir.display());
    for point in info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&prefix)) {
        let out = Command::new("umount").args(["-l", point]).output().context("running umount")?;
        if !out.status.success() {
            bail!("umount -l {point}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// The cluster's bridge: its VPC on the machine, nodes are hosts on it.
/// Named by the port base too, so a second local cloud never touches this one's.
pub fn bridge(s: &Settings, c: &Cluster) -> String {
    format!("qdb{}b{}", s.ports.base(), c.index)
}

pub fn proc(s: &Settings, c: &Cluster) -> Proc {
    Proc::new(format!("{}-nodesim", c.name), "nodesim", s.cluster_dir(c).join("nodesim.log"))
}

pub fn start(cloud: &Cloud, c: &Cluster) -> Result<()> {
    let s = &cloud.settings;
    let bin = s.nodesim_bin();
    if !process::executable(&bin) {
        bail!("node simulator not built at {}; run: localcloud install", bin.display());
    }
    let port = s.ports.nodesim(c);
    let p = proc(s, c);
    if process::alive(cloud, &p.name, &p.pattern) {
        return Ok(());
    }
    need_port(port, &format!("{} node simulator", c.name))?;
    let region = c.aws_region().with_context(|| format!("no AWS region for cluster {}", c.name))?;
    let java = match (&s.tools.java, s.node_runtime.as_str()) {
        (Some(java), _) => java.as_path(),
        (None, "simulated") => std::path::Path::new("java"),
        (None, _) => bail!(
            "the node simulator runs QuestDB, which needs Java 23+: none found in /usr/lib/jvm/temurin-*; \
             set QDB_JAVA, or QDB_NODE_RUNTIME=simulated to run no database"
        ),
    };
    let mut cmd = Command::new(&bin);
    // Its own identity, as the EBS CSI driver has (its IRSA role on EKS): the emulator's call
    // log tells its AttachVolume and DetachVolume calls from everyone else's.
    cmd.env("AWS_ACCESS_KEY_ID", EBS_CSI_DRIVER_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args(["--cluster", &c.name, "--kubeconfig"])
        .arg(cluster::kubeconfig(s, c, "admin"))
        .args(["--aws-region", region, "--aws-endpoint", &aws::endpoint(s)])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--runtime", &s.node_runtime, "--java"])
        .arg(java)
        .arg("--traefik")
        .arg(s.traefik())
        .args(["--questdb", &s.tools.questdb, "--simulated-major", STAND_IN_MAJOR])
        .arg("--volumes-dir")
        .arg(volumes_dir(s))
        .arg("--volume-images-dir")
        .arg(volume_images_dir(s))
        .arg("--logs-dir")
        .arg(s.cluster_dir(c).join("pods"))
        .args(["--bridge", &bridge(s, c), "--bridge-address", &c.vpc_gateway()])
        .args(["--netns-prefix", &format!("qdb{}-", s.ports.base())]);
    process::start(cloud, &p, cmd)?;
    process::wait_for(cloud, &p, &format!("{} node simulator", c.name), 30, || probe::http(port, "/healthz"))
}
