//! Delivery against real receiving servers on loopback: MX routing through a
//! real DNS server (RFC 5321 §5.1, RFC 7505), opportunistic and required
//! STARTTLS (RFC 3207, RFC 7435), per-recipient replies, retries, expiry,
//! DSNs (RFC 3464), connection reuse, and remote faults. Every assertion
//! reads the transaction log or the queue.
//!
//! MX hosts are sinks on 127.0.0.2, 127.0.0.3, … all on one port (the
//! `[delivery] port` of the test), named in the test zones.

use std::net::SocketAddr;
use std::time::Duration;

use mta::log::{Attempt, Record};
use spec_tests::client::{Client, message};
use spec_tests::dns::DnsServer;
use spec_tests::server::{TestServer, queued_id};
use spec_tests::sink::{Sink, SinkConfig};

const WAIT: Duration = Duration::from_secs(15);

/// Sinks on 127.0.0.(2+i), all on one port; `None` leaves an address
/// without a listener (connection refused).
fn sinks(configs: Vec<Option<SinkConfig>>) -> (u16, Vec<Option<Sink>>) {
    'port: for _ in 0..20 {
        let port = std::net::TcpListener::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut out = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let addr: SocketAddr = format!("127.0.0.{}:{port}", 2 + i).parse().unwrap();
            match c {
                None => out.push(None),
                Some(c) => match Sink::try_start(addr, c.clone()) {
                    Ok(s) => out.push(Some(s)),
                    Err(_) => continue 'port,
                },
            }
        }
        return (port, out);
    }
    panic!("no port free on every sink address");
}

fn tls_sink() -> SinkConfig {
    SinkConfig {
        starttls: true,
        ..Default::default()
    }
}

/// The MTA, delivering through `dns` to `port`, with `extra` config.
fn mta(dns: &DnsServer, port: u16, extra: &str) -> TestServer {
    let retry_max = if extra.contains("retry_max") {
        ""
    } else {
        "retry_max = \"2s\"\n"
    };
    TestServer::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[delivery]\nport = {port}\nretry_initial = \"1s\"\n{retry_max}{extra}",
        dns.addr
    ))
}

/// Submits one message (relayed from loopback without AUTH); its queue ID.
fn submit(server: &TestServer, from: &str, rcpts: &[&str], content: &str) -> String {
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let replies = c.send_message(from, rcpts, content);
    queued_id(replies.last().expect("a final reply"))
}

/// The delivery records of a message, once `n` of them are there.
fn attempts(server: &TestServer, id: &str, n: usize) -> Vec<(String, Attempt)> {
    server.wait_for(&format!("{n} delivery records of {id}"), |rs| {
        let found: Vec<(String, Attempt)> = rs
            .iter()
            .filter_map(|r| {
                r.attempt()
                    .filter(|a| a.queue_id == id)
                    .map(|a| (r.kind().to_string(), a.clone()))
            })
            .collect();
        (found.len() >= n).then_some(found)
    })
}

fn first(server: &TestServer, id: &str, kind: &str, rcpt: &str) -> Attempt {
    server.wait_for(&format!("a {kind} record for {rcpt} of {id}"), |rs| {
        rs.iter().find_map(|r| {
            r.attempt()
                .filter(|a| r.kind() == kind && a.queue_id == id && a.recipient == rcpt)
                .cloned()
        })
    })
}

/// Zone lines giving the origin one MX host, `mx.<origin>`, at `ip`.
fn one_mx(ip: &str) -> String {
    format!("@ IN MX 10 mx\nmx IN A {ip}\n")
}

