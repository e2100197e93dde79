//! Leader election through a coordination.k8s.io Lease: two replicas run, one reconciles.
//!
//! The rules are client-go's (`leaseDuration` 15 s, `renewDeadline` 10 s, `retryPeriod` 2 s by
//! default, and the same proportions for any other lease):
//! - the holder renews every retry period and acts only until the renew deadline has passed since
//!   its last successful renewal, measured on its own monotonic clock from the moment that renewal
//!   was *sent* (the apiserver recorded it no earlier);
//! - a standby takes the lease only once the record it reads has not changed for a whole lease,
//!   measured on its own monotonic clock from the moment it first saw that record. Neither side
//!   ever compares its clock with a timestamp another machine wrote.
//!
//! So the holder stops at least `lease - renew deadline` before a standby can start, whatever the
//! two machines' wall clocks say, as long as their clocks run at roughly the same rate. Every
//! Kubernetes and AWS mutation passes [`Fence::check`] right before it is sent
//! ([`FenceLayer`] for the Kubernetes client, the AWS wrapper's gate for AWS); a lapsed fence
//! never opens again, and the binary exits.

use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// The election's durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a claim lasts without renewal: what a standby waits, after it last saw the lease
    /// change, before it takes over.
    pub lease: Duration,
    /// The holder stops acting this long after its last successful renewal was sent.
    pub renew_deadline: Duration,
    /// How often the holder renews and a standby looks.
    pub retry: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error(
        "the renew deadline ({renew_deadline:?}) must be shorter than the lease ({lease:?}): the holder \
         must stop before a standby may start"
    )]
    DeadlineNotUnderLease { lease: Duration, renew_deadline: Duration },
    #[error(
        "the retry period ({retry:?}) must be shorter than the renew deadline ({renew_deadline:?}): \
         the holder needs more than one try to renew"
    )]
    RetryNotUnderDeadline { renew_deadline: Duration, retry: Duration },
}

impl Timing {
    /// `lease` with the given deadline and retry period, or client-go's proportions of it
    /// (15 s / 10 s / 2.5 s).
    pub fn new(
        lease: Duration,
        renew_deadline: Option<Duration>,
        retry: Option<Duration>,
    ) -> Result<Timing, TimingError> {
        let renew_deadline = renew_deadline.unwrap_or(lease * 2 / 3);
        let retry = retry.unwrap_or(lease / 6);
        if renew_deadline >= lease {
            return Err(TimingError::DeadlineNotUnderLease { lease, renew_deadline });
        }
        if retry >= renew_deadline || retry.is_zero() {
            return Err(TimingError::RetryNotUnderDeadline { renew_deadline, retry });
        }
        Ok(Timing { lease, renew_deadline, retry })
    }

    /// The timeout of every Kubernetes request: a write sent just before the fence closes must
    /// have given up before a standby can act (the margin between the deadline and the lease).
    pub fn request_timeout(&self) -> Duration {
        (self.lease - self.renew_deadline).max(Duration::from_secs(1))
    }
}

/// Whether the holder may act at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The lease is confirmed until `until` (the renew deadline after the last renewal).
    Leading { until: Instant },
    /// Never renewed, or not within the renew deadline: stop, write nothing.
    Lapsed,
}

/// The holder's decision, from its own clock only: `last_renewal` is when the last renewal that
/// succeeded was sent.
pub fn standing(now: Instant, last_renewal: Option<Instant>, timing: &Timing) -> Standing {
    match last_renewal {
        Some(at) if now.saturating_duration_since(at) < timing.renew_deadline => {
            Standing::Leading { until: at + timing.renew_deadline }
        }
        _ => Standing::Lapsed,
    }
}

/// A lease record as a standby saw it: its version, and when (on the standby's clock) it first
/// saw that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub version: String,
    pub since: Instant,
}

/// The observation after reading `version` at `now`: the clock restarts only when the record
/// changed (a renewal by the holder), so a holder that stopped renewing is timed from when it was
/// last seen renewing.
pub fn observe(previous: Option<Observed>, version: &str, now: Instant) -> Observed {
    match previous {
        Some(o) if o.version == version => o,
        _ => Observed { version: version.to_string(), since: now },
    }
}

/// Whether `identity` may write itself into a lease held as `spec`, first seen unchanged at
/// `observed.since`. The holder's own `renewTime` is never compared with our clock.
pub fn may_take(
    spec: Option<&LeaseSpec>,
    identity: &str,
    observed: &Observed,
    now: Instant,
    timing: &Timing,
) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => {
            let theirs = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(timing.lease);
            now.saturating_duration_since(observed.since) >= theirs.max(timing.lease)
        }
    }
}

