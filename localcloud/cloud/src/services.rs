//! The control plane itself, for the main job: an operator per cluster (scoped to the
//! namespace the provisioner writes to, so tests' own operators never meet it) and one
//! provisioner. `down` stops them first; `status` shows them when they run.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result};

use crate::process::{self, Proc, need_port};
use crate::settings::{Cluster, Settings};
use crate::{Cloud, aws, cluster, postgres, probe, prometheus};

pub const OPERATOR_PATTERN: &str = "qdb-operator";
pub const PROVISIONER: &str = "provisioner";
pub const PROVISIONER_PATTERN: &str = "qdb-provisioner";

pub fn operator(s: &Settings, c: &Cluster) -> Proc {
    Proc::new(format!("{}-operator", c.name), OPERATOR_PATTERN, s.cluster_dir(c).join("operator.log"))
}

pub fn provisioner(s: &Settings) -> Proc {
    Proc::new(PROVISIONER, PROVISIONER_PATTERN, s.run.join("provisioner.log"))
}

/// In stop order.
pub fn procs(s: &Settings) -> Vec<Proc> {
    let mut all = vec![provisioner(s)];
    all.extend(s.clusters.iter().map(|c| operator(s, c)));
    all
}

/// A Prometheus target file for one of the main job's processes.
fn scrape(s: &Settings, name: &str, job: &str, port: u16) -> Result<()> {
    let file = prometheus::targets_dir(s).join(format!("{name}.json"));
    fs::write(&file, prometheus::target_file(&format!("127.0.0.1:{port}"), &[("job", job)]))
        .with_context(|| format!("writing {}", file.display()))
}

pub fn start(cloud: &Cloud) -> Result<()> {
    let s = &cloud.settings;
    let bin = s.bin_dir();
    for c in &s.clusters {
        let p = operator(s, c);
        let port = s.ports.operator(c);
        if process::alive(cloud, &p.name, &p.pattern) {
            continue;
        }
        need_port(port, &format!("{} operator", c.name))?;
        let region = c.aws_region().with_context(|| format!("no AWS region for cluster {}", c.name))?;
        let mut cmd = Command::new(bin.join("qdb-operator"));
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .envs(aws::operator_network_env(s, c)?)
            .args(["--cluster", &c.name, "--dns-zone", &format!("{}.questdb.local", c.name)])
            .args(["--create-hosted-zone", "--aws-region", region, "--aws-endpoint", &aws::endpoint(s)])
            .arg("--kubeconfig")
            .arg(cluster::kubeconfig(s, c, "operator"))
            .args(["--namespace", "questdb", "--lease-namespace", "questdb"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--resync-secs", "30", "--poll-secs", "1"]);
        process::start(cloud, &p, cmd)?;
        process::wait_for(cloud, &p, &format!("{} operator", c.name), 30, || probe::http(port, "/readyz"))?;
        scrape(s, &p.name, OPERATOR_PATTERN, port)?;
    }
    let p = provisioner(s);
    let port = s.ports.provisioner();
    if !process::alive(cloud, &p.name, &p.pattern) {
        need_port(port, "provisioner")?;
        let mut cmd = Command::new(bin.join("qdb-provisioner"));
        cmd.arg("--config")
            .arg(s.run.join("provisioner.yaml"))
            .args(["--brokers", &format!("127.0.0.1:{}", s.ports.kafka())])
            .args(["--database-url", &postgres::url(s)])
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        process::start(cloud, &p, cmd)?;
        process::wait_for(cloud, &p, "provisioner", 60, || probe::http(port, "/readyz"))?;
    }
    scrape(s, &p.name, PROVISIONER_PATTERN, port)
}

pub fn stop(cloud: &Cloud) -> Result<()> {
    for p in procs(&cloud.settings) {
        process::stop(cloud, &p.name, &p.pattern)?;
    }
    Ok(())
}