#[test]
fn delivers_over_starttls_to_the_mx_and_logs_the_session() {
    // RFC 5321 §5.1 (MX), RFC 3207 (STARTTLS), RFC 7435 (any certificate).
    let (port, s) = sinks(vec![Some(tls_sink())]);
    let dns = DnsServer::start(&[("dest.test", &one_mx("127.0.0.2"))]);
    let server = mta(&dns, port, "");
    let body = message("news@sender.test", "a@dest.test", "over TLS");
    let id = submit(&server, "news@sender.test", &["a@dest.test"], &body);
    let d = first(&server, &id, "Delivery", "a@dest.test");
    assert_eq!(d.mx_host.as_deref(), Some("mx.dest.test"));
    assert_eq!(d.mx_ip.as_deref(), Some("127.0.0.2"));
    assert_eq!(d.egress_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(d.tls.as_deref(), Some("tls"));
    assert_eq!(d.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(d.tls_verified, Some(false), "a self-signed certificate");
    assert!(d.tls_verify_error.is_some());
    assert_eq!((d.reply.code, d.attempt), (250, 1));
    assert!(d.scope.is_none());
    let got = s[0].as_ref().unwrap().wait_for_messages(1, WAIT);
    assert!(got[0].tls);
    assert_eq!(got[0].mail_from, "news@sender.test");
    assert_eq!(got[0].rcpt_to, ["a@dest.test"]);
    assert_eq!(got[0].helo, "mx.test");
    // What was sent is what was stored, and the store lets go of it.
    let text = String::from_utf8(got[0].data.clone()).unwrap();
    assert!(text.ends_with("Hello from the tests.\r\n"), "{text:?}");
    assert!(text.starts_with("Received: "), "{text:?}");
    spec_tests::server::eventually("the delivered message to leave the queue", || {
        server.queue().is_empty().then_some(())
    });
}

#[test]
fn every_recipient_gets_its_own_outcome_and_the_sender_a_dsn() {
    // RFC 5321 §3.3: one refused RCPT does not fail the others; RFC 3464 DSN.
    let (port, s) = sinks(vec![
        Some(SinkConfig::default()),
        Some(SinkConfig::default()),
    ]);
    let dns = DnsServer::start(&[
        ("dest.test", &one_mx("127.0.0.2")),
        ("sender.test", &one_mx("127.0.0.3")),
    ]);
    let server = mta(&dns, port, "");
    let rcpts = ["ok@dest.test", "reject-me@dest.test", "defer-me@dest.test"];
    let id = submit(
        &server,
        "news@sender.test",
        &rcpts,
        &message("news@sender.test", "ok@dest.test", "mixed"),
    );
    let ok = first(&server, &id, "Delivery", "ok@dest.test");
    assert_eq!(ok.reply.code, 250);
    let bounced = first(&server, &id, "Bounce", "reject-me@dest.test");
    assert_eq!(
        (bounced.reply.code, bounced.reply.enhanced_code.as_deref()),
        (550, Some("5.1.1"))
    );
    assert_eq!(bounced.scope.as_deref(), Some("recipient"));
    let dsn_id = bounced.dsn_queue_id.clone().expect("a DSN was queued");
    let deferred = first(&server, &id, "TransientFailure", "defer-me@dest.test");
    assert_eq!(deferred.reply.code, 451);
    assert!(deferred.next_attempt.is_some());
    // The deferred recipient is still queued, and tried again.
    let again = server.wait_for("a second attempt for defer-me", |rs| {
        rs.iter().find_map(|r| {
            r.attempt()
                .filter(|a| {
                    a.queue_id == id && a.recipient == "defer-me@dest.test" && a.attempt == 2
                })
                .cloned()
        })
    });
    assert_eq!(again.reply.code, 451);
    // The DSN reached the sender's MX: from <>, a multipart/report naming
    // the refused recipient and not the others.
    let dsn = first(&server, &dsn_id, "Delivery", "news@sender.test");
    assert_eq!(dsn.sender, "");
    let got = s[1].as_ref().unwrap().wait_for_messages(1, WAIT);
    assert_eq!(got[0].mail_from, "");
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(
        text.contains("multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; reject-me@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(
        !text.contains("Final-Recipient: rfc822; ok@dest.test"),
        "{text}"
    );
    assert!(
        !text.contains("Hello from the tests."),
        "the body is not returned"
    );
}

#[test]
fn null_mx_and_nxdomain_bounce_at_once_and_a_refusing_dns_defers() {
    // RFC 7505 §3 (null MX → 5.1.10); NXDOMAIN is permanent; a server that
    // refuses to answer is temporary.
    let dns = DnsServer::start(&[
        ("nullmx.test", "@ IN MX 0 .\n"),
        ("dest.test", "other IN A 127.0.0.2\n"),
    ]);
    let server = mta(&dns, 2, "bounces = false\n");
    let id = submit(
        &server,
        "news@sender.test",
        &["a@nullmx.test", "b@nowhere.dest.test", "c@unserved.example"],
        &message("news@sender.test", "a@nullmx.test", "no route"),
    );
    let null = first(&server, &id, "Bounce", "a@nullmx.test");
    assert_eq!(
        (null.reply.code, null.reply.enhanced_code.as_deref()),
        (556, Some("5.1.10"))
    );
    assert_eq!(null.scope.as_deref(), Some("destination"));
    let nx = first(&server, &id, "Bounce", "b@nowhere.dest.test");
    assert_eq!(nx.reply.enhanced_code.as_deref(), Some("5.1.2"));
    assert!(nx.dsn_queue_id.is_none(), "bounces = false sends no DSN");
    let refused = first(&server, &id, "TransientFailure", "c@unserved.example");
    assert_eq!(refused.reply.enhanced_code.as_deref(), Some("4.4.3"));
}

#[test]
fn without_mx_the_domain_itself_is_the_host_and_refused_mx_hosts_are_skipped() {
    // RFC 5321 §5.1: no MX means the A record; the next MX after a refusal.
    let (port, s) = sinks(vec![
        Some(SinkConfig::default()),
        None,
        Some(SinkConfig::default()),
    ]);
    let dns = DnsServer::start(&[
        ("plain.test", "@ IN A 127.0.0.2\n"),
        (
            "two.test",
            "@ IN MX 10 down.two.test.\n@ IN MX 20 up.two.test.\ndown IN A 127.0.0.3\nup IN A 127.0.0.4\n",
        ),
    ]);
    let server = mta(&dns, port, "");
    let id = submit(
        &server,
        "news@sender.test",
        &["a@plain.test", "b@two.test"],
        &message("news@sender.test", "a@plain.test", "routes"),
    );
    let a = first(&server, &id, "Delivery", "a@plain.test");
    assert_eq!(a.mx_host.as_deref(), Some("plain.test"));
    let b = first(&server, &id, "Delivery", "b@two.test");
    assert_eq!(b.mx_host.as_deref(), Some("up.two.test"));
    assert_eq!(b.tls.as_deref(), Some("plaintext-not-offered"));
    assert_eq!(
        s[0].as_ref().unwrap().wait_for_messages(1, WAIT)[0].rcpt_to,
        ["a@plain.test"]
    );
    assert_eq!(
        s[2].as_ref().unwrap().wait_for_messages(1, WAIT)[0].rcpt_to,
        ["b@two.test"]
    );
}

#[test]
fn failed_handshakes_defer_then_fall_back_to_plaintext() {
    // RFC 7435 §3: opportunistic TLS must not stop mail for good.
    let (port, s) = sinks(vec![Some(SinkConfig {
        break_handshake: true,
        ..Default::default()
    })]);
    let dns = DnsServer::start(&[("dest.test", &one_mx("127.0.0.2"))]);
    let server = mta(&dns, port, "tls_fallback_after = 2\nretry_max = \"1s\"\n");
    let id = submit(
        &server,
        "news@sender.test",
        &["a@dest.test"],
        &message("news@sender.test", "a@dest.test", "tls fallback"),
    );
    let failed = first(&server, &id, "TransientFailure", "a@dest.test");
    assert_eq!(failed.reply.enhanced_code.as_deref(), Some("4.7.5"));
    assert_eq!(failed.scope.as_deref(), Some("host"));
    let d = first(&server, &id, "Delivery", "a@dest.test");
    assert_eq!(d.tls.as_deref(), Some("plaintext-after-failed-handshakes"));
    assert_eq!(d.attempt, 3);
    assert!(!s[0].as_ref().unwrap().wait_for_messages(1, WAIT)[0].tls);
}

#[test]
fn required_tls_defers_a_destination_without_starttls() {
    // [delivery.domains."<d>"] tls = "required": never in plaintext.
    let (port, s) = sinks(vec![Some(SinkConfig::default()), Some(tls_sink())]);
    let dns = DnsServer::start(&[
        ("plain.test", &one_mx("127.0.0.2")),
        ("secure.test", &one_mx("127.0.0.3")),
    ]);
    let server = mta(
        &dns,
        port,
        "[delivery.domains.\"plain.test\"]\ntls = \"required\"\n[delivery.domains.\"secure.test\"]\ntls = \"required\"\n",
    );
    let id = submit(
        &server,
        "news@sender.test",
        &["a@plain.test", "b@secure.test"],
        &message("news@sender.test", "a@plain.test", "required"),
    );
    let refused = first(&server, &id, "TransientFailure", "a@plain.test");
    assert_eq!(refused.reply.enhanced_code.as_deref(), Some("4.7.10"));
    let ok = first(&server, &id, "Delivery", "b@secure.test");
    assert_eq!(ok.tls.as_deref(), Some("tls"));
    assert!(s[0].as_ref().unwrap().messages().is_empty());
}

#[test]
fn messages_share_connections_up_to_the_limit() {
    // Connection reuse with RSET between messages; messages_per_connection.
    let (port, s) = sinks(vec![Some(SinkConfig::default())]);
    let dns = DnsServer::start(&[("dest.test", &one_mx("127.0.0.2"))]);
    let server = mta(
        &dns,
        port,
        "messages_per_connection = 3\nmax_connections_per_destination = 1\n",
    );
    let ids: Vec<String> = (0..6)
        .map(|i| {
            submit(
                &server,
                "news@sender.test",
                &[&format!("r{i}@dest.test")],
                &message("news@sender.test", "r@dest.test", "reuse"),
            )
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        first(&server, id, "Delivery", &format!("r{i}@dest.test"));
    }
    let sink = s[0].as_ref().unwrap();
    let got = sink.wait_for_messages(6, WAIT);
    let conns: std::collections::BTreeSet<u64> = got.iter().map(|m| m.connection).collect();
    assert!(
        conns.len() >= 2 && conns.len() < 6,
        "connections used: {conns:?}"
    );
    let mut per: std::collections::BTreeMap<u64, usize> = Default::default();
    got.iter()
        .for_each(|m| *per.entry(m.connection).or_default() += 1);
    assert!(per.values().all(|&n| n <= 3), "{per:?}");
}

#[test]
fn a_421_on_a_reused_connection_is_retried_on_a_fresh_one() {
    // RFC 5321 §3.8: 421 closes the session; nothing was refused for good.
    let (port, s) = sinks(vec![Some(SinkConfig {
        close_after_messages: Some(1),
        ..Default::default()
    })]);
    let dns = DnsServer::start(&[("dest.test", &one_mx("127.0.0.2"))]);
    let server = mta(&dns, port, "max_connections_per_destination = 1\n");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            submit(
                &server,
                "news@sender.test",
                &[&format!("r{i}@dest.test")],
                &message("news@sender.test", "r@dest.test", "421"),
            )
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let d = first(&server, id, "Delivery", &format!("r{i}@dest.test"));
        assert_eq!(
            d.attempt, 1,
            "retried on a new connection within the attempt"
        );
    }
    assert!(s[0].as_ref().unwrap().connections() >= 2);
}

#[test]
fn remote_faults_end_in_retries_with_their_scope() {
    // A greeting slower than the timeout, and a connection dropped in DATA.
    let (port, _s) = sinks(vec![
        Some(SinkConfig {
            greeting_delay: Duration::from_secs(5),
            ..Default::default()
        }),
        Some(SinkConfig {
            drop_in_data: true,
            ..Default::default()
        }),
    ]);
    let dns = DnsServer::start(&[
        ("slow.test", &one_mx("127.0.0.2")),
        ("drop.test", &one_mx("127.0.0.3")),
    ]);
    let server = mta(
        &dns,
        port,
        "command_timeout = \"1s\"\ndata_timeout = \"2s\"\n",
    );
    let id = submit(
        &server,
        "news@sender.test",
        &["a@slow.test", "b@drop.test"],
        &message("news@sender.test", "a@slow.test", "faults"),
    );
    let slow = first(&server, &id, "TransientFailure", "a@slow.test");
    assert_eq!(slow.scope.as_deref(), Some("host"));
    assert_eq!(slow.reply.enhanced_code.as_deref(), Some("4.4.2"));
    let dropped = first(&server, &id, "TransientFailure", "b@drop.test");
    assert_eq!(dropped.scope.as_deref(), Some("session"));
    assert_eq!(dropped.mx_host.as_deref(), Some("mx.drop.test"));
}

#[test]
fn undeliverable_mail_expires_with_a_dsn() {
    // RFC 5321 §4.5.4.1: give up after the lifetime; RFC 3464 tells the sender.
    let (port, s) = sinks(vec![
        Some(SinkConfig::default()),
        Some(SinkConfig::default()),
    ]);
    let dns = DnsServer::start(&[
        ("dest.test", &one_mx("127.0.0.2")),
        ("sender.test", &one_mx("127.0.0.3")),
    ]);
    let server = mta(&dns, port, "max_lifetime = \"2s\"\nretry_max = \"1s\"\n");
    let id = submit(
        &server,
        "news@sender.test",
        &["defer-forever@dest.test"],
        &message("news@sender.test", "defer-forever@dest.test", "expiry"),
    );
    let exp = first(&server, &id, "Expiration", "defer-forever@dest.test");
    assert!(exp.attempt >= 2, "{exp:?}");
    assert!(exp.delay_seconds >= 2.0, "{exp:?}");
    let dsn_id = exp.dsn_queue_id.expect("a DSN");
    first(&server, &dsn_id, "Delivery", "news@sender.test");
    let got = s[1].as_ref().unwrap().wait_for_messages(1, WAIT);
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(text.contains("Action: failed"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; defer-forever@dest.test"),
        "{text}"
    );
    // Every recipient ended with exactly one final record.
    let finals = attempts(&server, &id, 2)
        .into_iter()
        .filter(|(k, _)| k != "TransientFailure")
        .count();
    assert_eq!(finals, 1);
    spec_tests::server::eventually("the expired message to leave the queue", || {
        server
            .queue()
            .get(id.parse().unwrap())
            .is_err()
            .then_some(())
    });
}

#[test]
fn the_relay_host_takes_everything_from_our_egress_address() {
    // [delivery] relay_host and [[egress]]: source address and EHLO name.
    let sink = Sink::start("127.0.0.2:0".parse().unwrap(), SinkConfig::default());
    let dns = DnsServer::start(&[]);
    let server = TestServer::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[[egress]]\naddress = \"127.0.0.9\"\nehlo = \"out9.test\"\n[delivery]\nrelay_host = \"{}\"\n",
        dns.addr, sink.addr
    ));
    let id = submit(
        &server,
        "news@sender.test",
        &["a@one.example", "b@two.example"],
        &message("news@sender.test", "a@one.example", "relay"),
    );
    let d = first(&server, &id, "Delivery", "b@two.example");
    assert_eq!(d.egress_ip.as_deref(), Some("127.0.0.9"));
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(
        got[0].rcpt_to,
        ["a@one.example", "b@two.example"],
        "one transaction"
    );
    assert_eq!(got[0].helo, "out9.test");
    assert_eq!(got[0].peer.ip().to_string(), "127.0.0.9");
    assert!(matches!(server.records().last(), Some(Record::Delivery(_))));
}

/// An independent receiving MX: Python's aiosmtpd, with STARTTLS or
/// without, refusing recipients whose name starts with `reject` (550) or
/// `defer` (451), writing each message it accepts to a JSON file
/// (installed by the test command).
const AIOSMTPD: &str = r#"
import asyncio, json, os, ssl, sys
from aiosmtpd.controller import Controller
out, port, cert, key, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "tls"
class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 no such user"
        if address.startswith("defer"):
            return "451 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"
    async def handle_DATA(self, server, session, envelope):
        n = len([f for f in os.listdir(out) if f.endswith(".json")])
        rec = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
               "tls": session.ssl is not None,
               "data": envelope.original_content.decode("utf-8", "replace")}
        tmp = os.path.join(out, ".%d.tmp" % n)
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.rename(tmp, os.path.join(out, "%d.json" % n))
        return "250 2.0.0 OK: queued"
ctx = None
if tls:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
c = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=ctx, ready_timeout=10)
c.start()
print("ready", flush=True)
sys.stdin.read()
c.stop()
"#;

