//! The operator on the local cloud: a QuestDB resource becomes an EC2 node (joined by the node
//! simulator), a volume, a security group, Kubernetes children and a DNS record; drift is
//! repaired; deletion leaves nothing behind; a standby replica takes over.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use qdb_crd::{Phase, QuestDB};
use qdb_operator::aws::{Aws, InstanceState};
use qdb_tests::counters;
use qdb_tests::ec2_calls::Detach;
use qdb_tests::eventually;
use qdb_tests::faults::{FaultProxy, Frozen, Rng};
use qdb_tests::kube_proxy::KubeProxy;
use qdb_tests::rig::{Rig, nothing_left_in_ec2};
use serde_json::json;

// A deadline, not a timing claim: with EC2's timing (seconds per state change) and the whole suite
// sharing two cores, a create takes 20 to 60 s.
const T: Duration = Duration::from_secs(180);

fn questdb(name: &str, version: &str) -> Result<QuestDB> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB",
        "metadata": {"name": name},
        "spec": {"version": version, "instanceType": "m6i.large", "nodeImage": "ami-0a0a0a0a0a0a0a0a0",
                 "volume": {"sizeGib": 20, "type": "gp3"},
                 "serverConfig": {"cairo.commit.lag": "1000"},
                 "network": {"allowedCidrs": ["10.0.0.0/8"]}}
    }))?)
}

async fn apply(api: &Api<QuestDB>, q: &QuestDB) -> Result<QuestDB> {
    let name = q.metadata.name.clone().context("name")?;
    Ok(api.patch(&name, &PatchParams::apply("qdb-provisioner").force(), &Patch::Apply(q)).await?)
}

async fn wait_phase(api: &Api<QuestDB>, name: &str, phase: Phase, timeout: Duration) -> Result<QuestDB> {
    eventually(&format!("{name} {phase:?}"), timeout, || async {
        let q = api.get(name).await?;
        let at_gen = q.status.as_ref().and_then(|s| s.observed_generation) == q.metadata.generation;
        let ok = at_gen && q.status.as_ref().and_then(|s| s.phase) == Some(phase);
        if !ok {
            let s = q.status.as_ref().map(|s| {
                (
                    s.phase,
                    s.conditions
                        .iter()
                        .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                        .collect::<Vec<_>>(),
                )
            });
            anyhow::bail!("status: {s:?}");
        }
        Ok(Some(q))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn create_builds_everything_and_reports_ready() -> Result<()> {
    let rig = Rig::new("op-create", 1).await?;
    let _op =
        rig.spawn_operator("region-a", "a1", &["--tag", "team=databases", "--tag", "cost-center=42"])?;
    let api = rig.questdbs("region-a").await?;
    // An unrelated StatefulSet in the same namespace: never touched.
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &rig.namespace);
    let bystander: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "bystander"},
        "spec": {"replicas": 0, "serviceName": "bystander", "selector": {"matchLabels": {"app": "b"}},
                 "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))?;
    let bystander = sts_api.create(&PostParams::default(), &bystander).await?;

    apply(&api, &questdb("db1", "8.2.1")?).await?;
    let q = wait_phase(&api, "db1", Phase::Running, T).await?;
    let status = q.status.clone().context("status")?;
    let node = status.node.clone().context("node")?;
    let volume = status.volume.clone().context("volume")?;
    let dns = status.dns.clone().context("dns")?;
    assert_eq!(dns.name, format!("db1.{}.{}", rig.namespace, rig.dns_zone()));
    assert_eq!(Some(dns.target.clone()), node.private_ip);
    assert!(status.endpoints.is_some());

    let aws = rig.aws("region-a").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let instances = aws.find_instances(&uid).await?;
    ensure!(instances.len() == 1 && instances[0].state == InstanceState::Running, "{instances:?}");
    assert_eq!(instances[0].id, node.instance_id);
    assert_eq!(instances[0].image_id, "ami-0a0a0a0a0a0a0a0a0");
    let vol = aws.find_volume(&uid).await?.context("volume in EC2")?;
    assert_eq!(vol.id, volume.id);
    assert!(vol.attachments.iter().any(|a| a.instance_id == node.instance_id), "{vol:?}");
    let sg = aws.find_security_group(&uid).await?.context("security group")?;
    assert_eq!(sg.rules.len(), 3, "{sg:?}");
    let zone = aws.hosted_zone(&rig.dns_zone(), false).await?.context("zone")?;
    assert_eq!(aws.get_a_record(&zone, &dns.name).await?.map(|r| r.0), node.private_ip);
    launched_into_the_cluster_network(&rig, "region-a", &node.instance_id, &volume.id, &sg.id).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &rig.namespace);
    let pod = pods.get("db1-0").await?;
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.clone()), Some(node.name.clone()));
    assert_eq!(pod.status.as_ref().and_then(|s| s.phase.clone()).as_deref(), Some("Running"));

    // kubectl shows it the way on-call reads it.
    let kubeconfig = rig.cloud.cluster("region-a")?.kubeconfig.display().to_string();
    let out = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "-n", &rig.namespace, "get", "qdb", "db1"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("Running") && text.contains("8.2.1") && text.contains(&node.name), "{text}");

    // Its status is the StatefulSet controller's business; nothing of the operator's is on it.
    let after = sts_api.get("bystander").await?;
    assert_eq!(after.spec, bystander.spec, "bystander spec untouched");
    assert_eq!(after.metadata.labels, bystander.metadata.labels);
    assert!(after.metadata.owner_references.is_none());
    let managers: Vec<_> =
        after.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    ensure!(!managers.iter().any(|m| m == qdb_crd::OPERATOR_MANAGER), "{managers:?}");
    Ok(())
}

/// Issue 17: what the operator's network settings promise, read back from EC2 as `aws ec2
/// describe-*` shows it: the instance in its zone's subnet of the cluster VPC with an address of
/// the VPC's CIDR, IMDSv2 required at hop limit 1, the node instance profile, EBS-optimized, the
/// database's group and the EKS cluster group; the configured tags on the instance, its network
/// interface, the data volume and the security group, which is in the cluster VPC.
async fn launched_into_the_cluster_network(
    rig: &Rig,
    cluster: &str,
    instance_id: &str,
    volume_id: &str,
    group_id: &str,
) -> Result<()> {
    let c = rig.cloud.cluster(cluster)?;
    let var = |k: &str| c.network_var(k).with_context(|| format!("{k} in the env file"));
    let (vpc, extra_group) = (var("QDB_VPC_ID")?, var("QDB_EXTRA_SECURITY_GROUPS")?);
    let ec2 = rig.cloud.ec2(&c.aws_region).await;
    let has_tags = |tags: &[aws_sdk_ec2::types::Tag], what: &str| -> Result<()> {
        for (k, v) in [("team", "databases"), ("cost-center", "42")] {
            ensure!(
                tags.iter().any(|t| t.key() == Some(k) && t.value() == Some(v)),
                "{what} lacks the tag {k}={v}: {tags:?}"
            );
        }
        Ok(())
    };
    let out = ec2.describe_instances().instance_ids(instance_id).send().await?;
    let i = out.reservations().iter().flat_map(|r| r.instances()).next().context("the instance")?;
    let zone = i.placement().and_then(|p| p.availability_zone()).context("zone")?;
    let subnet = var("QDB_SUBNETS")?
        .split(',')
        .find_map(|pair| pair.strip_prefix(&format!("{zone}=")))
        .with_context(|| format!("a subnet for {zone}"))?;
    assert_eq!(i.subnet_id(), Some(subnet), "in its zone's subnet");
    assert_eq!(i.vpc_id(), Some(vpc));
    let cidr_prefix = var("QDB_VPC_CIDR")?.trim_end_matches(".0.0/16").to_string();
    let ip = i.private_ip_address().unwrap_or_default();
    ensure!(ip.starts_with(&format!("{cidr_prefix}.")), "{ip} is not in the VPC's {}", var("QDB_VPC_CIDR")?);
    let metadata = i.metadata_options().context("metadata options")?;
    assert_eq!(metadata.http_tokens().map(|t| t.as_str()), Some("required"), "IMDSv2 only");
    assert_eq!(metadata.http_put_response_hop_limit(), Some(1));
    assert_eq!(i.iam_instance_profile().and_then(|p| p.arn()), Some(var("QDB_INSTANCE_PROFILE_ARN")?));
    assert_eq!(i.ebs_optimized(), Some(true));
    let groups: Vec<_> = i.security_groups().iter().filter_map(|g| g.group_id()).collect();
    ensure!(groups.contains(&group_id) && groups.contains(&extra_group), "groups {groups:?}");
    has_tags(i.tags(), "the instance")?;
    let enis = ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder().name("attachment.instance-id").values(instance_id).build(),
        )
        .send()
        .await?;
    let eni = enis.network_interfaces().first().context("the instance's network interface")?;
    has_tags(eni.tag_set(), "the network interface")?;
    let volumes = ec2.describe_volumes().volume_ids(volume_id).send().await?;
    has_tags(volumes.volumes().first().context("the volume")?.tags(), "the data volume")?;
    let groups = ec2.describe_security_groups().group_ids(group_id).send().await?;
    let group = groups.security_groups().first().context("the group")?;
    assert_eq!(group.vpc_id(), Some(vpc), "the database's group is in the cluster VPC");
    has_tags(group.tags(), "the security group")
}

