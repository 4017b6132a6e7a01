//! The committed CRD is what the Rust types generate.

use std::process::Command;

#[test]
fn committed_crd_is_what_tally_operator_crd_prints() {
    let output = Command::new(env!("CARGO_BIN_EXE_tally-operator"))
        .arg("crd")
        .output()
        .expect("tally-operator runs");
    assert!(
        output.status.success(),
        "tally-operator crd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).expect("UTF-8");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/meteringcollector.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("crds/meteringcollector.yaml exists");
    assert!(
        printed == committed,
        "crds/meteringcollector.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn crd_has_the_designed_names_and_schema() {
    let crd: serde_json::Value =
        serde_yaml::from_str(&tally_operator::crd::crd_yaml().expect("CRD renders")).expect("YAML");
    assert_eq!(crd["spec"]["group"], "metering.tally.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "MeteringCollector");
    assert_eq!(crd["spec"]["names"]["plural"], "meteringcollectors");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["mc"])
    );
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let spec = &schema["spec"]["properties"];
    for field in [
        "replicas",
        "image",
        "resources",
        "storage",
        "service",
        "pipeline",
        "injection",
        "excludeNamespaces",
    ] {
        assert!(spec[field].is_object(), "spec.{field} missing");
    }
    assert_eq!(
        spec["replicas"]["x-kubernetes-validations"][0]["rule"],
        "self >= 1"
    );
    assert!(spec["pipeline"]["properties"]["outputs"]["properties"]["targets"]
        ["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .is_some_and(|rule| rule.contains("exists_one")));
    let conditions = &schema["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    for field in ["observedGeneration", "readyReplicas", "endpoint"] {
        assert!(
            schema["status"]["properties"][field].is_object(),
            "status.{field} missing"
        );
    }
}
