//! Names and labels of everything the operator creates for one QuestDB. Each is a pure function of
//! the resource's namespace, name and UID, so every step finds its objects again after a crash
//! without having recorded anything first.
//!
//! | object                         | name                                   |
//! |--------------------------------|----------------------------------------|
//! | StatefulSet                    | `<db>` (cut to 52 with a hash suffix)  |
//! | its pod                        | `<statefulset>-0`                      |
//! | Service (9000, 8812, 9009)     | `qdb-<db>` (cut to 63 with a hash)     |
//! | ConfigMap (server.conf)        | `<db>-config`                          |
//! | PersistentVolumeClaim          | `<db>-data`                            |
//! | PersistentVolume (cluster)     | `qdb-<namespace>.<db>`                 |
//! | IngressRoute (HTTP)            | `<db>-http`                            |
//! | IngressRouteTCP (pgwire, ILP)  | `<db>-pgwire`, `<db>-ilp`              |
//!
//! The dedicated node carries the label `cloud.questdb.io/dedicated=<uid>` and the taint
//! `cloud.questdb.io/dedicated=<uid>:NoSchedule`. The UID, not `<namespace>.<db>`, because it is
//! always a valid label value (36 characters; namespace and name together may exceed 63) and a
//! database deleted and created again under the same name never claims the old one's node.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Taint, Toleration};
use qdb_crd::{OPERATOR_MANAGER, is_dns_label, keys};

use crate::hash::fnv1a64;

/// Recommended labels (app.kubernetes.io/*) the operator sets next to its own keys.
pub const APP_NAME: &str = "app.kubernetes.io/name";
pub const APP_INSTANCE: &str = "app.kubernetes.io/instance";
/// Pod template annotation: hash of the rendered server.conf. The ConfigMap is mounted through
/// `subPath`, which a running container never sees updated, so a config change has to roll the pod.
pub const CONFIG_HASH: &str = "cloud.questdb.io/config-hash";
/// Pod template annotation copying `spec.restartToken`: a new token rolls the pod once.
pub const RESTART_TOKEN: &str = "cloud.questdb.io/restart-token";

/// A StatefulSet's pods carry `controller-revision-hash=<name>-<hash of up to 10>`, a label value
/// limited to 63, so a longer StatefulSet name creates no pods at all.
const MAX_STATEFULSET: usize = 52;
const MAX_LABEL: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name {0:?} is not a DNS label (lowercase letters, digits and '-', at most 63)")]
    Name(String),
    #[error("namespace {0:?} is not a DNS label")]
    Namespace(String),
    #[error("uid {0:?} cannot be a label value")]
    Uid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
    db: String,
    uid: String,
}

impl Names {
    pub fn new(namespace: &str, db: &str, uid: &str) -> Result<Self, NameError> {
        if !is_dns_label(db) {
            return Err(NameError::Name(db.to_string()));
        }
        if !is_dns_label(namespace) {
            return Err(NameError::Namespace(namespace.to_string()));
        }
        let uid_ok = !uid.is_empty()
            && uid.len() <= MAX_LABEL
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && uid.starts_with(|c: char| c.is_ascii_alphanumeric())
            && uid.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !uid_ok {
            return Err(NameError::Uid(uid.to_string()));
        }
        Ok(Self { namespace: namespace.to_string(), db: db.to_string(), uid: uid.to_string() })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn db(&self) -> &str {
        &self.db
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn statefulset(&self) -> String {
        fit(self.db.clone(), MAX_STATEFULSET)
    }

    pub fn pod(&self) -> String {
        format!("{}-0", self.statefulset())
    }

    /// Service names must start with a letter (DNS-1035); database ids may start with a digit.
    pub fn service(&self) -> String {
        fit(format!("qdb-{}", self.db), MAX_LABEL)
    }

    pub fn config_map(&self) -> String {
        format!("{}-config", self.db)
    }

    pub fn pvc(&self) -> String {
        format!("{}-data", self.db)
    }

    /// Cluster scoped, so the namespace is part of it; the '.' cannot occur in a namespace or a
    /// database name, so `a-b`/`c` and `a`/`b-c` do not collide as they would with '-'.
    pub fn pv(&self) -> String {
        format!("qdb-{}.{}", self.namespace, self.db)
    }

    pub fn ingress_http(&self) -> String {
        format!("{}-http", self.db)
    }

    pub fn ingress_pgwire(&self) -> String {
        format!("{}-pgwire", self.db)
    }

    pub fn ingress_ilp(&self) -> String {
        format!("{}-ilp", self.db)
    }

    /// Labels of every child, the PV included (it has no owner reference to find it by).
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert(keys::DATABASE.into(), self.db.clone());
        labels.insert(keys::OWNER_UID.into(), self.uid.clone());
        labels.insert(keys::MANAGED_BY.into(), OPERATOR_MANAGER.into());
        labels
    }

    /// The StatefulSet's selector: immutable once created, so only what can never change.
    pub fn selector(&self) -> BTreeMap<String, String> {
        [(APP_NAME.to_string(), "questdb".to_string()), (APP_INSTANCE.to_string(), self.db.clone())].into()
    }

    /// Labels the dedicated node registers with (user data) and the pod selects (nodeSelector).
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        [(keys::DEDICATED.to_string(), self.uid.clone())].into()
    }

