//! Evaluation against a tiny in-memory DNS. The RFC 7208 conformance
//! suite, over a real DNS server, is `spec-tests/tests/spf_suite.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

#[derive(Default)]
struct FakeDns {
    txt: HashMap<String, Vec<Vec<u8>>>,
    a: HashMap<String, Vec<Ipv4Addr>>,
    aaaa: HashMap<String, Vec<Ipv6Addr>>,
    mx: HashMap<String, Vec<MxRecord>>,
    ptr: HashMap<IpAddr, Vec<String>>,
    /// Names every query for which fails (SERVFAIL).
    failing: Vec<String>,
}

const TTL: u32 = 3600;

impl FakeDns {
    fn txt(mut self, name: &str, value: &str) -> Self {
        self.txt
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(value.as_bytes().to_vec());
        self
    }
    fn a(mut self, name: &str, ip: &str) -> Self {
        self.a
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(ip.parse().unwrap());
        self
    }
    fn aaaa(mut self, name: &str, ip: &str) -> Self {
        self.aaaa
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(ip.parse().unwrap());
        self
    }
    fn mx(mut self, name: &str, preference: u16, exchange: &str) -> Self {
        self.mx
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(MxRecord {
                preference,
                exchange: exchange.to_string(),
            });
        self
    }
    fn ptr(mut self, ip: &str, name: &str) -> Self {
        self.ptr
            .entry(ip.parse().unwrap())
            .or_default()
            .push(name.to_string());
        self
    }
    fn failing(mut self, name: &str) -> Self {
        self.failing.push(name.to_string());
        self
    }

    fn exists(&self, name: &str) -> bool {
        self.txt.contains_key(name)
            || self.a.contains_key(name)
            || self.aaaa.contains_key(name)
            || self.mx.contains_key(name)
    }

    fn answer<T: Clone>(&self, name: &str, table: &HashMap<String, Vec<T>>) -> DnsResult<T> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.failing.contains(&name) {
            return Err(DnsFailure::Server("SERVFAIL".to_string()));
        }
        match table.get(&name) {
            Some(records) => Ok(DnsAnswer::Records {
                records: records.clone(),
                ttl: if name.starts_with("short.") { 60 } else { TTL },
            }),
            None if self.exists(&name) => Ok(DnsAnswer::NoRecords { ttl: Some(300) }),
            None => Ok(DnsAnswer::NotFound { ttl: Some(300) }),
        }
    }
}

