//! The provisioner: Kafka instructions become QuestDB resources in regional clusters.
//!
//! Built so far: [`mapping`], the pure translation of an instruction into the desired state of
//! one QuestDB resource. The consumer, journal, cluster registry and gossip come next.

pub mod mapping;
