//! Reads an instance's user data the way the node's bootstrap does, in the two formats current
//! EKS node images take: AL2023's nodeadm `NodeConfig` (plain YAML or a part of content type
//! `application/node.eks.aws` in a MIME multipart document) and Bottlerocket's TOML settings.
//! Like the real bootstrap, it refuses what it cannot read, or a config without the cluster's
//! coordinates; such a node never joins. Of the kubelet's settings only the node labels and the
//! taints matter here.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeletFlags {
    /// The EKS cluster the node joins.
    pub cluster: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: Option<String>,
    pub effect: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("user data is neither a nodeadm NodeConfig nor Bottlerocket settings")]
    UnknownFormat,
    #[error("the MIME document has no application/node.eks.aws part with a NodeConfig")]
    NoNodeConfig,
    #[error("NodeConfig: {0}")]
    Yaml(String),
    #[error("Bottlerocket settings: {0}")]
    Toml(String),
    #[error("{0} is missing: the node cannot find its cluster")]
    Missing(&'static str),
    #[error("node label {0:?} is not key=value")]
    Label(String),
    #[error("taint {0:?} is not key[=value]:Effect")]
    Taint(String),
}

pub fn parse(user_data: &str) -> Result<KubeletFlags, ParseError> {
    let text = user_data.trim_start();
    if text.starts_with("MIME-Version:") || text.starts_with("Content-Type:") {
        let config = mime_parts(text)
            .into_iter()
            .filter(|(content_type, _)| content_type == "application/node.eks.aws")
            .find_map(|(_, body)| node_config(&body).transpose())
            .ok_or(ParseError::NoNodeConfig)??;
        return from_node_config(&config);
    }
    if text.lines().any(|l| l.trim_start().starts_with("[settings")) {
        return from_bottlerocket(text);
    }
    if text.contains("NodeConfig")
        && let Some(config) = node_config(text)?
    {
        return from_node_config(&config);
    }
    Err(ParseError::UnknownFormat)
}

/// The parts of a multipart document: (content type, body).
fn mime_parts(text: &str) -> Vec<(String, String)> {
    let Some(boundary) = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.split_once("boundary=").map(|(_, b)| b.trim().trim_matches('"').to_string()))
    else {
        return Vec::new();
    };
    let delimiter = format!("--{boundary}");
    text.split(&delimiter)
        .skip(1)
        .filter(|part| !part.starts_with("--"))
        .filter_map(|part| {
            let part = part.strip_prefix("\r\n").or_else(|| part.strip_prefix('\n')).unwrap_or(part);
            let (headers, body) = part.split_once("\n\n")?;
            let content_type = headers
                .lines()
                .find_map(|h| h.strip_prefix("Content-Type:"))
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
                .unwrap_or_default();
            Some((content_type, body.to_string()))
        })
        .collect()
}

/// The first NodeConfig document of a YAML stream, if any.
fn node_config(yaml: &str) -> Result<Option<serde_yaml::Value>, ParseError> {
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ParseError::Yaml(e.to_string()))?;
        if value["kind"].as_str() == Some("NodeConfig")
            && value["apiVersion"].as_str().is_some_and(|v| v.starts_with("node.eks.aws/"))
        {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn from_node_config(config: &serde_yaml::Value) -> Result<KubeletFlags, ParseError> {
    let cluster = &config["spec"]["cluster"];
    // nodeadm's minimum: the cluster's name, endpoint, CA and service CIDR.
    let required = |key: &'static str, what: &'static str| {
        cluster[key].as_str().filter(|v| !v.is_empty()).map(str::to_string).ok_or(ParseError::Missing(what))
    };
    let mut flags = KubeletFlags { cluster: required("name", "spec.cluster.name")?, ..Default::default() };
    required("apiServerEndpoint", "spec.cluster.apiServerEndpoint")?;
    required("certificateAuthority", "spec.cluster.certificateAuthority")?;
    required("cidr", "spec.cluster.cidr")?;
    let kubelet_flags = config["spec"]["kubelet"]["flags"].as_sequence().cloned().unwrap_or_default();
    for flag in kubelet_flags.iter().filter_map(|f| f.as_str()) {
        if let Some(list) = flag.strip_prefix("--node-labels=") {
            for item in split_list(list) {
                let (k, v) = item
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| ParseError::Label(item.to_string()))?;
                flags.labels.insert(k.to_string(), v.to_string());
            }
        } else if let Some(list) = flag.strip_prefix("--register-with-taints=") {
            for item in split_list(list) {
                flags.taints.push(parse_taint(item)?);
            }
        }
    }
    Ok(flags)
}

