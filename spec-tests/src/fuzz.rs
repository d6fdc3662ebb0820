//! The fuzz targets: what each one feeds the mta and the invariants it
//! asserts (docs/fuzzing.md). A broken invariant panics, which libFuzzer
//! reports as a crash and a test reports as a failure.
//!
//! This file is compiled twice: here, as `spec_tests::fuzz`, so that
//! `tests/fuzz_regressions.rs` replays the corpus and every regression in
//! the normal test run, uninstrumented; and in the libFuzzer harness
//! (`spec-tests/fuzz`, its own workspace), which includes it by path. So it
//! uses only `std` and `mta`.
//!
//! Every target takes raw bytes. The first few bytes choose the settings
//! (how the input is cut into reads, what the driver answers), the rest is
//! the input proper, so libFuzzer's mutations explore both.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use mta::config::Config;
use mta::policy::{DomainPattern, Policy, Tenant};
use mta::smtp::body::{ChunkReader, DataReader, MAX_LINE};
use mta::smtp::{AuthOutcome, Envelope, Event, Identity, Peer, Reply, Session, SessionConfig};
use mta::smtp::{Status, Step, TlsInfo};

/// A fuzz target: raw bytes in; it panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// The targets by name, as `corpus/<name>/` and `regressions/<name>/` are
/// named.
pub const TARGETS: &[(&str, Target)] = &[
    ("smtp_session", smtp_session),
    ("data_reader", data_reader),
    ("config", config),
];

/// RFC 5321 §4.5.3.1.5: a reply line, code and CRLF included.
pub const MAX_REPLY_LINE: usize = 512;

/// A small deterministic generator (xorshift64*), so that one input always
/// runs the same way.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Cuts `data` into the pieces reads from a socket might return. `mode`
/// picks the piece sizes: everything at once, 1 to 4 bytes, up to 64, or up
/// to 2048 (beyond the line limits).
fn pieces(data: &[u8], mode: u8, seed: u64) -> Vec<&[u8]> {
    let max = match mode & 3 {
        0 => return vec![data],
        1 => 4,
        2 => 64,
        _ => 2048,
    };
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.next() % max) as usize;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

