//! Nodes as hosts of their own: each node is a network namespace with the instance's private IP
//! on a veth whose other end sits on the cluster's bridge, so a node's address is real and
//! reachable from the machine (EndpointSlices, the DNS record and the security group rules all
//! point at it). Killing a node is a partition: the host end of its link goes down while its
//! processes keep running.
//!
//! Pods that run a real server get a namespace and an address of their own too, from the upper
//! half of the VPC (10.<n>.128.0/17: the pod subnet, as the VPC CNI's custom networking gives
//! pods a subnet apart from the nodes'), so a pod's ports never clash with the node's (Traefik's
//! hostPorts 443, 8812 and 9009 on the node, QuestDB's on the pod).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;
use tokio::process::Command;
use tracing::{info, warn};

#[derive(Debug, Error)]
pub enum NetError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip {args}`: {source}")]
    Spawn { args: String, source: std::io::Error },
    #[error("bad bridge address {0:?}: want ADDRESS/PREFIX, e.g. 10.1.0.1/16")]
    BadGateway(String),
}

/// The cluster's bridge and how its node hosts are named.
#[derive(Debug, Clone)]
pub struct Network {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// Every namespace this simulator makes starts with it, so a restart can find (and sweep)
    /// what an earlier run left.
    pub netns_prefix: String,
    /// The next pod address, counted from the start of the pod subnet.
    next_pod: Arc<AtomicU32>,
}

/// The pod subnet's first address and size: the upper half of the VPC.
const POD_OFFSET: u32 = 1 << 15;

impl Network {
    pub fn new(bridge: String, gateway_cidr: &str, netns_prefix: String) -> Result<Self, NetError> {
        let bad = || NetError::BadGateway(gateway_cidr.to_string());
        let (ip, prefix) = gateway_cidr.split_once('/').ok_or_else(bad)?;
        Ok(Self {
            bridge,
            gateway: ip.parse().map_err(|_| bad())?,
            prefix: prefix.parse().ok().filter(|p| (8..=30).contains(p)).ok_or_else(bad)?,
            netns_prefix,
            next_pod: Arc::new(AtomicU32::new(0)),
        })
    }

    /// The next free pod address (the simulator hands them out in turn, skipping the subnet's
    /// first two; 32 000 pods before one is reused).
    pub fn allocate_pod_ip(&self) -> Ipv4Addr {
        let size = (POD_OFFSET - 2).min(u32::MAX >> self.prefix);
        let n = self.next_pod.fetch_add(1, Ordering::Relaxed) % size + 2;
        let mask = u32::MAX << (32 - self.prefix);
        Ipv4Addr::from((u32::from(self.gateway) & mask) + POD_OFFSET + n)
    }

    /// A pod's namespace name.
    pub fn pod_netns(&self, uid: &str) -> String {
        format!("{}p-{uid}", self.netns_prefix)
    }

    /// The node's namespace name (`ip netns exec` runs its processes there).
    pub fn netns(&self, instance_id: &str) -> String {
        format!("{}{instance_id}", self.netns_prefix)
    }

    /// Creates the bridge with the gateway address once; idempotent.
    pub async fn ensure_bridge(&self) -> Result<(), NetError> {
        if ip(&["link", "show", &self.bridge]).await.is_ok() {
            return Ok(());
        }
        ip(&["link", "add", &self.bridge, "type", "bridge"]).await?;
        ip(&["addr", "add", &format!("{}/{}", self.gateway, self.prefix), "dev", &self.bridge]).await?;
        ip(&["link", "set", &self.bridge, "up"]).await?;
        info!(bridge = self.bridge, gateway = %self.gateway, "bridge created");
        Ok(())
    }

    /// Makes the node's host: its namespace, a veth into the bridge and `address` inside.
    /// Idempotent, and a host left half-made by a crash is made again from scratch.
    pub async fn ensure_host(&self, instance_id: &str, address: &str) -> Result<(), NetError> {
        self.make_host(&self.netns(instance_id), &host_veth(instance_id), address).await
    }

    /// Makes a pod's own host: namespace `pod_netns(uid)` with `address`.
    pub async fn ensure_pod_host(&self, uid: &str, address: &str) -> Result<(), NetError> {
        self.make_host(&self.pod_netns(uid), &pod_veth(uid), address).await
    }

    async fn make_host(&self, ns: &str, veth: &str, address: &str) -> Result<(), NetError> {
        let (ns, veth) = (ns.to_string(), veth.to_string());
        let want = format!("{address}/{}", self.prefix);
        if let Ok(addrs) = ip(&["-n", &ns, "-o", "addr", "show", "dev", "eth0"]).await
            && addrs.contains(&format!(" {want} "))
        {
            return Ok(());
        }
        self.ensure_bridge().await?;
        let _ = remove_netns(&ns).await;
        ip(&["netns", "add", &ns]).await?;
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]).await?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]).await?;
        ip(&["-n", &ns, "addr", "add", &want, "dev", "eth0"]).await?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", &ns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", &ns, "route", "add", "default", "via", &self.gateway.to_string()]).await?;
        info!(netns = ns, address, "host made");
        Ok(())
    }

    /// Cuts (or restores) a host's link (`host_veth` or `pod_veth`): a partition, not a power cut.
    pub async fn set_link(&self, veth: &str, up: bool) -> Result<(), NetError> {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", veth, state]).await?;
        info!(veth, link = state, "link changed");
        Ok(())
    }

    pub async fn remove_pod_host(&self, uid: &str) -> Result<(), NetError> {
        remove_netns(&self.pod_netns(uid)).await
    }

    /// Kills whatever still runs in the node's namespace and deletes it (the veth goes with it).
    pub async fn remove_host(&self, instance_id: &str) -> Result<(), NetError> {
        remove_netns(&self.netns(instance_id)).await
    }

    /// Removes every namespace of this simulator (an earlier run's, or all at shutdown) and the
    /// bridge.
    pub async fn sweep(&self, remove_bridge: bool) {
        if let Ok(list) = ip(&["netns", "list"]).await {
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if ns.starts_with(&self.netns_prefix)
                    && let Err(e) = remove_netns(ns).await
                {
                    warn!(netns = ns, error = %e, "removing a node host failed");
                }
            }
        }
        if remove_bridge && ip(&["link", "show", &self.bridge]).await.is_ok() {
            let _ = ip(&["link", "del", &self.bridge]).await;
        }
    }
}

async fn remove_netns(ns: &str) -> Result<(), NetError> {
    if let Ok(pids) = ip(&["netns", "pids", ns]).await {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a process that lives in our own namespace; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    ip(&["netns", "del", ns]).await.map(|_| ())
}

/// The host end of a node's veth: interface names are at most 15 bytes, instance ids are 19.
pub fn host_veth(instance_id: &str) -> String {
    let tail = instance_id.trim_start_matches("i-");
    let tail = &tail[tail.len().saturating_sub(13)..];
    format!("qv{tail}")
}

/// The host end of a pod's veth, from the end of its UID (random hex).
pub fn pod_veth(uid: &str) -> String {
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).collect();
    format!("qp{}", &hex[hex.len().saturating_sub(13)..])
}

async fn ip(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| NetError::Spawn { args: args.join(" "), source })?;
    if !out.status.success() {
        return Err(NetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_the_kernel_limit() {
        let name = host_veth("i-0123456789abcdef0");
        assert_eq!(name, "qv456789abcdef0");
        assert!(name.len() <= 15, "{name}");
        assert_eq!(host_veth("i-1"), "qv1");
        assert_eq!(pod_veth("2140e51c-b5b9-4cca-b654-4003c2372578"), "qp44003c2372578");
    }

    #[test]
    fn pods_get_addresses_in_the_upper_half_of_the_vpc() {
        let n = Network::new("br".into(), "10.1.0.1/16", "q".into()).unwrap();
        assert_eq!(n.allocate_pod_ip(), Ipv4Addr::new(10, 1, 128, 2));
        assert_eq!(n.allocate_pod_ip(), Ipv4Addr::new(10, 1, 128, 3));
        for _ in 0..300 {
            n.allocate_pod_ip();
        }
        assert_eq!(n.allocate_pod_ip(), Ipv4Addr::new(10, 1, 129, 48));
    }

    #[test]
    fn gateway_is_address_and_prefix() {
        let n = Network::new("br".into(), "10.1.0.1/16", "qdb-".into()).unwrap();
        assert_eq!((n.gateway, n.prefix), (Ipv4Addr::new(10, 1, 0, 1), 16));
        assert_eq!(n.netns("i-1"), "qdb-i-1");
        assert!(Network::new("br".into(), "10.1.0.1", "q".into()).is_err());
        assert!(Network::new("br".into(), "10.1.0.1/33", "q".into()).is_err());
    }
}
