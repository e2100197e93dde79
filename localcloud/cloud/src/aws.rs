//! The AWS emulator: moto's server wrapped by `localcloud/aws/timed_moto.py`, which gives EC2's
//! state changes their time (QDB_AWS_TIMING). It keeps its state in memory only.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use base64::Engine;

use crate::process::{self, Proc, need_port};
use crate::settings::{Cluster, Settings};
use crate::{Cloud, cluster, nodesim, probe};

/// `moto`, not the script's name: tests find the emulator's pid file under this name
/// (QDB_MOTO_PID_FILE) to freeze it.
pub const NAME: &str = "moto";
pub const PATTERN: &str = "timed_moto";

pub fn proc(s: &Settings) -> Proc {
    Proc::new(NAME, PATTERN, s.run.join("moto/moto.log"))
}

/// Every EC2 call with the true state of the instances at that moment, for the tests.
pub fn call_log(s: &Settings) -> PathBuf {
    s.run.join("moto/ec2-calls.jsonl")
}

pub fn endpoint(s: &Settings) -> String {
    format!("http://127.0.0.1:{}", s.ports.moto())
}

pub fn start(cloud: &Cloud) -> Result<()> {
    let s = &cloud.settings;
    let venv = &s.tools.moto_venv;
    if !venv.join("bin/moto_server").is_file() {
        bail!("moto not found in {}; run: localcloud install", venv.display());
    }
    if process::alive(cloud, NAME, PATTERN) {
        return Ok(());
    }
    let port = s.ports.moto();
    need_port(port, "AWS emulator (moto)")?;
    let p = proc(s);
    let dir = s.run.join("moto");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(s.localcloud_dir.join("aws/timed_moto.py"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("QDB_AWS_CALL_LOG", call_log(s))
        .env("QDB_AWS_TIMING", &s.aws_timing)
        // Where the node simulators keep the volumes' storage, which snapshots copy.
        .env("QDB_AWS_VOLUMES_DIR", nodesim::volumes_dir(s))
        .env("QDB_AWS_VOLUME_IMAGES_DIR", nodesim::volume_images_dir(s))
        .env("QDB_AWS_SNAPSHOTS_DIR", nodesim::snapshots_dir(s));
    process::start(cloud, &p, cmd)?;
    process::wait_for(cloud, &p, "AWS emulator", 60, || probe::http(port, "/moto-api/data.json"))
}

/// The cluster's settings for its operators, kept as env file lines: its network, made in the
/// emulator by `localcloud/aws/network.py` (idempotent: a VPC 10.<index+1>.0.0/16, so two regions
/// never share a node address, a subnet per zone, the EKS cluster security group and the node
/// instance profile), and the EKS coordinates its nodes join with.
pub fn network(cloud: &Cloud, c: &Cluster) -> Result<()> {
    let s = &cloud.settings;
    let region = c.aws_region().with_context(|| format!("no AWS region for cluster {}", c.name))?;
    let cidr = c.vpc_cidr();
    let out = process::output(
        Command::new(s.tools.moto_venv.join("bin/python"))
            .arg(s.localcloud_dir.join("aws/network.py"))
            .args([&endpoint(s), region, &c.name, &c.env_name(), &cidr]),
    )
    .with_context(|| format!("making the network of {} in the emulator", c.name))?;
    if !out.status.success() {
        bail!("making the network of {} failed: {}", c.name, String::from_utf8_lossy(&out.stderr).trim());
    }
    // The EKS cluster's coordinates, as `aws eks describe-cluster` gives them, for the nodes'
    // bootstrap in their user data.
    let ca_path = cluster::ca_file(s, c);
    let ca = fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let up = c.env_name();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let eks = [
        ("EKS_CLUSTER_NAME", c.name.clone()),
        ("EKS_ENDPOINT", cluster::server(s, c)),
        ("EKS_CA", base64::engine::general_purpose::STANDARD.encode(ca)),
        ("EKS_SERVICE_CIDR", cluster::SERVICE_CIDR.to_string()),
    ];
    for (key, value) in eks {
        text.push_str(&format!("export QDB_{up}_{key}={value}\n"));
    }
    let path = network_env(s, c);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Where [`network`] keeps the cluster's lines for the env file.
pub fn network_env(s: &Settings, c: &Cluster) -> PathBuf {
    s.cluster_dir(c).join("network.env")
}

/// The operator's environment for the cluster's network: `QDB_<ENV_NAME>_SUBNETS` becomes
/// `QDB_SUBNETS`, and so on (see `network.py`).
pub fn operator_network_env(s: &Settings, c: &Cluster) -> Result<Vec<(String, String)>> {
    let path = network_env(s, c);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let prefix = format!("export QDB_{}_", c.env_name());
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once('='))
        .map(|(k, v)| (format!("QDB_{k}"), v.to_string()))
        .collect())
}
