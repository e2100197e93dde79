//! The kubelet's Events on the pods it runs, so `kubectl describe pod` and `kubectl get events`
//! tell an on-call engineer why a pod waits or restarts, as on a real node: FailedMount while
//! the EBS volume is not attached to the node's instance, Failed and BackOff for an image that
//! cannot be pulled, Started, Unhealthy for failed probes and Killing before a restart.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use tracing::warn;

use std::sync::atomic::{AtomicU64, Ordering};

/// Two events of one pod in the same nanosecond still get names of their own.
static SERIAL: AtomicU64 = AtomicU64::new(0);

use crate::objects::ContainerState;
use crate::runtime::{self, Probes, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    FailedMount,
    Failed,
    BackOff,
    Started,
    Unhealthy,
    Killing,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::FailedMount => "FailedMount",
            Reason::Failed => "Failed",
            Reason::BackOff => "BackOff",
            Reason::Started => "Started",
            Reason::Unhealthy => "Unhealthy",
            Reason::Killing => "Killing",
        }
    }

    /// The kubelet's event type for it.
    fn warning(self) -> bool {
        matches!(self, Reason::FailedMount | Reason::Failed | Reason::Unhealthy)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    pub reason: Reason,
    pub message: String,
}

impl PodEvent {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// The events a kubelet records when a pod's container comes to wait as `state` says (nothing
/// for a running container: starts and probes have their own).
pub fn on_waiting(state: &ContainerState, image: &str) -> Vec<PodEvent> {
    let ContainerState::Waiting { reason, message } = state else { return Vec::new() };
    match *reason {
        "ContainerCreating" => {
            vec![PodEvent::new(Reason::FailedMount, format!("Unable to attach or mount volumes: {message}"))]
        }
        "ImagePullBackOff" => vec![
            PodEvent::new(Reason::Failed, format!("Failed to pull image \"{image}\": {message}")),
            PodEvent::new(Reason::BackOff, format!("Back-off pulling image \"{image}\"")),
        ],
        _ => Vec::new(),
    }
}

pub fn started(container: &str) -> PodEvent {
    PodEvent::new(Reason::Started, format!("Started container {container}"))
}

/// The events a kubelet records when a round of probes at `ip` ends in `verdict`: a readiness
/// probe that started failing, or a liveness probe past its threshold (the container restarts).
pub fn on_probes(verdict: Verdict, container: &str, probes: &Probes, ip: &str) -> Vec<PodEvent> {
    let failed = |p: &Option<Probe>| {
        let url = p.as_ref().and_then(|p| runtime::probe_url(p, ip)).unwrap_or_default();
        format!("HTTP probe to {url} failed")
    };
    match verdict {
        Verdict::BecameUnready => vec![PodEvent::new(
            Reason::Unhealthy,
            format!("Readiness probe failed: {}", failed(&probes.readiness)),
        )],
        Verdict::Unhealthy => vec![
            PodEvent::new(Reason::Unhealthy, format!("Liveness probe failed: {}", failed(&probes.liveness))),
            PodEvent::new(
                Reason::Killing,
                format!("Container {container} failed liveness probe, will be restarted"),
            ),
        ],
        Verdict::Unchanged | Verdict::BecameReady => Vec::new(),
    }
}

/// The Event object, as the kubelet of `node` writes it (source kubelet, the pod as involved object).
pub fn build(pod: &Pod, node: &str, e: &PodEvent, now: &jiff::Timestamp) -> Event {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let time = Time(*now);
    Event {
        metadata: ObjectMeta {
            // The kubelet's naming: the object's name and a unique suffix.
            name: Some(format!(
                "{name}.{:x}{:x}",
                now.as_nanosecond(),
                SERIAL.fetch_add(1, Ordering::Relaxed)
            )),
            namespace: pod.metadata.namespace.clone(),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(e.reason.as_str().into()),
        message: Some(e.message.clone()),
        type_: Some(if e.reason.warning() { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource { component: Some("kubelet".into()), host: Some(node.into()) }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(time.clone()),
        last_timestamp: Some(time),
        count: Some(1),
        ..Event::default()
    }
}

/// Records the events; a failure is logged, never fatal: events are for people.
pub async fn record(kube: &kube::Client, pod: &Pod, node: &str, events: &[PodEvent]) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(kube.clone(), &ns);
    for e in events {
        let obj = build(pod, node, e, &jiff::Timestamp::now());
        if let Err(err) = api.create(&PostParams::default(), &obj).await {
            warn!(pod = pod.metadata.name, reason = e.reason.as_str(), error = %err, "recording an event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(reason: &'static str, message: &str) -> ContainerState {
        ContainerState::Waiting { reason, message: message.into() }
    }

    #[test]
    fn a_volume_wait_is_a_failed_mount_and_a_pull_failure_is_failed_then_back_off() {
        let mount = on_waiting(&waiting("ContainerCreating", "EBS volume vol-1 is not attached to i-1"), "x");
        assert_eq!(mount.len(), 1);
        assert_eq!(mount[0].reason, Reason::FailedMount);
        assert!(mount[0].message.contains("vol-1 is not attached to i-1"), "{}", mount[0].message);

        let pull = on_waiting(&waiting("ImagePullBackOff", "manifest unknown"), "questdb/questdb:0.0.1");
        let reasons: Vec<Reason> = pull.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, [Reason::Failed, Reason::BackOff]);
        assert!(
            pull[0].message.contains("questdb/questdb:0.0.1") && pull[0].message.contains("manifest unknown")
        );

        let running = ContainerState::Running { started_at: "t".into(), ready: true, restarts: 0 };
        assert!(on_waiting(&running, "x").is_empty());
    }

    #[test]
    fn the_event_names_the_pod_and_the_kubelet_of_its_node() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("db-0".into()),
                namespace: Some("db".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let get = |path: &str| Probe {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction {
                path: Some(path.into()),
                port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9003),
                ..Default::default()
            }),
            ..Probe::default()
        };
        let probes = Probes { readiness: Some(get("/ready")), liveness: Some(get("/live")) };
        let restart = on_probes(Verdict::Unhealthy, "questdb", &probes, "10.1.128.7");
        let reasons: Vec<Reason> = restart.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, [Reason::Unhealthy, Reason::Killing]);
        assert!(restart[0].message.contains("http://10.1.128.7:9003/live"), "{}", restart[0].message);
        let unready = on_probes(Verdict::BecameUnready, "questdb", &probes, "10.1.128.7");
        assert!(
            unready[0]
                .message
                .starts_with("Readiness probe failed: HTTP probe to http://10.1.128.7:9003/ready")
        );
        assert!(on_probes(Verdict::BecameReady, "questdb", &probes, "10.1.128.7").is_empty());

        let e = build(&pod, "ip-10-1-0-5", &restart[0], &now);
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("Unhealthy"));
        assert_eq!(e.involved_object.uid.as_deref(), Some("u-1"));
        assert_eq!(e.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(e.source.and_then(|s| s.host).as_deref(), Some("ip-10-1-0-5"));
        assert!(e.metadata.name.is_some_and(|n| n.starts_with("db-0.")));
        assert_eq!(build(&pod, "n", &started("questdb"), &now).type_.as_deref(), Some("Normal"));
    }
}
