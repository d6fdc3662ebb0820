//! The session state machine, exchange by exchange, with byte strings.

use std::sync::Arc;

use super::*;
use crate::policy::{DomainPattern, Policy, Tenant};

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "mx.test".into(),
        max_message_size: 10_000,
        max_recipients: 3,
        max_errors: 10,
        max_auth_failures: 2,
        starttls: true,
        auth: true,
        check_sender: false,
        storage_low: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        policy: Arc::new(Policy {
            allowed_networks: vec![],
            relay_networks: vec![],
            tenants: vec![
                Tenant {
                    name: "acme".into(),
                    sender_domains: vec![DomainPattern::parse("acme.example").unwrap()],
                },
                Tenant {
                    name: "bank".into(),
                    sender_domains: vec![DomainPattern::parse("bank.example").unwrap()],
                },
            ],
        }),
    }
}

fn tls() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    }
}

fn peer(relay: bool) -> Peer {
    Peer {
        ip: "127.0.0.1".parse().unwrap(),
        port: 40000,
        relay,
    }
}

/// A session with a scripted driver.
struct T {
    s: Session,
}

impl T {
    fn new(cfg: SessionConfig, relay: bool, tls_on: bool) -> Self {
        let mut s = Session::new(Arc::new(cfg), peer(relay), tls_on.then(tls));
        s.greeting();
        let mut t = T { s };
        t.out();
        t
    }

    fn relay() -> Self {
        T::new(config(), true, false)
    }

    /// Feeds input and advances; returns the step that stopped it.
    fn send(&mut self, input: &[u8]) -> Step {
        self.s.feed(input);
        self.s.advance()
    }

    fn out(&mut self) -> String {
        String::from_utf8(std::mem::take(self.s.output())).unwrap()
    }

    /// Sends and returns the reply text, asserting the session wants input.
    fn say(&mut self, input: &str) -> String {
        let step = self.send(input.as_bytes());
        assert!(matches!(step, Step::NeedInput), "{step:?} after {input:?}");
        self.out()
    }

    fn authed(user: &str, tenant: &str) -> Self {
        let mut t = T::new(config(), false, true);
        t.say("EHLO c\r\n");
        let step = t.send(b"AUTH PLAIN AHUAcA==\r\n");
        assert!(matches!(step, Step::Authenticate(_)));
        t.s.auth_result(AuthOutcome::Success(Identity {
            user: user.into(),
            tenant: tenant.into(),
        }));
        assert!(t.out().starts_with("235 2.7.0"));
        t
    }
}

fn codes(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.as_bytes()[3] == b' ')
        .map(|l| &l[..3])
        .collect()
}

#[test]
fn greeting_names_the_host() {
    let mut s = Session::new(Arc::new(config()), peer(true), None);
    s.greeting();
    assert_eq!(s.output(), b"220 mx.test ESMTP ready\r\n");
}

#[test]
fn ehlo_advertises_starttls_before_tls_and_auth_only_after() {
    let mut t = T::relay();
    let out = t.say("EHLO client.example\r\n");
    for cap in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(
            out.contains(&format!("250-{cap}\r\n")) || out.contains(&format!("250 {cap}\r\n")),
            "{cap} missing in {out}"
        );
    }
    assert!(!out.contains("AUTH"), "AUTH offered before TLS: {out}");
    assert!(out.starts_with("250-mx.test Hello client.example [127.0.0.1]\r\n"));

    let mut t = T::new(config(), true, true);
    let out = t.say("EHLO client.example\r\n");
    assert!(
        out.contains("250-AUTH PLAIN LOGIN\r\n") || out.ends_with("250 AUTH PLAIN LOGIN\r\n"),
        "{out}"
    );
    assert!(!out.contains("STARTTLS"));
}

