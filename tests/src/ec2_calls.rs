//! The EC2 calls the local cloud's emulator logged (`QDB_AWS_CALL_LOG`, written by
//! localcloud/aws/timed_moto.py): each volume call with the true state, at that moment, of every
//! instance that ever held the volume. The fencing order is proven from these, not from what a
//! Describe happened to show.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::Cloud;

#[derive(Debug, Clone, Deserialize)]
pub struct Ec2Call {
    /// Seconds since the epoch.
    pub t: f64,
    pub action: String,
    #[serde(default)]
    pub instances: Vec<String>,
    #[serde(default)]
    pub volume: Option<String>,
    /// Instance id -> state name, for every instance that ever held `volume`.
    #[serde(default)]
    pub holders: BTreeMap<String, String>,
}

impl Cloud {
    /// Every call logged so far.
    pub fn ec2_calls(&self) -> Result<Vec<Ec2Call>> {
        let path =
            self.vars.get("QDB_AWS_CALL_LOG").context("QDB_AWS_CALL_LOG in env (run localcloud up)")?;
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {l}")))
            .collect()
    }
}

fn fenced(state: &str) -> bool {
    matches!(state, "stopped" | "terminated")
}

/// Every AttachVolume or DetachVolume of `volume` sent while another instance holding it was not
/// yet stopped or terminated (for a detach, the instance it leaves counts too: a machine still
/// stopping may still be writing).
pub fn fencing_violations(calls: &[Ec2Call], volume: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.volume.as_deref() == Some(volume))
        .filter_map(|c| {
            let target = c.instances.first().map(String::as_str);
            let unfenced: Vec<String> = c
                .holders
                .iter()
                .filter(|(id, state)| {
                    let other = c.action == "DetachVolume" || Some(id.as_str()) != target;
                    other && !fenced(state)
                })
                .map(|(id, state)| format!("{id} {state}"))
                .collect();
            let volume_call = matches!(c.action.as_str(), "AttachVolume" | "DetachVolume");
            (volume_call && !unfenced.is_empty()).then(|| {
                format!("{} {volume} -> {:?} at {:.1} while {}", c.action, target, c.t, unfenced.join(", "))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(action: &str, to: &str, holders: &[(&str, &str)]) -> Ec2Call {
        Ec2Call {
            t: 0.0,
            action: action.into(),
            instances: vec![to.into()],
            volume: Some("vol-1".into()),
            holders: holders.iter().map(|(i, s)| (i.to_string(), s.to_string())).collect(),
        }
    }

    #[test]
    fn a_move_in_the_fencing_order_is_clean() {
        let calls = [
            call("AttachVolume", "i-1", &[]),
            call("DetachVolume", "i-1", &[("i-1", "stopped")]),
            call("AttachVolume", "i-2", &[("i-1", "stopped")]),
            call("AttachVolume", "i-3", &[("i-1", "terminated"), ("i-2", "terminated")]),
        ];
        assert!(fencing_violations(&calls, "vol-1").is_empty());
    }

    #[test]
    fn a_detach_from_a_stopping_instance_or_an_attach_beside_a_running_one_is_caught() {
        let calls = [
            call("DetachVolume", "i-1", &[("i-1", "stopping")]),
            call("AttachVolume", "i-2", &[("i-1", "running"), ("i-2", "running")]),
            call("AttachVolume", "i-2", &[("i-2", "running")]),
        ];
        let v = fencing_violations(&calls, "vol-1");
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("i-1 stopping") && v[1].contains("i-1 running"), "{v:?}");
        assert!(fencing_violations(&calls, "vol-2").is_empty());
    }
}