    /// The taint the dedicated node registers with, keeping every other pod off it.
    pub fn node_taint(&self) -> Taint {
        Taint {
            key: keys::DEDICATED.into(),
            value: Some(self.uid.clone()),
            effect: "NoSchedule".into(),
            time_added: None,
        }
    }

    /// The pod's toleration of exactly [`Self::node_taint`].
    pub fn toleration(&self) -> Toleration {
        let taint = self.node_taint();
        Toleration {
            key: Some(taint.key),
            operator: Some("Equal".into()),
            value: taint.value,
            effect: Some(taint.effect),
            toleration_seconds: None,
        }
    }
}

/// Cuts `name` (ASCII) to `max` bytes, ending in a hash of the whole so that long names sharing a
/// prefix stay distinct.
fn fit(name: String, max: usize) -> String {
    if name.len() <= max {
        return name;
    }
    // The low 32 bits are plenty to tell apart the few names that share a 43-byte prefix.
    let hash = format!("{:08x}", fnv1a64(name.as_bytes()) & 0xffff_ffff);
    let head = name[..max - hash.len() - 1].trim_end_matches('-');
    format!("{head}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::new("questdb", "db-7f3a", "6f1c2b4e-0000-4000-8000-000000000001").unwrap()
    }

    #[test]
    fn short_names_follow_the_table() {
        let n = names();
        assert_eq!(n.statefulset(), "db-7f3a");
        assert_eq!(n.pod(), "db-7f3a-0");
        assert_eq!(n.service(), "qdb-db-7f3a");
        assert_eq!(n.config_map(), "db-7f3a-config");
        assert_eq!(n.pvc(), "db-7f3a-data");
        assert_eq!(n.pv(), "qdb-questdb.db-7f3a");
        assert_eq!(n.ingress_http(), "db-7f3a-http");
        assert_eq!(n.ingress_pgwire(), "db-7f3a-pgwire");
        assert_eq!(n.ingress_ilp(), "db-7f3a-ilp");
    }

    #[test]
    fn long_names_are_cut_distinctly_and_stably() {
        let a = Names::new("ns", &format!("{}a", "x".repeat(62)), "u1").unwrap();
        let b = Names::new("ns", &format!("{}b", "x".repeat(62)), "u1").unwrap();
        assert_eq!(a.statefulset().len(), MAX_STATEFULSET);
        assert_eq!(a.service().len(), MAX_LABEL);
        assert_ne!(a.statefulset(), b.statefulset());
        assert_ne!(a.service(), b.service());
        assert_eq!(a.statefulset(), a.clone().statefulset());
        assert!(is_dns_label(&a.statefulset()) && is_dns_label(&a.service()));
        // A cut that lands on a '-' must not leave "--" or a trailing '-'.
        let dashy = Names::new("ns", &format!("{}-{}", "y".repeat(42), "z".repeat(20)), "u1").unwrap();
        assert!(is_dns_label(&dashy.statefulset()), "{}", dashy.statefulset());
        assert!(!dashy.statefulset().contains("--"));
    }

    #[test]
    fn rejects_what_cannot_name_a_child() {
        assert_eq!(Names::new("ns", "Db", "u"), Err(NameError::Name("Db".into())));
        assert!(Names::new("ns", &"x".repeat(64), "u").is_err());
        assert_eq!(Names::new("", "db", "u"), Err(NameError::Namespace("".into())));
        assert_eq!(Names::new("ns", "db", ""), Err(NameError::Uid("".into())));
        assert_eq!(Names::new("ns", "db", "a b"), Err(NameError::Uid("a b".into())));
    }

    #[test]
    fn labels_and_node_pinning() {
        let n = names();
        let labels = n.labels();
        assert_eq!(labels[keys::DATABASE], "db-7f3a");
        assert_eq!(labels[keys::OWNER_UID], n.uid());
        assert_eq!(labels[keys::MANAGED_BY], OPERATOR_MANAGER);
        assert_eq!(labels[APP_NAME], "questdb");
        assert_eq!(labels[APP_INSTANCE], "db-7f3a");
        assert!(n.selector().iter().all(|(k, v)| labels.get(k) == Some(v)));
        let t = n.toleration();
        let taint = n.node_taint();
        assert_eq!(
            (t.key.as_deref(), t.value.as_ref(), t.effect.as_deref()),
            (Some(keys::DEDICATED), taint.value.as_ref(), Some("NoSchedule"))
        );
        assert_eq!(n.node_labels()[keys::DEDICATED], n.uid());
    }
}
