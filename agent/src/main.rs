use std::process::ExitCode;

fn main() -> ExitCode {
    infraflux_agent::cli::main_with(|_registry| {})
}
