//! What every reconcile shares: clients, configuration, metrics and the event recorder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};

use crate::aws::Aws;
use crate::aws::inventory::Inventory;
use crate::build::userdata::NodeBootstrap;
use crate::metrics::Metrics;
use crate::reconcile::dns::ZoneRecords;
use crate::reconcile::zone::{Starts, ZoneLimits};

#[derive(Debug, Clone)]
pub struct Settings {
    /// This cluster's name: tags every AWS resource, so one cluster never touches another's.
    pub cluster: String,
    /// Zone for default DNS names, e.g. `region-a.questdb.example`.
    pub dns_zone: String,
    /// Create the hosted zone when missing (the local cloud's emulator starts empty).
    pub create_hosted_zone: bool,
    /// How often a converged database is looked at again (drift in AWS has no watch).
    pub resync: Duration,
    /// How often an unconverged one is looked at while waiting on AWS or a node.
    pub poll: Duration,
    /// How long a database's node may be not Ready before the node is replaced.
    pub failover_after: Duration,
    /// Node upgrades (image or instance type) in progress at once, operator-wide.
    pub replacement_budget: usize,
    /// How long a replacement instance may take to join as a Ready node before it is retired
    /// and another is launched.
    pub replacement_join_timeout: Duration,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// The namespace watched (`None`: all); the failover gate and the orphan sweep look only at
    /// its databases.
    pub namespace: Option<String>,
    /// Failover rate limits for a zone with many NotReady database nodes at once.
    pub zone_limits: ZoneLimits,
    /// InsufficientInstanceCapacity is retried this many times in a row before the database is
    /// reported Failed.
    pub capacity_retries: u32,
    /// How a node joins the EKS cluster: its image's bootstrap format and the cluster's coordinates.
    pub bootstrap: NodeBootstrap,
}

pub struct Context {
    pub client: kube::Client,
    pub aws: Aws,
    /// The cluster's EC2 resources, one snapshot shared by every reconcile.
    pub inventory: Inventory,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub hosted_zone: tokio::sync::Mutex<Option<String>>,
    /// Route53 records as last read or written, so passes in between need not read them again.
    pub dns_records: ZoneRecords,
    /// Consecutive failures per resource (namespace/name), for backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Databases whose node is being upgraded now, and those waiting for a slot.
    pub budget: crate::budget::Budget,
    /// The UIDs of queued databases to wake when a slot frees, until the controller takes it.
    pub budget_wakes: Mutex<Option<futures::channel::mpsc::UnboundedReceiver<String>>>,
    /// Failovers started per zone, against the unhealthy-zone rate.
    pub failover_starts: Mutex<Starts>,
    /// Volumes whose next modification EBS allows only from then (volume id -> time).
    pub modifiable_at: Mutex<HashMap<String, jiff::Timestamp>>,
    /// EC2's figures per instance type, read once each.
    pub instance_types: Mutex<HashMap<String, crate::aws::InstanceType>>,
    /// The controller's watch caches of children, pods and database nodes.
    pub caches: crate::cache::Caches,
    /// Their writing ends, until the controller's reflectors take them.
    pub cache_writers: Mutex<Option<crate::cache::Writers>>,
}

impl Context {
    pub fn new(client: kube::Client, aws: Aws, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let reporter =
            Reporter { controller: "qdb-operator".into(), instance: std::env::var("POD_NAME").ok() };
        let (caches, cache_writers) = crate::cache::caches();
        let (budget, budget_wakes) = crate::budget::Budget::new(settings.replacement_budget);
        Context {
            budget,
            budget_wakes: Mutex::new(Some(budget_wakes)),
            caches,
            cache_writers,
            recorder: Recorder::new(client.clone(), reporter),
            client,
            aws,
            inventory: Inventory::new(&settings.cluster),
            settings,
            metrics,
            hosted_zone: tokio::sync::Mutex::new(None),
            dns_records: ZoneRecords::default(),
            failures: Mutex::new(HashMap::new()),
            failover_starts: Mutex::new(Starts::default()),
            modifiable_at: Mutex::new(HashMap::new()),
            instance_types: Mutex::new(HashMap::new()),
        }
    }
}
