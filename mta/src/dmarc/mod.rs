//! DMARC (RFC 7489): whether a message we are about to send will pass the
//! From: domain's DMARC policy, and what that policy is.
//!
//! This module owns, for one message:
//! - policy discovery (§6.6.3): the TXT record at `_dmarc.<From domain>`,
//!   or failing that at `_dmarc.<organisational domain>` ([`discover`]);
//! - the record's syntax (§6.3, §6.4; [`record`]);
//! - the organisational domain (§3.2), by the public suffix list compiled
//!   into the `psl` crate ([`organizational_domain`]);
//! - identifier alignment (§3.1), relaxed or strict ([`aligned`]), and the
//!   verdict: which policy applies (`p=`, or `sp=` for a subdomain), and
//!   whether DKIM or SPF aligns ([`evaluate`], [`Verdict`]).
//!
//! What it does not do: verify received mail. We are the sender: the DKIM
//! domains given to [`evaluate`] are those of the signatures *we* add
//! (they verify by construction), and the SPF result is our own check of
//! the egress IP for the MAIL FROM domain (`crate::spf`). The verdict says
//! what a receiver applying DMARC will conclude, before we send.
//! Reporting (`rua`, `ruf`, §7) is not done either.
//!
//! Domains are compared in one form: lowercase, without a final dot, IDN
//! U-labels converted to A-labels (RFC 8616 §4), so that `Example.COM.`
//! and `example.com` are the same domain.
//!
//! Trust boundary: every DNS answer is untrusted. A record is read only
//! for the few tags that matter, strictly to the grammar, and only ever
//! kept and shown as text; one discovery makes at most two TXT lookups
//! through the injected [`SpfDns`] (the resolver's timeouts bound them).

pub mod record;

#[cfg(test)]
mod tests;

pub use record::{Record, is_dmarc_record, parse_record};

use crate::spf::{DnsAnswer, SpfDns};

/// A requested policy (`p=`, `sp=`; §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An identifier alignment mode (`adkim=`, `aspf=`; §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Same organisational domain.
    Relaxed,
    /// The same domain.
    Strict,
}

/// Why a record is not usable, or discovery found no usable one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmarcError {
    #[error("the record does not start with v=DMARC1 (RFC 7489 §6.3)")]
    NotDmarc,
    #[error("the record has no p= tag (RFC 7489 §6.3)")]
    MissingPolicy,
    #[error("p={value} is not none, quarantine or reject (RFC 7489 §6.3)")]
    InvalidPolicy { value: String },
    #[error("sp={value} is not none, quarantine or reject (RFC 7489 §6.3)")]
    InvalidSubdomainPolicy { value: String },
    #[error(
        "_dmarc.{domain} has {count} DMARC records; with more than one no policy applies (RFC 7489 §6.6.3)"
    )]
    MultipleRecords { domain: String, count: usize },
}

/// What policy discovery (§6.6.3) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// One usable record, at `_dmarc.<at>`: the From domain or its
    /// organisational domain.
    Found { record: Record, at: String },
    /// No DMARC record at either name (NXDOMAIN, no TXT records, or no
    /// TXT record starting with `v=DMARC1`).
    NoRecord,
    /// DMARC records were published at `_dmarc.<at>` but none applies:
    /// several of them (step 5), or one without a valid `p=`/`sp=` and no
    /// valid `rua=` (step 6). No DMARC processing applies, as with
    /// [`Discovery::NoRecord`]; the reason is for the operator.
    Ignored { at: String, reason: DmarcError },
    /// A lookup failed (SERVFAIL, REFUSED, timeout): nothing can be
    /// concluded; the text says which lookup and why.
    TempError(String),
}

/// A domain in the form compared: surrounding whitespace and one final
/// dot removed, A-labels for U-labels (RFC 8616 §4; an invalid IDN is kept
/// as it is), lowercase.
pub fn normalize(domain: &str) -> String {
    let domain = domain.trim();
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_lowercase())
    }
}

/// The organisational domain (§3.2) of `domain` (normalised, see
/// [`normalize`]): the public suffix that matches the most labels, plus
/// one label. The list is Mozilla's Public Suffix List, ICANN and private
/// sections both (as OpenDMARC uses it), with its default rule `*` (an
/// unlisted TLD is a suffix). A domain that is itself a public suffix (or
/// empty) has no label to add and is its own organisational domain.
pub fn organizational_domain(domain: &str) -> String {
    let domain = normalize(domain);
    match psl::domain_str(&domain) {
        Some(org) => org.to_string(),
        None => domain,
    }
}

/// Identifier alignment (§3.1): strict, the two domains are equal; relaxed,
/// their organisational domains are. Case-insensitive, final dots
/// ignored; an empty domain aligns with nothing.
pub fn aligned(a: &str, b: &str, mode: Mode) -> bool {
    let (a, b) = (normalize(a), normalize(b));
    if a.is_empty() || b.is_empty() {
        return false;
    }
    match mode {
        Mode::Strict => a == b,
        Mode::Relaxed => a == b || organizational_domain(&a) == organizational_domain(&b),
    }
}

/// The DMARC records at `_dmarc.<domain>`, others discarded (§6.6.3 steps
/// 2 and 4), or why the lookup failed.
async fn records_at<D: SpfDns>(dns: &D, domain: &str) -> Result<Vec<String>, String> {
    let name = format!("_dmarc.{domain}");
    match dns.txt(&name).await {
        Ok(DnsAnswer::Records { records, .. }) => Ok(records
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .filter(|r| is_dmarc_record(r))
            .collect()),
        Ok(DnsAnswer::NoRecords { .. } | DnsAnswer::NotFound { .. }) => Ok(Vec::new()),
        Err(e) => Err(format!("TXT lookup of {name} failed: {e}")),
    }
}

