//! Taking over a running database another provisioner built (`spec.adopt`, the migration path):
//! its instance, volume and security group are tagged as this database's, and its node gains the
//! database's label and taint, so every later step finds them as if the operator had made them.
//! Nothing is replaced, restarted or resized: the spec must say what runs, or the adoption is
//! refused. The Kubernetes objects only gain owner references while the spec stays as adopted
//! ([`keep_as_is`]); its next change goes the ordinary way.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, ListParams, Patch, PatchParams};
use qdb_crd::{AdoptSpec, DegradedReason, QuestDBSpec, keys};

use super::aws::facts::instance_of;
use super::aws::plan::{Take, is_live};
use super::{Error, Facts, aws_err, kube_err};
use crate::aws::inventory::Found;
use crate::aws::{Instance, Owner, Volume};
use crate::build::Desired;
use crate::context::Context;

/// The part every resource shares: nobody else's, and not a volume a deleted database kept.
fn ownership(kind: &str, id: &str, tags: &BTreeMap<String, String>, uid: &str) -> Option<Take> {
    match tags.get(keys::OWNER_UID) {
        Some(o) if o == uid => Some(Take::AlreadyOurs),
        Some(_) => {
            let db = tags.get(keys::DATABASE).map_or("another database", String::as_str);
            Some(Take::Refuse(format!("{kind} {id} belongs to {db}")))
        }
        None if tags.contains_key(keys::RETAINED) => Some(Take::Refuse(format!(
            "{kind} {id} was kept by a deleted database: start from it with volume.fromVolume"
        ))),
        None => None,
    }
}

pub fn judge_instance(i: Option<&Instance>, a: &AdoptSpec, spec: &QuestDBSpec, uid: &str) -> Take {
    let id = &a.instance_id;
    let Some(i) = i else {
        return Take::Refuse(format!("EC2 lists no instance {id}"));
    };
    if let Some(v) = ownership("instance", id, &i.tags, uid) {
        return v;
    }
    if !is_live(i) {
        return Take::Refuse(format!("instance {id} is {:?}: only a running database is adopted", i.state));
    }
    if i.instance_type != spec.instance_type || i.image_id != spec.node_image {
        return Take::Refuse(format!(
            "instance {id} is a {} from {}, the spec says a {} from {}: an adopting create states what runs",
            i.instance_type, i.image_id, spec.instance_type, spec.node_image
        ));
    }
    Take::Take
}

pub fn judge_volume(v: Option<&Volume>, a: &AdoptSpec, spec: &QuestDBSpec, uid: &str) -> Take {
    let id = &a.volume_id;
    let Some(v) = v else {
        return Take::Refuse(format!("EC2 lists no volume {id}"));
    };
    if let Some(verdict) = ownership("volume", id, &v.tags, uid) {
        return verdict;
    }
    let want = &spec.volume;
    if v.volume_type != want.type_.as_str() || v.size_gib != want.size_gib {
        return Take::Refuse(format!(
            "volume {id} is {} GiB {}, the spec says {} GiB {}: an adopting create states what runs",
            v.size_gib,
            v.volume_type,
            want.size_gib,
            want.type_.as_str()
        ));
    }
    if !v.attachments.iter().any(|x| x.instance_id == a.instance_id) {
        return Take::Refuse(format!("volume {id} is not attached to instance {}", a.instance_id));
    }
    Take::Take
}

/// `owner` is the group's owner-UID tag, empty when it has none.
pub fn judge_group(listed: Option<&str>, a: &AdoptSpec, uid: &str) -> Take {
    let id = &a.security_group_id;
    match listed {
        None => Take::Refuse(format!("EC2 lists no security group {id}")),
        Some("") => Take::Take,
        Some(o) if o == uid => Take::AlreadyOurs,
        Some(_) => Take::Refuse(format!("security group {id} belongs to another database")),
    }
}

