//! Encryption at rest of the queue, with the real daemon: nothing of a
//! queued message reaches `<data_dir>/queue/` in clear, the key is
//! generated beside the data directory on first start, a wrong or missing
//! key stops the start with the file named, and keys rotate through the CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use spec_tests::client::Client;
use spec_tests::server::{DaemonProcess, free_port, queued_id, run_cli};

const SUBJECT: &str = "Quarterly-figures-3b7e91";
const BODY: &str = "the-merger-is-on-c4d2a8";
const RCPT: &str = "ceo-private-e81f05@dest.example";

fn submit(d: &DaemonProcess) -> String {
    let mut c = Client::connect(d.addr);
    c.ehlo();
    let content =
        format!("From: <news@x.example>\r\nTo: <{RCPT}>\r\nSubject: {SUBJECT}\r\n\r\n{BODY}\r\n");
    let replies = c.send_message("news@x.example", &[RCPT], &content);
    queued_id(replies.last().unwrap())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Which of the needles some file under `<data_dir>/queue/` holds.
fn found_in_queue_dir(data_dir: &Path) -> Vec<&'static str> {
    let files = files_under(&data_dir.join("queue"));
    assert!(
        files.iter().any(|f| f.to_string_lossy().ends_with(".seg")),
        "the search covers the content segments: {files:?}"
    );
    assert!(
        files.iter().any(|f| f.ends_with("index/db")),
        "the search covers sled's file: {files:?}"
    );
    let mut found = Vec::new();
    for needle in [SUBJECT, BODY, RCPT] {
        if files.iter().any(|f| {
            let bytes = std::fs::read(f).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        }) {
            found.push(needle);
        }
    }
    found
}

fn dd(d: &Path) -> &str {
    d.to_str().unwrap()
}

#[test]
fn no_plaintext_of_a_queued_message_reaches_the_queue_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let id = submit(&d);
    let data_dir = d.data_dir.clone();
    let stderr_path = d.stderr_path.clone();
    assert!(d.terminate().success());
    let stderr = std::fs::read_to_string(stderr_path).unwrap();
    let key = dir.path().join("data-queue.key");
    assert!(
        stderr.contains("generated the queue encryption key") && stderr.contains("data-queue.key"),
        "{stderr}"
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    let key_hex = key_text.lines().find(|l| !l.starts_with('#')).unwrap();
    assert_eq!(key_hex.len(), 64);
    assert!(!stderr.contains(key_hex), "the key itself is never logged");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(found_in_queue_dir(&data_dir), Vec::<&str>::new());

    // After a restart the message is still there, readable.
    let d = DaemonProcess::start(dir.path(), "");
    let (code, out, err) = run_cli(
        &["queue", "list", "--json", "--data-dir", dd(&data_dir)],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");
    let (code, out, err) = run_cli(&["queue", "show", &id, "--data-dir", dd(&data_dir)], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(RCPT) && out.contains(SUBJECT), "{out}");
    assert!(
        !d.stderr().contains("generated"),
        "the key is generated once"
    );
    assert!(d.terminate().success());
}

#[test]
fn the_same_search_finds_the_message_when_encryption_is_off() {
    // The control: the search above can fail.
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "[queue]\nencrypt = false\n");
    submit(&d);
    let data_dir = d.data_dir.clone();
    assert!(d.terminate().success());
    assert_eq!(found_in_queue_dir(&data_dir), vec![SUBJECT, BODY, RCPT]);
    assert!(!dir.path().join("data-queue.key").exists());
}

