//! The controller: QuestDB resources, the children they own and the nodes their databases run
//! on, feeding [`crate::reconcile`].

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, controller, reflector, watcher};
use qdb_crd::{OPERATOR_MANAGER, QuestDB, keys};
use tracing::{info, warn};

use crate::build::ingress::{ingress_route_resource, ingress_route_tcp_resource};
use crate::context::Context;
use crate::health::Watches;
use crate::reconcile::{chain, error_policy, reconcile};

/// What about a node matters to its database: readiness, and whether it is going away.
fn node_fingerprint(n: &Node) -> Option<u64> {
    let mut h = std::hash::DefaultHasher::new();
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone()));
    ready.hash(&mut h);
    n.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Has a watch stream tell `watches`, item by item, whether it is failing (before the
/// controller's own handling of errors, which only logs and backs off).
fn reporter<T>(
    watches: &Arc<Watches>,
    name: &'static str,
) -> impl FnMut(&Result<T, watcher::Error>) + Send + 'static {
    watches.register(name);
    let watches = watches.clone();
    move |item| watches.record(name, item.as_ref().err().map(|e| e as &dyn std::fmt::Display))
}

/// What the caches need not keep: server-side apply's `managedFields`, which no reconcile reads,
/// were 40-50 % of each cached object (300 databases: 2.7 KB of a Node's 5.5 KB, 3.4 KB of a
/// pod's 8.2 KB, as JSON) and more as parsed JSON in memory.
fn slim<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Runs until `stop` resolves. `watch_client` carries the watches (long reads, see
/// [`qdb_crd::watch_read_timeout`]); every write goes through `ctx.client`. Each watch stream reports to
/// `watches` whether it is failing.
pub async fn run(
    ctx: Arc<Context>,
    watch_client: kube::Client,
    namespace: Option<String>,
    watches: Arc<Watches>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = watch_client;
    let ns = namespace.as_deref();
    let config = watcher::Config::default().timeout(qdb_crd::WATCH_SECS);
    let ours = config.clone().labels(&format!("{}={OPERATOR_MANAGER}", keys::MANAGED_BY));
    let Some(w) = ctx.cache_writers.lock().ok().and_then(|mut w| w.take()) else {
        warn!("the controller's caches are taken: it runs once per process");
        return;
    };
    let Some(budget_wakes) = ctx.budget_wakes.lock().ok().and_then(|mut w| w.take()) else {
        warn!("the replacement budget's wake-ups are taken: the controller runs once per process");
        return;
    };
    // Every child's watch fills its cache (the reconcile reads it, see crate::cache) and wakes
    // its database.
    fn cached<K>(
        writer: reflector::store::Writer<K>,
        api: Api<K>,
        config: &watcher::Config,
        report: impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + Send + 'static,
    ) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
    {
        reflector(writer, watcher(api, config.clone()).modify(slim).inspect(report)).touched_objects()
    }
    let questdbs = reflector(w.questdbs, watcher(api::<QuestDB>(&client, ns), config.clone()).modify(slim))
        .inspect(reporter(&watches, "questdb"))
        .applied_objects();
    let (http, tcp) = (ingress_route_resource(), ingress_route_tcp_resource());
    let dynamic = |resource: &kube::api::ApiResource| match ns {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource),
        None => Api::<DynamicObject>::all_with(client.clone(), resource),
    };
    let routes = reflector(
        w.routes,
        watcher(dynamic(&http), ours.clone()).modify(slim).inspect(reporter(&watches, "ingressroutes")),
    )
    .touched_objects();
    let tcp_routes = reflector(
        w.tcp_routes,
        watcher(dynamic(&tcp), ours.clone()).modify(slim).inspect(reporter(&watches, "ingressroutetcps")),
    )
    .touched_objects();
    let controller = Controller::for_stream(questdbs, ctx.caches.questdbs.clone())
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .owns_stream(cached(w.statefulsets, api(&client, ns), &ours, reporter(&watches, "statefulsets")))
        .owns_stream(cached(w.services, api(&client, ns), &ours, reporter(&watches, "services")))
        .owns_stream(cached(w.config_maps, api(&client, ns), &ours, reporter(&watches, "configmaps")))
        .owns_stream(cached(w.claims, api(&client, ns), &ours, reporter(&watches, "persistentvolumeclaims")))
        .owns_stream_with(routes, http)
        .owns_stream_with(tcp_routes, tcp);
    let store = controller.store();
    // Pods, volumes and nodes are not owned by the database: each finds it by the UID label.
    let owner_of = move |uid: Option<&String>| {
        store
            .state()
            .into_iter()
            .find(|q| q.metadata.uid.is_some() && q.metadata.uid.as_ref() == uid)
            .map(|q| ObjectRef::from_obj(q.as_ref()))
    };
    let (by_pod, by_volume, by_node, by_uid) =
        (owner_of.clone(), owner_of.clone(), owner_of.clone(), owner_of);
    let pods = cached(w.pods, api::<Pod>(&client, ns), &ours, reporter(&watches, "pods"));
    let volumes = cached(
        w.volumes,
        Api::<PersistentVolume>::all(client.clone()),
        &ours,
        reporter(&watches, "persistentvolumes"),
    );
    let nodes = cached(
        w.nodes,
        Api::<Node>::all(client.clone()),
        &config.clone().labels(keys::DEDICATED),
        reporter(&watches, "nodes"),
    )
    .predicate_filter(node_fingerprint, PredicateConfig::default());
    controller
        .watches_stream(pods, move |pod: Pod| by_pod(pod.labels().get(keys::OWNER_UID)))
        .watches_stream(volumes, move |pv: PersistentVolume| by_volume(pv.labels().get(keys::OWNER_UID)))
        .watches_stream(nodes, move |node: Node| by_node(node.labels().get(keys::DEDICATED)))
        // A freed replacement slot wakes the databases queued for it (crate::budget).
        .reconcile_on(budget_wakes.filter_map(move |uid| futures::future::ready(by_uid(Some(&uid)))))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(resource = %obj, "reconciled"),
                Err(e) => warn!(error = %chain(&e), "controller"),
            }
        })
        .await;
    info!("controller stopped");
}