fn from_bottlerocket(text: &str) -> Result<KubeletFlags, ParseError> {
    let doc: toml_edit::Document<String> =
        text.parse().map_err(|e: toml_edit::TomlError| ParseError::Toml(e.to_string()))?;
    let kubernetes = doc
        .get("settings")
        .and_then(|s| s.get("kubernetes"))
        .ok_or(ParseError::Missing("settings.kubernetes"))?;
    let required = |key: &str, what: &'static str| {
        kubernetes
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .ok_or(ParseError::Missing(what))
    };
    let mut flags = KubeletFlags {
        cluster: required("cluster-name", "settings.kubernetes.cluster-name")?.to_string(),
        ..Default::default()
    };
    required("api-server", "settings.kubernetes.api-server")?;
    required("cluster-certificate", "settings.kubernetes.cluster-certificate")?;
    if let Some(labels) = kubernetes.get("node-labels").and_then(|l| l.as_table_like()) {
        for (k, v) in labels.iter() {
            let v = v.as_str().ok_or_else(|| ParseError::Label(k.to_string()))?;
            flags.labels.insert(k.to_string(), v.to_string());
        }
    }
    if let Some(taints) = kubernetes.get("node-taints").and_then(|t| t.as_table_like()) {
        for (key, item) in taints.iter() {
            // key = "value:Effect" or key = ["value:Effect", ...]
            let values: Vec<&str> = match item.as_array() {
                Some(list) => list.iter().filter_map(|v| v.as_str()).collect(),
                None => item.as_str().into_iter().collect(),
            };
            for value in values {
                flags.taints.push(parse_taint(&format!("{key}={value}"))?);
            }
        }
    }
    Ok(flags)
}

fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_taint(item: &str) -> Result<Taint, ParseError> {
    let bad = || ParseError::Taint(item.to_string());
    let (kv, effect) = item.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(bad());
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, "")) => (k, None),
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(bad());
    }
    Ok(Taint { key: key.to_string(), value, effect: effect.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What qdb-operator's `build_user_data` writes for AL2023 (operator/src/build/userdata.rs).
    const AL2023: &str = r#"MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="//qdb-node//"

--//qdb-node//
Content-Type: application/node.eks.aws

# Dedicated node of QuestDB ns/db-1 (uid u-1), launched by qdb-operator.
---
apiVersion: node.eks.aws/v1alpha1
kind: NodeConfig
spec:
  cluster:
    apiServerEndpoint: https://127.0.0.1:18003
    certificateAuthority: UEVN
    cidr: 10.0.0.0/24
    name: region-a
  kubelet:
    flags:
    - --node-labels=cloud.questdb.io/dedicated=u-1,tier=db
    - --register-with-taints=cloud.questdb.io/dedicated=u-1:NoSchedule

--//qdb-node//--
"#;

    /// What it writes for Bottlerocket.
    const BOTTLEROCKET: &str = r#"# Dedicated node of QuestDB ns/db-1 (uid u-1), launched by qdb-operator.
[settings.kubernetes]
cluster-name = "region-a"
api-server = "https://127.0.0.1:18003"
cluster-certificate = "UEVN"

[settings.kubernetes.node-labels]
"cloud.questdb.io/dedicated" = "u-1"

[settings.kubernetes.node-taints]
"cloud.questdb.io/dedicated" = ["u-1:NoSchedule"]
"#;

    fn dedicated() -> Taint {
        Taint {
            key: "cloud.questdb.io/dedicated".into(),
            value: Some("u-1".into()),
            effect: "NoSchedule".into(),
        }
    }

    #[test]
    fn reads_an_al2023_node_config() {
        let flags = parse(AL2023).unwrap();
        assert_eq!(flags.cluster, "region-a");
        assert_eq!(flags.labels.get("cloud.questdb.io/dedicated").unwrap(), "u-1");
        assert_eq!(flags.labels.get("tier").unwrap(), "db");
        assert_eq!(flags.taints, vec![dedicated()]);
        // nodeadm also takes the NodeConfig on its own.
        let plain =
            AL2023.split("application/node.eks.aws\n\n").nth(1).unwrap().split("\n--//").next().unwrap();
        assert_eq!(parse(plain).unwrap(), flags);
    }

    #[test]
    fn reads_bottlerocket_settings() {
        let flags = parse(BOTTLEROCKET).unwrap();
        assert_eq!(flags.cluster, "region-a");
        assert_eq!(flags.labels.get("cloud.questdb.io/dedicated").unwrap(), "u-1");
        assert_eq!(flags.taints, vec![dedicated()]);
        let single = BOTTLEROCKET.replace("[\"u-1:NoSchedule\"]", "\"u-1:NoSchedule\"");
        assert_eq!(parse(&single).unwrap().taints, vec![dedicated()]);
    }

    #[test]
    fn the_old_bootstrap_script_and_incomplete_configs_do_not_join() {
        let script = "#!/bin/bash\n/etc/eks/bootstrap.sh region-a --kubelet-extra-args \
                      '--node-labels=a=b --register-with-taints=k=v:NoSchedule'\n";
        assert_eq!(parse(script), Err(ParseError::UnknownFormat));
        let no_ca = AL2023.replace("    certificateAuthority: UEVN\n", "");
        assert_eq!(parse(&no_ca), Err(ParseError::Missing("spec.cluster.certificateAuthority")));
        let no_server = BOTTLEROCKET.replace("api-server = \"https://127.0.0.1:18003\"\n", "");
        assert_eq!(parse(&no_server), Err(ParseError::Missing("settings.kubernetes.api-server")));
        let other_part = AL2023.replace("application/node.eks.aws", "text/x-shellscript");
        assert_eq!(parse(&other_part), Err(ParseError::NoNodeConfig));
    }

    #[test]
    fn malformed_labels_and_taints_are_errors() {
        let label = AL2023.replace("tier=db", "tier");
        assert_eq!(parse(&label), Err(ParseError::Label("tier".into())));
        let taint = AL2023.replace("u-1:NoSchedule", "u-1:Sometimes");
        assert_eq!(parse(&taint), Err(ParseError::Taint("cloud.questdb.io/dedicated=u-1:Sometimes".into())));
    }
}
