//! Traefik routes (`traefik.io/v1alpha1`, the CRDs Traefik ships, as the local cloud installs them):
//! an `IngressRoute` for HTTP and one `IngressRouteTCP` each for pgwire and ILP, all to the
//! database's Service. They are `DynamicObject`s: the CRDs are Traefik's, not ours, and the few
//! fields we set read best as the JSON Traefik documents.
//!
//! The TCP routes match `HostSNI(<dns name>)` and terminate TLS: every database shares the same
//! entry points, and without TLS there is no SNI, so `HostSNI(*)` would let the databases'
//! routes collide. Clients therefore connect with TLS (pgwire `sslmode=require`, ILP over TLS).

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{Desired, HTTP_PORT, ILP_PORT, PGWIRE_PORT};

pub const GROUP: &str = "traefik.io";
pub const VERSION: &str = "v1alpha1";
pub const HTTP_ENTRY_POINT: &str = "websecure";
pub const PGWIRE_ENTRY_POINT: &str = "pgwire";
pub const ILP_ENTRY_POINT: &str = "ilp";

pub fn ingress_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, "IngressRoute"), "ingressroutes")
}

pub fn ingress_route_tcp_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "IngressRouteTCP"),
        "ingressroutetcps",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRoute {
    Pgwire,
    Ilp,
}

pub fn build_ingress_route(d: &Desired) -> DynamicObject {
    let spec = json!({
        "entryPoints": [HTTP_ENTRY_POINT],
        "routes": [{
            "kind": "Rule",
            "match": format!("Host(`{}`)", d.dns_name),
            "services": [{"name": d.names.service(), "port": HTTP_PORT}],
        }],
        "tls": {},
    });
    dynamic(d, &ingress_route_resource(), d.names.ingress_http(), spec)
}

pub fn build_ingress_route_tcp(d: &Desired, route: TcpRoute) -> DynamicObject {
    let (name, entry_point, port) = match route {
        TcpRoute::Pgwire => (d.names.ingress_pgwire(), PGWIRE_ENTRY_POINT, PGWIRE_PORT),
        TcpRoute::Ilp => (d.names.ingress_ilp(), ILP_ENTRY_POINT, ILP_PORT),
    };
    let spec = json!({
        "entryPoints": [entry_point],
        "routes": [{
            "match": format!("HostSNI(`{}`)", d.dns_name),
            "services": [{"name": d.names.service(), "port": port}],
        }],
        "tls": {},
    });
    dynamic(d, &ingress_route_tcp_resource(), name, spec)
}

fn dynamic(d: &Desired, resource: &ApiResource, name: String, spec: serde_json::Value) -> DynamicObject {
    let mut obj = DynamicObject::new(&name, resource).data(json!({ "spec": spec }));
    obj.metadata = d.metadata(name);
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn http_route_matches_the_host() {
        let d = desired();
        let r = build_ingress_route(&d);
        assert_child_meta(&r.metadata);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["apiVersion"], "traefik.io/v1alpha1");
        assert_eq!(v["kind"], "IngressRoute");
        assert_eq!(v["metadata"]["name"], "db-7f3a-http");
        assert_eq!(v["spec"]["entryPoints"], json!(["websecure"]));
        let route = &v["spec"]["routes"][0];
        assert_eq!(route["match"], "Host(`db-7f3a.questdb.region-a.questdb.example`)");
        assert_eq!(route["services"], json!([{"name": "qdb-db-7f3a", "port": 9000}]));
    }

    #[test]
    fn tcp_routes_match_sni_on_their_entry_points() {
        let d = desired();
        for (route, name, entry, port) in [
            (TcpRoute::Pgwire, "db-7f3a-pgwire", "pgwire", 8812),
            (TcpRoute::Ilp, "db-7f3a-ilp", "ilp", 9009),
        ] {
            let r = build_ingress_route_tcp(&d, route);
            assert_child_meta(&r.metadata);
            let v = serde_json::to_value(&r).unwrap();
            assert_eq!(v["kind"], "IngressRouteTCP");
            assert_eq!(v["apiVersion"], "traefik.io/v1alpha1");
            assert_eq!(v["metadata"]["name"], name);
            assert_eq!(v["spec"]["entryPoints"], json!([entry]));
            assert_eq!(
                v["spec"]["routes"][0]["match"],
                "HostSNI(`db-7f3a.questdb.region-a.questdb.example`)"
            );
            assert_eq!(v["spec"]["routes"][0]["services"], json!([{"name": "qdb-db-7f3a", "port": port}]));
            assert_eq!(v["spec"]["tls"], json!({}));
        }
        assert_eq!(ingress_route_tcp_resource().plural, "ingressroutetcps");
    }
}
