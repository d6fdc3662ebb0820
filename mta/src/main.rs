//! The `mta` binary: see `mta --help` and the crate docs of `mta`.

fn main() -> std::process::ExitCode {
    mta::cli::main()
}
