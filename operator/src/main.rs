//! tally-operator: reconciles `MeteringCollector` resources into collector StatefulSets and
//! injects tally-sidecar into labelled workloads. Not built yet; this binary only says so.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "tally-operator {}: the operator is not implemented yet; run tally-sidecar directly",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
