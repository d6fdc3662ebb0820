//! Replays every input kept under `spec-tests/fuzz/` through the fuzz
//! targets of `spec_tests::fuzz`, uninstrumented: the seed corpora
//! (`corpus/<target>/`) and the inputs that once broke an invariant
//! (`regressions/<target>/`). So the normal test run keeps every fuzzing
//! find fixed, without libFuzzer (docs/fuzzing.md).

use std::path::{Path, PathBuf};

use spec_tests::fuzz::TARGETS;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs each file through its target; returns how many ran and the
/// failures, each naming its file and the broken invariant.
fn replay(kind: &str) -> (usize, Vec<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut ran = 0;
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        for file in inputs(&root.join(name)) {
            let data = std::fs::read(&file).expect("a readable input");
            ran += 1;
            let result = std::panic::catch_unwind(|| target(&data));
            if let Err(e) = result {
                let msg = spec_tests::panic_message(&*e);
                failures.push(format!(
                    "{}: {msg}",
                    file.strip_prefix(&root).unwrap_or(&file).display()
                ));
            }
        }
    }
    (ran, failures)
}

#[test]
fn every_seed_of_the_corpora_keeps_the_invariants() {
    let (ran, failures) = replay("corpus");
    // Each target has a seed corpus: an empty one means a path went wrong.
    assert!(ran >= 3 * 5, "only {ran} corpus inputs found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_regression_stays_fixed() {
    let (ran, failures) = replay("regressions");
    assert!(ran >= 1, "no regression inputs found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reply checker itself refuses what it must, or the invariants above
/// would pass vacuously.
#[test]
fn the_reply_checker_refuses_malformed_replies() {
    use spec_tests::fuzz::check_replies;
    check_replies(b"250-mx.example\r\n250 SIZE 10\r\n354 End data\r\n");
    for bad in [
        &b"250 ok\n"[..],
        b"250 ok",
        b"199 too low\r\n",
        b"250-a\r\n251 b\r\n",
        b"250-never ends\r\n",
        b"250 a\rb\r\n",
        b"550 2.1.0 wrong class\r\n",
        b"25 x\r\n",
    ] {
        let r = std::panic::catch_unwind(|| check_replies(bad));
        assert!(r.is_err(), "accepted {:?}", String::from_utf8_lossy(bad));
    }
    let long = format!("250 {}\r\n", "x".repeat(520));
    assert!(std::panic::catch_unwind(|| check_replies(long.as_bytes())).is_err());
}