/// A config like `DaemonProcess` writes, for starts that must fail.
fn config_file(dir: &Path, queue: &str) -> PathBuf {
    let path = dir.join("fail.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[delivery]\nenabled = false\n[spf]\npolicy = \"off\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n[queue]\n{queue}\n",
            dir.join("data").display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    path
}

fn serve_fails(config: &Path) -> String {
    let (code, _, err) = run_cli(&["serve", "--config", config.to_str().unwrap()], None);
    assert_eq!(code, 1, "{err}");
    err
}

#[test]
fn a_wrong_or_missing_key_is_refused_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    submit(&d);
    assert!(d.terminate().success());
    let key = dir.path().join("data-queue.key");

    // Another key.
    let other = dir.path().join("other.key");
    let (code, _, err) = run_cli(&["queue", "generate-key", other.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    let cfg = config_file(
        dir.path(),
        &format!("encryption_key_file = \"{}\"", other.display()),
    );
    let err = serve_fails(&cfg);
    assert!(
        err.contains(&other.display().to_string()) && err.contains("was encrypted with key"),
        "{err}"
    );

    // A configured key file that is not there.
    let absent = dir.path().join("absent.key");
    let cfg = config_file(
        dir.path(),
        &format!("encryption_key_file = \"{}\"", absent.display()),
    );
    let err = serve_fails(&cfg);
    assert!(
        err.contains(&absent.display().to_string()) && err.contains("does not exist"),
        "{err}"
    );

    // A key file others may read.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_fails(&config_file(dir.path(), ""));
    assert!(
        err.contains("chmod 600") && err.contains("data-queue.key"),
        "{err}"
    );

    // The default key lost: a new one cannot open the queue, and is not kept.
    std::fs::rename(&key, dir.path().join("saved.key")).unwrap();
    let err = serve_fails(&config_file(dir.path(), ""));
    assert!(err.contains("is missing: restore it"), "{err}");
    assert!(!key.exists(), "the useless new key was removed");

    // Encryption turned off while encrypted messages are queued.
    let err = serve_fails(&config_file(dir.path(), "encrypt = false"));
    assert!(err.contains("is encrypted"), "{err}");

    // With the right key back, it starts and the message is there.
    std::fs::rename(dir.path().join("saved.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    assert!(d.terminate().success());
    assert_eq!(
        spec_tests::server::offline_queue_ids(&d_data(dir.path())).len(),
        1
    );
}

fn d_data(dir: &Path) -> PathBuf {
    dir.join("data")
}

fn key_ids(key: &Path) -> Vec<String> {
    std::fs::read_to_string(key)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# key id "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

#[test]
fn a_rotated_key_seals_new_messages_and_rekey_retires_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = d_data(dir.path());
    let key = dir.path().join("data-queue.key");
    let d = DaemonProcess::start(dir.path(), "");
    let first = submit(&d);
    assert!(d.terminate().success());
    let old = key_ids(&key);
    assert_eq!(old.len(), 1);

    let new = dir.path().join("new.key");
    let (code, _, err) = run_cli(&["queue", "generate-key", new.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_cli(
        &[
            "queue",
            "rotate-key",
            "--new",
            new.to_str().unwrap(),
            "--data-dir",
            dd(&data),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("is now current") && out.contains(&old[0]),
        "{out}"
    );
    let ring = key_ids(&key);
    assert_eq!(ring.len(), 2);
    assert_eq!(ring[1], old[0]);

    let d = DaemonProcess::start(dir.path(), "");
    let second = submit(&d);
    // rekey rewrites the store: not while the daemon has it.
    let (code, _, err) = run_cli(&["queue", "rekey", "--data-dir", dd(&data)], None);
    assert_eq!(code, 1);
    assert!(err.contains("stop it first"), "{err}");
    assert!(d.terminate().success());

    let (code, out, err) = run_cli(&["queue", "rekey", "--data-dir", dd(&data)], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "old keys removed from {}: {}",
            key.display(),
            old[0]
        )),
        "{out}"
    );
    assert_eq!(key_ids(&key), vec![ring[0].clone()]);

    let mut ids = spec_tests::server::offline_queue_ids(&data);
    ids.sort();
    let mut want = vec![first.clone(), second];
    want.sort();
    assert_eq!(ids, want);
    let (code, out, err) = run_cli(
        &[
            "queue",
            "show",
            &first,
            "--offline",
            "--data-dir",
            dd(&data),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(SUBJECT), "{out}");
}

#[test]
fn altered_content_is_quarantined_and_listed_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let data = d_data(dir.path());
    let d = DaemonProcess::start(dir.path(), "");
    let id = submit(&d);
    assert!(d.terminate().success());
    // The one message's content is the last entry of the only non-empty
    // segment; flip a byte of its tag.
    let seg = files_under(&data.join("queue/content"))
        .into_iter()
        .find(|f| std::fs::metadata(f).unwrap().len() > 0)
        .expect("a segment with the message");
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&seg, bytes).unwrap();

    let d = DaemonProcess::start(dir.path(), "");
    let (code, _, err) = run_cli(&["queue", "show", &id, "--data-dir", dd(&data)], None);
    assert_eq!(code, 1);
    assert!(err.contains("quarantined") && err.contains(&id), "{err}");
    let (code, out, err) = run_cli(&["queue", "list", "--data-dir", dd(&data)], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 message(s)\n"),
        "not in the live queue: {out}"
    );
    assert!(
        out.contains("1 message(s) in quarantine") && out.contains(&id),
        "{out}"
    );
    assert!(d.terminate().success());

    // Still there, still not delivered, after a restart.
    let d = DaemonProcess::start(dir.path(), "");
    let stderr_path = d.stderr_path.clone();
    assert!(d.terminate().success());
    let stderr = std::fs::read_to_string(stderr_path).unwrap();
    assert!(stderr.contains("message in quarantine"), "{stderr}");
    let (code, out, err) = run_cli(
        &["queue", "list", "--offline", "--data-dir", dd(&data)],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id) && out.contains("content"), "{out}");

    // A postmaster removes it deliberately; that is on record.
    let d = DaemonProcess::start(dir.path(), "");
    let (code, out, err) = run_cli(
        &["queue", "delete-quarantined", &id, "--data-dir", dd(&data)],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("{id}: quarantined record and its content removed")
    );
    let (code, _, err) = run_cli(
        &["queue", "delete-quarantined", &id, "--data-dir", dd(&data)],
        None,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("no quarantined record {id}")),
        "{err}"
    );
    let (_, out, _) = run_cli(&["queue", "list", "--data-dir", dd(&data)], None);
    assert!(!out.contains("in quarantine"), "{out}");
    let actions: Vec<(String, String)> = spec_tests::server::read_log(&d.data_dir)
        .into_iter()
        .filter_map(|r| match r {
            mta::log::Record::AdminAction(a) if a.action == "delete-quarantined" => {
                Some((a.queue_id, a.result))
            }
            _ => None,
        })
        .collect();
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[0], (id.clone(), "ok".to_string()));
    assert!(d.terminate().success());
    // Its content segment held nothing else: it is gone with it.
    let live: Vec<_> = files_under(&data.join("queue/content"))
        .into_iter()
        .filter(|f| std::fs::metadata(f).unwrap().len() > 0 && *f == seg)
        .collect();
    assert!(live.is_empty(), "the quarantined content stayed: {live:?}");
}
