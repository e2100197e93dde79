//! Prints the QuestDB CRD as YAML. `crdgen --write` puts it at deploy/crd/questdb.yaml, the one
//! copy that manifests and tests use.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = qdb_crd::crd_yaml()?;
    if std::env::args().any(|a| a == "--write") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crd/questdb.yaml");
        std::fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    } else {
        print!("{yaml}");
    }
    Ok(())
}
