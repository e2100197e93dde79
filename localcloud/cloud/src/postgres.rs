//! PostgreSQL: a private instance of Debian's server (own data dir, own port, run as `postgres`
//! when we are root), started and stopped by pg_ctl, with the `qdb` database.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::process::{self, need_port, remove_file, tail};
use crate::settings::Settings;
use crate::{Cloud, log};

pub const NAME: &str = "postgres";
pub const PATTERN: &str = "postgres";

/// The `qdb` database, as the env file and the main job's provisioner name it.
pub fn url(s: &Settings) -> String {
    format!("postgres://postgres@127.0.0.1:{}/qdb", s.ports.postgres())
}

fn dir(cloud: &Cloud) -> PathBuf {
    cloud.settings.run.join("postgres")
}

fn data(cloud: &Cloud) -> PathBuf {
    dir(cloud).join("data")
}

fn bin(cloud: &Cloud) -> Result<&Path> {
    cloud.settings.tools.pg_bin.as_deref().context("PostgreSQL is not installed; run: localcloud install")
}

/// PostgreSQL refuses to run as root; its own system user owns the private instance.
fn as_pg(cloud: &Cloud, program: &Path) -> Command {
    if cloud.settings.as_root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

pub fn start(cloud: &Cloud) -> Result<()> {
    let bin = bin(cloud)?;
    if process::alive(cloud, NAME, PATTERN) {
        return Ok(());
    }
    let port = cloud.settings.ports.postgres();
    need_port(port, "PostgreSQL")?;
    let dir = dir(cloud);
    let data = data(cloud);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if cloud.settings.as_root {
        process::run(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
    }
    if !data.join("PG_VERSION").is_file() {
        let log_path = dir.join("initdb.log");
        let log_file = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let ok = as_pg(cloud, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("initdb failed; see {}", log_path.display());
        }
    }
    let log_path = dir.join("postgres.log");
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200 -c fsync=off",
        dir.display()
    );
    let ok = as_pg(cloud, &bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log_path)
        .args(["-w", "-t", "60", "-o", &options, "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprint!("{}", tail(&log_path, 20));
        bail!("PostgreSQL did not start");
    }
    let pid_file = cloud.settings.pid_file(NAME);
    if let Some(pids) = pid_file.parent() {
        fs::create_dir_all(pids).with_context(|| format!("creating {}", pids.display()))?;
    }
    let pid = process::read_pid(&data.join("postmaster.pid")).context("no PID in postmaster.pid")?;
    fs::write(&pid_file, format!("{pid}\n")).with_context(|| format!("writing {}", pid_file.display()))?;
    cloud.record_started(&process::Proc::new(NAME, PATTERN, log_path));
    create_database(port)
}

fn psql(port: u16) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]);
    cmd
}

fn create_database(port: u16) -> Result<()> {
    let out = process::output(psql(port).args(["-tAc", "SELECT 1 FROM pg_database WHERE datname='qdb'"]))?;
    if String::from_utf8_lossy(&out.stdout).contains('1') {
        return Ok(());
    }
    process::run(psql(port).args(["-qc", "CREATE DATABASE qdb"])).context("creating the database qdb")
}

pub fn stop(cloud: &Cloud) -> Result<()> {
    if process::alive(cloud, NAME, PATTERN) {
        let stopped = match bin(cloud) {
            Ok(bin) => as_pg(cloud, &bin.join("pg_ctl"))
                .arg("-D")
                .arg(data(cloud))
                .args(["-m", "fast", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            Err(e) => {
                log(format!("{e:#}; stopping PostgreSQL by its PID"));
                false
            }
        };
        if !stopped {
            process::stop(cloud, NAME, PATTERN)?;
        }
    }
    remove_file(&cloud.settings.pid_file(NAME))
}
