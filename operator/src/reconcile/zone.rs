//! No mass failover on a blip. A node that stops answering is usually a lost machine; most of a
//! zone's database nodes going NotReady at once is usually the network, and force-stopping every
//! database of the zone would turn a blip into an outage. As kube-controller-manager limits
//! evictions (`--unhealthy-zone-threshold`, `--secondary-node-eviction-rate`), a zone with more
//! than a share of its database nodes NotReady is unhealthy, and failovers in it start at a
//! bounded rate (none, if the rate is zero). A database held back keeps its old node: if that
//! node comes back, it simply serves again. Once the zone looks healthy again, failovers in it
//! wait [`RECOVERY`] more, while the rest of its nodes report Ready.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The limits (`--unhealthy-zone-*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZoneLimits {
    /// A zone is unhealthy when more than this share of its database nodes is NotReady...
    pub threshold: f64,
    /// ...and at least this many are (a zone of two cannot tell a blip from a loss by share).
    pub min_not_ready: usize,
    /// Failovers that may start per interval in an unhealthy zone (0: none).
    pub failovers: usize,
    pub interval: Duration,
}

impl Default for ZoneLimits {
    fn default() -> Self {
        // kube-controller-manager's defaults: 0.55, a minimum of 3, 0.01 evictions per second.
        ZoneLimits { threshold: 0.55, min_not_ready: 3, failovers: 1, interval: Duration::from_secs(100) }
    }
}

/// The database nodes of one zone (of the databases this operator manages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneHealth {
    pub nodes: usize,
    pub not_ready: usize,
}

impl ZoneHealth {
    pub fn is_unhealthy(self, limits: &ZoneLimits) -> bool {
        self.not_ready >= limits.min_not_ready.max(1)
            && self.not_ready as f64 > limits.threshold * self.nodes as f64
    }
}

/// How long a zone that was unhealthy holds its failovers once it looks healthy again. Its nodes
/// do not come back at one instant: each kubelet reports Ready at its next status update (every
/// 10 s by default; the local simulator's heartbeat is 5 s). Once the first few are back the zone
/// looks healthy while the rest are still NotReady, and failing those over would turn the end of
/// a blip into the outage the hold was there to prevent.
pub const RECOVERY: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Proceed,
    /// Not now: the zone is unhealthy and its failovers for this interval have started.
    Hold {
        health: ZoneHealth,
        started: usize,
    },
    /// Not yet: the zone was unhealthy `ago`, and its nodes may still be coming back.
    Recovering {
        ago: Duration,
    },
}

/// Whether one more failover may start in a zone that looks like `health`, where `started`
/// failovers began within the last interval and a failover was last held `since_held` ago.
pub fn gate(health: ZoneHealth, started: usize, since_held: Option<Duration>, limits: &ZoneLimits) -> Gate {
    if health.is_unhealthy(limits) {
        return if started < limits.failovers { Gate::Proceed } else { Gate::Hold { health, started } };
    }
    match since_held {
        Some(ago) if ago < RECOVERY => Gate::Recovering { ago },
        _ => Gate::Proceed,
    }
}

/// Why a failover waits for a zone that was just unhealthy.
pub fn recovering_message(zone: &str, ago: Duration) -> String {
    format!(
        "zone {zone} was unhealthy {}s ago and its nodes are still coming back: failovers wait {}s \
         more for the old node",
        ago.as_secs(),
        RECOVERY.saturating_sub(ago).as_secs().max(1),
    )
}

/// Why a failover is held, for the condition and the event.
pub fn hold_message(zone: &str, health: ZoneHealth, started: usize, limits: &ZoneLimits) -> String {
    format!(
        "{} of {} database nodes in zone {zone} are NotReady (more than {:.0}%): a zone-wide problem \
         is likelier than lost machines, so at most {} failover(s) start per {}s ({started} started); \
         waiting on the old node",
        health.not_ready,
        health.nodes,
        limits.threshold * 100.0,
        limits.failovers,
        limits.interval.as_secs(),
    )
}

/// When failovers started, per zone, within the last interval, and when one was last held.
#[derive(Debug, Default)]
pub struct Starts {
    started: HashMap<String, VecDeque<Instant>>,
    held: HashMap<String, Instant>,
}