/// aiosmtpd running until dropped.
struct Aiosmtpd {
    child: std::process::Child,
    out: tempfile::TempDir,
    port: u16,
}

impl Aiosmtpd {
    fn start() -> Aiosmtpd {
        Self::start_with(true)
    }

    /// `tls`: offer STARTTLS.
    fn start_with(tls: bool) -> Aiosmtpd {
        use std::io::BufRead;
        let out = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (c, k) = (out.path().join("cert.pem"), out.path().join("key.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        let port = spec_tests::server::free_port();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(AIOSMTPD)
            .arg(out.path())
            .arg(port.to_string())
            .arg(&c)
            .arg(&k)
            .arg(if tls { "tls" } else { "plain" })
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs (spec-tests/run-tests.sh installs aiosmtpd)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "aiosmtpd did not start (pip install aiosmtpd)"
        );
        Aiosmtpd { child, out, port }
    }

    fn messages(&self, n: usize) -> Vec<serde_json::Value> {
        spec_tests::server::eventually(&format!("{n} messages at aiosmtpd"), || {
            let mut files: Vec<_> = std::fs::read_dir(self.out.path())
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            (files.len() >= n).then(|| {
                files
                    .iter()
                    .map(|f| serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap())
                    .collect()
            })
        })
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_independent_mx_receives_over_starttls() {
    // aiosmtpd (no one here wrote it) as the receiving MX: STARTTLS, one
    // refused recipient, the content as we stored it.
    let mx = Aiosmtpd::start();
    let dns = DnsServer::start(&[]);
    let server = TestServer::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[delivery]\nrelay_host = \"127.0.0.1:{}\"\nbounces = false\n",
        dns.addr, mx.port
    ));
    let body = message("news@sender.test", "a@dest.test", "to aiosmtpd");
    let id = submit(
        &server,
        "news@sender.test",
        &["a@dest.test", "reject-b@dest.test"],
        &body,
    );
    let d = first(&server, &id, "Delivery", "a@dest.test");
    assert_eq!(d.tls.as_deref(), Some("tls"));
    assert!(d.tls_version.is_some());
    let b = first(&server, &id, "Bounce", "reject-b@dest.test");
    assert_eq!(b.reply.enhanced_code.as_deref(), Some("5.1.1"));
    let got = mx.messages(1);
    assert_eq!(got[0]["tls"], true);
    assert_eq!(got[0]["mail_from"], "news@sender.test");
    assert_eq!(got[0]["rcpt_tos"], serde_json::json!(["a@dest.test"]));
    let stored_tail = "Subject: to aiosmtpd\r\n\r\nHello from the tests.\r\n";
    assert!(
        got[0]["data"].as_str().unwrap().ends_with(stored_tail),
        "{}",
        got[0]["data"]
    );
}

#[test]
fn an_independent_mx_without_starttls_defers_and_refuses_chosen_recipients() {
    // aiosmtpd without STARTTLS: plaintext, logged as such (opportunistic
    // TLS); its 451 defers one recipient (RFC 5321 §4.2.1: transient), its
    // 550 bounces another, and the third is delivered, in one transaction.
    let mx = Aiosmtpd::start_with(false);
    let dns = DnsServer::start(&[]);
    let server = TestServer::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[delivery]\nrelay_host = \"127.0.0.1:{}\"\nbounces = false\nretry_initial = \"1h\"\n",
        dns.addr, mx.port
    ));
    let id = submit(
        &server,
        "news@sender.test",
        &["a@dest.test", "reject-b@dest.test", "defer-c@dest.test"],
        &message("news@sender.test", "a@dest.test", "plain aiosmtpd"),
    );
    let d = first(&server, &id, "Delivery", "a@dest.test");
    assert_eq!(d.tls.as_deref(), Some("plaintext-not-offered"));
    let b = first(&server, &id, "Bounce", "reject-b@dest.test");
    assert_eq!((b.reply.code, b.scope.as_deref()), (550, Some("recipient")));
    let c = first(&server, &id, "TransientFailure", "defer-c@dest.test");
    assert_eq!(
        (
            c.reply.code,
            c.reply.enhanced_code.as_deref(),
            c.scope.as_deref()
        ),
        (451, Some("4.2.1"), Some("recipient"))
    );
    assert!(c.next_attempt.is_some());
    let got = mx.messages(1);
    assert_eq!(got[0]["tls"], false);
    assert_eq!(got[0]["rcpt_tos"], serde_json::json!(["a@dest.test"]));
    // Only the deferred recipient is still pending.
    let rec = server.queue().get(id.parse().unwrap()).unwrap();
    let pending: Vec<_> = rec
        .recipients
        .iter()
        .filter(|r| r.state == queue::RecipientState::Deferred)
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(pending, ["defer-c@dest.test"]);
}

