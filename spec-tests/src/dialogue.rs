//! Conformance fixtures as data: scripted SMTP dialogues.
//!
//! A fixture is a `.smtp` file under `fixtures/<rfc>/`. Its first comment
//! line cites the RFC section it checks. Lines:
//!
//! ```text
//! # RFC 5321 §4.1.1.1: ...    comment (the first one is the citation)
//! > EHLO client.test          send the line and CRLF
//! >> MAIL FROM:<a@b>\r\n      send raw bytes; escapes \r \n \t \0 \\ \xHH
//! < 250                       expect a reply with this code
//! < 250 2.1.0                 ... and this enhanced status code
//! < 250 ~CHUNKING             ... whose text contains CHUNKING
//! < 250 !AUTH                 ... whose text does not contain AUTH
//! @ tls                       start TLS now (after a 220 to STARTTLS)
//! = queued 1                  exactly this many messages are in the queue
//! = closed                    the server has closed the connection
//! ```
//!
//! After the dialogue every 4xx/5xx reply the client saw must be in the
//! transaction log with its codes, and a new client must still be served.
//!
//! Several `>` lines before their `<` lines are sent in one write, which is
//! how a pipelining client behaves (RFC 2920).

use std::path::Path;

use crate::client::Client;
use crate::server::{TestServer, eventually};

/// One step of a dialogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send(Vec<u8>),
    Expect {
        code: u16,
        enhanced: Option<String>,
        contains: Vec<String>,
        lacks: Vec<String>,
    },
    Tls,
    Queued(usize),
    Closed,
}

/// A parsed fixture.
#[derive(Debug, Clone)]
pub struct Dialogue {
    pub name: String,
    pub citation: String,
    pub steps: Vec<Step>,
}

fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b.get(i + 1).ok_or("dangling backslash")?;
        i += 2;
        match c {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = s.get(i..i + 2).ok_or("short \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{}", other as char)),
        }
    }
    Ok(out)
}

