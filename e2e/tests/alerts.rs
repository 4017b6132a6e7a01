//! The chart's monitoring: the PrometheusRule (`prometheusRule.enabled`) that `helm template`
//! renders passes `promtool check rules`, and its alerts fire and stay quiet as
//! `e2e/alerts/alerts.test.yaml` says under `promtool test rules` (promtool built from the
//! `github.com/prometheus/prometheus` Go module by `e2e/promtool/build.sh`); every sidecar metric
//! the alerts and the Grafana dashboard (`grafanaDashboard.enabled`) query is in a real sidecar's
//! `/metrics`. The operator's metrics are checked against the real operator in `chart.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use tally_e2e::{Helm, Manifests, chart_dir, missing_metrics};
use tally_tests::Sidecar;

fn rendered() -> Manifests {
    Helm::locate()
        .unwrap_or_else(|e| panic!("{e}"))
        .template(
            &chart_dir(),
            "tally",
            "tally-system",
            &[&chart_dir().join("ci/servicemonitor-values.yaml")],
        )
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The promtool binary: built (or found in the cache) by e2e/promtool/build.sh.
fn promtool() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("promtool/build.sh");
    let output = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn promtool_run(args: &[&str], dir: &Path) -> String {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {args:?} failed:\n{printed}"
    );
    printed
}

#[test]
fn the_alerts_pass_promtool_check_and_their_unit_tests() {
    let manifests = rendered();
    let rule = manifests
        .get("PrometheusRule", "tally-operator")
        .expect("prometheusRule.enabled renders a PrometheusRule");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // A Prometheus rule file is the PrometheusRule's spec; JSON is YAML.
    std::fs::write(
        dir.path().join("tally.rules.yaml"),
        rule.data["spec"].to_string(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/alerts.test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts.test.yaml")).unwrap_or_else(|e| panic!("{e}"));

    let checked = promtool_run(&["check", "rules", "tally.rules.yaml"], dir.path());
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool_run(&["test", "rules", "alerts.test.yaml"], dir.path());
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert is exercised by a unit test, and has a runbook section in the chart's README.
    let cases = std::fs::read_to_string(&tests).unwrap_or_else(|e| panic!("{e}"));
    let readme =
        std::fs::read_to_string(chart_dir().join("README.md")).unwrap_or_else(|e| panic!("{e}"));
    for group in rule.data["spec"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        for rule in group["rules"].as_array().cloned().unwrap_or_default() {
            let alert = rule["alert"].as_str().unwrap_or_default();
            assert!(
                cases.contains(&format!("alertname: {alert}")),
                "{alert} has no case in e2e/alerts/alerts.test.yaml"
            );
            assert!(
                readme.contains(&format!("### {alert}")),
                "{alert} has no runbook section (### {alert}) in charts/tally/README.md"
            );
            let runbook = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_default();
            assert!(
                runbook.ends_with(&format!("#{}", alert.to_lowercase())),
                "{alert}'s runbook_url points at its section: {runbook}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sidecar_metric_the_alerts_and_the_dashboard_query_is_exported() {
    let wanted: Vec<String> = rendered()
        .queried_metrics()
        .into_iter()
        .filter(|name| !name.starts_with("tally_operator_"))
        .collect();
    assert!(
        wanted.len() >= 20,
        "the alerts and the dashboard query the sidecar: {wanted:?}"
    );
    let sidecar = Sidecar::builder().start().await;
    let exposition = sidecar
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap_or_default();
    let missing = missing_metrics(&wanted, &exposition);
    assert!(
        missing.is_empty(),
        "metrics the alerts or the dashboard query but a fresh sidecar does not export: {missing:?}"
    );
}
