//! The simulator loop: joins running instances as Nodes, heartbeats them, runs their pods, and
//! lets go of nodes whose instance stopped, was terminated or was killed on request.

use futures::StreamExt;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde::Serialize;
use tracing::{info, warn};

use crate::csi;
use crate::ec2::{self, Instance};
use crate::events;
use crate::net::Network;
use crate::objects::{
    ContainerState, NodeResources, build_lease, build_node, build_node_status, build_pod_status,
};
use crate::runtime::{self, ImagePlan, Launch, Runtime, Verdict};
use crate::security;
use crate::userdata::{self, KubeletFlags};

pub struct Config {
    pub cluster: String,
    pub region: String,
    pub tag_key: String,
    pub heartbeat: Duration,
    pub tick: Duration,
    pub runtime: runtime::Config,
    pub network: Network,
    /// The apiserver, for the nodes' relays (pods reach it as the `kubernetes` Service).
    pub apiserver: std::net::SocketAddr,
    /// The cluster CA, for pods that talk to the apiserver.
    pub ca_file: std::path::PathBuf,
}

/// One simulated machine, keyed by instance id.
#[derive(Debug, Clone, Serialize)]
pub struct SimNode {
    pub instance_id: String,
    pub node_name: String,
    pub private_ip: String,
    /// The instance is running in EC2.
    pub running: bool,
    /// A Node object has been registered for it.
    pub joined: bool,
    /// Killed on request: no heartbeats, pods left as they are, like a machine that lost power.
    pub killed: bool,
    /// Why it will never join (unreadable user data), if so.
    pub broken: Option<String>,
    /// The partition in effect: the host end of its link is down.
    pub link_down: bool,
    #[serde(skip)]
    flags: KubeletFlags,
    #[serde(skip)]
    resources: Option<NodeResources>,
    #[serde(skip)]
    instance: Option<Instance>,
    #[serde(skip)]
    first_seen: Option<Instant>,
    #[serde(skip)]
    last_heartbeat: Option<Instant>,
    #[serde(skip)]
    ready_since: Option<String>,
    #[serde(skip)]
    node_uid: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub nodes: BTreeMap<String, SimNode>,
    pub join_delay: Duration,
}

impl State {
    /// Finds a node by instance id or node name.
    pub fn find_mut(&mut self, key: &str) -> Option<&mut SimNode> {
        self.nodes.values_mut().find(|n| n.instance_id == key || n.node_name == key)
    }
}

pub type Shared = Arc<Mutex<State>>;

pub struct Sim {
    pub cfg: Config,
    pub kube: kube::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub state: Shared,
    pub runtime: Arc<Mutex<Runtime>>,
    pub http: reqwest::Client,
    /// Per node (instance id), its apiserver relay.
    pub relays: Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
    pub storage: crate::storage::Storage,
    /// When volumes were last checked for growth.
    pub grown_at: Mutex<Option<Instant>>,
    /// EC2's figures per instance type, read once each.
    pub machine_types: Mutex<std::collections::HashMap<String, ec2::MachineType>>,
    /// When PVs the EBS CSI driver holds were last checked for deletion.
    pub pvs_checked_at: Mutex<Option<Instant>>,
    /// The EBS CSI attacher's last EC2 call per VolumeAttachment, for its backoff.
    pub attacher_tries: Mutex<std::collections::HashMap<String, Instant>>,
    /// The volumes mounted for each pod, simulated ones too: the kubelet's volumes in use.
    pub mounted: Mutex<std::collections::HashMap<String, Mount>>,
    /// Per pod uid, its container's stop under way.
    pub stopping: Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
}

/// A pod's volumes on a node, from its mount until [`UNMOUNT_REPORTED`] after it is gone.
#[derive(Debug, Clone)]
pub struct Mount {
    instance_id: String,
    volumes: Vec<String>,
    gone_at: Option<Instant>,
}

/// How long a kubelet goes on reporting a gone pod's volumes in use: it unmounts them at once,
/// and its node status (volumesInUse) says so at its next update, every 10 s. The attach/detach
/// controller does not detach meanwhile, so a pod replaced on the same node keeps its volume.
const UNMOUNT_REPORTED: Duration = Duration::from_secs(10);

impl Mount {
    fn in_use(&self) -> bool {
        self.gone_at.is_none_or(|t| t.elapsed() < UNMOUNT_REPORTED)
    }
}

fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}

/// A Lease's renewTime is a MicroTime: the apiserver refuses any other precision.
fn now_micros() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Requests in flight at once per kind of work (heartbeats, pods).
const CONCURRENCY: usize = 16;

/// A pass slower than this is logged: what waits on a part (a join, an attach, a pod) waits
/// that long for its next pass.
const SLOW_PASS: Duration = Duration::from_secs(5);

