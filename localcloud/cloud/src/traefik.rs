//! Traefik per cluster, as the seed runs it: it reads the operator's IngressRoute /
//! IngressRouteTCP objects from the cluster (kubernetescrd provider, every namespace), with the
//! entry points those name. Its API, ping and metrics are on the cluster's fourth Traefik port.

use std::process::Command;

use anyhow::{Result, bail};

use crate::process::{self, Proc, need_port};
use crate::settings::{Cluster, Settings};
use crate::tokens::token;
use crate::{Cloud, cluster, probe};

/// The pattern is the binary's full path: `traefik` alone would match any path under its cache.
pub fn proc(s: &Settings, c: &Cluster) -> Proc {
    Proc::new(
        format!("{}-traefik", c.name),
        s.traefik().display().to_string(),
        s.cluster_dir(c).join("traefik.log"),
    )
}

pub fn start(cloud: &Cloud, c: &Cluster) -> Result<()> {
    let s = &cloud.settings;
    let traefik = s.traefik();
    if !process::executable(&traefik) {
        bail!("Traefik not found at {}; run: localcloud install", s.tools.traefik_home.display());
    }
    let p = proc(s, c);
    if process::alive(cloud, &p.name, &p.pattern) {
        return Ok(());
    }
    let ports = &s.ports;
    let api = ports.traefik_api(c);
    for port in [ports.traefik_websecure(c), ports.traefik_pgwire(c), ports.traefik_ilp(c), api] {
        need_port(port, &format!("{} Traefik", c.name))?;
    }
    let mut cmd = Command::new(&traefik);
    // Unset: Traefik would prefer an in-cluster or KUBECONFIG client over the flags.
    cmd.env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("KUBECONFIG")
        .arg(format!("--entrypoints.websecure.address=127.0.0.1:{}", ports.traefik_websecure(c)))
        .arg(format!("--entrypoints.pgwire.address=127.0.0.1:{}", ports.traefik_pgwire(c)))
        .arg(format!("--entrypoints.ilp.address=127.0.0.1:{}", ports.traefik_ilp(c)))
        .arg(format!("--entrypoints.traefik.address=127.0.0.1:{api}"))
        .args(["--api.insecure=true", "--api.dashboard=false", "--ping=true"])
        .args(["--metrics.prometheus=true", "--metrics.prometheus.entrypoint=traefik"])
        .arg("--providers.kubernetescrd=true")
        .arg(format!("--providers.kubernetescrd.endpoint={}", cluster::server(s, c)))
        .arg(format!("--providers.kubernetescrd.token={}", token(cloud, "traefik")?))
        .arg(format!("--providers.kubernetescrd.certauthfilepath={}", cluster::ca_file(s, c).display()))
        .arg("--providers.kubernetescrd.allowemptyservices=true")
        .args(["--global.checknewversion=false", "--global.sendanonymoususage=false", "--log.level=INFO"]);
    process::start(cloud, &p, cmd)?;
    process::wait_for(cloud, &p, &format!("{} Traefik", c.name), 60, || probe::http(api, "/ping"))
}
