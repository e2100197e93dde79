//! What the AWS step reads besides EC2's inventory: the database's nodes and, before a failover,
//! its zone's health. Reads only.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use qdb_crd::{QuestDB, keys};

use super::super::replace::NodeSeen;
use super::super::zone::ZoneHealth;
use super::super::{Error, kube_err};
use crate::build::Desired;
use crate::context::Context;

/// The Nodes carrying the database's labels (its dedicated node, and a replacement's).
pub(in crate::reconcile) async fn database_nodes(ctx: &Context, d: &Desired) -> Result<Vec<Node>, Error> {
    if let Some(cached) = crate::cache::nodes_labelled(&ctx.caches.nodes, &d.names.node_labels()) {
        return Ok(cached);
    }
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let selector =
        d.names.node_labels().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    ctx.metrics.kube("list", "Node");
    let list = nodes
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("aws", "listing nodes"))?;
    Ok(list.items)
}

/// Whether the node's Ready condition is True.
pub(in crate::reconcile) fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the node named `name` is among `nodes` and Ready.
pub(in crate::reconcile) fn is_ready(nodes: &[Node], name: &str) -> bool {
    nodes.iter().any(|n| n.metadata.name.as_deref() == Some(name) && node_ready(n))
}

/// The database's nodes by instance id: (node name, readiness).
pub(super) async fn nodes_of(
    ctx: &Context,
    d: &Desired,
) -> Result<HashMap<String, (String, NodeSeen)>, Error> {
    Ok(by_instance(database_nodes(ctx, d).await?))
}

/// The EC2 instance a node runs on, from its providerID (`aws:///<zone>/<instance-id>`).
pub(in crate::reconcile) fn instance_of(n: &Node) -> Option<&str> {
    n.spec.as_ref()?.provider_id.as_deref()?.rsplit('/').next()
}

/// Nodes by instance id: (node name, readiness).
pub(super) fn by_instance(nodes: Vec<Node>) -> HashMap<String, (String, NodeSeen)> {
    let now = jiff::Timestamp::now();
    nodes
        .into_iter()
        .filter_map(|n| {
            let instance = instance_of(&n)?.to_string();
            let ready = n.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| {
                c.iter()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| (c.status == "True", c.last_transition_time.clone()))
            });
            let seen = match ready {
                Some((true, _)) => NodeSeen::Ready,
                Some((false, since)) => NodeSeen::NotReady {
                    for_secs: since.map(|t| now.duration_since(t.0).as_secs().max(0) as u64).unwrap_or(0),
                },
                None => NodeSeen::NotReady { for_secs: 0 },
            };
            Some((instance, (n.metadata.name.unwrap_or_default(), seen)))
        })
        .collect()
}

/// The dedicated nodes in `zone` of the databases this operator manages (only its namespace's,
/// when it watches one), and how many are not Ready. Read only when a failover is about to start.
pub(super) async fn zone_health(ctx: &Context, zone: &str) -> Result<ZoneHealth, Error> {
    let questdbs: Api<QuestDB> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    ctx.metrics.kube("list", "QuestDB");
    let ours: HashSet<String> = questdbs
        .list_metadata(&ListParams::default())
        .await
        .map_err(kube_err("aws", "listing databases for the zone's health"))?
        .items
        .into_iter()
        .filter_map(|q| q.metadata.uid)
        .collect();
    ctx.metrics.kube("list", "Node");
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default().labels(keys::DEDICATED))
        .await
        .map_err(kube_err("aws", "listing database nodes for the zone's health"))?;
    let mut health = ZoneHealth { nodes: 0, not_ready: 0 };
    for n in nodes.items {
        let owner = n.metadata.labels.as_ref().and_then(|l| l.get(keys::DEDICATED));
        // providerID is aws:///<zone>/<instance-id>.
        let node_zone = n
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(|p| p.strip_prefix("aws:///").and_then(|rest| rest.split('/').next()));
        if !owner.is_some_and(|o| ours.contains(o)) || node_zone != Some(zone) {
            continue;
        }
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        health.nodes += 1;
        health.not_ready += usize::from(!ready);
    }
    Ok(health)
}