impl SpfDns for FakeDns {
    async fn txt(&self, name: &str) -> DnsResult<Vec<u8>> {
        self.answer(name, &self.txt)
    }
    async fn a(&self, name: &str) -> DnsResult<Ipv4Addr> {
        self.answer(name, &self.a)
    }
    async fn aaaa(&self, name: &str) -> DnsResult<Ipv6Addr> {
        self.answer(name, &self.aaaa)
    }
    async fn mx(&self, name: &str) -> DnsResult<MxRecord> {
        self.answer(name, &self.mx)
    }
    async fn ptr(&self, ip: IpAddr) -> DnsResult<String> {
        match self.ptr.get(&ip) {
            Some(names) => Ok(DnsAnswer::Records {
                records: names.clone(),
                ttl: TTL,
            }),
            None => Ok(DnsAnswer::NotFound { ttl: None }),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn check(dns: &FakeDns, client: &str, sender: &str) -> Evaluation {
    let options = Options {
        timestamp: Some(1_400_000_000),
        receiver: "mta1.example.net".to_string(),
        ..Options::default()
    };
    check_mail_from(dns, &options, ip(client), sender, "mail.example.org").await
}

#[tokio::test]
async fn pass_through_include_reports_the_top_directive() {
    let dns = FakeDns::default()
        .txt("example.com", "v=spf1 include:_spf.example.com -all")
        .txt("_spf.example.com", "v=spf1 ip4:203.0.113.0/24 ~all");
    let e = check(&dns, "203.0.113.7", "news@example.com").await;
    assert_eq!(e.result, SpfResult::Pass);
    assert_eq!(
        e.record.as_deref(),
        Some("v=spf1 include:_spf.example.com -all")
    );
    assert_eq!(
        e.matched,
        Some(Matched {
            domain: "example.com".to_string(),
            directive: "include:_spf.example.com".to_string()
        })
    );
    assert_eq!(e.dns_lookups, 1);
    assert_eq!(e.void_lookups, 0);
    assert_eq!(e.ttl, Some(TTL));
    assert_eq!(e.error, None);
    assert_eq!(e.suggestion(), None);
}

#[tokio::test]
async fn fail_with_explanation_and_suggestion() {
    let dns = FakeDns::default()
        .txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all exp=why.%{d}")
        .txt(
            "why.example.com",
            "%{i} is not one of %{d}'s senders (%{c}, checked by %{r} at %{t}, %{l})",
        );
    let e = check(&dns, "203.0.113.7", "news@example.com").await;
    assert_eq!(e.result, SpfResult::Fail);
    assert_eq!(e.matched.as_ref().unwrap().directive, "-all");
    assert_eq!(
        e.explanation.as_deref(),
        Some(
            "203.0.113.7 is not one of example.com's senders (203.0.113.7, checked by mta1.example.net at 1400000000, news)"
        )
    );
    assert_eq!(e.suggestion().as_deref(), Some("ip4:203.0.113.7"));
    let e6 = check(&dns, "2001:db8::7", "news@example.com").await;
    assert_eq!(e6.result, SpfResult::Fail);
    assert_eq!(e6.suggestion().as_deref(), Some("ip6:2001:db8::7"));
    assert_eq!(
        suggestion(SpfResult::Neutral, ip("::ffff:203.0.113.9")).as_deref(),
        Some("ip4:203.0.113.9")
    );
    assert_eq!(suggestion(SpfResult::PermError, ip("203.0.113.9")), None);
}

#[tokio::test]
async fn a_mx_ptr_exists() {
    let dns = FakeDns::default()
        .txt(
            "example.com",
            "v=spf1 a mx:mail.example.com/28 ptr:example.com exists:%{ir}.list.example.com -all",
        )
        .a("example.com", "192.0.2.1")
        .aaaa("example.com", "2001:db8::1")
        .mx("mail.example.com", 10, "mx1.example.com")
        .mx("mail.example.com", 20, "")
        .a("mx1.example.com", "192.0.2.17")
        .ptr("198.51.100.5", "host5.example.com")
        .a("host5.example.com", "198.51.100.5")
        .ptr("198.51.100.6", "liar.example.com")
        .a("liar.example.com", "198.51.100.99")
        .a("9.113.0.203.list.example.com", "127.0.0.2");
    let cases = [
        ("192.0.2.1", SpfResult::Pass, Some("a")),
        ("2001:db8::1", SpfResult::Pass, Some("a")),
        ("::ffff:192.0.2.1", SpfResult::Pass, Some("a")),
        (
            "192.0.2.30",
            SpfResult::Pass,
            Some("mx:mail.example.com/28"),
        ),
        ("198.51.100.5", SpfResult::Pass, Some("ptr:example.com")),
        ("198.51.100.6", SpfResult::Fail, Some("-all")),
        (
            "203.0.113.9",
            SpfResult::Pass,
            Some("exists:%{ir}.list.example.com"),
        ),
    ];
    for (client, result, directive) in cases {
        let e = check(&dns, client, "a@example.com").await;
        assert_eq!(e.result, result, "{client}: {e:?}");
        assert_eq!(
            e.matched.map(|m| m.directive).as_deref(),
            directive,
            "{client}"
        );
    }
}

#[tokio::test]
async fn errors_and_limits() {
    let dns = FakeDns::default()
        .txt("none.example", "not spf")
        .txt("two.example", "v=spf1 -all")
        .txt("two.example", "v=spf1 +all")
        .txt("bad.example", "v=spf1 ip4:192.0.2.1/33 -all")
        .txt("broken.example", "v=spf1 include:down.example -all")
        .failing("down.example")
        .txt(
            "many.example",
            "v=spf1 a:1.example a:2.example a:3.example a:4.example a:5.example a:6.example a:7.example a:8.example a:9.example a:10.example a:11.example",
        )
        .txt("voids.example", "v=spf1 a:x.example a:y.example a:z.example -all")
        .txt("inc-none.example", "v=spf1 include:none.example -all")
        .txt("redir.example", "v=spf1 redirect=nowhere.example");
    let mut dns = dns;
    for n in 1..=11 {
        dns = dns.a(&format!("{n}.example"), "192.0.2.200");
    }
    let cases = [
        ("nothing.example", SpfResult::None),
        ("none.example", SpfResult::None),
        ("two.example", SpfResult::PermError),
        ("bad.example", SpfResult::PermError),
        ("broken.example", SpfResult::TempError),
        ("many.example", SpfResult::PermError),
        ("voids.example", SpfResult::PermError),
        ("inc-none.example", SpfResult::PermError),
        ("redir.example", SpfResult::PermError),
        ("single-label", SpfResult::None),
    ];
    for (domain, result) in cases {
        let e = check(&dns, "192.0.2.1", &format!("x@{domain}")).await;
        assert_eq!(e.result, result, "{domain}: {e:?}");
        assert!(e.error.is_some(), "{domain}");
        assert_eq!(e.error.as_ref().unwrap().result(), result, "{domain}");
    }
    let e = check(&dns, "192.0.2.1", "x@many.example").await;
    assert_eq!(e.error, Some(SpfError::TooManyLookups));
    assert_eq!(e.dns_lookups, 11);
    let e = check(&dns, "192.0.2.1", "x@voids.example").await;
    assert_eq!(e.error, Some(SpfError::TooManyVoidLookups { limit: 2 }));
    assert_eq!(e.void_lookups, 3);
}

#[tokio::test]
async fn redirect_uses_the_targets_record_and_explanation() {
    let dns = FakeDns::default()
        .txt(
            "example.com",
            "v=spf1 exp=no.example.com redirect=_spf.example.net",
        )
        .txt("no.example.com", "not this one")
        .txt(
            "_spf.example.net",
            "v=spf1 ip6:2001:db8::/32 -all exp=yes.example.net",
        )
        .txt("yes.example.net", "see %{d}");
    let e = check(&dns, "192.0.2.1", "x@example.com").await;
    assert_eq!(e.result, SpfResult::Fail);
    assert_eq!(
        e.matched,
        Some(Matched {
            domain: "_spf.example.net".to_string(),
            directive: "-all".to_string()
        })
    );
    assert_eq!(e.explanation.as_deref(), Some("see _spf.example.net"));
    assert_eq!(e.dns_lookups, 1);
    let e = check(&dns, "2001:db8::1", "x@example.com").await;
    assert_eq!(e.result, SpfResult::Pass);
}

#[tokio::test]
async fn helo_null_sender_and_mapped_addresses() {
    let dns = FakeDns::default()
        .txt(
            "mail.example.org",
            "v=spf1 ip4:192.0.2.0/24 -all exp=e.example.org",
        )
        .txt("e.example.org", "%{s} %{l} %{o} %{h}");
    let options = Options::default();
    let e = check_mail_from(
        &dns,
        &options,
        ip("::ffff:192.0.2.9"),
        "",
        "mail.example.org",
    )
    .await;
    assert_eq!(e.result, SpfResult::Pass);
    assert_eq!(e.ip, ip("192.0.2.9"));
    let e = check_helo(&dns, &options, ip("198.51.100.1"), "mail.example.org").await;
    assert_eq!(e.result, SpfResult::Fail);
    assert_eq!(
        e.explanation.as_deref(),
        Some("postmaster@mail.example.org postmaster mail.example.org mail.example.org")
    );
}

#[tokio::test]
async fn smallest_ttl_wins() {
    let dns = FakeDns::default()
        .txt("example.com", "v=spf1 include:short.example.com -all")
        .txt("short.example.com", "v=spf1 ip4:192.0.2.1");
    let e = check(&dns, "192.0.2.1", "x@example.com").await;
    assert_eq!(e.result, SpfResult::Pass);
    assert_eq!(e.ttl, Some(60));
}

#[tokio::test]
async fn overall_timeout_is_temperror() {
    struct Stuck;
    impl SpfDns for Stuck {
        async fn txt(&self, _: &str) -> DnsResult<Vec<u8>> {
            std::future::pending().await
        }
        async fn a(&self, _: &str) -> DnsResult<Ipv4Addr> {
            std::future::pending().await
        }
        async fn aaaa(&self, _: &str) -> DnsResult<Ipv6Addr> {
            std::future::pending().await
        }
        async fn mx(&self, _: &str) -> DnsResult<MxRecord> {
            std::future::pending().await
        }
        async fn ptr(&self, _: IpAddr) -> DnsResult<String> {
            std::future::pending().await
        }
    }
    let options = Options {
        timeout: std::time::Duration::from_millis(50),
        ..Options::default()
    };
    let e = check_host_with(
        &Stuck,
        &options,
        ip("192.0.2.1"),
        "example.com",
        "a@example.com",
        "h",
    )
    .await;
    assert_eq!(e.result, SpfResult::TempError);
    assert!(matches!(e.error, Some(SpfError::Timeout { .. })));
}

#[test]
fn evaluation_serializes() {
    let e = Evaluation {
        ip: ip("192.0.2.1"),
        domain: "example.com".to_string(),
        result: SpfResult::PermError,
        record: Some("v=spf1 foo".to_string()),
        matched: None,
        dns_lookups: 0,
        void_lookups: 0,
        explanation: None,
        ttl: Some(300),
        error: Some(SpfError::TooManyLookups),
    };
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["result"], "permerror");
    assert_eq!(
        json["error"],
        "more than 10 DNS-querying terms (RFC 7208 §4.6.4)"
    );
}

#[test]
fn domains_for_initial_processing() {
    assert!(valid_domain("example.com"));
    assert!(valid_domain("example.com."));
    assert!(!valid_domain("localhost"));
    assert!(!valid_domain("a..example.com"));
    assert!(!valid_domain("[192.0.2.1]"));
    assert!(!valid_domain(&format!("{}.example.com", "a".repeat(64))));
    assert!(valid_domain(&format!("{}.example.com", "a".repeat(63))));
    assert_eq!(
        eval::truncate_domain(format!("{}example.com.", "abcdefghi.".repeat(30))).len(),
        251
    );
}
