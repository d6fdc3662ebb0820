//! The durability contract with the real program: a message answered 250
//! survives `kill -9` and a clean stop, and the restarted daemon recovers it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spec_tests::client::{Client, message};
use spec_tests::server::{DaemonProcess, offline_queue_ids, queued_id};
use spec_tests::sink::{Sink, SinkConfig};

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

/// Message IDs answered 250, with the subject each message carried.
type Accepted = Arc<Mutex<BTreeMap<String, String>>>;

/// Four clients submitting pipelined messages (subjects `<tag> w<n> m<i>`)
/// until `stop`, or until the daemon dies under them; each says why it
/// stopped.
fn load(
    addr: std::net::SocketAddr,
    tag: &str,
    accepted: &Accepted,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<String>> {
    (0..4)
        .map(|w| {
            let (accepted, stop, tag) = (accepted.clone(), stop.clone(), tag.to_string());
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
                    let subject = format!("{tag} w{w} m{i}");
                    let body = message("news@x.example", "a@dest.example", &subject);
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
                            accepted.lock().unwrap().insert(queued_id(&r), subject);
                        }
                        other => return format!("worker {w}: data: {other:?}"),
                    }
                    i += 1;
                }
                format!("worker {w}: stopped after {i}")
            })
        })
        .collect()
}

/// Waits until `accepted` holds `n` more than `from`, then kills the daemon.
fn kill_after(
    d: DaemonProcess,
    workers: Vec<std::thread::JoinHandle<String>>,
    accepted: &Accepted,
    stop: &Arc<AtomicBool>,
    n: usize,
) {
    let from = accepted.lock().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < from + n {
        if workers.iter().all(|w| w.is_finished()) || std::time::Instant::now() > deadline {
            let why: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
            panic!("the load stopped before {n} messages were accepted: {why:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join().unwrap();
    }
}

#[test]
fn kill_9_during_a_load_keeps_every_message_that_got_250() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let data_dir = d.data_dir.clone();
    let accepted: Accepted = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(d.addr, "load", &accepted, &stop);
    // Let the load run, then kill without warning.
    kill_after(d, workers, &accepted, &stop, 200);
    let accepted: BTreeSet<String> = accepted.lock().unwrap().keys().cloned().collect();
    let stored = offline_ids(&data_dir);
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages lost: {lost:?}",
        lost.len(),
        accepted.len()
    );
}

/// A small xorshift generator: the kill moments are random, but a failing
/// run can be repeated with the seed it prints (`MTA_KILL_SEED`).
struct Moments(u64);

impl Moments {
    fn from_env() -> Moments {
        let seed = std::env::var("MTA_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        Moments(seed)
    }

    /// A duration in `[lo, hi)` milliseconds.
    fn between(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo))
    }
}

/// The longest a delivery can stay "in flight" after the sink's 250: the
/// time the daemon takes to commit the outcome. A copy received longer than
/// this before a kill was not in flight at it, and must not come again.
const IN_FLIGHT: Duration = Duration::from_secs(3);

