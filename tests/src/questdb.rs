//! A QuestDB client as the database's users have one, through the database's ingress by its DNS
//! name ([`crate::ingress::Ingress`]): rows written over ILP on HTTP (which acknowledges each
//! batch), read back over pgwire; a client's availability probe; and the fencing sampler, which
//! counts the processes holding each EBS volume's storage open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sqlx::{Connection, Row};

use crate::ingress::Ingress;

/// pgwire's default credentials, as QuestDB ships.
const PG_USER: &str = "admin";
const PG_PASSWORD: &str = "quest";

/// Writes `count` rows `id = from..from+count` into `table` over ILP/HTTP; returns once QuestDB
/// acknowledged them (204): from then on they must survive every lifecycle step.
pub async fn write_rows(db: &Ingress, table: &str, from: u64, count: u64) -> Result<()> {
    let mut body = String::new();
    for id in from..from + count {
        body.push_str(&format!("{table},src=test id={id}i\n"));
    }
    let host = &db.dns_name;
    let resp = db
        .http(reqwest::Method::POST, "/write")
        .body(body)
        .send()
        .await
        .with_context(|| format!("ILP write to {host}"))?;
    let status = resp.status();
    ensure!(
        status.as_u16() == 204,
        "ILP write to {host}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

async fn connect(db: &Ingress) -> Result<sqlx::PgConnection> {
    let addr = db.pgwire();
    let host = &db.dns_name;
    let opts = sqlx::postgres::PgConnectOptions::new()
        .host(&addr.ip().to_string())
        .port(addr.port())
        // The relay carries TLS to the ingress; to sqlx it is a plain server.
        .ssl_mode(sqlx::postgres::PgSslMode::Disable)
        .username(PG_USER)
        .password(PG_PASSWORD)
        .database("qdb");
    tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect_with(&opts))
        .await
        .with_context(|| format!("pgwire connect to {host}: timed out"))?
        .with_context(|| format!("pgwire connect to {host}"))
}

/// The ids in `table`, read over pgwire (simple query protocol), sorted.
pub async fn read_ids(db: &Ingress, table: &str) -> Result<Vec<i64>> {
    let mut conn = connect(db).await?;
    // The table name is the test's own constant.
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SELECT id FROM {table} ORDER BY id")))
        .fetch_all(&mut conn)
        .await
        .with_context(|| format!("reading {table} on {}", db.dns_name))?;
    rows.iter().map(|r| r.try_get::<i64, _>(0).context("id column")).collect()
}

/// One text value, e.g. `SELECT build()`.
pub async fn query_text(db: &Ingress, sql: &'static str) -> Result<String> {
    let mut conn = connect(db).await?;
    let row =
        sqlx::raw_sql(sql).fetch_one(&mut conn).await.with_context(|| format!("{sql} on {}", db.dns_name))?;
    row.try_get::<String, _>(0).with_context(|| format!("{sql}: first column"))
}

/// A statement that returns no rows, e.g. `CHECKPOINT CREATE`.
pub async fn execute(db: &Ingress, sql: &'static str) -> Result<()> {
    let mut conn = connect(db).await?;
    sqlx::raw_sql(sql).execute(&mut conn).await.with_context(|| format!("{sql} on {}", db.dns_name))?;
    Ok(())
}

/// Rows of two LONG columns, e.g. `SELECT id, cast(timestamp AS long) FROM t`.
pub async fn query_pairs(db: &Ingress, sql: &'static str) -> Result<Vec<(i64, i64)>> {
    let mut conn = connect(db).await?;
    let rows =
        sqlx::raw_sql(sql).fetch_all(&mut conn).await.with_context(|| format!("{sql} on {}", db.dns_name))?;
    rows.iter().map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?))).collect()
}

/// Every server setting in effect (`SHOW PARAMETERS`): property path -> value.
pub async fn parameters(db: &Ingress) -> Result<BTreeMap<String, String>> {
    let mut conn = connect(db).await?;
    let rows = sqlx::raw_sql("SHOW PARAMETERS").fetch_all(&mut conn).await.context("SHOW PARAMETERS")?;
    rows.iter()
        .map(|r| {
            let key: String = r.try_get("property_path")?;
            let value: Option<String> = r.try_get("value")?;
            Ok((key, value.unwrap_or_default()))
        })
        .collect()
}