/// While the database serves from the instance it adopted and the spec is as adopted, the
/// Kubernetes objects are kept as they are: rewriting the pod template would restart it. A
/// failover to a new node rebuilds them the ordinary way (that pod starts anew anyway).
pub fn keep_as_is(d: &Desired, serving: Option<&Instance>) -> bool {
    let adopted = d.spec.adopt.as_ref().map(|a| a.instance_id.as_str());
    d.adopting && serving.is_some_and(|i| Some(i.id.as_str()) == adopted)
}

/// The node's taints with the database's dedicated taint in place of any other value of its key
/// (a legacy node was tainted for the database under the old provisioner's id).
pub fn adopted_taints(existing: &[Taint], ours: &Taint) -> Vec<Taint> {
    let mut out: Vec<Taint> = existing.iter().filter(|t| t.key != ours.key).cloned().collect();
    out.push(ours.clone());
    out
}

/// Tags what `spec.adopt` names and is not this database's yet, filling `found` in. Returns
/// whether all three are this database's; false after a refusal (said as the database's
/// failure), when nothing else may be made in their place.
pub(super) async fn take_over(
    ctx: &Context,
    d: &Desired,
    owner: &Owner,
    found: &mut Found,
    facts: &mut Facts,
) -> Result<bool, Error> {
    let Some(a) = d.spec.adopt.as_ref() else { return Ok(true) };
    let aws = &ctx.aws;
    let uid = d.names.uid();
    // The legacy resource keeps its console name.
    let tags: Vec<(String, String)> = aws.tags(owner).into_iter().filter(|(k, _)| k != "Name").collect();
    let refuse = |facts: &mut Facts, message: String| {
        facts.pod_failure = Some((DegradedReason::AdoptionRefused, message));
        Ok(false)
    };

    if found.security_group.is_none() {
        let by_id =
            aws_sdk_ec2::types::Filter::builder().name("group-id").values(&a.security_group_id).build();
        let listed =
            aws.list_security_groups(vec![by_id]).await.map_err(aws_err("reading the group to adopt"))?;
        let first = listed.into_iter().next();
        match judge_group(first.as_ref().map(|(o, _)| o.as_str()), a, uid) {
            Take::Refuse(m) => return refuse(facts, m),
            verdict => {
                let Some((_, sg)) = first else { return Ok(false) };
                if verdict == Take::Take {
                    aws.retag(&sg.id, &tags, &[]).await.map_err(aws_err("adopting the security group"))?;
                    facts.did("AdoptedSecurityGroup", sg.id.clone());
                }
                ctx.inventory.created_group(uid, &sg);
                found.security_group = Some(sg);
            }
        }
    }
    if found.volume.is_none() {
        let by_id = aws_sdk_ec2::types::Filter::builder().name("volume-id").values(&a.volume_id).build();
        let listed = aws.list_volumes(vec![by_id]).await.map_err(aws_err("reading the volume to adopt"))?;
        let v = listed.into_iter().map(|(_, v)| v).next();
        match judge_volume(v.as_ref(), a, &d.spec, uid) {
            Take::Refuse(m) => return refuse(facts, m),
            verdict => {
                let Some(mut v) = v else { return Ok(false) };
                if verdict == Take::Take {
                    aws.retag(&v.id, &tags, &[]).await.map_err(aws_err("adopting the volume"))?;
                    v.tags.extend(tags.iter().cloned());
                    facts.did("AdoptedVolume", format!("{} ({} GiB {})", v.id, v.size_gib, v.volume_type));
                }
                ctx.inventory.created_volume(uid, &v);
                found.volume = Some(v);
            }
        }
    }
    if found.instances.is_empty() {
        let i =
            aws.describe_instance(&a.instance_id).await.map_err(aws_err("reading the instance to adopt"))?;
        match judge_instance(i.as_ref(), a, &d.spec, uid) {
            Take::Refuse(m) => return refuse(facts, m),
            verdict => {
                let Some(mut i) = i else { return Ok(false) };
                if verdict == Take::Take {
                    // Launch 0: the database's own launches count on from 1.
                    let mut with_launch = tags.clone();
                    with_launch.push((keys::LAUNCH.into(), "0".into()));
                    aws.retag(&i.id, &with_launch, &[]).await.map_err(aws_err("adopting the instance"))?;
                    i.tags.extend(with_launch);
                    facts.did("AdoptedInstance", format!("{} ({}, {})", i.id, i.instance_type, i.image_id));
                }
                ctx.inventory.created_instance(uid, &i);
                found.instances = vec![i];
            }
        }
    }
    Ok(true)
}

