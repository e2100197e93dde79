//! What an instruction's terminal phase means, on the local cloud (issue 14, items 5, 6, 8, 9):
//! a spec the provisioner accepts is one the apiserver accepts; a refusal the provisioner caused
//! is FAILED, not the user's REJECTED; one bad message never silences the others; SUCCEEDED
//! means this instruction's effect was there, else SUPERSEDED by the one that replaced it; a
//! cluster that will never take a write fails the instruction at once with the reason.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use qdb_crd::{PROVISIONER_MANAGER, QuestDBSpec};
use qdb_proto::Message;
use qdb_proto::v1::{self, Phase, instruction::Operation};
use qdb_provisioner::mapping::{self, Action};
use qdb_provisioner::worker::apply_body;
use qdb_tests::kube_proxy::KubeProxy;
use qdb_tests::rig::{Rig, fake_operator, ins, report_converged};
use qdb_tests::{kube_client, metric_total};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn modify(db: &str, sequence: u64, m: v1::Modify) -> v1::Instruction {
    ins::new(db, "region-a", sequence, Operation::Modify(m))
}

/// Item 9, end to end: a modify removing every key empties the config. On Kubernetes 1.37 the
/// provisioner before issue 14 passed this (it leaves an empty map out); sending `{}` instead,
/// which looks as right, fails it: the apiserver leaves the map null and refuses it
/// (`spec.serverConfig: Invalid value: "null"`). This guards against that.
#[tokio::test(flavor = "multi_thread")]
async fn removing_the_last_server_config_key_empties_the_config() -> Result<()> {
    let rig = Rig::new("prov-emptycfg", 1).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let db = "db-emptycfg";

    let create = ins::create(db, "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    assert_eq!(api.get(db).await?.spec.server_config.len(), 1);

    let empty = modify(
        db,
        2,
        v1::Modify { remove_server_config: vec!["cairo.commit.lag".into()], ..Default::default() },
    );
    rig.send(&empty).await?;
    let end = gossip.end(&empty.instruction_id, T).await?;
    ensure!(
        end.phase() == Phase::Succeeded,
        "emptying the config ended {:?}: {} {}",
        end.phase(),
        end.reason,
        end.message
    );
    let q = api.get(db).await?;
    assert!(q.spec.server_config.is_empty(), "{:?}", q.spec.server_config);
    assert_eq!(q.metadata.generation, Some(2));

    // And keys can come back after it.
    let again = modify(
        db,
        3,
        v1::Modify {
            set_server_config: [("query.timeout.sec".into(), "30".into())].into(),
            ..Default::default()
        },
    );
    rig.send(&again).await?;
    gossip.phase(&again.instruction_id, Phase::Succeeded, T).await?;
    assert_eq!(api.get(db).await?.spec.server_config["query.timeout.sec"], "30");
    operator.abort();
    Ok(())
}

/// A small deterministic generator (no property-testing crate in the workspace): the same seed
/// gives the same cases, `QDB_PROPERTY_SEED` picks another.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())].clone()
    }

    /// Between 1 and `max` characters of `alphabet`.
    fn word(&mut self, alphabet: &str, max: usize) -> String {
        let len = 1 + self.below(max);
        self.text(alphabet, len)
    }

    fn text(&mut self, alphabet: &str, len: usize) -> String {
        let chars: Vec<char> = alphabet.chars().collect();
        (0..len).map(|_| chars[self.below(chars.len())]).collect()
    }

    /// Values at and around the edges of what the provisioner's validation accepts.
    fn version(&mut self) -> String {
        match self.below(10) {
            0 => self.pick(&["8.2.1", "9.0.0", "0.0.0", "10.20.30", "01.2.3"]).to_string(),
            1 => format!("1.2.{}", "9".repeat(1 + self.below(40))),
            2 => format!("{}.{}.{}", self.next() % 100, self.next() % 100, self.next() % 1000),
            3 => format!("{}.0.0", "1".repeat(1 + self.below(25))),
            4 => self.pick(&["8.2", "v8.2.1", "8.2.1-rc1", ""]).to_string(),
            _ => format!("9.{}.{}", self.below(50), self.below(50)),
        }
    }

    fn instance_type(&mut self) -> String {
        match self.below(4) {
            0 => self
                .pick(&["m6i.large", "t3.micro", "x2iedn.32xlarge", "a-b.c", "m7g.metal-48xl"])
                .to_string(),
            1 => {
                let first = self.text("abcxyz", 1);
                let family = self.word("abcdefghijklmnopqrstuvwxyz0123456789-", 30);
                let size = self.word("a1z9", 20);
                format!("{first}{family}.{size}")
            }
            2 => self.pick(&["M6i.large", "m6i.", ".large", "m6i_large"]).to_string(),
            _ => "r7i.2xlarge".to_string(),
        }
    }

    fn node_image(&mut self) -> String {
        let len = self.pick(&[7, 8, 8, 12, 17, 17, 17, 18]);
        let hex = self.text("0123456789abcdef", len);
        if self.below(20) == 0 { format!("ami-{}", hex.to_uppercase()) } else { format!("ami-{hex}") }
    }

    fn config(&mut self) -> BTreeMap<String, String> {
        let n = self.pick(&[0, 1, 2, 5, 30]);
        (0..n)
            .map(|_| {
                let key = self.word("abcdefghijklmnopqrstuvwxyz0123456789._-", 60);
                let value = match self.below(20) {
                    0 => String::new(),
                    1 => " ".to_string(),
                    2 => "a=b # not a comment".to_string(),
                    3 => "é€😀\t\u{7f}".to_string(),
                    // Blanks inside a value are fine; at either end QuestDB would trim them.
                    4 => format!("<{}>", self.word("xyz ", 3000)),
                    5 if n < 5 => "two\nlines".to_string(),
                    6 => "C:\\data\\ é€😀\tends in a backslash\\".to_string(),
                    _ => format!("{}", self.next()),
                };
                (key, value)
            })
            .collect()
    }

    fn cidrs(&mut self) -> Vec<String> {
        let n = self.pick(&[0, 1, 3, 40]);
        (0..n)
            .map(|_| match self.below(if n > 3 { 200 } else { 10 }) {
                0 => self
                    .pick(&["0.0.0.0/0", "255.255.255.255/32", "10.0.0.0/8", "203.0.113.0/24"])
                    .to_string(),
                1 => {
                    self.pick(&["1.2.3.4/33", "1.2.3/8", "01.2.3.4/8", "256.1.1.1/8", "1.2.3.4"]).to_string()
                }
                _ => format!(
                    "{}.{}.{}.{}/{}",
                    self.below(256),
                    self.below(256),
                    self.below(256),
                    self.below(256),
                    self.below(33)
                ),
            })
            .collect()
    }

    /// Provisioned IOPS and throughput: mostly what the type takes, sometimes what it refuses.
    fn performance(&mut self, type_: i32) -> (Option<u32>, Option<u32>) {
        match (type_, self.below(10)) {
            (_, 0) => (self.pick(&[Some(99), Some(16001), Some(300_000)]), self.pick(&[None, Some(2000)])),
            (2, _) => (Some(self.pick(&[100, 1000, 4000])), None),
            (1, _) => (self.pick(&[None, Some(3000), Some(6000)]), self.pick(&[None, Some(125), Some(500)])),
            _ => (None, None),
        }
    }

    fn spec(&mut self) -> v1::DatabaseSpec {
        let type_ = self.pick(&[1, 2, 3]);
        let (iops, throughput_mibps) = self.performance(type_);
        v1::DatabaseSpec {
            questdb_version: self.version(),
            instance_type: self.instance_type(),
            node_image: self.node_image(),
            volume: Some(v1::Volume {
                size_gib: self.pick(&[0, 1, 1, 20, 500, 16384, 16384, 16385]),
                r#type: type_,
                iops,
                throughput_mibps,
                from_volume_id: None,
                from_snapshot_id: None,
                clone_of_database: None,
            }),
            server_config: self.config(),
            allowed_cidrs: self.cidrs(),
            // 0 and 1001 are outside the schema's 1..=1000, as validate() must say too; the
            // schedules are valid, out of range and misspelt.
            snapshot_policy: self.pick(&[None, None, Some(0), Some(1), Some(1000), Some(1001)]).map(|keep| {
                v1::SnapshotPolicy {
                    keep: Some(keep),
                    schedule: self
                        .pick(&[
                            None,
                            Some("0 3 * * *"),
                            Some("*/5 1-2 * 1,6 0-7"),
                            Some("61 * * * *"),
                            Some("@daily"),
                        ])
                        .map(String::from),
                    before_changes: self.pick(&[None, Some(false), Some(true)]),
                }
            }),
        }
    }

    fn operation(&mut self, current: Option<&QuestDBSpec>) -> Operation {
        let Some(cur) = current else {
            return Operation::Create(v1::Create { adopt: None, spec: Some(self.spec()) });
        };
        match self.below(8) {
            0 => Operation::Create(v1::Create { adopt: None, spec: Some(self.spec()) }),
            1 => Operation::Pause(v1::Pause {}),
            2 => Operation::Resume(v1::Resume {}),
            3 => Operation::Restart(v1::Restart {}),
            _ => {
                let mut m = v1::Modify::default();
                if self.below(2) == 0 {
                    m.questdb_version = Some(self.version());
                    m.allow_version_downgrade = self.below(2) == 0;
                }
                if self.below(4) == 0 {
                    m.instance_type = Some(self.instance_type());
                }
                if self.below(4) == 0 {
                    m.node_image = Some(self.node_image());
                }
                if self.below(3) == 0 {
                    m.volume_size_gib = Some(cur.volume.size_gib + self.pick(&[0, 1, 100]) as u32);
                }
                if self.below(5) == 0 {
                    let type_ = match cur.volume.type_ {
                        qdb_crd::VolumeType::Gp3 => 1,
                        qdb_crd::VolumeType::Io2 => 2,
                        qdb_crd::VolumeType::Gp2 => 3,
                    };
                    (m.volume_iops, m.volume_throughput_mibps) = self.performance(type_);
                }
                match self.below(3) {
                    // Every key removed: the map becomes empty.
                    0 => m.remove_server_config = cur.server_config.keys().cloned().collect(),
                    1 => m.set_server_config = self.config(),
                    _ => {}
                }
                if self.below(4) == 0 {
                    m.allowed_cidrs = Some(v1::CidrList { cidrs: self.cidrs() });
                }
                Operation::Modify(m)
            }
        }
    }
}

