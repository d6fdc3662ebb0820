//! Record parsing, organisational domains, alignment, the verdict, and
//! discovery against a tiny in-memory DNS. Discovery over a real DNS
//! server is `spec-tests/tests/dmarc.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

use super::*;
use crate::spf::{DnsFailure, DnsResult, MxRecord};

// ---- record parsing (§6.3, §6.4)

#[test]
fn record_minimal() {
    let r = parse_record("v=DMARC1; p=reject").unwrap();
    assert_eq!(r.policy, Policy::Reject);
    assert_eq!(r.subdomain_policy, None);
    assert_eq!(
        (r.adkim, r.aspf, r.pct),
        (Mode::Relaxed, Mode::Relaxed, 100)
    );
    assert_eq!(r.text, "v=DMARC1; p=reject");
    assert_eq!(r.substituted, None);
}

#[test]
fn record_all_tags() {
    let r = parse_record(
        "v=DMARC1; p=quarantine; sp=none; adkim=s; aspf=s; pct=25; rua=mailto:d@example.com; fo=1",
    )
    .unwrap();
    assert_eq!(r.policy, Policy::Quarantine);
    assert_eq!(r.subdomain_policy, Some(Policy::None));
    assert_eq!((r.adkim, r.aspf, r.pct), (Mode::Strict, Mode::Strict, 25));
}

#[test]
fn record_whitespace_and_case() {
    let r = parse_record("  V = DMARC1 ;\tP = Reject ; SP=QUARANTINE; ADKIM = S ;aspf=R;").unwrap();
    assert_eq!(r.policy, Policy::Reject);
    assert_eq!(r.subdomain_policy, Some(Policy::Quarantine));
    assert_eq!((r.adkim, r.aspf), (Mode::Strict, Mode::Relaxed));
    // The version's value is case-sensitive (§6.4 spells it with %x).
    assert_eq!(
        parse_record("v=dmarc1; p=reject"),
        Err(DmarcError::NotDmarc)
    );
}

#[test]
fn record_bad_version() {
    for text in [
        "p=reject; v=DMARC1",
        "v=DMARC2; p=reject",
        "v=DMARC10; p=reject",
        "v=spf1 -all",
        "",
        "DMARC1; p=reject",
    ] {
        assert_eq!(parse_record(text), Err(DmarcError::NotDmarc), "{text:?}");
        assert!(!is_dmarc_record(text), "{text:?}");
    }
    assert!(is_dmarc_record("v=DMARC1"));
    assert!(is_dmarc_record("v=DMARC1;p=none"));
}

#[test]
fn record_missing_or_invalid_policy() {
    assert_eq!(
        parse_record("v=DMARC1; adkim=s"),
        Err(DmarcError::MissingPolicy)
    );
    assert_eq!(
        parse_record("v=DMARC1; p=block"),
        Err(DmarcError::InvalidPolicy {
            value: "block".to_string()
        })
    );
    assert_eq!(
        parse_record("v=DMARC1; p=reject; sp=maybe"),
        Err(DmarcError::InvalidSubdomainPolicy {
            value: "maybe".to_string()
        })
    );
    // §6.6.3 step 6: with a valid rua=, taken as p=none.
    let r = parse_record("v=DMARC1; p=block; rua=mailto:dmarc@example.com!10m").unwrap();
    assert_eq!(r.policy, Policy::None);
    assert_eq!(r.subdomain_policy, None);
    assert_eq!(
        r.substituted,
        Some(DmarcError::InvalidPolicy {
            value: "block".to_string()
        })
    );
    let r = parse_record("v=DMARC1; rua=bogus, mailto:d@example.com").unwrap();
    assert_eq!(r.policy, Policy::None);
    assert_eq!(r.substituted, Some(DmarcError::MissingPolicy));
    let r = parse_record("v=DMARC1; p=reject; sp=x; rua=mailto:d@example.com").unwrap();
    assert_eq!((r.policy, r.subdomain_policy), (Policy::None, None));
    // A rua= with no valid URI does not save it.
    assert_eq!(
        parse_record("v=DMARC1; rua=not a uri"),
        Err(DmarcError::MissingPolicy)
    );
}

#[test]
fn record_bad_optional_tags_take_defaults() {
    let r = parse_record("v=DMARC1; p=none; adkim=x; aspf=; pct=101; unknown=1; junk").unwrap();
    assert_eq!(
        (r.adkim, r.aspf, r.pct),
        (Mode::Relaxed, Mode::Relaxed, 100)
    );
    for (pct, want) in [
        ("0", 0),
        ("100", 100),
        ("050", 50),
        ("-1", 100),
        ("+5", 100),
    ] {
        let r = parse_record(&format!("v=DMARC1; p=none; pct={pct}")).unwrap();
        assert_eq!(r.pct, want, "pct={pct}");
    }
    // The first of a repeated tag counts.
    let r = parse_record("v=DMARC1; p=reject; p=none").unwrap();
    assert_eq!(r.policy, Policy::Reject);
}

