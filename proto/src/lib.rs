//! Protobuf contracts on Kafka (`proto/questdb/cloud/v1/*.proto`): [`v1::Instruction`] from the
//! backend on topic "instructions", [`v1::GossipEvent`] back to it on topic "gossip".
//!
//! The Rust code in `src/gen/` is generated from the .proto files by prost-build and committed,
//! so building needs no protoc; `tests/generated.rs` fails when it drifts from the .proto files
//! (regenerate with `QDB_BLESS=1 cargo test -p qdb-proto --test generated`).

pub mod v1 {
    include!("gen/questdb.cloud.v1.rs");
}

pub use prost::Message;
