//! Independent clients that no one here wrote: Python's smtplib and swaks.
//! The test command installs them (see `spec-tests/run-tests.sh`).

use std::process::{Command, Stdio};

/// Output of a tool run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn run(cmd: &mut Command, what: &str) -> Run {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {what} ({e}): the test command spec-tests/run-tests.sh installs it")
        });
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a Python 3 script with arguments.
pub fn python(script: &str, args: &[&str]) -> Run {
    run(
        Command::new("python3").arg("-c").arg(script).args(args),
        "python3",
    )
}

/// Runs swaks with arguments.
pub fn swaks(args: &[&str]) -> Run {
    run(Command::new("swaks").args(args), "swaks")
}