/// Issue 17: a Bottlerocket node joins too. Its user data is TOML settings (the node simulator
/// reads it as Bottlerocket would, and refuses the old bootstrap script); the default, AL2023's
/// NodeConfig, is what every other test's nodes join with.
#[tokio::test(flavor = "multi_thread")]
async fn a_bottlerocket_node_joins_with_its_settings() -> Result<()> {
    let rig = Rig::new("op-bottlerocket", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &["--node-os", "bottlerocket"])?;
    let api = rig.questdbs("region-a").await?;
    apply(&api, &questdb("db-br", "8.2.1")?).await?;
    let q = wait_phase(&api, "db-br", Phase::Running, T).await?;
    let node = q.status.and_then(|s| s.node).context("node")?;
    let c = rig.cloud.cluster("region-a")?;
    let ec2 = rig.cloud.ec2(&c.aws_region).await;
    let attribute = ec2
        .describe_instance_attribute()
        .instance_id(&node.instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await?;
    let encoded = attribute.user_data().and_then(|v| v.value()).context("user data")?;
    use base64::Engine;
    let text = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded)?)?;
    ensure!(text.contains("[settings.kubernetes]\ncluster-name = \"region-a\"\n"), "{text}");
    ensure!(
        text.contains(&format!("api-server = \"{}\"", c.network_var("QDB_EKS_ENDPOINT").unwrap_or("?"))),
        "{text}"
    );
    Ok(())
}

async fn running(rig: &Rig, cluster: &str, name: &str) -> Result<(Api<QuestDB>, QuestDB)> {
    let api = rig.questdbs(cluster).await?;
    apply(&api, &questdb(name, "8.2.1")?).await?;
    let q = wait_phase(&api, name, Phase::Running, T).await?;
    Ok((api, q))
}

/// Issue 20's API economy: a converged database costs no Kubernetes request between changes. Its
/// children, its pod and its nodes come from the controller's watch caches (before them, every
/// pass read eight children, the pod and the nodes from the apiserver: 10 requests per database
/// per pass). The orphan sweep, run every 3 s here, finds its owners in the QuestDB cache (before,
/// each sweep listed the QuestDBs) and AWS in the reconciles' snapshot (before, each sweep made
/// the three EC2 listings again).
#[tokio::test(flavor = "multi_thread")]
async fn a_converged_database_costs_no_kubernetes_request_between_changes() -> Result<()> {
    let rig = Rig::new("op-quiet", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &["--orphan-sweep-secs", "3"])?;
    running(&rig, "region-a", "db16").await?;
    // Past the passes that follow convergence (the status write's own echo).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = op.metrics().await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = op.metrics().await?;
    let passes = |m: &str| {
        counters(m, "qdb_operator_reconciles_total").get(r#"step="children",outcome="ok""#).copied()
    };
    let (from, to) = (passes(&before).unwrap_or(0.0), passes(&after).unwrap_or(0.0));
    ensure!(to - from >= 2.0, "only {} passes in 12 s at a 5 s resync: the test proves nothing", to - from);
    let (was, now) = (
        counters(&before, "qdb_operator_kube_requests_total"),
        counters(&after, "qdb_operator_kube_requests_total"),
    );
    let spent: Vec<_> = now
        .iter()
        .filter(|(k, v)| was.get(*k) != Some(v))
        .map(|(k, v)| (k, v - was.get(k).unwrap_or(&0.0)))
        .collect();
    ensure!(spent.is_empty(), "{} passes of a converged database made requests: {spent:?}", to - from);
    // A snapshot serves for the 5 s resync: 12 / 5 + 1 listings of security groups in 12 s, one
    // more for a fetch that straddles the window; the sweep alone made one every 3 s.
    let groups = |m: &str| {
        qdb_tests::metric_total(m, "qdb_operator_aws_calls_total", r#"operation="DescribeSecurityGroups""#)
    };
    let listed = groups(&after) - groups(&before);
    ensure!(listed <= 4.0, "{listed} security group listings in 12 s");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_is_repaired() -> Result<()> {
    let rig = Rig::new("op-drift", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let (api, q) = running(&rig, "region-a", "db2").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &rig.namespace);
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &rig.namespace);
    let aws = rig.aws("region-a").await?;

    let svc = services.list(&Default::default()).await?.items.into_iter().next().context("a service")?;
    let svc_name = svc.name_any();
    services.delete(&svc_name, &Default::default()).await?;
    eventually("service recreated", T, || async {
        Ok(services.get_opt(&svc_name).await?.filter(|s| s.metadata.uid != svc.metadata.uid).map(|_| ()))
    })
    .await?;

    let image = |s: &StatefulSet| {
        s.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].image.clone())
    };
    let evil = json!({"spec": {"template": {"spec": {"containers": [{"name": "questdb", "image": "questdb/questdb:evil"}]}}}});
    sts.patch("db2", &PatchParams::default(), &Patch::Strategic(&evil)).await?;
    eventually("image restored", T, || async {
        let s = sts.get("db2").await?;
        Ok((image(&s) == Some(Some("questdb/questdb:8.2.1".into()))).then_some(()))
    })
    .await?;

    let sg = aws.find_security_group(&uid).await?.context("sg")?;
    aws.revoke_ingress(&sg.id, &sg.rules[..1]).await?;
    eventually("security group rule restored", T, || async {
        Ok(aws.find_security_group(&uid).await?.filter(|g| g.rules.len() == 3).map(|_| ()))
    })
    .await?;

    let dns = q.status.as_ref().and_then(|s| s.dns.clone()).context("dns")?;
    let zone = aws.hosted_zone(&rig.dns_zone(), false).await?.context("zone")?;
    aws.upsert_a_record(&zone, &dns.name, "10.9.9.9", 60).await?;
    eventually("DNS record restored", T, || async {
        Ok(aws.get_a_record(&zone, &dns.name).await?.filter(|r| r.0 == dns.target).map(|_| ()))
    })
    .await?;
    // The image drift rolled the pod; it serves again afterwards.
    wait_phase(&api, "db2", Phase::Running, T).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn version_config_restart_and_volume_changes_converge() -> Result<()> {
    let rig = Rig::new("op-change", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let (api, q) = running(&rig, "region-a", "db3").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &rig.namespace);
    let template_annotations = |s: &StatefulSet| {
        s.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default()
    };
    let before = template_annotations(&sts.get("db3").await?);

    let mut next = questdb("db3", "8.2.2")?;
    apply(&api, &next).await?;
    wait_phase(&api, "db3", Phase::Running, T).await?;
    let s = sts.get("db3").await?;
    assert_eq!(
        s.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].image.clone()),
        Some(Some("questdb/questdb:8.2.2".into()))
    );

    next.spec.server_config.insert("query.timeout.sec".into(), "30".into());
    apply(&api, &next).await?;
    wait_phase(&api, "db3", Phase::Running, T).await?;
    let after_config = template_annotations(&sts.get("db3").await?);
    assert_ne!(after_config.get("cloud.questdb.io/config-hash"), before.get("cloud.questdb.io/config-hash"));

    next.spec.restart_token = Some("r-1".into());
    apply(&api, &next).await?;
    wait_phase(&api, "db3", Phase::Running, T).await?;
    assert_eq!(
        template_annotations(&sts.get("db3").await?)
            .get("cloud.questdb.io/restart-token")
            .map(String::as_str),
        Some("r-1")
    );

    next.spec.volume.size_gib = 30;
    apply(&api, &next).await?;
    let q = wait_phase(&api, "db3", Phase::Running, T).await?;
    assert_eq!(q.status.and_then(|s| s.volume).map(|v| v.size_gib), Some(30));
    let aws = rig.aws("region-a").await?;
    assert_eq!(aws.find_volume(&uid).await?.map(|v| v.size_gib), Some(30));
    // Every AWS action it took is one the production IAM policy allows.
    qdb_tests::iam::ensure_policy_allows(&op.metrics().await?)?;
    Ok(())
}

