//! A real DNS server on loopback for the SPF conformance suite:
//! hickory-server with a request handler that answers from a [`Zone`]
//! built from the suite's `zonedata`, on UDP and TCP at one port.
//!
//! Zone files cannot say what the suite needs, so the handler answers
//! itself: names with any visible character (`foo:bar/baz.example.com`,
//! spaces, `%`), TXT records of several strings or of none, SPF (type 99)
//! records beside TXT, CNAMEs, and `TIMEOUT` — a name whose queries fail.
//! A query hitting `TIMEOUT` gets SERVFAIL, which the resolver reports as
//! a failure at once (the same temperror a timeout gives, without waiting
//! for one). As in the suite's own driver, records listed before the
//! `TIMEOUT` of a name are still served for their type.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{CNAME, MX, NULL, PTR, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

/// The TTL of every record served.
pub const TTL: u32 = 600;

/// One entry of a name, in the order the suite lists them.
#[derive(Debug, Clone)]
enum Entry {
    Record(Box<Record>),
    Timeout,
}

/// The data a [`SpfDnsServer`] serves.
#[derive(Debug, Default, Clone)]
pub struct Zone {
    names: HashMap<LowerName, Vec<Entry>>,
}

/// A name as the suite writes it, taken label by label as raw bytes.
pub fn name(text: &str) -> Name {
    mta::spf::dns::dns_name(text).unwrap_or_else(|| panic!("not a DNS name: {text:?}"))
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    fn push(&mut self, owner: &str, entry: Entry) {
        self.names
            .entry(LowerName::from(name(owner)))
            .or_default()
            .push(entry);
    }

    fn record(&mut self, owner: &str, data: RData) {
        let record = Record::from_rdata(name(owner), TTL, data);
        self.push(owner, Entry::Record(Box::new(record)));
    }

    /// The name exists (queries for other types get NODATA) without any
    /// record.
    pub fn touch(&mut self, owner: &str) {
        self.names.entry(LowerName::from(name(owner))).or_default();
    }

    /// Queries for `owner` fail, except for types whose records were added
    /// before.
    pub fn timeout(&mut self, owner: &str) {
        self.push(owner, Entry::Timeout);
    }

    /// A TXT record of these strings (possibly none).
    pub fn txt(&mut self, owner: &str, strings: &[Vec<u8>]) {
        let data = TXT::from_bytes(strings.iter().map(Vec::as_slice).collect());
        self.record(owner, RData::TXT(data));
    }

    /// An SPF (type 99) record, which RFC 7208 §3.1 no longer uses: served
    /// with the TXT wire format, so that evaluation must ignore it. (One of
    /// no strings has no RDATA, which hickory cannot hold for an unknown
    /// type: it is left out.)
    pub fn spf_type(&mut self, owner: &str, strings: &[Vec<u8>]) {
        let mut wire = Vec::new();
        for s in strings {
            wire.push(s.len() as u8);
            wire.extend_from_slice(s);
        }
        if wire.is_empty() {
            return;
        }
        self.record(
            owner,
            RData::Unknown {
                code: RecordType::Unknown(99),
                rdata: NULL::with(wire),
            },
        );
    }

    pub fn a(&mut self, owner: &str, ip: std::net::Ipv4Addr) {
        self.record(owner, RData::A(ip.into()));
    }

    pub fn aaaa(&mut self, owner: &str, ip: std::net::Ipv6Addr) {
        self.record(owner, RData::AAAA(ip.into()));
    }

    pub fn mx(&mut self, owner: &str, preference: u16, exchange: &str) {
        self.record(owner, RData::MX(MX::new(preference, name(exchange))));
    }

    pub fn ptr(&mut self, owner: &str, target: &str) {
        self.record(owner, RData::PTR(PTR(name(target))));
    }

    pub fn cname(&mut self, owner: &str, target: &str) {
        self.record(owner, RData::CNAME(CNAME(name(target))));
    }

    /// The records of `qtype` at `owner`, or SERVFAIL for a `TIMEOUT`.
    fn records_at(&self, owner: &LowerName, qtype: RecordType) -> Result<Option<Vec<Record>>, ()> {
        let Some(entries) = self.names.get(owner) else {
            return Ok(None);
        };
        let mut found = Vec::new();
        for entry in entries {
            match entry {
                Entry::Timeout if found.is_empty() => return Err(()),
                Entry::Timeout => break,
                Entry::Record(r) if r.record_type() == qtype => found.push((**r).clone()),
                Entry::Record(_) => {}
            }
        }
        Ok(Some(found))
    }

    fn cname_at(&self, owner: &LowerName) -> Option<Record> {
        self.names.get(owner)?.iter().find_map(|e| match e {
            Entry::Record(r) if r.record_type() == RecordType::CNAME => Some((**r).clone()),
            _ => None,
        })
    }

    /// The answer to one query: response code and answer records. CNAMEs
    /// are followed within the zone, as an authoritative server does, up
    /// to a loop or eight links.
    fn answer(&self, qname: &LowerName, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
        let mut answers = Vec::new();
        let mut owner = qname.clone();
        let mut seen = vec![owner.clone()];
        loop {
            if qtype != RecordType::CNAME
                && let Some(cname) = self.cname_at(&owner)
            {
                let RData::CNAME(CNAME(target)) = &cname.data else {
                    unreachable!()
                };
                let target = LowerName::from(target.clone());
                answers.push(cname);
                if seen.contains(&target) || seen.len() > 8 {
                    return (ResponseCode::NoError, answers);
                }
                seen.push(target.clone());
                owner = target;
                continue;
            }
            return match self.records_at(&owner, qtype) {
                Err(()) => (ResponseCode::ServFail, Vec::new()),
                Ok(None) if answers.is_empty() => (ResponseCode::NXDomain, answers),
                Ok(None) => (ResponseCode::NoError, answers),
                Ok(Some(records)) => {
                    answers.extend(records);
                    (ResponseCode::NoError, answers)
                }
            };
        }
    }
}

struct Handler {
    zone: Arc<Zone>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let (code, answers) = match request.request_info() {
            Ok(info) => self.zone.answer(info.query.name(), info.query.query_type()),
            Err(_) => (ResponseCode::FormErr, Vec::new()),
        };
        metadata.response_code = code;
        let response = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// A running server; stops when dropped.
pub struct SpfDnsServer {
    pub addr: SocketAddr,
    _running: crate::dns::Running,
}

impl SpfDnsServer {
    pub fn start(zone: Zone) -> SpfDnsServer {
        let handler = Handler {
            zone: Arc::new(zone),
        };
        let (addr, running) = crate::dns::Running::serve(0, handler);
        SpfDnsServer {
            addr,
            _running: running,
        }
    }
}
