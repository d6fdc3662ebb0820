//! `/metrics` after a known run: messages accepted for two tenants, refusals
//! for known reasons, a failed AUTH, deliveries to a loopback sink with
//! recipients delivered, deferred, bounced and expired, and a held message.
//! The scrape is parsed by the Prometheus project's own Python client
//! (`prometheus_client.parser`), and the counters are checked against the
//! run and against the transaction log.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mta::log::Record;
use spec_tests::client::{Client, message};
use spec_tests::dns::DnsServer;
use spec_tests::server::{TestServer, eventually, queued_id, tenants_toml};
use spec_tests::sink::{Sink, SinkConfig};

/// One sample as the parser read it.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One metric family as the parser read it.
#[derive(Debug, serde::Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    documentation: String,
    samples: Vec<Sample>,
}

/// Parses Prometheus text with `prometheus_client.parser`, which raises on
/// anything that is not valid exposition format.
fn parse(text: &str) -> Vec<Family> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1], encoding="utf-8").read()
out = []
for f in text_string_to_metric_families(text):
    out.append({
        "name": f.name, "type": f.type, "documentation": f.documentation,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
    })
print(json.dumps(out))
"#;
    let run = spec_tests::tools::python(script, &[path.to_str().unwrap()]);
    assert_eq!(
        run.code, 0,
        "prometheus_client could not parse the scrape (spec-tests/run-tests.sh installs it): {}\n{text}",
        run.stderr
    );
    serde_json::from_str(&run.stdout).expect("the parser's JSON")
}

struct Scrape {
    families: Vec<Family>,
}

impl Scrape {
    fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.iter().flat_map(|f| f.samples.iter())
    }

    /// The value of the sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// [`Scrape::get`], 0 when the sample is absent (a label set never
    /// counted is not exported).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum over every sample of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

/// What the config below makes of a recipient domain: the group `big`,
/// `top.test` (the only label to learn, three recipients first), or other.
fn destination(domain: &str) -> &'static str {
    match domain {
        "big.test" => "big",
        "top.test" => "top.test",
        _ => "other",
    }
}

fn config(dns: &DnsServer, sink: &Sink) -> String {
    format!(
        r#"{tenants}
[smtp]
allowed_networks = ["127.0.0.0/29"]
relay_networks = ["127.0.0.1/32"]
max_recipients = 3
max_message_size = 100000
max_connections_per_ip = 1
auth_failure_delay = "0s"

[dns]
nameservers = ["{dns}"]

[delivery]
relay_host = "{sink}"
retry_initial = "1s"
retry_max = "1s"
max_lifetime = "3s"

[metrics]
top_destinations = 1
top_destination_min_recipients = 3

[metrics.destination_groups]
big = ["big.test"]
"#,
        tenants = tenants_toml(),
        dns = dns.addr,
        sink = sink.addr,
    )
}

/// Ends a session and waits until the daemon has let go of it, so that the
/// next one is not refused by `max_connections_per_ip = 1`.
fn quit(server: &TestServer, mut c: Client) {
    assert_eq!(c.cmd("QUIT").code, 221);
    drop(c);
    eventually("the session to end", || {
        (server.connections() == 0).then_some(())
    });
}

fn accepted(c: &mut Client, from: &str, rcpts: &[&str]) -> String {
    let replies = c.send_message(from, rcpts, &message(from, rcpts[0], "metrics"));
    queued_id(replies.last().expect("a reply to the content"))
}

fn local(ip: &str) -> IpAddr {
    ip.parse().unwrap()
}

