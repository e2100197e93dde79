//! The deployment artefacts: kustomize overlays apply (server-side dry run) to a real apiserver,
//! and docker-compose.yml (which cannot run here) parses and configures the services with
//! settings the binaries actually have.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use qdb_tests::Cloud;
use serde::Deserialize;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin(name: &str) -> Result<PathBuf> {
    let cloud = Cloud::load()?;
    let dir = cloud.vars.get("QDB_BIN_DIR").context("QDB_BIN_DIR in the env file")?;
    Ok(PathBuf::from(dir).join(name))
}

#[test]
fn overlays_build_and_apply_to_the_apiserver() -> Result<()> {
    let cloud = Cloud::load()?;
    let kubeconfig = cloud.cluster("region-a")?.kubeconfig.display().to_string();
    for overlay in ["local", "production"] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/overlays").join(overlay))
            .output()?;
        ensure!(out.status.success(), "{overlay}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The production overlay's namespace, as a platform team makes it before applying.
    let namespace = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "create", "namespace", "questdb-system"])
        .output()?;
    let said = String::from_utf8_lossy(&namespace.stderr);
    ensure!(namespace.status.success() || said.contains("AlreadyExists"), "{said}");
    let mut text = String::new();
    for overlay in ["production", "local"] {
        let out = Command::new("kubectl")
            .args([
                "--kubeconfig",
                &kubeconfig,
                "apply",
                "--server-side",
                "--force-conflicts",
                "--dry-run=server",
                "-k",
            ])
            .arg(repo().join("deploy/overlays").join(overlay))
            .output()?;
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "{overlay}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    // Every setting the production operator is given is one the binary reads.
    let built =
        Command::new("kubectl").arg("kustomize").arg(repo().join("deploy/overlays/production")).output()?;
    let known = env_names("qdb-operator")?;
    let manifests = String::from_utf8_lossy(&built.stdout);
    for doc in serde_yaml::Deserializer::from_str(&manifests) {
        let doc = serde_yaml::Value::deserialize(doc)?;
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for name in env.iter().filter_map(|e| e["name"].as_str()).filter(|n| n.starts_with("QDB_")) {
            ensure!(
                known.iter().any(|k| k == name),
                "production sets {name}, which qdb-operator does not read"
            );
        }
    }
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/questdbs.cloud.questdb.io",
        "deployment.apps/qdb-operator",
        "deployment.apps/qdb-provisioner",
        "clusterrole.rbac.authorization.k8s.io/qdb-operator",
        "networkpolicy.networking.k8s.io/qdb-operator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/questdb-instruction-sequence",
        "poddisruptionbudget.policy/qdb-operator",
        "poddisruptionbudget.policy/qdb-provisioner",
    ] {
        ensure!(text.contains(kind), "{kind} missing from:\n{text}");
    }
    Ok(())
}

/// Every environment variable clap reads, from `--help` (`[env: NAME=]`).
fn env_names(binary: &str) -> Result<Vec<String>> {
    let out = Command::new(bin(binary)?).arg("--help").output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help.split("[env: ").skip(1).filter_map(|s| s.split(['=', ']']).next().map(str::to_string)).collect())
}

