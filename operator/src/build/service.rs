//! One Service `qdb-<db>` with the three client ports, which Traefik's routes and the
//! StatefulSet (as its governing service) refer to.
//!
//! Headless: Traefik routes to the pod's endpoints either way, and a cluster IP per database
//! would only use up the service range for nothing.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Desired, HTTP_PORT, ILP_PORT, PGWIRE_PORT};

pub fn build_service(d: &Desired) -> Service {
    let port = |name: &str, port: u16| ServicePort {
        name: Some(name.into()),
        port: i32::from(port),
        target_port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: d.metadata(d.names.service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(d.names.selector()),
            ports: Some(vec![port("http", HTTP_PORT), port("pgwire", PGWIRE_PORT), port("ilp", ILP_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;
    use crate::build::statefulset::build_statefulset;

    #[test]
    fn selects_the_statefulset_pod_on_three_ports() {
        let d = desired();
        let svc = build_service(&d);
        assert_child_meta(&svc.metadata);
        assert_eq!(svc.metadata.name.as_deref(), Some("qdb-db-7f3a"));
        let spec = svc.spec.unwrap();
        let ports: Vec<(Option<String>, i32)> =
            spec.ports.unwrap().into_iter().map(|p| (p.name, p.port)).collect();
        assert_eq!(
            ports,
            [(Some("http".into()), 9000), (Some("pgwire".into()), 8812), (Some("ilp".into()), 9009)]
        );
        let pod_labels =
            build_statefulset(&d, &SHARE).spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert!(spec.selector.unwrap().iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    }
}