async fn remove_pod_host(network: &Network, uid: &str) {
    if let Err(e) = network.remove_pod_host(uid).await {
        warn!(uid, error = %e, "removing a pod's host failed");
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl Sim {
    /// Each part of a real cluster this plays runs at its own pace, as the real ones are separate
    /// processes: a slow EC2 listing or a pod taking its grace period to stop never holds a
    /// node's heartbeat, an attach or another pod's start (one shared loop did: with EC2 slow under
    /// load, a new database waited minutes for its volume).
    pub async fn run(&self) {
        tokio::join!(
            // The machines booting and joining (EC2 and the cloud node controller).
            self.every("machines", || async {
                self.sync_instances().await?;
                self.apply_partitions().await;
                Ok(())
            }),
            // The kubelets' node status and leases. Concurrently: with a hundred nodes, one
            // request after another misses the interval and the controller manager marks
            // healthy nodes unreachable.
            self.every("heartbeats", || async {
                self.heartbeats().await;
                Ok(())
            }),
            // The EBS CSI driver's controller (its external-attacher).
            self.every("attacher", || async {
                let vas = csi::ours(csi::list(&self.kube).await?);
                self.attach_detach(&vas).await?;
                self.check_pvs(&vas).await;
                Ok(())
            }),
            // The kubelets' pod workers, which mount only what the driver reports attached.
            self.every("kubelets", || async {
                let vas = csi::ours(csi::list(&self.kube).await?);
                self.run_pods(&csi::attached(&vas)).await?;
                self.grow_volumes().await;
                Ok(())
            }),
        );
    }

    /// One part's loop: a pass, then a tick's pause.
    async fn every<F, Fut>(&self, part: &'static str, pass: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        loop {
            let began = Instant::now();
            if let Err(e) = pass().await {
                warn!(part, error = format!("{e:#}"), "pass failed");
            }
            let took = began.elapsed();
            if took >= SLOW_PASS {
                warn!(part, seconds = took.as_secs_f64(), "slow pass");
            }
            tokio::time::sleep(self.cfg.tick).await;
        }
    }

    /// Every few seconds: PVs the driver holds that are being deleted and no longer attached.
    async fn check_pvs(&self, vas: &[VolumeAttachment]) {
        const EVERY: Duration = Duration::from_secs(5);
        {
            let mut at = self.pvs_checked_at.lock().expect("pv lock");
            if at.is_some_and(|t| t.elapsed() < EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        if let Err(e) = self.release_pvs(vas).await {
            warn!(error = format!("{e:#}"), "releasing PVs failed");
        }
    }

    /// Grows the filesystems of running servers' volumes that EC2 says grew (ModifyVolume),
    /// every few seconds: one DescribeVolumes for all of them.
    async fn grow_volumes(&self) {
        const EVERY: Duration = Duration::from_secs(3);
        {
            let mut at = self.grown_at.lock().expect("grow lock");
            if at.is_some_and(|t| t.elapsed() < EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        if self.storage.kind() != crate::storage::Kind::XfsImage {
            return;
        }
        let ids: Vec<String> = {
            let rt = self.runtime.lock().expect("runtime lock");
            let mut ids: Vec<String> = rt.containers.values().filter_map(|c| c.volume_id.clone()).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        if ids.is_empty() {
            return;
        }
        let sizes = match ec2::describe_volumes(&self.ec2, &ids, None).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = format!("{e:#}"), "cannot read volume sizes");
                return;
            }
        };
        for (id, size) in sizes {
            if let Err(e) = self.storage.grow(&id, size).await {
                warn!(volume = id, error = %e, "growing a volume's filesystem failed");
            }
        }
    }

    async fn machine_type(&self, name: &str) -> Result<ec2::MachineType> {
        if let Some(m) = self.machine_types.lock().expect("types lock").get(name) {
            return Ok(*m);
        }
        let m = ec2::machine_type(&self.ec2, name).await?;
        self.machine_types.lock().expect("types lock").insert(name.to_string(), m);
        Ok(m)
    }

    /// Brings the simulated machines in line with EC2, joining new ones after the join delay and
    /// removing the Node of a terminated instance (the cloud node controller's job in a real cluster).
    async fn sync_instances(&self) -> Result<()> {
        let instances = ec2::cluster_instances(&self.ec2, &self.cfg.tag_key, &self.cfg.cluster).await?;
        let seen: HashSet<String> = instances.iter().map(|i| i.id.clone()).collect();
        for inst in instances {
            let known = self.state.lock().expect("state lock").nodes.contains_key(&inst.id);
            if !known && inst.running {
                // What the machine has, as its kubelet would find it; retried next tick.
                let machine = match self.machine_type(&inst.instance_type).await {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(instance = inst.id, error = format!("{e:#}"), "cannot read the machine type");
                        continue;
                    }
                };
                let flags = match ec2::user_data(&self.ec2, &inst.id).await {
                    Ok(text) => userdata::parse(&text).map_err(|e| e.to_string()).and_then(|f| {
                        // A node joins the cluster its user data names, whichever that is.
                        if f.cluster == self.cfg.cluster {
                            Ok(f)
                        } else {
                            Err(format!(
                                "its user data joins cluster {:?}, not {:?}",
                                f.cluster, self.cfg.cluster
                            ))
                        }
                    }),
                    Err(e) => Err(format!("{e:#}")),
                };
                let mut st = self.state.lock().expect("state lock");
                st.nodes.insert(
                    inst.id.clone(),
                    SimNode {
                        instance_id: inst.id.clone(),
                        node_name: inst.private_dns.clone(),
                        private_ip: inst.private_ip.clone(),
                        running: true,
                        joined: false,
                        killed: false,
                        broken: flags.as_ref().err().cloned(),
                        link_down: false,
                        flags: flags.unwrap_or_default(),
                        resources: Some(NodeResources::of(&machine)),
                        instance: Some(inst.clone()),
                        first_seen: Some(Instant::now()),
                        last_heartbeat: None,
                        ready_since: None,
                        node_uid: None,
                    },
                );
                continue;
            }
            if inst.terminated {
                self.forget(&inst.id).await;
                continue;
            }
            let powered_off = {
                let mut st = self.state.lock().expect("state lock");
                let Some(n) = st.nodes.get_mut(&inst.id) else { continue };
                let changed = n.running != inst.running;
                if changed {
                    info!(instance = inst.id, running = inst.running, "instance state changed");
                    n.ready_since = None;
                }
                n.running = inst.running;
                n.instance = Some(inst.clone());
                changed && !inst.running
            };
            if powered_off {
                // Only EC2 stopping the instance ends its processes; a partition does not.
                self.power_off(&inst.id).await;
            }
        }
        // Instances that vanished from EC2 altogether (e.g. an emulator reset) are gone too.
        let vanished: Vec<String> = {
            let st = self.state.lock().expect("state lock");
            st.nodes.keys().filter(|id| !seen.contains(*id)).cloned().collect()
        };
        for id in vanished {
            self.forget(&id).await;
        }
        self.join_new().await;
        Ok(())
    }

    /// The machine lost power: its containers die at once, with no grace.
    async fn power_off(&self, instance_id: &str) {
        let dead: Vec<(String, runtime::Container)> = {
            let mut rt = self.runtime.lock().expect("runtime lock");
            rt.on_instance(instance_id)
                .into_iter()
                .filter_map(|uid| Some((uid.clone(), rt.take(&uid)?)))
                .collect()
        };
        for (uid, c) in dead {
            let own_host = c.own_host;
            c.kill().await;
            if own_host {
                remove_pod_host(&self.cfg.network, &uid).await;
            }
        }
    }

    /// Whether the pod's container is stopped for good; if it runs, its stop (SIGTERM, its
    /// grace period, its host removed) starts in the background, as a kubelet's pod worker does,
    /// so one pod's grace period holds no other pod's start, probe or stop.
    fn stopped(&self, uid: &str, grace: Duration) -> bool {
        let mut stopping = self.stopping.lock().expect("stopping lock");
        stopping.retain(|_, task| !task.is_finished());
        if stopping.contains_key(uid) {
            return false;
        }
        let Some(c) = self.runtime.lock().expect("runtime lock").take(uid) else { return true };
        let network = self.cfg.network.clone();
        let owned = uid.to_string();
        stopping.insert(
            uid.to_string(),
            tokio::spawn(async move {
                let own_host = c.own_host;
                c.stop(grace).await;
                if own_host {
                    remove_pod_host(&network, &owned).await;
                }
            }),
        );
        false
    }

    /// Partitions killed nodes and heals revived ones (their processes run on either way).
    async fn apply_partitions(&self) {
        let due: Vec<(String, bool)> = {
            let st = self.state.lock().expect("state lock");
            st.nodes
                .values()
                .filter(|n| n.joined && n.killed != n.link_down)
                .map(|n| (n.instance_id.clone(), n.killed))
                .collect()
        };
        for (id, down) in due {
            // The node and the pods with hosts of their own on it are cut off together.
            let pods: Vec<String> = {
                let rt = self.runtime.lock().expect("runtime lock");
                rt.containers
                    .iter()
                    .filter(|(_, c)| c.instance_id == id && c.own_host)
                    .map(|(uid, _)| crate::net::pod_veth(uid))
                    .collect()
            };
            for veth in pods {
                if let Err(e) = self.cfg.network.set_link(&veth, !down).await {
                    warn!(instance = id, veth, error = %e, "changing a pod's link failed");
                }
            }
            match self.cfg.network.set_link(&crate::net::host_veth(&id), !down).await {
                Ok(()) => {
                    if let Some(n) = self.state.lock().expect("state lock").nodes.get_mut(&id) {
                        n.link_down = down;
                    }
                }
                Err(e) => warn!(instance = id, error = %e, "changing a node's link failed"),
            }
        }
    }

    async fn forget(&self, instance_id: &str) {
        let removed = self.state.lock().expect("state lock").nodes.remove(instance_id);
        let Some(n) = removed else { return };
        self.power_off(instance_id).await;
        if let Some(relay) = self.relays.lock().expect("relays lock").remove(instance_id) {
            relay.abort();
        }
        if let Err(e) = self.cfg.network.remove_host(instance_id).await {
            warn!(instance = instance_id, error = %e, "removing the node's host failed");
        }
        if !n.joined {
            return;
        }
        let nodes: Api<Node> = Api::all(self.kube.clone());
        match nodes.delete(&n.node_name, &DeleteParams::default()).await {
            Ok(_) => info!(node = n.node_name, instance = instance_id, "instance terminated, Node deleted"),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                warn!(node = n.node_name, error = %e, "deleting Node of terminated instance failed; retrying");
                // Keep it so the next tick tries again.
                self.state.lock().expect("state lock").nodes.insert(instance_id.to_string(), n);
            }
        }
    }

    async fn join_new(&self) {
        let due: Vec<SimNode> = {
            let st = self.state.lock().expect("state lock");
            let delay = st.join_delay;
            st.nodes
                .values()
                .filter(|n| n.running && !n.joined && !n.killed && n.broken.is_none())
                .filter(|n| n.first_seen.is_some_and(|t| t.elapsed() >= delay))
                .cloned()
                .collect()
        };
        for n in due {
            let Some(inst) = &n.instance else { continue };
            if let Err(e) = self.cfg.network.ensure_host(&n.instance_id, &n.private_ip).await {
                warn!(instance = n.instance_id, error = %e, "making the node's host failed; retrying");
                continue;
            }
            let node = build_node(inst, &n.flags, &self.cfg.region);
            let nodes: Api<Node> = Api::all(self.kube.clone());
            let obj: Node = match serde_json::from_value(node) {
                Ok(o) => o,
                Err(e) => {
                    warn!(error = %e, "built an invalid Node");
                    continue;
                }
            };
            let uid = match nodes.create(&PostParams::default(), &obj).await {
                Ok(created) => created.metadata.uid,
                Err(e) if is_status(&e, 409) => {
                    let Ok(existing) = nodes.get(&n.node_name).await else { continue };
                    let wanted = obj.spec.as_ref().and_then(|s| s.provider_id.as_deref());
                    if existing.spec.as_ref().and_then(|s| s.provider_id.as_deref()) != wanted {
                        // The name (the private DNS name) is an address an earlier instance had,
                        // and that instance is gone: its Node is stale, as the cloud node
                        // lifecycle controller would find it. Remove it; the next tick joins.
                        let dp = DeleteParams {
                            preconditions: Some(Preconditions {
                                uid: existing.metadata.uid,
                                resource_version: None,
                            }),
                            ..DeleteParams::default()
                        };
                        match nodes.delete(&n.node_name, &dp).await {
                            Ok(_) => info!(
                                node = n.node_name,
                                instance = n.instance_id,
                                "stale Node of a gone instance deleted"
                            ),
                            Err(e) => warn!(node = n.node_name, error = %e, "deleting a stale Node failed"),
                        }
                        continue;
                    }
                    existing.metadata.uid
                }
                Err(e) => {
                    warn!(node = n.node_name, error = %e, "registering Node failed");
                    continue;
                }
            };
            // The EBS CSI node plugin registers with the kubelet: the driver and the instance id.
            if let Some(node_uid) = &uid {
                let csinode = csi::build_csinode(&n.node_name, node_uid, &n.instance_id);
                let api: Api<k8s_openapi::api::storage::v1::CSINode> = Api::all(self.kube.clone());
                let params = PatchParams::apply("nodesim").force();
                if let Err(e) = api.patch(&n.node_name, &params, &Patch::Apply(csinode)).await {
                    warn!(node = n.node_name, error = %e, "registering the EBS CSI driver failed");
                    continue;
                }
            }
            info!(node = n.node_name, instance = n.instance_id, "node joined");
            let mut st = self.state.lock().expect("state lock");
            if let Some(s) = st.nodes.get_mut(&n.instance_id) {
                s.joined = true;
                s.node_uid = uid;
                s.last_heartbeat = None;
            }
        }
    }

    fn live(&self) -> Vec<SimNode> {
        let st = self.state.lock().expect("state lock");
        st.nodes.values().filter(|n| n.running && n.joined && !n.killed).cloned().collect()
    }

    async fn heartbeats(&self) {
        let due: Vec<SimNode> = self
            .live()
            .into_iter()
            .filter(|n| n.last_heartbeat.is_none_or(|t| t.elapsed() >= self.cfg.heartbeat))
            .collect();
        futures::stream::iter(due)
            .for_each_concurrent(CONCURRENCY, |n| async move {
                if let Err(e) = self.heartbeat(&n).await {
                    warn!(node = n.node_name, error = format!("{e:#}"), "heartbeat failed");
                }
            })
            .await;
    }

    /// The EBS volumes mounted for running containers on the node, as the kubelet reports them
    /// (`volumesInUse`): the attach/detach controller detaches none of them until they are
    /// unmounted, that is until the container is stopped.
    fn volumes_in_use(&self, instance_id: &str) -> Vec<String> {
        let mut names: Vec<String> = {
            let rt = self.runtime.lock().expect("runtime lock");
            rt.containers
                .values()
                .filter(|c| c.instance_id == instance_id)
                .filter_map(|c| c.volume_id.as_deref().map(csi::unique_name))
                .collect()
        };
        let mounted = self.mounted.lock().expect("mounted lock");
        names.extend(
            mounted
                .values()
                .filter(|m| m.instance_id == instance_id && m.in_use())
                .flat_map(|m| m.volumes.iter().map(|v| csi::unique_name(v))),
        );
        names.sort();
        names.dedup();
        names
    }

    async fn heartbeat(&self, n: &SimNode) -> Result<()> {
        let (Some(inst), Some(res)) = (&n.instance, &n.resources) else { return Ok(()) };
        let now = now();
        let since = n.ready_since.clone().unwrap_or_else(|| now.clone());
        let nodes: Api<Node> = Api::all(self.kube.clone());
        nodes
            .patch_status(
                &n.node_name,
                &PatchParams::default(),
                &Patch::Merge(build_node_status(
                    inst,
                    res,
                    &self.volumes_in_use(&n.instance_id),
                    &now,
                    &since,
                )),
            )
            .await
            .context("patching Node status")?;
        let leases: Api<Lease> = Api::namespaced(self.kube.clone(), "kube-node-lease");
        let lease = build_lease(&n.node_name, n.node_uid.as_deref().unwrap_or_default(), &now_micros());
        leases
            .patch(&n.node_name, &PatchParams::apply("nodesim").force(), &Patch::Apply(lease))
            .await
            .context("renewing Lease")?;
        let mut st = self.state.lock().expect("state lock");
        if let Some(s) = st.nodes.get_mut(&n.instance_id) {
            s.last_heartbeat = Some(Instant::now());
            s.ready_since = Some(since);
        }
        Ok(())
    }

    /// Plays the kubelet for the pods bound to live nodes: finishes graceful deletions, starts
    /// containers once their volumes are attached to the node's instance, and probes them.
    async fn run_pods(&self, attached: &std::collections::BTreeSet<(String, String)>) -> Result<()> {
        let live: BTreeMap<String, SimNode> =
            self.live().into_iter().map(|n| (n.node_name.clone(), n)).collect();
        if live.is_empty() {
            return Ok(());
        }
        let pods: Api<Pod> = Api::all(self.kube.clone());
        let list = pods.list(&ListParams::default()).await.context("listing pods")?;
        let listed: HashSet<String> = list.items.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        {
            let mut mounted = self.mounted.lock().expect("mounted lock");
            for (uid, m) in mounted.iter_mut() {
                if !listed.contains(uid) {
                    m.gone_at.get_or_insert_with(Instant::now);
                }
            }
            mounted.retain(|_, m| m.in_use());
        }
        let mine: Vec<(Pod, &SimNode)> = list
            .into_iter()
            .filter_map(|pod| {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).and_then(|n| live.get(n))?;
                Some((pod, node))
            })
            .collect();
        self.stop_orphans(&mine, &live).await;
        futures::stream::iter(mine)
            .for_each_concurrent(CONCURRENCY, |(pod, node)| async move {
                if let Err(e) = self.run_pod(&pod, node, attached).await {
                    warn!(pod = pod.metadata.name, error = format!("{e:#}"), "running pod failed");
                }
            })
            .await;
        Ok(())
    }

    /// A live node's containers whose pod is gone from it (force-deleted while the node was cut
    /// off, say) are stopped, as a kubelet does once it hears of it.
    async fn stop_orphans(&self, mine: &[(Pod, &SimNode)], live: &BTreeMap<String, SimNode>) {
        let wanted: HashSet<(String, String)> =
            mine.iter().filter_map(|(p, n)| Some((p.metadata.uid.clone()?, n.instance_id.clone()))).collect();
        let live_instances: HashSet<&str> = live.values().map(|n| n.instance_id.as_str()).collect();
        let orphans: Vec<(String, String)> = {
            let rt = self.runtime.lock().expect("runtime lock");
            rt.containers
                .iter()
                .filter(|(uid, c)| {
                    live_instances.contains(c.instance_id.as_str())
                        && !wanted.contains(&((*uid).clone(), c.instance_id.clone()))
                })
                .map(|(uid, c)| (uid.clone(), c.pod.clone()))
                .collect()
        };
        for (uid, pod) in orphans {
            info!(pod, "its pod is no longer bound here; stopping it");
            self.stopped(&uid, Duration::from_secs(30));
        }
    }

    async fn run_pod(
        &self,
        pod: &Pod,
        node: &SimNode,
        attached: &std::collections::BTreeSet<(String, String)>,
    ) -> Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.kube.clone(), &ns);
        if pod.metadata.deletion_timestamp.is_some() {
            // Stop the containers, then confirm the deletion as the kubelet does.
            if !self.stopped(&uid, grace_period(pod)) {
                return Ok(());
            }
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None }),
                ..DeleteParams::default()
            };
            let confirmed = match api.delete(&name, &dp).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
                Err(e) => Err(e).context("confirming pod deletion"),
            };
            if confirmed.is_ok()
                && let Some(m) = self.mounted.lock().expect("mounted lock").get_mut(&uid)
            {
                m.gone_at.get_or_insert_with(Instant::now);
            }
            return confirmed;
        }
        let containers: Vec<(String, String)> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
            .collect();
        let image = containers.first().map(|(_, i)| i.clone()).unwrap_or_default();
        let mut pod_ip = node.private_ip.clone();
        let state = match runtime::plan_image(&self.cfg.runtime, &image) {
            ImagePlan::Simulated => {
                // Like a kubelet, volumes are checked before the containers start, not again
                // afterwards: a running pod stays running (and re-reading EC2 for every pod every
                // tick would swamp the emulator with a hundred databases).
                if pod_is_ready(pod) {
                    return Ok(());
                }
                match self.attached_volumes(pod, &ns, node, attached).await? {
                    Err(message) => ContainerState::Waiting { reason: "ContainerCreating", message },
                    Ok(_) => ContainerState::Running { started_at: now(), ready: true, restarts: 0 },
                }
            }
            ImagePlan::PullBackOff(message) => {
                ContainerState::Waiting { reason: "ImagePullBackOff", message }
            }
            plan @ (ImagePlan::QuestDb { .. } | ImagePlan::Traefik { .. }) => {
                let (state, ip) = self.run_real(pod, node, &plan, attached).await?;
                pod_ip = ip;
                state
            }
        };
        if state.reported_by(pod) {
            return Ok(());
        }
        events::record(&self.kube, pod, &node.node_name, &events::on_waiting(&state, &image)).await;
        let status = build_pod_status(&containers, &node.private_ip, &pod_ip, &now(), &state);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .context("patching pod status")?;
        info!(pod = format!("{ns}/{name}"), node = node.node_name, state = ?state, "pod status");
        Ok(())
    }

    /// A pod that runs a real process: started once its volumes are attached, then probed.
    /// Returns its state and its address.
    async fn run_real(
        &self,
        pod: &Pod,
        node: &SimNode,
        plan: &ImagePlan,
        attached: &std::collections::BTreeSet<(String, String)>,
    ) -> Result<(ContainerState, String)> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let running = self.runtime.lock().expect("runtime lock").take(&uid);
        let Some(mut c) = running else {
            return self.start_real(pod, node, plan, 0, None, attached).await;
        };
        if c.exited() {
            warn!(pod = c.pod, "the container exited; restarting it");
        } else {
            let ip = c.pod_ip.clone();
            let probes = runtime::probes(pod);
            let verdict = runtime::run_probes(&self.http, &mut c, &probes, &ip).await;
            let said = events::on_probes(verdict, &container_name(pod), &probes, &ip);
            events::record(&self.kube, pod, &node.node_name, &said).await;
            if verdict != Verdict::Unhealthy {
                let state = ContainerState::Running {
                    started_at: c.started_at.clone(),
                    ready: c.ready,
                    restarts: c.restarts,
                };
                self.runtime.lock().expect("runtime lock").put(&uid, c);
                return Ok((state, ip));
            }
            warn!(pod = c.pod, "liveness probe failed; restarting the container");
        }
        // A restart keeps the pod's sandbox: the same host and address.
        let restarts = c.restarts + 1;
        let ip = c.pod_ip.clone();
        c.stop(grace_period(pod)).await;
        self.start_real(pod, node, plan, restarts, Some(ip), attached).await
    }

    async fn start_real(
        &self,
        pod: &Pod,
        node: &SimNode,
        plan: &ImagePlan,
        restarts: i32,
        pod_ip: Option<String>,
        attached: &std::collections::BTreeSet<(String, String)>,
    ) -> Result<(ContainerState, String)> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let volumes = match self.attached_volumes(pod, &ns, node, attached).await? {
            Err(message) => {
                return Ok((
                    ContainerState::Waiting { reason: "ContainerCreating", message },
                    node.private_ip.clone(),
                ));
            }
            Ok(v) => v,
        };
        let identity = match security::identity(pod) {
            Ok(i) => i,
            Err(e) => {
                let message = e.to_string();
                return Ok((
                    ContainerState::Waiting { reason: "CreateContainerConfigError", message },
                    node.private_ip.clone(),
                ));
            }
        };
        let image = pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone());
        let started_at = now();
        let mut launch = Launch {
            pod: format!("{ns}/{}", pod.metadata.name.clone().unwrap_or_default()),
            uid: uid.clone(),
            image: image.unwrap_or_default(),
            instance_id: node.instance_id.clone(),
            netns: self.cfg.network.netns(&node.instance_id),
            pod_ip: node.private_ip.clone(),
            own_host: false,
            volume_id: None,
            program: Default::default(),
            args: Vec::new(),
            env: Vec::new(),
            started_at: started_at.clone(),
            restarts,
            identity,
        };
        match plan {
            ImagePlan::QuestDb { jar, .. } => {
                let mounts = self.data_mounts(pod, &ns, &volumes).await?;
                let root = self.storage.ensure(&mounts.volume.id, mounts.volume.size_bytes).await?;
                runtime::prepare_questdb_root(&root, &mounts.files)?;
                if let Some((gid, on_root_mismatch)) = security::fs_group(pod)? {
                    security::apply_fs_group(&root, gid, on_root_mismatch)?;
                }
                let (program, args, mut env) =
                    runtime::questdb_command(&self.cfg.runtime, jar, &root, memory_limit(pod));
                env.extend(container_env(pod));
                // Its own host and address, so its ports never meet the node's (Traefik's).
                let ip = match pod_ip {
                    Some(ip) => ip,
                    None => self.cfg.network.allocate_pod_ip().to_string(),
                };
                self.cfg.network.ensure_pod_host(&uid, &ip).await?;
                launch = Launch {
                    netns: self.cfg.network.pod_netns(&uid),
                    pod_ip: ip,
                    own_host: true,
                    volume_id: Some(mounts.volume.id),
                    program,
                    args,
                    env,
                    ..launch
                };
            }
            ImagePlan::Traefik { bin } => {
                self.ensure_relay(&node.instance_id)?;
                let token = self.service_account_token(pod, &ns).await?;
                let container_args = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.args.clone())
                    .unwrap_or_default();
                let (program, args) =
                    runtime::traefik_command(bin, &container_args, &token, &self.cfg.ca_file);
                launch = Launch { program, args, ..launch };
            }
            ImagePlan::Simulated | ImagePlan::PullBackOff(_) => {
                anyhow::bail!("{} runs no process", launch.image)
            }
        }
        let ip = launch.pod_ip.clone();
        self.runtime.lock().expect("runtime lock").start(&self.cfg.runtime, launch)?;
        events::record(&self.kube, pod, &node.node_name, &[events::started(&container_name(pod))]).await;
        Ok((ContainerState::Running { started_at, ready: false, restarts }, ip))
    }

    /// The node's `kubernetes` Service: a relay to the apiserver inside its namespace, once.
    fn ensure_relay(&self, instance_id: &str) -> Result<()> {
        let mut relays = self.relays.lock().expect("relays lock");
        if relays.get(instance_id).is_some_and(|r| !r.is_finished()) {
            return Ok(());
        }
        let relay = crate::relay::start(&self.cfg.network.netns(instance_id), self.cfg.apiserver)?;
        relays.insert(instance_id.to_string(), relay);
        Ok(())
    }

    /// A token of the pod's service account, bound to the pod, as the kubelet asks for one for
    /// a projected service account volume.
    async fn service_account_token(&self, pod: &Pod, ns: &str) -> Result<String> {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..TokenRequest::default()
        };
        let answer = api
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token of service account {ns}/{sa}"))?;
        answer.status.map(|s| s.token).context("the token request has no token")
    }

    /// The EBS volumes behind the pod's claims when every one is attached to `instance_id`
    /// (claim name -> volume id), or why the pod waits: a kubelet cannot start a pod whose EBS
    /// volume is not attached to its instance; nor can we.
    async fn attached_volumes(
        &self,
        pod: &Pod,
        ns: &str,
        node: &SimNode,
        attached: &std::collections::BTreeSet<(String, String)>,
    ) -> Result<Result<BTreeMap<String, AttachedVolume>, String>> {
        let instance_id = node.instance_id.as_str();
        let claims: Vec<(String, String)> = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| {
                v.persistent_volume_claim.as_ref().map(|c| (v.name.clone(), c.claim_name.clone()))
            })
            .collect();
        let mut ids = BTreeMap::new();
        for (volume, claim) in claims {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.kube.clone(), ns);
            let Some(pv_name) = pvcs.get_opt(&claim).await?.and_then(|c| c.spec).and_then(|s| s.volume_name)
            else {
                return Ok(Err(format!("claim {claim} is not bound")));
            };
            let pvs: Api<PersistentVolume> = Api::all(self.kube.clone());
            let Some(pv) = pvs.get_opt(&pv_name).await? else {
                return Ok(Err(format!("volume {pv_name} not found")));
            };
            let Some(volume_id) = ebs_volume_id(&pv) else { continue };
            // The kubelet mounts a CSI volume only once its VolumeAttachment says attached
            // (WaitForAttach), whatever EC2 shows.
            if !attached.contains(&(pv_name.clone(), node.node_name.clone())) {
                return Ok(Err(format!(
                    "volume {pv_name} is not attached to node {} yet (no attached VolumeAttachment)",
                    node.node_name
                )));
            }
            let size_bytes =
                ec2::attached_volume(&self.ec2, &volume_id, instance_id).await.unwrap_or_else(|e| {
                    warn!(volume = volume_id, error = format!("{e:#}"), "cannot read volume");
                    None
                });
            let Some(size_bytes) = size_bytes else {
                return Ok(Err(format!("EBS volume {volume_id} is not attached to {instance_id}")));
            };
            ids.insert(volume, AttachedVolume { id: volume_id, size_bytes });
        }
        let volumes: Vec<String> = ids.values().map(|v: &AttachedVolume| v.id.clone()).collect();
        if !volumes.is_empty() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let mount = Mount { instance_id: instance_id.to_string(), volumes, gone_at: None };
            let new = self.mounted.lock().expect("mounted lock").insert(uid.clone(), mount).is_none();
            // As a kubelet: the node status says the volumes are in use before they are mounted,
            // so the attach/detach controller never detaches one a pod of the node is using.
            if new && let Err(e) = self.report_in_use(node).await {
                // Not mounted, so not in use: the next try reports again.
                self.mounted.lock().expect("mounted lock").remove(&uid);
                return Ok(Err(format!("reporting the volumes in use: {e:#}")));
            }
        }
        Ok(Ok(ids))
    }

    async fn report_in_use(&self, node: &SimNode) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.kube.clone());
        let patch = serde_json::json!({"status": {"volumesInUse": self.volumes_in_use(&node.instance_id)}});
        nodes
            .patch_status(&node.node_name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(drop)
            .context("patching the node's volumes in use")
    }

    /// Where the container's data root is (the EBS volume mounted over it) and the ConfigMap
    /// files mounted inside it (`subPath` mounts, e.g. conf/server.conf), read once at start as a
    /// kubelet does for subPath mounts.
    async fn data_mounts(
        &self,
        pod: &Pod,
        ns: &str,
        volumes: &BTreeMap<String, AttachedVolume>,
    ) -> Result<DataMounts> {
        let spec = pod.spec.as_ref().context("pod has no spec")?;
        let container = spec.containers.first().context("pod has no container")?;
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        let (root_path, volume) = mounts
            .iter()
            .find_map(|m| volumes.get(&m.name).map(|v| (m.mount_path.clone(), v.clone())))
            .context("no EBS volume is mounted into the container")?;
        let mut files = Vec::new();
        for m in &mounts {
            let Some(rel) = m.mount_path.strip_prefix(&root_path).map(|r| r.trim_start_matches('/')) else {
                continue;
            };
            let Some(key) = &m.sub_path else { continue };
            let Some(cm_name) = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .and_then(|v| v.config_map.as_ref())
                .map(|c| c.name.clone())
            else {
                continue;
            };
            let cms: Api<ConfigMap> = Api::namespaced(self.kube.clone(), ns);
            let cm = cms.get(&cm_name).await.with_context(|| format!("reading ConfigMap {ns}/{cm_name}"))?;
            let content = cm
                .data
                .and_then(|d| d.get(key).cloned())
                .with_context(|| format!("ConfigMap {ns}/{cm_name} has no key {key}"))?;
            files.push((std::path::PathBuf::from(rel), content));
        }
        Ok(DataMounts { volume, files })
    }

    /// At shutdown: stops every server (as its machine's kubelet would) and removes the hosts.
    pub async fn shutdown(&self) {
        for (_, relay) in self.relays.lock().expect("relays lock").drain() {
            relay.abort();
        }
        let all: Vec<runtime::Container> = {
            let mut rt = self.runtime.lock().expect("runtime lock");
            let uids: Vec<String> = rt.containers.keys().cloned().collect();
            uids.iter().filter_map(|u| rt.take(u)).collect()
        };
        let stopping: Vec<_> = self.stopping.lock().expect("stopping lock").drain().map(|(_, t)| t).collect();
        futures::future::join_all(all.into_iter().map(|c| c.stop(Duration::from_secs(10)))).await;
        futures::future::join_all(stopping).await;
        self.storage.release().await;
        self.cfg.network.sweep(true).await;
    }
}