impl Starts {
    /// Failovers started in `zone` within `interval` of `now`.
    pub fn recent(&mut self, zone: &str, now: Instant, interval: Duration) -> usize {
        let q = self.started.entry(zone.to_string()).or_default();
        while q.front().is_some_and(|t| now.saturating_duration_since(*t) >= interval) {
            q.pop_front();
        }
        q.len()
    }

    pub fn record(&mut self, zone: &str, now: Instant) {
        self.started.entry(zone.to_string()).or_default().push_back(now);
    }

    pub fn held(&mut self, zone: &str, now: Instant) {
        self.held.insert(zone.to_string(), now);
    }

    pub fn since_held(&self, zone: &str, now: Instant) -> Option<Duration> {
        self.held.get(zone).map(|at| now.saturating_duration_since(*at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ZoneLimits {
        ZoneLimits { threshold: 0.55, min_not_ready: 3, failovers: 1, interval: Duration::from_secs(100) }
    }

    fn zone(nodes: usize, not_ready: usize) -> ZoneHealth {
        ZoneHealth { nodes, not_ready }
    }

    #[test]
    fn a_healthy_zone_fails_over_every_lost_node() {
        assert_eq!(gate(zone(10, 1), 5, None, &limits()), Gate::Proceed, "one lost machine among ten");
        assert_eq!(gate(zone(10, 5), 5, None, &limits()), Gate::Proceed, "half is not more than 55%");
        assert_eq!(gate(zone(2, 2), 5, None, &limits()), Gate::Proceed, "fewer than the minimum of 3");
    }

    #[test]
    fn an_unhealthy_zone_fails_over_at_the_bounded_rate() {
        assert_eq!(gate(zone(5, 3), 0, None, &limits()), Gate::Proceed, "the first of the interval");
        assert_eq!(gate(zone(5, 3), 1, None, &limits()), Gate::Hold { health: zone(5, 3), started: 1 });
        assert_eq!(gate(zone(5, 5), 1, None, &limits()), Gate::Hold { health: zone(5, 5), started: 1 });
        let none = ZoneLimits { failovers: 0, ..limits() };
        assert!(matches!(gate(zone(5, 3), 0, None, &none), Gate::Hold { .. }), "rate 0: not at all");
        let lower = ZoneLimits { threshold: 0.3, min_not_ready: 2, ..limits() };
        assert!(matches!(gate(zone(5, 2), 1, None, &lower), Gate::Hold { .. }));
        assert!(matches!(gate(zone(5, 1), 1, None, &lower), Gate::Proceed));
    }

    #[test]
    fn a_zone_coming_back_holds_its_failovers_while_its_nodes_report_ready() {
        let lower = ZoneLimits { threshold: 0.3, min_not_ready: 2, ..limits() };
        // Three of five were NotReady and two held; one node is back: healthy by share, but the
        // other held node may be a heartbeat away from Ready too.
        let ago = Duration::from_secs(3);
        assert_eq!(gate(zone(5, 1), 1, Some(ago), &lower), Gate::Recovering { ago });
        assert_eq!(gate(zone(5, 1), 1, Some(RECOVERY), &lower), Gate::Proceed, "still lost: a lost machine");
        // Still unhealthy: the rate limit decides, recent holds or not.
        assert_eq!(gate(zone(5, 3), 0, Some(ago), &lower), Gate::Proceed, "the next interval's one");
        let t0 = Instant::now();
        let mut s = Starts::default();
        assert_eq!(s.since_held("a", t0), None);
        s.held("a", t0);
        assert_eq!(s.since_held("a", t0 + ago), Some(ago));
        assert_eq!(s.since_held("b", t0 + ago), None);
    }

    #[test]
    fn starts_are_counted_per_zone_within_the_interval() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(100);
        let mut s = Starts::default();
        s.record("a", t0);
        s.record("a", t0 + Duration::from_secs(50));
        s.record("b", t0);
        assert_eq!(s.recent("a", t0 + Duration::from_secs(60), interval), 2);
        assert_eq!(s.recent("a", t0 + Duration::from_secs(100), interval), 1, "the first one aged out");
        assert_eq!(s.recent("b", t0 + Duration::from_secs(99), interval), 1);
        assert_eq!(s.recent("c", t0, interval), 0);
    }
}