/// Item 9, in general. Before: `validate` passed server config values with DEL or C1 control
/// characters, which the apiserver refuses in an apply body (400, "yaml: control characters are
/// not allowed"), and versions longer than the CRD's 32 characters; and an apply body with an
/// emptied config sent as `{}` was refused (422, null). Seed 6221076 found 6 such specs.
#[tokio::test(flavor = "multi_thread")]
async fn every_spec_the_provisioner_accepts_the_apiserver_accepts() -> Result<()> {
    let rig = Rig::new("prov-property", 1).await?;
    let c = rig.cloud.cluster("region-a")?;
    // The provisioner's own identity, field manager and apply body: what the worker sends.
    let api: Api<qdb_crd::QuestDB> =
        Api::namespaced(kube_client(&c.provisioner_kubeconfig).await?, &rig.namespace);
    let seed = std::env::var("QDB_PROPERTY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(6_221_076);
    let mut g = Gen(seed);
    let params = PatchParams::apply(PROVISIONER_MANAGER).force();
    let (mut accepted, mut rejected, mut refused) = (0, 0, Vec::new());
    for d in 0..16 {
        let db = format!("prop-{d}");
        let mut current: Option<QuestDBSpec> = None;
        for seq in 1..=12u64 {
            let ins = ins::new(&db, "region-a", seq, g.operation(current.as_ref()));
            if mapping::precheck(&ins).is_err() {
                rejected += 1;
                continue;
            }
            let spec = match mapping::desired(&ins, current.as_ref()) {
                Ok(Action::Apply(spec)) => spec,
                Ok(Action::Delete { .. }) => continue,
                Err(_) => {
                    rejected += 1;
                    continue;
                }
            };
            accepted += 1;
            let body = apply_body(&ins, spec.clone());
            match api.patch(&db, &params, &Patch::Apply(&body)).await {
                Ok(q) => {
                    ensure!(q.spec == spec, "{db}@{seq}: stored {:?}, sent {:?}", q.spec, spec);
                    current = Some(spec);
                }
                Err(e) => {
                    refused.push(format!("{db}@{seq} seed {seed}: {e}\n  spec: {}", json!(body["spec"])))
                }
            }
        }
    }
    println!("seed {seed}: {accepted} specs accepted and applied, {rejected} rejected by the provisioner");
    ensure!(accepted >= 40 && rejected >= 5, "the generator must exercise both sides: {accepted}/{rejected}");
    ensure!(
        refused.is_empty(),
        "{} accepted specs refused by the apiserver:\n{}",
        refused.len(),
        refused.join("\n")
    );
    Ok(())
}

/// The broker's own limit on one record (`message.max.bytes`), as it reports it.
async fn broker_message_max_bytes(brokers: &str) -> Result<usize> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let configs = admin.describe_configs(&[ResourceSpecifier::Broker(1)], &AdminOptions::new()).await?;
    let broker =
        configs.into_iter().next().context("no broker config")?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let entry = broker.get("message.max.bytes").context("message.max.bytes not reported")?;
    Ok(entry.value.as_deref().context("message.max.bytes has no value")?.parse()?)
}

