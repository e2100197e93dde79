//! The node simulator of a cluster (`localcloud/nodesim`): plays the kubelet and the node
//! bootstrap for the emulator's instances tagged for that cluster.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process::{self, Proc, need_port};
use crate::settings::{Cluster, Settings};
use crate::{Cloud, aws, cluster, probe};

pub fn proc(s: &Settings, c: &Cluster) -> Proc {
    Proc::new(format!("{}-nodesim", c.name), "nodesim", s.cluster_dir(c).join("nodesim.log"))
}

pub fn start(cloud: &Cloud, c: &Cluster) -> Result<()> {
    let s = &cloud.settings;
    let bin = s.bin_dir().join("nodesim");
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
    let mut cmd = Command::new(&bin);
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args(["--cluster", &c.name, "--kubeconfig"])
        .arg(cluster::kubeconfig(s, c, "admin"))
        .args(["--aws-region", region, "--aws-endpoint", &aws::endpoint(s)])
        .args(["--listen", &format!("127.0.0.1:{port}")]);
    process::start(cloud, &p, cmd)?;
    process::wait_for(cloud, &p, &format!("{} node simulator", c.name), 30, || probe::http(port, "/healthz"))
}