impl Dialogue {
    pub fn parse(name: &str, text: &str) -> Result<Dialogue, String> {
        let mut steps = Vec::new();
        let mut citation = String::new();
        for (n, line) in text.lines().enumerate() {
            let err = |m: String| format!("{name}:{}: {m}", n + 1);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(c) = line.strip_prefix('#') {
                if citation.is_empty() {
                    citation = c.trim().to_string();
                }
                continue;
            }
            if line == ">" {
                // An empty line (trailing blanks were trimmed).
                steps.push(Step::Send(b"\r\n".to_vec()));
            } else if let Some(raw) = line.strip_prefix(">> ") {
                steps.push(Step::Send(unescape(raw).map_err(err)?));
            } else if let Some(cmd) = line.strip_prefix("> ") {
                let mut bytes = unescape(cmd).map_err(err)?;
                bytes.extend_from_slice(b"\r\n");
                steps.push(Step::Send(bytes));
            } else if let Some(exp) = line.strip_prefix("< ") {
                let mut parts = exp.split_whitespace();
                let code = parts
                    .next()
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| err("expected a reply code".into()))?;
                let (mut enhanced, mut contains, mut lacks) = (None, vec![], vec![]);
                for p in parts {
                    if let Some(t) = p.strip_prefix('~') {
                        contains.push(t.to_string());
                    } else if let Some(t) = p.strip_prefix('!') {
                        lacks.push(t.to_string());
                    } else {
                        enhanced = Some(p.to_string());
                    }
                }
                steps.push(Step::Expect {
                    code,
                    enhanced,
                    contains,
                    lacks,
                });
            } else if line == "@ tls" {
                steps.push(Step::Tls);
            } else if let Some(n) = line.strip_prefix("= queued ") {
                steps.push(Step::Queued(
                    n.trim().parse().map_err(|_| err("bad count".into()))?,
                ));
            } else if line == "= closed" {
                steps.push(Step::Closed);
            } else {
                return Err(err(format!("cannot read {line:?}")));
            }
        }
        if citation.is_empty() {
            return Err(format!(
                "{name}: the first comment must cite the RFC section"
            ));
        }
        Ok(Dialogue {
            name: name.to_string(),
            citation,
            steps,
        })
    }

    pub fn load(path: &Path) -> Dialogue {
        let text = std::fs::read_to_string(path).expect("fixture readable");
        Dialogue::parse(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the dialogue against `server`; panics with the place of the
    /// first difference.
    pub fn run(&self, server: &TestServer) {
        let mut c = Client::connect(server.addr);
        // The client has read the greeting already; the first `<` checks it.
        let mut greeting = Some(c.greeting.clone());
        let mut pending: Vec<u8> = Vec::new();
        // Every refusal the client saw (code, enhanced code), to be found
        // in the transaction log afterwards.
        let mut refusals: Vec<(u16, Option<String>)> = Vec::new();
        let ctx = |i: usize| format!("{} (step {}, {})", self.name, i + 1, self.citation);
        for (i, step) in self.steps.iter().enumerate() {
            if !matches!(step, Step::Send(_)) && !pending.is_empty() {
                c.send(std::mem::take(&mut pending));
            }
            match step {
                Step::Send(b) => {
                    greeting = None;
                    pending.extend_from_slice(b);
                }
                Step::Expect {
                    code,
                    enhanced,
                    contains,
                    lacks,
                } => {
                    let r = match greeting.take() {
                        Some(g) => g,
                        None => c
                            .try_reply()
                            .unwrap_or_else(|e| panic!("{}: no reply: {e}", ctx(i))),
                    };
                    assert_eq!(r.code, *code, "{}: got {r}", ctx(i));
                    if r.code >= 400 {
                        refusals.push((r.code, r.enhanced().map(str::to_string)));
                    }
                    if let Some(e) = enhanced {
                        assert_eq!(r.enhanced(), Some(e.as_str()), "{}: got {r}", ctx(i));
                    }
                    for t in contains {
                        assert!(
                            r.text().contains(t.as_str()),
                            "{}: {t} missing in {r}",
                            ctx(i)
                        );
                    }
                    for t in lacks {
                        assert!(
                            !r.text().contains(t.as_str()),
                            "{}: {t} present in {r}",
                            ctx(i)
                        );
                    }
                }
                Step::Tls => c.upgrade(),
                Step::Queued(n) => {
                    let got = eventually(&ctx(i), || {
                        let len = server.queue().len();
                        (len == *n).then_some(len)
                    });
                    assert_eq!(got, *n);
                }
                Step::Closed => assert!(c.is_closed(), "{}: connection still open", ctx(i)),
            }
        }
        if !pending.is_empty() {
            c.send(pending);
        }
        drop(c);
        self.refusals_are_logged(server, &refusals);
        // Nothing the client did stalls the server for the next one.
        let mut next = Client::connect(server.addr);
        assert_eq!(next.greeting.code, 220, "{}: after the dialogue", self.name);
        let r = next.cmd("NOOP");
        assert_eq!(r.code, 250, "{}: NOOP after the dialogue: {r}", self.name);
    }

    /// Each refusal the client saw has its record (Rejection, or
    /// AuthFailure for AUTH), with the same codes, as often as it was seen.
    fn refusals_are_logged(&self, server: &TestServer, refusals: &[(u16, Option<String>)]) {
        let mut wanted: Vec<(u16, Option<String>)> = refusals.to_vec();
        wanted.sort();
        let logged = |records: &[mta::log::Record]| {
            let mut got: Vec<(u16, Option<String>)> = records
                .iter()
                .filter_map(|r| match r {
                    mta::log::Record::Rejection(r) => Some(&r.reply),
                    mta::log::Record::AuthFailure(f) => Some(&f.reply),
                    _ => None,
                })
                .map(|r| (r.code, r.enhanced_code.clone()))
                .collect();
            got.sort();
            got
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got = logged(&server.records());
            let mut missing = wanted.clone();
            for g in &got {
                if let Some(i) = missing.iter().position(|w| w == g) {
                    missing.remove(i);
                }
            }
            if missing.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: refusals the client saw but the log lacks: {missing:?} (logged: {got:?})",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_line() {
        let d = Dialogue::parse(
            "t",
            "# RFC 1 §2\n> EHLO x\n>> A\\r\\n\\x00\n< 250 2.0.0 ~PIPE !AUTH\n@ tls\n= queued 2\n= closed\n",
        )
        .unwrap();
        assert_eq!(d.citation, "RFC 1 §2");
        assert_eq!(d.steps[0], Step::Send(b"EHLO x\r\n".to_vec()));
        assert_eq!(d.steps[1], Step::Send(b"A\r\n\0".to_vec()));
        assert_eq!(
            d.steps[2],
            Step::Expect {
                code: 250,
                enhanced: Some("2.0.0".into()),
                contains: vec!["PIPE".into()],
                lacks: vec!["AUTH".into()]
            }
        );
        assert_eq!(&d.steps[3..], &[Step::Tls, Step::Queued(2), Step::Closed]);
    }

    #[test]
    fn refuses_fixtures_without_a_citation_or_with_junk() {
        assert!(Dialogue::parse("t", "> EHLO x\n").is_err());
        assert!(Dialogue::parse("t", "# RFC\n? what\n").is_err());
        assert!(Dialogue::parse("t", "# RFC\n>> \\q\n").is_err());
    }
}