/// Checks that `wire` is a sequence of well-formed SMTP replies (RFC 5321
/// §4.2, §4.5.3.1.5; RFC 2034, 3463): CRLF-terminated lines of at most 512
/// octets, a code from 200 to 599 on each, continuation lines (`-`) with
/// the code of the line that ends the reply, printable text (tab and
/// UTF-8 allowed), and an enhanced status code of the same class as the
/// reply code.
pub fn check_replies(wire: &[u8]) {
    let show = || String::from_utf8_lossy(wire).into_owned();
    assert!(
        wire.is_empty() || wire.ends_with(b"\r\n"),
        "output does not end with CRLF: {:?}",
        show()
    );
    assert!(
        std::str::from_utf8(wire).is_ok(),
        "a reply is not UTF-8: {:?}",
        show()
    );
    let mut open: Option<&[u8]> = None;
    for line in wire.split_inclusive(|&b| b == b'\n') {
        assert!(
            line.len() <= MAX_REPLY_LINE,
            "reply line of {} octets (RFC 5321 4.5.3.1.5 allows 512): {:?}",
            line.len(),
            String::from_utf8_lossy(line)
        );
        let body = line
            .strip_suffix(b"\r\n")
            .unwrap_or_else(|| panic!("reply line without CRLF: {:?}", show()));
        assert!(
            body.len() >= 4,
            "reply line too short: {:?}",
            String::from_utf8_lossy(line)
        );
        let (code, sep, text) = (&body[..3], body[3], &body[4..]);
        assert!(
            matches!(code[0], b'2'..=b'5')
                && matches!(code[1], b'0'..=b'5')
                && code[2].is_ascii_digit(),
            "bad reply code: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            sep == b' ' || sep == b'-',
            "no space or hyphen after the code: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            text.iter().all(|&b| b == b'\t' || b >= 0x20 && b != 0x7f),
            "control character in reply text: {:?}",
            String::from_utf8_lossy(line)
        );
        if let Some(first) = open {
            assert_eq!(
                first,
                code,
                "a multi-line reply changes its code: {:?}",
                show()
            );
        }
        open = (sep == b'-').then_some(code);
        if let Some(class) = enhanced_class(text) {
            assert_eq!(
                class,
                code[0],
                "enhanced status code of another class than the reply: {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
    assert!(
        open.is_none(),
        "a multi-line reply never ends: {:?}",
        show()
    );
}

/// The class digit of an enhanced status code at the start of `text`.
fn enhanced_class(text: &[u8]) -> Option<u8> {
    let word = text.split(|&b| b == b' ').next()?;
    let mut parts = word.split(|&b| b == b'.');
    let class = parts.next()?;
    let ok = class.len() == 1
        && matches!(class[0], b'2' | b'4' | b'5')
        && parts.clone().count() == 2
        && parts.all(|p| (1..=3).contains(&p.len()) && p.iter().all(u8::is_ascii_digit));
    if ok { Some(class[0]) } else { None }
}

/// What a session did with one input, for comparing two runs.
#[derive(Debug, PartialEq)]
struct Transcript {
    wire: Vec<u8>,
    events: Vec<Event>,
    messages: Vec<(String, Vec<String>, Vec<u8>)>,
    closed: bool,
    starttls: bool,
}

impl Transcript {
    /// Closed for content already waiting after a refused DATA (421 4.5.0,
    /// the last event).
    fn early_content(&self) -> bool {
        matches!(
            self.events.last(),
            Some(Event::Rejected { command: "DATA", reply, .. })
                if reply.code == 421 && reply.status == Some(Status(4, 5, 0))
        )
    }
}

fn session_config(flags: u8) -> SessionConfig {
    let tenant = |name: &str, pattern: &str| Tenant {
        name: name.into(),
        sender_domains: vec![DomainPattern::parse(pattern).expect("a valid pattern")],
    };
    SessionConfig {
        hostname: "mx.fuzz.example".into(),
        max_message_size: if flags & 0x40 != 0 { 300 } else { 20_000 },
        max_recipients: 3,
        max_errors: if flags & 0x80 != 0 { 3 } else { 50 },
        max_auth_failures: 2,
        starttls: flags & 0x04 != 0,
        auth: flags & 0x08 != 0,
        policy: Arc::new(Policy {
            allowed_networks: vec![],
            relay_networks: vec![],
            tenants: vec![
                tenant("acme", "acme.example"),
                tenant("bank", "*.bank.example"),
            ],
        }),
        storage_low: Arc::new(AtomicBool::new(flags & 0x20 != 0)),
        check_sender: flags & 0x10 != 0,
    }
}

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    }
}

/// A message handed to the driver: CRLF lines within the limits, no bare
/// CR or LF, within the size, with one to `max_recipients` recipients.
fn check_envelope(e: &Envelope, cfg: &SessionConfig) {
    let c = &e.content;
    assert!(
        c.len() as u64 <= cfg.max_message_size,
        "a message of {} bytes passed the limit of {}",
        c.len(),
        cfg.max_message_size
    );
    assert!(
        c.is_empty() || c.ends_with(b"\r\n"),
        "content does not end with CRLF"
    );
    for line in c.split_inclusive(|&b| b == b'\n') {
        let text = line
            .strip_suffix(b"\r\n")
            .unwrap_or_else(|| panic!("a stored line without CRLF: {line:?}"));
        assert!(!text.contains(&b'\r'), "a stored bare CR: {line:?}");
        assert!(
            line.len() <= MAX_LINE,
            "a stored line of {} bytes",
            line.len()
        );
    }
    assert!(!e.recipients.is_empty(), "a message without recipients");
    assert!(
        e.recipients.len() <= cfg.max_recipients,
        "too many recipients"
    );
    assert!(!e.helo.is_empty(), "a message before EHLO/HELO");
}

/// Runs one session over `stream`, cut into `pieces`, answering the
/// driver's steps from `script`.
fn run_session(flags: u8, script: u8, pieces: &[&[u8]]) -> Transcript {
    let cfg = Arc::new(session_config(flags));
    let peer = Peer {
        ip: "192.0.2.7".parse().expect("an address"),
        port: 40000,
        relay: flags & 0x01 != 0,
    };
    let mut s = Session::new(cfg.clone(), peer, (flags & 0x02 != 0).then(tls_info));
    let mut t = Transcript {
        wire: Vec::new(),
        events: Vec::new(),
        messages: Vec::new(),
        closed: false,
        starttls: false,
    };
    s.greeting();
    t.wire.append(s.output());
    let lines = pieces
        .iter()
        .map(|p| p.iter().filter(|&&b| b == b'\n').count())
        .sum::<usize>();
    // Every step the driver must act on answers a line (a command, a SASL
    // response, the end of DATA, a BDAT command): more steps than lines
    // would mean the machine acts without consuming input.
    let mut steps = 0usize;
    let mut answers = 0u32;
    'feed: for piece in pieces {
        s.feed(piece);
        loop {
            let step = s.advance();
            t.wire.append(s.output());
            t.events.extend(s.take_events());
            let answer = (script >> (2 * (answers % 4))) & 3;
            match step {
                Step::NeedInput => {
                    // Everything that could be done was done: asking again
                    // without input changes nothing.
                    assert!(
                        matches!(s.advance(), Step::NeedInput),
                        "advance() without new input did something"
                    );
                    assert!(
                        s.output().is_empty(),
                        "advance() without new input wrote a reply"
                    );
                    break;
                }
                Step::Close => {
                    t.closed = true;
                    break 'feed;
                }
                _ => {
                    steps += 1;
                    answers += 1;
                    assert!(
                        steps <= lines + 1,
                        "{steps} steps out of {lines} lines of input"
                    );
                }
            }
            match step {
                Step::StartTls => {
                    t.starttls = true;
                    s.tls_established(tls_info());
                }
                Step::Authenticate(req) => {
                    assert!(!req.user.is_empty(), "AUTH with an empty user name");
                    s.auth_result(match answer {
                        0 => AuthOutcome::Success(Identity {
                            user: req.user,
                            tenant: "acme".into(),
                        }),
                        1 => AuthOutcome::Failure {
                            reason: "wrong password",
                        },
                        2 => AuthOutcome::Locked,
                        _ => AuthOutcome::TempFail,
                    });
                }
                Step::CheckSender(sender) => {
                    assert!(!sender.is_empty(), "the null sender went to the SPF check");
                    s.sender_result(if answer == 1 {
                        Err(Reply::new(550, Status(5, 7, 23), "SPF check failed"))
                    } else {
                        Ok(())
                    });
                }
                Step::Message(envelope) => {
                    check_envelope(&envelope, &cfg);
                    t.messages.push((
                        envelope.sender.clone(),
                        envelope.recipients.clone(),
                        envelope.content.clone(),
                    ));
                    s.message_result(if answer == 1 {
                        Err(Reply::new(
                            451,
                            Status(4, 3, 0),
                            "Temporary failure storing the message; please try again later",
                        ))
                    } else {
                        Ok(format!("0FUZZ{:08X}", t.messages.len()))
                    });
                }
                Step::NeedInput | Step::Close => unreachable!(),
            }
        }
    }
    t.wire.append(s.output());
    t.events.extend(s.take_events());
    check_replies(&t.wire);
    for e in &t.events {
        let reply = match e {
            Event::Rejected { reply, .. } | Event::AuthFailed { reply, .. } => reply,
        };
        assert!(reply.code >= 400, "an event for a positive reply: {e:?}");
    }
    if t.closed {
        let last = t
            .wire
            .rsplit(|&b| b == b'\n')
            .nth(1)
            .expect("a reply before closing");
        assert!(
            last.starts_with(b"221 ") || last.starts_with(b"421 "),
            "closed after {:?}",
            String::from_utf8_lossy(last)
        );
    }
    t
}

