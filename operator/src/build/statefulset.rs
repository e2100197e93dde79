//! The StatefulSet running QuestDB: one pod pinned to the database's dedicated node.
//!
//! No extra tolerations for `node.kubernetes.io/unreachable` / `not-ready`: the apiserver's
//! defaults (300 s) stand, because failover is the operator's job (launch a node, fence the old
//! one, move the volume), not the taint manager's; evicting sooner would gain nothing, as the pod
//! can only run where its volume is attached.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::configmap::{SERVER_CONF, config_hash, render_server_conf};
use super::resources::{Share, build_resources};
use super::{DATA_DIR, Desired, HEALTH_PORT, HTTP_PORT, ILP_PORT, PGWIRE_PORT};
use crate::names::{CONFIG_HASH, RESTART_TOKEN};

pub const CONTAINER: &str = "questdb";
pub const IMAGE_REPOSITORY: &str = "questdb/questdb";

/// The `questdb` user and group of the official image: its entrypoint drops to them from root,
/// and runs as them directly when the pod starts it as them.
pub const QUESTDB_UID: i64 = 10001;

/// The image of the database's QuestDB release.
pub fn image(d: &Desired) -> String {
    format!("{IMAGE_REPOSITORY}:{}", d.spec.version)
}

/// What the `restricted` Pod Security level requires of the pod: a non-root user, the runtime's
/// seccomp profile. The volume's group is the database's (`fsGroup`), set only when the volume's
/// root does not have it yet, since a recursive pass over a large volume delays every start.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(QUESTDB_UID),
        run_as_group: Some(QUESTDB_UID),
        fs_group: Some(QUESTDB_UID),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..PodSecurityContext::default()
    }
}

/// What `restricted` requires of each container: no privilege escalation, every capability
/// dropped (QuestDB binds ports above 1024 and needs none).
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        run_as_non_root: Some(true),
        ..SecurityContext::default()
    }
}

/// QuestDB's `cairo.snapshot.instance.id`. `CHECKPOINT CREATE` records it in the checkpoint it
/// leaves on the volume (`.checkpoint/`); at start, QuestDB recovers from that checkpoint (and then
/// removes it) only when both the recorded id and its own are set and differ (9.3.0 logs
/// "skipping recovery from checkpoint [currentId=.., previousId=]" when the recorded one is empty).
/// So every database runs with one: its resource's UID, or, on a volume made from a snapshot, the
/// snapshot's id. A clone's or a restore's first start then recovers exactly the checkpoint's data,
/// not what was written between CHECKPOINT CREATE and the snapshot (the snapshot was taken from a
/// database running with another id: a UID, or an older snapshot's id), and a database restarted
/// in the middle of its own checkpoint keeps its data as it is. Adding the setting changes the pod
/// template: an operator upgrade to this version restarts each database once.
pub const SNAPSHOT_INSTANCE_ENV: &str = "QDB_CAIRO_SNAPSHOT_INSTANCE_ID";

/// The settings QuestDB takes from its environment rather than server.conf.
fn env(d: &Desired) -> Vec<EnvVar> {
    let instance = d.spec.volume.from_snapshot.clone().unwrap_or_else(|| d.names.uid().to_string());
    vec![EnvVar { name: SNAPSHOT_INSTANCE_ENV.into(), value: Some(instance), value_from: None }]
}