#[test]
fn a_whole_transaction_yields_the_envelope_and_the_queue_id_reply() {
    let mut t = T::relay();
    t.say("EHLO c.example\r\n");
    assert_eq!(
        t.say("MAIL FROM:<news@acme.example> BODY=8BITMIME\r\n"),
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(t.say("RCPT TO:<a@dest.example>\r\n"), "250 2.1.5 Ok\r\n");
    assert_eq!(t.say("RCPT TO:<b@dest.example>\r\n"), "250 2.1.5 Ok\r\n");
    assert_eq!(t.say("DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
    let step = t.send(b"Subject: hi\r\n\r\n..dot\r\n.\r\n");
    let Step::Message(env) = step else {
        panic!("{step:?}")
    };
    assert_eq!(env.sender, "news@acme.example");
    assert_eq!(env.recipients, ["a@dest.example", "b@dest.example"]);
    assert_eq!(env.content, b"Subject: hi\r\n\r\n.dot\r\n");
    assert_eq!(
        env.tenant.as_deref(),
        Some("acme"),
        "tenant inferred from the sender domain"
    );
    assert_eq!(env.helo, "c.example");
    assert_eq!(env.protocol(), "ESMTP");
    t.s.message_result(Ok("0ABC".into()));
    assert_eq!(t.out(), "250 2.0.0 Ok: queued as 0ABC\r\n");
    // The transaction is over: a new one may start.
    assert_eq!(t.say("MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
}

#[test]
fn pipelined_commands_are_answered_in_order_in_one_write() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    let out = t.say("MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\nRCPT TO:<bad>\r\nRCPT TO:<b@d.example>\r\nDATA\r\n");
    assert_eq!(codes(&out), ["250", "250", "501", "250", "354"]);
    let step = t.send(b"x\r\n.\r\nQUIT\r\n");
    let Step::Message(env) = step else { panic!() };
    assert_eq!(env.recipients.len(), 2);
    t.s.message_result(Ok("ID".into()));
    assert!(
        matches!(t.s.advance(), Step::Close),
        "the pipelined QUIT runs after the reply"
    );
    assert_eq!(codes(&t.out()), ["250", "221"]);
}

#[test]
fn bdat_chunks_pipelined_with_commands() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    let step = t.send(b"MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\nBDAT 13\r\nSubject: x\r\n\rBDAT 7 LAST\r\n\nbody\r\n");
    let Step::Message(env) = step else {
        panic!("{step:?}")
    };
    assert_eq!(env.content, b"Subject: x\r\n\r\nbody\r\n");
    assert_eq!(codes(&t.out()), ["250", "250", "250"]);
    t.s.message_result(Ok("ID".into()));
    assert!(t.out().starts_with("250 2.0.0 Ok: queued"));
}

#[test]
fn bdat_without_a_transaction_still_consumes_its_chunk() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    // The chunk looks like commands; none of it may run.
    let out = t.say("BDAT 28 LAST\r\nMAIL FROM:<x@acme.example>\r\nNOOP\r\n");
    assert_eq!(codes(&out), ["503", "250"], "{out}");
}

#[test]
fn bdat_zero_last_ends_the_message() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    t.say("MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\n");
    let out = t.say("BDAT 4\r\nab\r\n");
    assert!(out.ends_with("250 2.0.0 4 octets received\r\n"), "{out}");
    let Step::Message(env) = t.send(b"BDAT 0 LAST\r\n") else {
        panic!()
    };
    assert_eq!(env.content, b"ab\r\n");
}

#[test]
fn bdat_oversize_refuses_and_resets() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    t.say("MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\n");
    let lines = "x".repeat(98) + "\r\n";
    let big = format!("BDAT 10100\r\n{}", lines.repeat(101));
    let out = t.say(&big);
    assert!(out.starts_with("552 5.3.4"), "{out}");
    let out = t.say("BDAT 3 LAST\r\nabc");
    assert!(out.starts_with("503 5.5.1"), "{out}");
}

#[test]
fn data_and_bdat_do_not_mix() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    t.say("MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\n");
    assert!(t.say("BDAT 4\r\nab\r\n").starts_with("250"));
    let out = t.say("DATA\r\n");
    assert!(out.starts_with("503 5.5.1 DATA after BDAT"), "{out}");
}

#[test]
fn starttls_discards_pipelined_plaintext_and_resets_the_session() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    let step = t.send(b"STARTTLS\r\nMAIL FROM:<injected@acme.example>\r\n");
    assert!(matches!(step, Step::StartTls));
    assert_eq!(t.out(), "220 2.0.0 Ready to start TLS\r\n");
    t.s.tls_established(tls());
    assert!(matches!(t.s.advance(), Step::NeedInput));
    assert_eq!(t.out(), "", "the injected command was executed");
    // EHLO is needed again (RFC 3207 §4.2).
    assert!(
        t.say("MAIL FROM:<n@acme.example>\r\n")
            .starts_with("503 5.5.1")
    );
    assert!(t.say("EHLO c\r\n").contains("AUTH"));
    assert!(t.say("STARTTLS\r\n").starts_with("503"));
}

