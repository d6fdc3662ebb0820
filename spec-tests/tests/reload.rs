//! SIGHUP with the real program: the configuration, the certificate and the
//! credentials change for new sessions while sessions already open finish
//! their messages; a configuration that does not load is refused whole and
//! the running one stays. Each reload is on record (ConfigReload).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mta::log::{ConfigReload, Record};
use spec_tests::client::{Client, message};
use spec_tests::server::{DaemonProcess, eventually, offline_queue_ids, queued_id, read_log};

/// A certificate and key written to `<dir>/<name>.pem` / `.key`.
struct Cert {
    pem: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

fn cert(dir: &Path, name: &str) -> Cert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (pem, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&pem, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    Cert {
        pem,
        key,
        der: made.cert.der().to_vec(),
    }
}

/// SHA-256 of a DER certificate in hex, computed here rather than by mta.
fn sha256_hex(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hash(password: &str) -> String {
    mta::auth::hash_password(password).unwrap()
}

fn tenant(name: &str, domain: &str, user: &str, password_hash: &str) -> String {
    format!(
        "\n[[tenants]]\nname = \"{name}\"\nsender_domains = [\"{domain}\"]\n[[tenants.users]]\nname = \"{user}\"\npassword_hash = \"{password_hash}\"\n"
    )
}

/// Everyone authenticates (no relay network), AUTH failures answer at
/// once, and `certificate` is presented.
fn smtp(certificate: &Cert) -> String {
    format!(
        "[smtp]\nrelay_networks = []\nauth_failure_delay = \"0s\"\ntls_certificate = \"{}\"\ntls_private_key = \"{}\"\n",
        certificate.pem.display(),
        certificate.key.display()
    )
}

fn hup(d: &DaemonProcess) {
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
}

fn reloads(d: &DaemonProcess) -> Vec<ConfigReload> {
    read_log(&d.data_dir)
        .into_iter()
        .filter_map(|r| match r {
            Record::ConfigReload(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// Rewrites the config file with `edit`, sends SIGHUP, and returns the
/// reload's record (the `n`th, counting from 1).
fn reload(d: &DaemonProcess, n: usize, edit: impl FnOnce(String) -> String) -> ConfigReload {
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(&d.config_path, edit(text)).unwrap();
    hup(d);
    eventually(&format!("ConfigReload record {n}"), || {
        reloads(d).into_iter().nth(n - 1)
    })
}

/// A session through STARTTLS and AUTH PLAIN; the AUTH reply code.
fn authenticated(d: &DaemonProcess, user: &str, password: &str) -> (Client, u16) {
    let mut c = Client::connect(d.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    let code = c.auth_plain(user, password).code;
    (c, code)
}

fn send(c: &mut Client, from: &str) -> String {
    let replies = c.send_message(from, &["reader@dest.example"], &message(from, "r", "hi"));
    queued_id(replies.last().unwrap())
}

fn reception(d: &DaemonProcess, id: &str) -> mta::log::Reception {
    eventually("the Reception record", || {
        read_log(&d.data_dir).into_iter().find_map(|r| match r {
            Record::Reception(r) if r.queue_id == id => Some(r),
            _ => None,
        })
    })
}

#[test]
fn sighup_applies_new_credentials_networks_tenants_and_certificate_while_open_sessions_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (cert(dir.path(), "first"), cert(dir.path(), "second"));
    let d = DaemonProcess::start(
        dir.path(),
        &format!(
            "{}{}",
            smtp(&first),
            tenant("acme", "acme.example", "acme-app", &hash("old"))
        ),
    );
    // Before: 127.0.0.3 must authenticate like everyone else.
    let mut outside = Client::connect_from("127.0.0.3".parse().unwrap(), d.addr).unwrap();
    outside.ehlo();
    assert_eq!(outside.cmd("MAIL FROM:<news@acme.example>").code, 530);

    // A session in the middle of its message when the reload comes.
    let (mut open, code) = authenticated(&d, "acme-app", "old");
    assert_eq!(code, 235);
    assert_eq!(open.peer_certificate().unwrap(), first.der);
    open.begin_data("news@acme.example", "reader@dest.example");
    open.send("From: <news@acme.example>\r\nSubject: across the reload\r\n\r\n");

    // The new configuration: another certificate, acme-app's password
    // rotated, a new tenant with its user, a relay network, and a key only
    // a restart applies.
    let shop_hash = hash("shop-pw");
    let new_hash = hash("new");
    let record = reload(&d, 1, |text| {
        let text = text
            .replace(first.pem.to_str().unwrap(), second.pem.to_str().unwrap())
            .replace(first.key.to_str().unwrap(), second.key.to_str().unwrap())
            .replace("relay_networks = []", "relay_networks = [\"127.0.0.3/32\"]");
        let old_hash = text
            .lines()
            .find_map(|l| l.strip_prefix("password_hash = \""))
            .unwrap()
            .trim_end_matches('"')
            .to_string();
        format!(
            "{}{}\n[log]\nretention_days = 7\n",
            text.replace(&old_hash, &new_hash),
            tenant("shop", "shop.example", "shop-app", &shop_hash)
        )
    });
    assert_eq!(record.result, "ok", "{record:?}");
    assert_eq!(
        record.file.as_deref(),
        Some(d.config_path.to_str().unwrap())
    );
    assert_eq!(
        record.changed,
        [
            "smtp.tls_certificate",
            "smtp.tls_private_key",
            "smtp.relay_networks",
            "tenants.acme",
            "tenants.shop"
        ]
    );
    assert_eq!(record.needs_restart, ["log.retention_days"]);
    assert_eq!(
        record.tls_certificate_sha256.as_deref(),
        Some(sha256_hex(&second.der).as_str())
    );
    // The warning is logged after the record is written.
    eventually("the needs-a-restart warning", || {
        d.stderr()
            .contains("needs a restart: log.retention_days")
            .then_some(())
    });

    // The open session finishes its message under what it started with.
    open.send("Sent before and after SIGHUP.\r\n.\r\n");
    let r = open.reply();
    assert_eq!(r.code, 250, "{r}");
    let across = queued_id(&r);

    // New sessions: the new certificate, the new password only.
    let (mut c, code) = authenticated(&d, "acme-app", "old");
    assert_eq!(code, 535, "the rotated password still works");
    assert_eq!(c.peer_certificate().unwrap(), second.der);
    assert_eq!(c.auth_plain("acme-app", "new").code, 235);
    let rotated = send(&mut c, "news@acme.example");
    // The new tenant and its user.
    let (mut c, code) = authenticated(&d, "shop-app", "shop-pw");
    assert_eq!(code, 235);
    let shop = send(&mut c, "news@shop.example");
    // The new relay network.
    let mut relay = Client::connect_from("127.0.0.3".parse().unwrap(), d.addr).unwrap();
    relay.ehlo();
    let relayed = send(&mut relay, "news@acme.example");
    // Connected before the reload: still under the old rules.
    assert_eq!(outside.cmd("MAIL FROM:<news@acme.example>").code, 530);

    let r = reception(&d, &across);
    assert_eq!(
        (r.session.auth_user.as_deref(), r.session.tenant.as_deref()),
        (Some("acme-app"), Some("acme"))
    );
    assert_eq!(reception(&d, &shop).session.tenant.as_deref(), Some("shop"));
    let r = reception(&d, &relayed);
    assert_eq!(
        (r.session.auth_user.as_deref(), r.session.tenant.as_deref()),
        (None, Some("acme"))
    );
    let data_dir = d.data_dir.clone();
    assert!(d.terminate().success());
    let queued: BTreeSet<String> = offline_queue_ids(&data_dir).into_iter().collect();
    assert_eq!(queued, BTreeSet::from([across, rotated, shop, relayed]));
}

#[test]
fn a_config_that_does_not_load_is_refused_whole_and_the_old_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (cert(dir.path(), "first"), cert(dir.path(), "second"));
    let good = format!(
        "{}{}",
        smtp(&first),
        tenant("acme", "acme.example", "acme-app", &hash("pw"))
    );
    let d = DaemonProcess::start(dir.path(), &good);
    let running = std::fs::read_to_string(&d.config_path).unwrap();
    let shop = tenant("shop", "shop.example", "shop-app", &hash("shop-pw"));
    let (mut open, code) = authenticated(&d, "acme-app", "pw");
    assert_eq!(code, 235);
    let still_old = |d: &DaemonProcess| {
        let (c, code) = authenticated(d, "shop-app", "shop-pw");
        assert_eq!(code, 535, "a user of the refused configuration logged in");
        assert_eq!(c.peer_certificate().unwrap(), first.der);
        let (_, code) = authenticated(d, "acme-app", "pw");
        assert_eq!(code, 235);
    };

    // A value that does not parse: the record names the file and line.
    let broken = format!("{running}{shop}\n[log]\nretention_days = \"soon\"\n");
    let line = broken
        .lines()
        .position(|l| l.starts_with("retention_days"))
        .unwrap()
        + 1;
    let r = reload(&d, 1, |_| broken.clone());
    assert_eq!(r.result, "refused");
    let error = r.error.unwrap();
    assert!(
        error.starts_with(&format!("{}:{line}:", d.config_path.display())),
        "{error}"
    );
    assert!(r.changed.is_empty() && r.tls_certificate_sha256.is_none());
    // Logged after the record is written.
    eventually("the refusal in the daemon's log", || {
        d.stderr()
            .contains("the new configuration is refused; the running configuration")
            .then_some(())
    });
    still_old(&d);

    // A certificate file that is not there.
    let missing = dir.path().join("renewed.pem");
    let r = reload(&d, 2, |_| {
        format!("{running}{shop}").replace(first.pem.to_str().unwrap(), missing.to_str().unwrap())
    });
    assert_eq!(r.result, "refused");
    assert!(r.error.as_deref().unwrap().contains("renewed.pem"), "{r:?}");
    still_old(&d);

    // A key that does not belong to the certificate.
    let r = reload(&d, 3, |_| {
        format!("{running}{shop}")
            .replace(first.pem.to_str().unwrap(), second.pem.to_str().unwrap())
    });
    assert_eq!(r.result, "refused");
    assert!(
        r.error.as_deref().unwrap().contains("do not fit together"),
        "{r:?}"
    );
    still_old(&d);

    // The session open all along still sends; then a good file applies.
    let kept = send(&mut open, "news@acme.example");
    let r = reload(&d, 4, |_| format!("{running}{shop}"));
    assert_eq!(
        (r.result.as_str(), r.changed.as_slice()),
        ("ok", &["tenants.shop".to_string()][..])
    );
    let (mut c, code) = authenticated(&d, "shop-app", "shop-pw");
    assert_eq!(code, 235);
    let shop_id = send(&mut c, "news@shop.example");
    let data_dir = d.data_dir.clone();
    assert!(d.terminate().success());
    let queued: BTreeSet<String> = offline_queue_ids(&data_dir).into_iter().collect();
    assert_eq!(queued, BTreeSet::from([kept, shop_id]));
}

#[test]
fn sighup_turns_spf_from_warn_to_enforce_and_checks_a_new_tenants_domain() {
    // Both domains' SPF records omit our egress IP 127.0.0.9.
    let failing = "@ 1 IN TXT \"v=spf1 ip4:192.0.2.1 -all\"\n";
    let dns =
        spec_tests::dns::DnsServer::start(&[("acme.example", failing), ("shop.example", failing)]);
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(
        dir.path(),
        &format!(
            "[dns]\nnameservers = [\"{}\"]\n[spf]\npolicy = \"warn\"\n[[egress]]\naddress = \"127.0.0.9\"\n[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\n",
            dns.addr
        ),
    );
    let session = || {
        let mut c = Client::connect(d.addr);
        c.ehlo();
        c
    };
    let spf_checked = |domain: &str| {
        read_log(&d.data_dir)
            .into_iter()
            .any(|r| matches!(r, Record::SpfChange(c) if c.domain == domain && c.result == "fail"))
    };
    eventually("acme.example checked at start", || {
        spf_checked("acme.example").then_some(())
    });
    let mut before = session();
    // Under warn a failing sender is only noted.
    assert_eq!(before.cmd("MAIL FROM:<news@acme.example>").code, 250);
    assert_eq!(before.cmd("RSET").code, 250);
    assert!(!spf_checked("shop.example"));

    let r = reload(&d, 1, |text| {
        format!(
            "{}\n[[tenants]]\nname = \"shop\"\nsender_domains = [\"shop.example\"]\n",
            text.replace("policy = \"warn\"", "policy = \"enforce\"")
        )
    });
    assert_eq!(r.result, "ok", "{r:?}");
    assert_eq!(r.changed, ["tenants.shop", "spf.policy"]);
    assert!(r.needs_restart.is_empty(), "{r:?}");
    // The new tenant's domain is checked at once, without any mail from it.
    eventually("shop.example checked after the reload", || {
        spf_checked("shop.example").then_some(())
    });
    let refused = session().cmd("MAIL FROM:<news@acme.example>");
    assert_eq!(
        (refused.code, refused.enhanced()),
        (550, Some("5.7.23")),
        "{refused}"
    );
    // The session from before the reload stays under warn.
    assert_eq!(before.cmd("MAIL FROM:<news@acme.example>").code, 250);
}

#[test]
fn a_key_only_a_restart_applies_is_named_and_the_running_value_stays() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProcess::start(dir.path(), "");
    let elsewhere = dir.path().join("elsewhere");
    let r = reload(&d, 1, |text| {
        text.replace(d.data_dir.to_str().unwrap(), elsewhere.to_str().unwrap())
    });
    assert_eq!(r.result, "ok", "{r:?}");
    assert!(r.changed.is_empty(), "{r:?}");
    assert_eq!(r.needs_restart, ["data_dir"]);
    // The generated certificate of the running data directory still
    // serves; nothing was generated (or written) in the new one.
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let running = CertificateDer::from_pem_file(d.data_dir.join("tls/self-signed.pem")).unwrap();
    assert_eq!(
        r.tls_certificate_sha256.as_deref(),
        Some(sha256_hex(&running).as_str())
    );
    assert!(!elsewhere.exists());
    let mut c = Client::connect(d.addr);
    c.ehlo();
    c.starttls();
    assert_eq!(c.peer_certificate().unwrap(), running.as_ref());
    eventually("the needs-a-restart warning", || {
        d.stderr()
            .contains("needs a restart: data_dir")
            .then_some(())
    });
}