#[test]
fn a_known_run_is_counted_exactly() {
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkConfig::default());
    let dns = DnsServer::start(&[]);
    let server = TestServer::start(&config(&dns, &sink));

    // acme, authenticated: a failed AUTH, a sender outside the tenant,
    // then three messages. a and b count as "other" until the third
    // top.test recipient gives the domain its label.
    let mut c = Client::connect(server.addr);
    c.ehlo();
    c.starttls();
    c.ehlo();
    assert_eq!(c.auth_plain("acme-app", "wrong").code, 535);
    assert_eq!(c.auth_plain("acme-app", "s3cret").code, 235);
    assert_eq!(c.cmd("MAIL FROM:<x@bank.example>").code, 550);
    let acme_from = "news@acme.example";
    accepted(
        &mut c,
        acme_from,
        &["a@top.test", "b@top.test", "c@top.test"],
    );
    accepted(
        &mut c,
        acme_from,
        &["d@top.test", "e@late.test", "f@late.test"],
    );
    // late.test reaches three recipients, but the only label is taken.
    accepted(&mut c, acme_from, &["g@late.test"]);
    quit(&server, c);

    // bank, relayed from 127.0.0.1 without AUTH.
    let bank_from = "info@bank.example";
    let mut c = Client::connect(server.addr);
    c.ehlo();
    assert_eq!(c.cmd("FOO").code, 500);
    assert_eq!(
        c.cmd(&format!("MAIL FROM:<{bank_from}> SIZE=200000")).code,
        552
    );
    accepted(
        &mut c,
        bank_from,
        &["x@big.test", "reject-1@big.test", "defer-1@small.test"],
    );
    assert_eq!(c.cmd(&format!("MAIL FROM:<{bank_from}>")).code, 250);
    assert_eq!(c.cmd("RCPT TO:<y@[127.0.0.1]>").code, 550);
    for r in ["y1@big.test", "y2@big.test", "y3@big.test"] {
        assert_eq!(c.cmd(&format!("RCPT TO:<{r}>")).code, 250);
    }
    assert_eq!(c.cmd("RCPT TO:<y4@big.test>").code, 452);
    assert_eq!(c.cmd("RSET").code, 250);
    let held = accepted(&mut c, bank_from, &["defer-2@small.test"]);
    quit(&server, c);

    // Outside relay_networks, MAIL without AUTH.
    let mut c = Client::connect_from(local("127.0.0.5"), server.addr).unwrap();
    c.ehlo();
    assert_eq!(c.cmd(&format!("MAIL FROM:<{bank_from}>")).code, 530);
    quit(&server, c);
    // Outside allowed_networks.
    let mut c = Client::connect_from(local("127.0.0.9"), server.addr).unwrap();
    assert_eq!(c.greeting.code, 554);
    assert!(c.is_closed());
    // A second connection from one address.
    let first = Client::connect_from(local("127.0.0.6"), server.addr).unwrap();
    let second = Client::connect_from(local("127.0.0.6"), server.addr).unwrap();
    assert_eq!(second.greeting.code, 421);
    drop((first, second));
    eventually("the sessions to end", || {
        (server.connections() == 0).then_some(())
    });

    // The held message: held once its first attempt was deferred.
    server.wait_for("the first attempt of the held message", |rs| {
        rs.iter()
            .any(|r| r.kind() == "TransientFailure" && r.queue_id() == Some(held.as_str()))
            .then_some(())
    });
    let held_id: queue::QueueId = held.parse().unwrap();
    server.block_on(server.queue().hold(held_id)).unwrap();

    // Everything else reaches its end: defer-1 expires after 3 s, and
    // both DSNs to info@bank.example are delivered.
    server.wait_for("the expiry of defer-1 and both DSNs delivered", |rs| {
        let expired = rs.iter().any(|r| r.kind() == "Expiration");
        let dsns = rs
            .iter()
            .filter(|r| {
                r.kind() == "Delivery" && r.attempt().is_some_and(|a| a.recipient == bank_from)
            })
            .count();
        (expired && dsns == 2).then_some(())
    });
    eventually("only the held message left in the queue", || {
        (server.queue().len() == 1).then_some(())
    });

    let text = server.scrape();
    let scrape = Scrape {
        families: parse(&text),
    };
    let records = server.records();

    // Reception, by tenant and destination.
    let received = "mta_messages_received_total";
    assert_eq!(scrape.get(received, &[("tenant", "acme")]), Some(3.0));
    assert_eq!(scrape.get(received, &[("tenant", "bank")]), Some(2.0));
    let rcpts = "mta_recipients_received_total";
    for (tenant, dest, n) in [
        ("acme", "other", 5.0),
        ("acme", "top.test", 2.0),
        ("bank", "big", 2.0),
        ("bank", "other", 2.0),
    ] {
        assert_eq!(
            scrape.get(rcpts, &[("tenant", tenant), ("destination", dest)]),
            Some(n),
            "{tenant} {dest}\n{text}"
        );
    }
    assert_eq!(scrape.sum(rcpts), 11.0);

    // Rejections: exactly the ones above, each for its reason; the log has
    // one record for each.
    let rejections = "mta_rejections_total";
    let expected = [
        "network_not_allowed",
        "connection_limit",
        "auth_required",
        "auth_failed",
        "sender_not_allowed",
        "size",
        "syntax",
        "bad_recipient",
        "too_many_recipients",
    ];
    for r in mta::metrics::RejectReason::ALL {
        let want = if expected.contains(&r.as_str()) {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            scrape.get(rejections, &[("reason", r.as_str())]),
            Some(want),
            "{}\n{text}",
            r.as_str()
        );
    }
    let refusals = records
        .iter()
        .filter(|r| matches!(r, Record::Rejection(_) | Record::AuthFailure(_)))
        .count();
    assert_eq!(scrape.sum(rejections), refusals as f64);
    assert_eq!(
        scrape.get(
            "mta_auth_failures_total",
            &[("reason", "invalid_credentials")]
        ),
        Some(1.0)
    );
    assert_eq!(scrape.sum("mta_auth_failures_total"), 1.0);

    // Outcomes: the final ones are known; deferrals are as many as the log
    // has TransientFailure records. Every (outcome, tenant, destination)
    // agrees with the log.
    let attempts = "mta_delivery_attempts_total";
    let outcome = |kind: &str| match kind {
        "Delivery" => "delivered",
        "TransientFailure" => "deferred",
        "Bounce" => "bounced",
        "Expiration" => "expired",
        other => panic!("{other}"),
    };
    let mut from_log: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for r in &records {
        if let Some(a) = r.attempt() {
            let domain = queue::domain_of(&a.recipient);
            let key = (
                outcome(r.kind()).to_string(),
                a.tenant.clone().unwrap_or("-".into()),
                destination(&domain).to_string(),
            );
            *from_log.entry(key).or_default() += 1.0;
        }
    }
    for ((o, t, d), n) in &from_log {
        assert_eq!(
            scrape.get(
                attempts,
                &[("outcome", o), ("tenant", t), ("destination", d)]
            ),
            Some(*n),
            "{o} {t} {d}\n{text}"
        );
    }
    assert_eq!(scrape.sum(attempts), from_log.values().sum::<f64>());
    for (o, t, d, n) in [
        ("delivered", "acme", "top.test", 4.0),
        ("delivered", "acme", "other", 3.0),
        ("delivered", "bank", "big", 1.0),
        // The two DSNs to info@bank.example.
        ("delivered", "bank", "other", 2.0),
        ("bounced", "bank", "big", 1.0),
        ("expired", "bank", "other", 1.0),
    ] {
        assert_eq!(
            scrape.count(
                attempts,
                &[("outcome", o), ("tenant", t), ("destination", d)]
            ),
            n,
            "{o} {t} {d}\n{text}"
        );
    }
    // defer-1 until it expired (at least twice in 3 s), defer-2 at least once.
    let deferred = scrape.count(
        attempts,
        &[
            ("outcome", "deferred"),
            ("tenant", "bank"),
            ("destination", "other"),
        ],
    );
    assert!(deferred >= 3.0, "{deferred}");
    assert_eq!(
        scrape.get("mta_dsn_sent_total", &[("action", "failed")]),
        Some(2.0)
    );

    // Time in queue, for final outcomes only.
    let tiq = |o: &str, what: &str| {
        scrape.count(
            &format!("mta_time_in_queue_seconds_{what}"),
            &[("outcome", o)],
        )
    };
    assert_eq!(tiq("delivered", "count"), 10.0);
    assert_eq!(tiq("bounced", "count"), 1.0);
    assert_eq!(tiq("expired", "count"), 1.0);
    assert!(tiq("expired", "sum") >= 3.0, "lived its 3 s lifetime");
    assert_eq!(tiq("deferred", "count"), 0.0);

    // The queue: only the held message, with its one recipient and size.
    let size = records
        .iter()
        .find_map(|r| match r {
            Record::Reception(rec) if rec.queue_id == held => Some(rec.size),
            _ => None,
        })
        .expect("the held message's Reception record");
    for (state, messages, recipients, bytes) in [
        ("held", 1.0, 1.0, size as f64),
        ("queued", 0.0, 0.0, 0.0),
        ("deferred", 0.0, 0.0, 0.0),
    ] {
        let s = [("state", state)];
        assert_eq!(
            scrape.get("mta_queue_messages", &s),
            Some(messages),
            "{state}"
        );
        assert_eq!(
            scrape.get("mta_queue_recipients", &s),
            Some(recipients),
            "{state}"
        );
        assert_eq!(scrape.get("mta_queue_bytes", &s), Some(bytes), "{state}");
    }
    assert_eq!(scrape.get("mta_store_failed", &[]), Some(0.0));
    // Five messages and two DSNs stored, and their outcomes, holds...
    assert!(scrape.count("mta_store_flush_writes_total", &[]) >= 7.0);
    assert!(scrape.count("mta_store_flush_duration_seconds_count", &[]) >= 1.0);

    // Connections, sessions, signing.
    assert_eq!(scrape.get("mta_smtp_sessions", &[]), Some(0.0));
    assert!(
        scrape.count(
            "mta_outbound_sessions_total",
            &[("tls", "plaintext-not-offered")]
        ) >= 1.0
    );
    assert_eq!(
        scrape.count(
            "mta_outbound_sessions_total",
            &[("tls", "handshake-failed")]
        ),
        0.0
    );
    let attempts_timed = scrape.sum("mta_delivery_attempt_duration_seconds_count");
    assert!(attempts_timed >= 1.0, "{text}");
    assert!(scrape.count("mta_delivery_transaction_duration_seconds_count", &[]) >= 1.0);
    // No DKIM key: five messages and two DSNs went out unsigned.
    assert_eq!(scrape.get("mta_dkim_unsigned_total", &[]), Some(7.0));
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        scrape.samples().any(|s| s.name == "mta_build_info"
            && s.labels.get("version").map(String::as_str) == Some(version)
            && s.value == 1.0),
        "{text}"
    );

    documented(&scrape);
}