#[test]
fn compose_services_use_settings_the_binaries_have() -> Result<()> {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml"))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let services = doc.get("services").and_then(|s| s.as_mapping()).context("services")?;
    for (service, binary, port) in
        [("operator", "qdb-operator", "9465"), ("provisioner", "qdb-provisioner", "9464")]
    {
        let s = services.get(service).with_context(|| format!("service {service}"))?;
        let env: BTreeMap<String, String> =
            serde_yaml::from_value(s.get("environment").cloned().context("environment")?)?;
        let known = env_names(binary)?;
        for key in env
            .keys()
            .filter(|k| k.starts_with("QDB_") || ["KAFKA_BROKERS", "DATABASE_URL"].contains(&k.as_str()))
        {
            ensure!(known.contains(key), "{service}: {key} is not a setting of {binary} ({known:?})");
        }
        ensure!(env.get("QDB_LISTEN").is_some_and(|l| l.ends_with(port)), "{service} listens on {port}");
        let ports = serde_yaml::to_string(s.get("ports").context("ports")?)?;
        ensure!(ports.contains(&format!("{port}:{port}")), "{service} publishes {port}");
        let target = s.get("build").and_then(|b| b.get("target")).and_then(|t| t.as_str());
        ensure!(target == Some(service), "{service} builds its own Dockerfile target");
    }
    let dockerfile = std::fs::read_to_string(repo().join("deploy/docker/Dockerfile"))?;
    for (target, binary) in [("operator", "qdb-operator"), ("provisioner", "qdb-provisioner")] {
        ensure!(dockerfile.contains(&format!("AS {target}")), "Dockerfile target {target}");
        ensure!(
            dockerfile.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
            "{binary} entrypoint"
        );
    }
    ensure!(dockerfile.contains("nonroot"), "runtime image runs as non-root");
    for infra in ["kafka", "postgres", "aws", "k3s"] {
        ensure!(services.contains_key(infra), "service {infra}");
    }
    Ok(())
}

/// Every PromQL expression of a dashboard, with Grafana's variables substituted as Grafana
/// would before sending it (`$__rate_interval` becomes a window, `${datasource}` is not in exprs).
fn expressions(dashboard: &str) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join(dashboard))?)?;
    let mut exprs = Vec::new();
    for panel in json["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            exprs.push(expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m"));
        }
    }
    ensure!(
        exprs.iter().all(|e| !e.contains('$')),
        "{dashboard} has a variable this test does not know: {exprs:?}"
    );
    Ok(exprs)
}

/// Metric names a dashboard queries (without the exposition suffixes).
fn queried(dashboard: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for expr in expressions(dashboard)? {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("qdb_") {
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                names.push(base.to_string());
            }
        }
    }
    ensure!(!names.is_empty(), "{dashboard} queries no metrics");
    Ok(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_a_dashboard_queries_is_exported() -> Result<()> {
    let rig = qdb_tests::rig::Rig::new("deploy-metrics", 1).await?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    op.wait_ready().await?;
    // Families appear once something happened: one database through both tiers.
    let create = qdb_tests::rig::ins::create("db-m", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    for (dashboard, who) in
        [("deploy/dashboards/provisioner.json", &p), ("deploy/dashboards/operator.json", &op.0)]
    {
        let wanted = queried(dashboard)?;
        qdb_tests::eventually(
            &format!("every metric {dashboard} queries"),
            std::time::Duration::from_secs(90),
            || async {
                let metrics = who.metrics().await?;
                let exported: Vec<&str> = metrics
                    .lines()
                    .filter_map(|l| l.strip_prefix("# TYPE "))
                    .filter_map(|l| l.split(' ').next())
                    .collect();
                let missing: Vec<&String> =
                    wanted.iter().filter(|n| !exported.contains(&n.as_str())).collect();
                ensure!(missing.is_empty(), "not exported: {missing:?}");
                Ok(Some(()))
            },
        )
        .await?;
    }

    // The same dashboards against the local cloud's Prometheus, scraping both processes: every
    // query evaluates and returns at least one series.
    let prometheus = rig.cloud.vars.get("QDB_PROMETHEUS").context("QDB_PROMETHEUS")?.clone();
    let targets = [rig.scrape("qdb-provisioner", &p)?, rig.scrape("qdb-operator", &op.0)?];
    let http = reqwest::Client::new();
    for dashboard in ["deploy/dashboards/provisioner.json", "deploy/dashboards/operator.json"] {
        for expr in expressions(dashboard)? {
            qdb_tests::eventually(
                &format!("{dashboard}: {expr}"),
                std::time::Duration::from_secs(90),
                || async {
                    let answer: serde_json::Value = http
                        .get(format!("{prometheus}/api/v1/query"))
                        .query(&[("query", expr.as_str())])
                        .send()
                        .await?
                        .json()
                        .await?;
                    ensure!(answer["status"] == "success", "Prometheus refused the query: {answer}");
                    let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
                    Ok((series > 0).then_some(()))
                },
            )
            .await?;
        }
    }
    for t in targets {
        std::fs::remove_file(t)?;
    }
    Ok(())
}
