//! The database's DNS name, its Route53 record and the endpoints published in status.
//!
//! The record is an A record to the dedicated node's private IP (failover re-points it), with a
//! short TTL so that clients follow a node replacement quickly.

use qdb_crd::{DnsStatus, Endpoints, QuestDBSpec};

use super::{ILP_PORT, PGWIRE_PORT};
use crate::names::Names;

pub const RECORD_TTL_SECONDS: i64 = 60;

/// `spec.network.dnsName`, else `<db>.<namespace>.<zone>` with `zone` the operator's DNS zone.
pub fn dns_name(names: &Names, spec: &QuestDBSpec, zone: &str) -> String {
    match &spec.network.dns_name {
        Some(name) => name.clone(),
        None => format!("{}.{}.{}", names.db(), names.namespace(), zone.trim_matches('.')),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// Without the trailing dot; compare with what Route53 returns through [`same_name`].
    pub name: String,
    /// The node's private IPv4 address (an A record).
    pub target: String,
    pub ttl: i64,
}

impl DnsRecord {
    pub fn status(&self) -> DnsStatus {
        DnsStatus { name: self.name.clone(), target: self.target.clone() }
    }
}

pub fn dns_record(dns_name: &str, private_ip: &str) -> DnsRecord {
    DnsRecord { name: dns_name.to_string(), target: private_ip.to_string(), ttl: RECORD_TTL_SECONDS }
}

/// Route53 answers with fully qualified names (`a.example.`) and may differ in case.
pub fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.').eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// HTTP goes through Traefik's TLS entry point (https, its default port); 9000 stays internal.
pub fn endpoints(dns_name: &str) -> Endpoints {
    Endpoints {
        http: format!("https://{dns_name}"),
        pgwire: format!("{dns_name}:{PGWIRE_PORT}"),
        ilp: format!("{dns_name}:{ILP_PORT}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn default_and_explicit_names() {
        let d = desired();
        assert_eq!(
            dns_name(&d.names, &d.spec, "region-a.questdb.example."),
            "db-7f3a.questdb.region-a.questdb.example"
        );
        let mut q = questdb();
        q.spec.network.dns_name = Some("db1.example.com".into());
        assert_eq!(desired_of(&q).dns_name, "db1.example.com");
    }

    #[test]
    fn record_and_endpoints() {
        let r = dns_record("db1.example.com", "10.0.1.17");
        assert_eq!(r.ttl, 60);
        assert_eq!(r.status(), DnsStatus { name: "db1.example.com".into(), target: "10.0.1.17".into() });
        assert!(same_name(&r.name, "DB1.example.com."));
        assert!(!same_name(&r.name, "db2.example.com."));
        assert_eq!(
            endpoints("db1.example.com"),
            Endpoints {
                http: "https://db1.example.com".into(),
                pgwire: "db1.example.com:8812".into(),
                ilp: "db1.example.com:9009".into(),
            }
        );
    }
}
