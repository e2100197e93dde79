//! Prometheus metrics of the operator (names are what the dashboards query).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrphanLabels {
    pub kind: String,
    /// `deleted` or `reported`.
    pub action: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<StepLabels, Counter>,
    pub step_seconds: Family<StepLabels, Histogram>,
    pub kube_requests: Family<VerbLabels, Counter>,
    /// Reconciles running now (kube-runtime does not expose its scheduler queue itself).
    pub in_flight: Gauge,
    pub leader: Gauge,
    /// From losing the node to Ready again.
    pub failover_seconds: Histogram,
    /// AWS resources whose owner is gone, by kind and what the sweep did.
    pub orphans: Family<OrphanLabels, Counter>,
    /// Orphans the last sweep found, by kind.
    pub orphans_seen: Family<KindLabels, Gauge>,
    /// Failovers held back because their zone had too many NotReady database nodes at once.
    pub failovers_held: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qdb_operator");
        let reconciles = Family::<StepLabels, Counter>::default();
        registry.register("reconciles", "Reconcile steps run, by step and outcome", reconciles.clone());
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register("step_seconds", "Duration of reconcile steps", step_seconds.clone());
        let kube_requests = Family::<VerbLabels, Counter>::default();
        registry.register("kube_requests", "Kubernetes API requests by verb and kind", kube_requests.clone());
        let in_flight = Gauge::default();
        registry.register("reconciles_in_flight", "Reconciles running now", in_flight.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let failover_seconds = Histogram::new(exponential_buckets(5.0, 1.5, 12));
        registry.register(
            "failover_seconds",
            "Time from node loss to the database Ready again",
            failover_seconds.clone(),
        );
        let orphans = Family::<OrphanLabels, Counter>::default();
        registry.register(
            "orphans",
            "AWS resources tagged for this cluster whose owner no longer exists, by kind and action",
            orphans.clone(),
        );
        let orphans_seen = Family::<KindLabels, Gauge>::default();
        registry.register(
            "orphans_seen",
            "Orphaned AWS resources the last sweep found",
            orphans_seen.clone(),
        );
        let failovers_held = Counter::default();
        registry.register(
            "failovers_held",
            "Failover starts held back: too many of the zone's database nodes NotReady at once",
            failovers_held.clone(),
        );
        Metrics {
            registry,
            reconciles,
            step_seconds,
            kube_requests,
            in_flight,
            leader,
            failover_seconds,
            orphans,
            orphans_seen,
            failovers_held,
        }
    }

    pub fn step(&self, step: &str, ok: bool, seconds: f64) {
        let labels = StepLabels { step: step.into(), outcome: if ok { "ok" } else { "error" }.into() };
        self.reconciles.get_or_create(&labels).inc();
        self.step_seconds.get_or_create(&labels).observe(seconds);
    }

    pub fn kube(&self, verb: &str, kind: &str) {
        self.kube_requests.get_or_create(&VerbLabels { verb: verb.into(), kind: kind.into() }).inc();
    }

    pub fn orphan(&self, kind: &str, action: &str) {
        self.orphans.get_or_create(&OrphanLabels { kind: kind.into(), action: action.into() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
