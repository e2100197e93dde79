//! Reads the kubelet flags out of an instance's user data, the way a node bootstrap script hands
//! them to the kubelet. Only the two flags the operator relies on are understood.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeletFlags {
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
    #[error("node label {0:?} is not key=value")]
    Label(String),
    #[error("taint {0:?} is not key[=value]:Effect")]
    Taint(String),
}

/// Finds `--node-labels=` and `--register-with-taints=` anywhere in the text (a shell script, a
/// cloud-init file or a plain flag list); each may appear more than once and accumulates.
pub fn parse(user_data: &str) -> Result<KubeletFlags, ParseError> {
    let mut flags = KubeletFlags::default();
    for token in user_data.split_whitespace() {
        let token = token.trim_matches(|c| c == '"' || c == '\'');
        if let Some(list) = token.strip_prefix("--node-labels=") {
            for item in split_list(list) {
                let (k, v) = item
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| ParseError::Label(item.to_string()))?;
                flags.labels.insert(k.to_string(), v.to_string());
            }
        } else if let Some(list) = token.strip_prefix("--register-with-taints=") {
            for item in split_list(list) {
                flags.taints.push(parse_taint(item)?);
            }
        }
    }
    Ok(flags)
}

fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(|s| s.trim_matches(|c| c == '"' || c == '\'')).filter(|s| !s.is_empty())
}

fn parse_taint(item: &str) -> Result<Taint, ParseError> {
    let bad = || ParseError::Taint(item.to_string());
    let (kv, effect) = item.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(bad());
    }
    let (key, value) = match kv.split_once('=') {
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

    #[test]
    fn reads_flags_from_a_bootstrap_script() {
        let script = r#"#!/bin/bash
/etc/eks/bootstrap.sh region-a --kubelet-extra-args '--node-labels=cloud.questdb.io/database=db-1,tier=db --register-with-taints=cloud.questdb.io/dedicated=db-1:NoSchedule'
"#;
        let flags = parse(script).unwrap();
        assert_eq!(flags.labels.get("cloud.questdb.io/database").unwrap(), "db-1");
        assert_eq!(flags.labels.get("tier").unwrap(), "db");
        assert_eq!(
            flags.taints,
            vec![Taint {
                key: "cloud.questdb.io/dedicated".into(),
                value: Some("db-1".into()),
                effect: "NoSchedule".into()
            }]
        );
    }

    #[test]
    fn taint_without_value_and_repeated_flags() {
        let flags =
            parse("--register-with-taints=a:NoExecute --register-with-taints=b=c:NoSchedule").unwrap();
        assert_eq!(flags.taints.len(), 2);
        assert_eq!(flags.taints[0].value, None);
        assert_eq!(flags.taints[1].key, "b");
    }

    #[test]
    fn no_flags_is_an_empty_result() {
        assert_eq!(parse("echo hello").unwrap(), KubeletFlags::default());
    }

    #[test]
    fn malformed_flags_are_errors() {
        assert_eq!(parse("--node-labels=novalue"), Err(ParseError::Label("novalue".into())));
        assert_eq!(parse("--register-with-taints=k=v"), Err(ParseError::Taint("k=v".into())));
        assert_eq!(parse("--register-with-taints=k:Sometimes"), Err(ParseError::Taint("k:Sometimes".into())));
    }
}