#[test]
fn chunking_and_servers_without_pipelining_get_one_outcome_per_recipient() {
    // RFC 3030 (BDAT) when offered; RFC 5321 command by command without
    // RFC 2920 pipelining.
    let (port, s) = sinks(vec![
        Some(SinkConfig {
            chunking: true,
            ..Default::default()
        }),
        Some(SinkConfig {
            pipelining: false,
            ..Default::default()
        }),
    ]);
    let dns = DnsServer::start(&[
        ("chunks.test", &one_mx("127.0.0.2")),
        ("serial.test", &one_mx("127.0.0.3")),
    ]);
    let server = mta(&dns, port, "bounces = false\n");
    let body = format!(
        "{}.leading dot\r\n..two dots\r\n",
        message("news@sender.test", "a@chunks.test", "chunks")
    );
    let id = submit(
        &server,
        "news@sender.test",
        &[
            "a@chunks.test",
            "reject-b@chunks.test",
            "c@serial.test",
            "reject-d@serial.test",
        ],
        &body,
    );
    first(&server, &id, "Delivery", "a@chunks.test");
    first(&server, &id, "Bounce", "reject-b@chunks.test");
    first(&server, &id, "Delivery", "c@serial.test");
    first(&server, &id, "Bounce", "reject-d@serial.test");
    let chunked = &s[0].as_ref().unwrap().wait_for_messages(1, WAIT)[0];
    let serial = &s[1].as_ref().unwrap().wait_for_messages(1, WAIT)[0];
    // Both carry the stored content unchanged (BDAT needs no dot-stuffing).
    assert_eq!(chunked.data, serial.data);
    assert!(String::from_utf8_lossy(&serial.data).ends_with("\r\n.leading dot\r\n..two dots\r\n"));
    assert_eq!(chunked.rcpt_to, ["a@chunks.test"]);
    assert_eq!(serial.rcpt_to, ["c@serial.test"]);
}

