//! DKIM signing (RFC 6376, RFC 8463) checked by verifiers no one here
//! wrote: mail-auth's verifier (over a real DNS server on loopback) and
//! dkimpy (with a DNS stub). Every signature of every message must verify
//! in both; a message changed after signing must fail in both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dkim_keys::{Algorithm, PrivateKey, record};
use mail_auth::common::cache::NoCache;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters};
use mta::log::Record;
use spec_tests::client::Client;
use spec_tests::dns::{DnsServer, txt_line};
use spec_tests::server::{TestServer, metric, queued_id, tenants_toml};

/// Keys written into a directory, with their DNS records.
struct Keys {
    _dir: tempfile::TempDir,
    /// (domain, selector, algorithm, path)
    keys: Vec<(String, String, Algorithm, PathBuf)>,
    /// TXT records by owner name.
    records: BTreeMap<String, String>,
}

fn keys(wanted: &[(&str, &str, Algorithm)]) -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    let mut records = BTreeMap::new();
    for (domain, selector, alg) in wanted {
        let key = PrivateKey::generate(
            *alg,
            if *alg == Algorithm::RsaSha256 {
                2048
            } else {
                256
            },
        )
        .unwrap();
        let path = dkim_keys::key_path(dir.path(), domain, selector);
        key.write_new(&path).unwrap();
        records.insert(
            record::record_name(selector, domain),
            record::record_value(&key),
        );
        keys.push((domain.to_string(), selector.to_string(), *alg, path));
    }
    Keys {
        _dir: dir,
        keys,
        records,
    }
}

impl Keys {
    fn toml(&self) -> String {
        self.keys
            .iter()
            .map(|(d, s, a, p)| {
                format!(
                    "[[dkim.keys]]\ndomain = \"{d}\"\nselector = \"{s}\"\nalgorithm = \"{a}\"\nprivate_key = \"{}\"\n",
                    p.display()
                )
            })
            .collect()
    }

    /// Zone lines publishing every key under `origin`.
    fn zone(&self, origin: &str) -> String {
        self.records
            .iter()
            .filter_map(|(name, value)| {
                let owner = name.strip_suffix(&format!(".{origin}"))?;
                Some(txt_line(owner, value))
            })
            .collect()
    }
}

/// A message, its MAIL FROM parameters, and a short name.
struct Sample {
    name: &'static str,
    params: &'static str,
    content: String,
}

fn samples() -> Vec<Sample> {
    let base = "From: Acme News <news@acme.example>\r\nTo: reader@dest.example\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{name}@acme.example>\r\n";
    let with = |name: &str, extra: &str, body: &str| {
        format!("{}{extra}\r\n{body}", base.replace("{name}", name))
    };
    vec![
        Sample {
            name: "plain",
            params: "",
            content: with(
                "plain",
                "Subject: Plain text\r\n",
                "Hello, reader.\r\nThis is plain text.\r\n",
            ),
        },
        Sample {
            name: "multipart",
            params: "",
            content: with(
                "multipart",
                "Subject: Multipart\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n",
                "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nPlain part.\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>HTML =E2=82=AC part</p>\r\n--b1--\r\n",
            ),
        },
        Sample {
            name: "eightbit",
            params: " BODY=8BITMIME",
            content: with(
                "eightbit",
                "Subject: 8-bit body\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
                "Grüße aus Köln — 10 € Rabatt.\r\n",
            ),
        },
        Sample {
            name: "utf8-headers",
            params: " SMTPUTF8 BODY=8BITMIME",
            content: with(
                "utf8-headers",
                "Subject: Grüße und 🎉 für alle\r\nReply-To: Zoë <zoe@acme.example>\r\n",
                "UTF-8 in the headers.\r\n",
            ),
        },
        Sample {
            name: "folded",
            params: "",
            content: with(
                "folded",
                "Subject: A very long subject line that the sender folded\r\n\tacross several lines, with tabs\r\n  and spaces at the start of each\r\nCc: one@dest.example, two@dest.example, three@dest.example,\r\n four@dest.example, five@dest.example\r\nReferences: <a@x.example> <b@x.example>\r\n <c@x.example>\r\n",
                "Folded   headers,   and    runs of  spaces   in the body.  \r\n",
            ),
        },
        Sample {
            name: "trailing-blank-lines",
            params: "",
            content: with(
                "trailing-blank-lines",
                "Subject: Trailing blank lines\r\n",
                "Text.\r\n\r\n\r\n\r\n",
            ),
        },
        Sample {
            name: "list-headers",
            params: "",
            content: with(
                "list-headers",
                "Subject: Newsletter\r\nList-Unsubscribe: <mailto:unsub@acme.example>, <https://acme.example/u/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nFeedback-ID: c1:acme:news\r\n",
                "Unsubscribe any time.\r\n",
            ),
        },
        Sample {
            // Above mta's INLINE_SIGN_BYTES: signed on the blocking pool
            // rather than on the session's task.
            name: "large",
            params: "",
            content: with(
                "large",
                "Subject: A long newsletter\r\n",
                &(0..8000)
                    .map(|i| format!("Paragraph {i} of a long newsletter, as campaigns send.\r\n"))
                    .collect::<String>(),
            ),
        },
    ]
}