/// Returned instead of sending a mutation while the lease is not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not the leader: the leader lease was not confirmed within its renew deadline, so nothing is written"
)]
pub struct NotLeader;

/// The gate every mutation passes: open only while this replica's lease is confirmed.
#[derive(Debug)]
pub struct Fence {
    timing: Timing,
    state: Mutex<FenceState>,
}

#[derive(Debug, Default)]
struct FenceState {
    renewed: Option<Instant>,
    /// Set the first time the fence is found lapsed: a lease lost once is never used again (the
    /// process stops, and a new one starts clean).
    lapsed: bool,
}

impl Fence {
    pub fn new(timing: Timing) -> Arc<Fence> {
        Arc::new(Fence { timing, state: Mutex::new(FenceState::default()) })
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Ok while the lease is confirmed, by the monotonic clock read now.
    pub fn check(&self) -> Result<(), NotLeader> {
        match self.standing() {
            Standing::Leading { .. } => Ok(()),
            Standing::Lapsed => Err(NotLeader),
        }
    }

    pub fn standing(&self) -> Standing {
        let Ok(mut s) = self.state.lock() else { return Standing::Lapsed };
        if s.lapsed {
            return Standing::Lapsed;
        }
        let standing = standing(Instant::now(), s.renewed, &self.timing);
        // Only a fence that was open can lapse; before the first renewal it is simply closed.
        if standing == Standing::Lapsed && s.renewed.is_some() {
            s.lapsed = true;
        }
        standing
    }

    /// A renewal sent at `sent` succeeded.
    fn renewed(&self, sent: Instant) {
        if let Ok(mut s) = self.state.lock()
            && !s.lapsed
        {
            s.renewed = Some(s.renewed.map_or(sent, |r| r.max(sent)));
        }
    }

    /// Closes the fence for good (the lease went to another replica).
    fn lapse(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.lapsed = true;
        }
    }
}

/// What one look at the lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold it (took or renewed it).
    Holding,
    /// Someone else holds it and may still be acting.
    HeldBy(String),
}

/// Why [`Elector::hold`] returned: the process must stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Another replica's name is in the lease.
    Taken(String),
    /// No renewal succeeded within the renew deadline.
    Unconfirmed,
}

/// What the election reports to `/readyz` and `/healthz`.
#[derive(Debug, Default)]
pub struct ElectionHealth {
    state: Mutex<ElectionState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ElectionState {
    role: Role,
    /// The last time the lease was read or written successfully.
    seen: Option<Instant>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    #[default]
    Starting,
    Standby,
    Leader,
    /// Lost or could not confirm the lease; the process is stopping.
    Stopping,
}

impl ElectionHealth {
    pub fn snapshot(&self) -> (Role, Option<Instant>) {
        self.state.lock().map(|s| (s.role, s.seen)).unwrap_or((Role::Stopping, None))
    }

    fn set(&self, role: Role, seen: Option<Instant>) {
        if let Ok(mut s) = self.state.lock() {
            // Stopping is final.
            if s.role != Role::Stopping {
                s.role = role;
            }
            if seen.is_some() {
                s.seen = seen;
            }
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    fence: Arc<Fence>,
    observed: Mutex<Option<Observed>>,
    health: Arc<ElectionHealth>,
}

impl Elector {
    /// `client` must not go through the fence (the lease is how the fence opens) and should have
    /// timeouts of its own; each attempt is bounded by the renew deadline in any case.
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, fence: Arc<Fence>) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            fence,
            observed: Mutex::new(None),
            health: Arc::default(),
        }
    }

    pub fn health(&self) -> Arc<ElectionHealth> {
        self.health.clone()
    }

