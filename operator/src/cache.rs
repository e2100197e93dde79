//! What the controller's watches hold, read by the reconcile instead of the apiserver: a
//! converged database then costs no Kubernetes request between changes (issue 20's API economy).
//! The watches select the operator's own objects (`app.kubernetes.io/managed-by=qdb-operator`)
//! and the database nodes, so the caches hold exactly what the reconcile reads.
//!
//! A cache is trusted only once its first listing is in, and then for what it holds: a child it
//! does not hold (created a moment ago, or not the operator's, such as a foreign object with a
//! child's name, which only a GET ever shows) is read from the apiserver ([`Absence::Ask`]). The
//! database's pod is the exception: every pod of the operator's StatefulSets is in the pod
//! cache, so its absence there is trusted ([`Absence::Trusted`]).

use std::sync::Mutex;

use futures::FutureExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service};
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::{Resource, ResourceExt};
use qdb_crd::QuestDB;

use crate::build::ingress::{ingress_route_resource, ingress_route_tcp_resource};
use crate::metrics::Metrics;

pub struct Caches {
    /// The databases themselves, as the controller sees them (the orphan sweep's first look).
    pub questdbs: Store<QuestDB>,
    pub statefulsets: Store<StatefulSet>,
    pub services: Store<Service>,
    pub config_maps: Store<ConfigMap>,
    pub claims: Store<PersistentVolumeClaim>,
    pub volumes: Store<PersistentVolume>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub routes: Store<DynamicObject>,
    pub tcp_routes: Store<DynamicObject>,
}

/// The writing ends, taken once by the controller's reflectors.
pub struct Writers {
    pub questdbs: Writer<QuestDB>,
    pub statefulsets: Writer<StatefulSet>,
    pub services: Writer<Service>,
    pub config_maps: Writer<ConfigMap>,
    pub claims: Writer<PersistentVolumeClaim>,
    pub volumes: Writer<PersistentVolume>,
    pub pods: Writer<Pod>,
    pub nodes: Writer<Node>,
    pub routes: Writer<DynamicObject>,
    pub tcp_routes: Writer<DynamicObject>,
}

pub fn caches() -> (Caches, Mutex<Option<Writers>>) {
    fn pair<K>(dyntype: K::DynamicType) -> (Store<K>, Writer<K>)
    where
        K: kube::runtime::reflector::Lookup + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        let w = Writer::new(dyntype);
        (w.as_reader(), w)
    }
    let (questdbs, w_questdbs) = pair(());
    let (statefulsets, w_statefulsets) = pair(());
    let (services, w_services) = pair(());
    let (config_maps, w_config_maps) = pair(());
    let (claims, w_claims) = pair(());
    let (volumes, w_volumes) = pair(());
    let (pods, w_pods) = pair(());
    let (nodes, w_nodes) = pair(());
    let (routes, w_routes) = pair(ingress_route_resource());
    let (tcp_routes, w_tcp_routes) = pair(ingress_route_tcp_resource());
    let caches = Caches {
        questdbs,
        statefulsets,
        services,
        config_maps,
        claims,
        volumes,
        pods,
        nodes,
        routes,
        tcp_routes,
    };
    let writers = Writers {
        questdbs: w_questdbs,
        statefulsets: w_statefulsets,
        services: w_services,
        config_maps: w_config_maps,
        claims: w_claims,
        volumes: w_volumes,
        pods: w_pods,
        nodes: w_nodes,
        routes: w_routes,
        tcp_routes: w_tcp_routes,
    };
    (caches, Mutex::new(Some(writers)))
}

/// Whether the cache's first listing is in (before it, an absence means nothing).
pub fn is_ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
}

/// What an object's absence from a listed cache means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absence {
    /// Nothing: it may exist outside the watch's selection, or be just created; asked with a GET.
    Ask,
    /// That it does not exist: the watch selects every object of the kind that matters.
    Trusted,
}

/// One kind of object as the reconcile reads it: the watch cache, and the apiserver behind it.
pub struct Cached<'a, K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    pub api: Api<K>,
    pub store: &'a Store<K>,
    pub dyntype: K::DynamicType,
    /// As counted in `qdb_operator_kube_requests_total`.
    pub kind: &'static str,
}

impl<K> Cached<'_, K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// One object by name: from the cache once it has listed (its absence as `absence` says),
    /// else from the apiserver, counted as a get.
    pub async fn get(
        &self,
        metrics: &Metrics,
        name: &str,
        namespace: Option<&str>,
        absence: Absence,
    ) -> Result<Option<K>, kube::Error> {
        let mut key = ObjectRef::new_with(name, self.dyntype.clone());
        if let Some(ns) = namespace {
            key = key.within(ns);
        }
        if is_ready(self.store) {
            match (self.store.get(&key), absence) {
                (Some(cached), _) => return Ok(Some((*cached).clone())),
                (None, Absence::Trusted) => return Ok(None),
                (None, Absence::Ask) => {}
            }
        }
        metrics.kube("get", self.kind);
        self.api.get_opt(name).await
    }
}

/// The database nodes carrying `labels`, from the node cache once it has listed; None before,
/// for the caller to list them itself.
pub fn nodes_labelled(
    store: &Store<Node>,
    labels: &std::collections::BTreeMap<String, String>,
) -> Option<Vec<Node>> {
    if !is_ready(store) {
        return None;
    }
    let matches = |n: &Node| labels.iter().all(|(k, v)| n.labels().get(k) == Some(v));
    Some(store.state().into_iter().filter(|n| matches(n)).map(|n| (*n).clone()).collect())
}