/// Submits a message as acme-app; returns the queue ID.
fn submit(server: &TestServer, from: &str, params: &str, content: &str) -> String {
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    assert_eq!(c.auth_plain("acme-app", "s3cret").code, 235);
    let r = c.cmd(&format!("MAIL FROM:<{from}>{params}"));
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(c.cmd("RCPT TO:<reader@dest.example>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    let mut body = String::new();
    for line in content.split_inclusive("\r\n") {
        if line.starts_with('.') {
            body.push('.');
        }
        body.push_str(line);
    }
    c.send(format!("{body}.\r\n"));
    queued_id(&c.reply())
}

fn stored(server: &TestServer, id: &str) -> Vec<u8> {
    server.queue().content(id.parse().unwrap()).unwrap()
}

/// Verifies with mail-auth; returns (selector, passed) per signature.
fn verify_mail_auth(dns: &DnsServer, message: &[u8]) -> Vec<(String, bool)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resolver = mta::dns::resolver_for(&[dns.addr]).unwrap();
        let auth = MessageAuthenticator(resolver);
        let msg = AuthenticatedMessage::parse(message).expect("parsable message");
        let params: Parameters<
            '_,
            _,
            NoCache<_, _>,
            NoCache<_, _>,
            NoCache<_, _>,
            NoCache<_, _>,
            NoCache<_, _>,
        > = Parameters::new(&msg);
        auth.verify_dkim(params)
            .await
            .iter()
            .map(|o| {
                let selector = o.signature().map(|s| s.s.clone()).unwrap_or_default();
                let pass = matches!(o.result(), DkimResult::Pass);
                if !pass {
                    eprintln!("mail-auth: {selector}: {:?}", o.result());
                }
                (selector, pass)
            })
            .collect()
    })
}

