//! The controller: QuestDB resources, the children they own and the nodes their databases run
//! on, feeding [`crate::reconcile`].

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Service};
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, controller, watcher};
use qdb_crd::{OPERATOR_MANAGER, QuestDB, keys};
use tracing::{info, warn};

use crate::context::Context;
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

/// Runs until `stop` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let ours = watcher::Config::default().labels(&format!("{}={OPERATOR_MANAGER}", keys::MANAGED_BY));
    let controller = Controller::new(api::<QuestDB>(&client, ns), watcher::Config::default())
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .owns(api::<StatefulSet>(&client, ns), ours.clone())
        .owns(api::<Service>(&client, ns), ours.clone())
        .owns(api::<ConfigMap>(&client, ns), ours.clone())
        .owns(api::<PersistentVolumeClaim>(&client, ns), ours);
    let store = controller.store();
    let nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default().labels(keys::DEDICATED))
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
