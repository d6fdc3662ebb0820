//! The `mta` program, built inside this package so that process-level tests
//! (kill -9, restart, the CLI) get a binary built from the current source
//! through `CARGO_BIN_EXE_spec-mta`. Same entry point as `mta/src/main.rs`.

fn main() -> std::process::ExitCode {
    mta::cli::main()
}
