//! `tessera`: the command line of ML leads (and, later, regulators).

use std::process::ExitCode;

fn main() -> ExitCode {
    tessera_protocol::cli::quiet_on_closed_pipe();
    tessera_coordinator::cli::main()
}