const DKIMPY: &str = r#"
import dkim, json, sys
message = open(sys.argv[1], "rb").read()
records = json.load(open(sys.argv[2]))
def dns(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    value = records.get(name.rstrip("."))
    return value.encode() if value else None
d = dkim.DKIM(message)
head = message.split(b"\r\n\r\n", 1)[0]
count = sum(1 for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
out = []
for i in range(count):
    try:
        ok = d.verify(idx=i, dnsfunc=dns)
    except dkim.NaClNotFoundError:
        sys.exit("dkimpy needs PyNaCl for Ed25519: pip install pynacl (spec-tests/run-tests.sh does)")
    except Exception as e:
        print("dkimpy error:", e, file=sys.stderr)
        ok = False
    out.append(bool(ok))
print(json.dumps(out))
"#;

/// Verifies with dkimpy; returns pass/fail per signature.
fn verify_dkimpy(records: &BTreeMap<String, String>, message: &[u8], dir: &Path) -> Vec<bool> {
    let msg = dir.join("message.eml");
    let recs = dir.join("records.json");
    std::fs::write(&msg, message).unwrap();
    std::fs::write(&recs, serde_json::to_string(records).unwrap()).unwrap();
    let run = spec_tests::tools::python(DKIMPY, &[msg.to_str().unwrap(), recs.to_str().unwrap()]);
    assert_eq!(
        run.code, 0,
        "dkimpy failed to run:\n{}\n{}",
        run.stdout, run.stderr
    );
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

fn dkim_header_tags(message: &[u8]) -> Vec<BTreeMap<String, String>> {
    let text = String::from_utf8_lossy(message);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("\r\n\t", " ")
        .replace("\r\n ", " ");
    head.lines()
        .filter_map(|l| l.strip_prefix("DKIM-Signature:"))
        .map(|v| {
            v.split(';')
                .filter_map(|t| {
                    let (k, v) = t.split_once('=')?;
                    Some((
                        k.trim().to_string(),
                        v.split_whitespace().collect::<String>(),
                    ))
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_message_is_dual_signed_and_verifies_with_two_independent_verifiers() {
    let keys = keys(&[
        ("acme.example", "rsa2026", Algorithm::RsaSha256),
        ("acme.example", "ed2026", Algorithm::Ed25519Sha256),
    ]);
    let dns = DnsServer::start(&[("acme.example", &keys.zone("acme.example"))]);
    let server = TestServer::start(&format!(
        "[smtp]\nrelay_networks = []\n[dkim]\nunsigned = \"reject\"\n{}{}",
        keys.toml(),
        tenants_toml()
    ));
    let work = tempfile::tempdir().unwrap();
    let samples = samples();
    assert!(
        samples
            .iter()
            .any(|s| s.content.len() > mta::sign::INLINE_SIGN_BYTES),
        "a sample is signed on the blocking pool"
    );
    for s in &samples {
        let id = submit(&server, "news@acme.example", s.params, &s.content);
        let message = stored(&server, &id);
        assert!(
            message.starts_with(b"DKIM-Signature: "),
            "{}: not signed on top",
            s.name
        );

        let tags = dkim_header_tags(&message);
        assert_eq!(tags.len(), 2, "{}: dual signing", s.name);
        let algs: Vec<&str> = tags.iter().map(|t| t["a"].as_str()).collect();
        assert_eq!(algs, ["rsa-sha256", "ed25519-sha256"], "{}", s.name);
        for t in &tags {
            assert_eq!(t["d"], "acme.example");
            assert_eq!(t["c"], "relaxed/relaxed");
            assert!(t.contains_key("t"), "t= is always there");
            assert!(!t.contains_key("x"), "x= only when configured");
            let h: Vec<String> = t["h"].split(':').map(|x| x.to_ascii_lowercase()).collect();
            // Over-signed: one more than present (From, To, Subject, Date,
            // Message-ID), or listed although absent (List-Unsubscribe).
            for name in ["from", "to", "subject", "date", "message-id"] {
                assert_eq!(
                    h.iter().filter(|x| *x == name).count(),
                    2,
                    "{}: {name} in h={}",
                    s.name,
                    t["h"]
                );
            }
            assert!(h.contains(&"list-unsubscribe".to_string()));
            assert!(!h.contains(&"received".to_string()));
            // Present optional headers are signed; absent ones are not listed.
            let has = |n: &str| {
                s.content
                    .to_ascii_lowercase()
                    .contains(&format!("\r\n{n}:"))
            };
            for name in [
                "cc",
                "reply-to",
                "references",
                "mime-version",
                "content-type",
                "list-unsubscribe-post",
                "feedback-id",
            ] {
                assert_eq!(
                    h.contains(&name.to_string()),
                    has(name),
                    "{}: {name} in h={}",
                    s.name,
                    t["h"]
                );
            }
        }

        let ma = verify_mail_auth(&dns, &message);
        assert_eq!(ma.len(), 2, "{}", s.name);
        assert!(
            ma.iter().all(|(_, ok)| *ok),
            "{}: mail-auth: {ma:?}",
            s.name
        );
        let py = verify_dkimpy(&keys.records, &message, work.path());
        assert_eq!(py, [true, true], "{}: dkimpy", s.name);

        let rec = server.reception(&id);
        let signed: Vec<(String, String)> = rec
            .dkim
            .iter()
            .map(|d| (d.selector.clone(), d.algorithm.clone()))
            .collect();
        assert_eq!(
            signed,
            [
                ("rsa2026".to_string(), "rsa-sha256".to_string()),
                ("ed2026".to_string(), "ed25519-sha256".to_string())
            ]
        );
        assert_eq!(rec.dkim_unsigned, None);
    }

    // Changes after signing fail in both verifiers.
    let id = submit(&server, "news@acme.example", "", &samples[0].content);
    let message = String::from_utf8(stored(&server, &id)).unwrap();
    let tampered = [
        (
            "body",
            message.replace("This is plain text.", "This is plain text!"),
        ),
        (
            "subject",
            message.replace("Subject: Plain text", "Subject: Plain text (changed)"),
        ),
        (
            "added From",
            message.replacen(
                "DKIM-Signature:",
                "From: ceo@bank.example\r\nDKIM-Signature:",
                1,
            ),
        ),
        ("added Subject", format!("Subject: Act now\r\n{message}")),
        (
            "added List-Unsubscribe",
            message.replacen(
                "\r\n\r\n",
                "\r\nList-Unsubscribe: <https://evil.example>\r\n\r\n",
                1,
            ),
        ),
    ];
    for (what, m) in tampered {
        let ma = verify_mail_auth(&dns, m.as_bytes());
        assert!(
            ma.iter().all(|(_, ok)| !ok),
            "{what}: mail-auth passed {ma:?}"
        );
        let py = verify_dkimpy(&keys.records, m.as_bytes(), work.path());
        assert_eq!(py, [false, false], "{what}: dkimpy passed");
    }

    // Counted by algorithm, and timed.
    let text = server.scrape();
    let n = samples.len() as f64 + 1.0;
    assert_eq!(
        metric(&text, "mta_dkim_signatures_total{algorithm=\"rsa-sha256\"}"),
        Some(n)
    );
    assert_eq!(
        metric(
            &text,
            "mta_dkim_signatures_total{algorithm=\"ed25519-sha256\"}"
        ),
        Some(n)
    );
    assert_eq!(
        metric(&text, "mta_dkim_signing_duration_seconds_count"),
        Some(n)
    );
}

#[test]
fn expiration_is_signed_when_configured() {
    let keys = keys(&[("acme.example", "s1", Algorithm::Ed25519Sha256)]);
    let server = TestServer::start(&format!(
        "[dkim]\nexpiration = \"7d\"\n{}{}",
        keys.toml(),
        tenants_toml()
    ));
    let id = submit(&server, "news@acme.example", "", &samples()[0].content);
    let tags = &dkim_header_tags(&stored(&server, &id))[0];
    let t: u64 = tags["t"].parse().unwrap();
    let x: u64 = tags["x"].parse().unwrap();
    assert_eq!(x - t, 7 * 86400);
}

#[test]
fn without_a_key_the_unsigned_policy_decides() {
    let keys = keys(&[("esp.example", "s1", Algorithm::Ed25519Sha256)]);
    // reject: refused at the end of DATA, logged, nothing queued.
    let server = TestServer::start(&format!(
        "[dkim]\nunsigned = \"reject\"\n{}{}",
        keys.toml(),
        tenants_toml()
    ));
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    c.auth_plain("acme-app", "s3cret");
    let replies = c.send_message(
        "news@acme.example",
        &["reader@dest.example"],
        &samples()[0].content,
    );
    let last = replies.last().unwrap();
    assert_eq!((last.code, last.enhanced()), (550, Some("5.7.1")), "{last}");
    assert!(
        last.text().contains("no DKIM key for acme.example"),
        "{last}"
    );
    let rej = server.rejection("the DATA rejection", |r| r.command == "DATA");
    assert_eq!(rej.reply.code, 550);
    assert!(server.queue().is_empty());
    drop(server);

    // accept: sent unsigned, logged with the reason, counted.
    let server = TestServer::start(&format!(
        "[dkim]\nunsigned = \"accept\"\n{}{}",
        keys.toml(),
        tenants_toml()
    ));
    let id = submit(&server, "news@acme.example", "", &samples()[0].content);
    assert!(!stored(&server, &id).starts_with(b"DKIM-Signature"));
    let rec = server.reception(&id);
    assert!(rec.dkim.is_empty());
    assert!(
        rec.dkim_unsigned
            .as_deref()
            .unwrap()
            .contains("acme.example")
    );
    assert_eq!(
        metric(&server.scrape(), "mta_dkim_unsigned_total"),
        Some(1.0)
    );
}

#[test]
fn a_tenant_without_keys_of_its_own_signs_with_its_fallback_domain() {
    let keys = keys(&[("esp.example", "t1", Algorithm::RsaSha256)]);
    let dns = DnsServer::start(&[("esp.example", &keys.zone("esp.example"))]);
    let tenants = tenants_toml().replacen(
        "name = \"acme\"\n",
        "name = \"acme\"\nsigning_domain = \"esp.example\"\n",
        1,
    );
    let server = TestServer::start(&format!(
        "[dkim]\nunsigned = \"reject\"\n{}{tenants}",
        keys.toml()
    ));
    let id = submit(&server, "news@acme.example", "", &samples()[0].content);
    let message = stored(&server, &id);
    assert_eq!(dkim_header_tags(&message)[0]["d"], "esp.example");
    assert!(verify_mail_auth(&dns, &message).iter().all(|(_, ok)| *ok));
    // Another tenant has no fallback: refused.
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    c.auth_plain("bank-app", "vault");
    let replies = c.send_message(
        "news@bank.example",
        &["reader@dest.example"],
        &samples()[0].content.replace("acme.example", "bank.example"),
    );
    assert_eq!(replies.last().unwrap().code, 550);
}

fn cli(args: &[&str]) -> (i32, String, String) {
    spec_tests::server::run_cli(args, None)
}

#[test]
fn dkim_check_against_a_real_dns_server() {
    let keys = keys(&[
        ("acme.example", "good", Algorithm::RsaSha256),
        ("acme.example", "goodEd", Algorithm::Ed25519Sha256),
        ("acme.example", "other", Algorithm::RsaSha256),
        ("acme.example", "missing", Algorithm::Ed25519Sha256),
        ("acme.example", "broken", Algorithm::Ed25519Sha256),
        ("acme.example", "revoked", Algorithm::RsaSha256),
        ("bank.example", "s1", Algorithm::Ed25519Sha256),
    ]);
    let stranger = PrivateKey::generate(Algorithm::RsaSha256, 2048).unwrap();
    let mut zone = String::new();
    zone += &txt_line(
        "good._domainkey",
        &keys.records["good._domainkey.acme.example"],
    );
    zone += &txt_line(
        "goodEd._domainkey",
        &keys.records["goodEd._domainkey.acme.example"],
    );
    zone += &txt_line("other._domainkey", &record::record_value(&stranger));
    zone += "broken._domainkey IN TXT \"v=DKIM1; k=ed25519; p=@@@\"\n";
    zone += "revoked._domainkey IN TXT \"v=DKIM1; k=rsa; p=\"\n";
    let dns = DnsServer::start(&[
        ("acme.example", &zone),
        ("bank.example", &keys.zone("bank.example")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mta.toml");
    // Several keys per domain and algorithm, so all but one are inactive.
    let toml = keys
        .toml()
        .replace(
            "selector = \"other\"\n",
            "selector = \"other\"\nactive = false\n",
        )
        .replace(
            "selector = \"revoked\"\n",
            "selector = \"revoked\"\nactive = false\n",
        )
        .replace(
            "selector = \"missing\"\n",
            "selector = \"missing\"\nactive = false\n",
        )
        .replace(
            "selector = \"broken\"\n",
            "selector = \"broken\"\nactive = false\n",
        );
    std::fs::write(
        &config,
        format!("[dns]\nnameservers = [\"{}\"]\n{toml}", dns.addr),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();

    let (code, out, err) = cli(&["dkim", "check", "--config", cfg, "--json"]);
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results: BTreeMap<String, String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                format!(
                    "{}/{}",
                    r["domain"].as_str().unwrap(),
                    r["selector"].as_str().unwrap()
                ),
                r["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = [
        ("acme.example/good", "matching"),
        ("acme.example/goodEd", "matching"),
        ("acme.example/other", "different-key"),
        ("acme.example/missing", "missing"),
        ("acme.example/broken", "syntax-error"),
        ("acme.example/revoked", "revoked"),
        ("bank.example/s1", "matching"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(results, want);

    let (code, out, _) = cli(&["dkim", "check", "--config", cfg, "--domain", "bank.example"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("published and matching"), "{out}");

    let (code, out, _) = cli(&["dkim", "check", "--config", cfg]);
    assert_eq!(code, 1);
    assert!(
        out.contains("published, but with a different key") && out.contains("revoked (empty p=)"),
        "{out}"
    );
}

#[test]
fn dkim_generate_dns_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = dir.path().join("keys");
    let kd = keys_dir.to_str().unwrap();
    let (code, out, err) = cli(&[
        "dkim",
        "generate",
        "--domain",
        "acme.example",
        "--selector",
        "s2026a",
        "--dir",
        kd,
    ]);
    assert_eq!(code, 0, "{err}");
    let path = keys_dir.join("acme.example.s2026a.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        out.contains("s2026a._domainkey.acme.example. IN TXT ( \"v=DKIM1; k=rsa; p="),
        "{out}"
    );
    // Each quoted string fits a DNS character-string.
    for part in out.split('"').skip(1).step_by(2) {
        assert!(part.len() <= 255, "{} octets", part.len());
    }
    // The record shown again from the file is the same.
    let (code, again, _) = cli(&[
        "dkim",
        "dns",
        "--domain",
        "acme.example",
        "--selector",
        "s2026a",
        "--dir",
        kd,
    ]);
    assert_eq!(code, 0);
    let zone_line = |s: &str| {
        s.lines()
            .skip_while(|l| !l.contains("IN TXT"))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(zone_line(&again), zone_line(&out));
    // Never overwritten; odd sizes refused.
    let (code, _, err) = cli(&[
        "dkim",
        "generate",
        "--domain",
        "acme.example",
        "--selector",
        "s2026a",
        "--dir",
        kd,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("exists already"), "{err}");
    let (code, _, err) = cli(&[
        "dkim",
        "generate",
        "--domain",
        "acme.example",
        "--selector",
        "small",
        "--bits",
        "512",
        "--dir",
        kd,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("refused"), "{err}");
    let (code, out, _) = cli(&[
        "dkim",
        "generate",
        "--domain",
        "acme.example",
        "--selector",
        "ed",
        "--algorithm",
        "ed25519-sha256",
        "--dir",
        kd,
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ed._domainkey.acme.example. IN TXT \"v=DKIM1; k=ed25519; p="),
        "{out}"
    );

    let config = dir.path().join("mta.toml");
    std::fs::write(
        &config,
        format!(
            "[[dkim.keys]]\ndomain = \"acme.example\"\nselector = \"s2026a\"\nalgorithm = \"rsa-sha256\"\nprivate_key = \"{}\"\n[[dkim.keys]]\ndomain = \"acme.example\"\nselector = \"ed\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{}\"\nactive = false\n",
            path.display(),
            keys_dir.join("acme.example.ed.pem").display()
        ),
    )
    .unwrap();
    let (code, out, err) = cli(&[
        "dkim",
        "list",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["bits"], 2048);
    assert_eq!(v[0]["active"], true);
    assert_eq!(v[1]["algorithm"], "ed25519-sha256");
    assert_eq!(v[1]["active"], false);
    // A key that no longer loads shows up with its error, and exit 1.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, _) = cli(&["dkim", "list", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("loose permissions"), "{out}");
}

#[test]
fn a_bad_key_file_stops_start_up_with_the_file_and_the_reason() {
    let keys = keys(&[("acme.example", "s1", Algorithm::Ed25519Sha256)]);
    let path = &keys.keys[0].3;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mta.toml");
    let start = |toml: &str| {
        std::fs::write(
            &config,
            format!("data_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n{toml}", dir.path().join("data").display()),
        )
        .unwrap();
        cli(&["serve", "--config", config.to_str().unwrap()])
    };
    use std::os::unix::fs::PermissionsExt;
    // Loose permissions.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = start(&keys.toml());
    assert_eq!(code, 1);
    assert!(
        err.contains(&path.display().to_string()) && err.contains("loose permissions"),
        "{err}"
    );
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Missing.
    let (code, _, err) = start(&keys.toml().replace(".pem\"", ".missing.pem\""));
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    // Not a key.
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = start(
        &keys
            .toml()
            .replace(&path.display().to_string(), &junk.display().to_string()),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("junk.pem") && err.contains("not a private key"),
        "{err}"
    );
    // The wrong algorithm for the file.
    let (code, _, err) = start(&keys.toml().replace("ed25519-sha256", "rsa-sha256"));
    assert_eq!(code, 1);
    assert!(err.contains("configuration says rsa-sha256"), "{err}");
}

#[test]
fn sighup_reloads_keys_and_keeps_the_old_ones_when_the_new_ones_fail() {
    let first = keys(&[("acme.example", "first", Algorithm::Ed25519Sha256)]);
    let second = keys(&[("acme.example", "second", Algorithm::Ed25519Sha256)]);
    let dir = tempfile::tempdir().unwrap();
    let d = spec_tests::server::DaemonProcess::start(dir.path(), &first.toml());
    let selector_of = |d: &spec_tests::server::DaemonProcess| {
        let mut c = Client::connect(d.addr);
        c.ehlo();
        let replies = c.send_message(
            "news@acme.example",
            &["reader@dest.example"],
            &samples()[0].content,
        );
        let id = queued_id(replies.last().unwrap());
        spec_tests::server::eventually("the Reception record", || {
            spec_tests::server::read_log(&d.data_dir)
                .into_iter()
                .find_map(|r| match r {
                    Record::Reception(r) if r.queue_id == id => {
                        r.dkim.first().map(|s| s.selector.clone())
                    }
                    _ => None,
                })
        })
    };
    assert_eq!(selector_of(&d), "first");
    let hup = |d: &spec_tests::server::DaemonProcess| {
        // SAFETY: signalling our own child.
        assert_eq!(
            unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
    };
    let rewrite = |toml: &str| {
        let text = std::fs::read_to_string(&d.config_path).unwrap();
        let cut = text.find("[[dkim.keys]]").unwrap();
        std::fs::write(&d.config_path, format!("{}{toml}", &text[..cut])).unwrap();
    };
    rewrite(&second.toml());
    hup(&d);
    spec_tests::server::eventually("the reload", || {
        d.stderr().contains("DKIM keys reloaded").then_some(())
    });
    assert_eq!(selector_of(&d), "second");

    // A broken key: the reload is refused and the keys in use stay.
    rewrite(&first.toml().replace(".pem\"", ".gone.pem\""));
    hup(&d);
    spec_tests::server::eventually("the refused reload", || {
        d.stderr().contains("old keys stay in use").then_some(())
    });
    assert!(d.stderr().contains("does not exist"));
    assert_eq!(selector_of(&d), "second");
}

#[test]
fn what_reaches_the_mx_verifies_and_so_do_bounces() {
    // Signed once at reception: the delivered copy (over STARTTLS) still
    // verifies, and a DSN is DKIM-signed like other mail (by the key of
    // our host name's domain).
    use spec_tests::sink::{Sink, SinkConfig};
    let keys = keys(&[
        ("acme.example", "rsa2026", Algorithm::RsaSha256),
        ("acme.example", "ed2026", Algorithm::Ed25519Sha256),
        ("mx.test", "dsn2026", Algorithm::Ed25519Sha256),
    ]);
    let sink = Sink::start(
        "127.0.0.2:0".parse().unwrap(),
        SinkConfig {
            starttls: true,
            ..Default::default()
        },
    );
    let dns = DnsServer::start(&[
        ("acme.example", &keys.zone("acme.example")),
        ("mx.test", &keys.zone("mx.test")),
    ]);
    let server = TestServer::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[delivery]\nrelay_host = \"{}\"\n[smtp]\nrelay_networks = []\n[dkim]\nunsigned = \"reject\"\n{}{}",
        dns.addr,
        sink.addr,
        keys.toml(),
        tenants_toml()
    ));
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    assert_eq!(c.auth_plain("acme-app", "s3cret").code, 235);
    let sample = &samples()[1];
    let replies = c.send_message(
        "news@acme.example",
        &["reader@dest.example", "reject-me@dest.example"],
        &sample.content,
    );
    queued_id(replies.last().unwrap());
    let got = sink.wait_for_messages(2, Duration::from_secs(15));
    let original = got.iter().find(|m| !m.mail_from.is_empty()).unwrap();
    let dsn = got.iter().find(|m| m.mail_from.is_empty()).unwrap();
    assert!(original.tls && dsn.tls);
    assert_eq!(dsn.rcpt_to, ["news@acme.example"]);
    let work = tempfile::tempdir().unwrap();
    for (what, m, domain, count) in [
        ("the delivered message", original, "acme.example", 2),
        ("the DSN", dsn, "mx.test", 1),
    ] {
        let tags = dkim_header_tags(&m.data);
        assert_eq!(tags.len(), count, "{what}");
        assert!(tags.iter().all(|t| t["d"] == domain), "{what}");
        let by_mail_auth = verify_mail_auth(&dns, &m.data);
        assert_eq!(by_mail_auth.len(), count, "{what}");
        assert!(
            by_mail_auth.iter().all(|(_, ok)| *ok),
            "{what}: {by_mail_auth:?}"
        );
        let by_dkimpy = verify_dkimpy(&keys.records, &m.data, work.path());
        assert_eq!(by_dkimpy, vec![true; count], "{what}");
    }
}
