//! `tessera`: the command line of ML leads (and, later, regulators).

use std::process::ExitCode;

fn main() -> ExitCode {
    tessera_coordinator::cli::main()
}
