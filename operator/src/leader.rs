//! Leader election through a coordination.k8s.io Lease: two replicas run, one reconciles. The
//! standby takes the lease once the holder has not renewed it for its duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Whether `identity` may take or keep a lease held as `spec`, at `now`.
pub fn may_hold(spec: Option<&LeaseSpec>, identity: &str, now: jiff::Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => {
            let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            renewed.is_none_or(|r| r + jiff::SignedDuration::from_secs(secs) < now)
        }
    }
}

impl Elector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// One attempt to take or renew the lease; true while this replica holds it.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let held_by_us = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        if !may_hold(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now) {
            return Ok(false);
        }
        let previous = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(MicroTime(now)),
            acquire_time: if held_by_us { previous.acquire_time } else { Some(MicroTime(now)) },
            lease_transitions: Some(previous.lease_transitions.unwrap_or(0) + i32::from(!held_by_us)),
            ..LeaseSpec::default()
        };
        let result = match current {
            // Replace carries the resourceVersion read above: a racing replica makes this fail.
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => {
                if !held_by_us {
                    info!(identity = %self.identity, lease = %self.name, "became leader");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_hold().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews until the lease is lost (another holder, or no renewal for its duration); then
    /// returns, and the process must stop reconciling.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    return warn!(identity = %self.identity, "lost the leader lease to another replica");
                }
                Err(e) => warn!(error = %e, "renewing the leader lease failed"),
            }
            if last_renewal.elapsed() >= self.duration {
                return warn!(identity = %self.identity, "leader lease expired without renewal");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_or_own_leases_may_be_held() {
        let now = jiff::Timestamp::now();
        assert!(may_hold(None, "a", now));
        let held = |by: &str, ago: i64| LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - jiff::SignedDuration::from_secs(ago))),
            ..Default::default()
        };
        assert!(may_hold(Some(&held("a", 1)), "a", now));
        assert!(!may_hold(Some(&held("b", 1)), "a", now));
        assert!(may_hold(Some(&held("b", 16)), "a", now));
    }
}
