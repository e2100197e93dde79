//! The generated QuestDB CRD on a real apiserver: it becomes Established, a valid resource is
//! accepted, invalid ones are refused by the apiserver itself with a clear message, and
//! `kubectl get qdb` shows the printer columns.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use qdb_crd::QuestDB;
use qdb_tests::{Cloud, eventually, kube_client, unique};
use serde_json::{Value, json};

async fn install_crd(kube: &kube::Client) -> Result<()> {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd/questdb.yaml"))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml)?;
    let api: Api<CustomResourceDefinition> = Api::all(kube.clone());
    api.patch("questdbs.cloud.questdb.io", &PatchParams::apply("qdb-tests").force(), &Patch::Apply(&crd))
        .await
        .context("applying the CRD")?;
    eventually("CRD to be Established", Duration::from_secs(30), || async {
        let crd = api.get("questdbs.cloud.questdb.io").await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        Ok(established.then_some(()))
    })
    .await
}

fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "cloud.questdb.io/v1",
        "kind": "QuestDB",
        "metadata": {"name": name},
        "spec": {
            "version": "8.2.1",
            "instanceType": "m6i.xlarge",
            "nodeImage": "ami-0123456789abcdef0",
            "volume": {"sizeGib": 100, "type": "gp3"},
            "serverConfig": {"cairo.commit.lag": "1000"},
            "network": {"allowedCidrs": ["203.0.113.0/24"]}
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn crd_validates_on_the_apiserver() -> Result<()> {
    let cloud = Cloud::load()?;
    let env = cloud.cluster("region-a")?;
    let kube = kube_client(&env.kubeconfig).await?;
    install_crd(&kube).await?;

    let ns = unique("crd");
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}}))?)
        .await?;
    let api: Api<QuestDB> = Api::namespaced(kube.clone(), &ns);

    let result = async {
        let good: QuestDB = serde_json::from_value(valid("good"))?;
        let created = api.create(&PostParams::default(), &good).await.context("valid resource refused")?;
        assert_eq!(created.spec, good.spec);

        // Each invalid spec is refused by the apiserver, naming the offending field.
        let cases: [(&str, &str, Value, &str); 4] = [
            ("size0", "/spec/volume/sizeGib", json!(0), "spec.volume.sizeGib"),
            ("badver", "/spec/version", json!("latest"), "spec.version"),
            ("badtype", "/spec/volume/type", json!("st1"), "spec.volume.type"),
            ("badcidr", "/spec/network/allowedCidrs/0", json!("10.0.0.0/33"), "spec.network.allowedCidrs"),
        ];
        for (name, pointer, value, field) in cases {
            let mut obj = valid(name);
            *obj.pointer_mut(pointer).context("pointer")? = value;
            // Sent as raw JSON: the typed client could not even hold some of these values.
            let req = http::Request::post(format!("/apis/cloud.questdb.io/v1/namespaces/{ns}/questdbs"))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&obj)?)?;
            let err = kube.request::<Value>(req).await.expect_err(name);
            let text = err.to_string();
            assert!(text.contains("Invalid") && text.contains(field), "{name}: unclear rejection: {text}");
        }

        // Transition rules (CEL) the schema alone cannot say: the volume only grows.
        let mut shrunk = created.clone();
        shrunk.spec.volume.size_gib = 50;
        let err =
            api.replace("good", &PostParams::default(), &shrunk).await.expect_err("a shrink is refused");
        let text = err.to_string();
        assert!(text.contains("volume.sizeGib can only grow"), "unclear rejection: {text}");
        let mut grown = api.get("good").await?;
        grown.spec.volume.size_gib = 200;
        api.replace("good", &PostParams::default(), &grown).await.context("growing the volume refused")?;
        // The snapshot a database starts from is set at create and never changes.
        let mut restored = api.get("good").await?;
        restored.spec.volume.from_snapshot = Some("snap-0123456789abcdef0".into());
        let err =
            api.replace("good", &PostParams::default(), &restored).await.expect_err("a snapshot added later");
        assert!(err.to_string().contains("volume.fromSnapshot cannot change"), "unclear rejection: {err}");

        // ... and the version goes down only as a deliberate rollback.
        let mut older = api.get("good").await?;
        older.spec.version = "8.1.9".into();
        let err = api.replace("good", &PostParams::default(), &older).await.expect_err("a silent downgrade");
        let text = err.to_string();
        assert!(
            text.contains("version 8.1.9 is older than 8.2.1: a rollback must set allowVersionDowngrade"),
            "unclear rejection: {text}"
        );
        older.spec.allow_version_downgrade = true;
        api.replace("good", &PostParams::default(), &older).await.context("an allowed rollback refused")?;

        // The provisioner's own write path: server-side apply of whole specs. Emptying the
        // server config is a valid spec (it once left `serverConfig: null`, which the schema
        // refused, so a config could never be emptied).
        let ssa = PatchParams::apply(qdb_crd::PROVISIONER_MANAGER).force();
        let mut applied: QuestDB = serde_json::from_value(valid("ssa"))?;
        api.patch("ssa", &ssa, &Patch::Apply(&applied)).await.context("first apply")?;
        applied.spec.server_config.clear();
        let emptied =
            api.patch("ssa", &ssa, &Patch::Apply(&applied)).await.context("emptying serverConfig")?;
        assert!(emptied.spec.server_config.is_empty(), "{:?}", emptied.spec.server_config);

        // The cluster refuses an older spec (deploy/crd/sequence-policy.yaml): a write may not
        // lower the instruction sequence the resource carries.
        let at = |seq: u64| -> Result<QuestDB> {
            let mut q: QuestDB = serde_json::from_value(valid("seq"))?;
            q.metadata.annotations =
                Some([(qdb_crd::keys::INSTRUCTION_SEQUENCE.to_string(), seq.to_string())].into());
            Ok(q)
        };
        api.patch("seq", &ssa, &Patch::Apply(&at(5)?)).await.context("sequence 5")?;
        let err = api.patch("seq", &ssa, &Patch::Apply(&at(3)?)).await.expect_err("sequence 3 after 5");
        let text = err.to_string();
        assert!(
            text.contains("stale instruction sequence 3: the resource already reflects sequence 5"),
            "unclear rejection: {text}"
        );
        api.patch("seq", &ssa, &Patch::Apply(&at(5)?)).await.context("the same sequence again")?;
        api.patch("seq", &ssa, &Patch::Apply(&at(6)?)).await.context("sequence 6")?;

        // The printer columns on-call engineers see.
        let out = std::process::Command::new("kubectl")
            .args(["--kubeconfig", &env.kubeconfig.to_string_lossy(), "get", "qdb", "-n", &ns])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "kubectl get qdb: {}", String::from_utf8_lossy(&out.stderr));
        let header: Vec<&str> = stdout.lines().next().unwrap_or_default().split_whitespace().collect();
        assert_eq!(header, ["NAME", "PHASE", "VERSION", "INSTANCE", "NODE", "ENDPOINT", "AGE"]);
        assert!(stdout.contains("good") && stdout.contains("8.2.1") && stdout.contains("m6i.xlarge"));
        Ok::<_, anyhow::Error>(())
    }
    .await;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    result
}
