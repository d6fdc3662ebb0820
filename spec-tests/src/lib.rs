//! Conformance and end-to-end tests of the mta against real peers, and the
//! benchmark harness.
//!
//! Tests live in `tests/`, one file per area, each case naming the RFC
//! section or the fault it covers; fixtures (data) live under
//! `fixtures/<rfc>/`. This library holds what they share:
//!
//! - [`server::TestServer`]: the daemon started in-process on port 0 with a
//!   temporary data directory, with helpers that wait for transaction log
//!   records.
//! - [`server::DaemonProcess`]: the real program (`spec-mta`, the same entry
//!   point as `mta`) as a child process, for kill -9 and restart tests.
//! - [`client::Client`]: a blocking SMTP client over real sockets and real
//!   TLS, which sends exactly the bytes a test gives it (pipelining,
//!   smuggling, over-long lines).
//! - [`dns::DnsServer`]: a real DNS server (hickory-server) on loopback
//!   serving zones written as zone-file text.
//! - [`sink::Sink`]: a real SMTP receiving server on loopback, scripted by
//!   recipient, that records what the mta delivers to it.
//! - [`spf_dns::SpfDnsServer`]: a real DNS server (hickory-server) on
//!   loopback answering from the SPF suite's zone data (odd names, TXT
//!   and SPF-type records, CNAMEs, SERVFAIL for `TIMEOUT`).
//! - [`dialogue`]: the `.smtp` fixture format and its runner.
//! - [`tools`]: running independent clients (Python smtplib, swaks).
//! - [`fuzz`]: the fuzz targets and their invariants, run by the libFuzzer
//!   harness in `fuzz/` and replayed by `tests/fuzz_regressions.rs`.
//!
//! Nothing here is needed by the daemon.

pub mod client;
pub mod dialogue;
pub mod dns;
pub mod fuzz;
pub mod server;
pub mod sink;
pub mod spf_dns;
pub mod tools;

/// The message of a caught panic (`std::panic::catch_unwind`), for tests
/// that run many cases and report every failure at the end.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
