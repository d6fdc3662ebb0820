//! Reception policy and limits over real sockets: who may connect and
//! relay, tenant sender domains, AUTH failure handling, connection limits,
//! timeouts, size and recipient limits, smuggling. Each test asserts on the
//! replies, the transaction log and the queue.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mta::log::Record;
use spec_tests::client::{Client, message};
use spec_tests::server::{TestServer, eventually, queued_id, tenants_toml};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An authenticated session of tenant acme.
fn acme(server: &TestServer) -> Client {
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    let r = c.auth_plain("acme-app", "s3cret");
    assert_eq!(r.code, 235, "{r}");
    c
}

#[test]
fn clients_outside_allowed_networks_get_554_at_connect() {
    // RFC 5321 §3.1: a server may refuse a connection with 554 in place of 220.
    let server = TestServer::start("[smtp]\nallowed_networks = [\"127.0.0.1/32\"]\n");
    let mut c = Client::connect_from(ip("127.0.0.2"), server.addr).expect("TCP connects");
    assert_eq!(c.greeting.code, 554);
    assert_eq!(c.greeting.enhanced(), Some("5.7.1"));
    assert!(c.is_closed());
    let rej = server.rejection("the CONNECT rejection", |r| r.command == "CONNECT");
    assert_eq!(rej.session.peer_ip, "127.0.0.2");
    assert_eq!(
        (rej.reply.code, rej.reply.enhanced_code.as_deref()),
        (554, Some("5.7.1"))
    );
    // The allowed address is served.
    let c = Client::connect(server.addr);
    assert_eq!(c.greeting.code, 220);
}

#[test]
fn without_auth_only_relay_networks_may_send() {
    let server = TestServer::start(&format!(
        "[smtp]\nrelay_networks = [\"127.0.0.1/32\"]\n{}",
        tenants_toml()
    ));
    // 127.0.0.1 relays without AUTH; the tenant follows from the sender domain.
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let replies = c.send_message(
        "news@bank.example",
        &["a@dest.example"],
        &message("news@bank.example", "a@dest.example", "relay"),
    );
    let id = queued_id(replies.last().unwrap());
    let rec = server.reception(&id);
    assert_eq!(rec.session.tenant.as_deref(), Some("bank"));
    assert_eq!(rec.session.auth_user, None);

    // 127.0.0.2 may connect but not relay.
    let mut c = Client::connect_from(ip("127.0.0.2"), server.addr).unwrap();
    c.ehlo();
    let r = c.cmd("MAIL FROM:<news@acme.example>");
    assert_eq!((r.code, r.enhanced()), (530, Some("5.7.0")), "{r}");
    let rej = server.rejection("the 530", |r| {
        r.command == "MAIL" && r.session.peer_ip == "127.0.0.2"
    });
    assert_eq!(rej.reply.code, 530);

    // A relay client must still use some tenant's domain.
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let r = c.cmd("MAIL FROM:<someone@elsewhere.example>");
    assert_eq!((r.code, r.enhanced()), (550, Some("5.7.1")), "{r}");
}

#[test]
fn a_tenant_can_never_send_as_another_tenant() {
    let server = TestServer::start(&format!("[smtp]\nrelay_networks = []\n{}", tenants_toml()));
    let mut c = acme(&server);
    // In the envelope...
    let r = c.cmd("MAIL FROM:<ceo@bank.example>");
    assert_eq!((r.code, r.enhanced()), (550, Some("5.7.1")), "{r}");
    let rej = server.rejection("the MAIL rejection", |r| {
        r.command == "MAIL" && r.reply.code == 550
    });
    assert_eq!(rej.session.tenant.as_deref(), Some("acme"));
    assert_eq!(rej.session.auth_user.as_deref(), Some("acme-app"));
    // ...and in the From: header, with an envelope of its own domain.
    let replies = c.send_message(
        "news@acme.example",
        &["a@dest.example"],
        "From: \"Bank\" <ceo@bank.example>\r\nSubject: spoof\r\n\r\nx\r\n",
    );
    let last = replies.last().unwrap();
    assert_eq!((last.code, last.enhanced()), (550, Some("5.7.1")), "{last}");
    let rej = server.rejection("the DATA rejection", |r| r.command == "DATA");
    assert_eq!(rej.sender.as_deref(), Some("news@acme.example"));
    assert_eq!(rej.recipients, ["a@dest.example"]);
    assert!(rej.reply.text.contains("ceo@bank.example"));
    // Its own domain in both passes.
    let replies = c.send_message(
        "news@acme.example",
        &["a@dest.example"],
        &message("news@acme.example", "a@dest.example", "ok"),
    );
    queued_id(replies.last().unwrap());
    assert_eq!(server.queue().len(), 1);
}