/// An EBS volume EC2 shows attached to the pod's node.
#[derive(Debug, Clone)]
struct AttachedVolume {
    id: String,
    size_bytes: u64,
}

struct DataMounts {
    volume: AttachedVolume,
    files: Vec<(std::path::PathBuf, String)>,
}

fn grace_period(pod: &Pod) -> Duration {
    let secs = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

fn container_name(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.containers.first()).map(|c| c.name.clone()).unwrap_or_default()
}

fn memory_limit(pod: &Pod) -> Option<u64> {
    let c = pod.spec.as_ref()?.containers.first()?;
    let q = c.resources.as_ref()?.limits.as_ref()?.get("memory")?;
    runtime::quantity_bytes(&q.0)
}

/// The container's environment as a kubelet gives it: the literal values (the operator writes no
/// references to Secrets or fields), after the simulator's own, so that the pod's win.
fn container_env(pod: &Pod) -> Vec<(String, String)> {
    let c = pod.spec.as_ref().and_then(|s| s.containers.first());
    c.and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The EBS volume id behind a PV, from the CSI driver's handle or the in-tree source
/// (`aws://<az>/vol-...` or a bare id).
pub fn ebs_volume_id(pv: &PersistentVolume) -> Option<String> {
    let spec = pv.spec.as_ref()?;
    if let Some(csi) = &spec.csi
        && csi.driver == "ebs.csi.aws.com"
    {
        return Some(csi.volume_handle.clone());
    }
    let id = &spec.aws_elastic_block_store.as_ref()?.volume_id;
    Some(id.rsplit('/').next().unwrap_or(id).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        AWSElasticBlockStoreVolumeSource, CSIPersistentVolumeSource, PersistentVolumeSpec,
    };

    #[test]
    fn a_gone_pods_volumes_stay_in_use_until_the_kubelet_would_report_the_unmount() {
        let m = |gone_at| Mount { instance_id: "i-1".into(), volumes: vec!["vol-1".into()], gone_at };
        assert!(m(None).in_use());
        assert!(m(Some(Instant::now())).in_use(), "just gone: its node status still says in use");
        assert!(!m(Instant::now().checked_sub(UNMOUNT_REPORTED)).in_use());
    }

    #[test]
    fn a_container_gets_the_literal_values_of_its_env() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"spec": {"containers": [{
            "name": "questdb",
            "env": [
                {"name": "QDB_CAIRO_SNAPSHOT_INSTANCE_ID", "value": "snap-1"},
                {"name": "FROM_FIELD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
        }]}}))
        .unwrap();
        assert_eq!(
            container_env(&pod),
            [("QDB_CAIRO_SNAPSHOT_INSTANCE_ID".to_string(), "snap-1".to_string())]
        );
        assert!(container_env(&Pod::default()).is_empty());
    }

    #[test]
    fn lease_times_have_microseconds() {
        let t = now_micros();
        assert_eq!(t.len(), "2026-11-26T15:23:32.000000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
    }

    #[test]
    fn volume_id_from_csi_and_in_tree_sources() {
        let csi = PersistentVolume {
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: "ebs.csi.aws.com".into(),
                    volume_handle: "vol-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(ebs_volume_id(&csi).as_deref(), Some("vol-1"));
        let in_tree = PersistentVolume {
            spec: Some(PersistentVolumeSpec {
                aws_elastic_block_store: Some(AWSElasticBlockStoreVolumeSource {
                    volume_id: "aws://us-east-1a/vol-2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(ebs_volume_id(&in_tree).as_deref(), Some("vol-2"));
        assert_eq!(ebs_volume_id(&PersistentVolume::default()), None);
    }
}
