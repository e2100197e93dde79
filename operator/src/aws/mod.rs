//! The operator's only door to AWS: EC2 (node, data volume, security group) and Route53 (the
//! database's A record).
//!
//! Every call goes through the service's token bucket, so many databases reconciling at once stay
//! under the account's API rate, and through one retry layer that retries only throttling and
//! server errors (the SDK's own retries are off, so each attempt is paced and counted once in
//! `aws_calls`). Anything else is returned at once: reconcile requeues, and each step finds its
//! resources again by the owner-UID tag, so a retry at that level never needs to remember a thing.
//!
//! Resources are tagged at creation (TagSpecifications), never afterwards: a crash between create
//! and tag would leave an untagged resource that no lookup finds again. Lookups filter by tag on the
//! server side.

mod error;
mod limiter;

pub mod ec2;
#[cfg(test)]
pub mod fixtures;
pub mod inventory;
pub mod network;
pub mod route53;

#[cfg(test)]
mod emulator_test;
#[cfg(test)]
mod policy_test;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use backon::{ExponentialBuilder, Retryable};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use qdb_crd::{OPERATOR_MANAGER, keys};

pub use ec2::{
    Attachment, AttachmentState, EbsSnapshot, Instance, InstanceState, InstanceType, Launch,
    MODIFICATION_RATE_EXCEEDED, Restore, SecurityGroup, SnapshotState, Volume, VolumeChange, VolumeState,
    launch_of, launch_token,
};
pub use error::{AwsError, Outcome, classify};
use limiter::TokenBucket;
pub use network::NodeNetwork;

use crate::leader::Fence;

/// Tag marking what a resource is for, where one owner has several of a kind (its data volume
/// next to the instances' root volumes).
pub const ROLE: &str = "cloud.questdb.io/role";
pub const ROLE_DATA: &str = "data";

pub struct AwsConfig {
    pub region: String,
    /// Endpoint override (the local cloud's emulator); `None` resolves the real AWS endpoints.
    pub endpoint: Option<String>,
    /// Calls per second to EC2 and to Route53, across all databases. Route53 allows 5 per second
    /// per account, EC2's mutating calls far more; both are shared with whatever else the account
    /// runs.
    pub ec2_per_sec: u32,
    pub route53_per_sec: u32,
    /// Where nodes launch and what everything is tagged with.
    pub network: NodeNetwork,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            endpoint: None,
            ec2_per_sec: 20,
            route53_per_sec: 5,
            network: NodeNetwork::default(),
        }
    }
}

#[derive(Clone)]
pub struct Aws {
    ec2: aws_sdk_ec2::Client,
    route53: aws_sdk_route53::Client,
    ec2_limit: Arc<TokenBucket>,
    route53_limit: Arc<TokenBucket>,
    calls: Family<CallLabels, Counter>,
    /// The leader fence, checked right before every request is sent (none in tests and tools).
    fence: Option<Arc<Fence>>,
    network: Arc<NodeNetwork>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Service {
    Ec2,
    Route53,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    service: &'static str,
    operation: &'static str,
    outcome: &'static str,
}

/// Tags every resource carries; lookups use `owner_uid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The cluster's name: the node simulator (and any cluster tooling) finds its instances by it.
    pub cluster: String,
    pub namespace: String,
    pub database: String,
    pub owner_uid: String,
}

impl Owner {
    /// The console's `Name`: what a human looks for. Not unique over time (a database deleted and
    /// created again has the same one), so nothing looks resources up by it.
    pub fn name(&self) -> String {
        format!("qdb-{}-{}", self.namespace, self.database)
    }

    pub(crate) fn tags(&self) -> Vec<(String, String)> {
        vec![
            ("Name".into(), self.name()),
            (keys::OWNER_UID.into(), self.owner_uid.clone()),
            (keys::CLUSTER.into(), self.cluster.clone()),
            (keys::NAMESPACE.into(), self.namespace.clone()),
            (keys::DATABASE.into(), self.database.clone()),
            (keys::MANAGED_BY.into(), OPERATOR_MANAGER.into()),
        ]
    }
}

