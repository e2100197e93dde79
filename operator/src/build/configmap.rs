//! server.conf, rendered into the ConfigMap `<db>-config`.
//!
//! The bind addresses are pinned: the Service, the readiness probe, Traefik and the security
//! group all assume these ports, so a user value for one of these keys is dropped (reported by
//! [`overridden_keys`], which the children step announces in an event) rather than breaking the routing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{Desired, HEALTH_PORT, HTTP_PORT, ILP_PORT, PGWIRE_PORT};
use crate::hash::fnv1a64;

/// The ConfigMap key, also the file name under `conf/`.
pub const SERVER_CONF: &str = "server.conf";

/// Keys the operator sets and users cannot override, with their values.
pub fn pinned() -> [(&'static str, String); 5] {
    [
        ("http.bind.to", format!("0.0.0.0:{HTTP_PORT}")),
        ("http.min.enabled", "true".into()),
        ("http.min.net.bind.to", format!("0.0.0.0:{HEALTH_PORT}")),
        ("pg.net.bind.to", format!("0.0.0.0:{PGWIRE_PORT}")),
        ("line.tcp.net.bind.to", format!("0.0.0.0:{ILP_PORT}")),
    ]
}

/// The user's keys that [`pinned`] overrides, so they have no effect.
pub fn overridden_keys(server_config: &BTreeMap<String, String>) -> Vec<&str> {
    pinned().iter().map(|(k, _)| *k).filter(|k| server_config.contains_key(*k)).collect()
}

/// Sorted `key=value` lines, so the same config always renders (and hashes) the same.
pub fn render_server_conf(server_config: &BTreeMap<String, String>) -> String {
    let mut all = server_config.clone();
    all.extend(pinned().into_iter().map(|(k, v)| (k.to_string(), v)));
    let mut out = String::from("# Rendered by qdb-operator from spec.serverConfig; edits are overwritten.\n");
    for (k, v) in &all {
        out.push_str(k);
        out.push('=');
        out.push_str(v);
        out.push('\n');
    }
    out
}

/// The pod template's config-hash annotation value for a rendered server.conf.
pub fn config_hash(server_conf: &str) -> String {
    format!("{:016x}", fnv1a64(server_conf.as_bytes()))
}

pub fn build_config_map(d: &Desired) -> ConfigMap {
    ConfigMap {
        metadata: d.metadata(d.names.config_map()),
        data: Some([(SERVER_CONF.to_string(), render_server_conf(&d.spec.server_config))].into()),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn renders_sorted_with_pinned_binds() {
        let cm = build_config_map(&desired());
        assert_child_meta(&cm.metadata);
        assert_eq!(cm.metadata.name.as_deref(), Some("db-7f3a-config"));
        let conf = &cm.data.unwrap()[SERVER_CONF];
        let lines: Vec<&str> = conf.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "cairo.commit.lag=1000",
                "http.bind.to=0.0.0.0:9000",
                "http.min.enabled=true",
                "http.min.net.bind.to=0.0.0.0:9003",
                "line.tcp.net.bind.to=0.0.0.0:9009",
                "pg.net.bind.to=0.0.0.0:8812",
            ]
        );
    }

    #[test]
    fn pinned_keys_win_and_are_reported() {
        let user: BTreeMap<String, String> = [
            ("pg.net.bind.to".to_string(), "0.0.0.0:5432".to_string()),
            ("a.b".to_string(), "c".to_string()),
        ]
        .into();
        let conf = render_server_conf(&user);
        assert!(conf.contains("pg.net.bind.to=0.0.0.0:8812\n"));
        assert!(!conf.contains("5432"));
        assert_eq!(overridden_keys(&user), ["pg.net.bind.to"]);
    }

    #[test]
    fn hash_changes_iff_config_changes() {
        let a: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        let mut b = a.clone();
        assert_eq!(config_hash(&render_server_conf(&a)), config_hash(&render_server_conf(&b)));
        b.insert("a".into(), "2".into());
        assert_ne!(config_hash(&render_server_conf(&a)), config_hash(&render_server_conf(&b)));
        // Overriding a pinned key changes nothing that reaches the file, so nothing rolls.
        let mut c = a.clone();
        c.insert("http.bind.to".into(), "0.0.0.0:1".into());
        assert_eq!(config_hash(&render_server_conf(&a)), config_hash(&render_server_conf(&c)));
        assert_eq!(config_hash("x").len(), 16);
    }
}
