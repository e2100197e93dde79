//! The committed CRD YAML is exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crd/questdb.yaml");
    let committed = std::fs::read_to_string(&path).expect("deploy/crd/questdb.yaml is committed");
    let generated = qdb_crd::crd_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "deploy/crd/questdb.yaml is stale: run `cargo run -p qdb-crd --bin crdgen -- --write` and commit it"
    );
}
