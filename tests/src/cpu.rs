//! Where the machine's CPU went during a benchmark: CPU seconds of each local-cloud server (its
//! whole process tree, e.g. every PostgreSQL backend) and of processes the benchmark started, read
//! from /proc. The servers share two cores, so a ratio between two runs is only as fair as the CPU
//! the server under test got in each.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux for x86 and arm).
const TICKS: f64 = 100.0;

/// (parent pid, own + reaped children's CPU ticks) of a process, from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks: u64 = f.get(11..15)?.iter().filter_map(|v| v.parse::<u64>().ok()).sum();
    Some((ppid, ticks))
}

/// `root` and every live descendant, from a snapshot of `all_processes`.
fn tree(root: u32, procs: &BTreeMap<u32, (u32, u64)>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        out.push(pid);
        stack.extend(procs.iter().filter(|(_, (pp, _))| *pp == pid).map(|(p, _)| *p));
    }
    out
}

/// CPU ticks of `root` and every live descendant.
fn tree_ticks(root: u32, procs: &BTreeMap<u32, (u32, u64)>) -> u64 {
    tree(root, procs).iter().map(|pid| procs.get(pid).map_or(0, |(_, t)| *t)).sum()
}

fn all_processes() -> BTreeMap<u32, (u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return BTreeMap::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).map(|s| (pid, s)))
        .collect()
}

/// Pins every thread of `root` and of each of its live descendants to `cpus` (a CPU list as
/// `taskset` reads it: "0", "1", "0-1"). Processes they start later inherit it. Threads exist
/// and die at any time, so a thread gone before `taskset` reached it is not an error; a tree
/// whose root cannot be pinned is.
pub fn pin_tree(root: u32, cpus: &str) -> std::io::Result<()> {
    for pid in tree(root, &all_processes()) {
        let status = std::process::Command::new("taskset")
            .args(["--all-tasks", "--pid", "--cpu-list", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        if pid == root && !status.success() {
            return Err(std::io::Error::other(format!("taskset could not pin pid {pid} to CPUs {cpus}")));
        }
    }
    Ok(())
}

/// Process trees pinned by `pin`, given every CPU back when dropped (a benchmark that fails
/// half-way leaves no server confined).
#[derive(Default)]
pub struct Pinned {
    roots: Vec<u32>,
}

impl Pinned {
    pub fn pin(&mut self, root: u32, cpus: &str) -> std::io::Result<()> {
        pin_tree(root, cpus)?;
        self.roots.push(root);
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let all = format!("0-{}", std::thread::available_parallelism().map_or(1, |n| n.get()) - 1);
        for root in &self.roots {
            let _ = pin_tree(*root, &all);
        }
    }
}

/// The CPUs `pid`'s main thread may run on, as the kernel reports them (`Cpus_allowed_list`).
pub fn allowed_cpus(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_string())
}

/// The local cloud's servers by name (`kafka`, `postgres`, `region-a-apiserver`, ...), from the
/// pid files `localcloud up` wrote under `$QDB_RUN/pids`.
pub fn servers(run: &Path) -> Vec<(String, u32)> {
    let Ok(dir) = std::fs::read_dir(run.join("pids")) else { return Vec::new() };
    let mut out: Vec<(String, u32)> = dir
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".pid")?.to_string();
            let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect();
    out.sort();
    out
}

/// A snapshot of CPU seconds per named process tree; `since` gives what each used in between.
pub struct CpuMeter {
    names: Vec<(String, u32)>,
    start: BTreeMap<String, u64>,
    at: Instant,
}

/// CPU used per process over an interval.
pub struct CpuUse {
    pub wall_secs: f64,
    /// (name, CPU seconds), largest first.
    pub by_process: Vec<(String, f64)>,
}

impl CpuMeter {
    pub fn start(names: Vec<(String, u32)>) -> Self {
        let procs = all_processes();
        let start = names.iter().map(|(n, pid)| (n.clone(), tree_ticks(*pid, &procs))).collect();
        CpuMeter { names, start, at: Instant::now() }
    }

    pub fn since(&self) -> CpuUse {
        let procs = all_processes();
        let mut by_process: Vec<(String, f64)> = self
            .names
            .iter()
            .map(|(n, pid)| {
                let used = tree_ticks(*pid, &procs).saturating_sub(self.start.get(n).copied().unwrap_or(0));
                (n.clone(), used as f64 / TICKS)
            })
            .collect();
        by_process.sort_by(|a, b| b.1.total_cmp(&a.1));
        CpuUse { wall_secs: self.at.elapsed().as_secs_f64(), by_process }
    }
}

impl CpuUse {
    /// CPU seconds of processes whose name contains `part`.
    pub fn of(&self, part: &str) -> f64 {
        self.by_process.iter().filter(|(n, _)| n.contains(part)).map(|(_, s)| s).sum()
    }

    /// One line: cores used in total, then each process that used at least 1 % of a core.
    pub fn line(&self) -> String {
        let total: f64 = self.by_process.iter().map(|(_, s)| s).sum();
        let wall = self.wall_secs.max(1e-9);
        let parts: Vec<String> = self
            .by_process
            .iter()
            .filter(|(_, s)| s / wall >= 0.01)
            .map(|(n, s)| format!("{n} {:.2}", s / wall))
            .collect();
        format!("{:.2} cores in {:.1} s: {}", total / wall, self.wall_secs, parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_child_is_counted_in_its_parents_tree() {
        let me = std::process::id();
        let meter = CpuMeter::start(vec![("me".into(), me)]);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        child.wait().unwrap();
        let used = meter.since();
        assert!(used.of("me") > 0.05, "{}", used.line());
        assert!(used.line().contains("me "), "{}", used.line());
    }

    #[test]
    fn a_pinned_tree_runs_only_on_its_cpu_children_included() {
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        pin_tree(child.id(), "0").unwrap();
        let procs = all_processes();
        let grandchild = procs.iter().find(|(_, (pp, _))| *pp == child.id()).map(|(p, _)| *p).unwrap();
        let (own, inherited) = (allowed_cpus(child.id()), allowed_cpus(grandchild));
        std::process::Command::new("kill").arg(grandchild.to_string()).status().unwrap();
        child.wait().unwrap();
        assert_eq!(own.as_deref(), Some("0"));
        assert_eq!(inherited.as_deref(), Some("0"));
    }
}
