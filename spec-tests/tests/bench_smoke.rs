//! The benchmark harness works: a short run against the program under test.
//! Figures are not checked here (timed tests lie on a shared machine); the
//! real runs and their figures are in docs/performance.md.

use spec_tests::server::mta_bin;

#[test]
fn the_reception_benchmark_runs_and_reports() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--mta", mta_bin().to_str().unwrap()])
        .args([
            "--messages",
            "300",
            "--warmup",
            "20",
            "--connections",
            "4",
            "--size-kb",
            "4",
            "--json",
        ])
        .output()
        .expect("run the benchmark");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["messages"], 300);
    assert_eq!(report["tls"], true);
    assert!(report["accepted_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["server_cpu_seconds"].as_f64().is_some());
    assert!(report["server_peak_rss_mb"].as_f64().unwrap() > 0.0);
    assert!(
        report["transaction_p99_ms"].as_f64().unwrap()
            >= report["transaction_p50_ms"].as_f64().unwrap()
    );
}
