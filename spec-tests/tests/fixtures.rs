//! Runs every conformance fixture under `spec-tests/fixtures/` (see
//! `fixtures/README.md`) against a fresh daemon.

use std::path::{Path, PathBuf};

use spec_tests::dialogue::Dialogue;
use spec_tests::server::{TestServer, tenants_toml};

fn fixtures(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("fixtures dir") {
        let path = entry.unwrap().path();
        if path.is_dir() {
            fixtures(&path, out);
        } else if path.extension().is_some_and(|e| e == "smtp") {
            out.push(path);
        }
    }
}

#[test]
fn every_fixture_dialogue_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut files = Vec::new();
    fixtures(&root, &mut files);
    files.sort();
    assert!(
        files.len() >= 30,
        "only {} fixtures found under {}",
        files.len(),
        root.display()
    );
    let config = format!(
        "[smtp]\nmax_message_size = 100000\nmax_recipients = 5\nauth_failure_delay = \"50ms\"\n{}",
        tenants_toml()
    );
    let mut failures = Vec::new();
    for file in &files {
        let dialogue = Dialogue::load(file);
        let server = TestServer::start(&config);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dialogue.run(&server)));
        if let Err(e) = result {
            let msg = spec_tests::panic_message(&*e);
            failures.push(format!(
                "{}: {msg}",
                file.strip_prefix(&root).unwrap().display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