// ---- organisational domain (§3.2)

#[test]
fn org_domain() {
    for (domain, org) in [
        ("example.com", "example.com"),
        ("mail.example.com", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        // A public suffix itself has no label to add.
        ("co.uk", "co.uk"),
        ("com", "com"),
        // Case and a final dot.
        ("News.Example.COM.", "example.com"),
        // IDN: A-labels, and U-labels as A-labels.
        ("www.xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),
        ("www.食狮.中国", "xn--85x722f.xn--fiqs8s"),
        // The private section: each github.io user is its own domain.
        ("a.user.github.io", "user.github.io"),
        // An unlisted TLD is a suffix (the default rule `*`).
        ("a.b.example.test", "example.test"),
        ("", ""),
    ] {
        assert_eq!(organizational_domain(domain), org, "{domain:?}");
    }
}

// ---- alignment (§3.1)

#[test]
fn alignment() {
    use Mode::{Relaxed, Strict};
    assert!(aligned("example.com", "example.com", Strict));
    assert!(aligned("Example.COM.", "example.com", Strict));
    assert!(!aligned("mail.example.com", "example.com", Strict));
    assert!(aligned("mail.example.com", "example.com", Relaxed));
    assert!(aligned("a.example.co.uk", "b.example.co.uk", Relaxed));
    assert!(!aligned("example.co.uk", "other.co.uk", Relaxed));
    assert!(!aligned("example.com", "example.net", Relaxed));
    assert!(!aligned("co.uk", "example.co.uk", Relaxed));
    assert!(!aligned("", "", Relaxed));
    assert!(!aligned("", "", Strict));
    assert!(aligned("食狮.中国", "xn--85x722f.xn--fiqs8s", Strict));
}

// ---- the verdict

fn found(text: &str, at: &str) -> Discovery {
    Discovery::Found {
        record: parse_record(text).unwrap(),
        at: at.to_string(),
    }
}

fn d(domains: &[&str]) -> Vec<String> {
    domains.iter().map(|s| s.to_string()).collect()
}

/// (discovery, From, DKIM d=, MAIL FROM domain, SPF pass, DKIM aligned,
/// SPF aligned)
type Case<'a> = (
    &'a Discovery,
    &'a str,
    &'a [&'a str],
    Option<&'a str>,
    bool,
    bool,
    bool,
);

#[test]
fn evaluate_truth_table() {
    let relaxed = found("v=DMARC1; p=reject", "example.com");
    let strict = found("v=DMARC1; p=reject; adkim=s; aspf=s", "example.com");
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (&relaxed, "example.com", &["example.com"], None, false, true, false),
        (&relaxed, "example.com", &["mail.example.com"], None, false, true, false),
        (&relaxed, "example.com", &["esp.example"], None, false, false, false),
        (&relaxed, "example.com", &["esp.example", "example.com"], None, false, true, false),
        (&relaxed, "example.com", &[], Some("bounce.example.com"), true, false, true),
        // SPF alignment needs SPF to pass.
        (&relaxed, "example.com", &[], Some("bounce.example.com"), false, false, false),
        (&relaxed, "example.com", &[], Some("esp.example"), true, false, false),
        (&relaxed, "example.com", &[], None, true, false, false),
        (&strict, "example.com", &["mail.example.com"], Some("bounce.example.com"), true, false, false),
        (&strict, "example.com", &["example.com"], Some("example.com"), true, true, true),
    ];
    for (i, (disc, from, dkim, mail_from, spf_pass, want_dkim, want_spf)) in
        cases.iter().enumerate()
    {
        let v = evaluate(disc, from, &d(dkim), *mail_from, *spf_pass);
        assert_eq!(
            (v.dkim_aligned, v.spf_aligned, v.pass),
            (*want_dkim, *want_spf, *want_dkim || *want_spf),
            "case {i}"
        );
        assert_eq!(v.policy, Some(Policy::Reject), "case {i}");
        assert_eq!(v.would_be_rejected(), !v.pass, "case {i}");
        assert_eq!(
            v.outcome(),
            if v.pass { "pass" } else { "fail" },
            "case {i}"
        );
    }
}

