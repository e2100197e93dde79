//! The per-cluster operator: reconciles each `QuestDB` resource into a dedicated EC2 node, an EBS
//! volume, a security group, Kubernetes children and a Route53 record.
//!
//! ```text
//! controller (QuestDB + owned children + dedicated Nodes) --> reconcile, one module per step:
//!   validate (build::Desired) -> aws (security group, instance, volume) -> children (SSA)
//!   -> dns (Route53) -> status (phase, conditions, events); cleanup behind a finalizer
//! ```
//! [`build`] holds every object, rule, script and record as a pure function of validated input;
//! [`aws`] is the only door to AWS (tags, rate limits, throttling retries). Steps that talk to an
//! API call these and add no shape of their own.

pub mod aws;
pub mod budget;
pub mod build;
pub mod cache;
pub mod context;
pub mod controller;
mod hash;
pub mod health;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod reconcile;
pub mod sql;
pub mod sweep;