#[test]
fn a_slow_destination_does_not_hold_up_the_others() {
    // Per-destination workers: a server that takes seconds per reply only
    // occupies its own connections.
    let (port, _s) = sinks(vec![
        Some(SinkConfig {
            reply_delay: Duration::from_millis(1500),
            ..Default::default()
        }),
        Some(SinkConfig::default()),
    ]);
    let dns = DnsServer::start(&[
        ("slow.test", &one_mx("127.0.0.2")),
        ("fast.test", &one_mx("127.0.0.3")),
    ]);
    let server = mta(&dns, port, "");
    let slow = submit(
        &server,
        "news@sender.test",
        &["a@slow.test"],
        &message("news@sender.test", "a@slow.test", "slow"),
    );
    let fast: Vec<String> = (0..5)
        .map(|i| {
            submit(
                &server,
                "news@sender.test",
                &[&format!("f{i}@fast.test")],
                &message("news@sender.test", "f@fast.test", "fast"),
            )
        })
        .collect();
    for (i, id) in fast.iter().enumerate() {
        first(&server, id, "Delivery", &format!("f{i}@fast.test"));
    }
    let records = server.records();
    assert!(
        !records
            .iter()
            .any(|r| r.kind() == "Delivery" && r.queue_id() == Some(slow.as_str())),
        "the slow destination finished first?"
    );
    first(&server, &slow, "Delivery", "a@slow.test");
    // And the metrics count what happened.
    let text = server.scrape();
    let delivered = spec_tests::server::metric(
        &text,
        "mta_delivery_attempts_total{destination=\"other\",outcome=\"delivered\",tenant=\"-\"}",
    );
    assert_eq!(delivered, Some(6.0), "{text}");
    let plain = spec_tests::server::metric(
        &text,
        "mta_outbound_sessions_total{tls=\"plaintext-not-offered\"}",
    );
    assert!(plain.is_some_and(|n| n >= 2.0), "{text}");
}

