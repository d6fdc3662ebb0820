//! Submission with independent client implementations, over STARTTLS with
//! AUTH (RFC 3207, RFC 4954): lettre, Python's smtplib and swaks. Each test
//! checks the Reception record and the stored message.

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use queue::QueueId;
use spec_tests::server::{TestServer, tenants_toml};

fn server() -> TestServer {
    // No relay without AUTH: these clients must authenticate.
    TestServer::start(&format!("[smtp]\nrelay_networks = []\n{}", tenants_toml()))
}

/// The stored content of a queued message.
fn stored(server: &TestServer, id: &str) -> String {
    let id: QueueId = id.parse().expect("a queue id");
    String::from_utf8(server.queue().content(id).expect("queued")).unwrap()
}

fn id_from(text: &str) -> String {
    text.split("queued as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in {text:?}"))
        .to_string()
}

#[test]
fn lettre_over_starttls_with_auth_plain_and_login() {
    let server = server();
    for mechanism in [Mechanism::Plain, Mechanism::Login] {
        let tls = TlsParameters::builder("localhost".into())
            .dangerous_accept_invalid_certs(true)
            .build_rustls()
            .unwrap();
        let mailer = SmtpTransport::builder_dangerous("127.0.0.1")
            .port(server.addr.port())
            .tls(Tls::Required(tls))
            .hello_name(ClientId::Domain("lettre.test".into()))
            .credentials(Credentials::new("acme-app".into(), "s3cret".into()))
            .authentication(vec![mechanism])
            .build();
        let email = Message::builder()
            .from("Acme News <news@acme.example>".parse::<Mailbox>().unwrap())
            .to("a@dest.example".parse::<Mailbox>().unwrap())
            .to("b@other.example".parse::<Mailbox>().unwrap())
            .subject(format!("lettre {mechanism:?}"))
            .body(String::from("Hello from lettre.\r\n"))
            .unwrap();
        let response = mailer.send(&email).expect("lettre sends");
        assert_eq!(u16::from(response.code()), 250);
        let id = id_from(&response.message().collect::<Vec<_>>().join(" "));

        let rec = server.reception(&id);
        assert_eq!(rec.session.auth_user.as_deref(), Some("acme-app"));
        assert_eq!(rec.session.tenant.as_deref(), Some("acme"));
        assert_eq!(rec.session.helo.as_deref(), Some("lettre.test"));
        assert!(
            rec.session
                .tls_version
                .as_deref()
                .unwrap()
                .starts_with("TLSv1.")
        );
        assert!(rec.session.tls_cipher.is_some());
        assert_eq!(rec.protocol, "ESMTPSA");
        assert_eq!(rec.sender, "news@acme.example");
        assert_eq!(rec.recipients, ["a@dest.example", "b@other.example"]);

        let content = stored(&server, &id);
        assert!(
            content.starts_with("Received: from lettre.test"),
            "{content}"
        );
        assert!(content.contains(&format!("Subject: lettre {mechanism:?}")));
        assert!(content.contains("Hello from lettre."));
        assert_eq!(rec.size, content.len() as u64);
        let queued = server.queue().get(id.parse().unwrap()).unwrap();
        assert_eq!(queued.tenant.as_deref(), Some("acme"));
        assert_eq!(queued.recipients.len(), 2);
    }
}

const SMTPLIB: &str = r#"
import smtplib, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", port, local_hostname="python.test", timeout=20)
s.ehlo()
assert not s.has_extn("auth"), "AUTH offered before TLS"
s.starttls(context=ctx)
s.ehlo()
assert s.has_extn("auth"), "AUTH missing after TLS"
print("tls", s.sock.version())
try:
    s.login("acme-app", "wrong password")
    sys.exit("login with a wrong password succeeded")
except smtplib.SMTPAuthenticationError as e:
    print("refused", e.smtp_code, e.smtp_error.decode())
