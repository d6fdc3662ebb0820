//! Access records against the real, running program: the Session record
//! of every way a session ends, AuthSuccess and AuthFailure, and
//! `mta audit logins` reading them back (JSON, --user, the table, errors).
//! No password may reach a log file.

use std::collections::BTreeMap;

use mta::log::{Record, SmtpSession};
use serde_json::Value;
use spec_tests::client::{Client, message};
use spec_tests::server::{DaemonProcess, eventually, queued_id, read_log, run_cli, tenants_toml};

fn config() -> String {
    format!(
        "[smtp]\nrelay_networks = []\nauth_failure_delay = \"10ms\"\n{}",
        tenants_toml()
    )
}

/// The Session records of sessions that said EHLO: not those of the
/// start-up probe, which connects and goes away at once.
fn sessions(data_dir: &std::path::Path) -> Vec<SmtpSession> {
    read_log(data_dir)
        .into_iter()
        .filter_map(|r| match r {
            Record::Session(s) if s.session.helo.is_some() => Some(s),
            _ => None,
        })
        .collect()
}

/// `mta audit logins <args> --config <the daemon's>`.
fn audit(d: &DaemonProcess, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["audit", "logins"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", d.config_path.to_str().unwrap()]);
    run_cli(&all, None)
}

fn audit_json(d: &DaemonProcess, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = audit(d, &all);
    assert_eq!(code, 0, "mta audit logins {args:?}: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("JSON: {e}\n{out}"))
        .as_array()
        .expect("a JSON array")
        .clone()
}

#[test]
fn sessions_and_logins_are_recorded_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), &config());

    // 1: STARTTLS, a login, two messages and a refused sender, then QUIT.
    let mut ok = Client::connect(d.addr);
    ok.ehlo();
    ok.starttls();
    ok.cmd("EHLO after-tls.test");
    assert_eq!(ok.auth_plain("acme-app", "s3cret").code, 235);
    // The login is listed while its session is still open.
    let open = eventually("the login listed during its session", || {
        let l = audit_json(&d, &[]);
        (l.len() == 1).then_some(l)
    });
    assert_eq!(open[0]["user"], "acme-app");
    assert_eq!(open[0]["result"], "ok");
    assert_eq!(open[0]["tenant"], "acme");
    assert_eq!(open[0]["mechanism"], "PLAIN");
    assert_eq!(open[0]["peer_ip"], "127.0.0.1");
    assert_eq!(open[0]["tls_version"], "TLSv1.3");
    assert!(
        open[0]["tls_cipher"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );

    let mut ids = Vec::new();
    for subject in ["one", "two"] {
        let from = "news@acme.example";
        let r = ok.send_message(
            from,
            &["r@dest.example"],
            &message(from, "r@dest.example", subject),
        );
        ids.push(queued_id(r.last().unwrap()));
    }
    // Another tenant's domain: refused at MAIL FROM.
    let refused = ok.cmd("MAIL FROM:<x@bank.example>");
    assert!(refused.code >= 500, "{refused}");
    assert_eq!(ok.cmd("QUIT").code, 221);

    // 2: a wrong password, then the client goes away (without TLS
    // close_notify: still "closed", not an error).
    let mut bad = Client::connect(d.addr);
    bad.ehlo();
    bad.starttls();
    bad.ehlo();
    assert_eq!(bad.auth_plain("bank-app", "wrong-pw").code, 535);
    drop(bad);

    // 3: plaintext, an unknown command, QUIT.
    let mut plain = Client::connect(d.addr);
    plain.ehlo();
    let unknown = plain.cmd("FROB");
    assert!(unknown.code >= 500, "{unknown}");
    assert_eq!(plain.cmd("QUIT").code, 221);

    let all = eventually("three Session records", || {
        let s = sessions(&d.data_dir);
        (s.len() == 3).then_some(s)
    });
    let code_key = |r: &spec_tests::client::Reply| match r.enhanced() {
        Some(e) => format!("{} {e}", r.code),
        None => r.code.to_string(),
    };
    let listener = d.addr.to_string();
    let s1 = all.iter().find(|s| s.session.auth_user.is_some()).unwrap();
    assert_eq!(s1.session.auth_user.as_deref(), Some("acme-app"));
    assert_eq!(s1.session.tenant.as_deref(), Some("acme"));
    assert_eq!(s1.session.helo.as_deref(), Some("after-tls.test"));
    assert_eq!(s1.session.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(
        s1.session.tls_cipher.as_deref(),
        open[0]["tls_cipher"].as_str()
    );
    assert_eq!(s1.session.peer_ip, "127.0.0.1");
    assert_eq!(s1.listener, listener);
    assert_eq!(s1.messages_accepted, 2);
    assert_eq!(s1.queue_ids, ids);
    assert_eq!(s1.rejections, 1);
    assert_eq!(s1.rejected, BTreeMap::from([(code_key(&refused), 1)]));
    assert_eq!(s1.auth_failures, 0);
    assert_eq!(s1.outcome, "quit");
    assert!(s1.started <= s1.timestamp && s1.duration_seconds >= 0.0);

    let s2 = all.iter().find(|s| s.auth_failures > 0).unwrap();
    assert_eq!(s2.auth_failures, 1);
    assert_eq!(s2.session.auth_user, None);
    assert_eq!(s2.session.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!((s2.messages_accepted, s2.rejections), (0, 0));
    assert_eq!(s2.outcome, "closed");

    let s3 = all
        .iter()
        .find(|s| s.session.tls_version.is_none())
        .unwrap();
    assert_eq!(s3.session.helo.as_deref(), Some("client.test"));
    assert_eq!(s3.session.tls_cipher, None);
    assert_eq!(s3.messages_accepted, 0);
    assert!(s3.queue_ids.is_empty());
    assert_eq!(s3.rejected, BTreeMap::from([(code_key(&unknown), 1)]));
    assert_eq!(s3.outcome, "quit");

    // The listing: newest first, the failure with the name tried.
    let logins = audit_json(&d, &["--since", "1h"]);
    let seen: Vec<(&str, &str)> = logins
        .iter()
        .map(|l| (l["user"].as_str().unwrap(), l["result"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [("bank-app", "failed"), ("acme-app", "ok")]);
    assert_eq!(logins[0]["reason"], "invalid credentials");
    assert_eq!(logins[0]["tls_version"], "TLSv1.3");
    assert!(logins[0].get("tenant").is_none());

    let bank = audit_json(&d, &["--user", "bank-app"]);
    assert_eq!(bank.len(), 1);
    assert_eq!(bank[0]["user"], "bank-app");
    assert!(audit_json(&d, &["--user", "nobody"]).is_empty());

    let (code, table, err) = audit(&d, &["--user", "acme-app"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "TIME",
            "USER",
            "RESULT",
            "PEER",
            "MECHANISM",
            "TLS",
            "REASON"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[1..3], ["acme-app", "ok"]);
    assert!(row[3].starts_with("127.0.0.1:"), "{table}");
    assert_eq!(row[4], "PLAIN");
    assert_eq!(row[5], "TLSv1.3");
    assert_eq!(row.last(), Some(&"-"));
    // Columns line up: each header starts where its values start.
    assert_eq!(lines[0].find("USER"), lines[1].find("acme-app"));

    let (code, out, _) = audit(&d, &["--user", "nobody"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "no logins of nobody in the last 7days");

    // A session still open when the daemon stops ends with `shutdown`.
    let mut last = Client::connect(d.addr);
    last.ehlo();
    let data_dir = d.data_dir.clone();
    assert!(d.terminate().success());
    let after = sessions(&data_dir);
    assert_eq!(after.len(), 4);
    assert_eq!(after[3].outcome, "shutdown");
    assert_eq!(
        after[3].rejected,
        BTreeMap::from([("421 4.3.2".to_string(), 1)])
    );
    drop(last);

    // No password, nor the AUTH PLAIN token carrying it, in any log file.
    for entry in std::fs::read_dir(data_dir.join("log")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for secret in ["s3cret", "wrong-pw", "AGFjbWUtYXBwAHMzY3JldA"] {
            assert!(!text.contains(secret), "{secret} in a log file");
        }
    }
}

#[test]
fn bad_arguments_say_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(&["audit", "logins", "--since", "soon"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("write it like 7d, 24h or 90m"), "{err}");

    let missing = dir.path().join("nothing-here");
    let (code, _, err) = run_cli(
        &["audit", "logins", "--data-dir", missing.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no transaction log at") && err.contains("pass --data-dir (or --config)"),
        "{err}"
    );
}