    /// One attempt to take or renew the lease. A success opens the fence until the renew
    /// deadline after the moment this attempt started.
    pub async fn try_hold(&self) -> Result<Attempt, kube::Error> {
        let sent = Instant::now();
        let current = self.api.get_opt(&self.name).await?;
        let seen = Instant::now();
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let holder = spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
        let version = current.as_ref().and_then(|l| l.metadata.resource_version.clone()).unwrap_or_default();
        let observed = {
            let mut o = self.observed.lock().map_err(|_| poisoned())?;
            let now = observe(o.take(), &version, seen);
            *o = Some(now.clone());
            now
        };
        if !may_take(spec, &self.identity, &observed, seen, self.fence.timing()) {
            self.health.set(Role::Standby, Some(seen));
            return Ok(Attempt::HeldBy(holder.unwrap_or_default()));
        }
        let held_by_us = holder.as_deref() == Some(self.identity.as_str());
        let previous = spec.cloned().unwrap_or_default();
        // renewTime is for people reading the lease; no replica of ours compares it with a clock.
        let now = jiff::Timestamp::now();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.fence.timing().lease.as_secs()).unwrap_or(i32::MAX),
            ),
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
                self.fence.renewed(sent);
                self.health.set(Role::Leader, Some(Instant::now()));
                Ok(Attempt::Holding)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.health.set(Role::Standby, Some(Instant::now()));
                Ok(Attempt::HeldBy(holder.unwrap_or_default()))
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            let attempt = tokio::time::timeout(self.fence.timing().renew_deadline, self.try_hold()).await;
            match attempt {
                Ok(Ok(Attempt::Holding)) => return,
                Ok(Ok(Attempt::HeldBy(_))) => {}
                Ok(Err(e)) => warn!(error = %e, "leader election"),
                Err(_) => warn!("leader election: the lease could not be read in time"),
            }
            tokio::time::sleep(self.fence.timing().retry).await;
        }
    }

    /// Renews every retry period until the lease is lost: another replica's name in it, or no
    /// renewal confirmed within the renew deadline. The deadline is a timer of its own, so a
    /// renewal that hangs (or a process that was frozen) cannot keep this waiting past it.
    pub async fn hold(&self) -> Lost {
        let lost = loop {
            let Standing::Leading { until } = self.fence.standing() else { break Lost::Unconfirmed };
            let deadline = tokio::time::Instant::from_std(until);
            let attempt = tokio::select! {
                r = self.try_hold() => r,
                _ = tokio::time::sleep_until(deadline) => break Lost::Unconfirmed,
            };
            match attempt {
                Ok(Attempt::Holding) => {}
                Ok(Attempt::HeldBy(other)) => break Lost::Taken(other),
                Err(e) => warn!(error = %e, "renewing the leader lease failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.fence.timing().retry) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        };
        self.fence.lapse();
        self.health.set(Role::Stopping, None);
        match &lost {
            Lost::Taken(other) => {
                warn!(identity = %self.identity, %other, "lost the leader lease to another replica")
            }
            Lost::Unconfirmed => {
                warn!(identity = %self.identity, "the leader lease was not confirmed within the renew deadline")
            }
        }
        lost
    }
}

fn poisoned() -> kube::Error {
    kube::Error::Service("leader election state poisoned".into())
}

/// A tower layer for the Kubernetes client: every request that can change something (anything but
/// GET, HEAD and OPTIONS, so watches and lists pass) is refused unless [`Fence::check`] passes at
/// the moment it is handed to the connection. Place it where nothing below it resends a request on
/// its own (the client's retry layer is turned off for fenced clients).
#[derive(Clone)]
pub struct FenceLayer(pub Arc<Fence>);

impl<S> tower::Layer<S> for FenceLayer {
    type Service = Fenced<S>;
    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced { inner, fence: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Fenced<S> {
    inner: S,
    fence: Arc<Fence>,
}

/// Whether a request of this method may change the cluster.
pub fn is_mutation(method: &http::Method) -> bool {
    !matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
}

impl<S, B> tower::Service<http::Request<B>> for Fenced<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: Into<tower::BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<S::Response, tower::BoxError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_mutation(req.method())
            && let Err(e) = self.fence.check()
        {
            return futures::future::ready(Err(e.into())).boxed();
        }
        let fut = self.inner.call(req);
        async move { fut.await.map_err(Into::into) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn timing() -> Timing {
        Timing::new(secs(15), None, None).expect("valid")
    }

    #[test]
    fn timing_defaults_to_client_gos_proportions_and_refuses_a_deadline_past_the_lease() {
        let t = timing();
        assert_eq!((t.renew_deadline, t.retry), (secs(10), Duration::from_millis(2500)));
        assert_eq!(t.request_timeout(), secs(5));
        assert_eq!(Timing::new(secs(6), None, None).map(|t| t.renew_deadline), Ok(secs(4)));
        assert!(matches!(
            Timing::new(secs(15), Some(secs(15)), None),
            Err(TimingError::DeadlineNotUnderLease { .. })
        ));
        assert!(matches!(
            Timing::new(secs(15), Some(secs(10)), Some(secs(10))),
            Err(TimingError::RetryNotUnderDeadline { .. })
        ));
    }

    #[test]
    fn the_holder_leads_only_until_the_renew_deadline_after_its_last_renewal() {
        let t = timing();
        let renewed = Instant::now();
        assert_eq!(standing(renewed, None, &t), Standing::Lapsed, "never renewed");
        let until = renewed + secs(10);
        assert_eq!(standing(renewed + secs(9), Some(renewed), &t), Standing::Leading { until });
        assert_eq!(standing(renewed + secs(10), Some(renewed), &t), Standing::Lapsed);
        // A process frozen for a minute wakes up lapsed, whatever it last believed.
        assert_eq!(standing(renewed + secs(60), Some(renewed), &t), Standing::Lapsed);
    }

    #[test]
    fn the_holder_stops_before_any_standby_may_start() {
        // The worst case for the holder: its last renewal was recorded the moment it was sent and
        // the standby saw it at once. The holder lapses a third of a lease before the standby may
        // take over.
        let t = timing();
        let sent = Instant::now();
        let observed = Observed { version: "7".into(), since: sent };
        let held = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        let mut now = sent;
        while standing(now, Some(sent), &t) != Standing::Lapsed {
            assert!(!may_take(Some(&held), "b", &observed, now, &t), "both act at {:?}", now - sent);
            now += Duration::from_millis(100);
        }
        assert!(!may_take(Some(&held), "b", &observed, now + secs(4), &t));
        assert!(may_take(Some(&held), "b", &observed, sent + secs(15), &t));
    }

    #[test]
    fn a_standby_times_the_holder_from_when_it_saw_the_record_change_never_from_renew_time() {
        let t = timing();
        let start = Instant::now();
        // renewTime a year ago (a skewed or dead holder's clock) does not matter: only our view.
        let held = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)),
            ..LeaseSpec::default()
        };
        let first = observe(None, "7", start);
        assert!(!may_take(Some(&held), "b", &first, start, &t));
        let same = observe(Some(first.clone()), "7", start + secs(14));
        assert_eq!(same.since, start, "an unchanged record keeps its first sighting");
        assert!(!may_take(Some(&held), "b", &same, start + secs(14), &t));
        assert!(may_take(Some(&held), "b", &same, start + secs(15), &t));
        // The holder renewed: the clock starts again.
        let renewed = observe(Some(same), "8", start + secs(15));
        assert!(!may_take(Some(&held), "b", &renewed, start + secs(16), &t));
        // A longer lease written by the holder is honoured.
        let long = LeaseSpec { lease_duration_seconds: Some(60), ..held.clone() };
        assert!(!may_take(Some(&long), "b", &first, start + secs(30), &t));
        // Free, ours, or no lease at all: take it now.
        assert!(may_take(None, "b", &first, start, &t));
        assert!(may_take(Some(&held), "a", &first, start, &t));
        let free = LeaseSpec { holder_identity: Some(String::new()), ..held };
        assert!(may_take(Some(&free), "b", &first, start, &t));
    }

    #[test]
    fn the_fence_opens_on_a_renewal_and_once_lapsed_stays_shut() {
        let fence = Fence::new(
            Timing::new(secs(3), Some(Duration::from_millis(200)), Some(Duration::from_millis(50)))
                .expect("valid"),
        );
        assert_eq!(fence.check(), Err(NotLeader), "closed before the first renewal");
        fence.renewed(Instant::now());
        assert_eq!(fence.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(fence.check(), Err(NotLeader));
        fence.renewed(Instant::now());
        assert_eq!(fence.check(), Err(NotLeader), "a renewal after the lapse does not reopen it");
    }

    #[test]
    fn only_mutations_are_fenced() {
        for m in [http::Method::GET, http::Method::HEAD] {
            assert!(!is_mutation(&m));
        }
        for m in [http::Method::POST, http::Method::PUT, http::Method::PATCH, http::Method::DELETE] {
            assert!(is_mutation(&m));
        }
    }

    #[tokio::test]
    async fn the_fenced_service_refuses_writes_and_passes_reads_when_lapsed() {
        use tower::{Service, ServiceExt};
        let fence = Fence::new(timing());
        let inner = tower::service_fn(|_req: http::Request<()>| async { Ok::<_, tower::BoxError>("sent") });
        let mut svc = tower::Layer::layer(&FenceLayer(fence.clone()), inner);
        let req = |m: http::Method| http::Request::builder().method(m).body(()).expect("request");
        let get = svc.ready().await.expect("ready").call(req(http::Method::GET)).await;
        assert_eq!(get.ok(), Some("sent"));
        let patch = svc.ready().await.expect("ready").call(req(http::Method::PATCH)).await;
        assert!(patch.is_err_and(|e| e.is::<NotLeader>()));
        fence.renewed(Instant::now());
        let patch = svc.ready().await.expect("ready").call(req(http::Method::PATCH)).await;
        assert_eq!(patch.ok(), Some("sent"));
    }
}
