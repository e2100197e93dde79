//! `localcloud up/down` on a second, private instance of the local cloud (own ports and run dir,
//! one cluster): bad configuration fails fast and clearly, `down` leaves no process behind, and
//! `up` after `down` works again.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qdb_tests::unique;

const PORT_BASE: u16 = 27000;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../localcloud/localcloud")
}

fn localcloud(run: &Path, envs: &[(&str, &str)], args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .args(args)
        .env("QDB_RUN", run)
        .env("QDB_PORT_BASE", PORT_BASE.to_string())
        .env("QDB_CLUSTERS", "region-a")
        .env_remove("QDB_ENV");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().context("running localcloud")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// PIDs recorded by `up`.
fn recorded_pids(run: &Path) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(run.join("pids"))? {
        let text = std::fs::read_to_string(entry?.path())?;
        pids.push(text.trim().parse()?);
    }
    Ok(pids)
}

/// Processes whose command line mentions the private run dir (data dirs, logs, kubeconfigs).
fn processes_mentioning(run: &Path) -> Vec<String> {
    let needle = run.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let pid = entry.file_name().to_string_lossy().parse::<u32>().unwrap_or(0);
            if cmdline.contains(&needle) && running(pid) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Running and not a zombie (an exited child that its new parent has not reaped yet).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn describe(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    format!("{pid} {}", String::from_utf8_lossy(&cmdline).replace('\0', " "))
}

fn assert_all_stopped(run: &Path, pids: &[u32]) -> Result<()> {
    let alive: Vec<String> = pids.iter().copied().filter(|p| running(*p)).map(describe).collect();
    if !alive.is_empty() {
        bail!("still running after down: {alive:?}");
    }
    let left = processes_mentioning(run);
    if !left.is_empty() {
        bail!("processes left behind: {left:#?}");
    }
    Ok(())
}

#[test]
fn up_down_up_and_fail_fast() -> Result<()> {
    let run = std::env::temp_dir().join(unique("qdb-lifecycle"));
    std::fs::create_dir_all(&run)?;
    let result = scenario(&run);
    // Whatever happened, leave nothing running.
    let _ = localcloud(&run, &[], &["down"]);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&run);
    }
    result
}

fn scenario(run: &Path) -> Result<()> {
    // A taken port: refused at once, naming the port and the component.
    let pg_port = PORT_BASE + 432;
    let blocker = TcpListener::bind(("127.0.0.1", pg_port))?;
    let t0 = Instant::now();
    let out = localcloud(run, &[], &["up"])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("port {pg_port} for PostgreSQL is already in use")),
        "unclear error: {}",
        stderr(&out)
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "took {:?} to fail", t0.elapsed());
    drop(blocker);

    // Missing binaries: refused before anything starts, saying what to install.
    let empty = run.join("empty-cache");
    std::fs::create_dir_all(&empty)?;
    let empty_str = empty.to_string_lossy().into_owned();
    let out = localcloud(run, &[("QDB_CACHE", &empty_str), ("KUBEBUILDER_ASSETS", &empty_str)], &["up"])?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("not installed:") && err.contains("Apache Kafka") && err.contains("kube-apiserver"),
        "{err}"
    );
    assert!(err.contains("run: localcloud install"), "{err}");
    assert!(processes_mentioning(run).is_empty());

    // up, down, up, down: every process goes away each time.
    for round in 1..=2 {
        let out = localcloud(run, &[], &["up"])?;
        assert!(out.status.success(), "up (round {round}) failed: {}", stderr(&out));
        let status = localcloud(run, &[], &["status"])?;
        assert!(status.status.success(), "status after up: {}", String::from_utf8_lossy(&status.stdout));
        let pids = recorded_pids(run)?;
        assert_eq!(pids.len(), 10, "postgres, kafka, moto, prometheus and six cluster processes: {pids:?}");
        let out = localcloud(run, &[], &["down"])?;
        assert!(out.status.success(), "down failed: {}", stderr(&out));
        assert_all_stopped(run, &pids)?;
        let status = localcloud(run, &[], &["status"])?;
        assert!(!status.status.success(), "status must report down");
    }
    Ok(())
}
