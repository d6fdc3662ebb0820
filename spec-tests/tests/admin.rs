//! The admin API through `mta queue` against the real, running program:
//! listings parsed back, filters, show, summary, hold/release/retry/delete
//! with their AdminAction records, the errors, and "no daemon".

use std::net::SocketAddr;
use std::time::Duration;

use mta::log::{AdminAction, Record};
use serde_json::Value;
use spec_tests::client::{Client, message};
use spec_tests::server::{DaemonProcess, eventually, free_port, queued_id, read_log, run_cli};
use spec_tests::sink::{Sink, SinkConfig};

/// Submits one message; returns its queue ID.
fn submit(addr: SocketAddr, from: &str, rcpts: &[&str], subject: &str) -> String {
    let mut c = Client::connect(addr);
    c.ehlo();
    let replies = c.send_message(from, rcpts, &message(from, rcpts[0], subject));
    queued_id(replies.last().unwrap())
}

/// Runs `mta queue <args> --config <the daemon's>`.
fn queue(d: &DaemonProcess, args: &[&str]) -> (i32, String, String) {
    let config = d.config_path.to_str().unwrap();
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config]);
    run_cli(&all, None)
}

/// `mta queue <args> --json`, which must succeed, parsed.
fn queue_json(d: &DaemonProcess, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = queue(d, &all);
    assert_eq!(code, 0, "mta queue {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON from {args:?}: {e}\n{out}"))
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The AdminAction records of changes (reads are recorded too).
fn admin_actions(d: &DaemonProcess) -> Vec<AdminAction> {
    all_admin_calls(d)
        .into_iter()
        .filter(|a| {
            !["list", "show", "summary", "suspensions", "quarantine"].contains(&a.action.as_str())
        })
        .collect()
}