fn select(at: String, mut records: Vec<String>) -> Discovery {
    if records.len() > 1 {
        return Discovery::Ignored {
            reason: DmarcError::MultipleRecords {
                domain: at.clone(),
                count: records.len(),
            },
            at,
        };
    }
    let text = records.pop().unwrap_or_default();
    match parse_record(&text) {
        Ok(record) => Discovery::Found { record, at },
        Err(reason) => Discovery::Ignored { at, reason },
    }
}

/// Policy discovery (§6.6.3) for a From: domain: the DMARC records at
/// `_dmarc.<from_domain>`; when there are none, those at
/// `_dmarc.<organisational domain>` (if it differs). Exactly one record
/// must remain; a failed lookup is a [`Discovery::TempError`], NXDOMAIN
/// and NODATA are no record.
pub async fn discover<D: SpfDns>(dns: &D, from_domain: &str) -> Discovery {
    let from = normalize(from_domain);
    if from.is_empty() {
        return Discovery::NoRecord;
    }
    match records_at(dns, &from).await {
        Err(e) => return Discovery::TempError(e),
        Ok(records) if !records.is_empty() => return select(from, records),
        Ok(_) => {}
    }
    let org = organizational_domain(&from);
    if org == from {
        return Discovery::NoRecord;
    }
    match records_at(dns, &org).await {
        Err(e) => Discovery::TempError(e),
        Ok(records) if !records.is_empty() => select(org, records),
        Ok(_) => Discovery::NoRecord,
    }
}

/// The DMARC verdict on one message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// The From: domain, normalised (see [`normalize`]).
    pub from_domain: String,
    /// The policy that applies: `sp=` when the record was found at the
    /// organisational domain of a subdomain From and has `sp=`, else
    /// `p=`. `None` without a usable record (and on temperror).
    pub policy: Option<Policy>,
    /// Some DKIM signing domain (`d=`) aligns with the From domain under
    /// `adkim` (relaxed without a record).
    pub dkim_aligned: bool,
    /// SPF passed and the MAIL FROM domain aligns with the From domain
    /// under `aspf` (relaxed without a record).
    pub spf_aligned: bool,
    /// `dkim_aligned || spf_aligned` (§4.2).
    pub pass: bool,
    /// The domain whose `_dmarc` held the record(s) used or ignored.
    pub record_domain: Option<String>,
    /// The record applied, as published.
    pub record: Option<String>,
    /// Why published records were not applied ([`Discovery::Ignored`]).
    pub ignored: Option<String>,
    /// Why discovery failed ([`Discovery::TempError`]).
    pub error: Option<String>,
}

impl Verdict {
    /// The message fails DMARC at a `p=reject` (or `sp=reject`) domain.
    ///
    /// `pct=` is ignored here on purpose: a receiver applies the policy to
    /// `pct`% of failing messages and the next lower one (quarantine) to
    /// the rest (§6.6.4), so every such message is at least sent to spam;
    /// refusing it before sending is the safe answer.
    pub fn would_be_rejected(&self) -> bool {
        !self.pass && self.policy == Some(Policy::Reject)
    }

    /// The outcome as a metrics label: `temperror` (discovery failed),
    /// `none` (no policy applies), `pass` or `fail`.
    pub fn outcome(&self) -> &'static str {
        if self.error.is_some() {
            "temperror"
        } else if self.policy.is_none() {
            "none"
        } else if self.pass {
            "pass"
        } else {
            "fail"
        }
    }
}

/// Combines a discovery with a message's identifiers (pure).
/// `dkim_domains` are the `d=` of the signatures we add;
/// `mail_from_domain` is the MAIL FROM domain (`None` for a null sender);
/// `spf_pass` whether SPF passed for it from the egress IP.
pub fn evaluate(
    discovery: &Discovery,
    from_domain: &str,
    dkim_domains: &[String],
    mail_from_domain: Option<&str>,
    spf_pass: bool,
) -> Verdict {
    let from = normalize(from_domain);
    let found = match discovery {
        Discovery::Found { record, at } => Some((record, at)),
        _ => None,
    };
    let adkim = found.map_or(Mode::Relaxed, |(r, _)| r.adkim);
    let aspf = found.map_or(Mode::Relaxed, |(r, _)| r.aspf);
    let dkim_aligned = dkim_domains.iter().any(|d| aligned(d, &from, adkim));
    let spf_aligned = spf_pass && mail_from_domain.is_some_and(|d| aligned(d, &from, aspf));
    let policy = found.map(|(record, at)| {
        if normalize(at) == from {
            record.policy
        } else {
            record.subdomain_policy.unwrap_or(record.policy)
        }
    });
    let (record_domain, ignored, error) = match discovery {
        Discovery::Found { at, .. } => (Some(at.clone()), None, None),
        Discovery::Ignored { at, reason } => (Some(at.clone()), Some(reason.to_string()), None),
        Discovery::NoRecord => (None, None, None),
        Discovery::TempError(e) => (None, None, Some(e.clone())),
    };
    Verdict {
        from_domain: from,
        policy,
        dkim_aligned,
        spf_aligned,
        pass: dkim_aligned || spf_aligned,
        record_domain,
        record: found.map(|(r, _)| r.text.clone()),
        ignored,
        error,
    }
}