/// Item 8. Before: the dead-letter copy of an instruction just under the broker's limit was
/// larger than the broker accepts (MessageSizeTooLarge), the outbox retried it forever, and every
/// later gossip event of every database waited behind it: none of the good instructions after it
/// reported SUCCEEDED, the events before it were published again on each retry, and one
/// unpublishable outbox row would block the same way.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_instructions_never_silence_the_others() -> Result<()> {
    let limit = broker_message_max_bytes(&qdb_tests::Cloud::load()?.kafka_brokers).await?;
    // The backend's topic takes records far over the broker's default; the dead-letter topic not.
    let topic_limit = (8 * limit).to_string();
    let rig =
        Rig::with_instructions_config("prov-oversize", 3, &[("max.message.bytes", &topic_limit)]).await?;
    let gossip = rig.gossip()?;
    let letters = rig.dead_letters()?;
    let mut p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &rig.cloud.kafka_brokers)
        .set("message.max.bytes", (10 * limit).to_string())
        .set("linger.ms", "0")
        .create()?;
    let send = |partition: i32, i: &v1::Instruction| {
        let (key, payload) = (i.database_id.clone(), i.encode_to_vec());
        let producer = producer.clone();
        let topic = rig.instructions.clone();
        async move {
            let record = FutureRecord::to(&topic).partition(partition).key(&key).payload(&payload);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?;
            Ok::<_, anyhow::Error>(payload.len())
        }
    };
    // An instruction whose encoding is about `bytes` long, padded in its server config.
    let sized = |db: &str, bytes: usize| {
        let mut i = ins::create(db, "region-a", 1, "8.2.1");
        let mut pad = bytes;
        for _ in 0..3 {
            if let Some(Operation::Create(c)) = &mut i.operation {
                c.spec.as_mut().expect("spec").server_config.insert("pad".into(), "x".repeat(pad));
            }
            let len = i.encode_to_vec().len();
            pad = (pad + bytes).saturating_sub(len);
        }
        i
    };

    // An outbox row the broker can never take, queued before everything else.
    let journal = rig.journal().await?;
    sqlx::query("INSERT INTO outbox (topic, database_id, key, headers, payload) VALUES ('gossip', 'nobody', NULL, '[]', $1)")
        .bind(vec![0u8; 2 * limit])
        .execute(&journal)
        .await?;

    let just_under = sized("big-under", limit - 200);
    let far_over = sized("big-over", 4 * limit);
    let mut good = Vec::new();
    let mut sent = Vec::new();
    for (bad, partition) in [(&just_under, 0), (&far_over, 1)] {
        let len = send(partition, bad).await?;
        sent.push((bad.instruction_id.clone(), partition, len, bad.encode_to_vec()));
        for other in 0..3 {
            let i = ins::create(&format!("good-{partition}-{other}"), "region-a", 1, "8.2.1");
            send(other, &i).await?;
            good.push(i.instruction_id.clone());
        }
    }
    assert!(sent[0].2 < limit && sent[0].2 > limit - 400, "just under the limit: {} of {limit}", sent[0].2);
    assert!(sent[1].2 > 3 * limit, "far over: {}", sent[1].2);

    let ends = gossip.terminal(&good, T).await?;
    let not_ok: Vec<_> =
        good.iter().filter_map(|id| ends.get(id)).filter(|e| e.phase() != Phase::Succeeded).collect();
    ensure!(not_ok.is_empty(), "good instructions not succeeded: {not_ok:?}");
    for (id, partition, len, payload) in &sent {
        let ev = gossip.phase(id, Phase::Rejected, T).await?;
        assert_eq!(ev.reason, "OVERSIZED");
        let letter = letters
            .wait(&format!("dead letter of {id}"), T, |l| {
                l.headers.get("qdb.source.partition") == Some(&partition.to_string())
                    && l.headers.get("qdb.reject.reason").map(String::as_str) == Some("OVERSIZED")
            })
            .await?;
        assert_eq!(letter.headers["qdb.source.topic"], rig.instructions);
        assert!(letter.headers["qdb.source.offset"].parse::<i64>().is_ok());
        assert_eq!(letter.headers["qdb.dlq.truncated"], "true");
        assert_eq!(letter.headers["qdb.dlq.original.bytes"], len.to_string());
        assert!(letter.payload.len() > limit / 2, "as much as fits is kept: {}", letter.payload.len());
        assert!(payload.starts_with(&letter.payload), "the kept part is the start of what was received");
    }

    // The unpublishable row was set aside with its reason, counted, and nothing else waited.
    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT database_id, reason FROM outbox_parked").fetch_all(&journal).await?;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].1.to_lowercase().contains("size"), "{parked:?}");
    assert!(metric_total(&p.metrics().await?, "qdb_provisioner_outbox_parked_total", "gossip") >= 1.0);
    // Nothing delivered was published twice.
    let all = gossip.all();
    let unique: HashSet<_> = all.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(unique.len(), all.len(), "repeated gossip events");

    let started = Instant::now();
    let status = p.terminate(Duration::from_secs(40)).await?;
    ensure!(status.success(), "SIGTERM exit: {status:?}");
    println!("SIGTERM exit after {:?}", started.elapsed());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&journal).await?;
    assert_eq!(left, 0, "outbox drained");
    operator.abort();
    Ok(())
}