/// The SMTP session (`mta::smtp::Session`, with the command parser and the
/// content readers inside it), bytes in, replies and events out.
///
/// Input: a settings byte (relay client, implicit TLS, STARTTLS and AUTH on
/// offer, the sender check, storage low, size and error limits), a byte
/// choosing how the input is cut into reads, a byte scripting the
/// driver's answers (AUTH verdicts, SPF verdicts, storage results), then
/// what the client sends.
///
/// Invariants: no panic; every reply is well formed ([`check_replies`]);
/// the machine acts only on input and is done when it asks for more; every
/// message it hands over is clean ([`check_envelope`]); refusals only are
/// logged as refusals; it closes only after 221 or 421; and cutting the
/// input differently changes nothing, unless STARTTLS ran (which by design
/// drops what was pipelined after it) or the session was closed for content
/// already waiting after a refused DATA (RFC 2920 §3.1: what is waiting
/// depends on the cut, by design): then the runs agree up to where the cut
/// one stopped.
pub fn smtp_session(data: &[u8]) {
    let [flags, cut, script, stream @ ..] = data else {
        return;
    };
    let seed = u64::from(*cut) << 8 | u64::from(data.len() as u8);
    let one = run_session(*flags, *script, &pieces(stream, *cut, seed));
    let other = run_session(*flags, *script, &pieces(stream, 0, 0));
    if one.starttls || other.starttls {
        return;
    }
    if one.early_content() || other.early_content() {
        // The run that closed first (everything at once sees all that was
        // pipelined, so it closes at the first refused DATA with content
        // after it): the other agrees with it until then.
        let one_first = one.early_content()
            && (!other.early_content() || one.events.len() <= other.events.len());
        let (first, second) = if one_first {
            (&one, &other)
        } else {
            (&other, &one)
        };
        let agreed = first.events.len() - 1;
        assert!(
            second.events.len() >= agreed && first.events[..agreed] == second.events[..agreed],
            "the same input cut differently ran differently before the early-content close"
        );
        return;
    }
    assert_eq!(one, other, "the same input cut differently ran differently");
}