#[test]
fn evaluate_subdomain_policy() {
    let org = found("v=DMARC1; p=reject; sp=quarantine", "example.com");
    // The record of the organisational domain, for a subdomain: sp=.
    let v = evaluate(&org, "news.example.com", &[], None, false);
    assert_eq!(v.policy, Some(Policy::Quarantine));
    assert!(!v.would_be_rejected());
    assert_eq!(v.outcome(), "fail");
    // For the domain itself: p=.
    let v = evaluate(&org, "Example.com.", &[], None, false);
    assert_eq!(v.policy, Some(Policy::Reject));
    assert!(v.would_be_rejected());
    // Without sp=, p= applies to subdomains.
    let org = found("v=DMARC1; p=reject", "example.com");
    let v = evaluate(&org, "news.example.com", &[], None, false);
    assert_eq!(v.policy, Some(Policy::Reject));
    assert!(v.would_be_rejected());
    // A record at the subdomain itself: its p=, not its sp=.
    let own = found("v=DMARC1; p=none; sp=reject", "news.example.com");
    let v = evaluate(&own, "news.example.com", &[], None, false);
    assert_eq!(v.policy, Some(Policy::None));
    assert!(!v.would_be_rejected());
    assert_eq!(v.record_domain.as_deref(), Some("news.example.com"));
    assert_eq!(v.record.as_deref(), Some("v=DMARC1; p=none; sp=reject"));
}

#[test]
fn evaluate_without_policy() {
    let dkim = d(&["example.com"]);
    let v = evaluate(&Discovery::NoRecord, "example.com", &dkim, None, false);
    assert_eq!(v.policy, None);
    assert!(v.pass && v.dkim_aligned);
    assert!(!v.would_be_rejected());
    assert_eq!(v.outcome(), "none");
    assert_eq!((v.record, v.error, v.ignored), (None, None, None));

    let v = evaluate(
        &Discovery::TempError("SERVFAIL".to_string()),
        "example.com",
        &[],
        None,
        false,
    );
    assert_eq!(v.policy, None);
    assert!(!v.would_be_rejected());
    assert_eq!(v.outcome(), "temperror");
    assert_eq!(v.error.as_deref(), Some("SERVFAIL"));

    let ignored = Discovery::Ignored {
        at: "example.com".to_string(),
        reason: DmarcError::MultipleRecords {
            domain: "example.com".to_string(),
            count: 2,
        },
    };
    let v = evaluate(&ignored, "example.com", &[], None, false);
    assert_eq!(v.policy, None);
    assert!(!v.would_be_rejected());
    assert_eq!(v.outcome(), "none");
    assert!(v.ignored.unwrap().contains("2 DMARC records"));
    assert_eq!(v.record_domain.as_deref(), Some("example.com"));
}

#[test]
fn verdict_serializes() {
    let v = evaluate(
        &found("v=DMARC1; p=quarantine", "example.com"),
        "example.com",
        &[],
        None,
        false,
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["policy"], "quarantine");
    assert_eq!(json["pass"], false);
    assert_eq!(json["record"], "v=DMARC1; p=quarantine");
}

// ---- discovery (§6.6.3) against an in-memory DNS

#[derive(Default)]
struct FakeDns {
    txt: HashMap<String, Vec<String>>,
    failing: Vec<String>,
    queries: Mutex<Vec<String>>,
}

impl FakeDns {
    fn txt(mut self, name: &str, value: &str) -> Self {
        self.txt
            .entry(name.to_string())
            .or_default()
            .push(value.to_string());
        self
    }
    fn failing(mut self, name: &str) -> Self {
        self.failing.push(name.to_string());
        self
    }
    fn queries(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }
}

impl SpfDns for FakeDns {
    async fn txt(&self, name: &str) -> DnsResult<Vec<u8>> {
        self.queries.lock().unwrap().push(name.to_string());
        if self.failing.iter().any(|f| f == name) {
            return Err(DnsFailure::Server("SERVFAIL".to_string()));
        }
        match self.txt.get(name) {
            Some(records) => Ok(DnsAnswer::Records {
                records: records.iter().map(|r| r.as_bytes().to_vec()).collect(),
                ttl: 3600,
            }),
            None => Ok(DnsAnswer::NotFound { ttl: Some(300) }),
        }
    }
    async fn a(&self, _: &str) -> DnsResult<Ipv4Addr> {
        Ok(DnsAnswer::NotFound { ttl: None })
    }
    async fn aaaa(&self, _: &str) -> DnsResult<Ipv6Addr> {
        Ok(DnsAnswer::NotFound { ttl: None })
    }
    async fn mx(&self, _: &str) -> DnsResult<MxRecord> {
        Ok(DnsAnswer::NotFound { ttl: None })
    }
    async fn ptr(&self, _: IpAddr) -> DnsResult<String> {
        Ok(DnsAnswer::NotFound { ttl: None })
    }
}