/// EBS refuses a second modification of a volume within six hours (the emulator as well). A
/// second growth waits, says until when, and is not retried in a loop: one ModifyVolume in all,
/// no AWS error, and the database keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_volume_change_within_six_hours_waits_and_says_when() -> Result<()> {
    let rig = Rig::new("op-cooldown", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let (api, q) = running(&rig, "region-a", "db16").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let mut next = questdb("db16", "8.2.1")?;
    next.spec.volume.size_gib = 30;
    apply(&api, &next).await?;
    let grown_at = jiff::Timestamp::now();
    let q = wait_phase(&api, "db16", Phase::Running, T).await?;
    ensure!(q.status.and_then(|s| s.volume).map(|v| v.size_gib) == Some(30), "first growth");

    next.spec.volume.size_gib = 40;
    apply(&api, &next).await?;
    let q = eventually("the growth blocked with its time", T, || async {
        let q = api.get("db16").await?;
        let blocked = q.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Progressing" && c.reason == "StorageResizeBlocked")
        });
        Ok(blocked.then_some(q))
    })
    .await?;
    let s = q.status.context("status")?;
    let at = s.volume.as_ref().and_then(|v| v.modifiable_at.clone()).context("modifiableAt")?.0;
    let six = jiff::SignedDuration::from_hours(6);
    let slack = jiff::SignedDuration::from_secs(120);
    ensure!(
        at > grown_at + six - slack && at < grown_at + six + slack,
        "modifiable at {at}, grown at {grown_at}"
    );
    let c = s.conditions.iter().find(|c| c.type_ == "Progressing").context("Progressing")?;
    ensure!(c.status == "True" && c.message.contains("from 30 to 40 GiB"), "{c:?}");
    ensure!(s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"), "still serving: {s:?}");
    // Passes go on (a resync, watch events), and none of them retries the modification.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let aws = rig.aws("region-a").await?;
    assert_eq!(aws.find_volume(&uid).await?.map(|v| v.size_gib), Some(30));
    let m = op.metrics().await?;
    let calls = |op: &str, outcome: &str| {
        let filter = format!("operation=\"{op}\",outcome=\"{outcome}\"");
        qdb_tests::metric_total(&m, "qdb_operator_aws_calls_total", &filter)
    };
    ensure!(calls("ModifyVolume", "ok") == 1.0, "ModifyVolume calls: {m}");
    let sent = qdb_tests::metric_total(&m, "qdb_operator_aws_calls_total", "operation=\"ModifyVolume\"");
    ensure!(sent == 1.0, "a ModifyVolume EBS refuses was sent: {sent} in all");
    ensure!(calls("DescribeVolumesModifications", "ok") <= 2.0, "the cool-down is read once per change: {m}");
    qdb_tests::iam::ensure_policy_allows(&m)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_everything_before_the_resource_goes() -> Result<()> {
    let rig = Rig::new("op-delete", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let (api, q) = running(&rig, "region-a", "db4").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let dns = q.status.as_ref().and_then(|s| s.dns.clone()).context("dns")?;
    api.delete("db4", &Default::default()).await?;
    eventually("resource gone", T, || async { Ok(api.get_opt("db4").await?.is_none().then_some(())) })
        .await?;
    let aws = rig.aws("region-a").await?;
    nothing_left_in_ec2(&aws, &uid).await?;
    let zone = aws.hosted_zone(&rig.dns_zone(), false).await?.context("zone")?;
    ensure!(aws.get_a_record(&zone, &dns.name).await?.is_none(), "DNS record left");
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client);
    // The PV is deleted at once; it goes when the garbage collector has removed its claim.
    let selector = format!("cloud.questdb.io/owner-uid={uid}");
    eventually("PV gone", T, || async {
        let left = pvs.list(&kube::api::ListParams::default().labels(&selector)).await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await?;
    // Every AWS action it took is one the production IAM policy allows.
    qdb_tests::iam::ensure_policy_allows(&op.metrics().await?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_takes_over_when_the_leader_dies() -> Result<()> {
    let rig = Rig::new("op-lead", 1).await?;
    let mut a1 = rig.spawn_operator("region-a", "a1", &SHORT_LEASE)?;
    a1.wait_ready().await?;
    eventually("a1 leads", T, || async {
        Ok(a1.metrics().await?.contains("qdb_operator_leader 1").then_some(()))
    })
    .await?;
    let a2 = rig.spawn_operator("region-a", "a2", &SHORT_LEASE)?;
    a2.wait_ready().await?;
    let (api, _) = running(&rig, "region-a", "db5").await?;
    ensure!(a2.metrics().await?.contains("qdb_operator_leader 0"), "a2 stands by");
    a1.kill9()?;
    apply(&api, &questdb("db5", "8.2.9")?).await?;
    wait_phase(&api, "db5", Phase::Running, T).await?;
    ensure!(a2.metrics().await?.contains("qdb_operator_leader 1"), "a2 leads");
    Ok(())
}

/// A lease for the tests of a handover, which wait it out (the rig's default is production's 15 s).
const SHORT_LEASE: [&str; 2] = ["--lease-secs", "6"];
/// Its renew deadline: two thirds of it.
const RENEW_DEADLINE_SECS: f64 = 4.0;

/// The leader (a1) is frozen (SIGSTOP) together with its apiserver connection (a proxy that stops
/// forwarding, as a silent network path does), and the standby (a2) takes over. a1 is resumed
/// while its apiserver stays silent, and a rule of its database's security group is revoked
/// behind everyone's back, work for whoever leads. a2 repairs it; a1, whose lease ran out while it
/// was frozen, sends nothing that writes, to AWS or to the apiserver (each operator has its own
/// AWS proxy, and a1's apiserver proxy logs every request it receives, forwarded or not), and
/// exits on its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_leader_writes_nothing_once_its_lease_ran_out() -> Result<()> {
    let rig = Rig::new("op-fence", 1).await?;
    let kube = KubeProxy::start(&rig.cloud.cluster("region-a")?.operator_kubeconfig).await?;
    let kubeconfig = kube.kubeconfig(&rig.dir, "a1")?.display().to_string();
    let aws1 = FaultProxy::start(&rig.cloud.aws_endpoint, 0, Rng::from_env()).await?;
    let aws2 = FaultProxy::start(&rig.cloud.aws_endpoint, 0, Rng::from_env()).await?;
    let a1_args =
        [SHORT_LEASE.as_slice(), &["--kubeconfig", &kubeconfig, "--aws-endpoint", &aws1.url]].concat();
    let mut a1 = rig.spawn_operator("region-a", "a1", &a1_args)?;
    eventually("a1 leads", T, || async {
        Ok((a1.probe("/readyz").await? == (200, "leader".into())).then_some(()))
    })
    .await?;
    let a2_args = [SHORT_LEASE.as_slice(), &["--aws-endpoint", &aws2.url]].concat();
    let a2 = rig.spawn_operator("region-a", "a2", &a2_args)?;
    eventually("a2 stands by, ready", T, || async {
        Ok((a2.probe("/readyz").await? == (200, "standby".into())).then_some(()))
    })
    .await?;
    let (_api, q) = running(&rig, "region-a", "db14").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let volume = q.status.as_ref().and_then(|s| s.volume.clone()).context("volume")?.id;
    let instance = q.status.as_ref().and_then(|s| s.node.clone()).context("node")?.instance_id;
    ensure!(a2.metrics().await?.contains("qdb_operator_leader 0"), "a2 stands by");
    ensure!(aws2.calls().is_empty(), "the standby called AWS: {:?}", aws2.calls());

    kube.freeze();
    let frozen = Frozen::pid(&a1.pid().context("a1 runs")?.to_string())?;
    // a1's last renewal was sent before this, so by its own rules its lease ran out at the latest
    // a renew deadline later. (The standby may take over a little sooner than a lease after the
    // freeze: it times the lease from its last sighting of a renewal, which came before.)
    let frozen_at = qdb_tests::kube_proxy::epoch_secs();
    let expired = frozen_at + RENEW_DEADLINE_SECS;
    eventually("a2 takes over", T, || async {
        Ok((a2.probe("/readyz").await? == (200, "leader".into())).then_some(()))
    })
    .await?;
    println!("a2 took over {:.1}s after a1 froze", qdb_tests::kube_proxy::epoch_secs() - frozen_at);
    drop(frozen);

    let aws = rig.aws("region-a").await?;
    let sg = aws.find_security_group(&uid).await?.context("sg")?;
    aws.revoke_ingress(&sg.id, &sg.rules[..1]).await?;
    eventually("the security group rule restored", T, || async {
        Ok(aws.find_security_group(&uid).await?.filter(|g| g.rules.len() == 3).map(|_| ()))
    })
    .await?;
    let exited = a1.wait_exit(Duration::from_secs(30)).await;
    kube.thaw();

    let late = |t: f64| t > expired;
    let kube_writes: Vec<_> = kube.received().into_iter().filter(|r| r.is_write() && late(r.t)).collect();
    let aws_writes: Vec<_> = aws1.calls().into_iter().filter(|c| c.is_write() && late(c.t)).collect();
    ensure!(kube_writes.is_empty(), "a1 wrote to the apiserver after its lease ran out: {kube_writes:#?}");
    ensure!(aws_writes.is_empty(), "a1 wrote to AWS after its lease ran out: {aws_writes:#?}");
    ensure!(
        aws2.calls().iter().any(|c| c.action == "AuthorizeSecurityGroupIngress"),
        "the new leader did not repair the rule: {:?}",
        aws2.calls()
    );
    // Nobody had reason to touch the database's instance or volume, and the emulator saw no one do it.
    let moved: Vec<_> = rig
        .cloud
        .ec2_calls()?
        .into_iter()
        .filter(|c| late(c.t))
        .filter(|c| c.volume.as_deref() == Some(volume.as_str()) || c.instances.contains(&instance))
        .collect();
    ensure!(moved.is_empty(), "instance or volume calls after the takeover: {moved:#?}");
    let status = exited.context("a1 kept running after its lease ran out")?;
    ensure!(!status.success(), "a1 exited 0 after losing the lease");
    ensure!(a1.log_text().contains("not confirmed within the renew deadline"), "{}", a1.log_text());
    Ok(())
}

/// /readyz follows the lease (the leader, and a standby that can read the lease, are ready) and
/// /healthz fails once the apiserver has not answered for the grace period (two leases): here for
/// a standby whose apiserver connection goes silent. Both recover once it answers again.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_lease_and_health_the_apiserver() -> Result<()> {
    let rig = Rig::new("op-probes", 1).await?;
    let a1 = rig.spawn_operator("region-a", "a1", &[])?;
    eventually("a1 leads", T, || async {
        Ok((a1.probe("/readyz").await? == (200, "leader".into())).then_some(()))
    })
    .await?;
    ensure!(a1.probe("/healthz").await?.0 == 200, "leader healthy");
    let kube = KubeProxy::start(&rig.cloud.cluster("region-a")?.operator_kubeconfig).await?;
    let kubeconfig = kube.kubeconfig(&rig.dir, "a2")?.display().to_string();
    let a2 = rig.spawn_operator("region-a", "a2", &["--kubeconfig", &kubeconfig])?;
    eventually("a2 stands by, ready", T, || async {
        Ok((a2.probe("/readyz").await? == (200, "standby".into())).then_some(()))
    })
    .await?;
    ensure!(a2.probe("/healthz").await? == (200, "ok".into()), "standby healthy");

    kube.freeze();
    let (code, why) = eventually("a2 not ready", T, || async {
        Ok(Some(a2.probe("/readyz").await?).filter(|(code, _)| *code == 503))
    })
    .await?;
    println!("a2 /readyz {code}: {why}");
    let (code, why) = eventually("a2 unhealthy", T, || async {
        Ok(Some(a2.probe("/healthz").await?).filter(|(code, _)| *code == 503))
    })
    .await?;
    println!("a2 /healthz {code}: {why}");
    ensure!(why.contains("lease"), "{why}");
    ensure!(a1.probe("/readyz").await? == (200, "leader".into()), "a1 still leads");

    kube.thaw();
    eventually("a2 ready and healthy again", T, || async {
        let ready = a2.probe("/readyz").await? == (200, "standby".into());
        Ok((ready && a2.probe("/healthz").await?.0 == 200).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_touches_only_its_own_cluster() -> Result<()> {
    let rig = Rig::new("op-scope", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let b = rig.questdbs("region-b").await?;
    apply(&b, &questdb("db6", "8.2.1")?).await?;
    running(&rig, "region-a", "db6").await?;
    let qb = b.get("db6").await?;
    ensure!(qb.status.is_none(), "region-b's resource was touched: {:?}", qb.status);
    ensure!(qb.metadata.finalizers.is_none(), "region-b's resource got a finalizer");
    let uid = qb.metadata.uid.clone().context("uid")?;
    for cluster in ["region-a", "region-b"] {
        let aws = rig.aws(cluster).await?;
        ensure!(aws.find_instances(&uid).await?.is_empty(), "instance for region-b's resource in {cluster}");
    }
    Ok(())
}

/// Kills the database's node (heartbeats stop, as when a machine dies) and expects the operator
/// to move the database to a new node with the same volume, checking all along that the volume is
/// never attached to two running instances.
#[tokio::test(flavor = "multi_thread")]
async fn failover_moves_the_database_to_a_new_node_with_the_same_volume() -> Result<()> {
    let rig = Rig::new("op-failover", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &["--failover-after-secs", "2"])?;
    let (api, q) = running(&rig, "region-a", "db7").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let before = q.status.clone().context("status")?;
    let old = before.node.clone().context("node")?;
    let volume = before.volume.clone().context("volume")?;
    let aws = rig.aws("region-a").await?;

    let watch = watch_duplicates(rig.aws("region-a").await?, uid.clone());

    let nodesim = &rig.cloud.cluster("region-a")?.nodesim;
    let killed =
        reqwest::Client::new().post(format!("{nodesim}/nodes/{}/kill", old.instance_id)).send().await?;
    ensure!(killed.status().is_success(), "kill: {}", killed.status());
    let q = eventually("Running on a new node", Duration::from_secs(180), || async {
        let q = api.get("db7").await?;
        let s = q.status.clone().unwrap_or_default();
        let moved = s.node.as_ref().is_some_and(|n| n.instance_id != old.instance_id);
        Ok((moved && s.phase == Some(Phase::Running)).then_some(q))
    })
    .await?;
    ensure!(!watch.is_finished(), "{:?}", watch.await);
    watch.abort();
    let s = q.status.context("status")?;
    let new = s.node.context("node")?;
    assert_eq!(s.volume.map(|v| v.id), Some(volume.id.clone()), "the same volume");
    let failover = eventually("lastFailover with its recovery time", T, || async {
        let f = api.get("db7").await?.status.and_then(|s| s.last_failover);
        Ok(f.filter(|f| f.recovered_at.is_some()))
    })
    .await?;
    assert_eq!(failover.from_node, old.name);
    let dns = s.dns.context("dns")?;
    let zone = aws.hosted_zone(&rig.dns_zone(), false).await?.context("zone")?;
    assert_eq!(aws.get_a_record(&zone, &dns.name).await?.map(|r| r.0), new.private_ip);
    eventually("old instance terminated", T, || async {
        let old_live = aws
            .find_instances(&uid)
            .await?
            .into_iter()
            .any(|i| i.id == old.instance_id && i.state != InstanceState::Terminated);
        Ok((!old_live).then_some(()))
    })
    .await?;
    // The event trail tells the story.
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, &rig.namespace);
    let reasons: Vec<String> =
        events.list(&Default::default()).await?.items.into_iter().filter_map(|e| e.reason).collect();
    for r in [
        "LaunchedReplacement",
        "StoppingOldInstance",
        "FencedInstance",
        "ReleasedVolume",
        "ReplacedNode",
        "FailoverComplete",
    ] {
        ensure!(reasons.iter().any(|x| x == r), "no {r} event in {reasons:?}");
    }
    assert_fenced(&rig, &volume.id, Detach::AfterFence)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_spec_is_reported_and_waits_for_a_change() -> Result<()> {
    let rig = Rig::new("op-invalid", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let api = rig.questdbs("region-a").await?;
    // Passes the schema, fails the operator's own check: a server.conf value spanning lines.
    let mut q = questdb("db8", "8.2.1")?;
    q.spec.server_config.insert("http.user".into(), "admin\nhttp.password=x".into());
    apply(&api, &q).await?;
    let q = wait_phase(&api, "db8", Phase::Failed, T).await?;
    let s = q.status.context("status")?;
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").context("Degraded")?;
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
    let uid = q.metadata.uid.context("uid")?;
    ensure!(rig.aws("region-a").await?.find_instances(&uid).await?.is_empty(), "nothing launched");
    // No hot loop: the operator leaves it alone until the spec changes.
    let reconciles = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("qdb_operator_reconciles_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = reconciles(&op.metrics().await?);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = reconciles(&op.metrics().await?);
    ensure!(after - before <= 1.0, "{} reconcile steps while nothing changed", after - before);
    apply(&api, &questdb("db8", "8.2.1")?).await?;
    wait_phase(&api, "db8", Phase::Running, T).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn labelled_legacy_objects_are_adopted_and_foreign_ones_left_alone() -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let rig = Rig::new("op-adopt", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, &rig.namespace);
    // What the old provisioner left: the config of db9, labelled for it, owned by nothing.
    let legacy: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "db9-config", "labels": {"cloud.questdb.io/database": "db9"}},
        "data": {"server.conf": "old=1\n"}
    }))?;
    cms.create(&PostParams::default(), &legacy).await?;
    // Somebody else's object where db10's config would go.
    let foreign: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "db10-config"}, "data": {"mine": "yes"}}))?;
    let foreign = cms.create(&PostParams::default(), &foreign).await?;

    let (_, q9) = running(&rig, "region-a", "db9").await?;
    let adopted = cms.get("db9-config").await?;
    let owners = adopted.metadata.owner_references.clone().unwrap_or_default();
    ensure!(
        owners.iter().any(|o| Some(&o.uid) == q9.metadata.uid.as_ref()),
        "owner reference added: {owners:?}"
    );
    ensure!(adopted.data.unwrap_or_default().get("server.conf").is_some_and(|c| c.contains("http.bind.to")));

    let api = rig.questdbs("region-a").await?;
    apply(&api, &questdb("db10", "8.2.1")?).await?;
    eventually("db10 reports the foreign object", T, || async {
        let q = api.get("db10").await?;
        let degraded =
            q.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded").cloned());
        Ok(degraded.filter(|c| c.status == "True" && c.message.contains("db10-config")).map(|_| ()))
    })
    .await?;
    let after = cms.get("db10-config").await?;
    assert_eq!(
        after.metadata.resource_version, foreign.metadata.resource_version,
        "foreign object untouched"
    );
    Ok(())
}

/// An adoption naming what another database owns is refused with the owner's name, and nothing
/// is made in its place (nor taken from the owner).
#[tokio::test(flavor = "multi_thread")]
async fn adopting_another_databases_parts_is_refused_and_nothing_is_made() -> Result<()> {
    let rig = Rig::new("op-adopt-no", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let (api, owner) = running(&rig, "region-a", "db14").await?;
    let status = owner.status.clone().context("status")?;
    let owner_uid = owner.metadata.uid.clone().context("uid")?;
    let aws = rig.aws("region-a").await?;
    let group = aws.find_security_group(&owner_uid).await?.context("group")?.id;
    let mut thief = questdb("db15", "8.2.1")?;
    thief.spec.adopt = Some(qdb_crd::AdoptSpec {
        instance_id: status.node.context("node")?.instance_id,
        volume_id: status.volume.context("volume")?.id,
        security_group_id: group.clone(),
    });
    apply(&api, &thief).await?;
    let refused = wait_phase(&api, "db15", Phase::Failed, T).await?;
    let degraded = refused
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"))
        .context("no Degraded condition")?;
    ensure!(degraded.reason == "AdoptionRefused" && degraded.message.contains("belongs to"), "{degraded:?}");
    let uid = api.get("db15").await?.metadata.uid.context("uid")?;
    qdb_tests::rig::nothing_left_in_ec2(&aws, &uid).await?;
    ensure!(
        aws.find_security_group(&owner_uid).await?.map(|g| g.id) == Some(group),
        "the owner lost its group"
    );
    ensure!(aws.find_instances(&owner_uid).await?.len() == 1, "the owner lost its instance");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_releases_the_instance_and_resume_reattaches_the_same_volume() -> Result<()> {
    let rig = Rig::new("op-pause", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let (api, q) = running(&rig, "region-a", "db11").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let volume = q.status.as_ref().and_then(|s| s.volume.clone()).context("volume")?;
    let first = q.status.as_ref().and_then(|s| s.node.clone()).context("node")?;
    let aws = rig.aws("region-a").await?;

    let mut paused = questdb("db11", "8.2.1")?;
    paused.spec.paused = true;
    apply(&api, &paused).await?;
    let q = wait_phase(&api, "db11", Phase::Paused, T).await?;
    let live: Vec<_> = aws
        .find_instances(&uid)
        .await?
        .into_iter()
        .filter(|i| i.state != InstanceState::Terminated)
        .collect();
    ensure!(live.is_empty(), "instance kept while paused: {live:?}");
    let v = aws.find_volume(&uid).await?.context("volume kept while paused")?;
    assert_eq!(v.id, volume.id);
    ensure!(aws.find_security_group(&uid).await?.is_some(), "security group kept while paused");
    ensure!(q.status.as_ref().and_then(|s| s.endpoints.clone()).is_none(), "no endpoints while paused");

    apply(&api, &questdb("db11", "8.2.1")?).await?;
    let q = wait_phase(&api, "db11", Phase::Running, T).await?;
    let s = q.status.context("status")?;
    assert_eq!(s.volume.map(|v| v.id), Some(volume.id.clone()), "the same volume after resume");
    ensure!(s.node.is_some_and(|n| n.instance_id != first.instance_id), "a new instance after resume");
    assert_fenced(&rig, &volume.id, Detach::AfterUnmount)?;
    // Every AWS action it took is one the production IAM policy allows.
    qdb_tests::iam::ensure_policy_allows(&op.metrics().await?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_identity_is_denied_what_it_does_not_need() -> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Secret;
    let rig = Rig::new("op-rbac", 1).await?;
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.operator_kubeconfig).await?;
    let denied = |r: kube::Result<()>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &rig.namespace);
    ensure!(denied(secrets.list(&Default::default()).await.map(|_| ())), "secrets must be denied");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &rig.namespace);
    ensure!(denied(deployments.list(&Default::default()).await.map(|_| ())), "deployments must be denied");
    let qdbs: Api<QuestDB> = Api::namespaced(client.clone(), &rig.namespace);
    ensure!(
        denied(qdbs.create(&PostParams::default(), &questdb("x", "8.2.1")?).await.map(|_| ())),
        "creating databases is the provisioner's"
    );
    let sts: Api<StatefulSet> = Api::namespaced(client, &rig.namespace);
    sts.list(&Default::default()).await?;
    Ok(())
}

/// Upgrades three databases' node image with a budget of one replacement at a time, checking all
/// along that no more than one database has two live instances. The database that took the slot
/// is deleted mid-upgrade: the slot passes on (kept, it stopped every later upgrade until the
/// operator restarted). Then one database is rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn node_image_upgrade_respects_the_budget_frees_it_on_delete_and_rolls_back() -> Result<()> {
    let started = std::time::Instant::now();
    // Printed as it goes: a run that ends on nextest's timeout shows how far it got.
    let progress = |what: &str| println!("{:>6.1}s {what}", started.elapsed().as_secs_f64());
    let rig = Rig::new("op-upgrade", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &["--replacement-budget", "1"])?;
    let api = rig.questdbs("region-a").await?;
    let names = ["dbu0", "dbu1", "dbu2"];
    for n in names {
        apply(&api, &questdb(n, "8.2.1")?).await?;
    }
    let mut before = Vec::new();
    for n in names {
        let q = wait_phase(&api, n, Phase::Running, T).await?;
        let uid = q.metadata.uid.clone().context("uid")?;
        let volume = q.status.as_ref().and_then(|s| s.volume.clone()).context("volume")?.id;
        before.push((n, uid, volume));
    }
    progress("three databases Running");
    let aws = rig.aws("region-a").await?;
    let uids: Vec<String> = before.iter().map(|b| b.1.clone()).collect();
    let watch =
        {
            let aws = rig.aws("region-a").await?;
            tokio::spawn(async move {
                let mut most = 0;
                loop {
                    let mut replacing = 0;
                    for uid in &uids {
                        let live =
                            aws.find_instances(uid).await.unwrap_or_default().into_iter().filter(|i| {
                                matches!(i.state, InstanceState::Running | InstanceState::Pending)
                            });
                        replacing += usize::from(live.count() > 1);
                    }
                    most = most.max(replacing);
                    if most > 1 {
                        return most;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        };
    let upgraded = "ami-0b0b0b0b0b0b0b0b0";
    for n in names {
        let mut q = questdb(n, "8.2.1")?;
        q.spec.node_image = upgraded.into();
        apply(&api, &q).await?;
    }
    // The first to launch a replacement holds the only slot: deleted before it finishes.
    let holder = eventually("a replacement launched", T, || async {
        for (n, uid, _) in &before {
            if live_instances(&aws, uid).await? > 1 {
                return Ok(Some(*n));
            }
        }
        Ok(None)
    })
    .await?;
    progress(&format!("{holder} replacing its node; deleting it"));
    api.delete(holder, &Default::default()).await?;
    eventually(&format!("{holder} gone"), T, || async {
        Ok(api.get_opt(holder).await?.is_none().then_some(()))
    })
    .await?;
    progress(&format!("{holder} gone"));
    let rest: Vec<_> = before.iter().filter(|b| b.0 != holder).collect();
    for (n, uid, volume) in &rest {
        let q = eventually(&format!("{n} on the new image"), Duration::from_secs(240), || async {
            let q = api.get(n).await?;
            let s = q.status.clone().unwrap_or_default();
            let done =
                s.phase == Some(Phase::Running) && s.node.as_ref().is_some_and(|x| x.image == upgraded);
            Ok(done.then_some(q))
        })
        .await?;
        progress(&format!("{n} on the new image"));
        assert_eq!(q.status.and_then(|s| s.volume).map(|v| v.id).as_ref(), Some(volume), "{n}: same volume");
        let live: Vec<_> = aws
            .find_instances(uid)
            .await?
            .into_iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .collect();
        ensure!(live.iter().all(|i| i.image_id == upgraded), "{n}: old instances left: {live:?}");
        assert_fenced(&rig, volume, Detach::AfterUnmount)?;
    }
    ensure!(!watch.is_finished(), "more than one replacement at once: {:?}", watch.await);
    watch.abort();

    // Rolling back is the same flow.
    let back = rest[0].0;
    apply(&api, &questdb(back, "8.2.1")?).await?;
    eventually(&format!("{back} back on the old image"), Duration::from_secs(240), || async {
        let s = api.get(back).await?.status.unwrap_or_default();
        Ok((s.phase == Some(Phase::Running) && s.node.is_some_and(|x| x.image == "ami-0a0a0a0a0a0a0a0a0"))
            .then_some(()))
    })
    .await?;
    progress(&format!("{back} rolled back"));
    Ok(())
}

/// Live (pending or running) instances of a database.
async fn live_instances(aws: &Aws, uid: &str) -> Result<usize> {
    Ok(aws
        .find_instances(uid)
        .await?
        .into_iter()
        .filter(|i| matches!(i.state, InstanceState::Running | InstanceState::Pending))
        .count())
}

/// An instance of the database other than `old` is pending or running.
async fn replacement_live(aws: &Aws, uid: &str, old: &str) -> Result<bool> {
    Ok(aws
        .find_instances(uid)
        .await?
        .iter()
        .any(|i| i.id != old && matches!(i.state, InstanceState::Running | InstanceState::Pending)))
}

/// The operator is killed right after it launched a replacement; a new operator finishes the
/// failover without launching another instance. Then a database is deleted in the middle of a
/// replacement and nothing is left.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_mid_replacement_resumes_and_delete_mid_replacement_cleans_up() -> Result<()> {
    let rig = Rig::new("op-resume", 1).await?;
    let args = ["--failover-after-secs", "2"];
    let mut op = rig.spawn_operator("region-a", "a1", &args)?;
    let (api, q) = running(&rig, "region-a", "db12").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let volume = q.status.as_ref().and_then(|s| s.volume.clone()).context("volume")?.id;
    let aws = rig.aws("region-a").await?;
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    let http = reqwest::Client::new();

    // Killed after launching the replacement, before its node joined (the old instance is
    // being stopped meanwhile, and the volume waits for the new node); the later steps each get
    // their kill in an_operator_killed_at_every_step_of_a_move_resumes_there.
    {
        let identity = "a2";
        let before = api.get("db12").await?.status.and_then(|s| s.node).context("node")?;
        // A slow join keeps the replacement launched but not Ready long enough to act in.
        http.put(format!("{nodesim}/join-delay/15")).send().await?;
        http.post(format!("{nodesim}/nodes/{}/kill", before.instance_id)).send().await?;
        eventually("a replacement launched", Duration::from_secs(120), || async {
            Ok(replacement_live(&aws, &uid, &before.instance_id).await?.then_some(()))
        })
        .await?;
        op.kill9()?;
        http.put(format!("{nodesim}/join-delay/0")).send().await?;
        ensure!(live_instances(&aws, &uid).await? <= 2, "a duplicate instance");
        op = rig.spawn_operator("region-a", identity, &args)?;
        let q = eventually("Running on a new node", Duration::from_secs(180), || async {
            let q = api.get("db12").await?;
            let s = q.status.clone().unwrap_or_default();
            let moved = s.node.as_ref().is_some_and(|n| n.instance_id != before.instance_id);
            ensure!(live_instances(&aws, &uid).await? <= 2, "a duplicate instance");
            Ok((moved && s.phase == Some(Phase::Running)).then_some(q))
        })
        .await?;
        assert_eq!(q.status.and_then(|s| s.volume).map(|v| v.id), Some(volume.clone()), "the same volume");
        assert_fenced(&rig, &volume, Detach::AfterFence)?;
        eventually("one instance left", T, || async {
            Ok((live_instances(&aws, &uid).await? == 1).then_some(()))
        })
        .await?;
    }

    let before = api.get("db12").await?.status.and_then(|s| s.node).context("node")?;
    http.put(format!("{nodesim}/join-delay/15")).send().await?;
    http.post(format!("{nodesim}/nodes/{}/kill", before.instance_id)).send().await?;
    let launched = eventually("a third replacement launched", Duration::from_secs(120), || async {
        Ok(replacement_live(&aws, &uid, &before.instance_id).await?.then_some(()))
    })
    .await;
    http.put(format!("{nodesim}/join-delay/0")).send().await?;
    launched?;
    api.delete("db12", &Default::default()).await?;
    eventually("resource gone", Duration::from_secs(180), || async {
        Ok(api.get_opt("db12").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(live_instances(&aws, &uid).await? == 0, "instances left");
    ensure!(aws.find_volume(&uid).await?.is_none(), "volume left");
    ensure!(aws.find_security_group(&uid).await?.is_none(), "security group left");
    drop(op);
    Ok(())
}

/// The emulator's call log shows every AttachVolume and DetachVolume of `volume` sent by the EBS
/// CSI driver alone (the node simulator plays it, under its own access key; the operator never
/// attaches), an attach only while every other instance that held the volume was stopped or
/// terminated (EC2's own state at that moment), and a detach as `detach` allows.
fn assert_fenced(rig: &Rig, volume: &str, detach: Detach) -> Result<()> {
    let calls = rig.cloud.ec2_calls()?;
    let moves = calls.iter().filter(|c| c.volume.as_deref() == Some(volume)).count();
    ensure!(moves > 0, "no volume calls for {volume} in the emulator's log");
    let bad = qdb_tests::ec2_calls::fencing_violations(&calls, volume, detach);
    ensure!(bad.is_empty(), "volume calls before the fence: {bad:#?}");
    let driver = rig.cloud.vars.get("QDB_EBS_CSI_DRIVER_KEY").context("QDB_EBS_CSI_DRIVER_KEY in env")?;
    let who = qdb_tests::ec2_calls::attachers(&calls, volume);
    ensure!(
        who.iter().eq([driver]),
        "AttachVolume/DetachVolume of {volume} by {who:?}, not only the EBS CSI driver"
    );
    Ok(())
}

/// Fails the test as soon as the emulator shows more than two live instances of the database
/// (the old node and its one replacement).
fn watch_duplicates(aws: Aws, uid: String) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        loop {
            if let Ok(instances) = aws.find_instances(&uid).await {
                let live = instances
                    .iter()
                    .filter(|i| matches!(i.state, InstanceState::Running | InstanceState::Pending))
                    .count();
                ensure!(live <= 2, "{live} live instances: {instances:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The operator is killed (SIGKILL) at every step of a node image upgrade and then of a failover
/// that its status records, and started again at once: each time the new operator resumes at
/// that step. Both moves finish on the same volume, with no volume call before the fence (the
/// emulator's call log) and no duplicate instance.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_at_every_step_of_a_move_resumes_there() -> Result<()> {
    use qdb_crd::ReplaceStep as Step;
    let rig = Rig::new("op-steps", 1).await?;
    let args = ["--failover-after-secs", "2"];
    let mut op = rig.spawn_operator("region-a", "a1", &args)?;
    let (api, q) = running(&rig, "region-a", "db13").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let volume = q.status.as_ref().and_then(|s| s.volume.clone()).context("volume")?.id;
    let first = q.status.as_ref().and_then(|s| s.node.clone()).context("node")?;
    let aws = rig.aws("region-a").await?;
    let duplicates = watch_duplicates(rig.aws("region-a").await?, uid.clone());

    // Kills and restarts the operator at each step it records, until `done`; returns the steps.
    macro_rules! kill_at_each_step {
        ($what:expr, $done:expr) => {{
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            let mut killed_at: Vec<Step> = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let q = api.get("db13").await?;
                if $done(&q) {
                    break (q, killed_at);
                }
                ensure!(!duplicates.is_finished(), "{:?}", duplicates.await);
                ensure!(
                    std::time::Instant::now() < deadline,
                    "{} not done after 300 s; killed at {killed_at:?}",
                    $what
                );
                let step = q.status.as_ref().and_then(|s| s.replacement.as_ref()).map(|r| r.step);
                if let Some(step) = step.filter(|s| !killed_at.contains(s)) {
                    op.kill9()?;
                    killed_at.push(step);
                    op = rig.spawn_operator("region-a", "a1", &args)?;
                }
            }
        }};
    }
    let running_on = |q: &QuestDB, pred: &dyn Fn(&qdb_crd::NodeStatus) -> bool| {
        let s = q.status.clone().unwrap_or_default();
        s.observed_generation == q.metadata.generation
            && s.phase == Some(Phase::Running)
            && s.node.as_ref().is_some_and(pred)
    };

    let image = "ami-0b0b0b0b0b0b0b0b0";
    api.patch("db13", &PatchParams::default(), &Patch::Merge(json!({"spec": {"nodeImage": image}}))).await?;
    let (upgraded, steps) =
        kill_at_each_step!("the upgrade", |q: &QuestDB| running_on(q, &|n| n.image == image));
    println!("upgrade: killed at {steps:?}");
    // Fenced is recorded only together with the step that follows it in the same pass. In an
    // upgrade the EBS CSI driver was asked to detach once the drained pod's volume was unmounted,
    // and EC2 completes it as the old instance stops: the volume is usually free by the time the
    // stop is confirmed, so Detaching may be passed over.
    for step in [Step::Launched, Step::Draining, Step::StopIssued, Step::Attaching] {
        ensure!(steps.contains(&step), "the upgrade never showed {step:?}: {steps:?}");
    }
    let second = upgraded.status.and_then(|s| s.node).context("node")?;
    ensure!(second.instance_id != first.instance_id, "upgraded in place");

    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    reqwest::Client::new().post(format!("{nodesim}/nodes/{}/kill", second.instance_id)).send().await?;
    let (failed_over, steps) = kill_at_each_step!("the failover", |q: &QuestDB| running_on(q, &|n| n
        .instance_id
        != second.instance_id));
    println!("failover: killed at {steps:?}");
    // A failover stops the lost machine in the pass that launches its replacement: no pass ends
    // at Launched (an operator killed between the two resumes from what EC2 shows).
    for step in [Step::StopIssued, Step::Detaching, Step::Attaching] {
        ensure!(steps.contains(&step), "the failover never showed {step:?}: {steps:?}");
    }
    ensure!(!duplicates.is_finished(), "{:?}", duplicates.await);
    duplicates.abort();
    assert_eq!(
        failed_over.status.and_then(|s| s.volume).map(|v| v.id),
        Some(volume.clone()),
        "the same volume"
    );
    assert_fenced(&rig, &volume, Detach::AfterUnmount)?;
    eventually("one instance left", T, || async {
        Ok((live_instances(&aws, &uid).await? == 1).then_some(()))
    })
    .await?;
    drop(op);
    Ok(())
}

/// Every instance ever launched for `uid`, in any state (terminated ones included).
async fn launched_ever(rig: &Rig, uid: &str) -> Result<Vec<String>> {
    let ec2 = rig.cloud.ec2(&rig.cloud.cluster("region-a")?.aws_region).await;
    let filter = aws_sdk_ec2::types::Filter::builder()
        .name(format!("tag:{}", qdb_crd::keys::OWNER_UID))
        .values(uid)
        .build();
    let out = ec2.describe_instances().filters(filter).send().await?;
    let mut ids: Vec<String> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Hand-made ingress nobody asked for (all protocols from anywhere, every TCP port from
/// anywhere) is revoked; the allowed rules stay.
#[tokio::test(flavor = "multi_thread")]
async fn foreign_security_group_rules_are_revoked() -> Result<()> {
    use aws_sdk_ec2::types::{IpPermission, IpRange};
    let rig = Rig::new("op-foreign", 1).await?;
    let op = rig.spawn_operator("region-a", "a1", &[])?;
    let (_, q) = running(&rig, "region-a", "dbf").await?;
    let uid = q.metadata.uid.clone().context("uid")?;
    let aws = rig.aws("region-a").await?;
    let sg = aws.find_security_group(&uid).await?.context("sg")?;
    let anywhere = || IpRange::builder().cidr_ip("0.0.0.0/0").build();
    let ec2 = rig.cloud.ec2(&rig.cloud.cluster("region-a")?.aws_region).await;
    ec2.authorize_security_group_ingress()
        .group_id(&sg.id)
        .ip_permissions(IpPermission::builder().ip_protocol("-1").ip_ranges(anywhere()).build())
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(0)
                .to_port(65535)
                .ip_ranges(anywhere())
                .build(),
        )
        .send()
        .await?;
    eventually("the hand-added rules seen", T, || async {
        Ok(aws.find_security_group(&uid).await?.filter(|g| g.foreign.len() == 2).map(|_| ()))
    })
    .await?;
    eventually("foreign rules revoked", T, || async {
        Ok(aws
            .find_security_group(&uid)
            .await?
            .filter(|g| g.foreign.is_empty() && g.rules.len() == 3)
            .map(|_| ()))
    })
    .await?;
    // Every AWS action it took is one the production IAM policy allows.
    qdb_tests::iam::ensure_policy_allows(&op.metrics().await?)?;
    Ok(())
}

/// RunInstances reaches EC2 but its reply is lost (twice), and for ten seconds DescribeInstances
/// shows nothing (EC2's eventual consistency, harsher than the emulator's): the operator tries
/// again under the same ClientToken, EC2 answers with the first instance, and only one is ever
/// launched.
#[tokio::test(flavor = "multi_thread")]
async fn a_launch_retried_after_a_timeout_starts_no_second_instance() -> Result<()> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use qdb_tests::scripted::{Answer, ScriptedProxy, no_instances};
    let rig = Rig::new("op-token", 1).await?;
    let launches = Arc::new(AtomicUsize::new(0));
    let first_lost: Arc<Mutex<Option<std::time::Instant>>> = Arc::new(Mutex::new(None));
    let (counter, lost_at) = (launches.clone(), first_lost.clone());
    let proxy = ScriptedProxy::start(
        &rig.cloud.aws_endpoint,
        Box::new(move |action, _| {
            let hidden = lost_at
                .lock()
                .map(|at| at.is_some_and(|t| t.elapsed() < Duration::from_secs(10)))
                .unwrap_or(false);
            match action {
                "RunInstances" if counter.fetch_add(1, Ordering::SeqCst) < 2 => {
                    if let Ok(mut at) = lost_at.lock() {
                        at.get_or_insert_with(std::time::Instant::now);
                    }
                    Answer::ForwardThenTimeout
                }
                "DescribeInstances" if hidden => no_instances(),
                _ => Answer::Forward,
            }
        }),
    )
    .await?;
    let _op = rig.spawn_operator("region-a", "a1", &["--aws-endpoint", &proxy.url])?;
    let (api, q) = running(&rig, "region-a", "dbt").await?;
    let tries = launches.load(Ordering::SeqCst);
    ensure!(tries >= 3, "the launch was tried {tries} times, not retried after both losses");
    let uid = q.metadata.uid.clone().context("uid")?;
    let ever = launched_ever(&rig, &uid).await?;
    ensure!(ever.len() == 1, "instances launched: {ever:?}");
    let s = api.get("dbt").await?.status.context("status")?;
    assert_eq!(s.launches, Some(1), "the next launch takes a new number");
    Ok(())
}

/// A database deleted right after its instance was launched: cleanup trusts "nothing left" only
/// from a listing a listing lag (60 s) after that launch, and nothing is left.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_waits_out_the_listing_lag_after_the_last_create() -> Result<()> {
    let rig = Rig::new("op-lag", 1).await?;
    let _op = rig.spawn_operator("region-a", "a1", &[])?;
    let api = rig.questdbs("region-a").await?;
    apply(&api, &questdb("dbl", "8.2.1")?).await?;
    let aws = rig.aws("region-a").await?;
    let uid =
        eventually("the resource's uid", T, || async { Ok(api.get("dbl").await?.metadata.uid) }).await?;
    eventually("an instance launched", T, || async {
        Ok((!aws.find_instances(&uid).await?.is_empty()).then_some(()))
    })
    .await?;
    let seen = std::time::Instant::now();
    api.delete("dbl", &Default::default()).await?;
    eventually("resource gone", Duration::from_secs(240), || async {
        Ok(api.get_opt("dbl").await?.is_none().then_some(()))
    })
    .await?;
    let took = seen.elapsed();
    // The launch was at most a few seconds (EC2's listing lag) before the test saw it.
    ensure!(took >= Duration::from_secs(50), "finalizer removed {took:?} after the launch");
    for _ in 0..10 {
        nothing_left_in_ec2(&aws, &uid).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// A security group, instance, data volume and snapshot tagged for this cluster and namespace
/// whose owner does not exist: reported (and left) by `--orphans report`, deleted by the default
/// sweep. A live database's resources and a volume or snapshot kept on purpose are never touched.
#[tokio::test(flavor = "multi_thread")]
async fn the_orphan_sweep_reports_or_deletes_what_no_database_owns() -> Result<()> {
    use qdb_operator::aws::{Launch, Owner};
    let rig = Rig::new("op-orphans", 1).await?;
    let aws = rig.aws("region-a").await?;
    let mut op =
        rig.spawn_operator("region-a", "a1", &["--orphans", "report", "--orphan-sweep-secs", "3"])?;
    let (_, q) = running(&rig, "region-a", "dbo").await?;
    let live_uid = q.metadata.uid.clone().context("uid")?;
    let ghost = |n: u32| Owner {
        cluster: "region-a".into(),
        namespace: rig.namespace.clone(),
        database: format!("ghost{n}"),
        owner_uid: format!(
            "00000000-0000-4000-8000-{:012}",
            qdb_tests::rig::now_ms() % 1_000_000_000_000 + u64::from(n)
        ),
    };
    let (orphan, kept) = (ghost(0), ghost(1));
    let sg = aws.create_security_group(&orphan).await?;
    let launch = Launch {
        image_id: "ami-0a0a0a0a0a0a0a0a0",
        instance_type: "m6i.large",
        security_group_id: &sg.id,
        user_data: "#!/bin/sh\n",
        zone: None,
        extra_tags: &[],
        launch: 0,
    };
    let instance = aws.launch_instance(&orphan, &launch).await?;
    let small: qdb_crd::VolumeSpec = serde_json::from_value(json!({"sizeGib": 1, "type": "gp3"}))?;
    let volume = aws.create_volume(&orphan, &instance.zone, &small, None).await?;
    let retained = aws.create_volume(&kept, &instance.zone, &small, None).await?;
    aws.retag(&retained.id, &[(qdb_crd::keys::RETAINED.into(), "true".into())], &[]).await?;
    // A snapshot the operator took for the missing database, and one a deletion kept.
    let snapshot = aws.create_snapshot(&orphan, &volume.id, "request-1", None).await?;
    let kept_snapshot = aws.create_snapshot(&kept, &retained.id, "request-2", None).await?;
    aws.retag(&kept_snapshot.id, &[(qdb_crd::keys::RETAINED.into(), "true".into())], &[]).await?;
    let reported = |m: &str| qdb_tests::metric_total(m, "qdb_operator_orphans_total", "action=\"reported\"");
    eventually("the orphans reported", T, || async {
        let m = op.metrics().await?;
        Ok((reported(&m) >= 4.0).then_some(()))
    })
    .await?;
    let snapshot_ids = |owner: Owner| {
        let aws = aws.clone();
        async move { anyhow::Ok(aws.owned_snapshots(&owner).await?.into_iter().map(|s| s.id).collect::<Vec<_>>()) }
    };
    ensure!(snapshot_ids(orphan.clone()).await? == [snapshot.id.clone()], "report mode deleted the snapshot");
    ensure!(aws.find_security_group(&orphan.owner_uid).await?.is_some(), "report mode deleted the group");
    ensure!(!aws.find_instances(&orphan.owner_uid).await?.is_empty(), "report mode terminated the instance");
    op.kill9()?;
    let op = rig.spawn_operator("region-a", "a1", &["--orphan-sweep-secs", "3"])?;
    eventually("the orphans deleted", Duration::from_secs(240), || async {
        let snapshots_left = snapshot_ids(orphan.clone()).await?;
        Ok(nothing_left_in_ec2(&aws, &orphan.owner_uid).await.ok().filter(|_| snapshots_left.is_empty()))
    })
    .await?;
    let m = op.metrics().await?;
    ensure!(qdb_tests::metric_total(&m, "qdb_operator_orphans_total", "action=\"deleted\"") >= 4.0, "{m}");
    ensure!(snapshot_ids(kept.clone()).await? == [kept_snapshot.id.clone()], "kept snapshot deleted");
    ensure!(
        aws.find_volume(&kept.owner_uid).await?.is_some_and(|v| v.id == retained.id),
        "kept volume deleted"
    );
    ensure!(aws.find_volume(&live_uid).await?.is_some(), "a live database's volume deleted");
    ensure!(aws.find_security_group(&live_uid).await?.is_some(), "a live database's group deleted");
    ensure!(live_instances(&aws, &live_uid).await? == 1, "a live database's instance terminated");
    let _ = volume;
    Ok(())
}

/// A create with a node image EC2 does not know ends Failed with the AWS reason and message, as
/// condition and event, without hot-looping; a good image then builds it. The emulator validates
/// no AMI (moto's AMI validation is off in the local cloud), so a proxy answers RunInstances for
/// the unknown image exactly as EC2 does.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_with_an_unknown_image_fails_with_the_aws_reason() -> Result<()> {
    const UNKNOWN: &str = "ami-0dead0dead0dead0";
    let rig = Rig::new("op-badami", 1).await?;
    let proxy = qdb_tests::scripted::unknown_image(&rig.cloud.aws_endpoint, UNKNOWN).await?;
    let op = rig.spawn_operator("region-a", "a1", &["--aws-endpoint", &proxy.url])?;
    let api = rig.questdbs("region-a").await?;
    let mut q = questdb("dbx", "8.2.1")?;
    q.spec.node_image = UNKNOWN.into();
    apply(&api, &q).await?;
    let q = wait_phase(&api, "dbx", Phase::Failed, T).await?;
    let s = q.status.context("status")?;
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").context("Degraded")?;
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ImageNotFound"));
    ensure!(
        degraded.message.contains("InvalidAMIID.NotFound") && degraded.message.contains(UNKNOWN),
        "{degraded:?}"
    );
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, &rig.namespace);
    eventually("an ImageNotFound event", T, || async {
        let list = events.list(&Default::default()).await?;
        Ok(list.items.iter().any(|e| e.reason.as_deref() == Some("ImageNotFound")).then_some(()))
    })
    .await?;
    // No hot loop: the operator tries again at the resync (5 s here), not every poll.
    let launches =
        |m: &str| qdb_tests::metric_total(m, "qdb_operator_aws_calls_total", "operation=\"RunInstances\"");
    let before = launches(&op.metrics().await?);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = launches(&op.metrics().await?);
    ensure!(after - before <= 3.0, "{} launches in 10 s", after - before);
    let uid = q.metadata.uid.context("uid")?;
    ensure!(rig.aws("region-a").await?.find_instances(&uid).await?.is_empty(), "nothing launched");
    apply(&api, &questdb("dbx", "8.2.1")?).await?;
    wait_phase(&api, "dbx", Phase::Running, T).await?;
    Ok(())
}

/// Issue 18: a change held for its safety snapshot must not wait for the failure it would cure.
/// The database runs on image A; then EC2 refuses A (a proxy answers RunInstances for it as EC2
/// does for a deregistered image) and the node dies: the failover cannot launch, and every pass's
/// aws step fails (ImageNotFound). The change to image B is held for its safety snapshot, which
/// is taken although the aws step fails (crash-consistent: nothing serves), and the database comes
/// back on B. Before the fix the snapshot step, last in the pass, never ran after the failing aws
/// step: the change stayed held and the database Failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_held_for_its_safety_snapshot_still_cures_a_failing_database() -> Result<()> {
    const OLD: &str = "ami-0a0a0a0a0a0a0a0a0";
    const NEW: &str = "ami-0b0b0b0b0b0b0b0b0";
    let rig = Rig::new("op-heldcure", 1).await?;
    let failover = ["--failover-after-secs", "2"];
    let mut op = rig.spawn_operator("region-a", "a1", &failover)?;
    let (api, q) = running(&rig, "region-a", "dbh").await?;
    let old = q.status.and_then(|s| s.node).context("node")?;
    // From now on EC2 refuses the image the database runs on.
    let proxy = qdb_tests::scripted::unknown_image(&rig.cloud.aws_endpoint, OLD).await?;
    op.kill9()?;
    let _op =
        rig.spawn_operator("region-a", "a2", &[failover[0], failover[1], "--aws-endpoint", &proxy.url])?;
    rig.cloud.cluster("region-a")?.kill_node(&old.instance_id).await?;
    eventually("the failover failing with ImageNotFound", T, || async {
        let s = api.get("dbh").await?.status.unwrap_or_default();
        Ok(s.conditions.iter().any(|c| c.type_ == "Degraded" && c.reason == "ImageNotFound").then_some(()))
    })
    .await?;

    let mut q = questdb("dbh", "8.2.1")?;
    q.spec.node_image = NEW.into();
    apply(&api, &q).await?;
    let q = eventually("Running on image B", Duration::from_secs(300), || async {
        let q = api.get("dbh").await?;
        let s = q.status.clone().unwrap_or_default();
        let on_new = s.node.as_ref().is_some_and(|n| n.image == NEW);
        Ok((on_new && s.phase == Some(Phase::Running)).then_some(q))
    })
    .await?;
    let s = q.status.context("status")?;
    let safety = s.snapshots.iter().find(|e| e.reason == qdb_crd::SnapshotReason::BeforeChange);
    let safety = safety.with_context(|| format!("no safety snapshot: {:?}", s.snapshots))?;
    ensure!(
        safety.state == qdb_crd::SnapshotPhase::Completed
            && safety.consistency == qdb_crd::Consistency::CrashConsistent,
        "{safety:?}"
    );
    ensure!(s.admitted.is_some_and(|a| a.node_image == NEW), "image B not admitted");
    Ok(())
}

/// Five databases in one zone; three of their nodes (60 %) die at once. With failovers in an
/// unhealthy zone limited to one per ten minutes, one fails over and the other two are held
/// (condition and event say why). Revived, those two serve on their old nodes.
#[tokio::test(flavor = "multi_thread")]
async fn a_zone_wide_blip_fails_over_at_the_bounded_rate() -> Result<()> {
    let rig = Rig::new("op-zone", 1).await?;
    // A cluster with one zone's subnet: every database lands there (with all six, they spread).
    let subnets = rig.cloud.cluster("region-a")?.network_var("QDB_SUBNETS").context("subnets")?.to_string();
    let one_zone = subnets.split(',').next().context("a subnet")?;
    let args = [
        "--subnet",
        one_zone,
        "--failover-after-secs",
        "2",
        "--unhealthy-zone-threshold",
        "0.3",
        "--unhealthy-zone-min-not-ready",
        "2",
        "--unhealthy-zone-failovers",
        "1",
        "--unhealthy-zone-interval-secs",
        "600",
    ];
    let _op = rig.spawn_operator("region-a", "a1", &args)?;
    let api = rig.questdbs("region-a").await?;
    let names = ["dbz0", "dbz1", "dbz2", "dbz3", "dbz4"];
    for n in names {
        apply(&api, &questdb(n, "8.2.1")?).await?;
    }
    let mut nodes = Vec::new();
    for n in names {
        let q = wait_phase(&api, n, Phase::Running, Duration::from_secs(300)).await?;
        nodes.push(q.status.and_then(|s| s.node).context("node")?);
    }
    let zones: std::collections::BTreeSet<_> = nodes.iter().map(|n| n.zone.clone()).collect();
    ensure!(zones.len() == 1, "the databases are spread over zones {zones:?}");
    let nodesim = rig.cloud.cluster("region-a")?.nodesim.clone();
    let http = reqwest::Client::new();
    for node in &nodes[..3] {
        http.post(format!("{nodesim}/nodes/{}/kill", node.instance_id)).send().await?.error_for_status()?;
    }
    let moved = |s: &qdb_crd::QuestDBStatus, old: &qdb_crd::NodeStatus| {
        s.replacement.is_some()
            || s.last_failover.is_some()
            || s.node.as_ref().is_some_and(|n| n.instance_id != old.instance_id)
    };
    let degraded_reason = |s: &qdb_crd::QuestDBStatus| {
        s.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True").map(|c| c.reason.clone())
    };
    // One failover starts; the other two say they are held.
    eventually("one failover started and two held", Duration::from_secs(120), || async {
        let (mut started, mut held) = (0, 0);
        for (n, old) in names[..3].iter().zip(&nodes) {
            let s = api.get(n).await?.status.unwrap_or_default();
            started += usize::from(moved(&s, old));
            held += usize::from(degraded_reason(&s).as_deref() == Some("FailoverHeld"));
        }
        ensure!(started <= 1, "{started} failovers started");
        Ok((started == 1 && held == 2).then_some(()))
    })
    .await?;
    // Still at most one a while later (the interval is ten minutes).
    for _ in 0..20 {
        let mut started = 0;
        for (n, old) in names[..3].iter().zip(&nodes) {
            started += usize::from(moved(&api.get(n).await?.status.unwrap_or_default(), old));
        }
        ensure!(started <= 1, "{started} failovers started in an unhealthy zone");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let client = qdb_tests::kube_client(&rig.cloud.cluster("region-a")?.kubeconfig).await?;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, &rig.namespace);
    let list = events.list(&Default::default()).await?;
    ensure!(list.items.iter().any(|e| e.reason.as_deref() == Some("FailoverHeld")), "no FailoverHeld event");
    let mut held = Vec::new();
    for (n, old) in names[..3].iter().zip(&nodes) {
        if !moved(&api.get(n).await?.status.unwrap_or_default(), old) {
            held.push((*n, old.clone()));
        }
    }
    // All at once, as a zone comes back: revived one by one, the zone turns healthy while a held
    // node is still NotReady, and that one fails over (as kube-controller-manager would evict).
    let revivals = held.iter().map(|(_, old)| {
        let url = format!("{nodesim}/nodes/{}/revive", old.instance_id);
        let http = http.clone();
        async move { http.post(url).send().await?.error_for_status().map(|_| ()) }
    });
    futures::future::try_join_all(revivals).await?;
    for (n, old) in &held {
        let q = eventually(&format!("{n} serving again"), T, || async {
            let q = api.get(n).await?;
            let s = q.status.clone().unwrap_or_default();
            let healthy = degraded_reason(&s).is_none();
            Ok((s.phase == Some(Phase::Running) && healthy).then_some(q))
        })
        .await?;
        let s = q.status.context("status")?;
        assert_eq!(s.node.map(|x| x.instance_id), Some(old.instance_id.clone()), "{n} moved");
        ensure!(s.last_failover.is_none(), "{n} failed over");
    }
    Ok(())
}
