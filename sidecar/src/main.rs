use std::process::ExitCode;

fn main() -> ExitCode {
    tally_sidecar::cli::main()
}
