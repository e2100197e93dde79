//! The pod's resources: the share of the node it runs on ([`crate::build::resources`]), from EC2's
//! figures for that node's instance type (read once per type and remembered: they never change).
//!
//! The pod is sized for the serving instance's type, and during a node move, from the pass that
//! drains the old node on, for the replacement's: an instance type change then recreates the pod
//! once, on the new node, instead of restarting it on the old one first and again after the move.

use qdb_crd::{DegradedReason, ReplaceStep, ReplacementStatus};

use super::{Error, Facts, aws_err};
use crate::aws::{Instance, InstanceType};
use crate::build::Desired;
use crate::build::resources::{MIN_MEMORY_MIB, database_share};
use crate::context::Context;

/// The instance type the pod is built for: the replacement's once a move stops the database on
/// the old node, else the serving instance's, else (nothing launched) the spec's.
pub fn pod_node_type<'a>(
    spec_type: &'a str,
    serving: Option<&'a Instance>,
    replacement: Option<&ReplacementStatus>,
    instances: &'a [Instance],
) -> &'a str {
    let moving_to = replacement
        .filter(|m| m.step >= ReplaceStep::Draining)
        .and_then(|m| instances.iter().find(|i| i.id == m.to_instance));
    moving_to.or(serving).map_or(spec_type, |i| i.instance_type.as_str())
}

pub async fn ensure(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    let name = pod_node_type(
        &d.spec.instance_type,
        facts.instance.as_ref(),
        facts.replacement.as_ref(),
        &facts.instances,
    )
    .to_string();
    let Some(t) = instance_type(ctx, &name).await? else {
        facts.pod_failure = Some((DegradedReason::InvalidSpec, format!("EC2 knows no instance type {name}")));
        return Ok(());
    };
    facts.pod_share = database_share(&t);
    if facts.pod_share.is_none() {
        let message = format!(
            "{name} ({} MiB) leaves a database less than {MIN_MEMORY_MIB} MiB after the node's reserves",
            t.memory_mib
        );
        facts.pod_failure = Some((DegradedReason::InvalidSpec, message));
    }
    Ok(())
}

async fn instance_type(ctx: &Context, name: &str) -> Result<Option<InstanceType>, Error> {
    if let Some(t) = ctx.instance_types.lock().ok().and_then(|c| c.get(name).copied()) {
        return Ok(Some(t));
    }
    let t = ctx.aws.describe_instance_type(name).await.map_err(aws_err("reading the instance type"))?;
    if let (Some(t), Ok(mut cache)) = (t, ctx.instance_types.lock()) {
        cache.insert(name.to_string(), t);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use qdb_crd::ReplaceWhy;

    use super::*;

    fn instance(id: &str, instance_type: &str) -> Instance {
        Instance { instance_type: instance_type.into(), ..crate::aws::fixtures::instance(id) }
    }

    fn moving(step: ReplaceStep) -> ReplacementStatus {
        ReplacementStatus {
            from_instance: "i-old".into(),
            to_instance: "i-new".into(),
            why: ReplaceWhy::Upgrade,
            reason: "instance type".into(),
            step,
            started_at: Time(Timestamp::UNIX_EPOCH),
            fenced_at: None,
        }
    }

    #[test]
    fn the_pod_follows_the_move_from_the_drain_on() {
        let old = instance("i-old", "m6i.large");
        let all = [old.clone(), instance("i-new", "m6i.xlarge")];
        assert_eq!(pod_node_type("m6i.xlarge", None, None, &[]), "m6i.xlarge", "nothing launched yet");
        assert_eq!(
            pod_node_type("m6i.xlarge", Some(&old), None, &all),
            "m6i.large",
            "no move yet: no restart"
        );
        let waiting = moving(ReplaceStep::Launched);
        assert_eq!(pod_node_type("m6i.xlarge", Some(&old), Some(&waiting), &all), "m6i.large");
        for step in
            [ReplaceStep::Draining, ReplaceStep::StopIssued, ReplaceStep::Fenced, ReplaceStep::Attaching]
        {
            assert_eq!(
                pod_node_type("m6i.xlarge", Some(&old), Some(&moving(step)), &all),
                "m6i.xlarge",
                "{step:?}"
            );
        }
        // A replacement EC2 no longer lists: the pod stays as it is.
        let gone = [old.clone()];
        assert_eq!(
            pod_node_type("m6i.xlarge", Some(&old), Some(&moving(ReplaceStep::Fenced)), &gone),
            "m6i.large"
        );
    }
}