#[test]
fn several_egress_addresses_take_turns() {
    // [[egress]]: round robin over the sources, each with its EHLO name.
    let sink = Sink::start("127.0.0.2:0".parse().unwrap(), SinkConfig::default());
    let dns = DnsServer::start(&[]);
    let server = TestServer::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[[egress]]\naddress = \"127.0.0.9\"\nehlo = \"out9.test\"\n[[egress]]\naddress = \"127.0.0.10\"\nehlo = \"out10.test\"\n[delivery]\nrelay_host = \"{}\"\nmessages_per_connection = 1\nmax_connections_per_destination = 1\n",
        dns.addr, sink.addr
    ));
    for i in 0..4 {
        submit(
            &server,
            "news@sender.test",
            &[&format!("r{i}@one.example")],
            &message("news@sender.test", "r@one.example", "egress"),
        );
    }
    let got = sink.wait_for_messages(4, WAIT);
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|m| (m.peer.ip().to_string(), m.helo.clone()))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        [
            ("127.0.0.10".to_string(), "out10.test".to_string()),
            ("127.0.0.9".to_string(), "out9.test".to_string())
        ]
    );
}

#[test]
fn a_clean_stop_leaves_waiting_mail_untouched_in_the_queue() {
    // SIGTERM semantics: the transaction under way finishes; messages
    // still waiting for a connection go back to the queue as they were (no
    // attempt counted, nothing sent twice), and nothing is lost.
    let (port, s) = sinks(vec![Some(SinkConfig {
        reply_delay: Duration::from_millis(300),
        ..Default::default()
    })]);
    let dns = DnsServer::start(&[("dest.test", &one_mx("127.0.0.2"))]);
    let mut server = mta(&dns, port, "max_connections_per_destination = 1\n");
    let ids: Vec<String> = (0..6)
        .map(|i| {
            submit(
                &server,
                "news@sender.test",
                &[&format!("r{i}@dest.test")],
                &message("news@sender.test", "r@dest.test", "stop"),
            )
        })
        .collect();
    server.stop();
    let records = spec_tests::server::read_log(server.data_dir());
    let delivered: Vec<&str> = records
        .iter()
        .filter(|r| r.kind() == "Delivery")
        .filter_map(|r| r.queue_id())
        .collect();
    assert!(
        !records.iter().any(|r| r.kind() == "TransientFailure"),
        "an interrupted message was counted as an attempt: {records:#?}"
    );
    assert!(
        delivered.len() < ids.len(),
        "the stop came too late to test"
    );
    let q = queue::Queue::open_for_inspection_with(&spec_tests::server::store_config(
        server.data_dir(),
    ))
    .unwrap();
    let left: Vec<queue::MessageRecord> = q.records().map(|r| r.unwrap()).collect();
    assert_eq!(
        left.len() + delivered.len(),
        ids.len(),
        "every message delivered or queued"
    );
    assert!(
        left.iter()
            .all(|m| m.recipients.iter().all(|r| r.attempts == 0)),
        "{left:#?}"
    );
    let got = s[0].as_ref().unwrap().messages();
    assert_eq!(got.len(), delivered.len(), "sent exactly what was logged");
}

