//! What the benchmarks share: resources written as the provisioner writes them, and waiting for
//! them to settle.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams};
use qdb_crd::{Phase, QuestDB};
use serde_json::{Value, json};

const MANAGER: &str = qdb_crd::PROVISIONER_MANAGER;

/// Applies `spec` (the whole of it, as the provisioner does) to every database.
pub async fn apply_all(api: &Api<QuestDB>, names: &[String], spec: &Value) -> Result<()> {
    for n in names {
        let q: QuestDB = serde_json::from_value(json!({
            "apiVersion": "cloud.questdb.io/v1", "kind": "QuestDB", "metadata": {"name": n}, "spec": spec,
        }))?;
        api.patch(n, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&q)).await?;
    }
    Ok(())
}

/// Every database Running at its current generation and settled (the change done).
pub async fn all_settled(api: &Api<QuestDB>, names: &[String], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut done = 0;
        for n in names {
            let q = api.get(n).await?;
            let s = q.status.clone().unwrap_or_default();
            let settled = s.phase == Some(Phase::Running)
                && s.observed_generation == q.metadata.generation
                && s.replacement.is_none()
                && condition(&s, "Ready") == Some("True")
                && condition(&s, "Progressing") != Some("True");
            done += usize::from(settled);
        }
        if done == names.len() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{done} of {} settled within {timeout:?}", names.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn condition<'a>(s: &'a qdb_crd::QuestDBStatus, type_: &str) -> Option<&'a str> {
    s.conditions.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}
