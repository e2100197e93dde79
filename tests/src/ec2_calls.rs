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
    /// The access key that signed the call: which component made it.
    #[serde(default)]
    pub caller: Option<String>,
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

/// When a DetachVolume of a volume may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// Only once the instance it leaves is stopped or terminated: a failover, whose old machine
    /// may be cut off and still writing.
    AfterFence,
    /// Also from a running instance whose pod was stopped (a planned move, a pause): its kubelet
    /// unmounted the volume first (the attach/detach controller waits for that), and the
    /// emulator, like EBS with a busy device, completes it only once the machine lets go.
    AfterUnmount,
}

/// Every AttachVolume or DetachVolume of `volume` sent while another instance holding it was not
/// yet stopped or terminated (with [`Detach::AfterFence`], for a detach the instance it leaves
/// counts too: a machine still stopping may still be writing).
pub fn fencing_violations(calls: &[Ec2Call], volume: &str, detach: Detach) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.volume.as_deref() == Some(volume))
        .filter_map(|c| {
            let target = c.instances.first().map(String::as_str);
            let unfenced: Vec<String> = c
                .holders
                .iter()
                .filter(|(id, state)| {
                    let leaving = Some(id.as_str()) == target;
                    let counts = !leaving || (c.action == "DetachVolume" && detach == Detach::AfterFence);
                    counts && !fenced(state)
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

/// Who sent AttachVolume or DetachVolume for `volume` (access keys).
pub fn attachers(calls: &[Ec2Call], volume: &str) -> std::collections::BTreeSet<String> {
    calls
        .iter()
        .filter(|c| c.volume.as_deref() == Some(volume))
        .filter(|c| matches!(c.action.as_str(), "AttachVolume" | "DetachVolume"))
        .map(|c| c.caller.clone().unwrap_or_else(|| "(unsigned)".into()))
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
            caller: Some("ebs-csi-driver".into()),
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
        assert!(fencing_violations(&calls, "vol-1", Detach::AfterFence).is_empty());
        assert_eq!(attachers(&calls, "vol-1").into_iter().collect::<Vec<_>>(), ["ebs-csi-driver"]);
    }

    #[test]
    fn a_planned_move_may_detach_from_its_running_holder_but_never_attach_beside_it() {
        let calls = [
            call("DetachVolume", "i-1", &[("i-1", "running")]),
            call("AttachVolume", "i-2", &[("i-1", "stopping")]),
            call("AttachVolume", "i-2", &[("i-1", "stopped")]),
        ];
        let v = fencing_violations(&calls, "vol-1", Detach::AfterUnmount);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("AttachVolume") && v[0].contains("i-1 stopping"), "{v:?}");
        assert_eq!(fencing_violations(&calls, "vol-1", Detach::AfterFence).len(), 2);
    }

    #[test]
    fn a_detach_from_a_stopping_instance_or_an_attach_beside_a_running_one_is_caught() {
        let calls = [
            call("DetachVolume", "i-1", &[("i-1", "stopping")]),
            call("AttachVolume", "i-2", &[("i-1", "running"), ("i-2", "running")]),
            call("AttachVolume", "i-2", &[("i-2", "running")]),
        ];
        let v = fencing_violations(&calls, "vol-1", Detach::AfterFence);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("i-1 stopping") && v[1].contains("i-1 running"), "{v:?}");
        assert!(fencing_violations(&calls, "vol-2", Detach::AfterFence).is_empty());
    }
}