fn at(discovery: &Discovery) -> Option<(&str, Policy)> {
    match discovery {
        Discovery::Found { record, at } => Some((at.as_str(), record.policy)),
        _ => None,
    }
}

#[tokio::test]
async fn discovery_at_the_from_domain() {
    let dns = FakeDns::default()
        .txt("_dmarc.news.example.com", "v=DMARC1; p=none")
        .txt("_dmarc.example.com", "v=DMARC1; p=reject");
    let found = discover(&dns, "News.Example.com.").await;
    assert_eq!(at(&found), Some(("news.example.com", Policy::None)));
    assert_eq!(dns.queries(), ["_dmarc.news.example.com"]);
}

#[tokio::test]
async fn discovery_falls_back_to_the_org_domain() {
    let dns = FakeDns::default()
        .txt("_dmarc.example.co.uk", "v=DMARC1; p=reject; sp=quarantine")
        // Not DMARC records: discarded (§6.6.3 step 2).
        .txt("_dmarc.a.b.example.co.uk", "v=spf1 -all")
        .txt("_dmarc.a.b.example.co.uk", "hello");
    let found = discover(&dns, "a.b.example.co.uk").await;
    assert_eq!(at(&found), Some(("example.co.uk", Policy::Reject)));
    assert_eq!(
        dns.queries(),
        ["_dmarc.a.b.example.co.uk", "_dmarc.example.co.uk"]
    );
    let v = evaluate(&found, "a.b.example.co.uk", &[], None, false);
    assert_eq!(v.policy, Some(Policy::Quarantine));
}

#[tokio::test]
async fn discovery_without_record() {
    let dns = FakeDns::default();
    assert_eq!(
        discover(&dns, "mail.example.com").await,
        Discovery::NoRecord
    );
    assert_eq!(
        dns.queries(),
        ["_dmarc.mail.example.com", "_dmarc.example.com"]
    );
    // The organisational domain itself: one query.
    let dns = FakeDns::default();
    assert_eq!(discover(&dns, "example.com").await, Discovery::NoRecord);
    assert_eq!(dns.queries(), ["_dmarc.example.com"]);
    assert_eq!(discover(&dns, "").await, Discovery::NoRecord);
}

#[tokio::test]
async fn discovery_several_records_apply_none() {
    let dns = FakeDns::default()
        .txt("_dmarc.example.com", "v=DMARC1; p=reject")
        .txt("_dmarc.example.com", "v=DMARC1; p=none")
        .txt("_dmarc.example.com", "v=spf1 -all");
    assert_eq!(
        discover(&dns, "example.com").await,
        Discovery::Ignored {
            at: "example.com".to_string(),
            reason: DmarcError::MultipleRecords {
                domain: "example.com".to_string(),
                count: 2
            }
        }
    );
    // Several at the From domain end discovery: no fallback (step 5).
    let dns = FakeDns::default()
        .txt("_dmarc.news.example.com", "v=DMARC1; p=none")
        .txt("_dmarc.news.example.com", "v=DMARC1; p=none")
        .txt("_dmarc.example.com", "v=DMARC1; p=reject");
    assert!(matches!(
        discover(&dns, "news.example.com").await,
        Discovery::Ignored { .. }
    ));
    assert_eq!(dns.queries(), ["_dmarc.news.example.com"]);
}

#[tokio::test]
async fn discovery_invalid_record_is_ignored() {
    let dns = FakeDns::default()
        .txt("_dmarc.news.example.com", "v=DMARC1; p=bogus")
        .txt("_dmarc.example.com", "v=DMARC1; p=reject");
    assert_eq!(
        discover(&dns, "news.example.com").await,
        Discovery::Ignored {
            at: "news.example.com".to_string(),
            reason: DmarcError::InvalidPolicy {
                value: "bogus".to_string()
            }
        }
    );
}

#[tokio::test]
async fn discovery_dns_failure_is_temperror() {
    let dns = FakeDns::default()
        .failing("_dmarc.news.example.com")
        .txt("_dmarc.example.com", "v=DMARC1; p=reject");
    match discover(&dns, "news.example.com").await {
        Discovery::TempError(e) => {
            assert!(e.contains("_dmarc.news.example.com"), "{e}");
            assert!(e.contains("SERVFAIL"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let dns = FakeDns::default().failing("_dmarc.example.com");
    assert!(matches!(
        discover(&dns, "news.example.com").await,
        Discovery::TempError(_)
    ));
}
