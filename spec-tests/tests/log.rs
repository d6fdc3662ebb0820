//! The transaction log's files: retention of whole days
//! (`[log] retention_days`) in the running daemon.

use spec_tests::server::{TestServer, eventually};

#[test]
fn days_past_retention_are_removed_at_start_and_recent_ones_kept() {
    let yesterday = time::OffsetDateTime::now_utc().date() - time::Duration::days(1);
    let server = TestServer::start_with("[log]\nretention_days = 7\n", |config| {
        let log = config.data_dir.join("log");
        std::fs::create_dir_all(&log).unwrap();
        for name in [
            "transactions-2020-01-01.jsonl".to_string(),
            "transactions-2020-01-01.1.jsonl".to_string(),
            mta::log::file_name(yesterday),
        ] {
            std::fs::write(log.join(name), "").unwrap();
        }
    });
    let log = server.data_dir().join("log");
    let recent = log.join(mta::log::file_name(yesterday));
    eventually("the old days to be removed", || {
        (!log.join("transactions-2020-01-01.jsonl").exists()
            && !log.join("transactions-2020-01-01.1.jsonl").exists())
        .then_some(())
    });
    assert!(recent.exists());
}
