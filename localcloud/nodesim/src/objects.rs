//! Pure builders for what a kubelet writes: its Node, the Node's heartbeat, its Lease, and the
//! status of the pods it runs.

use serde_json::{Value, json};

use crate::ec2::{Instance, MachineType};
use crate::userdata::KubeletFlags;

/// The Node a kubelet registers for an instance, with the labels and taints its flags asked for.
pub fn build_node(inst: &Instance, flags: &KubeletFlags, region: &str) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in [
        ("kubernetes.io/hostname", inst.private_dns.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("node.kubernetes.io/instance-type", inst.instance_type.as_str()),
        ("topology.kubernetes.io/zone", inst.az.as_str()),
        ("topology.kubernetes.io/region", region),
        (crate::csi::TOPOLOGY_KEY, inst.az.as_str()),
    ] {
        labels.insert(k.into(), v.into());
    }
    for (k, v) in &flags.labels {
        labels.insert(k.clone(), v.clone().into());
    }
    let taints: Vec<Value> = flags
        .taints
        .iter()
        .map(|t| match &t.value {
            Some(v) => json!({"key": t.key, "value": v, "effect": t.effect}),
            None => json!({"key": t.key, "effect": t.effect}),
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": inst.private_dns,
            "labels": labels,
            // The attach/detach controller attaches this node's volumes (the kubelet's default).
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", crate::csi::CONTROLLER_MANAGED: "true"},
        },
        "spec": {
            "providerID": format!("aws:///{}/{}", inst.az, inst.id),
            "taints": taints,
        },
    })
}

/// What a node of this machine type offers, as an EKS AL2023 node reports it: capacity is the
/// machine (memory as its kernel shows it, about 5 % below EC2's figure), allocatable that less
/// what nodeadm reserves for the kubelet (11 MiB per pod of the VPC CNI's limit + 255 MiB; 6 % of
/// the first core, 1 % of the second, 0.5 % of the next two, 0.25 % of the rest) and the
/// kubelet's 100 MiB eviction threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeResources {
    pub cpu_millis: u64,
    pub memory_mib: u64,
    pub pods: u64,
    pub allocatable_cpu_millis: u64,
    pub allocatable_memory_mib: u64,
}

impl NodeResources {
    pub fn of(t: &MachineType) -> NodeResources {
        let pods = t.network_interfaces * t.ipv4_per_interface.saturating_sub(1) + 2;
        let memory_mib = t.memory_mib * 95 / 100;
        let cpu_millis = t.vcpus * 1000;
        // In quarters of a millicore, so 0.25 % of a core stays exact.
        let reserved_cpu: u64 = (1..=t.vcpus)
            .map(|c| match c {
                1 => 240,
                2 => 40,
                3 | 4 => 20,
                _ => 10,
            })
            .sum::<u64>()
            .div_ceil(4);
        NodeResources {
            cpu_millis,
            memory_mib,
            pods,
            allocatable_cpu_millis: cpu_millis.saturating_sub(reserved_cpu),
            allocatable_memory_mib: memory_mib.saturating_sub(11 * pods + 255 + 100),
        }
    }
}

/// The status a healthy kubelet reports on every heartbeat. `ready_since` keeps the Ready
/// condition's transition time stable across heartbeats, as a real kubelet does.
pub fn build_node_status(
    inst: &Instance,
    res: &NodeResources,
    volumes_in_use: &[String],
    now: &str,
    ready_since: &str,
) -> Value {
    let cond = |type_: &str, status: &str, reason: &str, since: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": reason,
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        })
    };
    let mut addresses = vec![
        json!({"type": "InternalIP", "address": inst.private_ip}),
        json!({"type": "Hostname", "address": inst.private_dns}),
        json!({"type": "InternalDNS", "address": inst.private_dns}),
    ];
    if let Some(ip) = &inst.public_ip {
        addresses.push(json!({"type": "ExternalIP", "address": ip}));
    }
    let capacity = json!({
        "cpu": format!("{}m", res.cpu_millis), "memory": format!("{}Mi", res.memory_mib),
        "pods": res.pods.to_string(), "ephemeral-storage": "100Gi",
    });
    let allocatable = json!({
        "cpu": format!("{}m", res.allocatable_cpu_millis), "memory": format!("{}Mi", res.allocatable_memory_mib),
        "pods": res.pods.to_string(), "ephemeral-storage": "100Gi",
    });
    json!({
        "status": {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", ready_since),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", ready_since),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", ready_since),
                cond("Ready", "True", "KubeletReady", ready_since),
            ],
            "addresses": addresses,
            "capacity": capacity,
            "allocatable": allocatable,
            // Always sent, empty too: the merge patch must clear what is no longer mounted.
            "volumesInUse": volumes_in_use,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": inst.id, "systemUUID": inst.id, "bootID": inst.id,
                "kernelVersion": "6.1.0-nodesim", "osImage": inst.image_id,
                "containerRuntimeVersion": "nodesim://1", "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64",
            },
        }
    })
}

