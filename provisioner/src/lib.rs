//! The provisioner: Kafka instructions become QuestDB resources in regional clusters.
//!
//! Built so far: [`mapping`], the pure translation of an instruction into the desired state of
//! one QuestDB resource, and [`journal`], the PostgreSQL record that makes a replayed or
//! duplicated message act only once. The consumer, cluster registry and gossip come next.

pub mod journal;
pub mod mapping;