/// Waits for exactly `n` AuthFailure records and returns them.
fn auth_failures(server: &TestServer, n: usize) -> Vec<mta::log::AuthFailure> {
    server.wait_for(&format!("{n} AuthFailure records"), |rs| {
        let f: Vec<_> = rs
            .iter()
            .filter_map(|r| match r {
                Record::AuthFailure(f) => Some(f.clone()),
                _ => None,
            })
            .collect();
        (f.len() == n).then_some(f)
    })
}

#[test]
fn failed_auth_is_delayed_counted_per_session_and_per_address() {
    let server = TestServer::start(&format!(
        "[smtp]\nrelay_networks = []\nmax_auth_failures = 2\nmax_auth_failures_per_ip = 3\nauth_failure_delay = \"300ms\"\n{}",
        tenants_toml()
    ));
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    let started = Instant::now();
    let r = c.auth_plain("acme-app", "guess1");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the failure was not delayed"
    );
    assert_eq!((r.code, r.enhanced()), (535, Some("5.7.8")), "{r}");
    // The second failure in one session ends it.
    let r = c.auth_plain("nobody", "guess2");
    assert_eq!((r.code, r.enhanced()), (421, Some("4.7.0")), "{r}");
    assert!(c.is_closed());

    // A third failure from the same address, in a new session...
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    assert_eq!(c.auth_plain("acme-app", "guess3").code, 535);
    // ...locks the address: even the right password is refused now.
    let r = c.auth_plain("acme-app", "s3cret");
    assert_eq!((r.code, r.enhanced()), (421, Some("4.7.0")), "{r}");
    assert!(r.text().contains("your address"), "{r}");

    let failures = auth_failures(&server, 4);
    let users: Vec<_> = failures.iter().map(|f| f.user.as_str()).collect();
    assert_eq!(users, ["acme-app", "nobody", "acme-app", "acme-app"]);
    assert_eq!(failures[3].reason, "address locked out");
    assert!(
        failures
            .iter()
            .all(|f| f.session.peer_ip == "127.0.0.1" && f.session.tls_version.is_some())
    );
    let text = serde_json::to_string(&failures).unwrap();
    for pw in ["guess1", "guess2", "guess3", "s3cret"] {
        assert!(!text.contains(pw), "password {pw} in the log");
    }
}

#[test]
fn guessing_one_password_from_many_addresses_locks_out_the_guessers_not_the_client() {
    // A brute force spread over many addresses, each staying under
    // max_auth_failures_per_ip: the user name's own limit catches it.
    let server = TestServer::start(&format!(
        "[smtp]\nrelay_networks = []\nmax_auth_failures_per_ip = 2\nmax_auth_failures_per_user = 4\nauth_failure_delay = \"10ms\"\n{}",
        tenants_toml()
    ));
    let login = |from: &str, password: &str| {
        let mut c = Client::connect_from(ip(from), server.addr).unwrap();
        c.ehlo();
        c.starttls();
        c.ehlo();
        let r = c.auth_plain("acme-app", password);
        (c, r)
    };
    // The platform's own client logs in first.
    let (_, r) = login("127.0.0.1", "s3cret");
    assert_eq!(r.code, 235, "{r}");
    for n in 10..14 {
        let (_, r) = login(&format!("127.0.0.{n}"), &format!("guess{n}"));
        assert_eq!((r.code, r.enhanced()), (535, Some("5.7.8")), "{r}");
    }
    // A fifth address is refused before its password is checked: even the
    // right one gets 454, as a wrong one and an unknown user's would.
    let (_, r) = login("127.0.0.20", "s3cret");
    assert_eq!((r.code, r.enhanced()), (454, Some("4.7.0")), "{r}");
    let (_, r) = login("127.0.0.21", "wrong");
    assert_eq!((r.code, r.enhanced()), (454, Some("4.7.0")), "{r}");
    // The known client still logs in and sends.
    let (mut c, r) = login("127.0.0.1", "s3cret");
    assert_eq!(r.code, 235, "{r}");
    let replies = c.send_message(
        "news@acme.example",
        &["a@dest.example"],
        &message("news@acme.example", "a@dest.example", "still works"),
    );
    queued_id(replies.last().unwrap());

    let failures = auth_failures(&server, 6);
    let locked: Vec<_> = failures
        .iter()
        .filter(|f| f.reason == "user locked out")
        .map(|f| f.session.peer_ip.as_str())
        .collect();
    assert_eq!(locked, ["127.0.0.20", "127.0.0.21"]);
    let scrape = server.scrape();
    assert_eq!(
        spec_tests::server::metric(
            &scrape,
            "mta_auth_failures_total{reason=\"user_locked_out\"}"
        ),
        Some(2.0),
        "{scrape}"
    );
}

