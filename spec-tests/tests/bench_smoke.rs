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

fn bench(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--mta", mta_bin().to_str().unwrap()])
        .args(args)
        .arg("--json")
        .output()
        .expect("run the benchmark");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[test]
fn the_delivery_benchmark_delivers_everything_over_starttls() {
    let report = bench(&[
        "--deliver",
        "--sink-tls",
        "--messages",
        "300",
        "--warmup",
        "20",
        "--connections",
        "4",
        "--size-kb",
        "4",
        "--dkim",
        "ed25519",
    ]);
    let delivery = &report["delivery"];
    assert_eq!(report["messages"], 300);
    assert_eq!(delivery["sink"], "counting");
    assert_eq!(delivery["delivered_over_tls"], 300);
    assert!(delivery["delivered_per_second"].as_f64().unwrap() > 0.0);
    assert!(
        delivery["after_250_p99_ms"].as_f64().unwrap()
            >= delivery["after_250_p50_ms"].as_f64().unwrap()
    );
    assert!(report["server_cpu_ms_per_message"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_deferred_benchmark_reports_memory_and_store_size() {
    let report = bench(&[
        "--deferred",
        "300",
        "--connections",
        "4",
        "--size-kb",
        "1",
        "--no-tls",
    ]);
    assert_eq!(report["messages"], 300);
    assert!(report["server_rss_mb"].as_f64().unwrap() > 0.0);
    assert!(report["queue_disk_mb"].as_f64().unwrap() > 0.0);
}