#[test]
fn starttls_without_a_certificate() {
    let mut cfg = config();
    cfg.starttls = false;
    let mut t = T::new(cfg, true, false);
    assert!(!t.say("EHLO c\r\n").contains("STARTTLS"));
    assert!(t.say("STARTTLS\r\n").starts_with("454 4.7.0"));
}

#[test]
fn auth_needs_tls() {
    let mut t = T::new(config(), false, false);
    t.say("EHLO c\r\n");
    assert!(t.say("AUTH PLAIN AHUAcA==\r\n").starts_with("538 5.7.11"));
}

#[test]
fn auth_plain_with_and_without_initial_response() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    let Step::Authenticate(req) = t.send(b"AUTH PLAIN AGFjbWUtYXBwAHMzY3JldA==\r\n") else {
        panic!()
    };
    assert_eq!(
        (req.mechanism, req.user.as_str(), req.password.as_str()),
        ("PLAIN", "acme-app", "s3cret")
    );
    assert_eq!(req.authzid, None);
    assert!(
        !format!("{req:?}").contains("s3cret"),
        "password in Debug output"
    );
    t.s.auth_result(AuthOutcome::Failure {
        reason: "invalid credentials",
    });
    assert!(t.out().starts_with("535 5.7.8"));

    assert_eq!(t.say("AUTH PLAIN\r\n"), "334 \r\n");
    let Step::Authenticate(req) = t.send(b"YWRtaW4AYWNtZS1hcHAAczNjcmV0\r\n") else {
        panic!()
    };
    assert_eq!(req.authzid.as_deref(), Some("admin"));
}

#[test]
fn auth_login_exchange() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    assert_eq!(t.say("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(t.say("YWNtZS1hcHA=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    let Step::Authenticate(req) = t.send(b"czNjcmV0\r\n") else {
        panic!()
    };
    assert_eq!(
        (req.user.as_str(), req.password.as_str()),
        ("acme-app", "s3cret")
    );
    t.s.auth_result(AuthOutcome::Success(Identity {
        user: "acme-app".into(),
        tenant: "acme".into(),
    }));
    assert_eq!(t.out(), "235 2.7.0 Authentication successful\r\n");
    assert!(t.say("AUTH LOGIN\r\n").starts_with("503"), "second AUTH");
}

#[test]
fn auth_login_with_an_empty_user_name_is_refused_like_plain() {
    // Found by the session fuzzer: an empty line answering "Username:"
    // went on to ask for the password and handed the driver an AUTH with
    // no user name.
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    t.say("AUTH LOGIN\r\n");
    assert!(t.say("\r\n").starts_with("501 5.5.2"));
    // The session is back at commands; the same as an initial response.
    assert!(t.say("NOOP\r\n").starts_with("250"));
    assert_eq!(t.say("AUTH LOGIN YWNtZS1hcHA=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    t.say("*\r\n");
    assert!(t.say("AUTH LOGIN =\r\n").starts_with("501 5.5.2"));
}

#[test]
fn auth_cancel_bad_base64_and_unknown_mechanism() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    t.say("AUTH LOGIN\r\n");
    assert!(t.say("*\r\n").starts_with("501 5.0.0"));
    assert!(t.say("AUTH PLAIN !!!\r\n").starts_with("501 5.5.2"));
    assert!(
        t.say("AUTH PLAIN dXNlcg==\r\n").starts_with("501 5.5.2"),
        "no NULs"
    );
    assert!(t.say("AUTH CRAM-MD5\r\n").starts_with("504 5.5.4"));
}

#[test]
fn repeated_auth_failures_close_the_session() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    t.send(b"AUTH PLAIN AHUAcA==\r\n");
    t.s.auth_result(AuthOutcome::Failure {
        reason: "invalid credentials",
    });
    assert!(t.out().starts_with("535"));
    t.send(b"AUTH PLAIN AHUAcA==\r\n");
    t.s.auth_result(AuthOutcome::Failure {
        reason: "invalid credentials",
    });
    assert!(t.out().starts_with("421 4.7.0"));
    assert!(matches!(t.s.advance(), Step::Close));
    let ev = t.s.take_events();
    assert_eq!(ev.len(), 2);
    let Event::AuthFailed {
        mechanism,
        user,
        reason,
        reply,
    } = &ev[1]
    else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (*mechanism, user.as_str(), *reason, reply.code),
        ("PLAIN", "u", "invalid credentials", 421)
    );
}

