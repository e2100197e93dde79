//! Prometheus metrics of the provisioner (names are what the dashboards query).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeLabels {
    pub cluster: String,
    pub verb: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

pub struct Metrics {
    pub registry: Registry,
    /// Instructions by what happened to them: accepted, duplicate, superseded, rejected (intake);
    /// applied, retried, succeeded, failed (later).
    pub instructions: Family<OutcomeLabels, Counter>,
    /// From journaled to applied on the cluster.
    pub apply_seconds: Histogram,
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    pub journal_backlog: Family<StateLabels, Gauge>,
    pub outbox_backlog: Gauge,
    pub outbox_lag_seconds: Gauge<f64, AtomicU64>,
    pub published: Family<OutcomeLabels, Counter>,
    pub kube_requests: Family<KubeLabels, Counter>,
    /// Writes a cluster refused though the provisioner validated them: its own bugs.
    pub spec_refused: Family<ClusterLabels, Counter>,
    /// Outbox messages that can never be published, set aside (table outbox_parked).
    pub outbox_parked: Family<ParkedLabels, Counter>,
    /// Instructions in the journal, open and finished.
    pub journal_rows: Gauge,
    /// Finished instructions deleted after the retention.
    pub journal_pruned: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParkedLabels {
    pub topic: String,
    pub reason: String,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qdb_provisioner");
        let instructions = Family::<OutcomeLabels, Counter>::default();
        registry.register("instructions", "Instructions by outcome", instructions.clone());
        let apply_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "apply_seconds",
            "Time from journaled to applied on the cluster",
            apply_seconds.clone(),
        );
        let consumer_lag = Family::<PartitionLabels, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages behind the partition end, per assigned partition",
            consumer_lag.clone(),
        );
        let journal_backlog = Family::<StateLabels, Gauge>::default();
        registry.register(
            "journal_backlog",
            "Open instructions in the journal by state",
            journal_backlog.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "outbox_backlog",
            "Messages in the outbox not yet published",
            outbox_backlog.clone(),
        );
        let outbox_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "outbox_lag_seconds",
            "Age of the oldest unpublished outbox message",
            outbox_lag_seconds.clone(),
        );
        let published = Family::<OutcomeLabels, Counter>::default();
        registry.register("published", "Outbox messages published, by topic role", published.clone());
        let kube_requests = Family::<KubeLabels, Counter>::default();
        registry.register(
            "kube_requests",
            "Kubernetes API requests by cluster, verb and outcome",
            kube_requests.clone(),
        );
        let spec_refused = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "spec_refused",
            "Validated specs a cluster refused anyway (a provisioner bug), by cluster",
            spec_refused.clone(),
        );
        let outbox_parked = Family::<ParkedLabels, Counter>::default();
        registry.register(
            "outbox_parked",
            "Outbox messages set aside because they can never be published, by topic role and reason",
            outbox_parked.clone(),
        );
        let journal_rows = Gauge::default();
        registry.register(
            "journal_rows",
            "Instructions in the journal, open and finished",
            journal_rows.clone(),
        );
        let journal_pruned = Counter::default();
        registry.register(
            "journal_pruned",
            "Finished instructions deleted from the journal after the retention",
            journal_pruned.clone(),
        );
        Metrics {
            registry,
            journal_rows,
            journal_pruned,
            spec_refused,
            outbox_parked,
            instructions,
            apply_seconds,
            consumer_lag,
            journal_backlog,
            outbox_backlog,
            outbox_lag_seconds,
            published,
            kube_requests,
        }
    }

    pub fn count(&self, outcome: &str) {
        self.instructions.get_or_create(&OutcomeLabels { outcome: outcome.to_string() }).inc();
    }

    pub fn kube(&self, cluster: &str, verb: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" }.to_string();
        self.kube_requests
            .get_or_create(&KubeLabels { cluster: cluster.into(), verb: verb.into(), outcome })
            .inc();
    }

    pub fn spec_refused(&self, cluster: &str) {
        self.spec_refused.get_or_create(&ClusterLabels { cluster: cluster.to_string() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