/// Gives the adopted instance's node the database's label and taint, so the node lookups find
/// it and a rebuilt pod lands on it, and returns it so labelled (None while it has not joined).
/// The running pod stays: a NoSchedule taint evicts nothing.
pub(super) async fn label_node(
    ctx: &Context,
    d: &Desired,
    instance_id: &str,
    facts: &mut Facts,
) -> Result<Option<Node>, Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    ctx.metrics.kube("list", "Node");
    let list =
        nodes.list(&ListParams::default()).await.map_err(kube_err("aws", "listing nodes to adopt one"))?;
    let Some(node) = list.items.into_iter().find(|n| instance_of(n) == Some(instance_id)) else {
        facts
            .wait(qdb_crd::WaitReason::NodeJoining, format!("no node of adopted instance {instance_id} yet"));
        return Ok(None);
    };
    let name = node.metadata.name.clone().unwrap_or_default();
    let existing = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let taints = adopted_taints(&existing, &d.names.node_taint());
    let patch =
        serde_json::json!({"metadata": {"labels": d.names.node_labels()}, "spec": {"taints": taints}});
    ctx.metrics.kube("patch", "Node");
    let labelled = nodes
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err("aws", format!("labelling adopted node {name}")))?;
    facts.did("AdoptedNode", format!("{name} labelled and tainted for the database"));
    Ok(Some(labelled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::{AttachmentState, InstanceState, VolumeState, fixtures};
    use crate::build::fixtures::{UID, questdb};

    fn adopt() -> AdoptSpec {
        AdoptSpec {
            instance_id: "i-0123456789abcdef0".into(),
            volume_id: "vol-0123456789abcdef0".into(),
            security_group_id: "sg-0123456789abcdef0".into(),
        }
    }

    fn tagged(tags: &[(&str, &str)]) -> BTreeMap<String, String> {
        tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// What the fixture database's spec says runs.
    fn instance(state: InstanceState, tags: &[(&str, &str)]) -> Instance {
        Instance {
            state,
            image_id: "ami-0123456789abcdef0".into(),
            instance_type: "m6i.xlarge".into(),
            tags: tagged(tags),
            ..fixtures::instance(&adopt().instance_id)
        }
    }

    fn volume(size_gib: u32, attached_to: &str, tags: &[(&str, &str)]) -> Volume {
        Volume {
            size_gib,
            state: VolumeState::InUse,
            attachments: vec![fixtures::attachment(attached_to, AttachmentState::Attached)],
            tags: tagged(tags),
            ..fixtures::volume(&adopt().volume_id)
        }
    }

    #[test]
    fn a_running_instance_as_the_spec_says_is_taken_and_nothing_else() {
        let spec = questdb().spec;
        let a = adopt();
        assert_eq!(judge_instance(Some(&instance(InstanceState::Running, &[])), &a, &spec, UID), Take::Take);
        let ours = instance(InstanceState::Running, &[(keys::OWNER_UID, UID)]);
        assert_eq!(judge_instance(Some(&ours), &a, &spec, UID), Take::AlreadyOurs);
        let other = instance(InstanceState::Running, &[(keys::OWNER_UID, "x"), (keys::DATABASE, "db-other")]);
        assert!(
            matches!(judge_instance(Some(&other), &a, &spec, UID), Take::Refuse(m) if m.contains("db-other"))
        );
        let stopped = instance(InstanceState::Stopped, &[]);
        assert!(matches!(judge_instance(Some(&stopped), &a, &spec, UID), Take::Refuse(_)));
        let mut bigger = questdb().spec;
        bigger.instance_type = "m6i.2xlarge".into();
        let refused = judge_instance(Some(&instance(InstanceState::Running, &[])), &a, &bigger, UID);
        assert!(matches!(&refused, Take::Refuse(m) if m.contains("states what runs")), "{refused:?}");
        assert!(matches!(judge_instance(None, &a, &spec, UID), Take::Refuse(_)));
    }

    #[test]
    fn the_volume_must_be_the_specs_and_attached_to_the_adopted_instance() {
        let spec = questdb().spec;
        let a = adopt();
        let size = spec.volume.size_gib;
        assert_eq!(judge_volume(Some(&volume(size, &a.instance_id, &[])), &a, &spec, UID), Take::Take);
        // A grown or shrunk volume would be a change the adoption promised not to make.
        assert!(matches!(
            judge_volume(Some(&volume(size + 1, &a.instance_id, &[])), &a, &spec, UID),
            Take::Refuse(_)
        ));
        let elsewhere = volume(size, "i-0fffffffffffffff0", &[]);
        assert!(
            matches!(judge_volume(Some(&elsewhere), &a, &spec, UID), Take::Refuse(m) if m.contains("not attached"))
        );
        let kept = volume(size, &a.instance_id, &[(keys::RETAINED, "true")]);
        assert!(
            matches!(judge_volume(Some(&kept), &a, &spec, UID), Take::Refuse(m) if m.contains("fromVolume"))
        );
    }

    #[test]
    fn a_group_another_database_owns_is_refused() {
        let a = adopt();
        assert_eq!(judge_group(Some(""), &a, UID), Take::Take);
        assert_eq!(judge_group(Some(UID), &a, UID), Take::AlreadyOurs);
        assert!(matches!(judge_group(Some("x"), &a, UID), Take::Refuse(_)));
        assert!(matches!(judge_group(None, &a, UID), Take::Refuse(_)));
    }

    #[test]
    fn the_objects_stay_as_they_are_only_on_the_adopted_instance_until_the_spec_changes() {
        let mut q = questdb();
        q.spec.adopt = Some(adopt());
        q.metadata.generation = Some(1);
        let d = Desired::new(&q, "example.com").unwrap();
        let adopted = instance(InstanceState::Running, &[]);
        assert!(keep_as_is(&d, Some(&adopted)));
        let mut replacement = adopted.clone();
        replacement.id = "i-0aaaaaaaaaaaaaaa0".into();
        assert!(!keep_as_is(&d, Some(&replacement)), "a failover's pod is built the ordinary way");
        q.status = Some(qdb_crd::QuestDBStatus { adopted_generation: Some(1), ..Default::default() });
        q.metadata.generation = Some(2);
        let changed = Desired::new(&q, "example.com").unwrap();
        assert!(
            !keep_as_is(&changed, Some(&adopted)),
            "the first change after the adoption goes the ordinary way"
        );
        q.metadata.generation = Some(1);
        assert!(keep_as_is(&Desired::new(&q, "example.com").unwrap(), Some(&adopted)));
    }

    #[test]
    fn the_node_keeps_other_taints_and_takes_the_databases() {
        let names = Desired::new(&questdb(), "example.com").unwrap().names;
        let legacy = Taint {
            key: keys::DEDICATED.into(),
            value: Some("legacy-id".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let other = Taint {
            key: "example.com/gpu".into(),
            value: None,
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let taints = adopted_taints(&[legacy, other.clone()], &names.node_taint());
        assert_eq!(taints, vec![other, names.node_taint()]);
    }
}