#[test]
fn kill_9_at_random_moments_of_a_delivering_load_loses_nothing() {
    // The durability contract end to end, repeated: kill -9 at random
    // moments (from right after the start, while recovering, to well into
    // the load) while thousands of messages are accepted and delivered.
    // After every kill the store opens cleanly and holds every message
    // answered 250 that the MX does not have yet; after the last restart
    // every one reaches the MX, and a copy comes twice only if it was in
    // flight at a kill.
    let sink = Sink::start("127.0.0.2:0".parse().unwrap(), SinkConfig::default());
    let toml = format!(
        "[delivery]\nrelay_host = \"{}\"\nretry_initial = \"1s\"\nretry_max = \"1s\"\n",
        sink.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut moments = Moments::from_env();
    let seed = moments.0;
    let accepted: Accepted = Default::default();
    let mut kills = Vec::new();
    let subject = |m: &spec_tests::sink::SunkMessage| {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
            .unwrap_or_default()
    };
    let mut round = 0;
    while round < 5 || (accepted.lock().unwrap().len() < 3_000 && round < 20) {
        let d = DaemonProcess::start(dir.path(), &toml);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = load(d.addr, &format!("r{round}"), &accepted, &stop);
        std::thread::sleep(moments.between(0, 2_500));
        d.kill9();
        // Taken once the process is gone: the sink may take a message while
        // the signal is on its way.
        kills.push(std::time::Instant::now());
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join().unwrap();
        }
        // The store opens cleanly, quarantines nothing, and every message
        // answered 250 is either still queued or already at the MX.
        let stored = offline_ids(&data_dir);
        let dir_arg = data_dir.to_str().unwrap();
        let (code, listing, err) = spec_tests::server::run_cli(
            &["queue", "list", "--offline", "--data-dir", dir_arg],
            None,
        );
        assert_eq!(code, 0, "seed {seed}, round {round}: {err}");
        assert!(
            !listing.contains("quarantine"),
            "seed {seed}, round {round}: {listing}"
        );
        let seen: BTreeSet<String> = sink.messages().iter().map(subject).collect();
        let lost: Vec<_> = accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, subject)| !stored.contains(*id) && !seen.contains(*subject))
            .map(|(id, _)| id.clone())
            .collect();
        assert!(
            lost.is_empty(),
            "seed {seed}, after kill {round}: accepted but neither queued nor delivered: {lost:?}"
        );
        round += 1;
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= 2_000,
        "seed {seed}: only {} messages accepted in {round} rounds",
        accepted.len()
    );

    let d = DaemonProcess::start(dir.path(), &toml);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let seen: BTreeSet<String> = sink.messages().iter().map(subject).collect();
        let missing: Vec<&String> = accepted.values().filter(|s| !seen.contains(*s)).collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        missing,
        0,
        "seed {seed}: {missing} of {} accepted messages never delivered\n{}",
        accepted.len(),
        d.stderr()
    );
    assert!(d.terminate().success(), "seed {seed}: a clean stop");
    let left = offline_ids(&data_dir);
    assert!(
        left.is_empty(),
        "seed {seed}: delivered but still queued: {left:?}"
    );

    // A copy comes again only if the one before was taken within IN_FLIGHT
    // before a kill that came before the next.
    let mut copies: BTreeMap<String, Vec<std::time::Instant>> = BTreeMap::new();
    for m in sink.messages() {
        copies.entry(subject(&m)).or_default().push(m.received_at);
    }
    let mut duplicates = 0;
    for (subject, times) in &copies {
        for pair in times.windows(2) {
            duplicates += 1;
            let in_flight = kills
                .iter()
                .any(|k| pair[0] <= *k && *k - pair[0] <= IN_FLIGHT && pair[1] > *k);
            if !in_flight {
                let t0 = kills[0];
                let at = |t: &std::time::Instant| {
                    if *t >= t0 {
                        format!("+{:?}", *t - t0)
                    } else {
                        format!("-{:?}", t0 - *t)
                    }
                };
                let id = accepted
                    .iter()
                    .find(|(_, s)| *s == subject)
                    .map(|(id, _)| id.clone());
                let records: Vec<String> = spec_tests::server::read_log(&data_dir)
                    .into_iter()
                    .map(|r| serde_json::to_string(&r).unwrap())
                    .filter(|r| id.as_ref().is_some_and(|id| r.contains(id.as_str())))
                    .collect();
                panic!(
                    "seed {seed}: {subject} ({id:?}) delivered again, but its earlier copy was not in flight at a kill: copies at {:?}, kills at {:?}\n{}",
                    times.iter().map(at).collect::<Vec<_>>(),
                    kills.iter().map(at).collect::<Vec<_>>(),
                    records.join("\n")
                );
            }
        }
    }
    eprintln!(
        "seed {seed}: {} kills, {} messages accepted, {duplicates} delivered twice",
        kills.len(),
        accepted.len()
    );
}

#[test]
fn systemd_hears_ready_watchdog_reloading_and_stopping() {
    // sd_notify(3) over $NOTIFY_SOCKET, as Type=notify with WatchdogSec=
    // runs the daemon: READY once it accepts, keep-alives at half the
    // watchdog interval, RELOADING/READY around SIGHUP, STOPPING on SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let d = DaemonProcess::start_with_env(
        dir.path(),
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut heard = Vec::new();
    let next = |heard: &mut Vec<String>| {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        heard.push(msg.clone());
        msg
    };
    let ready = next(&mut heard);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", d.child.id())),
        "{ready}"
    );
    // The daemon accepts mail once it said READY.
    assert_eq!(Client::connect(d.addr).greeting.code, 220);
    while next(&mut heard) != "WATCHDOG=1" {}
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    while next(&mut heard) != "RELOADING=1" {}
    while next(&mut heard) != "READY=1" {}
    let status = d.terminate();
    assert!(status.success(), "{status}");
    while next(&mut heard) != "STOPPING=1" {}
}

/// Sends SIGTERM and returns at once (the daemon stops in the background).
fn sigterm(d: &DaemonProcess) {
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
}