s.login("acme-app", "s3cret")
code, text = s.mail("news@acme.example")
assert code == 250, (code, text)
for r in ["x@dest.example", "y@dest.example"]:
    code, text = s.rcpt(r)
    assert code == 250, (code, text)
msg = (
    "From: Acme <news@acme.example>\r\n"
    "To: x@dest.example\r\n"
    "Subject: from smtplib\r\n"
    "Message-ID: <smtplib-1@acme.example>\r\n"
    "\r\n"
    ".a line that needs dot-stuffing\r\n"
    "Bye\r\n"
)
code, text = s.data(msg)
assert code == 250, (code, text)
print("queued", text.decode())
s.quit()
"#;

#[test]
fn python_smtplib_over_starttls_with_auth() {
    let server = server();
    let run = spec_tests::tools::python(SMTPLIB, &[&server.addr.port().to_string()]);
    assert_eq!(
        run.code, 0,
        "smtplib failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("refused 535 5.7.8"), "{}", run.stdout);
    let id = id_from(&run.stdout);

    let rec = server.reception(&id);
    assert_eq!(rec.session.auth_user.as_deref(), Some("acme-app"));
    assert_eq!(rec.session.helo.as_deref(), Some("python.test"));
    assert_eq!(rec.message_id.as_deref(), Some("<smtplib-1@acme.example>"));
    assert_eq!(rec.recipients, ["x@dest.example", "y@dest.example"]);
    let content = stored(&server, &id);
    assert!(
        content.contains("\r\n.a line that needs dot-stuffing\r\n"),
        "{content}"
    );
    assert_eq!(
        content.matches("Message-ID:").count(),
        1,
        "the client's Message-ID is kept"
    );

    // The failed login is on record, with the user name and without the password.
    let failure = server.wait_for("the AuthFailure record", |rs| {
        rs.iter().find_map(|r| match r {
            mta::log::Record::AuthFailure(f) => Some(f.clone()),
            _ => None,
        })
    });
    assert_eq!(failure.user, "acme-app");
    assert_eq!(failure.reason, "invalid credentials");
    assert_eq!(failure.reply.code, 535);
    let log_text = std::fs::read_dir(server.data_dir().join("log"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(
        !log_text.contains("wrong password") && !log_text.contains("s3cret"),
        "a password reached the log"
    );
}

#[test]
fn swaks_over_starttls_with_auth_and_pipelining() {
    let server = server();
    let run = spec_tests::tools::swaks(&[
        "--server",
        &server.addr.to_string(),
        "--ehlo",
        "swaks.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "acme-app",
        "--auth-password",
        "s3cret",
        "--from",
        "news@acme.example",
        "--to",
        "a@dest.example,b@dest.example",
        "--pipeline",
        "--header",
        "Subject: from swaks",
        "--body",
        "Hello from swaks.",
        "--timeout",
        "20",
    ]);
    assert_eq!(run.code, 0, "swaks failed:\n{}\n{}", run.stdout, run.stderr);
    let id = id_from(&run.stdout);
    let rec = server.reception(&id);
    assert_eq!(rec.session.helo.as_deref(), Some("swaks.test"));
    assert_eq!(rec.session.auth_user.as_deref(), Some("acme-app"));
    assert_eq!(rec.recipients, ["a@dest.example", "b@dest.example"]);
    assert!(stored(&server, &id).contains("Subject: from swaks"));
}

#[test]
fn swaks_without_auth_is_refused_530_and_nothing_is_queued() {
    let server = server();
    let run = spec_tests::tools::swaks(&[
        "--server",
        &server.addr.to_string(),
        "--tls",
        "--from",
        "news@acme.example",
        "--to",
        "a@dest.example",
        "--timeout",
        "20",
    ]);
    assert_ne!(run.code, 0);
    assert!(run.stdout.contains("530 5.7.0"), "{}", run.stdout);
    server.rejection("the 530 at MAIL", |r| {
        r.command == "MAIL" && r.reply.code == 530
    });
    assert!(server.queue().is_empty());
}