/// Polls until `ids` (every acknowledged row, ascending), and no other, can be read back, or
/// fails with what was missing.
pub async fn expect_rows(
    db: &Ingress,
    table: &str,
    ids: impl IntoIterator<Item = u64>,
    timeout: Duration,
) -> Result<()> {
    let want: Vec<i64> = ids.into_iter().map(|i| i as i64).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = read_ids(db, table).await;
        match &got {
            Ok(got) if got == &want => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                let got = got?;
                let missing = want.iter().filter(|w| !got.contains(w)).count();
                anyhow::bail!(
                    "{table} on {}: {} rows read, {missing} of {} acknowledged rows missing",
                    db.dns_name,
                    got.len(),
                    want.len()
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// A client's view of availability: `SELECT 1` over pgwire every 100 ms through the ingress, by
/// the database's DNS name (a new connection after any failure, the name resolved again then, as
/// a client that does not cache DNS would). Unavailability is the time from the first failed
/// query to the next good one, summed.
pub struct AvailabilityProbe {
    state: Arc<Mutex<ProbeTally>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProbeTally {
    unavailable: Duration,
    down_since: Option<tokio::time::Instant>,
    failures: u64,
}

impl AvailabilityProbe {
    /// `dns_cache`: `None` resolves the name again for every new connection; `Some(ttl)` keeps
    /// an answer for `ttl`, as a caching resolver does with the record's TTL.
    pub fn start(
        aws: qdb_operator::aws::Aws,
        zone: String,
        dns_name: String,
        dns_cache: Option<Duration>,
    ) -> Self {
        let state: Arc<Mutex<ProbeTally>> = Arc::default();
        let tally = state.clone();
        let task = tokio::spawn(async move {
            let mut answer: Option<(Ingress, tokio::time::Instant)> = None;
            let mut conn: Option<sqlx::PgConnection> = None;
            loop {
                let t0 = tokio::time::Instant::now();
                let stale = match (&answer, dns_cache) {
                    (None, _) => true,
                    (Some(_), None) => conn.is_none(),
                    (Some((_, at)), Some(ttl)) => at.elapsed() >= ttl,
                };
                if stale && let Ok(ingress) = Ingress::resolve(&aws, &zone, &dns_name).await {
                    answer = Some((ingress, tokio::time::Instant::now()));
                    conn = None;
                }
                if conn.is_none()
                    && let Some((ingress, _)) = &answer
                {
                    conn = connect(ingress).await.ok();
                }
                let ok = match conn.as_mut() {
                    Some(c) => tokio::time::timeout(
                        Duration::from_secs(1),
                        sqlx::raw_sql("SELECT 1").fetch_one(&mut *c),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok()),
                    None => false,
                };
                if !ok {
                    conn = None;
                }
                {
                    let mut t = tally.lock().expect("probe lock");
                    match (ok, t.down_since) {
                        (false, None) => {
                            t.down_since = Some(t0);
                            t.failures += 1;
                        }
                        (false, Some(_)) => t.failures += 1,
                        (true, Some(since)) => {
                            t.unavailable += since.elapsed();
                            t.down_since = None;
                        }
                        (true, None) => {}
                    }
                }
                tokio::time::sleep_until(t0 + Duration::from_millis(100)).await;
            }
        });
        Self { state, task }
    }

    /// Whether the last query succeeded.
    pub fn is_up(&self) -> bool {
        self.state.lock().expect("probe lock").down_since.is_none()
    }

    /// Unavailability seen since the last call (an outage still under way counts up to now),
    /// and the failed queries.
    pub fn take(&self) -> (Duration, u64) {
        let mut t = self.state.lock().expect("probe lock");
        let mut total = std::mem::take(&mut t.unavailable);
        if let Some(since) = t.down_since {
            total += since.elapsed();
            t.down_since = Some(tokio::time::Instant::now());
        }
        (total, std::mem::take(&mut t.failures))
    }
}

impl Drop for AvailabilityProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts, every 200 ms, the processes that hold files of each EBS volume's storage open; the
/// most ever seen at once per volume is what fencing is judged by (never above 1).
pub struct FencingSampler {
    most: Arc<Mutex<BTreeMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FencingSampler {
    pub fn start(ebs_dir: PathBuf) -> Self {
        let most: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let seen = most.clone();
        let task = tokio::spawn(async move {
            loop {
                let now = tokio::task::spawn_blocking({
                    let dir = ebs_dir.clone();
                    move || holders(&dir)
                })
                .await
                .unwrap_or_default();
                {
                    let mut m = seen.lock().expect("sampler lock");
                    for (volume, pids) in now {
                        let e = m.entry(volume).or_default();
                        *e = (*e).max(pids);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { most, task }
    }

    /// The most processes seen holding each volume at once.
    pub fn most(&self) -> BTreeMap<String, usize> {
        self.most.lock().expect("sampler lock").clone()
    }

    /// Fails if any volume was ever held by more than one process.
    pub fn assert_fenced(&self) -> Result<BTreeMap<String, usize>> {
        let most = self.most();
        let doubled: Vec<_> = most.iter().filter(|(_, n)| **n > 1).collect();
        ensure!(doubled.is_empty(), "volumes held by more than one process at once: {doubled:?}");
        Ok(most)
    }
}

impl Drop for FencingSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Volume id -> number of processes with an open file under `<ebs_dir>/<volume id>/`.
pub fn holders(ebs_dir: &Path) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // The local cloud's EBS layer copies a volume's files with `cp` when CreateSnapshot is
        // accepted (localcloud/aws/ebs_data.py): EBS reading the device for a snapshot, not a
        // second database writing to it.
        if std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim_end() == "cp") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        let mut volumes: Vec<String> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| {
                let rest = target.strip_prefix(ebs_dir).ok()?;
                rest.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned())
            })
            .collect();
        volumes.sort();
        volumes.dedup();
        for v in volumes {
            *out.entry(v).or_default() += 1;
        }
    }
    out
}

/// The size in bytes of the filesystem mounted at `dir`, which must be a mount point of its own
/// (a volume's storage, not a directory of the machine's disk).
pub fn filesystem_bytes(dir: &Path) -> Result<u64> {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=size,target"])
        .arg(dir)
        .output()
        .context("running df")?;
    ensure!(out.status.success(), "df {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1).context("df printed no filesystem")?;
    let (size, target) = line.trim().split_once(' ').context("df's line has no mount point")?;
    ensure!(
        Path::new(target.trim()) == dir,
        "{} is not a filesystem of its own (it is on {}): volumes are directories on this machine",
        dir.display(),
        target.trim()
    );
    size.parse().with_context(|| format!("df size {size:?}"))
}