#[test]
fn a_locked_out_address_is_disconnected() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    t.send(b"AUTH PLAIN AHUAcA==\r\n");
    t.s.auth_result(AuthOutcome::Locked);
    assert!(t.out().starts_with("421 4.7.0"));
    assert!(matches!(t.s.advance(), Step::Close));
}

#[test]
fn a_user_locked_out_is_refused_454_and_counts_as_a_failure_of_the_session() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    t.send(b"AUTH PLAIN AHUAcA==\r\n");
    t.s.auth_result(AuthOutcome::UserLocked);
    assert!(t.out().starts_with("454 4.7.0"));
    let events = t.s.take_events();
    assert!(
        events.iter().any(
            |e| matches!(e, Event::AuthFailed { reason: "user locked out", reply, .. } if reply.code == 454)
        ),
        "{events:?}"
    );
    // The session goes on, and its own failure limit (2 here) still
    // applies.
    t.send(b"AUTH PLAIN AHUAcA==\r\n");
    t.s.auth_result(AuthOutcome::UserLocked);
    assert!(t.out().contains("421 4.7.0"), "after max_auth_failures");
    assert!(matches!(t.s.advance(), Step::Close));
}

#[test]
fn without_auth_only_relay_networks_may_send() {
    let mut t = T::new(config(), false, false);
    t.say("EHLO c\r\n");
    let out = t.say("MAIL FROM:<n@acme.example>\r\n");
    assert!(out.starts_with("530 5.7.0"), "{out}");
    assert!(out.contains("STARTTLS"));
    let events = t.s.take_events();
    assert!(
        matches!(&events[0], Event::Rejected { command: "MAIL", reply, .. } if reply.code == 530)
    );
}

#[test]
fn an_authenticated_tenant_may_use_only_its_own_sender_domains() {
    let mut t = T::authed("acme-app", "acme");
    let out = t.say("MAIL FROM:<ceo@bank.example>\r\n");
    assert!(out.starts_with("550 5.7.1"), "{out}");
    assert!(out.contains("acme"));
    assert_eq!(
        t.say("MAIL FROM:<news@ACME.example>\r\n"),
        "250 2.1.0 Ok\r\n"
    );
    t.say("RCPT TO:<x@d.example>\r\nDATA\r\n");
    let Step::Message(env) = t.send(b"x\r\n.\r\n") else {
        panic!()
    };
    assert_eq!(env.tenant.as_deref(), Some("acme"));
    assert_eq!(env.auth.as_ref().unwrap().user, "acme-app");
    assert_eq!(env.protocol(), "ESMTPSA");
}

#[test]
fn relay_clients_must_use_a_tenant_domain_when_tenants_exist() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    assert!(
        t.say("MAIL FROM:<x@unknown.example>\r\n")
            .starts_with("550 5.7.1")
    );
    let mut cfg = config();
    cfg.policy = Arc::new(Policy::default());
    let mut t = T::new(cfg, true, false);
    t.say("EHLO c\r\n");
    assert!(
        t.say("MAIL FROM:<x@unknown.example>\r\n")
            .starts_with("250")
    );
}

#[test]
fn sequence_errors() {
    let mut t = T::relay();
    assert!(
        t.say("MAIL FROM:<n@acme.example>\r\n")
            .starts_with("503 5.5.1"),
        "MAIL before EHLO"
    );
    t.say("EHLO c\r\n");
    assert!(t.say("RCPT TO:<a@d.example>\r\n").starts_with("503 5.5.1"));
    assert!(t.say("DATA\r\n").starts_with("503 5.5.1"));
    t.say("MAIL FROM:<n@acme.example>\r\n");
    assert!(
        t.say("MAIL FROM:<n@acme.example>\r\n")
            .starts_with("503 5.5.1")
    );
    assert!(
        t.say("DATA\r\n").starts_with("554 5.5.1"),
        "DATA without recipients"
    );
    assert_eq!(t.say("RSET\r\n"), "250 2.0.0 Ok\r\n");
    assert!(
        t.say("RCPT TO:<a@d.example>\r\n").starts_with("503"),
        "RSET ends the transaction"
    );
}

