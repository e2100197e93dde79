//! The database's share of its dedicated node: what the node gives pods (its allocatable, as an
//! EKS AL2023 or Bottlerocket node computes it) less room for the node's own DaemonSets.
//!
//! The kubelet's memory capacity is the kernel's MemTotal, below EC2's figure by what firmware
//! and kernel keep (about 5 %: an m5.large node reports about 7.57 GiB of its 8 GiB); the share
//! counts from [`KERNEL_PERCENT`] below it, a point of slack. EKS nodes reserve for the kubelet and the runtime (kube-reserved) by formulas of the instance
//! type: memory 11 MiB per pod the node may run plus 255 MiB, where the pod count is the VPC
//! CNI's limit, interfaces x (addresses per interface - 1) + 2; CPU 6 % of the first core, 1 % of
//! the second, 0.5 % of the third and fourth and 0.25 % of each further one. The kubelet evicts
//! below 100 MiB free (evictionHard). The DaemonSets every node runs (kube-proxy, the VPC CNI,
//! the EBS CSI node plugin, the Pod Identity agent, the ingress Traefik) get a fixed
//! [`DAEMONS_MEMORY_MIB`] and [`DAEMONS_CPU_MILLIS`]. The database gets the rest: memory as
//! request and limit (a limit below the node's memory keeps the kernel's OOM killer off the
//! node's daemons), CPU as a request only, so QuestDB may use every idle cycle of its own node.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::aws::InstanceType;

/// What the machine's kernel does not show of EC2's memory figure, rounded up.
pub const KERNEL_PERCENT: u64 = 6;
/// The kubelet's default hard eviction threshold (`memory.available<100Mi`).
pub const EVICTION_HARD_MIB: u64 = 100;
/// Room for the DaemonSets on every node, whatever the size of the node.
pub const DAEMONS_MEMORY_MIB: u64 = 512;
pub const DAEMONS_CPU_MILLIS: u64 = 250;
/// Below this the database cannot run usefully (QuestDB's JVM heap and its page cache).
pub const MIN_MEMORY_MIB: u64 = 1024;

/// What the database's container requests (and, for memory, is limited to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub memory_mib: u64,
    pub cpu_millis: u64,
}

/// The pods an EKS node of this type takes (the VPC CNI's address limit).
pub fn max_pods(t: &InstanceType) -> u64 {
    u64::from(t.network_interfaces) * u64::from(t.ipv4_per_interface.saturating_sub(1)) + 2
}

pub fn kube_reserved_memory_mib(t: &InstanceType) -> u64 {
    11 * max_pods(t) + 255
}

/// In thousandths of a core, rounded up.
pub fn kube_reserved_cpu_millis(t: &InstanceType) -> u64 {
    // In 1/40 millicore steps, so 0.25 % of a core (2.5 m) stays exact.
    let quarters: u64 = (1..=u64::from(t.vcpus))
        .map(|core| match core {
            1 => 60 * 4,
            2 => 10 * 4,
            3 | 4 => 5 * 4,
            _ => 10,
        })
        .sum();
    quarters.div_ceil(4)
}

/// The database's share of a node of this type; None if it is too small for a database.
pub fn database_share(t: &InstanceType) -> Option<Share> {
    let reserved = kube_reserved_memory_mib(t) + EVICTION_HARD_MIB + DAEMONS_MEMORY_MIB;
    let visible = t.memory_mib * (100 - KERNEL_PERCENT) / 100;
    let memory_mib = visible.checked_sub(reserved).filter(|m| *m >= MIN_MEMORY_MIB)?;
    let cpu = u64::from(t.vcpus) * 1000;
    let cpu_millis = cpu.checked_sub(kube_reserved_cpu_millis(t) + DAEMONS_CPU_MILLIS).filter(|c| *c > 0)?;
    Some(Share { memory_mib, cpu_millis })
}

pub fn build_resources(share: &Share) -> ResourceRequirements {
    let memory = Quantity(format!("{}Mi", share.memory_mib));
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_string(), Quantity(format!("{}m", share.cpu_millis))),
                ("memory".to_string(), memory.clone()),
            ]
            .into(),
        ),
        limits: Some([("memory".to_string(), memory)].into()),
        ..ResourceRequirements::default()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// EC2's figures (DescribeInstanceTypes).
    pub const M6I_LARGE: InstanceType =
        InstanceType { memory_mib: 8192, vcpus: 2, network_interfaces: 3, ipv4_per_interface: 10 };
    pub const M6I_XLARGE: InstanceType =
        InstanceType { memory_mib: 16384, vcpus: 4, network_interfaces: 4, ipv4_per_interface: 15 };
    const T3_MICRO: InstanceType =
        InstanceType { memory_mib: 1024, vcpus: 2, network_interfaces: 2, ipv4_per_interface: 2 };
    const R6I_16XLARGE: InstanceType =
        InstanceType { memory_mib: 524288, vcpus: 64, network_interfaces: 15, ipv4_per_interface: 50 };

    #[test]
    fn eks_reserves_by_its_published_formulas() {
        // AWS's eni-max-pods.txt: m6i.large 29, m6i.xlarge 58, r6i.16xlarge 737.
        assert_eq!([max_pods(&M6I_LARGE), max_pods(&M6I_XLARGE), max_pods(&R6I_16XLARGE)], [29, 58, 737]);
        assert_eq!(kube_reserved_memory_mib(&M6I_LARGE), 574);
        assert_eq!(kube_reserved_memory_mib(&M6I_XLARGE), 893);
        assert_eq!(kube_reserved_cpu_millis(&M6I_LARGE), 70);
        assert_eq!(kube_reserved_cpu_millis(&M6I_XLARGE), 80);
        // 60 + 10 + 5 + 5 + 60 x 2.5
        assert_eq!(kube_reserved_cpu_millis(&R6I_16XLARGE), 230);
    }

    #[test]
    fn the_database_gets_the_node_less_the_reserves() {
        // 8192 x 0.94 = 7700, less 574 kube-reserved, 100 eviction, 512 daemons.
        assert_eq!(database_share(&M6I_LARGE), Some(Share { memory_mib: 6514, cpu_millis: 1680 }));
        assert_eq!(database_share(&M6I_XLARGE), Some(Share { memory_mib: 13895, cpu_millis: 3670 }));
        assert_eq!(database_share(&T3_MICRO), None, "1 GiB leaves the database too little");
    }

    #[test]
    fn memory_is_requested_and_limited_cpu_only_requested() {
        let r = build_resources(&Share { memory_mib: 7006, cpu_millis: 1680 });
        let requests = r.requests.unwrap();
        assert_eq!(requests["memory"].0, "7006Mi");
        assert_eq!(requests["cpu"].0, "1680m");
        let limits = r.limits.unwrap();
        assert_eq!(limits["memory"].0, "7006Mi");
        assert!(
            !limits.contains_key("cpu"),
            "no CPU limit: throttling its own node's idle cores helps nobody"
        );
    }
}