#[test]
fn connection_limits_in_total_and_per_address() {
    let server = TestServer::start("[smtp]\nmax_connections = 3\nmax_connections_per_ip = 2\n");
    let a1 = Client::connect(server.addr);
    let a2 = Client::connect(server.addr);
    let mut a3 = Client::connect(server.addr);
    assert_eq!(
        (a3.greeting.code, a3.greeting.enhanced()),
        (421, Some("4.7.0"))
    );
    assert!(a3.greeting.text().contains("your address"));
    assert!(a3.is_closed());
    let b1 = Client::connect_from(ip("127.0.0.2"), server.addr).unwrap();
    assert_eq!(b1.greeting.code, 220);
    let mut c1 = Client::connect_from(ip("127.0.0.3"), server.addr).unwrap();
    assert_eq!(c1.greeting.code, 421, "total limit");
    assert!(c1.is_closed());
    let rej = server.rejection("the connection refusals", |r| {
        r.command == "CONNECT" && r.session.peer_ip == "127.0.0.3"
    });
    assert_eq!(rej.reply.code, 421);

    // Closing a session frees its slot.
    drop(a1);
    eventually("the slot to be freed", || {
        (server.connections() == 2).then_some(())
    });
    let again = Client::connect(server.addr);
    assert_eq!(again.greeting.code, 220);
    drop((a2, b1));
}

#[test]
fn an_idle_client_is_disconnected_with_421_after_the_command_timeout() {
    let server = TestServer::start("[smtp]\ncommand_timeout = \"1s\"\n");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let r = c.reply();
    assert_eq!((r.code, r.enhanced()), (421, Some("4.4.2")), "{r}");
    assert!(c.is_closed());
    server.rejection("the timeout record", |r| {
        r.command == "TIMEOUT" && r.reply.code == 421
    });
}

#[test]
fn a_stalled_message_is_dropped_after_the_data_timeout_and_nothing_is_queued() {
    let server = TestServer::start("[smtp]\ndata_timeout = \"1s\"\ncommand_timeout = \"30s\"\n");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.begin_data("a@x.example", "b@y.example");
    c.send("From: <a@x.example>\r\n\r\nhalf a mess");
    let r = c.reply();
    assert_eq!((r.code, r.enhanced()), (421, Some("4.4.2")), "{r}");
    assert!(r.text().contains("message content"));
    assert!(c.is_closed());
    assert!(server.queue().is_empty());
}

#[test]
fn a_client_that_disconnects_mid_message_leaves_nothing_behind() {
    let server = TestServer::start("");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.begin_data("a@x.example", "b@y.example");
    c.send("From: <a@x.example>\r\n\r\nhalf a mess");
    drop(c);
    eventually("the session to end", || {
        (server.connections() == 0).then_some(())
    });
    assert!(server.queue().is_empty());
    assert!(
        !server
            .records()
            .iter()
            .any(|r| matches!(r, Record::Reception(_)))
    );
}

#[test]
fn an_oversize_message_is_refused_while_streaming() {
    // RFC 1870 §6: the limit holds even when SIZE= was not declared.
    let server = TestServer::start("[smtp]\nmax_message_size = 100000\n");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let big = format!(
        "From: <a@x.example>\r\n\r\n{}",
        ("z".repeat(98) + "\r\n").repeat(1500)
    );
    let replies = c.send_message("a@x.example", &["b@y.example"], &big);
    let last = replies.last().unwrap();
    assert_eq!((last.code, last.enhanced()), (552, Some("5.3.4")), "{last}");
    assert!(server.queue().is_empty());
    let rej = server.rejection("the DATA rejection", |r| {
        r.command == "DATA" && r.reply.code == 552
    });
    assert_eq!(rej.session.peer_ip, "127.0.0.1");
    // The session goes on.
    assert_eq!(c.cmd("NOOP").code, 250);
}

