//! Prometheus (Debian's, run by hand): it scrapes what registers itself, a JSON target file per
//! process in targets/ (file_sd), written by the main job and the tests for the tiers they start,
//! and one per Traefik written here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::process::{self, Proc, need_port};
use crate::settings::Settings;
use crate::{Cloud, probe};

pub const NAME: &str = "prometheus";
pub const PATTERN: &str = "prometheus";

fn dir(s: &Settings) -> PathBuf {
    s.run.join("prometheus")
}

pub fn targets_dir(s: &Settings) -> PathBuf {
    dir(s).join("targets")
}

pub fn proc(s: &Settings) -> Proc {
    Proc::new(NAME, PATTERN, dir(s).join("prometheus.log"))
}

/// A file_sd target file: one address with its labels.
pub fn target_file(address: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("\"{k}\": \"{v}\"")).collect();
    format!("[{{\"targets\": [\"{address}\"], \"labels\": {{{}}}}}]\n", labels.join(", "))
}

pub fn render_config(dir: &Path) -> String {
    format!(
        "\
# written by localcloud up
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: localcloud
    file_sd_configs:
      - files: [\"{}/targets/*.json\"]
        refresh_interval: 2s
",
        dir.display()
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn start(cloud: &Cloud) -> Result<()> {
    let s = &cloud.settings;
    if process::alive(cloud, NAME, PATTERN) {
        return Ok(());
    }
    let port = s.ports.prometheus();
    need_port(port, "Prometheus")?;
    let d = dir(s);
    let targets = targets_dir(s);
    for sub in [&targets, &d.join("data")] {
        fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
    }
    for c in &s.clusters {
        let address = format!("127.0.0.1:{}", s.ports.traefik_api(c));
        write(
            &targets.join(format!("{}-traefik.json", c.name)),
            &target_file(&address, &[("job", "traefik"), ("cluster", &c.name)]),
        )?;
    }
    let config = d.join("prometheus.yml");
    write(&config, &render_config(&d))?;
    let p = proc(s);
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--storage.tsdb.retention.time=1d");
    process::start(cloud, &p, cmd)?;
    process::wait_for(cloud, &p, "Prometheus", 60, || probe::http(port, "/-/ready"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_files_as_the_script_wrote_them() {
        assert_eq!(
            target_file("127.0.0.1:18023", &[("job", "traefik"), ("cluster", "region-a")]),
            "[{\"targets\": [\"127.0.0.1:18023\"], \"labels\": {\"job\": \"traefik\", \"cluster\": \"region-a\"}}]\n"
        );
        assert_eq!(
            target_file("127.0.0.1:17010", &[("job", "qdb-provisioner")]),
            "[{\"targets\": [\"127.0.0.1:17010\"], \"labels\": {\"job\": \"qdb-provisioner\"}}]\n"
        );
    }

    #[test]
    fn config_reads_every_target_file() {
        let text = render_config(Path::new("/r/prometheus"));
        assert!(text.contains("      - files: [\"/r/prometheus/targets/*.json\"]\n"));
        assert!(text.starts_with("# written by localcloud up\nglobal:\n  scrape_interval: 2s\n"));
    }
}