#[test]
fn idle_destinations_are_forgotten() {
    // One entry per destination only while it has work or connections:
    // a platform sending to millions of domains keeps no entry for each.
    let (port, _s) = sinks(vec![Some(SinkConfig::default())]);
    let dns = DnsServer::start(&[
        ("one.test", &one_mx("127.0.0.2")),
        ("two.test", &one_mx("127.0.0.2")),
    ]);
    let server = mta(&dns, port, "idle_timeout = \"200ms\"\n");
    let id = submit(
        &server,
        "news@sender.test",
        &["a@one.test", "b@two.test"],
        &message("news@sender.test", "a@one.test", "idle"),
    );
    first(&server, &id, "Delivery", "a@one.test");
    first(&server, &id, "Delivery", "b@two.test");
    spec_tests::server::eventually("idle destinations to be forgotten", || {
        (server.daemon().delivery().destinations() == 0).then_some(())
    });
}

#[test]
fn a_dns_server_that_never_answers_defers_and_the_message_stays_queued() {
    // A name server that takes queries and never answers (a UDP socket
    // nobody reads): the lookup times out, which proves nothing about the
    // domain, so the recipient is deferred (4.4.3), not bounced.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let deferred = deferred_by_dns(addr, "timeout = \"1s\"\n", "no answer");
    assert!(deferred.next_attempt.is_some());
    drop(silent);
}

