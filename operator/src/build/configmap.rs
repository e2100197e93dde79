//! server.conf, rendered into the ConfigMap `<db>-config`.
//!
//! The bind addresses are pinned: the Service, the readiness probe, Traefik and the security
//! group all assume these ports, so a user value for one of these keys is dropped (reported by
//! [`overridden_keys`], which the children step announces in an event) rather than breaking the routing.
//! Likewise `cairo.snapshot.instance.id`, which the operator sets in the pod's environment.

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

/// Keys the operator sets in the pod's environment, which QuestDB reads over server.conf: the
/// checkpoint recovery of a restored volume depends on it
/// ([`super::statefulset::SNAPSHOT_INSTANCE_ENV`]). A user's value is left out of the file.
pub const FROM_ENVIRONMENT: [&str; 1] = ["cairo.snapshot.instance.id"];

/// The user's keys that [`pinned`] or [`FROM_ENVIRONMENT`] override, so they have no effect.
pub fn overridden_keys(server_config: &BTreeMap<String, String>) -> Vec<&str> {
    let owned = pinned().map(|(k, _)| k).into_iter().chain(FROM_ENVIRONMENT);
    owned.filter(|k| server_config.contains_key(*k)).collect()
}

/// Sorted `key=value` lines, so the same config always renders (and hashes) the same. Keys are
/// validated to need no escaping (`qdb_crd::validate`); values are escaped so that Java's
/// `Properties.load`, which QuestDB reads the file with, gives them back unchanged.
pub fn render_server_conf(server_config: &BTreeMap<String, String>) -> String {
    let mut all = server_config.clone();
    all.retain(|k, _| !FROM_ENVIRONMENT.contains(&k.as_str()));
    all.extend(pinned().into_iter().map(|(k, v)| (k.to_string(), v)));
    let mut out = String::from("# Rendered by qdb-operator from spec.serverConfig; edits are overwritten.\n");
    for (k, v) in &all {
        out.push_str(k);
        out.push('=');
        push_property_value(&mut out, v);
        out.push('\n');
    }
    out
}

/// `value` as a Java properties value that reads back unchanged. A backslash would otherwise
/// escape what follows (at the end of a line it joins the next line, which can swallow a pinned
/// key), and the file is read as ISO-8859-1, so everything outside printable ASCII is written as
/// `\uXXXX` (UTF-16, as Java's own writer does). Nothing else is escaped (`=`, `:`, `#`, `!` and
/// tabs are literal inside a value), so values that always read back right render exactly as
/// before and no database restarts for this change. Leading blanks never get here: QuestDB trims
/// values, so validation refuses them.
fn push_property_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' | ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
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
        let mut user = user;
        user.insert("cairo.snapshot.instance.id".into(), "mine".into());
        let conf = render_server_conf(&user);
        assert!(!conf.contains("cairo.snapshot.instance.id"), "the environment sets it:\n{conf}");
        assert_eq!(overridden_keys(&user), ["pg.net.bind.to", "cairo.snapshot.instance.id"]);
    }

    /// Java's `Properties.load` for one logical line's value (what QuestDB reads), enough to
    /// check that every value reads back as written.
    fn java_load_value(raw: &str) -> String {
        let raw = raw.trim_start_matches([' ', '\t', '\u{c}']);
        let mut out = String::new();
        let mut chars = raw.chars();
        let mut pending_high: Option<u16> = None;
        while let Some(c) = chars.next() {
            let c = if c == '\\' {
                match chars.next() {
                    Some('t') => '\t',
                    Some('n') => '\n',
                    Some('r') => '\r',
                    Some('f') => '\u{c}',
                    Some('u') => {
                        let hex: String = chars.by_ref().take(4).collect();
                        let unit = u16::from_str_radix(&hex, 16).unwrap();
                        if let Some(high) = pending_high.take() {
                            out.extend(char::decode_utf16([high, unit]).map(Result::unwrap));
                            continue;
                        }
                        if (0xD800..0xDC00).contains(&unit) {
                            pending_high = Some(unit);
                            continue;
                        }
                        char::from_u32(u32::from(unit)).unwrap()
                    }
                    Some(other) => other,
                    None => panic!("a trailing backslash continues the line: {raw:?}"),
                }
            } else {
                assert!(c.is_ascii(), "the file is read as ISO-8859-1: {c:?} in {raw:?}");
                c
            };
            out.push(c);
        }
        out
    }

    #[test]
    fn every_value_reads_back_unchanged_and_pinned_keys_keep_theirs() {
        let values = [
            "ends in a backslash\\",
            "two  inner blanks\tand a tab",
            "#not a comment",
            "!nor this",
            "a=b:c",
            "tab\tinside",
            "é€😀 ünïcödé",
            "C:\\data\\questdb",
            "",
        ];
        let user: BTreeMap<String, String> =
            values.iter().enumerate().map(|(i, v)| (format!("a.key{i}"), v.to_string())).collect();
        let conf = render_server_conf(&user);
        let mut read = BTreeMap::new();
        for line in conf.lines().skip(1) {
            let (k, v) = line.split_once('=').expect("key=value");
            read.insert(k.to_string(), java_load_value(v));
        }
        for (k, v) in &user {
            assert_eq!(&read[k], v, "{k} in\n{conf}");
        }
        for (k, v) in pinned() {
            assert_eq!(read[k], v);
        }
        assert_eq!(read.len(), user.len() + pinned().len(), "no line swallowed another:\n{conf}");
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
