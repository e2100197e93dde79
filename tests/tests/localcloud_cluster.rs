//! The clusters of the local cloud behave like a cloud: an EC2 instance launched in the emulator
//! joins its cluster as a dedicated node, the real scheduler places a workload there, the node
//! simulator runs it once the EBS CSI driver (the simulator too) has attached its EBS volume for
//! the attach/detach controller's VolumeAttachment (FailedMount events until then), a killed
//! node is marked unreachable by the real controller-manager and recovers when revived, a join
//! delay holds a node back, and a terminated instance's Node goes.

use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use qdb_tests::rig::restricted_namespace;
use qdb_tests::{Cloud, ClusterEnv, eventually, kube_client, unique};
use serde_json::json;

const CLUSTER_TAG: &str = "cloud.questdb.io/cluster";
/// The taint the node lifecycle controller puts on a node whose heartbeats stopped.
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

#[tokio::test(flavor = "multi_thread")]
async fn region_a_dedicated_node_lifecycle() -> Result<()> {
    dedicated_node_lifecycle("region-a").await
}

#[tokio::test(flavor = "multi_thread")]
async fn region_b_dedicated_node_lifecycle() -> Result<()> {
    dedicated_node_lifecycle("region-b").await
}

async fn dedicated_node_lifecycle(cluster: &str) -> Result<()> {
    let cloud = Cloud::load()?;
    let env: ClusterEnv = cloud.cluster(cluster)?.clone();
    let ec2 = cloud.ec2(&env.aws_region).await;
    let kube = kube_client(&env.kubeconfig).await?;
    let db = unique("db");

    // 1. Launch the dedicated instance the way the operator does: an AL2023 NodeConfig naming the
    // cluster, with the kubelet's labels and taint.
    let var = |k: &str| env.network_var(k).with_context(|| format!("{k} of {cluster} in the env file"));
    let user_data = format!(
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    name: {name}\n    \
         apiServerEndpoint: {endpoint}\n    certificateAuthority: {ca}\n    cidr: {cidr}\n  kubelet:\n    \
         flags:\n    - --node-labels=cloud.questdb.io/database={db}\n    \
         - --register-with-taints=cloud.questdb.io/dedicated={db}:NoSchedule\n",
        name = var("QDB_EKS_CLUSTER_NAME")?,
        endpoint = var("QDB_EKS_ENDPOINT")?,
        ca = var("QDB_EKS_CA")?,
        cidr = var("QDB_EKS_SERVICE_CIDR")?,
    );
    // A join delay holds the new node back, like a slow bootstrap.
    let nodesim = reqwest::Client::new();
    let resp = nodesim.put(format!("{}/join-delay/4", env.nodesim)).send().await?;
    assert!(resp.status().is_success(), "join-delay: {}", resp.status());
    let run = ec2
        .run_instances()
        .image_id("ami-0123456789abcdef0")
        .instance_type(InstanceType::T3Medium)
        .min_count(1)
        .max_count(1)
        .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(CLUSTER_TAG).value(cluster).build())
                .tags(Tag::builder().key("Name").value(&db).build())
                .build(),
        )
        .send()
        .await
        .context("RunInstances")?;
    let inst = run.instances().first().context("no instance launched")?;
    let instance_id = inst.instance_id().context("instance id")?.to_string();
    let node_name = inst.private_dns_name().context("private DNS name")?.to_string();

    let result = async {
        // 2. The simulator registers it as a Node with the requested label and taint, once the
        //    join delay has passed.
        let nodes: Api<Node> = Api::all(kube.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(nodes.get_opt(&node_name).await?.is_none(), "node joined despite the join delay");
        let node = eventually("node to join", Duration::from_secs(60), || async {
            let n = nodes.get_opt(&node_name).await?;
            Ok(n.filter(|n| node_ready(n) == Some("True")))
        })
        .await?;
        assert_eq!(
            node.spec.as_ref().and_then(|s| s.provider_id.clone()).unwrap_or_default(),
            format!(
                "aws:///{}/{instance_id}",
                inst.placement().and_then(|p| p.availability_zone()).unwrap_or_default()
            )
        );
        nodesim.put(format!("{}/join-delay/0", env.nodesim)).send().await?.error_for_status()?;
        assert_eq!(node.metadata.labels.as_ref().and_then(|l| l.get("cloud.questdb.io/database")), Some(&db));
        let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        assert!(
            taints.iter().any(|t| t.key == "cloud.questdb.io/dedicated" && t.value.as_deref() == Some(&db)),
            "dedicated taint missing: {taints:?}"
        );

        // 3. A workload that selects and tolerates it is scheduled there by the real scheduler
        //    and run by the simulator once its EBS volume is attached to the instance (by the
        //    attach/detach controller and the EBS CSI driver): until then the kubelet reports
        //    FailedMount, as a real one does.
        let namespaces: Api<Namespace> = Api::all(kube.clone());
        namespaces.create(&PostParams::default(), &restricted_namespace(&db)).await?;
        // The apiserver's Pod Security admission enforces the namespace's level: a pod that
        // would run as root with every capability is refused, naming the level it violates.
        let privileged: Pod = serde_json::from_value(json!({
            "metadata": {"name": "privileged"},
            "spec": {"containers": [{"name": "c", "image": "questdb/questdb:8.2.1",
                                     "securityContext": {"privileged": true}}]}
        }))?;
        let refused =
            Api::<Pod>::namespaced(kube.clone(), &db).create(&PostParams::default(), &privileged).await;
        match refused {
            Err(kube::Error::Api(e)) if e.code == 403 => {
                assert!(e.message.contains("violates PodSecurity \"restricted:latest\""), "{}", e.message)
            }
            other => anyhow::bail!("a privileged pod in a restricted namespace: {other:?}"),
        }
        let zone = inst.placement().and_then(|p| p.availability_zone()).context("no zone")?;
        let volume =
            ec2.create_volume().availability_zone(zone).size(1).send().await.context("CreateVolume")?;
        let volume_id = volume.volume_id().context("volume id")?.to_string();
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": db},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "claimRef": {"namespace": db, "name": "data"},
                "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": volume_id, "fsType": "xfs"},
            }
        }))?;
        Api::<PersistentVolume>::all(kube.clone()).create(&PostParams::default(), &pv).await?;
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": db,
                "resources": {"requests": {"storage": "1Gi"}},
            }
        }))?;
        Api::<PersistentVolumeClaim>::namespaced(kube.clone(), &db)
            .create(&PostParams::default(), &pvc)
            .await?;
        let deploy: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "questdb"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "questdb"}},
                "template": {
                    "metadata": {"labels": {"app": "questdb"}},
                    "spec": {
                        "nodeSelector": {"cloud.questdb.io/database": db},
                        "tolerations": [{"key": "cloud.questdb.io/dedicated", "operator": "Equal",
                                         "value": db, "effect": "NoSchedule"}],
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "fsGroup": 10001,
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{"name": "questdb", "image": "questdb/questdb:8.2.1",
                                        "securityContext": {"allowPrivilegeEscalation": false,
                                                            "capabilities": {"drop": ["ALL"]}},
                                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/questdb"}]}],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                    }
                }
            }
        }))?;
        Api::<Deployment>::namespaced(kube.clone(), &db).create(&PostParams::default(), &deploy).await?;
        let pods: Api<Pod> = Api::namespaced(kube.clone(), &db);
        let events: Api<Event> = Api::namespaced(kube.clone(), &db);
        let waiting = eventually("the kubelet's FailedMount event", Duration::from_secs(60), || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list.into_iter().find(|e| e.reason.as_deref() == Some("FailedMount")))
        })
        .await?;
        assert_eq!(waiting.type_.as_deref(), Some("Warning"));
        assert_eq!(waiting.source.as_ref().and_then(|s| s.component.as_deref()), Some("kubelet"));
        assert_eq!(waiting.source.as_ref().and_then(|s| s.host.as_deref()), Some(node_name.as_str()));
        let message = waiting.message.clone().unwrap_or_default();
        assert!(message.contains(&db) && message.contains(&node_name), "{message}");
        // The real attach/detach controller asks for the attachment (a VolumeAttachment for the
        // pod's node), and the EBS CSI driver, played by the simulator, attaches: it claims the
        // object, records the node's instance, calls AttachVolume, and reports the device.
        let vas: Api<VolumeAttachment> = Api::all(kube.clone());
        let va = eventually("the volume attached by the EBS CSI driver", Duration::from_secs(60), || async {
            let list = vas.list(&ListParams::default()).await?;
            Ok(list.into_iter().find(|va| {
                va.spec.source.persistent_volume_name.as_deref() == Some(db.as_str())
                    && va.spec.node_name == node_name
                    && va.status.as_ref().is_some_and(|s| s.attached)
            }))
        })
        .await?;
        assert_eq!(va.spec.attacher, "ebs.csi.aws.com");
        let annotations = va.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.get("csi.alpha.kubernetes.io/node-id"), Some(&instance_id));
        let finalizers = va.metadata.finalizers.clone().unwrap_or_default();
        assert!(finalizers.iter().any(|f| f == "external-attacher/ebs-csi-aws-com"), "{finalizers:?}");
        let device = va.status.and_then(|s| s.attachment_metadata).unwrap_or_default();
        assert!(device.get("devicePath").is_some_and(|d| d.starts_with("/dev/xvd")), "{device:?}");
        let described = ec2.describe_volumes().volume_ids(&volume_id).send().await?;
        let attachment =
            described.volumes().first().and_then(|v| v.attachments().first()).context("attachment")?;
        assert_eq!(attachment.instance_id(), Some(instance_id.as_str()));
        // One actor: every AttachVolume and DetachVolume of the volume was the driver's.
        let driver = cloud.vars.get("QDB_EBS_CSI_DRIVER_KEY").context("QDB_EBS_CSI_DRIVER_KEY in env")?;
        let who = qdb_tests::ec2_calls::attachers(&cloud.ec2_calls()?, &volume_id);
        assert!(who.iter().eq([driver]), "attached by {who:?}");
        let pod = eventually("pod to run on the dedicated node", Duration::from_secs(60), || async {
            let list = pods.list(&ListParams::default().labels("app=questdb")).await?;
            Ok(list.into_iter().find(pod_ready))
        })
        .await?;
        assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(node_name.as_str()));
        assert_eq!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Running"));

        // 4. Kill the machine: heartbeats stop, the controller-manager marks it unreachable.
        let resp = nodesim.post(format!("{}/nodes/{instance_id}/kill", env.nodesim)).send().await?;
        assert!(resp.status().is_success(), "kill: {}", resp.status());
        let node = eventually("node to be marked unreachable", Duration::from_secs(90), || async {
            let n = nodes.get(&node_name).await?;
            Ok((node_ready(&n) == Some("Unknown") && has_taint(&n, UNREACHABLE)).then_some(n))
        })
        .await?;
        assert_eq!(node_ready(&node), Some("Unknown"));

        // 5. Revived, it heartbeats again and the controller-manager lifts the taint.
        nodesim.post(format!("{}/nodes/{node_name}/revive", env.nodesim)).send().await?.error_for_status()?;
        eventually("revived node to be Ready and untainted", Duration::from_secs(60), || async {
            let n = nodes.get(&node_name).await?;
            Ok((node_ready(&n) == Some("True") && !has_taint(&n, UNREACHABLE)).then_some(()))
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;

    // 6. Terminating the instance removes its Node, as the cloud node controller would.
    ec2.terminate_instances().instance_ids(&instance_id).send().await?;
    let nodes: Api<Node> = Api::all(kube.clone());
    let gone = eventually("node of terminated instance to be deleted", Duration::from_secs(30), || async {
        Ok(nodes.get_opt(&node_name).await?.is_none().then_some(()))
    })
    .await;
    let _ = Api::<Namespace>::all(kube.clone()).delete(&db, &DeleteParams::default()).await;
    let _ = Api::<PersistentVolume>::all(kube.clone()).delete(&db, &DeleteParams::default()).await;
    result?;
    gone
}

fn node_ready(n: &Node) -> Option<&str> {
    n.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready").map(|c| c.status.as_str())
}

fn has_taint(n: &Node, key: &str) -> bool {
    n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|ts| ts.iter().any(|t| t.key == key))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The emulator's cheaper response serializer (localcloud/aws/fast_serialize.py) answers the
/// control plane's calls byte for byte as moto's own: its check runs the same calls with the
/// emulator's randomness seeded, without and with it, and compares the answers.
#[test]
fn the_emulators_faster_serializer_answers_as_moto_does() -> Result<()> {
    let cloud = Cloud::load()?;
    let cache = cloud.vars.get("QDB_CACHE").context("QDB_CACHE in the env file")?;
    let python = std::path::Path::new(cache).join("moto-venv/bin/python");
    let check =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../localcloud/aws/check_fast_serialize.py");
    let out = std::process::Command::new(&python)
        .arg(&check)
        .output()
        .with_context(|| format!("running {} with {}", check.display(), python.display()))?;
    let said = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    println!("{said}");
    Ok(())
}