#[test]
fn sigterm_lets_a_message_in_data_finish_and_accepts_nothing_unfinished() {
    // The clean stop: no new connections; idle sessions get 421; a
    // session in DATA may finish within shutdown_grace and gets its 250
    // (the message is in the queue after the stop); one that does not
    // finish in time gets no reply and nothing of it is stored; exit 0.
    let dir = tempfile::tempdir().unwrap();
    let mut d = DaemonProcess::start(dir.path(), "[smtp]\nshutdown_grace = \"2s\"\n");
    let begin = |subject: &str| {
        let mut c = Client::connect(d.addr);
        c.ehlo();
        c.begin_data("news@x.example", "a@dest.example");
        c.send(format!(
            "From: <news@x.example>\r\nSubject: {subject}\r\n\r\n"
        ));
        c
    };
    let mut finishing = begin("finishes");
    let mut stalled = begin("stalls");
    let mut idle = Client::connect(d.addr);
    idle.ehlo();

    sigterm(&d);
    // Listening has stopped: the signal was taken.
    spec_tests::server::eventually("the listener to close", || {
        std::net::TcpStream::connect(d.addr).is_err().then_some(())
    });
    let r = idle.reply();
    assert_eq!((r.code, r.enhanced()), (421, Some("4.3.2")), "{r}");
    finishing.send("The rest, after SIGTERM.\r\n.\r\n");
    let r = finishing.reply();
    assert_eq!(r.code, 250, "the message in DATA was cut off: {r}");
    let id = queued_id(&r);
    let r = finishing.reply();
    assert_eq!((r.code, r.enhanced()), (421, Some("4.3.2")), "{r}");

    // The stalled one: the grace runs out, the daemon exits 0 without
    // answering it.
    stalled.set_read_timeout(Duration::from_secs(60));
    if let Ok(r) = stalled.try_reply() {
        panic!("the unfinished message got a reply: {r}");
    }
    let status =
        spec_tests::server::eventually("the daemon to exit", || d.child.try_wait().unwrap());
    assert!(status.success(), "{status}\n{}", d.stderr());
    assert!(
        d.stderr().contains("sessions still open at shutdown"),
        "{}",
        d.stderr()
    );

    let data_dir = d.data_dir.clone();
    assert_eq!(offline_ids(&data_dir), BTreeSet::from([id.clone()]));
    let receptions: Vec<String> = spec_tests::server::read_log(&data_dir)
        .into_iter()
        .filter_map(|r| match r {
            mta::log::Record::Reception(r) => Some(r.queue_id),
            _ => None,
        })
        .collect();
    assert_eq!(receptions, [id]);
    // And the restarted daemon has it.
    let d = DaemonProcess::start(dir.path(), "[smtp]\nshutdown_grace = \"2s\"\n");
    assert!(
        d.stderr().contains("queue recovered messages=1"),
        "{}",
        d.stderr()
    );
    assert!(d.terminate().success());
}

#[test]
fn a_clean_stop_while_delivering_sends_nothing_twice_and_the_restart_sends_the_rest() {
    // SIGTERM while deliveries are under way: each finishes its
    // transaction and is recorded; what waited goes back to the queue; the
    // restarted daemon sends the rest. The sink counts every delivery.
    let sink = Sink::start(
        "127.0.0.2:0".parse().unwrap(),
        SinkConfig {
            reply_delay: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let toml = format!(
        "[delivery]\nrelay_host = \"{}\"\nmax_connections_per_destination = 2\n",
        sink.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), &toml);
    let data_dir = d.data_dir.clone();
    let mut c = Client::connect(d.addr);
    c.ehlo();
    let n = 20;
    let ids: BTreeSet<String> = (0..n)
        .map(|i| {
            let replies = c.send_message(
                "news@x.example",
                &["a@dest.example"],
                &message("news@x.example", "a@dest.example", &format!("stop {i}")),
            );
            queued_id(replies.last().unwrap())
        })
        .collect();
    sink.wait_for_messages(2, Duration::from_secs(60));
    assert!(d.terminate().success());
    let delivered = |data_dir: &std::path::Path| -> Vec<String> {
        spec_tests::server::read_log(data_dir)
            .into_iter()
            .filter(|r| r.kind() == "Delivery")
            .filter_map(|r| r.queue_id().map(str::to_string))
            .collect()
    };
    let first = delivered(&data_dir);
    assert_eq!(
        sink.messages().len(),
        first.len(),
        "the sink got what the log does not record (or the reverse)"
    );
    assert!(first.len() < n, "the stop came too late to test");
    let left = offline_ids(&data_dir);
    assert_eq!(left.len() + first.len(), n, "lost or doubled in the queue");

    let d = DaemonProcess::start(dir.path(), &toml);
    spec_tests::server::eventually("every message delivered", || {
        (delivered(&data_dir).len() >= n).then_some(())
    });
    assert!(d.terminate().success());
    let all = delivered(&data_dir);
    assert_eq!(all.iter().cloned().collect::<BTreeSet<_>>(), ids);
    assert_eq!(all.len(), n, "a message has two Delivery records");
    let mut subjects: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    subjects.sort();
    let unique: BTreeSet<&String> = subjects.iter().collect();
    assert_eq!(unique.len(), subjects.len(), "sent twice: {subjects:?}");
    assert_eq!(subjects.len(), n);
    assert!(offline_ids(&data_dir).is_empty());
}
