//! The README's `MeteringCollector` example is `config/meteringcollector.yaml` (what `make demo` applies and the
//! data-path test renders), word for word, and the operator accepts it.

use tally_operator::crd::MeteringCollector;
use tally_operator::validate;

const EXAMPLE: &str = include_str!("../../config/meteringcollector.yaml");
const README: &str = include_str!("../../README.md");

#[test]
fn the_readme_shows_the_example_collector_verbatim() {
    let block = format!("```yaml\n{EXAMPLE}```");
    assert!(
        README.contains(&block),
        "README.md must show config/meteringcollector.yaml verbatim in a ```yaml block; update one from the other"
    );
}

#[test]
fn the_example_collector_is_valid() {
    let mut collector: MeteringCollector = serde_yaml::from_str(EXAMPLE)
        .expect("config/meteringcollector.yaml is a MeteringCollector");
    // The API server assigns the uid the owner references need.
    collector.metadata.uid = Some("5f0e0c1e-2b9b-4e57-8d2a-3c4b5a697887".into());
    let validated =
        validate::validate(&collector).expect("the example passes the operator's validation");
    assert_eq!(validated.namespace, "tally-system");
    assert!(
        validated.rendered_pipeline.contains("- monitoring"),
        "the collector's excludeNamespaces reach its configuration:\n{}",
        validated.rendered_pipeline
    );
}