/// `share` is the database's part of the node it runs on ([`super::resources`]).
pub fn build_statefulset(d: &Desired, share: &Share) -> StatefulSet {
    let names = &d.names;
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let annotations = [
        (CONFIG_HASH.to_string(), config_hash(&render_server_conf(&d.spec.server_config))),
        // Always present (empty without a token), so that setting the first token is a change too.
        (RESTART_TOKEN.to_string(), d.spec.restart_token.clone().unwrap_or_default()),
    ];
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image(d)),
        ports: Some(vec![
            port("http", HTTP_PORT),
            port("pgwire", PGWIRE_PORT),
            port("ilp", ILP_PORT),
            port("health", HEALTH_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/".into()),
                port: IntOrString::Int(i32::from(HEALTH_PORT)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount { name: "data".into(), mount_path: DATA_DIR.into(), ..VolumeMount::default() },
            VolumeMount {
                name: "config".into(),
                mount_path: format!("{DATA_DIR}/conf/{SERVER_CONF}"),
                sub_path: Some(SERVER_CONF.into()),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        env: Some(env(d)),
        security_context: Some(container_security()),
        resources: Some(build_resources(share)),
        ..Container::default()
    };
    let pod = PodSpec {
        security_context: Some(pod_security()),
        containers: vec![container],
        node_selector: Some(names.node_labels()),
        tolerations: Some(vec![names.toleration()]),
        volumes: Some(vec![
            Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: names.pvc(),
                    read_only: None,
                }),
                ..Volume::default()
            },
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names.config_map(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    StatefulSet {
        metadata: d.metadata(names.statefulset()),
        spec: Some(StatefulSetSpec {
            replicas: Some(if d.spec.paused { 0 } else { 1 }),
            selector: LabelSelector { match_labels: Some(names.selector()), match_expressions: None },
            service_name: Some(names.service()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names.labels()),
                    annotations: Some(annotations.into()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    fn template_annotation(sts: &StatefulSet, key: &str) -> String {
        let t = &sts.spec.as_ref().unwrap().template;
        t.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[key].clone()
    }

    #[test]
    fn one_pinned_pod_with_data_and_config() {
        let d = desired();
        let sts = build_statefulset(&d, &SHARE);
        assert_child_meta(&sts.metadata);
        assert_eq!(sts.metadata.name.as_deref(), Some("db-7f3a"));
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("qdb-db-7f3a"));
        let tmpl_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert!(selector.iter().all(|(k, v)| tmpl_labels.get(k) == Some(v)), "selector must match the pod");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.node_selector.as_ref(), Some(&d.names.node_labels()));
        assert_eq!(pod.tolerations.as_deref(), Some(&[d.names.toleration()][..]));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("questdb/questdb:8.2.1"));
        let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, [9000, 8812, 9009, 9003]);
        let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((probe.path.as_deref(), &probe.port), (Some("/"), &IntOrString::Int(9003)));
        let vols = pod.volumes.as_ref().unwrap();
        assert_eq!(vols[0].persistent_volume_claim.as_ref().unwrap().claim_name, "db-7f3a-data");
        assert_eq!(vols[1].config_map.as_ref().unwrap().name, "db-7f3a-config");
        let mounts = c.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[0].mount_path, "/var/lib/questdb");
        assert_eq!(mounts[1].mount_path, "/var/lib/questdb/conf/server.conf");
        assert_eq!(mounts[1].sub_path.as_deref(), Some("server.conf"));
    }

    #[test]
    fn a_volume_from_a_snapshot_starts_from_the_snapshots_checkpoint() {
        let instance = |q: &qdb_crd::QuestDB| {
            let pod = build_statefulset(&desired_of(q), &SHARE).spec.unwrap().template.spec.unwrap();
            let env = pod.containers[0].env.clone().unwrap();
            assert_eq!(env.len(), 1);
            assert_eq!(env[0].name, "QDB_CAIRO_SNAPSHOT_INSTANCE_ID");
            env[0].value.clone().unwrap()
        };
        assert_eq!(instance(&questdb()), UID, "set on every database, so its checkpoints record it");
        let mut q = questdb();
        q.spec.volume.from_snapshot = Some("snap-0123456789abcdef0".into());
        assert_eq!(instance(&q), "snap-0123456789abcdef0");
    }

    #[test]
    fn the_pod_meets_the_restricted_pod_security_level() {
        let sts = build_statefulset(&desired(), &SHARE);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let p = pod.security_context.unwrap();
        assert_eq!((p.run_as_non_root, p.run_as_user, p.fs_group), (Some(true), Some(10001), Some(10001)));
        assert_eq!(p.seccomp_profile.unwrap().type_, "RuntimeDefault");
        for c in &pod.containers {
            let s = c.security_context.as_ref().unwrap();
            assert_eq!(s.allow_privilege_escalation, Some(false));
            assert_eq!(s.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
            assert_ne!(s.privileged, Some(true));
        }
        assert!(pod.host_network.is_none() && pod.host_pid.is_none());
    }

    #[test]
    fn paused_scales_to_zero() {
        let mut q = questdb();
        q.spec.paused = true;
        assert_eq!(build_statefulset(&desired_of(&q), &SHARE).spec.unwrap().replicas, Some(0));
    }

    #[test]
    fn config_and_restart_token_roll_the_pod_and_nothing_else_does() {
        let base = build_statefulset(&desired(), &SHARE);
        let hash = template_annotation(&base, CONFIG_HASH);
        assert_eq!(template_annotation(&base, RESTART_TOKEN), "");

        let mut q = questdb();
        q.spec.server_config.insert("cairo.commit.lag".into(), "2000".into());
        assert_ne!(template_annotation(&build_statefulset(&desired_of(&q), &SHARE), CONFIG_HASH), hash);

        let mut q = questdb();
        q.spec.restart_token = Some("r1".into());
        let restarted = build_statefulset(&desired_of(&q), &SHARE);
        assert_eq!(template_annotation(&restarted, RESTART_TOKEN), "r1");
        assert_eq!(template_annotation(&restarted, CONFIG_HASH), hash);

        // Changes that must not touch the pod template (no restart for a new CIDR or a pause).
        let mut q = questdb();
        q.spec.network.allowed_cidrs.push("192.0.2.0/24".into());
        q.spec.volume.size_gib = 200;
        q.spec.paused = true;
        let other = build_statefulset(&desired_of(&q), &SHARE);
        assert_eq!(other.spec.unwrap().template, base.spec.unwrap().template);
    }
}
