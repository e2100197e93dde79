//! What the operator really called in AWS, from its `qdb_operator_aws_calls_total` counter, against
//! the IAM policy it is deployed with (deploy/iam/operator-policy.json).

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};

/// `service:Operation` of every AWS call a `/metrics` text counts.
pub fn aws_actions(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("qdb_operator_aws_calls_total{"))
        .filter_map(|l| {
            let labels = l.split_once('{')?.1.split_once('}')?.0;
            let label = |name: &str| {
                labels.split(',').find_map(|kv| kv.strip_prefix(&format!("{name}=\""))?.strip_suffix('"'))
            };
            Some(format!("{}:{}", label("service")?, label("operation")?))
        })
        .collect()
}

/// Every action the production policy allows.
pub fn policy_actions() -> Result<BTreeSet<String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/iam/operator-policy.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let policy: serde_json::Value = serde_json::from_str(&text)?;
    let mut out = BTreeSet::new();
    for statement in policy["Statement"].as_array().context("Statement")? {
        match &statement["Action"] {
            serde_json::Value::String(a) => {
                out.insert(a.clone());
            }
            serde_json::Value::Array(list) => {
                out.extend(list.iter().filter_map(|a| a.as_str().map(str::to_string)))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Fails unless every call in `metrics` is allowed by the policy (route53:CreateHostedZone aside:
/// only the local cloud creates its zone).
pub fn ensure_policy_allows(metrics: &str) -> Result<BTreeSet<String>> {
    let called = aws_actions(metrics);
    ensure!(!called.is_empty(), "no AWS call counted: is this an operator's /metrics?");
    let allowed = policy_actions()?;
    let missing: Vec<_> =
        called.iter().filter(|a| !allowed.contains(*a) && *a != "route53:CreateHostedZone").collect();
    ensure!(
        missing.is_empty(),
        "the operator called {missing:?}, which deploy/iam/operator-policy.json does not allow"
    );
    Ok(called)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_come_from_the_counter_labels() {
        let metrics = "# TYPE qdb_operator_aws_calls counter\n\
            qdb_operator_aws_calls_total{service=\"ec2\",operation=\"RunInstances\",outcome=\"ok\"} 1\n\
            qdb_operator_aws_calls_total{service=\"route53\",operation=\"CreateHostedZone\",outcome=\"ok\"} 1\n\
            qdb_operator_reconciles_total{step=\"aws\",outcome=\"ok\"} 3\n";
        let actions = aws_actions(metrics);
        assert_eq!(actions, ["ec2:RunInstances", "route53:CreateHostedZone"].map(String::from).into());
        assert!(ensure_policy_allows(metrics).is_ok());
        let unknown =
            "qdb_operator_aws_calls_total{service=\"ec2\",operation=\"ImportImage\",outcome=\"ok\"} 1\n";
        assert!(ensure_policy_allows(unknown).is_err());
    }
}