/// Item 6. Before: success was "observedGeneration reached and Ready", so the upgrade that was
/// rolled back before the operator ever reported on it ended SUCCEEDED too, and a later failure
/// failed the earlier instruction as well.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_rolled_back_at_once_is_superseded_and_the_rollback_succeeds() -> Result<()> {
    let rig = Rig::new("prov-supersede", 1).await?;
    let gossip = rig.gossip()?;
    let p = rig.spawn("r1", &[])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;

    for (db, fail) in [("db-rollback", false), ("db-later-fails", true)] {
        let create = ins::create(db, "region-a", 1, "8.2.1");
        rig.send(&create).await?;
        gossip.phase(&create.instruction_id, Phase::Applied, T).await?;
        report_converged(&api, db).await?;
        gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;

        let upgrade = ins::version(db, "region-a", 2, "8.3.0");
        let rollback = modify(
            db,
            3,
            v1::Modify {
                questdb_version: Some("8.2.1".into()),
                allow_version_downgrade: true,
                ..Default::default()
            },
        );
        rig.send_many(&[upgrade.clone(), rollback.clone()]).await?;
        gossip.phase(&rollback.instruction_id, Phase::Applied, T).await?;
        // The operator only ever sees the rollback.
        if fail {
            let t = "2026-01-01T00:00:00Z";
            let status = json!({"status": {"phase": "Failed", "observedGeneration": 3, "conditions": [
                {"type": "Ready", "status": "False", "reason": "Failed", "message": "not serving", "lastTransitionTime": t},
                {"type": "Degraded", "status": "True", "reason": "InvalidAMIID", "message": "ami-0a0a0a0a0a0a0a0a0 does not exist", "lastTransitionTime": t},
                {"type": "Progressing", "status": "False", "reason": "Failed", "message": "gave up", "lastTransitionTime": t}]}});
            api.patch_status(db, &PatchParams::default(), &Patch::Merge(&status)).await?;
            let end = gossip.phase(&rollback.instruction_id, Phase::Failed, T).await?;
            assert_eq!(end.reason, "INVALID_AMIID", "the operator's Degraded reason: {end:?}");
        } else {
            report_converged(&api, db).await?;
            gossip.phase(&rollback.instruction_id, Phase::Succeeded, T).await?;
        }
        let end = gossip.end(&upgrade.instruction_id, T).await?;
        assert_eq!(end.phase(), Phase::Superseded, "{db}: {end:?}");
        assert_eq!(end.superseded_by, rollback.instruction_id, "{db}");
        let state: String = sqlx::query_scalar("SELECT state FROM instructions WHERE id = $1")
            .bind(&upgrade.instruction_id)
            .fetch_one(&rig.journal().await?)
            .await?;
        assert_eq!(state, "superseded");
    }
    Ok(())
}

