//! Generated files must match their generator: `crds/datasource.yaml` and
//! the chart's copy are both exactly what `shardpool crd` prints.

use std::path::Path;

fn check(path: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let want = shardpool::crd::crd_yaml().expect("the CRD renders");
    let have = std::fs::read_to_string(root.join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}; run `make generate`"));
    assert!(have == want, "{path} is stale: run `make generate`");
}

#[test]
fn crd_file_is_current() {
    check("crds/datasource.yaml");
}

#[test]
fn chart_crd_copy_is_current() {
    check("charts/shardpool/crds/datasource.yaml");
}