/// The node's Lease in kube-node-lease, owned by the Node so it goes when the Node goes.
pub fn build_lease(node_name: &str, node_uid: &str, now: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node_name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}],
        },
        "spec": {"holderIdentity": node_name, "leaseDurationSeconds": 40, "renewTime": now},
    })
}

/// What a kubelet reports of a pod's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Not started: `reason` as the kubelet says it (ContainerCreating while a volume is not
    /// attached, ImagePullBackOff for an image it cannot pull), `message` why.
    Waiting {
        reason: &'static str,
        message: String,
    },
    Running {
        started_at: String,
        ready: bool,
        restarts: i32,
    },
}

impl ContainerState {
    pub fn ready(&self) -> bool {
        matches!(self, ContainerState::Running { ready: true, .. })
    }

    /// Whether `pod`'s reported status already says this (so nothing needs writing).
    pub fn reported_by(&self, pod: &k8s_openapi::api::core::v1::Pod) -> bool {
        let Some(cs) = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()) else {
            return false;
        };
        !cs.is_empty()
            && cs.iter().all(|c| match self {
                ContainerState::Waiting { reason, message } => {
                    c.state.as_ref().and_then(|s| s.waiting.as_ref()).is_some_and(|w| {
                        w.reason.as_deref() == Some(reason) && w.message.as_deref() == Some(message)
                    })
                }
                ContainerState::Running { started_at, ready, restarts } => {
                    c.ready == *ready
                        && c.restart_count == *restarts
                        && c.state.as_ref().and_then(|s| s.running.as_ref()).is_some_and(|r| {
                            r.started_at.as_ref().map(|t| t.0.to_string()).as_deref()
                                == Some(started_at.as_str())
                        })
                }
            })
    }
}

