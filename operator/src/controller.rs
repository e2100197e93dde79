//! The controller: QuestDB resources, the children they own and the nodes their databases run
//! on, feeding [`crate::reconcile`].

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Service};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, controller, reflector, watcher};
use qdb_crd::{OPERATOR_MANAGER, QuestDB, keys};
use tracing::{info, warn};

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
    fn owned<K>(
        client: &kube::Client,
        ns: Option<&str>,
        config: &watcher::Config,
        report: impl FnMut(&Result<watcher::Event<PartialObjectMeta<K>>, watcher::Error>) + Send + 'static,
    ) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        watcher(api::<PartialObjectMeta<K>>(client, ns), config.clone()).inspect(report).touched_objects()
    }
    let (reader, writer) = reflector::store();
    let questdbs = reflector(writer, watcher(api::<QuestDB>(&client, ns), config.clone()))
        .inspect(reporter(&watches, "questdb"))
        .applied_objects();
    let controller = Controller::for_stream(questdbs, reader)
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .owns_stream(owned::<StatefulSet>(&client, ns, &ours, reporter(&watches, "statefulsets")))
        .owns_stream(owned::<Service>(&client, ns, &ours, reporter(&watches, "services")))
        .owns_stream(owned::<ConfigMap>(&client, ns, &ours, reporter(&watches, "configmaps")))
        .owns_stream(owned::<PersistentVolumeClaim>(
            &client,
            ns,
            &ours,
            reporter(&watches, "persistentvolumeclaims"),
        ));
    let store = controller.store();
    let nodes = watcher(Api::<Node>::all(client.clone()), config.clone().labels(keys::DEDICATED))
        .inspect(reporter(&watches, "nodes"))
        .touched_objects()
        .predicate_filter(node_fingerprint, PredicateConfig::default());
    controller
        .watches_stream(nodes, move |node: Node| {
            let uid = node.metadata.labels.as_ref().and_then(|l| l.get(keys::DEDICATED)).cloned();
            store
                .state()
                .into_iter()
                .find(|q| q.metadata.uid.is_some() && q.metadata.uid == uid)
                .map(|q| ObjectRef::from_obj(q.as_ref()))
        })
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