#[test]
fn recipients_beyond_the_limit_get_452_and_the_rest_is_queued() {
    // RFC 5321 §4.5.3.1.10: too many recipients is 452, so the client sends the rest later.
    let server = TestServer::start("[smtp]\nmax_recipients = 3\n");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let rcpts = ["a@d.example", "b@d.example", "c@d.example", "d@d.example"];
    let replies = c.send_message(
        "a@x.example",
        &rcpts,
        &message("a@x.example", "a@d.example", "limit"),
    );
    let codes: Vec<_> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 250, 250, 250, 452, 354, 250]);
    assert_eq!(replies[4].enhanced(), Some("4.5.3"));
    let id = queued_id(replies.last().unwrap());
    assert_eq!(
        server.reception(&id).recipients,
        ["a@d.example", "b@d.example", "c@d.example"]
    );
    let rej = server.rejection("the 452", |r| r.reply.code == 452);
    assert_eq!(rej.recipient.as_deref(), Some("d@d.example"));
}

#[test]
fn smuggling_is_refused_logged_and_queues_nothing() {
    let server = TestServer::start("");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.begin_data("a@x.example", "b@y.example");
    c.send("From: <a@x.example>\r\n\r\nhi\n.\nMAIL FROM:<admin@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nFrom: <admin@x.example>\r\n\r\nsmuggled\r\n.\r\n");
    let r = c.reply();
    assert_eq!((r.code, r.enhanced()), (554, Some("5.5.2")), "{r}");
    // Nothing after the real end of data was taken as a command.
    assert_eq!(c.cmd("NOOP").code, 250);
    let rej = server.rejection("the smuggling rejection", |r| r.reply.code == 554);
    assert_eq!(rej.command, "DATA");
    assert!(server.queue().is_empty());
    assert!(
        !server
            .records()
            .iter()
            .any(|r| matches!(r, Record::Reception(_)))
    );
}

#[test]
fn implicit_tls_listener_offers_auth_at_once() {
    // RFC 8314 §3: submission over implicit TLS.
    let server = TestServer::start(&format!(
        "[smtp]\nlisten_tls = [\"127.0.0.1:0\"]\nrelay_networks = []\n{}",
        tenants_toml()
    ));
    let mut c = Client::connect_tls(server.tls_addr.expect("implicit TLS listener"));
    assert_eq!(c.greeting.code, 220);
    let ehlo = c.ehlo();
    assert!(ehlo.text().contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.text().contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.auth_plain("bank-app", "vault").code, 235);
    let replies = c.send_message(
        "news@bank.example",
        &["a@dest.example"],
        &message("news@bank.example", "a@dest.example", "465"),
    );
    let id = queued_id(replies.last().unwrap());
    let rec = server.reception(&id);
    assert_eq!(rec.session.tenant.as_deref(), Some("bank"));
    assert!(rec.session.tls_version.is_some());
}

#[test]
fn shutdown_tells_idle_sessions_421_and_keeps_what_was_accepted() {
    let mut server = TestServer::start("");
    let mut c = Client::connect(server.addr);
    c.ehlo();
    let replies = c.send_message(
        "a@x.example",
        &["b@y.example"],
        &message("a@x.example", "b@y.example", "before stop"),
    );
    let id = queued_id(replies.last().unwrap());
    let dir = server.data_dir().to_path_buf();
    server.stop();
    let r = c.reply();
    assert_eq!((r.code, r.enhanced()), (421, Some("4.3.2")), "{r}");
    let (q, report) = queue::Queue::open(&spec_tests::server::store_config(&dir)).unwrap();
    assert_eq!(report.messages, 1);
    assert!(q.get(id.parse().unwrap()).is_ok());
}

#[test]
fn a_configured_certificate_is_the_one_presented() {
    // [smtp] tls_certificate / tls_private_key instead of the generated one,
    // for STARTTLS and implicit TLS alike (RFC 3207, RFC 8314).
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["mail.acme.example".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let server = TestServer::start(&format!(
        "[smtp]\nlisten_tls = [\"127.0.0.1:0\"]\ntls_certificate = \"{}\"\ntls_private_key = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    assert_eq!(c.ehlo().code, 250);
    assert_eq!(
        c.peer_certificate().as_deref(),
        Some(made.cert.der().as_ref())
    );
    let mut implicit = Client::connect_tls(server.tls_addr.unwrap());
    assert_eq!(implicit.greeting.code, 220);
    assert_eq!(implicit.ehlo().code, 250);
    assert_eq!(
        implicit.peer_certificate().as_deref(),
        Some(made.cert.der().as_ref())
    );
    assert!(
        !server.data_dir().join("tls").exists(),
        "nothing generated when a certificate is configured"
    );
}
