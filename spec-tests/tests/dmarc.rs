//! DMARC policy discovery (RFC 7489 §6.6.3) over a real DNS server on
//! loopback ([`spec_tests::dns::DnsServer`]), through the production
//! path: `mta::dns::resolver` and `mta::spf::HickoryDns`. The record
//! grammar, alignment and the verdict are unit-tested in
//! `mta/src/dmarc/tests.rs`; here the DNS answers are real: NXDOMAIN,
//! NODATA, several TXT records, a record of several strings, REFUSED.

use mta::dmarc::{Discovery, DmarcError, Policy, discover, evaluate};
use mta::spf::HickoryDns;
use spec_tests::dns::DnsServer;

/// Runs discovery for `from` against `dns`.
fn discover_via(dns: &DnsServer, from: &str) -> Discovery {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resolver = mta::dns::resolver_for(&[dns.addr]).unwrap();
        discover(&HickoryDns::new(resolver), from).await
    })
}

fn found(discovery: &Discovery) -> (&str, &mta::dmarc::Record) {
    match discovery {
        Discovery::Found { record, at } => (at.as_str(), record),
        other => panic!("expected a record, got {other:?}"),
    }
}

#[test]
fn record_at_the_from_domain() {
    let dns = DnsServer::start(&[(
        "example.com",
        "_dmarc IN TXT \"v=DMARC1; p=reject; adkim=s; rua=mailto:d@example.com\"\n\
         _dmarc.news IN TXT \"v=DMARC1; \" \"p=quarantine\"\n",
    )]);
    let discovery = discover_via(&dns, "Example.COM.");
    let (at, record) = found(&discovery);
    assert_eq!(at, "example.com");
    assert_eq!(record.policy, Policy::Reject);
    assert_eq!(record.adkim, mta::dmarc::Mode::Strict);

    let signed = evaluate(
        &discovery,
        "example.com",
        &["example.com".to_string()],
        None,
        false,
    );
    assert!(signed.pass && signed.dkim_aligned);
    assert_eq!(signed.outcome(), "pass");
    // adkim=s: a subdomain's signature does not align.
    let sub = evaluate(
        &discovery,
        "example.com",
        &["mail.example.com".to_string()],
        Some("example.com"),
        false,
    );
    assert!(!sub.pass);
    assert!(sub.would_be_rejected());

    // A subdomain with its own record, published as two strings (joined,
    // RFC 7208 §3.3 / RFC 7489 §6.1): its own, not the parent's.
    let discovery = discover_via(&dns, "news.example.com");
    let (at, record) = found(&discovery);
    assert_eq!(at, "news.example.com");
    assert_eq!(record.policy, Policy::Quarantine);
    assert_eq!(record.text, "v=DMARC1; p=quarantine");
}

#[test]
fn record_only_at_the_org_domain_is_found_for_a_subdomain() {
    let dns = DnsServer::start(&[
        (
            "example.co.uk",
            "_dmarc IN TXT \"v=DMARC1; p=reject; sp=quarantine\"\n\
             _dmarc.b IN TXT \"v=spf1 -all\"\n",
        ),
        (
            "xn--85x722f.xn--fiqs8s",
            "_dmarc IN TXT \"v=DMARC1; p=reject\"\n",
        ),
    ]);
    // NXDOMAIN at _dmarc.a.news.example.co.uk: the organisational domain's.
    let discovery = discover_via(&dns, "a.news.example.co.uk");
    let (at, record) = found(&discovery);
    assert_eq!(at, "example.co.uk");
    assert_eq!(record.subdomain_policy, Some(Policy::Quarantine));
    let verdict = evaluate(&discovery, "a.news.example.co.uk", &[], None, false);
    assert_eq!(verdict.policy, Some(Policy::Quarantine));
    assert_eq!(verdict.record_domain.as_deref(), Some("example.co.uk"));
    assert!(!verdict.would_be_rejected());
    // A TXT record that is not DMARC's is discarded: the same.
    let discovery = discover_via(&dns, "b.example.co.uk");
    assert_eq!(found(&discovery).0, "example.co.uk");
    // An IDN From domain in U-labels: queried as A-labels.
    let discovery = discover_via(&dns, "www.食狮.中国");
    let (at, record) = found(&discovery);
    assert_eq!(at, "xn--85x722f.xn--fiqs8s");
    assert_eq!(record.policy, Policy::Reject);
}

#[test]
fn no_record() {
    let dns = DnsServer::start(&[("example.org", "_dmarc.mail IN A 127.0.0.1\n")]);
    // NODATA at _dmarc.mail.example.org, NXDOMAIN at _dmarc.example.org.
    let discovery = discover_via(&dns, "mail.example.org");
    assert_eq!(discovery, Discovery::NoRecord);
    let verdict = evaluate(&discovery, "mail.example.org", &[], None, false);
    assert_eq!((verdict.policy, verdict.outcome()), (None, "none"));
    assert!(!verdict.would_be_rejected());
    assert_eq!(discover_via(&dns, "example.org"), Discovery::NoRecord);
}

#[test]
fn two_records_mean_no_policy() {
    let dns = DnsServer::start(&[(
        "example.net",
        "_dmarc IN TXT \"v=DMARC1; p=reject\"\n\
         _dmarc IN TXT \"v=DMARC1; p=none\"\n",
    )]);
    let discovery = discover_via(&dns, "news.example.net");
    assert_eq!(
        discovery,
        Discovery::Ignored {
            at: "example.net".to_string(),
            reason: DmarcError::MultipleRecords {
                domain: "example.net".to_string(),
                count: 2,
            },
        }
    );
    let verdict = evaluate(&discovery, "news.example.net", &[], None, false);
    assert_eq!((verdict.policy, verdict.outcome()), (None, "none"));
    assert!(!verdict.would_be_rejected());
    assert!(verdict.ignored.is_some());
}

#[test]
fn refused_is_temperror() {
    // The server is authoritative for example.com only: it answers
    // REFUSED for other.example.
    let dns = DnsServer::start(&[("example.com", "_dmarc IN TXT \"v=DMARC1; p=reject\"\n")]);
    let discovery = discover_via(&dns, "mail.other.example");
    match &discovery {
        Discovery::TempError(e) => assert!(e.contains("_dmarc.mail.other.example"), "{e}"),
        other => panic!("expected a temperror, got {other:?}"),
    }
    let verdict = evaluate(&discovery, "mail.other.example", &[], None, false);
    assert_eq!(verdict.outcome(), "temperror");
    assert!(!verdict.would_be_rejected());
}
