//! SPF alignment of our egress IPs (RFC 7208) end to end: `[spf] policy`
//! at MAIL FROM (RFC 7372 codes), the Reception record, change records,
//! metrics, egress preference, and `mta spf check`, over a real DNS server
//! on loopback whose records the tests edit.

use std::time::Duration;

use mta::log::Record;
use spec_tests::client::{Client, message};
use spec_tests::dns::DnsServer;
use spec_tests::server::{TestServer, metric, queued_id, run_cli};
use spec_tests::sink::{Sink, SinkConfig};

/// acme.example's zone with this SPF record, cacheable for one second so
/// a test can change it.
fn acme_zone(spf: &str) -> String {
    format!("@ 1 IN TXT \"{spf}\"\n")
}

fn config(dns: &DnsServer, policy: &str, extra: &str) -> String {
    format!(
        "[dns]\nnameservers = [\"{}\"]\n[spf]\npolicy = \"{policy}\"\n[[egress]]\naddress = \"127.0.0.9\"\nehlo = \"out9.test\"\n[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\n{extra}",
        dns.addr
    )
}

fn mail_from(server: &TestServer, sender: &str) -> spec_tests::client::Reply {
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.cmd(&format!("MAIL FROM:<{sender}>"))
}

fn spf_changes(server: &TestServer, domain: &str) -> Vec<mta::log::SpfChange> {
    server
        .records()
        .into_iter()
        .filter_map(|r| match r {
            Record::SpfChange(c) if c.domain == domain => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn enforce_refuses_a_sender_whose_spf_omits_our_ip_until_it_is_fixed() {
    // RFC 7372 §3.2: 5.7.23 for an SPF failure; a fixed record passes after
    // the check runs again (SIGHUP does the same).
    let mut dns = DnsServer::start(&[("acme.example", &acme_zone("v=spf1 ip4:192.0.2.1 -all"))]);
    let server = TestServer::start(&config(&dns, "enforce", ""));
    let r = mail_from(&server, "news@acme.example");
    assert_eq!((r.code, r.enhanced()), (550, Some("5.7.23")), "{r}");
    assert!(r.text().contains("add ip4:127.0.0.9"), "{r}");
    let rej = server.rejection("the MAIL rejection", |r| r.command == "MAIL");
    assert_eq!(rej.reply.enhanced_code.as_deref(), Some("5.7.23"));
    assert_eq!(rej.sender.as_deref(), Some("news@acme.example"));
    let first = server.wait_for("the first SpfChange record", |_| {
        spf_changes(&server, "acme.example").into_iter().next()
    });
    assert_eq!(
        (first.ip.as_str(), first.result.as_str()),
        ("127.0.0.9", "fail")
    );
    assert_eq!(first.matched.as_deref(), Some("-all"));
    assert_eq!(first.fix.as_deref(), Some("ip4:127.0.0.9"));
    let text = server.scrape();
    assert_eq!(
        metric(
            &text,
            "mta_spf_pair_result{domain=\"acme.example\",ip=\"127.0.0.9\",result=\"fail\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // The customer adds our IP; once the old answer's TTL is over, the
    // check runs again and the sender passes.
    dns.replace(&[(
        "acme.example",
        &acme_zone("v=spf1 ip4:192.0.2.1 ip4:127.0.0.9 -all"),
    )]);
    std::thread::sleep(Duration::from_millis(1200));
    server.block_on(server.daemon().refresh_spf());
    let last = server.wait_for("the change to pass", |_| {
        spf_changes(&server, "acme.example")
            .into_iter()
            .find(|c| c.result == "pass")
    });
    assert_eq!(last.previous.as_deref(), Some("fail"));
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let replies = c.send_message(
        "news@acme.example",
        &["a@dest.example"],
        &message("news@acme.example", "a@dest.example", "spf passes"),
    );
    let id = queued_id(replies.last().unwrap());
    let rec = server.reception(&id);
    let spf = rec.spf.expect("the Reception record carries SPF");
    assert_eq!(
        (spf.domain.as_str(), spf.ip.as_deref(), spf.result.as_str()),
        ("acme.example", Some("127.0.0.9"), "pass")
    );
}

#[test]
fn enforce_defers_when_spf_cannot_be_checked_and_refuses_broken_records() {
    // RFC 7372: 4.7.24 for a temporary SPF error, 5.7.24 for a permanent one.
    let dns = DnsServer::start(&[(
        "broken.example",
        "@ 1 IN TXT \"v=spf1 ip4:300.1.2.3 -all\"\n",
    )]);
    let server = TestServer::start(&config(
        &dns,
        "enforce",
        "[[tenants]]\nname = \"other\"\nsender_domains = [\"unserved.example\", \"broken.example\"]\n",
    ));
    // No zone for unserved.example: the server refuses, a temperror.
    let r = mail_from(&server, "news@unserved.example");
    assert_eq!((r.code, r.enhanced()), (451, Some("4.7.24")), "{r}");
    let r = mail_from(&server, "news@broken.example");
    assert_eq!((r.code, r.enhanced()), (550, Some("5.7.24")), "{r}");
    // The null sender is not checked.
    assert_eq!(mail_from(&server, "").code, 250);
}

#[test]
fn warn_accepts_and_records_the_result() {
    let dns = DnsServer::start(&[("acme.example", &acme_zone("v=spf1 -all"))]);
    let server = TestServer::start(&config(&dns, "warn", ""));
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let replies = c.send_message(
        "news@acme.example",
        &["a@dest.example"],
        &message("news@acme.example", "a@dest.example", "warn"),
    );
    let id = queued_id(replies.last().unwrap());
    let spf = server.reception(&id).spf.unwrap();
    assert_eq!(spf.result, "fail");
    assert_eq!(
        metric(&server.scrape(), "mta_spf_messages_total{result=\"fail\"}"),
        Some(1.0)
    );
}

#[test]
fn delivery_prefers_the_egress_ip_that_spf_authorises() {
    // Of two sources, only 127.0.0.10 is in acme.example's record: its
    // mail leaves from there, with that source's EHLO name.
    let sink = Sink::start("127.0.0.2:0".parse().unwrap(), SinkConfig::default());
    let dns = DnsServer::start(&[("acme.example", &acme_zone("v=spf1 ip4:127.0.0.10 -all"))]);
    let server = TestServer::start(&config(
        &dns,
        "warn",
        &format!(
            "[[egress]]\naddress = \"127.0.0.10\"\nehlo = \"out10.test\"\n[delivery]\nrelay_host = \"{}\"\nmessages_per_connection = 1\n",
            sink.addr
        ),
    ));
    server.wait_for("both pairs evaluated", |_| {
        (spf_changes(&server, "acme.example").len() == 2).then_some(())
    });
    for i in 0..4 {
        let mut c = Client::connect(server.addr);
        c.ehlo();
        let replies = c.send_message(
            "news@acme.example",
            &[&format!("r{i}@dest.example")],
            &message("news@acme.example", "r@dest.example", "egress"),
        );
        queued_id(replies.last().unwrap());
    }
    let got = sink.wait_for_messages(4, Duration::from_secs(15));
    for m in &got {
        assert_eq!(m.peer.ip().to_string(), "127.0.0.10");
        assert_eq!(m.helo, "out10.test");
    }
}

#[test]
fn spf_check_lists_every_pair_with_what_to_fix() {
    let dns = DnsServer::start(&[
        ("acme.example", &acme_zone("v=spf1 ip4:127.0.0.9 -all")),
        (
            "bank.example",
            &acme_zone("v=spf1 include:_spf.bank.example ~all"),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mta.toml");
    std::fs::write(
        &path,
        config(
            &dns,
            "enforce",
            "[[tenants]]\nname = \"bank\"\nsender_domains = [\"bank.example\"]\n",
        ),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, out, err) = run_cli(&["spf", "check", "--config", p], None);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("DOMAIN"), "{out}");
    let acme = lines
        .iter()
        .find(|l| l.starts_with("acme.example"))
        .unwrap();
    assert!(
        acme.contains("127.0.0.9") && acme.contains("pass") && acme.contains("ip4:127.0.0.9"),
        "{acme}"
    );
    let bank = lines
        .iter()
        .find(|l| l.starts_with("bank.example"))
        .unwrap();
    assert!(
        bank.contains("permerror") && bank.contains("include:_spf.bank.example"),
        "{bank}"
    );
    let (code, out, _) = run_cli(
        &[
            "spf",
            "check",
            "--config",
            p,
            "--domain",
            "acme.example",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["result"], "pass");
    assert_eq!(v[0]["dns_lookups"], 0);
    assert_eq!(v[0]["matched"]["directive"], "ip4:127.0.0.9");
    let (code, out, _) = run_cli(
        &[
            "spf",
            "check",
            "--config",
            p,
            "--domain",
            "acme.example",
            "--ip",
            "127.0.0.77",
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(out.contains("add ip4:127.0.0.77"), "{out}");
}

/// acme.example passes SPF for 127.0.0.9 and publishes p=reject;
/// other.example (also acme's) publishes p=reject and no SPF.
fn dmarc_zones() -> Vec<(&'static str, String)> {
    vec![
        (
            "acme.example",
            "@ 1 IN TXT \"v=spf1 ip4:127.0.0.9 -all\"\n_dmarc IN TXT \"v=DMARC1; p=reject; aspf=r\"\n"
                .to_string(),
        ),
        (
            "other.example",
            "_dmarc IN TXT \"v=DMARC1; p=reject\"\n".to_string(),
        ),
    ]
}

/// The DNS of [`dmarc_zones`] and the MTA under `policy`, with tenant acme
/// owning both domains.
fn dmarc_server(policy: &str) -> (DnsServer, TestServer) {
    let zones = dmarc_zones();
    let zones: Vec<(&str, &str)> = zones.iter().map(|(o, z)| (*o, z.as_str())).collect();
    let dns = DnsServer::start(&zones);
    let server = TestServer::start(&config(&dns, policy, "").replace(
        "[\"acme.example\"]",
        "[\"acme.example\", \"other.example\"]",
    ));
    (dns, server)
}

fn send(server: &TestServer, mail_from: &str, from_header: &str) -> spec_tests::client::Reply {
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let replies = c.send_message(
        mail_from,
        &["a@dest.example"],
        &message(from_header, "a@dest.example", "dmarc"),
    );
    replies.last().unwrap().clone()
}

#[test]
fn enforce_refuses_what_would_fail_dmarc_at_a_reject_domain() {
    // RFC 7489 §3.1, §6.3: SPF-aligned mail passes; a From: domain that
    // neither our signature nor SPF aligns with, at p=reject, is refused.
    let (_dns, server) = dmarc_server("enforce");
    let ok = send(&server, "news@acme.example", "news@acme.example");
    let rec = server.reception(&queued_id(&ok));
    let d = rec.dmarc.expect("a DMARC note");
    assert_eq!(
        (
            d.result.as_str(),
            d.policy.as_deref(),
            d.spf_aligned,
            d.dkim_aligned
        ),
        ("pass", Some("reject"), true, false)
    );
    let refused = send(&server, "news@acme.example", "news@other.example");
    assert_eq!(
        (refused.code, refused.enhanced()),
        (550, Some("5.7.1")),
        "{refused}"
    );
    assert!(refused.text().contains("DMARC"), "{refused}");
    let rej = server.rejection("the DATA rejection", |r| r.command == "DATA");
    assert!(rej.reply.text.contains("other.example"), "{rej:?}");
}

#[test]
fn warn_records_dmarc_outcomes_and_counts_them() {
    let (_dns, server) = dmarc_server("warn");
    let r = send(&server, "news@acme.example", "news@other.example");
    let d = server.reception(&queued_id(&r)).dmarc.unwrap();
    assert_eq!(
        (d.result.as_str(), d.from_domain.as_str()),
        ("fail", "other.example")
    );
    assert_eq!(
        metric(
            &server.scrape(),
            "mta_dmarc_messages_total{outcome=\"fail\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn sighup_checks_spf_again_in_the_running_daemon() {
    // The end-to-end case with the real program: refused while the
    // record omits our IP; the customer adds it; SIGHUP; it passes.
    let mut dns = DnsServer::start(&[("acme.example", &acme_zone("v=spf1 ip4:192.0.2.1 -all"))]);
    let dir = tempfile::tempdir().unwrap();
    let d = spec_tests::server::DaemonProcess::start(dir.path(), &config(&dns, "enforce", ""));
    let mail = |d: &spec_tests::server::DaemonProcess| {
        let mut c = Client::connect(d.addr);
        c.ehlo();
        c.cmd("MAIL FROM:<news@acme.example>")
    };
    assert_eq!(mail(&d).code, 550);
    dns.replace(&[("acme.example", &acme_zone("v=spf1 ip4:127.0.0.9 -all"))]);
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    spec_tests::server::eventually("a pass after SIGHUP", || {
        spec_tests::server::read_log(&d.data_dir)
            .into_iter()
            .any(|r| matches!(r, Record::SpfChange(c) if c.result == "pass"))
            .then_some(())
    });
    let r = mail(&d);
    assert_eq!(r.code, 250, "{r}\n{}", d.stderr());
}