/// Item 5. Before: a 403 was retried forever, and an instruction never applied had no deadline:
/// no terminal gossip at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_provisioner_that_lost_its_rbac_fails_with_the_403_within_the_deadline() -> Result<()> {
    let rig = Rig::new("prov-rbac", 1).await?;
    let c = rig.cloud.cluster("region-a")?.clone();
    let admin = kube_client(&c.kubeconfig).await?;
    // An identity of its own, bound in this namespace only, so the test can take it away.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "provisioner"}}))?;
    Api::<ServiceAccount>::namespaced(admin.clone(), &rig.namespace)
        .create(&PostParams::default(), &sa)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "provisioner"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "qdb-provisioner"},
        "subjects": [{"kind": "ServiceAccount", "name": "provisioner", "namespace": rig.namespace}],
    }))?;
    let bindings = Api::<RoleBinding>::namespaced(admin.clone(), &rig.namespace);
    bindings.create(&PostParams::default(), &binding).await?;
    let request = serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))?;
    let token = Api::<ServiceAccount>::namespaced(admin, &rig.namespace)
        .create_token_request("provisioner", &PostParams::default(), &request)
        .await?
        .status
        .context("token request has no status")?
        .token;
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&c.provisioner_kubeconfig)?)?;
    for user in kubeconfig["users"].as_sequence_mut().context("kubeconfig users")? {
        user["user"] = serde_yaml::to_value(json!({"token": token}))?;
    }
    let path = rig.dir.join("sa.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    let config = rig.config_with_kubeconfig("region-a", &path)?;

    let deadline_secs = 60;
    let deadline = format!("modify={deadline_secs}");
    let gossip = rig.gossip()?;
    let p = rig.spawn_with_config("r1", &config, &["--deadline", &deadline])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let db = "db-rbac";
    let create = ins::create(db, "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;

    bindings.delete("provisioner", &DeleteParams::default()).await?;
    // The apiserver's authorizer learns of the deletion through its watch, a moment later: the
    // upgrade goes once the identity is refused (sent at once, it was applied in one full run).
    let identity: Api<qdb_crd::QuestDB> = Api::namespaced(kube_client(&path).await?, &rig.namespace);
    qdb_tests::eventually("the binding's removal in effect", T, || async {
        Ok(matches!(identity.get(db).await, Err(kube::Error::Api(s)) if s.code == 403).then_some(()))
    })
    .await?;
    let upgrade = ins::version(db, "region-a", 2, "8.3.0");
    let sent = Instant::now();
    rig.send(&upgrade).await?;
    let end = gossip.end(&upgrade.instruction_id, Duration::from_secs(deadline_secs + 30)).await?;
    let took = sent.elapsed();
    assert_eq!(end.phase(), Phase::Failed, "{end:?}");
    assert_eq!(end.reason, "FORBIDDEN", "{end:?}");
    assert!(end.message.contains("403"), "{end:?}");
    assert!(took < Duration::from_secs(deadline_secs), "failed at once, not at the deadline: {took:?}");
    println!("FORBIDDEN after {took:?}");
    assert_eq!(api.get(db).await?.spec.version, "8.2.1", "nothing was written");
    operator.abort();
    Ok(())
}

/// An apiserver that has just started answers 403 until it has loaded its roles, with `/readyz`
/// failing `poststarthook/rbac/bootstrap-roles` (measured here after a restart of 1.37). Such a
/// 403 is not the provisioner's identity losing its rights: the instruction waits it out, however
/// many tries that takes, and succeeds. Before, a 403 was final after six tries (about six
/// seconds), or at once when the tries spent while the apiserver was down had used them up,
/// which is how `disruptive_apiserver_restart_mid_run` failed in CI with FORBIDDEN.
#[tokio::test(flavor = "multi_thread")]
async fn an_apiserver_still_loading_its_roles_delays_an_instruction_but_does_not_fail_it() -> Result<()> {
    let rig = Rig::new("prov-starting", 1).await?;
    let c = rig.cloud.cluster("region-a")?.clone();
    let proxy = KubeProxy::start(&c.provisioner_kubeconfig).await?;
    let config = rig.config_with_kubeconfig("region-a", &proxy.kubeconfig(&rig.dir, "starting")?)?;
    proxy.answer_as_starting(true);
    let gossip = rig.gossip()?;
    let p = rig.spawn_with_config("r1", &config, &["--max-retry-delay-secs", "2"])?;
    p.wait_ready().await?;
    let api = rig.questdbs("region-a").await?;
    let operator = fake_operator(api.clone());
    let create = ins::create("db-starting", "region-a", 1, "8.2.1");
    rig.send(&create).await?;
    let starting = Duration::from_secs(15);
    tokio::time::sleep(starting).await;
    let events = gossip.events(&create.instruction_id);
    ensure!(
        !events.iter().any(|e| qdb_tests::rig::is_terminal(e.phase())),
        "ended while starting: {events:?}"
    );
    let refused = proxy.received().iter().filter(|r| r.path.ends_with("/questdbs/db-starting")).count();
    ensure!(refused >= 6, "only {refused} tries were refused in {starting:?}: fewer than a final 403 took");
    ensure!(proxy.received().iter().any(|r| r.path.starts_with("/readyz")), "readiness was never asked");
    proxy.answer_as_starting(false);
    gossip.phase(&create.instruction_id, Phase::Succeeded, T).await?;
    operator.abort();
    Ok(())
}
