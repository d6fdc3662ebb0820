//! The fuzz targets' code, shared with the workspace: `spec_tests::fuzz`
//! (`spec-tests/src/fuzz.rs`) is compiled here as well, so the fuzzer and
//! `spec-tests/tests/fuzz_regressions.rs` run the same functions.
#[path = "../../src/fuzz.rs"]
pub mod targets;