/// Feeds `pieces` to a [`DataReader`] as the session does (unconsumed bytes
/// stay in its buffer); returns the bytes consumed, whether the end was
/// found, and the outcome then.
fn read_data(max: u64, pieces: &[&[u8]]) -> (usize, Option<Result<Vec<u8>, Reply>>) {
    let mut reader = DataReader::new(max);
    let mut buffer = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        buffer.extend_from_slice(piece);
        let (n, done) = reader.feed(&buffer);
        assert!(n <= buffer.len(), "consumed more than it was given");
        buffer.drain(..n);
        consumed += n;
        if done {
            return (consumed, Some(reader.finish()));
        }
        // What waits for its line's end is bounded by the line limit.
        assert!(
            buffer.len() <= MAX_LINE,
            "{} bytes held back waiting for a line end",
            buffer.len()
        );
    }
    (consumed, None)
}

/// Feeds `pieces` to a [`ChunkReader`] (one BDAT chunk's bytes as they
/// arrive) and finishes it.
fn read_chunks(max: u64, pieces: &[&[u8]]) -> Result<Vec<u8>, Reply> {
    let mut reader = ChunkReader::new(max);
    for piece in pieces {
        reader.feed(piece);
    }
    reader.finish()
}

/// Where DATA content ends, by the rule and nothing else: just after the
/// first CRLF "." CRLF, or after a "." CRLF that is the very first line.
pub fn end_of_data(stream: &[u8]) -> Option<usize> {
    if stream.starts_with(b".\r\n") {
        return Some(3);
    }
    stream
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| i + 5)
}

/// The verdict on DATA content by the rules, computed over the whole
/// content at once: too big (552) before bare CR/LF (554 5.5.2) before a
/// line over 998 characters (554 5.6.0); otherwise the content with the
/// leading dot of each line removed.
fn data_oracle(data: &[u8], max: u64) -> Result<Vec<u8>, (u16, Status)> {
    let mut body = Vec::new();
    let (mut bare, mut long) = (false, false);
    // Dot-stuffing applies at the start of a line after a real CRLF.
    let mut line_start = true;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let text = match line.strip_suffix(b"\r\n") {
            Some(t) => t,
            None => {
                bare = true;
                line
            }
        };
        bare |= text.contains(&b'\r') || text.contains(&b'\n');
        long |= text.len() + 2 > MAX_LINE;
        let unstuffed = match line.strip_prefix(b".") {
            Some(rest) if line_start => rest,
            _ => line,
        };
        body.extend_from_slice(unstuffed);
        line_start = line.ends_with(b"\r\n");
    }
    if body.len() as u64 > max {
        Err((552, Status(5, 3, 4)))
    } else if bare {
        Err((554, Status(5, 5, 2)))
    } else if long {
        Err((554, Status(5, 6, 0)))
    } else {
        Ok(body)
    }
}

fn verdict(r: &Result<Vec<u8>, Reply>) -> Result<&[u8], (u16, Option<Status>)> {
    match r {
        Ok(body) => Ok(body),
        Err(reply) => Err((reply.code, reply.status)),
    }
}

