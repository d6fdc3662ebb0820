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

/// A clock fixed at one time.
#[derive(Debug)]
struct Fixed(std::time::SystemTime);

impl mta::clock::Clock for Fixed {
    fn now(&self) -> std::time::SystemTime {
        self.0
    }
}

#[test]
fn retention_counts_days_by_the_daemons_clock() {
    // The daemon's clock says it is 2030-03-10: with 30 days kept, files
    // up to 2030-02-07 go, 2030-02-08 onwards stay, whatever the real date.
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_899_374_400); // 2030-03-10
    let day = |s: &str| {
        time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).unwrap()
    };
    let names = ["2030-02-06", "2030-02-07", "2030-02-08", "2030-03-09"];
    let server = TestServer::start_with_clock(
        "[log]\nretention_days = 30\n",
        |config| {
            let log = config.data_dir.join("log");
            std::fs::create_dir_all(&log).unwrap();
            for n in names {
                std::fs::write(log.join(mta::log::file_name(day(n))), "").unwrap();
            }
        },
        std::sync::Arc::new(Fixed(now)),
    );
    let log = server.data_dir().join("log");
    let exists = |n: &str| log.join(mta::log::file_name(day(n))).exists();
    eventually("the days past retention to be removed", || {
        (!exists("2030-02-06") && !exists("2030-02-07")).then_some(())
    });
    assert!(exists("2030-02-08") && exists("2030-03-09"));
}
