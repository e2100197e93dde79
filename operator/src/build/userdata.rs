//! EC2 user data of a dedicated node: the bootstrap that joins the cluster with the kubelet flags
//! `--node-labels` and `--register-with-taints`, built from the same [`Names`] functions as the
//! pod's nodeSelector and toleration, so the two cannot drift apart.
//!
//! Format contract (localcloud/nodesim/src/userdata.rs reads it like this): each flag is one
//! whitespace-free token `--flag=a=b,c=d`, optionally starting or ending in a quote; taints are
//! `key=value:Effect`.

use base64::Engine;

use crate::names::Names;

/// The EKS-style node bootstrap the image provides.
pub const BOOTSTRAP: &str = "/etc/eks/bootstrap.sh";

/// The script, in plain text. `cluster` is the Kubernetes cluster the node joins.
pub fn build_user_data(names: &Names, cluster: &str) -> String {
    let labels: Vec<String> = names.node_labels().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let taint = names.node_taint();
    let taint = match &taint.value {
        Some(v) => format!("{}={v}:{}", taint.key, taint.effect),
        None => format!("{}:{}", taint.key, taint.effect),
    };
    format!(
        "#!/bin/bash\n\
         # Dedicated node of QuestDB {ns}/{db} (uid {uid}), launched by qdb-operator.\n\
         set -euo pipefail\n\
         exec {BOOTSTRAP} {cluster} --kubelet-extra-args \
         '--node-labels={labels} --register-with-taints={taint}'\n",
        ns = names.namespace(),
        db = names.db(),
        uid = names.uid(),
        cluster = shell_quote(cluster),
        labels = labels.join(","),
    )
}

/// RunInstances takes user data base64-encoded; the SDK does not encode it.
pub fn encode_user_data(script: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(script)
}

/// Single-quotes a word for bash, so an odd cluster name cannot run anything.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Taint, Toleration};

    use super::*;
    use crate::build::fixtures::*;
    use crate::build::statefulset::build_statefulset;

    /// localcloud/nodesim/src/userdata.rs's `parse`, copied: nodesim is a binary crate, and the
    /// operator must not depend on the test bed. Keep the two in step.
    fn nodesim_parse(user_data: &str) -> (BTreeMap<String, String>, Vec<Taint>) {
        let mut labels = BTreeMap::new();
        let mut taints = Vec::new();
        let split = |list: &str| -> Vec<String> {
            list.split(',')
                .map(|s| s.trim_matches(|c| c == '"' || c == '\'').to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        for token in user_data.split_whitespace() {
            let token = token.trim_matches(|c| c == '"' || c == '\'');
            if let Some(list) = token.strip_prefix("--node-labels=") {
                for item in split(list) {
                    let (k, v) = item.split_once('=').filter(|(k, _)| !k.is_empty()).expect("label k=v");
                    labels.insert(k.to_string(), v.to_string());
                }
            } else if let Some(list) = token.strip_prefix("--register-with-taints=") {
                for item in split(list) {
                    let (kv, effect) = item.rsplit_once(':').expect("taint effect");
                    assert!(matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute"));
                    let (key, value) = match kv.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (kv.to_string(), None),
                    };
                    assert!(!key.is_empty());
                    taints.push(Taint { key, value, effect: effect.to_string(), time_added: None });
                }
            }
        }
        (labels, taints)
    }

    #[test]
    fn the_node_nodesim_registers_is_the_one_the_pod_selects_and_tolerates() {
        let d = desired();
        let script = build_user_data(&d.names, "region-a");
        let (labels, taints) = nodesim_parse(&script);
        let pod = build_statefulset(&d).spec.unwrap().template.spec.unwrap();
        assert_eq!(Some(labels), pod.node_selector);
        let tolerations: Vec<Toleration> = taints
            .into_iter()
            .map(|t| Toleration {
                key: Some(t.key),
                operator: Some("Equal".into()),
                value: t.value,
                effect: Some(t.effect),
                toleration_seconds: None,
            })
            .collect();
        assert_eq!(Some(tolerations), pod.tolerations);
    }

    #[test]
    fn script_shape_and_encoding() {
        let d = desired();
        let script = build_user_data(&d.names, "region-a");
        assert!(script.starts_with("#!/bin/bash\n"));
        assert!(script.contains(&format!(
            "exec /etc/eks/bootstrap.sh 'region-a' --kubelet-extra-args \
             '--node-labels=cloud.questdb.io/dedicated={UID} \
             --register-with-taints=cloud.questdb.io/dedicated={UID}:NoSchedule'\n"
        )));
        let decoded = base64::engine::general_purpose::STANDARD.decode(encode_user_data(&script)).unwrap();
        assert_eq!(decoded, script.as_bytes());
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