#[test]
fn a_dns_server_answering_servfail_defers() {
    // RFC 1035 §4.1.1 RCODE 2 (server failure): the name server could not
    // answer, which proves nothing about the domain, so the recipient is
    // deferred (4.4.3) and stays queued; NXDOMAIN would have bounced it.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let responder = {
        let (stop, answered) = (stop.clone(), answered.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                // The query itself, turned into a response (QR, RA) with
                // RCODE 2 and no records: the question section stays.
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                reply[3] = 0x80 | 2;
                reply[6..12].fill(0);
                // Only the question section: drop an EDNS OPT record.
                let question_end = 12 + question_len(&reply[12..]);
                reply.truncate(question_end);
                let _ = socket.send_to(&reply, from);
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    deferred_by_dns(addr, "", "servfail");
    assert!(answered.load(std::sync::atomic::Ordering::Relaxed) > 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().unwrap();
}

/// The length of a DNS message's first question (name, type, class).
fn question_len(q: &[u8]) -> usize {
    let mut i = 0;
    while i < q.len() && q[i] != 0 {
        i += 1 + q[i] as usize;
    }
    (i + 1 + 4).min(q.len())
}

/// Submits a message for a@dest.test to a daemon whose only name server is
/// `nameserver` (with `dns_extra` in `[dns]`), and checks that the DNS
/// failure deferred it (4.4.3, destination scope) and left it queued;
/// returns the TransientFailure.
fn deferred_by_dns(nameserver: std::net::SocketAddr, dns_extra: &str, subject: &str) -> Attempt {
    let server = TestServer::start(&format!(
        "[dns]\nnameservers = [\"{nameserver}\"]\n{dns_extra}[delivery]\nretry_initial = \"1h\"\nbounces = false\n"
    ));
    let id = submit(
        &server,
        "news@sender.test",
        &["a@dest.test"],
        &message("news@sender.test", "a@dest.test", subject),
    );
    let deferred = first(&server, &id, "TransientFailure", "a@dest.test");
    assert_eq!(deferred.reply.enhanced_code.as_deref(), Some("4.4.3"));
    assert_eq!(deferred.scope.as_deref(), Some("destination"));
    let rec = server.queue().get(id.parse().unwrap()).unwrap();
    assert_eq!(rec.recipients[0].state, queue::RecipientState::Deferred);
    deferred
}
