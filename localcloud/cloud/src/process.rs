//! The servers as processes: a pid file each under $QDB_RUN/pids, started detached with their
//! output in a log file, and stopped by PID only, so nothing else on the machine is touched.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Aborted, Cloud, log};

/// How often a starting server is probed.
const POLL: Duration = Duration::from_millis(200);

/// One server: the name of its pid file, a pattern its command line must contain for the PID
/// to still count as ours, and its log.
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: String,
    pub pattern: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn new(name: impl Into<String>, pattern: impl Into<String>, log: impl Into<PathBuf>) -> Proc {
        Proc { name: name.into(), pattern: pattern.into(), log: log.into() }
    }
}

pub fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first line of a pid file, as written.
pub fn read_pid(file: &Path) -> Option<String> {
    let text = fs::read_to_string(file).ok()?;
    let pid = text.lines().next()?.trim();
    (!pid.is_empty()).then(|| pid.to_string())
}

/// Running, and not a zombie waiting for whoever inherited it to reap it.
pub fn running(pid: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which may itself hold ") ".
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// The PID of a server that is alive: its pid file names a running process whose command line
/// still names what was started (a PID can be reused).
pub fn alive_pid(cloud: &Cloud, name: &str, pattern: &str) -> Option<String> {
    let pid = read_pid(&cloud.settings.pid_file(name))?;
    if !running(&pid) {
        return None;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    cmdline.contains(pattern).then_some(pid)
}

pub fn alive(cloud: &Cloud, name: &str, pattern: &str) -> bool {
    alive_pid(cloud, name, pattern).is_some()
}

pub fn port_free(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

pub fn need_port(port: u16, what: &str) -> Result<()> {
    if !port_free(port) {
        bail!("port {port} for {what} is already in use (set QDB_PORT_BASE to move every port)");
    }
    Ok(())
}

/// The last `n` lines of a log (of its last 64 KiB: logs grow across runs).
pub fn tail(file: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(file) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// Starts a server in the background with its output appended to its log, and records its PID.
pub fn start(cloud: &Cloud, p: &Proc, mut cmd: Command) -> Result<()> {
    let pid_file = cloud.settings.pid_file(&p.name);
    for dir in [pid_file.parent(), p.log.parent()].into_iter().flatten() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .with_context(|| format!("opening {}", p.log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone().context("duplicating the log's file handle")?)
        .stderr(log_file)
        // Its own process group: a Ctrl-C meant for this command must not reach the servers,
        // which outlive it.
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {} ({:?})", p.name, cmd.get_program()))?;
    fs::write(&pid_file, format!("{}\n", child.id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    cloud.record_started(p);
    // Not waited for: the server outlives this process, and init inherits it.
    drop(child);
    sleep(Duration::from_millis(200));
    if !alive(cloud, &p.name, &p.pattern) {
        eprint!("{}", tail(&p.log, 20));
        bail!("{} exited at once; log: {}", p.name, p.log.display());
    }
    Ok(())
}

/// Polls `probe` until it succeeds; fails at once when the server died (with its log's tail),
/// after `timeout_secs`, or when another component failed.
pub fn wait_for(
    cloud: &Cloud,
    p: &Proc,
    what: &str,
    timeout_secs: u64,
    mut probe: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        if probe() {
            return Ok(());
        }
        if !alive(cloud, &p.name, &p.pattern) {
            eprint!("{}", tail(&p.log, 30));
            bail!("{what} died while starting; log: {}", p.log.display());
        }
        if Instant::now() >= deadline {
            bail!("{what} not healthy after {timeout_secs}s; log: {}", p.log.display());
        }
        if cloud.failed() {
            return Err(Aborted.into());
        }
        sleep(POLL);
    }
}

fn signal(pid: &str, sig: &str) {
    // std cannot send a signal to a process it did not spawn; kill(1) can. A process that is
    // already gone is what we wanted.
    let _ = Command::new("kill").args([sig, pid]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// SIGTERM, up to 10 s to exit, then SIGKILL; only a PID that is still ours.
pub fn stop(cloud: &Cloud, name: &str, pattern: &str) -> Result<()> {
    let pid_file = cloud.settings.pid_file(name);
    if let Some(pid) = alive_pid(cloud, name, pattern) {
        signal(&pid, "-TERM");
        for _ in 0..100 {
            if !running(&pid) {
                break;
            }
            sleep(Duration::from_millis(100));
        }
        if running(&pid) {
            log(format!("{name} (pid {pid}) ignored SIGTERM for 10s; killing"));
            signal(&pid, "-KILL");
        }
    }
    remove_file(&pid_file)
}

/// `rm -f`.
pub fn remove_file(file: &Path) -> Result<()> {
    match fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", file.display()))
        }
        _ => Ok(()),
    }
}

/// Runs a tool to completion and keeps its output.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("running {:?}", cmd.get_program()))
}

/// Runs a tool whose output nobody reads; fails with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_gone_one_does_not() {
        assert!(running(&std::process::id().to_string()));
        assert!(!running("999999999"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("localcloud-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("log");
        fs::write(&f, "a\nb\nc\nd\n").expect("write");
        assert_eq!(tail(&f, 2), "c\nd\n");
        assert_eq!(tail(&dir.join("missing"), 2), "");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