#[test]
fn recipient_limit_is_452_and_the_rest_still_sends() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    t.say("MAIL FROM:<n@acme.example>\r\n");
    for i in 0..3 {
        assert!(
            t.say(&format!("RCPT TO:<r{i}@d.example>\r\n"))
                .starts_with("250")
        );
    }
    let out = t.say("RCPT TO:<r3@d.example>\r\n");
    assert!(out.starts_with("452 4.5.3"), "{out}");
    let ev = t.s.take_events();
    assert!(matches!(&ev[0], Event::Rejected { recipient: Some(r), .. } if r == "r3@d.example"));
    t.say("DATA\r\n");
    let Step::Message(env) = t.send(b"x\r\n.\r\n") else {
        panic!()
    };
    assert_eq!(env.recipients.len(), 3);
}

#[test]
fn mail_is_refused_with_452_while_storage_is_low() {
    let cfg = config();
    let low = cfg.storage_low.clone();
    let mut t = T::new(cfg, true, false);
    t.say("EHLO c\r\n");
    low.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        t.say("MAIL FROM:<n@acme.example>\r\n")
            .starts_with("452 4.3.1")
    );
    low.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(t.say("MAIL FROM:<n@acme.example>\r\n").starts_with("250"));
}

#[test]
fn declared_size_over_the_limit_is_refused_at_mail() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    assert!(
        t.say("MAIL FROM:<n@acme.example> SIZE=10001\r\n")
            .starts_with("552 5.3.4")
    );
    assert!(
        t.say("MAIL FROM:<n@acme.example> SIZE=10000\r\n")
            .starts_with("250")
    );
}

#[test]
fn oversize_data_is_552_after_the_terminator() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    t.say("MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\nDATA\r\n");
    let body = format!("{}\r\n.\r\nNOOP\r\n", "x\r\n".repeat(4000));
    let out = t.say(&body);
    assert_eq!(codes(&out), ["552", "250"], "{out}");
}

#[test]
fn smuggling_in_a_session_refuses_the_message_and_runs_none_of_the_hidden_commands() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    t.say("MAIL FROM:<n@acme.example>\r\nRCPT TO:<a@d.example>\r\nDATA\r\n");
    let out = t.say("Subject: a\r\n\r\nhello\n.\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<v@d.example>\r\nDATA\r\nsmuggled\r\n.\r\n");
    assert_eq!(codes(&out), ["554"], "{out}");
    assert!(out.starts_with("554 5.5.2"));
}

#[test]
fn over_long_command_lines_are_refused_and_the_session_goes_on() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(3000));
    // Delivered in small pieces, as a slow client would.
    t.s.feed(&long.as_bytes()[..1500]);
    assert!(matches!(t.s.advance(), Step::NeedInput));
    t.s.feed(&long.as_bytes()[1500..]);
    assert!(matches!(t.s.advance(), Step::NeedInput));
    assert_eq!(codes(&t.out()), ["500", "250"]);
}

#[test]
fn an_over_long_command_line_arriving_whole_is_refused() {
    let mut t = T::relay();
    let out = t.say(&format!("NOOP {}\r\nNOOP\r\n", "x".repeat(996)));
    assert_eq!(codes(&out), ["500", "250"], "{out}");
    // Exactly at the limit: 1000 bytes including CRLF.
    let out = t.say(&format!("NOOP {}\r\n", "x".repeat(993)));
    assert_eq!(codes(&out), ["250"], "{out}");
}

#[test]
fn long_auth_responses_are_allowed_up_to_the_sasl_limit() {
    let mut t = T::new(config(), false, true);
    t.say("EHLO c\r\n");
    let step = t.send(format!("AUTH PLAIN {}\r\n", "A".repeat(2000)).as_bytes());
    assert!(!matches!(step, Step::Close));
    let out = t.out();
    assert!(!out.starts_with("500"), "{out}");
}

#[test]
fn bare_lf_commands_are_refused() {
    let mut t = T::relay();
    assert!(t.say("EHLO c\n").starts_with("500 5.5.2"));
}

