//! What `/healthz` and `/readyz` answer, decided by pure functions over what the election and the
//! controller's watch streams report.
//!
//! - Ready: the leader while its lease is confirmed, and a standby that can read the lease (it
//!   could take over at once). A standby counts as ready so that a rolling update (a new pod is
//!   always a standby at first) and the PodDisruptionBudget (`minAvailable: 1`) see two healthy
//!   replicas; which one leads is the Lease's business (and the `qdb_operator_leader` metric's).
//! - Healthy (liveness): the lease was read or written within the grace period, and no watch
//!   stream of the controller has been failing for longer than that. A frozen or unreachable
//!   apiserver turns both off; a restart then starts clean.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::leader::{Role, Standing, Timing};

/// The controller's watch streams, each failing or not.
#[derive(Debug, Default)]
pub struct Watches {
    streams: Mutex<BTreeMap<&'static str, StreamState>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// Since when every item of the stream has been an error (none since its last good item).
    pub failing_since: Option<Instant>,
    pub last_error: Option<String>,
}

impl Watches {
    /// A stream that produced nothing yet counts as alive: an idle watch yields nothing.
    pub fn register(&self, name: &'static str) {
        if let Ok(mut s) = self.streams.lock() {
            s.entry(name).or_default();
        }
    }

    /// One item of stream `name`: an error, or a good event.
    pub fn record(&self, name: &'static str, error: Option<&dyn std::fmt::Display>) {
        let Ok(mut s) = self.streams.lock() else { return };
        let state = s.entry(name).or_default();
        match error {
            Some(e) => {
                state.failing_since.get_or_insert_with(Instant::now);
                state.last_error = Some(e.to_string());
            }
            None => *state = StreamState::default(),
        }
    }

    pub fn snapshot(&self) -> Vec<(&'static str, StreamState)> {
        self.streams.lock().map(|s| s.iter().map(|(k, v)| (*k, v.clone())).collect()).unwrap_or_default()
    }
}

/// `/readyz`: Ok with the role, or why not.
pub fn readiness(
    role: Role,
    standing: Standing,
    lease_seen: Option<Instant>,
    now: Instant,
    timing: &Timing,
) -> Result<&'static str, String> {
    match role {
        Role::Leader => match standing {
            Standing::Leading { .. } => Ok("leader"),
            Standing::Lapsed => Err("leader whose lease is not confirmed: stopping".into()),
        },
        Role::Standby => match lease_seen {
            Some(seen) if now.saturating_duration_since(seen) < timing.lease => Ok("standby"),
            _ => Err(format!("standby that has not read the lease for {}s", since(lease_seen, now))),
        },
        Role::Starting => Err("starting: the lease was not read yet".into()),
        Role::Stopping => Err("stopping: the leader lease was lost".into()),
    }
}

/// `/healthz`: Ok, or what is wrong. `started` stands in for the first lease read.
pub fn liveness(
    role: Role,
    lease_seen: Option<Instant>,
    started: Instant,
    watches: &[(&'static str, StreamState)],
    now: Instant,
    grace: Duration,
) -> Result<(), String> {
    if role == Role::Stopping {
        return Err("stopping: the leader lease was lost".into());
    }
    let seen = lease_seen.unwrap_or(started);
    if now.saturating_duration_since(seen) > grace {
        return Err(format!("the leader lease has not been read for {}s", since(Some(seen), now)));
    }
    let failing: Vec<String> = watches
        .iter()
        .filter_map(|(name, s)| {
            let since_when = s.failing_since?;
            (now.saturating_duration_since(since_when) > grace).then(|| {
                format!(
                    "watch {name} failing for {}s: {}",
                    since(Some(since_when), now),
                    s.last_error.as_deref().unwrap_or("error")
                )
            })
        })
        .collect();
    if failing.is_empty() { Ok(()) } else { Err(failing.join("; ")) }
}

fn since(t: Option<Instant>, now: Instant) -> u64 {
    t.map_or(0, |t| now.saturating_duration_since(t).as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_leader_is_ready_while_its_lease_is_confirmed_and_a_standby_while_it_reads_the_lease() {
        let t = Timing::new(secs(15), None, None).expect("valid");
        let now = Instant::now();
        let leading = Standing::Leading { until: now + secs(5) };
        assert_eq!(readiness(Role::Leader, leading, Some(now), now, &t), Ok("leader"));
        assert!(readiness(Role::Leader, Standing::Lapsed, Some(now), now, &t).is_err());
        assert_eq!(readiness(Role::Standby, Standing::Lapsed, Some(now), now + secs(14), &t), Ok("standby"));
        assert!(readiness(Role::Standby, Standing::Lapsed, Some(now), now + secs(15), &t).is_err());
        assert!(readiness(Role::Standby, Standing::Lapsed, None, now, &t).is_err());
        assert!(readiness(Role::Starting, Standing::Lapsed, None, now, &t).is_err());
        assert!(readiness(Role::Stopping, leading, Some(now), now, &t).is_err());
    }

    #[test]
    fn unhealthy_once_the_lease_or_a_watch_has_failed_for_longer_than_the_grace() {
        let now = Instant::now();
        let grace = secs(30);
        let ok = StreamState::default();
        let failing = |ago: u64| StreamState {
            failing_since: Some(now - secs(ago)),
            last_error: Some("connection refused".into()),
        };
        assert_eq!(liveness(Role::Leader, Some(now), now, &[("questdb", ok.clone())], now, grace), Ok(()));
        assert_eq!(liveness(Role::Leader, Some(now), now, &[("questdb", failing(10))], now, grace), Ok(()));
        let e = liveness(Role::Leader, Some(now), now, &[("questdb", ok), ("pods", failing(31))], now, grace);
        assert!(e.as_ref().is_err_and(|e| e.contains("pods") && e.contains("connection refused")), "{e:?}");
        // A standby that cannot read the lease, and one that never could since it started.
        assert!(liveness(Role::Standby, Some(now - secs(31)), now, &[], now, grace).is_err());
        assert_eq!(liveness(Role::Starting, None, now - secs(29), &[], now, grace), Ok(()));
        assert!(liveness(Role::Starting, None, now - secs(31), &[], now, grace).is_err());
        assert!(liveness(Role::Stopping, Some(now), now, &[], now, grace).is_err());
    }

    #[test]
    fn a_good_item_ends_a_streams_failure() {
        let w = Watches::default();
        w.register("questdb");
        assert_eq!(w.snapshot(), vec![("questdb", StreamState::default())]);
        w.record("questdb", Some(&"refused"));
        let first = w.snapshot()[0].1.failing_since;
        assert!(first.is_some());
        w.record("questdb", Some(&"refused again"));
        assert_eq!(w.snapshot()[0].1.failing_since, first, "failing since the first error");
        w.record("questdb", None);
        assert_eq!(w.snapshot()[0].1, StreamState::default());
    }
}