impl Aws {
    /// Credentials come from the standard chain (environment, profile, web identity, instance
    /// role); nothing is checked until the first call.
    pub async fn new(cfg: &AwsConfig) -> Aws {
        Aws::from_sdk_config(&sdk_loader(cfg).load().await, cfg)
    }

    /// From SDK settings made elsewhere, best from [`sdk_loader`] (tests add the emulator's
    /// static credentials to it).
    pub fn from_sdk_config(sdk: &aws_config::SdkConfig, cfg: &AwsConfig) -> Aws {
        Aws {
            ec2: aws_sdk_ec2::Client::new(sdk),
            route53: aws_sdk_route53::Client::new(sdk),
            ec2_limit: Arc::new(TokenBucket::new(cfg.ec2_per_sec)),
            route53_limit: Arc::new(TokenBucket::new(cfg.route53_per_sec)),
            calls: Family::default(),
            fence: None,
            network: Arc::new(cfg.network.clone()),
        }
    }

    /// Every call from now on is sent only while `fence` is open: a replica whose leader lease is
    /// not confirmed calls AWS no more (not even to read: it has nothing to decide).
    pub fn with_fence(mut self, fence: Arc<Fence>) -> Aws {
        self.fence = Some(fence);
        self
    }

    /// Registers `aws_calls` (a counter, so exposed as `<prefix>_aws_calls_total`) labelled by
    /// service, operation and outcome (`ok`, `throttled`, `error`); every attempt counts once.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "aws_calls",
            "AWS API call attempts by service, operation and outcome (ok, throttled, error)",
            self.calls.clone(),
        );
    }

    /// One AWS operation: paced by the service's token bucket, retried with exponential backoff
    /// and jitter on throttling and server errors only. `send` builds and sends one attempt (a
    /// cloned fluent builder), so every attempt is a fresh request.
    async fn call<T, E, F, Fut>(
        &self,
        service: Service,
        operation: &'static str,
        send: F,
    ) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut send = send;
        let attempt = || {
            // `send` only builds the request future; nothing goes out until it is polled, which
            // is after the token bucket let us through.
            let request = send();
            async move {
                let limit = match service {
                    Service::Ec2 => &self.ec2_limit,
                    Service::Route53 => &self.route53_limit,
                };
                limit.acquire().await;
                // Checked after the wait for the token bucket (which may be long), as close to
                // the send as this layer gets.
                if let Some(fence) = &self.fence {
                    fence.check().map_err(|source| AwsError::NotLeader { operation, source })?;
                }
                let result = request.await.map_err(|e| AwsError::from_sdk(operation, e));
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) if e.is_throttling() => "throttled",
                    Err(_) => "error",
                };
                let service = match service {
                    Service::Ec2 => "ec2",
                    Service::Route53 => "route53",
                };
                self.calls.get_or_create(&CallLabels { service, operation, outcome }).inc();
                result
            }
        };
        attempt
            .retry(backoff())
            .when(AwsError::is_retryable)
            .notify(|e, delay| tracing::warn!(operation, error = %e, ?delay, "AWS call retried"))
            .await
    }
}

/// The SDK settings for `cfg`. Credentials come from the standard chain (environment, profile,
/// web identity, instance role); nothing is checked until the first call.
pub fn sdk_loader(cfg: &AwsConfig) -> aws_config::ConfigLoader {
    let loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        // One retry layer, ours: SDK retries would multiply with it and bypass the limiter.
        .retry_config(RetryConfig::disabled())
        // A hung connection must not stall a reconcile forever; it requeues instead.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
    match &cfg.endpoint {
        Some(endpoint) => loader.endpoint_url(endpoint),
        None => loader,
    }
}

/// About 5 attempts within ~10 s: long enough to ride out a throttling burst, short enough that
/// the reconcile (which requeues on error anyway) is not held up.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(4)
        .with_jitter()
}
