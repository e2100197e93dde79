//! EC2 user data of a dedicated node, in the format of the node image's bootstrap: AL2023's
//! nodeadm `NodeConfig` (a MIME multipart document, the EKS-optimized AMIs' format since the
//! AL2 AMIs' `/etc/eks/bootstrap.sh` went away) or Bottlerocket's TOML settings. Either carries
//! the EKS cluster's coordinates and the kubelet's node labels and taint, built from the same
//! [`Names`] functions as the pod's nodeSelector and toleration, so the two cannot drift apart.
//!
//! localcloud/nodesim/src/userdata.rs reads both formats as the node would, and refuses anything
//! else (a node with user data it cannot read never joins).

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::json;

use crate::names::Names;

/// The bootstrap the node image runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NodeOs {
    /// Amazon Linux 2023 EKS AMIs: nodeadm reads a `NodeConfig`.
    #[default]
    Al2023,
    /// Bottlerocket: its settings API reads TOML.
    Bottlerocket,
}

/// What a node needs to join the EKS cluster (`aws eks describe-cluster` shows each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBootstrap {
    pub os: NodeOs,
    /// The EKS cluster's name.
    pub cluster_name: String,
    /// Its API server endpoint (https URL).
    pub api_server: String,
    /// Its certificate authority, base64-encoded as DescribeCluster returns it.
    pub certificate_authority: String,
    /// Its service CIDR; nodeadm derives the cluster DNS address from it.
    pub service_cidr: String,
}

/// MIME boundary of the AL2023 document; it appears nowhere in what it separates.
const BOUNDARY: &str = "//qdb-node//";

/// The user data, in plain text (base64-encoded for RunInstances by [`encode_user_data`]).
pub fn build_user_data(names: &Names, boot: &NodeBootstrap) -> String {
    let labels: BTreeMap<String, String> = names.node_labels();
    let taint = names.node_taint();
    let origin = format!(
        "Dedicated node of QuestDB {}/{} (uid {}), launched by qdb-operator.",
        names.namespace(),
        names.db(),
        names.uid()
    );
    match boot.os {
        NodeOs::Al2023 => {
            let label_flag = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            let taint_flag = match &taint.value {
                Some(v) => format!("{}={v}:{}", taint.key, taint.effect),
                None => format!("{}:{}", taint.key, taint.effect),
            };
            let config = json!({
                "apiVersion": "node.eks.aws/v1alpha1",
                "kind": "NodeConfig",
                "spec": {
                    "cluster": {
                        "name": boot.cluster_name,
                        "apiServerEndpoint": boot.api_server,
                        "certificateAuthority": boot.certificate_authority,
                        "cidr": boot.service_cidr,
                    },
                    "kubelet": {
                        "flags": [
                            format!("--node-labels={label_flag}"),
                            format!("--register-with-taints={taint_flag}"),
                        ],
                    },
                },
            });
            let yaml = serde_yaml::to_string(&config).unwrap_or_default();
            format!(
                "MIME-Version: 1.0\n\
                 Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\n\
                 \n\
                 --{BOUNDARY}\n\
                 Content-Type: application/node.eks.aws\n\
                 \n\
                 # {origin}\n\
                 ---\n\
                 {yaml}\n\
                 --{BOUNDARY}--\n"
            )
        }
        NodeOs::Bottlerocket => {
            let mut text = format!(
                "# {origin}\n\
                 [settings.kubernetes]\n\
                 cluster-name = {}\n\
                 api-server = {}\n\
                 cluster-certificate = {}\n\
                 \n\
                 [settings.kubernetes.node-labels]\n",
                toml_string(&boot.cluster_name),
                toml_string(&boot.api_server),
                toml_string(&boot.certificate_authority),
            );
            for (k, v) in &labels {
                text.push_str(&format!("{} = {}\n", toml_string(k), toml_string(v)));
            }
            // Bottlerocket's taints: key = ["value:Effect", ...].
            let value = format!("{}:{}", taint.value.as_deref().unwrap_or_default(), taint.effect);
            text.push_str(&format!(
                "\n[settings.kubernetes.node-taints]\n{} = [{}]\n",
                toml_string(&taint.key),
                toml_string(&value)
            ));
            text
        }
    }
}

/// RunInstances takes user data base64-encoded; the SDK does not encode it.
pub fn encode_user_data(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    pub fn boot(os: NodeOs) -> NodeBootstrap {
        NodeBootstrap {
            os,
            cluster_name: "region-a".into(),
            api_server: "https://ABC.gr7.us-east-1.eks.amazonaws.com".into(),
            certificate_authority: "Y2VydGlmaWNhdGVBdXRob3JpdHk=".into(),
            service_cidr: "10.100.0.0/16".into(),
        }
    }

    #[test]
    fn al2023_is_a_mime_document_with_a_node_config() {
        let text = build_user_data(&desired().names, &boot(NodeOs::Al2023));
        assert!(
            text.starts_with(
                "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"//qdb-node//\"\n\n"
            )
        );
        assert!(text.ends_with("\n--//qdb-node//--\n"), "{text}");
        let part = text.split("Content-Type: application/node.eks.aws\n\n").nth(1).unwrap();
        let yaml = part.split("\n--//qdb-node//--").next().unwrap();
        let config: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(config["apiVersion"], "node.eks.aws/v1alpha1");
        assert_eq!(config["kind"], "NodeConfig");
        assert_eq!(config["spec"]["cluster"]["name"], "region-a");
        assert_eq!(config["spec"]["cluster"]["cidr"], "10.100.0.0/16");
        assert_eq!(
            config["spec"]["kubelet"]["flags"],
            json!([
                format!("--node-labels=cloud.questdb.io/dedicated={UID}"),
                format!("--register-with-taints=cloud.questdb.io/dedicated={UID}:NoSchedule"),
            ])
        );
    }

    #[test]
    fn bottlerocket_is_toml_settings() {
        let text = build_user_data(&desired().names, &boot(NodeOs::Bottlerocket));
        assert!(text.contains("[settings.kubernetes]\ncluster-name = \"region-a\"\n"), "{text}");
        assert!(text.contains("api-server = \"https://ABC.gr7.us-east-1.eks.amazonaws.com\"\n"));
        assert!(text.contains(&format!(
            "[settings.kubernetes.node-labels]\n\"cloud.questdb.io/dedicated\" = \"{UID}\"\n"
        )));
        assert!(text.contains(&format!(
            "[settings.kubernetes.node-taints]\n\"cloud.questdb.io/dedicated\" = [\"{UID}:NoSchedule\"]\n"
        )));
    }

    #[test]
    fn encoding_and_toml_escapes() {
        let text = build_user_data(&desired().names, &boot(NodeOs::Al2023));
        let decoded = base64::engine::general_purpose::STANDARD.decode(encode_user_data(&text)).unwrap();
        assert_eq!(decoded, text.as_bytes());
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("a\nb"), r#""a\u000Ab""#);
    }
}