/// The table of docs/metrics.md: metric name → (type, labels).
fn doc_table() -> BTreeMap<String, (String, Vec<String>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .expect("docs/metrics.md");
    let mut table: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | `a`, `b` | meaning |
        if cells.len() < 5 || !cells[1].starts_with("`mta_") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty())
            .collect();
        table.insert(name, (cells[2].to_string(), labels));
    }
    table
}

/// Every family the daemon exports is in docs/metrics.md's table, with its
/// type and labels.
fn documented(scrape: &Scrape) {
    let table = doc_table();
    for f in &scrape.families {
        // The parser names a counter family without its `_total`.
        let name = if f.kind == "counter" {
            format!("{}_total", f.name)
        } else {
            f.name.clone()
        };
        let Some((kind, labels)) = table.get(&name) else {
            panic!("{name} is not in the table of docs/metrics.md");
        };
        assert_eq!(kind, &f.kind, "the type of {name} in docs/metrics.md");
        assert!(!f.documentation.is_empty(), "{name} has HELP text");
        let mut seen: Vec<String> = f
            .samples
            .iter()
            .flat_map(|s| s.labels.keys().cloned())
            .filter(|l| l != "le")
            .collect();
        seen.sort();
        seen.dedup();
        let mut want = labels.clone();
        want.sort();
        assert_eq!(seen, want, "the labels of {name} in docs/metrics.md");
    }
}

#[test]
fn the_sample_dashboard_queries_documented_metrics() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana/mta-dashboard.json"
    ))
    .expect("docs/grafana/mta-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let table = doc_table();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("an expr").to_string());
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        exprs.push(v["definition"].as_str().expect("a definition").to_string());
    }
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("mta_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| table.contains_key(*b)))
                .unwrap_or(&name)
                .to_string();
            assert!(
                table.contains_key(&base),
                "the dashboard queries {name}, which docs/metrics.md does not list"
            );
            used.insert(base);
        }
    }
    // Every documented metric has a panel.
    let missing: Vec<&String> = table.keys().filter(|k| !used.contains(*k)).collect();
    assert!(
        missing.iter().all(|m| *m == "mta_build_info"),
        "no panel for {missing:?}"
    );
}
