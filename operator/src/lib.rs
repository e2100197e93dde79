//! The per-cluster operator: reconciles each `QuestDB` resource into a dedicated EC2 node, an EBS
//! volume, a security group, Kubernetes children and a Route53 record.
//!
//! Reconcile is a pipeline of small idempotent steps, one module each:
//!
//! 1. validate: the raw resource becomes a [`build::Desired`] (names, owner reference, checked
//!    spec) or a reason to wait for a change;
//! 2. aws: node, volume and security group, found again by tags keyed to the resource's UID;
//! 3. children: the [`build`] objects, server-side applied in a fixed order;
//! 4. dns: the record pointing at the node;
//! 5. status: phase, conditions and endpoints.
//!
//! Only the pure part exists so far: [`names`] (what every object is called and labelled) and
//! [`build`] (every object, rule, script and record, from validated input). Steps that talk to
//! an API call these and add no shape of their own.

pub mod build;
mod hash;
pub mod names;
