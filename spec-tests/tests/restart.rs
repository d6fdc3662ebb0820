//! The durability contract with the real program: a message answered 250
//! survives `kill -9` and a clean stop, and the restarted daemon recovers it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spec_tests::client::{Client, message};
use spec_tests::server::{DaemonProcess, offline_queue_ids, queued_id};

fn offline_ids(data_dir: &std::path::Path) -> BTreeSet<String> {
    offline_queue_ids(data_dir).into_iter().collect()
}

fn submit(addr: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut c = Client::connect(addr);
    c.ehlo();
    (0..n)
        .map(|i| {
            let replies = c.send_message(
                "news@x.example",
                &["a@dest.example"],
                &message("news@x.example", "a@dest.example", &format!("m{i}")),
            );
            queued_id(replies.last().unwrap())
        })
        .collect()
}

#[test]
fn kill_9_after_250_loses_nothing_and_a_restart_recovers_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let data_dir = d.data_dir.clone();
    let first: BTreeSet<String> = submit(d.addr, 3).into_iter().collect();
    d.kill9();

    // The store opens cleanly and holds every accepted message.
    assert_eq!(offline_ids(&data_dir), first);

    let d = DaemonProcess::start(dir.path(), "");
    // SIGHUP does not stop it (the default action of the signal would).
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    spec_tests::server::eventually("the SIGHUP warning", || {
        d.stderr().contains("SIGHUP received").then_some(())
    });
    let second = submit(d.addr, 1);
    let status = d.terminate();
    assert!(
        status.success(),
        "SIGTERM should stop the daemon cleanly: {status}"
    );
    let stderr = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            p.file_name()?
                .to_str()?
                .starts_with("stderr-")
                .then(|| std::fs::read_to_string(p).unwrap())
        })
        .collect::<String>();
    assert!(stderr.contains("queue recovered messages=3"), "{stderr}");

    let mut all = first.clone();
    all.extend(second);
    assert_eq!(offline_ids(&data_dir), all);

    // Each accepted message is in the log once.
    let receptions: Vec<_> = spec_tests::server::read_log(&data_dir)
        .into_iter()
        .filter_map(|r| match r {
            mta::log::Record::Reception(r) => Some(r.queue_id),
            _ => None,
        })
        .collect();
    assert!(first.iter().all(|id| receptions.contains(id)));
}

#[test]
fn kill_9_during_a_load_keeps_every_message_that_got_250() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let data_dir = d.data_dir.clone();
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (accepted, stop, addr) = (accepted.clone(), stop.clone(), d.addr);
            std::thread::spawn(move || -> String {
                let mut c = match Client::try_connect(addr) {
                    Ok(c) => c,
                    Err(e) => return format!("worker {w}: connect: {e}"),
                };
                c.set_read_timeout(Duration::from_secs(5));
                let r = c.cmd("EHLO load.test");
                if r.code != 250 {
                    return format!("worker {w}: EHLO: {r}");
                }
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = message("news@x.example", "a@dest.example", &format!("w{w} m{i}"));
                    c.send("MAIL FROM:<news@x.example>\r\nRCPT TO:<a@dest.example>\r\nDATA\r\n");
                    for _ in 0..3 {
                        match c.try_reply() {
                            Ok(r) if r.code < 400 => {}
                            // Killed mid-transaction: nothing was accepted.
                            other => return format!("worker {w}: envelope: {other:?}"),
                        }
                    }
                    c.send(format!("{body}.\r\n"));
                    match c.try_reply() {
                        Ok(r) if r.code == 250 => {
                            accepted.lock().unwrap().insert(queued_id(&r));
                        }
                        other => return format!("worker {w}: data: {other:?}"),
                    }
                    i += 1;
                }
                format!("worker {w}: stopped after {i}")
            })
        })
        .collect();
    // Let the load run, then kill without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < 200 {
        if workers.iter().all(|w| w.is_finished()) || std::time::Instant::now() > deadline {
            let why: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
            panic!("the load stopped before 200 messages were accepted: {why:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let stored = offline_ids(&data_dir);
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages lost: {lost:?}",
        lost.len(),
        accepted.len()
    );
}
