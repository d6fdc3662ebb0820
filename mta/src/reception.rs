//! What reception does with a complete message before it is stored: check
//! the From: header against the tenant, and add `Received:`, plus
//! `Message-ID:` and `Date:` when missing (RFC 5321 §4.4, RFC 5322 §3.6).
//! Nothing else in the message is changed.
//!
//! Pure: the caller passes the time and the random token.

use std::time::SystemTime;

use mail_parser::{HeaderName, MessageParser};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::policy::Policy;
use crate::smtp::{Envelope, Reply, Status};

/// A message ready for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Our header fields (Received, and Message-ID or Date when missing),
    /// to go on top of the message as received. Kept apart so that the
    /// content is copied once, when the signature goes on top of both.
    pub added: Vec<u8>,
    /// The Message-ID (the client's, or the one we added), with brackets.
    pub message_id: Option<String>,
    /// The domain of the (first) From: address, lower-cased: the DKIM
    /// signing domain.
    pub from_domain: String,
}

fn refuse(status: Status, text: String) -> Reply {
    Reply::new(550, status, text)
}

/// The RFC 5322 date of `t`, in UTC.
pub fn rfc5322_date(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc2822)
        .expect("every SystemTime after 1970 formats")
}

/// Checks the message and adds our headers.
pub fn prepare(
    env: &Envelope,
    policy: &Policy,
    hostname: &str,
    queue_id: &str,
    now: SystemTime,
    token: u64,
) -> Result<Prepared, Reply> {
    let parser = MessageParser::new()
        .header_address(HeaderName::From)
        .header_id(HeaderName::MessageId);
    let parsed = parser.parse_headers(&env.content);
    let headers = parsed.as_ref().map(|m| m.headers()).unwrap_or(&[]);

    let from_count = headers
        .iter()
        .filter(|h| h.name == HeaderName::From)
        .count();
    if from_count != 1 {
        return Err(refuse(
            Status(5, 6, 0),
            format!(
                "Message refused: it has {from_count} From: headers; exactly one is required (RFC 5322 3.6)"
            ),
        ));
    }
    let from = parsed.as_ref().and_then(|m| m.from());
    let from_addresses: Vec<String> = from
        .map(|a| {
            a.iter()
                .filter_map(|addr| addr.address.as_deref().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if from_addresses.is_empty() {
        return Err(refuse(
            Status(5, 6, 0),
            "Message refused: the From: header holds no address".into(),
        ));
    }
    if let Some(tenant) = &env.tenant {
        for addr in &from_addresses {
            let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if !policy.sender_allowed(tenant, domain) {
                return Err(refuse(
                    Status(5, 7, 1),
                    format!(
                        "From: header address {addr} is not in one of tenant {tenant}'s sender domains"
                    ),
                ));
            }
        }
    }

    let date = rfc5322_date(now);
    let mut added = String::with_capacity(512);
    // Received (RFC 5321 §4.4): who gave it to us, how, and when. The TLS
    // comment follows Postfix's form, which receivers' filters know.
    added.push_str(&format!(
        "Received: from {} ({} [{}])\r\n\tby {} (mta) with {} id {}",
        env.helo,
        env.helo,
        crate::policy::canonical_ip(env.peer.ip),
        hostname,
        env.protocol(),
        queue_id
    ));
    if let Some(tls) = &env.tls {
        added.push_str(&format!(
            "\r\n\t(using {} with cipher {})",
            tls.version, tls.cipher
        ));
    }
    if let [only] = env.recipients.as_slice() {
        added.push_str(&format!("\r\n\tfor <{only}>"));
    }
    added.push_str(&format!(";\r\n\t{date}\r\n"));

    let has = |name: HeaderName| headers.iter().any(|h| h.name == name);
    let mut message_id = parsed
        .as_ref()
        .and_then(|m| m.message_id())
        .map(|id| format!("<{id}>"));
    if !has(HeaderName::MessageId) {
        let id = format!("<{queue_id}.{token:016x}@{hostname}>");
        added.push_str(&format!("Message-ID: {id}\r\n"));
        message_id = Some(id);
    }
    if !has(HeaderName::Date) {
        added.push_str(&format!("Date: {date}\r\n"));
    }

    let from_domain = from_addresses[0]
        .rsplit_once('@')
        .map(|(_, d)| crate::policy::normalize_domain(d))
        .unwrap_or_default();
    Ok(Prepared {
        added: added.into_bytes(),
        message_id,
        from_domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DomainPattern, Tenant};
    use crate::smtp::command::MailParams;
    use crate::smtp::{Identity, Peer, TlsInfo};
    use std::time::{Duration, UNIX_EPOCH};

    fn policy() -> Policy {
        Policy {
            tenants: vec![Tenant {
                name: "acme".into(),
                sender_domains: vec![DomainPattern::parse("acme.example").unwrap()],
            }],
            ..Default::default()
        }
    }

    fn env(content: &str, tenant: Option<&str>) -> Envelope {
        Envelope {
            peer: Peer {
                ip: "::ffff:192.0.2.7".parse().unwrap(),
                port: 1,
                relay: false,
            },
            helo: "client.example".into(),
            esmtp: true,
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
            }),
            auth: tenant.map(|t| Identity {
                user: "u".into(),
                tenant: t.into(),
            }),
            tenant: tenant.map(str::to_string),
            sender: "n@acme.example".into(),
            recipients: vec!["a@dest.example".into()],
            params: MailParams::default(),
            content: content.as_bytes().to_vec(),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_348_800) // 2026-11-22T12:00:00Z
    }

    fn run(content: &str, tenant: Option<&str>) -> Result<String, Reply> {
        prepare(
            &env(content, tenant),
            &policy(),
            "mx.test",
            "0QID",
            now(),
            0xabc,
        )
        .map(|p| String::from_utf8([p.added, content.as_bytes().to_vec()].concat()).unwrap())
    }

    #[test]
    fn received_message_id_and_date_are_added_and_the_rest_is_untouched() {
        let original = "From: News <news@acme.example>\r\nSubject: hi\r\n\r\nbody\r\n";
        let out = run(original, Some("acme")).unwrap();
        assert!(out.ends_with(original), "message changed:\n{out}");
        let added = &out[..out.len() - original.len()];
        assert_eq!(
            added,
            "Received: from client.example (client.example [192.0.2.7])\r\n\
             \tby mx.test (mta) with ESMTPSA id 0QID\r\n\
             \t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)\r\n\
             \tfor <a@dest.example>;\r\n\
             \tSun, 22 Nov 2026 12:00:00 +0000\r\n\
             Message-ID: <0QID.0000000000000abc@mx.test>\r\n\
             Date: Sun, 22 Nov 2026 12:00:00 +0000\r\n"
        );
    }

    #[test]
    fn existing_message_id_and_date_are_kept() {
        let original = "From: news@acme.example\r\nDate: Sat, 21 Nov 2026 10:00:00 +0100\r\nMessage-ID: <abc@acme.example>\r\n\r\nbody\r\n";
        let p = prepare(
            &env(original, Some("acme")),
            &policy(),
            "mx.test",
            "0QID",
            now(),
            1,
        )
        .unwrap();
        let out =
            String::from_utf8([p.added.clone(), original.as_bytes().to_vec()].concat()).unwrap();
        assert_eq!(out.matches("Message-ID:").count(), 1);
        assert_eq!(out.matches("Date:").count(), 1);
        assert_eq!(p.message_id.as_deref(), Some("<abc@acme.example>"));
    }

    #[test]
    fn a_tenant_cannot_put_another_domain_in_from() {
        let e = run("From: ceo@bank.example\r\n\r\nx\r\n", Some("acme")).unwrap_err();
        assert_eq!((e.code, e.status), (550, Some(Status(5, 7, 1))));
        assert!(e.text.contains("ceo@bank.example"));
        // A second mailbox in the same header counts too.
        let e = run(
            "From: news@acme.example, ceo@bank.example\r\n\r\nx\r\n",
            Some("acme"),
        )
        .unwrap_err();
        assert_eq!(e.status, Some(Status(5, 7, 1)));
        // Folded and with a display name and comment: still found.
        assert!(
            run(
                "From: \"Acme\r\n News\" <news@ACME.example> (list)\r\n\r\nx\r\n",
                Some("acme")
            )
            .is_ok()
        );
    }

    #[test]
    fn from_is_required_once() {
        let e = run("Subject: x\r\n\r\nx\r\n", None).unwrap_err();
        assert_eq!(e.status, Some(Status(5, 6, 0)));
        let e = run(
            "From: a@acme.example\r\nFrom: b@acme.example\r\n\r\nx\r\n",
            None,
        )
        .unwrap_err();
        assert!(e.text.contains("2 From"), "{e}");
        let e = run("From: undisclosed\r\n\r\nx\r\n", None).unwrap_err();
        assert!(e.text.contains("no address"), "{e}");
    }

    #[test]
    fn the_from_domain_is_reported_for_signing() {
        let p = prepare(
            &env("From: \"N\" <news@Mail.ACME.example>\r\n\r\nx\r\n", None),
            &policy(),
            "mx.test",
            "0QID",
            now(),
            1,
        )
        .unwrap();
        assert_eq!(p.from_domain, "mail.acme.example");
    }

    #[test]
    fn without_a_tenant_any_from_domain_passes() {
        assert!(run("From: x@anything.example\r\n\r\nx\r\n", None).is_ok());
    }
}