/// The content readers (`mta::smtp::body`): DATA's end-of-data detection
/// and dot-unstuffing, and BDAT's checks.
///
/// Input: a byte choosing how the input is cut into reads (and the size
/// limit), then the bytes after DATA's 354.
///
/// Invariants: the data ends exactly where [`end_of_data`] says, at a real
/// CRLF "." CRLF and never at a bare LF or CR variant (SMTP smuggling);
/// what is still waiting for its line end stays within the line limit; the
/// verdict and content are those of [`data_oracle`], however the input is
/// cut; dot-stuffing content (as delivery does) and reading it back gives
/// the content again; and BDAT, given the same content in any chunks,
/// reaches the same verdict as DATA.
pub fn data_reader(data: &[u8]) {
    let [cut, stream @ ..] = data else {
        return;
    };
    let max = if cut & 0x80 != 0 { 200 } else { 1 << 20 };
    let seed = u64::from(*cut) << 8 | u64::from(data.len() as u8);
    let cuts = pieces(stream, *cut, seed);

    // 1. The stream as a client sent it.
    let (consumed, outcome) = read_data(max, &cuts);
    let (whole_consumed, whole_outcome) = read_data(max, &[stream]);
    // Unfinished, the two may differ in what they hold back of the last line.
    assert_eq!(
        (outcome.is_some().then_some(consumed), &outcome),
        (
            whole_outcome.is_some().then_some(whole_consumed),
            &whole_outcome
        ),
        "the same DATA cut differently read differently"
    );
    match end_of_data(stream) {
        Some(end) => {
            assert_eq!(consumed, end, "DATA ended elsewhere than at CRLF.CRLF");
            let outcome = outcome.expect("the end of data was not found");
            let expected = data_oracle(&stream[..end - 3], max);
            match (&expected, verdict(&outcome)) {
                (Ok(body), Ok(read)) => assert_eq!(body.as_slice(), read),
                (Err((code, status)), Err((c, s))) => {
                    assert_eq!((*code, Some(*status)), (c, s), "another refusal");
                }
                (e, r) => panic!("expected {e:?}, read {r:?}"),
            }
        }
        None => assert!(outcome.is_none(), "DATA ended without CRLF.CRLF"),
    }

    // 2. The stream as content: dot-stuffed as delivery sends it, it reads
    //    back as itself; sent by BDAT instead, the verdict is the same.
    let mut content = stream.to_vec();
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        content.extend_from_slice(b"\r\n");
    }
    let stuffed = mta::delivery::client::dot_stuff(&content);
    let (n, by_data) = read_data(max, &pieces(&stuffed, *cut, seed));
    assert_eq!(n, stuffed.len(), "dot-stuffed content ended early");
    let by_data = by_data.expect("dot-stuffed content did not end");
    if let Ok(body) = &by_data {
        assert_eq!(
            body, &content,
            "dot-stuffing and reading back changed the content"
        );
    }
    // BDAT gets the content as it came: it adds a missing final CRLF itself.
    let by_bdat = read_chunks(max, &pieces(stream, *cut >> 2, seed ^ 0xB0A7));
    assert_eq!(
        verdict(&by_data),
        verdict(&by_bdat),
        "DATA and BDAT disagree on the same content"
    );
}

/// The configuration parser (`mta::config::Config::parse`): strict TOML.
///
/// Input: the text of a config file (not UTF-8: nothing to parse).
///
/// Invariants: no panic; an error either names its place (a line and
/// column inside the text) or, for checks across keys, its section; and
/// parsing is deterministic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.toml");
    let first = Config::parse(text, file);
    match &first {
        Ok(c) => {
            // What the daemon derives from a config must not panic either.
            let _ = c.hostname();
            let _ = c.dkim_key_specs();
            let _ = Policy::from_config(c);
        }
        Err(e) => {
            assert!(!e.message.is_empty(), "an error without a message");
            match e.at {
                Some((line, col)) => {
                    let lines = text.split('\n').count();
                    assert!(
                        line >= 1 && line <= lines,
                        "error at line {line} of {lines}: {e}"
                    );
                    let width = text.split('\n').nth(line - 1).map_or(0, str::len);
                    assert!(col >= 1 && col <= width + 1, "error at column {col}: {e}");
                }
                None => assert!(
                    e.message.starts_with('[') || e.message.contains(" ["),
                    "an error with neither a place nor a section: {e}"
                ),
            }
            let _ = e.to_string();
        }
    }
    let again = Config::parse(text, file);
    assert_eq!(
        first.as_ref().err(),
        again.as_ref().err(),
        "parsing the same text twice gave different errors"
    );
}
