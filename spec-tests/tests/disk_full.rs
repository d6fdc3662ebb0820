//! A full disk: reception refuses with 4xx (the client keeps the message),
//! nothing accepted is lost, nothing half-written is left, and reception
//! resumes once there is space again.
//!
//! The data directory sits on a small tmpfs, so these tests need root (as
//! CI has); they say so when they cannot mount.

use std::path::Path;
use std::process::Command;

use spec_tests::client::{Client, Reply};
use spec_tests::server::{
    DaemonProcess, TestServer, eventually, offline_queue_ids, queued_id, run_cli,
};

struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(path: &'a Path, size: &str) -> Tmpfs<'a> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount");
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn body() -> String {
    format!(
        "From: <a@x.example>\r\n\r\n{}",
        ("z".repeat(98) + "\r\n").repeat(500)
    )
}

/// Sends messages until one is refused; returns the accepted IDs and the refusal.
fn fill(c: &mut Client) -> (Vec<String>, Reply) {
    let body = body();
    let mut accepted = Vec::new();
    loop {
        let replies = c.send_message("a@x.example", &["b@y.example"], &body);
        let refusal = replies.iter().find(|r| r.code >= 400).cloned();
        match refusal {
            None => {
                accepted.push(queued_id(replies.last().unwrap()));
                assert!(accepted.len() < 2000, "the disk never filled up");
            }
            Some(r) => {
                if replies
                    .iter()
                    .any(|r| r.code == 250 && r.text().contains("2.1.0"))
                    && r.code != 452
                {
                    // Refused at the end of DATA: the transaction is over.
                } else {
                    c.cmd("RSET");
                }
                return (accepted, r);
            }
        }
    }
}

#[test]
fn below_the_free_space_reserve_mail_is_refused_452_and_accepted_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fs = Tmpfs::mount(&data, "24m");
    let mut server = TestServer::start_with("[queue]\ncache_mb = 4\nmin_free_mb = 12\n", |c| {
        c.data_dir = data.clone()
    });
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let (mut accepted, refusal) = fill(&mut c);
    assert!(matches!(refusal.code, 451 | 452), "{refusal}");
    assert_eq!(refusal.enhanced(), Some("4.3.1"), "{refusal}");
    assert!(!accepted.is_empty());
    server.rejection("the storage refusal", |r| {
        r.reply.enhanced_code.as_deref() == Some("4.3.1")
    });
    assert!(
        !server.queue().is_failed(),
        "the reserve should keep the store healthy"
    );

    // Space returns: within the monitor's second, MAIL is accepted again.
    fs.resize("96m");
    eventually("MAIL to be accepted again", || {
        let r = c.cmd("MAIL FROM:<a@x.example>");
        if r.code == 250 {
            Some(())
        } else {
            assert_eq!(r.code, 452, "{r}");
            None
        }
    });
    c.cmd("RSET");
    let replies = c.send_message("a@x.example", &["b@y.example"], &body());
    accepted.push(queued_id(replies.last().unwrap()));

    let dir_path = server.data_dir().to_path_buf();
    server.stop();
    let (q, report) = queue::Queue::open(&spec_tests::server::store_config(&dir_path))
        .expect("the store reopens");
    assert!(report.corrupt.is_empty());
    let ids: Vec<String> = q.records().map(|r| r.unwrap().id.to_string()).collect();
    assert_eq!(ids, accepted, "exactly the accepted messages are stored");
}

#[test]
fn a_write_that_hits_a_full_disk_is_answered_451_and_a_restart_keeps_everything_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fs = Tmpfs::mount(&data, "6m");
    // No reserve: sled itself meets ENOSPC.
    let toml = "[queue]\ncache_mb = 4\nmin_free_mb = 0\ncommit_timeout = \"2s\"\n";
    let d = DaemonProcess::start(dir.path(), toml);
    let mut c = Client::connect(d.addr);
    c.ehlo();
    let (accepted, refusal) = fill(&mut c);
    assert_eq!(
        (refusal.code, refusal.enhanced()),
        (451, Some("4.3.0")),
        "{refusal}"
    );
    // While the disk is full, refusals come at once rather than hang.
    let started = std::time::Instant::now();
    let replies = c.send_message("a@x.example", &["b@y.example"], &body());
    assert_eq!(replies.last().unwrap().code, 451);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the store should answer at once"
    );
    assert!(
        d.stderr().contains("No space left on device"),
        "the log should say why:\n{}",
        d.stderr()
    );

    // The operator frees space and restarts.
    d.kill9();
    fs.resize("64m");
    let d = DaemonProcess::start(dir.path(), toml);
    let mut c = Client::connect(d.addr);
    c.ehlo();
    let replies = c.send_message("a@x.example", &["b@y.example"], &body());
    let after = queued_id(replies.last().unwrap());
    assert!(d.terminate().success());

    let stored = offline_queue_ids(&data);
    for id in accepted.iter().chain([&after]) {
        assert!(
            stored.contains(id),
            "accepted message {id} lost; stored: {stored:?}"
        );
    }
    // Every stored message is whole: its content reads back.
    for id in &stored {
        let (code, out, err) = run_cli(
            &[
                "queue",
                "show",
                id,
                "--offline",
                "--body",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&"z".repeat(98)), "message {id} is not whole");
    }
}
