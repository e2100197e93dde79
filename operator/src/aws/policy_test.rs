//! The IAM policy in deploy/iam/operator-policy.json allows every AWS operation this module
//! can call: each is one `const ...: &str = "<Operation>"` passed to `call`, in ec2.rs and
//! route53.rs. A new call without its action in the policy fails here, before AWS refuses it
//! with UnauthorizedOperation in production (the emulator checks no IAM).

use std::collections::BTreeSet;

/// Called only with --create-hosted-zone, which the local cloud uses and production does not.
const LOCAL_ONLY: &[&str] = &["route53:CreateHostedZone"];

fn operations(service: &str, source: &str) -> BTreeSet<String> {
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("const ").and_then(|r| r.split_once(": &str = \"")))
        .filter_map(|(_, rest)| rest.strip_suffix("\";"))
        .filter(|op| op.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        .map(|op| format!("{service}:{op}"))
        .collect()
}

fn allowed(policy: &serde_json::Value) -> BTreeSet<String> {
    let statements = policy["Statement"].as_array().cloned().unwrap_or_default();
    statements
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(list) => {
                list.iter().filter_map(|a| a.as_str().map(str::to_string)).collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn the_policy_allows_every_operation_the_operator_calls() {
    let policy: serde_json::Value =
        serde_json::from_str(include_str!("../../../deploy/iam/operator-policy.json")).unwrap();
    let allowed = allowed(&policy);
    let mut called = operations("ec2", include_str!("ec2.rs"));
    called.extend(operations("route53", include_str!("route53.rs")));
    assert!(called.len() >= 19, "the scan found the calls: {called:?}");
    assert!(called.contains("ec2:RunInstances") && called.contains("route53:ChangeResourceRecordSets"));
    let missing: Vec<_> =
        called.iter().filter(|op| !allowed.contains(*op) && !LOCAL_ONLY.contains(&op.as_str())).collect();
    assert!(missing.is_empty(), "deploy/iam/operator-policy.json does not allow {missing:?}");
    // Launching with the node instance profile needs the node role passed to EC2.
    assert!(allowed.contains("iam:PassRole"));
    // Nothing allowed that the operator never calls (least privilege), except PassRole.
    let unused: Vec<_> = allowed.iter().filter(|a| !called.contains(*a) && *a != "iam:PassRole").collect();
    assert!(unused.is_empty(), "the policy allows {unused:?}, which the operator never calls");
}