#[test]
fn too_many_protocol_errors_close_the_session() {
    let mut cfg = config();
    cfg.max_errors = 5;
    let mut t = T::new(cfg, true, false);
    for _ in 0..4 {
        t.say("BOGUS\r\n");
    }
    assert!(matches!(t.send(b"BOGUS\r\nNOOP\r\n"), Step::Close));
    let out = t.out();
    assert!(
        out.ends_with("421 4.7.0 Too many errors; closing the connection\r\n"),
        "{out}"
    );
    assert!(!out.contains("250"), "commands after the limit ran");
}

#[test]
fn non_ascii_addresses_need_smtputf8() {
    let mut t = T::relay();
    t.say("EHLO c\r\n");
    let mut cfg = config();
    cfg.policy = Arc::new(Policy::default());
    let mut t2 = T::new(cfg, true, false);
    t2.say("EHLO c\r\n");
    assert!(
        t2.say("MAIL FROM:<δ@παράδειγμα.example>\r\n")
            .starts_with("553 5.6.7")
    );
    assert!(
        t2.say("MAIL FROM:<δ@παράδειγμα.example> SMTPUTF8\r\n")
            .starts_with("250")
    );
    assert!(t2.say("RCPT TO:<ü@bücher.example>\r\n").starts_with("250"));
    t2.say("DATA\r\n");
    let Step::Message(env) = t2.send(b"x\r\n.\r\n") else {
        panic!()
    };
    assert_eq!(env.protocol(), "UTF8SMTP");
    t.say("MAIL FROM:<n@acme.example>\r\n");
    assert!(
        t.say("RCPT TO:<ü@bücher.example>\r\n")
            .starts_with("553 5.6.7")
    );
}

#[test]
fn address_literal_recipients_are_refused() {
    let mut t = T::relay();
    t.say("EHLO c\r\nMAIL FROM:<n@acme.example>\r\n");
    assert!(
        t.say("RCPT TO:<root@[127.0.0.1]>\r\n")
            .starts_with("550 5.1.2")
    );
}

#[test]
fn small_commands() {
    let mut t = T::relay();
    assert!(t.say("VRFY root\r\n").starts_with("252 2.5.0"));
    assert!(t.say("EXPN list\r\n").starts_with("502 5.5.1"));
    assert!(t.say("HELP\r\n").starts_with("214 2.0.0"));
    assert_eq!(t.say("NOOP\r\n"), "250 2.0.0 Ok\r\n");
    assert_eq!(t.say("HELO old.example\r\n"), "250 mx.test\r\n");
    assert!(matches!(t.send(b"QUIT\r\n"), Step::Close));
    assert_eq!(t.out(), "221 2.0.0 Bye\r\n");
}

#[test]
fn every_refusal_is_an_event_with_its_command() {
    let mut t = T::relay();
    t.say("EHLO c\r\nRCPT TO:<a@d.example>\r\nFOO\r\n");
    let ev = t.s.take_events();
    let cmds: Vec<_> = ev
        .iter()
        .map(|e| match e {
            Event::Rejected { command, .. } => *command,
            Event::AuthFailed { .. } => "AUTH",
        })
        .collect();
    assert_eq!(cmds, ["RCPT", "UNKNOWN"]);
}

/// Found by fuzzing (smtp_session): client text echoed in replies broke
/// them. A CR inside an unknown RCPT parameter went into the 555 reply as a
/// bare CR, and a 900-character EHLO name made a 250 line of over 512
/// octets (RFC 5321 4.5.3.1.5).
#[test]
fn client_text_in_replies_stays_one_short_line() {
    let mut t = T::relay();
    let name = "h".repeat(900);
    let out = t.say(&format!("EHLO {name}\r\n"));
    assert!(out.lines().all(|l| l.len() + 2 <= 512), "{out}");
    assert!(out.starts_with(&format!("250-mx.test Hello {}... [", "h".repeat(128))));
    t.say("MAIL FROM:<a@acme.example>\r\n");
    let out = t.say("RCPT TO:<b@dest.example> X\rY=1\r\n");
    assert_eq!(out, "555 5.5.4 Unsupported RCPT TO parameter X?Y\r\n");
    let out = t.say(&format!("RCPT TO:<b@dest.example> {}\r\n", "P".repeat(300)));
    assert_eq!(
        out,
        format!(
            "555 5.5.4 Unsupported RCPT TO parameter {}...\r\n",
            "P".repeat(64)
        )
    );
}
