//! The AWS emulator: moto's server wrapped by `localcloud/aws/timed_moto.py`, which gives EC2's
//! state changes their time (QDB_AWS_TIMING). It keeps its state in memory only.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process::{self, Proc, need_port};
use crate::settings::Settings;
use crate::{Cloud, probe};

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
        .env("QDB_AWS_TIMING", &s.aws_timing);
    process::start(cloud, &p, cmd)?;
    process::wait_for(cloud, &p, "AWS emulator", 60, || probe::http(port, "/moto-api/data.json"))
}