fn all_admin_calls(d: &DaemonProcess) -> Vec<AdminAction> {
    read_log(&d.data_dir)
        .into_iter()
        .filter_map(|r| match r {
            Record::AdminAction(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn me() -> (u32, String) {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    let name = mta::admin::server::user_name(uid).unwrap_or_else(|| format!("uid:{uid}"));
    (uid, name)
}

#[test]
fn list_show_and_summary_reach_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let a = submit(d.addr, "news@x.example", &["a@dest.example"], "first");
    let b = submit(
        d.addr,
        "news@x.example",
        &["b@dest.example", "c@other.example"],
        "second",
    );
    let c = submit(d.addr, "promo@y.example", &["d@other.example"], "third");

    let all = queue_json(&d, &["list"]);
    assert_eq!(ids(&all), [a.clone(), b.clone(), c.clone()], "oldest first");
    let first = &all[0];
    assert_eq!(first["state"], "queued");
    assert_eq!(first["sender"], "news@x.example");
    assert_eq!(first["peer_ip"], "127.0.0.1");
    assert_eq!(first["recipients"][0]["address"], "a@dest.example");
    assert_eq!(first["recipients"][0]["state"], "queued");
    assert!(first["received"].as_str().unwrap().ends_with('Z'));

    // Filters.
    assert_eq!(
        ids(&queue_json(&d, &["list", "--domain", "other.example"])),
        [b.clone(), c.clone()]
    );
    assert_eq!(
        ids(&queue_json(&d, &["list", "--sender", "PROMO@y.example"])),
        [c.as_str()]
    );
    assert_eq!(
        ids(&queue_json(&d, &["list", "--limit", "2"])),
        [a.clone(), b.clone()]
    );
    assert!(ids(&queue_json(&d, &["list", "--state", "held"])).is_empty());
    assert!(ids(&queue_json(&d, &["list", "--older-than", "1h"])).is_empty());
    assert_eq!(
        ids(&queue_json(&d, &["list", "--state", "queued"])).len(),
        3
    );
    let (code, _, err) = queue(&d, &["list", "--older-than", "soon"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--older-than 'soon' is not a duration"),
        "{err}"
    );

    // The table.
    let (code, out, err) = queue(&d, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    assert!(out.contains(&b) && out.contains("3 message(s)"), "{out}");

    // Show: headers by default, the whole message with --body.
    let shown = queue_json(&d, &["show", &b]);
    assert_eq!(shown["id"], b.as_str());
    assert_eq!(shown["recipients"].as_array().unwrap().len(), 2);
    assert!(
        shown["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: second")
    );
    assert!(shown.get("message").is_none());
    let whole = queue_json(&d, &["show", &b, "--body"]);
    assert!(
        whole["message"]
            .as_str()
            .unwrap()
            .contains("Hello from the tests.")
    );
    let (code, out, err) = queue(&d, &["show", &b]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("id:         {b}")), "{out}");
    assert!(out.contains("c@other.example") && out.contains("Subject: second"));

    // Summary, like qshape.
    let s = queue_json(&d, &["summary"]);
    assert_eq!(s["total"]["messages"], 3);
    assert_eq!(s["total"]["recipients"], 4);
    let rows = s["rows"].as_array().unwrap();
    let row = |k: &str| rows.iter().find(|r| r["key"] == k).cloned().unwrap();
    assert_eq!(row("dest.example")["messages"], 2);
    assert_eq!(row("other.example")["recipients"], 2);
    let (code, out, err) = queue(&d, &["summary", "--by", "tenant"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("TENANT"), "{out}");

    // Unknown and malformed IDs.
    let (code, _, err) = queue(&d, &["show", "0000000000000"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no message 0000000000000 in the queue"),
        "{err}"
    );
    let (code, _, err) = queue(&d, &["show", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a queue ID"), "{err}");

    // Online and offline print the same thing.
    let online = queue(&d, &["list", "--json"]).1;
    let online_summary = queue(&d, &["summary", "--json"]).1;
    let socket = d.data_dir.join("admin.sock");
    assert!(d.terminate().success());
    assert!(!socket.exists(), "a clean stop removes the socket");
    let dd = dir.path().join("data");
    let dd = dd.to_str().unwrap();
    let (code, offline, err) = run_cli(
        &["queue", "list", "--json", "--offline", "--data-dir", dd],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(online, offline);
    let (_, offline_summary, _) = run_cli(
        &["queue", "summary", "--json", "--offline", "--data-dir", dd],
        None,
    );
    assert_eq!(online_summary, offline_summary);

    // No daemon: say so, and how to find out why.
    for args in [vec!["list"], vec!["hold", &a]] {
        let mut args = args;
        args.extend_from_slice(&["--data-dir", dd]);
        let mut all = vec!["queue"];
        all.extend_from_slice(&args);
        let (code, _, err) = run_cli(&all, None);
        assert_eq!(code, 1);
        assert!(
            err.contains(&format!("no daemon at {}", socket.display()))
                && err.contains("systemctl status mta")
                && err.contains("--offline"),
            "{err}"
        );
    }
}

#[test]
fn hold_release_retry_and_delete_write_admin_actions() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let id = submit(
        d.addr,
        "news@x.example",
        &["a@dest.example", "b@dest.example"],
        "steer me",
    );
    let other = submit(d.addr, "news@x.example", &["c@dest.example"], "keep me");
    let (uid, name) = me();

    let (code, out, err) = queue(&d, &["hold", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{id}: held"));
    assert_eq!(queue_json(&d, &["show", &id])["state"], "held");
    assert_eq!(
        ids(&queue_json(&d, &["list", "--state", "held"])),
        [id.as_str()]
    );

    let released = queue_json(&d, &["release", &id]);
    assert_eq!(released["state"], "queued");
    let retried = queue_json(&d, &["retry", &id]);
    assert_eq!(retried["id"], id.as_str());

    let deleted = queue_json(&d, &["delete", &id]);
    assert_eq!(deleted["recipients"][0]["state"], "deleted");
    assert_eq!(deleted["recipients"][1]["state"], "deleted");
    assert_eq!(ids(&queue_json(&d, &["list"])), [other.as_str()]);
    let (code, _, err) = queue(&d, &["show", &id]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("no message {id}")), "{err}");

    // An unknown ID: exit 1, said plainly, and recorded too.
    let (code, _, err) = queue(&d, &["delete", &id]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("no message {id} in the queue")),
        "{err}"
    );
    let (code, _, err) = queue(&d, &["release", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a queue ID"), "{err}");

    let actions = admin_actions(&d);
    let summary: Vec<(&str, &str)> = actions
        .iter()
        .map(|a| (a.action.as_str(), a.result.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("hold", "ok"),
            ("release", "ok"),
            ("retry", "ok"),
            ("delete", "ok"),
            ("delete", format!("no message {id} in the queue").as_str()),
        ]
    );
    for a in &actions {
        assert_eq!(a.queue_id, id);
        assert_eq!(a.uid, Some(uid));
        assert_eq!(a.who, name);
    }
    // The delete is the final record of both pending recipients.
    assert_eq!(actions[3].recipients, ["a@dest.example", "b@dest.example"]);
    assert!(actions[0].recipients.is_empty());
    // The other message was not touched.
    assert_eq!(queue_json(&d, &["show", &other])["state"], "queued");
}

#[test]
fn a_stale_socket_from_a_killed_daemon_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let id = submit(d.addr, "news@x.example", &["a@dest.example"], "kill");
    let socket = d.data_dir.join("admin.sock");
    d.kill9();
    assert!(socket.exists(), "kill -9 leaves the socket behind");
    let dd = dir.path().join("data");
    let (code, _, err) = run_cli(&["queue", "list", "--data-dir", dd.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(err.contains("no daemon at"), "{err}");
    let d = DaemonProcess::start(dir.path(), "");
    assert_eq!(ids(&queue_json(&d, &["list"])), [id]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn a_held_message_is_not_delivered_until_released() {
    // The relay is down at first: the attempt fails and the message is
    // deferred for an hour. Then the relay comes up.
    let port = free_port();
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(
        dir.path(),
        &format!(
            "[delivery]\nrelay_host = \"{relay}\"\nretry_initial = \"1h\"\nretry_max = \"2h\"\nbounces = false\n"
        ),
    );
    let id = submit(d.addr, "news@x.example", &["a@dest.example"], "held");
    eventually("the first attempt to fail", || {
        read_log(&d.data_dir)
            .iter()
            .any(|r| r.kind() == "TransientFailure" && r.queue_id() == Some(id.as_str()))
            .then_some(())
    });
    // The summary groups the deferred recipient by its last reply.
    let summary = queue_json(&d, &["summary"]);
    let reasons = summary["deferred_reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{summary}");
    assert_eq!(reasons[0]["recipients"], 1);
    let reason = reasons[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("4"), "{reason}");
    let (code, out, _) = queue(&d, &["summary"]);
    assert_eq!(code, 0);
    assert!(out.contains("DEFERRED") && out.contains(reason), "{out}");
    let (code, _, err) = queue(&d, &["hold", &id]);
    assert_eq!(code, 0, "{err}");
    let sink = Sink::start(relay, SinkConfig::default());
    // Due now, but held: no attempt.
    let (code, _, err) = queue(&d, &["retry", &id]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(sink.messages().len(), 0, "a held message was delivered");
    assert_eq!(sink.connections(), 0);
    assert_eq!(queue_json(&d, &["show", &id])["state"], "held");

    let (code, _, err) = queue(&d, &["release", &id]);
    assert_eq!(code, 0, "{err}");
    let got = sink.wait_for_messages(1, Duration::from_secs(15));
    assert_eq!(got[0].rcpt_to, ["a@dest.example"]);
    eventually("the Delivery record", || {
        read_log(&d.data_dir)
            .iter()
            .any(|r| r.kind() == "Delivery" && r.queue_id() == Some(id.as_str()))
            .then_some(())
    });
    eventually("the message to leave the queue", || {
        ids(&queue_json(&d, &["list"])).is_empty().then_some(())
    });
}

#[test]
fn the_api_answers_errors_as_json_with_their_status() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let socket = d.data_dir.join("admin.sock");
    let raw = |request: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let v: Value = serde_json::from_str(body).unwrap();
        (status, v["error"].as_str().unwrap_or_default().to_string())
    };
    let (status, e) = raw("GET /v1/messages?state=lost HTTP/1.1\r\n\r\n");
    assert_eq!(status, 400);
    assert!(e.contains("state 'lost' is not one of"), "{e}");
    let (status, e) = raw("GET /v1/messages?colour=red HTTP/1.1\r\n\r\n");
    assert_eq!(
        (status, e.contains("unknown parameter 'colour'")),
        (400, true)
    );
    let (status, e) = raw("GET /v1/summary?by=planet HTTP/1.1\r\n\r\n");
    assert_eq!((status, e.contains("by 'planet'")), (400, true));
    let (status, e) = raw("POST /v1/messages/0000000000000/hold HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    assert!(e.contains("no message 0000000000000"), "{e}");
    let (status, _) = raw("GET /v2/messages HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    let (status, _) = raw("garbage\r\n\r\n");
    assert_eq!(status, 400);

    // The typed client reads what the server writes.
    let client = mta::admin::AdminClient::new(&socket);
    let list: Vec<mta::admin::MessageView> = client
        .call(&mta::admin::Route::List(Default::default()))
        .unwrap();
    assert!(list.is_empty());
    match client.call::<mta::admin::MessageView>(&mta::admin::Route::Show {
        id: "0000000000000".parse().unwrap(),
        body: false,
    }) {
        Err(mta::admin::ClientError::Api { status: 404, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// Runs `mta <args> --config <the daemon's>`.
fn queue_like(d: &DaemonProcess, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--config", d.config_path.to_str().unwrap()]);
    run_cli(&all, None)
}

/// `mta queue <args> --json` that must fail with `code`; its stderr.
fn queue_fails(d: &DaemonProcess, args: &[&str], code: i32) -> String {
    let (got, out, err) = queue(d, args);
    assert_eq!(got, code, "mta queue {args:?}: {out}{err}");
    err
}

fn attempts(d: &DaemonProcess, kind: &str) -> Vec<mta::log::Attempt> {
    read_log(&d.data_dir)
        .into_iter()
        .filter(|r| r.kind() == kind)
        .filter_map(|r| match r {
            Record::Delivery(a) | Record::Bounce(a) => Some(a),
            _ => None,
        })
        .collect()
}

#[test]
fn changes_by_filter_name_what_they_matched_and_refuse_an_empty_selection() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let m1 = submit(d.addr, "news@x.example", &["a@dest.example"], "one");
    let m2 = submit(
        d.addr,
        "news@x.example",
        &["b@dest.example", "c@other.example"],
        "two",
    );
    let m3 = submit(d.addr, "promo@y.example", &["d@other.example"], "three");

    let held = queue_json(&d, &["hold", "--domain", "dest.example"]);
    assert_eq!(held["action"], "hold");
    assert_eq!(held["selector"], "domain=dest.example");
    assert_eq!(held["matched"], 2);
    assert_eq!(strs(&held["changed"]), [m1.clone(), m2.clone()]);
    assert_eq!(
        ids(&queue_json(&d, &["list", "--state", "held"])),
        [m1.clone(), m2.clone()]
    );
    let (code, out, err) = queue(&d, &["release", "--state", "held"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "release: 2 of 2 message(s) matching state=held");
    let retried = queue_json(&d, &["retry", "--sender", "promo@y.example"]);
    assert_eq!(strs(&retried["changed"]), [m3.as_str()]);

    // Nothing named, or an ID and filters both: usage errors, nothing changed.
    let err = queue_fails(&d, &["delete"], 2);
    assert!(err.contains("--all") || err.contains("<ID>"), "{err}");
    queue_fails(&d, &["delete", &m1, "--domain", "dest.example"], 2);
    let err = queue_fails(&d, &["hold", "--older-than", "soon"], 1);
    assert!(err.contains("not a duration"), "{err}");
    assert_eq!(ids(&queue_json(&d, &["list"])).len(), 3);

    let deleted = queue_json(&d, &["delete", "--all"]);
    assert_eq!(deleted["selector"], "all");
    assert_eq!(deleted["matched"], 3);
    assert!(ids(&queue_json(&d, &["list"])).is_empty());

    // One AdminAction per message, each naming the selection.
    let actions: Vec<(String, String, String)> = admin_actions(&d)
        .into_iter()
        .map(|a| {
            assert_eq!(a.result, "ok");
            (a.action, a.queue_id, a.selector.unwrap_or_default())
        })
        .collect();
    let want = |action: &str, id: &str, sel: &str| (action.into(), id.into(), sel.into());
    assert_eq!(
        actions,
        [
            want("hold", &m1, "domain=dest.example"),
            want("hold", &m2, "domain=dest.example"),
            want("release", &m1, "state=held"),
            want("release", &m2, "state=held"),
            want("retry", &m3, "sender=promo@y.example"),
            want("delete", &m1, "all"),
            want("delete", &m2, "all"),
            want("delete", &m3, "all"),
        ]
    );
}

#[test]
fn a_bounce_sends_the_sender_a_dsn_and_ends_each_recipient_with_a_bounce_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let id = submit(
        d.addr,
        "news@x.example",
        &["a@dest.example", "b@dest.example"],
        "bounce me",
    );
    let (_, name) = me();
    let bounced = queue_json(&d, &["bounce", &id]);
    assert_eq!(bounced["recipients"][0]["state"], "bounced");
    assert_eq!(bounced["recipients"][1]["state"], "bounced");

    // The message is gone; in its place the DSN to its sender, from <>.
    let left = queue_json(&d, &["list"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    let dsn_id = left[0]["id"].as_str().unwrap().to_string();
    assert_eq!(left[0]["sender"], "");
    assert_eq!(left[0]["recipients"][0]["address"], "news@x.example");
    let body = queue_json(&d, &["show", &dsn_id, "--body"])["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(body.contains("multipart/report"), "{body}");
    assert!(body.contains("Status: 5.0.0"), "{body}");
    assert!(
        body.contains(&format!(
            "returned to the sender by the postmaster ({name})"
        )),
        "{body}"
    );
    assert!(
        body.contains("Final-Recipient: rfc822; a@dest.example"),
        "{body}"
    );

    let bounces = attempts(&d, "Bounce");
    let got: Vec<(&str, u16, Option<&str>, Option<&str>)> = bounces
        .iter()
        .map(|a| {
            (
                a.recipient.as_str(),
                a.reply.code,
                a.scope.as_deref(),
                a.dsn_queue_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a@dest.example", 550, Some("admin"), Some(dsn_id.as_str())),
            ("b@dest.example", 550, Some("admin"), Some(dsn_id.as_str())),
        ]
    );
    let action = &admin_actions(&d)[0];
    assert_eq!(
        (action.action.as_str(), action.queue_id.as_str()),
        ("bounce", id.as_str())
    );
    assert_eq!(action.recipients, ["a@dest.example", "b@dest.example"]);

    // A bounce of the DSN (null sender) sends no DSN of its own.
    let (code, out, err) = queue(&d, &["bounce", &dsn_id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("{dsn_id}: bounced (1 recipient(s)")),
        "{out}"
    );
    assert!(ids(&queue_json(&d, &["list"])).is_empty());
    let last = attempts(&d, "Bounce").pop().unwrap();
    assert_eq!(
        (last.queue_id.as_str(), last.dsn_queue_id),
        (dsn_id.as_str(), None)
    );
}

#[test]
fn a_suspended_domain_waits_across_a_restart_and_is_delivered_once_resumed() {
    let port = free_port();
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sink = Sink::start(relay, SinkConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[delivery]\nrelay_host = \"{relay}\"\nbounces = false\n");
    let d = DaemonProcess::start(dir.path(), &toml);
    let (uid, name) = me();

    let s = queue_json(
        &d,
        &[
            "suspend",
            "Paused.example",
            "--for",
            "1h",
            "--reason",
            "421 rate limited",
        ],
    );
    assert_eq!(s["domain"], "paused.example");
    assert_eq!(s["who"], name.as_str());
    let until = s["until"].as_str().unwrap().to_string();
    let err = queue_fails(&d, &["suspend", "paused.example", "--for", "soon"], 1);
    assert!(err.contains("--for 'soon' is not a duration"), "{err}");
    queue_fails(&d, &["suspend", "paused.example"], 2);

    // One message to both: the open domain is delivered, the suspended one
    // is postponed to the suspension's end without an attempt.
    let id = submit(
        d.addr,
        "news@x.example",
        &["a@paused.example", "b@open.example"],
        "wait for it",
    );
    let got = sink.wait_for_messages(1, Duration::from_secs(15));
    assert_eq!(got[0].rcpt_to, ["b@open.example"]);
    let shown = eventually("a@paused.example to be postponed", || {
        let v = queue_json(&d, &["show", &id]);
        (v["recipients"][0]["next_attempt"] == until.as_str()).then_some(v)
    });
    assert_eq!(shown["recipients"][0]["state"], "queued");
    assert_eq!(shown["recipients"][0]["attempts"], 0);
    assert_eq!(shown["recipients"][1]["state"], "delivered");
    assert!(
        read_log(&d.data_dir)
            .iter()
            .all(|r| r.kind() != "TransientFailure"),
        "a suspended recipient was attempted"
    );

    // The suspension is on disk: a restart keeps it.
    assert_eq!(d.terminate().code(), Some(0));
    let d = DaemonProcess::start(dir.path(), &toml);
    let list = queue_json(&d, &["suspensions"]);
    assert_eq!(list[0]["domain"], "paused.example");
    assert_eq!(list[0]["until"], until.as_str());
    assert_eq!(list[0]["reason"], "421 rate limited");
    let (code, out, _) = queue(&d, &["suspensions"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("DOMAIN") && out.contains("paused.example"),
        "{out}"
    );

    let resumed = queue_json(&d, &["resume", "paused.example"]);
    assert_eq!(resumed["retried"], 1);
    assert_eq!(resumed["lifted"]["domain"], "paused.example");
    let got = sink.wait_for_messages(2, Duration::from_secs(15));
    assert_eq!(got[1].rcpt_to, ["a@paused.example"]);
    eventually("the message to leave the queue", || {
        ids(&queue_json(&d, &["list"])).is_empty().then_some(())
    });
    let delivered: Vec<String> = eventually("both Delivery records", || {
        let all = attempts(&d, "Delivery");
        (all.len() == 2).then_some(all)
    })
    .into_iter()
    .map(|a| a.recipient)
    .collect();
    assert_eq!(delivered, ["b@open.example", "a@paused.example"]);
    let (code, out, _) = queue(&d, &["resume", "paused.example"]);
    assert_eq!((code, out.trim()), (0, "paused.example: was not suspended"));
    assert_eq!(queue_json(&d, &["suspensions"]), serde_json::json!([]));

    let actions: Vec<(String, String)> = admin_actions(&d)
        .into_iter()
        .map(|a| {
            assert_eq!((a.uid, a.who.as_str()), (Some(uid), name.as_str()));
            (a.action, a.selector.unwrap_or_default())
        })
        .collect();
    assert_eq!(
        actions,
        [
            (
                "suspend".to_string(),
                format!("domain=paused.example until={until}")
            ),
            ("resume".to_string(), "domain=paused.example".to_string()),
            ("resume".to_string(), "domain=paused.example".to_string()),
        ]
    );
}

#[test]
fn the_https_listener_takes_bearer_tokens_from_curl_and_the_cli_and_records_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let token = "q8Vd3LmZx0Rt7Yw2Nc5Kp9Hs4Bf6Ja1Ge";
    let token_file = dir.path().join("ops.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let d = DaemonProcess::start(
        dir.path(),
        &format!(
            "[smtp]\ntls_certificate = \"{}\"\ntls_private_key = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntokens = {{ ops = \"{}\" }}\n",
            cert.display(),
            key.display(),
            token_file.display()
        ),
    );
    let id = submit(d.addr, "news@x.example", &["a@dest.example"], "remote");
    let url = format!("https://localhost:{port}");

    // curl, verifying our certificate: with the token, without, and wrong.
    let curl = |extra: &[&str], path: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--cacert",
                cert.to_str().unwrap(),
                "-w",
                "\n%{http_code}",
            ])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(extra)
            .arg(format!("{url}{path}"))
            .output()
            .expect("curl runs");
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse::<u16>().unwrap(), body.to_string())
    };
    let bearer = format!("Authorization: Bearer {token}");
    let (code, body) = curl(&["-H", &bearer], "/v1/messages");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ids(&v), [id.as_str()]);
    let (code, body) = curl(&[], "/v1/messages");
    assert_eq!(code, 401);
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (code, _) = curl(
        &["-H", "Authorization: Bearer not-the-token"],
        "/v1/messages",
    );
    assert_eq!(code, 401);

    // The CLI over HTTPS, token from a file or the environment.
    let remote = ["--url", &url, "--ca-file", cert.to_str().unwrap()];
    let mut args = vec!["queue", "hold", id.as_str(), "--json"];
    args.extend_from_slice(&remote);
    args.extend_from_slice(&["--token-file", token_file.to_str().unwrap()]);
    let (code, out, err) = run_cli(&args, None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "held"
    );
    let mut args = vec!["queue", "list", "--json"];
    args.extend_from_slice(&remote);
    let out = std::process::Command::new(spec_tests::server::mta_bin())
        .args(&args)
        .env("MTA_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["state"], "held");
    let (code, _, err) = run_cli(&args, None);
    assert_eq!(code, 1);
    assert!(err.contains("MTA_ADMIN_TOKEN"), "{err}");
    let mut bad = vec![
        "queue",
        "list",
        "--url",
        "http://localhost:1",
        "--ca-file",
        "x",
    ];
    bad.extend_from_slice(&["--token-file", token_file.to_str().unwrap()]);
    let (code, _, err) = run_cli(&bad, None);
    assert_eq!(code, 1);
    assert!(err.contains("must start with https://"), "{err}");

    // Every call is on record: who, from where, what, and the result.
    let calls: Vec<(String, String, bool, String)> = all_admin_calls(&d)
        .into_iter()
        .map(|a| {
            let from = a.from.unwrap_or_default();
            assert!(from.starts_with("127.0.0.1:"), "{from}");
            (
                a.action,
                a.who,
                a.result == "ok",
                a.selector.unwrap_or_default(),
            )
        })
        .collect();
    let call = |action: &str, who: &str, ok: bool, sel: &str| {
        (action.to_string(), who.to_string(), ok, sel.to_string())
    };
    assert_eq!(
        calls,
        [
            call("list", "token:ops", true, "all"),
            call("refused", "unauthenticated", false, "GET /v1/messages"),
            call("refused", "unauthenticated", false, "GET /v1/messages"),
            call("hold", "token:ops", true, ""),
            call("list", "token:ops", true, "all"),
            call("quarantine", "token:ops", true, ""),
        ]
    );
    // And on the local socket, reads name the user and `unix`.
    queue_json(&d, &["show", &id, "--body"]);
    let last = all_admin_calls(&d).pop().unwrap();
    assert_eq!(
        (
            last.action.as_str(),
            last.from.as_deref(),
            last.selector.as_deref()
        ),
        ("show", Some("unix"), Some("body=true"))
    );
    assert_eq!(last.who, me().1);

    // A certificate renewed in place and loaded on SIGHUP reaches the
    // HTTPS listener too: curl trusts the new one and refuses the old.
    let old_cert = dir.path().join("old-cert.pem");
    std::fs::copy(&cert, &old_cert).unwrap();
    let renewed = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&cert, renewed.cert.pem()).unwrap();
    std::fs::write(&key, renewed.signing_key.serialize_pem()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    eventually("the reload to be applied", || {
        read_log(&d.data_dir).iter().find_map(|r| match r {
            Record::ConfigReload(c) if c.result == "ok" => Some(()),
            _ => None,
        })
    });
    let (code, body) = curl(&["-H", &bearer], "/v1/messages");
    assert_eq!(code, 200, "with the renewed certificate: {body}");
    let refused = std::process::Command::new("curl")
        .args(["-sS", "--cacert", old_cert.to_str().unwrap()])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", &bearer])
        .arg(format!("{url}/v1/messages"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "curl still trusts the old certificate: the listener kept it"
    );
}

#[test]
fn an_erasure_request_deletes_what_is_queued_for_an_address_and_purges_old_log_days() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let gone = submit(d.addr, "news@x.example", &["Erase.Me@dest.example"], "one");
    let kept = submit(d.addr, "news@x.example", &["keep@dest.example"], "two");
    let deleted = queue_json(&d, &["delete", "--recipient", "erase.me@DEST.example"]);
    assert_eq!(strs(&deleted["changed"]), [gone.as_str()]);
    assert_eq!(deleted["selector"], "recipient=erase.me@DEST.example");
    assert_eq!(ids(&queue_json(&d, &["list"])), [kept.as_str()]);
    let action = admin_actions(&d).pop().unwrap();
    assert_eq!(action.recipients, ["Erase.Me@dest.example"]);

    // The log: every occurrence of the address becomes one keyed hash.
    let before = read_log(&d.data_dir);
    let (code, out, err) = queue_like(
        &d,
        &[
            "log",
            "redact",
            "--recipient",
            "ERASE.me@dest.example",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let token = r["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("redacted:"), "{token}");
    assert!(r["occurrences"].as_u64().unwrap() >= 3, "{r}");
    let after = read_log(&d.data_dir);
    assert_eq!(
        after.len(),
        before.len() + 1,
        "records survive, plus the redact record"
    );
    for f in std::fs::read_dir(d.data_dir.join("log")).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path())
            .unwrap()
            .to_lowercase();
        assert!(!text.contains("erase.me@dest.example"), "{text}");
        assert!(text.contains("keep@dest.example"));
    }
    let reception = after
        .iter()
        .find_map(|r| match r {
            Record::Reception(x) if x.queue_id == gone => Some(x.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(reception.recipients, [token.as_str()]);
    let last = admin_actions(&d).pop().unwrap();
    assert_eq!(last.action, "redact");
    assert_eq!(
        last.selector.as_deref(),
        Some(format!("recipient={token}").as_str())
    );
    // The log goes on after the rewrite.
    let later = submit(d.addr, "news@x.example", &["keep@dest.example"], "three");
    eventually("the next Reception record", || {
        read_log(&d.data_dir)
            .iter()
            .any(|r| r.kind() == "Reception" && r.queue_id() == Some(later.as_str()))
            .then_some(())
    });

    // Old days of the log (named as the daemon names them), and today's.
    let log_dir = d.data_dir.join("log");
    let today = time::OffsetDateTime::now_utc().date();
    let todays = log_dir.join(mta::log::file_name(today));
    assert!(todays.exists());
    let old: Vec<_> = [40, 10]
        .iter()
        .map(|days| {
            let p = log_dir.join(mta::log::file_name(today - time::Duration::days(*days)));
            std::fs::copy(&todays, &p).unwrap();
            p
        })
        .collect();
    let data = d.data_dir.to_str().unwrap();
    let cutoff = (today - time::Duration::days(20)).to_string();
    let (code, out, err) = run_cli(
        &[
            "log",
            "purge",
            "--before",
            &cutoff,
            "--dry-run",
            "--json",
            "--data-dir",
            data,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["files"], serde_json::json!([old[0].to_str().unwrap()]));
    assert!(old[0].exists(), "a dry run removed a file");
    let (code, out, err) = run_cli(
        &[
            "log",
            "purge",
            "--before",
            &today.to_string(),
            "--data-dir",
            data,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 2 file(s)"), "{out}");
    assert!(!old[0].exists() && !old[1].exists() && todays.exists());

    let tomorrow = (today + time::Duration::days(1)).to_string();
    let (code, _, err) = run_cli(
        &["log", "purge", "--before", &tomorrow, "--data-dir", data],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("today's file is still being written"), "{err}");
    let (code, _, err) = run_cli(
        &["log", "purge", "--before", "last week", "--data-dir", data],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("YYYY-MM-DD"), "{err}");
}
