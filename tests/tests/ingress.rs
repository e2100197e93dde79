//! The operator's Traefik routes as a real Traefik (kubernetescrd provider, the module's own
//! traefik.io CRDs) loads them: every IngressRoute and IngressRouteTCP the operator wrote for a
//! database is an enabled router in Traefik's API, and the routers go when the database goes.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::Api;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use qdb_crd::QuestDB;
use qdb_operator::build::ingress::{ingress_route_resource, ingress_route_tcp_resource};
use qdb_tests::eventually;
use qdb_tests::rig::Rig;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(120);

/// Traefik's routers of `kind` (http or tcp) that came from the kubernetescrd provider for
/// objects in `namespace`: (router name, rule, status).
async fn routers(api: &str, kind: &str, namespace: &str) -> Result<Vec<(String, String, String)>> {
    let list: Vec<Value> = reqwest::get(format!("{api}/api/{kind}/routers?per_page=1000"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(list
        .into_iter()
        .filter(|r| r["provider"] == "kubernetescrd")
        .filter_map(|r| {
            let name = r["name"].as_str()?.to_string();
            name.starts_with(&format!("{namespace}-")).then(|| {
                (
                    name,
                    r["rule"].as_str().unwrap_or_default().into(),
                    r["status"].as_str().unwrap_or_default().into(),
                )
            })
        })
        .collect())
}

/// The names of the route objects of `resource` in `namespace`.
async fn route_objects(client: &kube::Client, namespace: &str, tcp: bool) -> Result<Vec<String>> {
    let resource = if tcp { ingress_route_tcp_resource() } else { ingress_route_resource() };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    Ok(api.list(&ListParams::default()).await?.items.into_iter().filter_map(|o| o.metadata.name).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn traefik_loads_every_route_the_operator_writes_and_drops_them_on_delete() -> Result<()> {
    let rig = Rig::new("ingress", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let api: Api<QuestDB> = rig.questdbs("region-a").await?;
    let traefik = rig.cloud.vars.get("QDB_REGION_A_TRAEFIK_API").context("QDB_REGION_A_TRAEFIK_API")?.clone();
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;

    let q: QuestDB = serde_json::from_value(json!({
        "apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "metadata": {"name": "db-route"},
        "spec": {"version": "8.2.1", "instanceType": "m6i.large", "nodeImage": "ami-0a0a0a0a0a0a0a0a0",
                 "volume": {"sizeGib": 20, "type": "gp3"}, "network": {"allowedCidrs": ["10.0.0.0/8"]}}
    }))?;
    api.patch("db-route", &PatchParams::apply(qdb_crd::PROVISIONER_MANAGER), &Patch::Apply(&q)).await?;

    // Every route object the operator wrote is an enabled router, with the rule it asked for.
    eventually("Traefik routers for db-route", T, || async {
        let (http_objects, tcp_objects) = (
            route_objects(&client, &rig.namespace, false).await?,
            route_objects(&client, &rig.namespace, true).await?,
        );
        if http_objects.len() != 1 || tcp_objects.len() != 2 {
            return Ok(None);
        }
        let (http, tcp) = (
            routers(&traefik, "http", &rig.namespace).await?,
            routers(&traefik, "tcp", &rig.namespace).await?,
        );
        for (objects, routers) in [(&http_objects, &http), (&tcp_objects, &tcp)] {
            for o in objects {
                let prefix = format!("{}-{o}-", rig.namespace);
                let Some((_, rule, status)) = routers.iter().find(|(n, _, _)| n.starts_with(&prefix)) else {
                    return Ok(None);
                };
                ensure!(status == "enabled", "router for {o} is {status}");
                ensure!(rule.contains("db-route."), "router for {o} has rule {rule}");
            }
        }
        Ok(Some(()))
    })
    .await?;

    api.delete("db-route", &Default::default()).await?;
    eventually("Traefik drops db-route's routers", T, || async {
        let left = routers(&traefik, "http", &rig.namespace).await?.len()
            + routers(&traefik, "tcp", &rig.namespace).await?.len();
        Ok((left == 0).then_some(()))
    })
    .await?;
    Ok(())
}