/// What a kubelet reports for a pod it runs, every container in `state`; `pod_ip` is the node's
/// for a pod on the node's network (hostPorts, simulated pods), its own otherwise.
pub fn build_pod_status(
    container_names_images: &[(String, String)],
    node_ip: &str,
    pod_ip: &str,
    now: &str,
    state: &ContainerState,
) -> Value {
    let ready = state.ready();
    let flag = if ready { "True" } else { "False" };
    let (running, restarts) = match state {
        ContainerState::Running { restarts, .. } => (true, *restarts),
        ContainerState::Waiting { .. } => (false, 0),
    };
    let containers: Vec<Value> = container_names_images
        .iter()
        .map(|(name, image)| {
            let st = match state {
                ContainerState::Running { started_at, .. } => json!({"running": {"startedAt": started_at}}),
                ContainerState::Waiting { reason, message } => {
                    json!({"waiting": {"reason": reason, "message": message}})
                }
            };
            json!({
                "name": name, "image": image, "imageID": "", "ready": ready,
                "started": running, "restartCount": restarts, "state": st,
            })
        })
        .collect();
    let cond =
        |type_: &str, status: &str| json!({"type": type_, "status": status, "lastTransitionTime": now});
    json!({
        "status": {
            "phase": if running { "Running" } else { "Pending" },
            "hostIP": node_ip,
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": now,
            "conditions": [
                cond("Initialized", "True"),
                cond("Ready", flag),
                cond("ContainersReady", flag),
                cond("PodScheduled", "True"),
            ],
            "containerStatuses": containers,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userdata::parse;

    fn inst() -> Instance {
        Instance {
            id: "i-123".into(),
            running: true,
            terminated: false,
            private_dns: "ip-10-1-2-3.ec2.internal".into(),
            private_ip: "10.1.2.3".into(),
            public_ip: None,
            az: "us-east-1a".into(),
            instance_type: "m5.large".into(),
            image_id: "ami-1".into(),
        }
    }

    #[test]
    fn node_carries_identity_labels_and_taints() {
        let config = "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    \
                      name: region-a\n    apiServerEndpoint: https://127.0.0.1:1\n    \
                      certificateAuthority: UEVN\n    cidr: 10.0.0.0/24\n  kubelet:\n    flags:\n    \
                      - --node-labels=db=x\n    - --register-with-taints=dedicated=x:NoSchedule\n";
        let flags = parse(config).unwrap();
        let node = build_node(&inst(), &flags, "us-east-1");
        assert_eq!(node["metadata"]["name"], "ip-10-1-2-3.ec2.internal");
        assert_eq!(node["spec"]["providerID"], "aws:///us-east-1a/i-123");
        assert_eq!(node["metadata"]["labels"]["db"], "x");
        assert_eq!(node["metadata"]["labels"]["node.kubernetes.io/instance-type"], "m5.large");
        assert_eq!(node["spec"]["taints"][0]["key"], "dedicated");
        assert_eq!(node["spec"]["taints"][0]["effect"], "NoSchedule");
    }

    const M5_LARGE: MachineType =
        MachineType { memory_mib: 8192, vcpus: 2, network_interfaces: 3, ipv4_per_interface: 10 };

    #[test]
    fn the_node_offers_what_nodeadm_leaves_of_the_machine() {
        let r = NodeResources::of(&M5_LARGE);
        // eni-max-pods.txt: m5.large 29; 11 x 29 + 255 = 574 MiB kube-reserved, 70m CPU.
        assert_eq!((r.pods, r.cpu_millis, r.allocatable_cpu_millis), (29, 2000, 1930));
        assert_eq!((r.memory_mib, r.allocatable_memory_mib), (7782, 7782 - 574 - 100));
        let big =
            MachineType { memory_mib: 524288, vcpus: 64, network_interfaces: 15, ipv4_per_interface: 50 };
        assert_eq!(NodeResources::of(&big).allocatable_cpu_millis, 64000 - 230);
    }

    #[test]
    fn status_reports_ready_with_addresses() {
        let s = build_node_status(
            &inst(),
            &NodeResources::of(&M5_LARGE),
            &["kubernetes.io/csi/ebs.csi.aws.com^vol-1".to_string()],
            "2026-01-01T00:00:10Z",
            "2026-01-01T00:00:00Z",
        );
        let ready = &s["status"]["conditions"][3];
        assert_eq!(ready["type"], "Ready");
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(s["status"]["addresses"][0]["address"], "10.1.2.3");
        assert_eq!(s["status"]["volumesInUse"][0], "kubernetes.io/csi/ebs.csi.aws.com^vol-1");
    }

    #[test]
    fn pod_waits_for_its_volume() {
        let c = vec![("questdb".to_string(), "questdb/questdb:8.1.0".to_string())];
        let creating = ContainerState::Waiting {
            reason: "ContainerCreating",
            message: "volume vol-1 not attached".into(),
        };
        let waiting = build_pod_status(&c, "10.0.0.1", "10.0.128.2", "2026-01-01T00:00:01Z", &creating);
        assert_eq!(waiting["status"]["phase"], "Pending");
        assert_eq!(waiting["status"]["containerStatuses"][0]["ready"], false);
        assert_eq!(
            waiting["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        let up =
            |ready| ContainerState::Running { started_at: "2026-01-01T00:00:00Z".into(), ready, restarts: 2 };
        let running = build_pod_status(&c, "10.0.0.1", "10.0.128.2", "2026-01-01T00:00:01Z", &up(true));
        assert_eq!(running["status"]["phase"], "Running");
        assert_eq!(
            (running["status"]["hostIP"].as_str(), running["status"]["podIP"].as_str()),
            (Some("10.0.0.1"), Some("10.0.128.2"))
        );
        assert_eq!(running["status"]["conditions"][1]["status"], "True");
        assert_eq!(running["status"]["containerStatuses"][0]["restartCount"], 2);
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(running).unwrap();
        assert!(up(true).reported_by(&pod));
        assert!(!up(false).reported_by(&pod), "readiness changed: must be written");
        let starting = build_pod_status(&c, "10.0.0.1", "10.0.128.2", "2026-01-01T00:00:01Z", &up(false));
        assert_eq!(starting["status"]["phase"], "Running");
        assert_eq!(starting["status"]["conditions"][1]["status"], "False");
    }
}
