//! The committed generated code is exactly what prost-build makes of the .proto files.

use std::path::Path;

#[test]
fn generated_code_matches_the_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("qdb-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    prost_build::Config::new()
        // Ordered maps make encodings deterministic (golden fixtures depend on it).
        .btree_map(["."])
        .out_dir(&out)
        .compile_protos(
            &[
                root.join("proto/questdb/cloud/v1/instruction.proto"),
                root.join("proto/questdb/cloud/v1/gossip.proto"),
            ],
            &[root.join("proto")],
        )
        .expect("protoc compiles the contracts (install: apt-get install protobuf-compiler)");
    let generated = std::fs::read_to_string(out.join("questdb.cloud.v1.rs")).unwrap();
    std::fs::remove_dir_all(&out).ok();
    let committed_path = root.join("src/gen/questdb.cloud.v1.rs");
    if std::env::var_os("QDB_BLESS").is_some() {
        std::fs::write(&committed_path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "src/gen/questdb.cloud.v1.rs is stale: run `QDB_BLESS=1 cargo test -p qdb-proto --test generated` and commit it"
    );
}
