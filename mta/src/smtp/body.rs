//! Reading message content: DATA (RFC 5321 §4.1.4, §4.5.2) and BDAT chunks
//! (RFC 3030).
//!
//! DATA ends only at `CRLF . CRLF`. A bare LF or bare CR anywhere is recorded
//! and fails the transaction, but never ends the data: this is what defeats
//! SMTP smuggling (`\n.\n`, `\r.\r`, `\r\n.\r`, `\n.\r\n`, …), where a server
//! that ends DATA on a lone LF lets a second message hide inside the first.
//! Content with bare CR/LF is refused for BDAT too, so that nothing we store
//! can be misread by a receiver further on.

use memchr::memchr;

use super::reply::{Reply, Status, replies};

/// RFC 5322 §2.1.1: 998 characters plus CRLF.
pub const MAX_LINE: usize = 1000;

/// What was wrong with the content, if anything.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub bare_lf: bool,
    pub bare_cr: bool,
    pub long_line: bool,
    pub too_big: bool,
}

impl Faults {
    fn any(&self) -> bool {
        self.bare_lf || self.bare_cr || self.long_line || self.too_big
    }

    /// The reply for the end of the data: `Ok` when the content is clean.
    pub fn verdict(&self, max_size: u64) -> Result<(), Reply> {
        if self.too_big {
            return Err(replies::message_too_big(max_size));
        }
        if self.bare_lf || self.bare_cr {
            return Err(Reply::new(
                554,
                Status(5, 5, 2),
                format!(
                    "Message refused: it contains a bare {} (RFC 5321 2.3.8); every line must end with CRLF",
                    if self.bare_lf { "LF" } else { "CR" }
                ),
            ));
        }
        if self.long_line {
            return Err(Reply::new(
                554,
                Status(5, 6, 0),
                "Message refused: a line is longer than 998 characters (RFC 5322 2.1.1); use a content transfer encoding",
            ));
        }
        Ok(())
    }
}

/// Accumulates DATA content until the terminating `CRLF . CRLF`.
#[derive(Debug)]
pub struct DataReader {
    body: Vec<u8>,
    max_size: u64,
    /// Content bytes seen, stored or not: the size verdict must not depend
    /// on whether another fault came first, nor on how the input was cut.
    size: u64,
    /// At the start of a line (after a real CRLF).
    line_start: bool,
    /// Bytes of the current line so far (across bare LFs).
    line_len: usize,
    faults: Faults,
}

impl DataReader {
    pub fn new(max_size: u64) -> Self {
        Self::with_expected(max_size, None)
    }

    /// With the client's `SIZE=` estimate (RFC 1870), the body is allocated
    /// once at that size rather than grown (each growth a copy), up to
    /// [`DataReader::MAX_PREALLOCATION`]: an estimate is only a claim.
    pub fn with_expected(max_size: u64, expected: Option<u64>) -> Self {
        let capacity = expected.unwrap_or(0).clamp(
            16 * 1024,
            Self::MAX_PREALLOCATION.min(max_size.max(16 * 1024)),
        );
        DataReader {
            body: Vec::with_capacity(capacity as usize),
            max_size,
            size: 0,
            line_start: true,
            line_len: 0,
            faults: Faults::default(),
        }
    }

    /// The most allocated up front on a client's word.
    pub const MAX_PREALLOCATION: u64 = 1024 * 1024;

    /// Consumes what it can of `input`. Returns the bytes consumed and
    /// whether the terminator was reached (then the bytes after it are not
    /// consumed: they are the next command, pipelined).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut pos = 0;
        while pos < input.len() {
            // Most content is whole, clean lines: those go in one piece,
            // the rest (a dot, a fault, a line not yet complete) line by
            // line below.
            if self.line_start && self.line_len == 0 && !self.faults.any() {
                let run = clean_lines(&input[pos..]);
                if run > 0 {
                    self.store(&input[pos..pos + run]);
                    pos += run;
                    continue;
                }
            }
            match memchr(b'\n', &input[pos..]) {
                Some(i) => {
                    let seg = &input[pos..pos + i + 1];
                    pos += i + 1;
                    if self.line_start && seg == b".\r\n" {
                        return (pos, true);
                    }
                    self.segment(seg, true);
                }
                None => {
                    let rest = &input[pos..];
                    if rest.len() <= MAX_LINE {
                        break; // wait for the rest of the line
                    }
                    // A long partial line: take it, but leave a final CR,
                    // which may start the CRLF that ends the line. With its
                    // end still to come, the line is already too long.
                    let take = if rest.ends_with(b"\r") {
                        rest.len() - 1
                    } else {
                        rest.len()
                    };
                    self.faults.long_line = true;
                    self.segment(&rest[..take], false);
                    pos += take;
                }
            }
        }
        (pos, false)
    }

    fn segment(&mut self, seg: &[u8], ends_with_lf: bool) {
        let crlf = ends_with_lf && seg.len() >= 2 && seg[seg.len() - 2] == b'\r';
        if ends_with_lf && !crlf {
            self.faults.bare_lf = true;
        }
        let cr_limit = if crlf { seg.len() - 2 } else { seg.len() };
        if memchr(b'\r', &seg[..cr_limit]).is_some() {
            self.faults.bare_cr = true;
        }
        // Dot-stuffing (RFC 5321 §4.5.2) applies at the start of a real line.
        let content = if self.line_start && seg.first() == Some(&b'.') {
            &seg[1..]
        } else {
            seg
        };
        self.line_len += seg.len();
        if self.line_len > MAX_LINE {
            self.faults.long_line = true;
        }
        if crlf {
            self.line_start = true;
            self.line_len = 0;
        } else {
            self.line_start = false;
        }
        self.store(content);
    }

    fn store(&mut self, content: &[u8]) {
        self.size += content.len() as u64;
        if self.size > self.max_size {
            self.faults.too_big = true;
        }
        if self.faults.any() {
            // Refused anyway: keep no more than we must.
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(content);
    }

    /// The content, or the reply that refuses it.
    pub fn finish(self) -> Result<Vec<u8>, Reply> {
        self.faults.verdict(self.max_size)?;
        Ok(self.body)
    }
}

/// The length of the longest prefix of `input` made of complete lines that
/// need nothing done: each ends in CRLF, has no other CR or LF, is at most
/// [`MAX_LINE`] long and does not start with a dot (a dot is stuffing or
/// the terminator). Called at the start of a line.
fn clean_lines(input: &[u8]) -> usize {
    let mut line = 0; // where the current line starts
    let mut lf_after_cr = usize::MAX; // the LF already seen with its CR
    for i in memchr::memchr2_iter(b'\r', b'\n', input) {
        if i == lf_after_cr {
            continue;
        }
        if input[i] == b'\n' || input.get(i + 1) != Some(&b'\n') {
            break; // a bare LF or CR, or a CR whose LF is still to come
        }
        let end = i + 2;
        if end - line > MAX_LINE || input[line] == b'.' {
            break;
        }
        lf_after_cr = i + 1;
        line = end;
    }
    line
}

/// Accumulates BDAT chunks. Chunks are length-framed, so there is no
/// terminator to find; the content is still checked for bare CR/LF and long
/// lines, across chunk boundaries.
#[derive(Debug)]
pub struct ChunkReader {
    body: Vec<u8>,
    max_size: u64,
    /// Content bytes seen, stored or not (as `DataReader::size`).
    size: u64,
    /// The last byte seen was a CR, whose LF may come in the next chunk.
    pending_cr: bool,
    line_len: usize,
    faults: Faults,
}

impl ChunkReader {
    pub fn new(max_size: u64) -> Self {
        ChunkReader {
            body: Vec::new(),
            max_size,
            size: 0,
            pending_cr: false,
            line_len: 0,
            faults: Faults::default(),
        }
    }

    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Checks and stores one piece of a chunk. `line_len` counts the bytes
    /// of the current line with its CR, so a line is too long when the LF
    /// that ends it would take it past `MAX_LINE`, as for DATA.
    pub fn feed(&mut self, data: &[u8]) {
        let mut pos = 0;
        while pos < data.len() {
            let b = data[pos];
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    self.line_len = 0;
                    pos += 1;
                    continue;
                }
                self.faults.bare_cr = true;
            }
            match memchr::memchr2(b'\r', b'\n', &data[pos..]) {
                Some(i) => {
                    self.line_len += i + 1;
                    // The LF after a CR makes the line one byte longer.
                    if self.line_len + usize::from(data[pos + i] == b'\r') > MAX_LINE {
                        self.faults.long_line = true;
                    }
                    if data[pos + i] == b'\r' {
                        self.pending_cr = true;
                    } else {
                        self.faults.bare_lf = true;
                    }
                    pos += i + 1;
                }
                None => {
                    self.line_len += data.len() - pos;
                    if self.line_len > MAX_LINE {
                        self.faults.long_line = true;
                    }
                    pos = data.len();
                }
            }
        }
        self.size += data.len() as u64;
        if self.size > self.max_size {
            self.faults.too_big = true;
        }
        if self.faults.any() {
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(data);
    }

    /// After the LAST chunk: the content (ending in CRLF), or the refusal.
    pub fn finish(mut self) -> Result<Vec<u8>, Reply> {
        if self.pending_cr {
            self.faults.bare_cr = true;
        }
        // DKIM's canonicalizations both treat a missing final CRLF as
        // present, and relaying by DATA needs it: adding it changes nothing.
        // It ends the last line and is stored, so it counts toward the line
        // and the size limits, as in DATA.
        let unterminated = self.line_len > 0;
        if unterminated {
            self.size += 2;
            if self.size > self.max_size {
                self.faults.too_big = true;
            }
            if self.line_len + 2 > MAX_LINE {
                self.faults.long_line = true;
            }
        }
        self.faults.verdict(self.max_size)?;
        if unterminated {
            self.body.extend_from_slice(b"\r\n");
        }
        Ok(self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_allocated_at_the_clients_size_estimate_within_bounds() {
        assert!(
            DataReader::with_expected(1 << 30, Some(300_000))
                .body
                .capacity()
                >= 300_000
        );
        let claimed = DataReader::with_expected(1 << 30, Some(10 << 30));
        assert_eq!(
            claimed.body.capacity() as u64,
            DataReader::MAX_PREALLOCATION
        );
        // Never more than the largest message accepted.
        assert!(
            DataReader::with_expected(20_000, Some(500_000))
                .body
                .capacity()
                < 30_000
        );
    }

    /// Feeds `input` in pieces of `step` bytes, as a socket might deliver it.
    fn read_data(input: &[u8], step: usize) -> (Result<Vec<u8>, Reply>, usize) {
        let mut r = DataReader::new(1 << 20);
        let mut buf = Vec::new();
        let mut consumed_total = 0;
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            let (n, done) = r.feed(&buf);
            buf.drain(..n);
            consumed_total += n;
            if done {
                return (r.finish(), consumed_total);
            }
        }
        panic!("no end of data in {:?}", String::from_utf8_lossy(input));
    }

    #[test]
    fn plain_data_and_dot_unstuffing() {
        for step in [1, 2, 3, 7, 1000] {
            let (body, n) = read_data(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n", step);
            assert_eq!(body.unwrap(), b"Subject: x\r\n\r\n.leading dot\r\n");
            assert_eq!(n, 32, "the pipelined QUIT is left for the command parser");
        }
    }

    #[test]
    fn empty_message() {
        let (body, _) = read_data(b".\r\n", 1);
        assert_eq!(body.unwrap(), b"");
    }

    /// The published smuggling variants: none of them ends the data, and
    /// each fails the transaction when the real terminator comes.
    #[test]
    fn smuggling_variants_do_not_end_data_and_are_refused() {
        let variants: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r\n.\r",
            b"\r.\r\n",
            b"\r\n.\n",
            b"\r\n\x00.\r\n",
        ];
        for v in variants {
            let mut input = b"Subject: a\r\n\r\nfirst".to_vec();
            input.extend_from_slice(v);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            for step in [1, 5, 4096] {
                let (body, n) = read_data(&input, step);
                assert_eq!(n, input.len(), "variant {v:?} ended data early");
                if !v.contains(&0) {
                    let reply = body.expect_err("smuggling accepted");
                    assert_eq!(reply.code, 554, "{v:?}");
                    assert_eq!(reply.status, Some(Status(5, 5, 2)));
                }
            }
        }
    }

    #[test]
    fn crlf_split_across_reads_is_not_a_bare_cr() {
        let (body, _) = read_data(b"line one\r\nline two\r\n.\r\n", 9);
        assert_eq!(body.unwrap(), b"line one\r\nline two\r\n");
    }

    #[test]
    fn long_lines_are_refused_even_when_they_arrive_in_pieces() {
        let mut input = vec![b'a'; 5000];
        input.extend_from_slice(b"\r\n.\r\n");
        for step in [100, 4096, 10000] {
            let (body, n) = read_data(&input, step);
            assert_eq!(n, input.len());
            let e = body.unwrap_err();
            assert_eq!((e.code, e.status), (554, Some(Status(5, 6, 0))));
        }
        // 998 characters plus CRLF is the limit, and allowed.
        let mut ok = vec![b'a'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(read_data(&ok, 64).0.is_ok());
        let mut over = vec![b'a'; 999];
        over.extend_from_slice(b"\r\n.\r\n");
        assert!(read_data(&over, 64).0.is_err());
    }

    #[test]
    fn oversize_is_552_and_the_data_is_still_consumed() {
        let mut r = DataReader::new(10);
        let input = b"0123456789\r\nmore\r\n.\r\nNOOP\r\n";
        let (n, done) = r.feed(input);
        assert!(done);
        assert_eq!(&input[n..], b"NOOP\r\n");
        let e = r.finish().unwrap_err();
        assert_eq!((e.code, e.status), (552, Some(Status(5, 3, 4))));
    }

    /// Found by fuzzing (data_reader): the size was only counted while the
    /// content was clean, so which refusal a client got (552 or 554)
    /// depended on which fault came first and on how TCP cut the input: a
    /// line of 1000 characters arriving without its CRLF was stored as a
    /// partial line and overflowed a small limit (552), the same line in one
    /// read was too long (554 5.6.0).
    #[test]
    fn the_refusal_does_not_depend_on_how_the_input_is_cut() {
        let mut input = vec![b'a'; 1000];
        input.extend_from_slice(b"\r\n.\r\n");
        let mut replies = Vec::new();
        for step in [1001, 2000] {
            let mut r = DataReader::new(500);
            let mut buf = Vec::new();
            for piece in input.chunks(step) {
                buf.extend_from_slice(piece);
                let (n, _) = r.feed(&buf);
                buf.drain(..n);
            }
            let e = r.finish().unwrap_err();
            replies.push((e.code, e.status));
        }
        // Too big before too long: the size counts all the content.
        assert_eq!(replies, [(552, Some(Status(5, 3, 4))); 2]);
        let mut late = vec![b'b'; 1200];
        late.extend_from_slice(b"\r\n");
        late.extend_from_slice(&[b'c'; 600]);
        late.extend_from_slice(b"\r\n.\r\n");
        let mut r = DataReader::new(1000);
        assert!(r.feed(&late).1);
        assert_eq!(r.finish().unwrap_err().code, 552);
    }

    fn read_chunks(chunks: &[&[u8]]) -> Result<Vec<u8>, Reply> {
        let mut r = ChunkReader::new(1 << 20);
        for c in chunks {
            r.feed(c);
        }
        r.finish()
    }

    #[test]
    fn chunks_join_and_crlf_may_straddle_them() {
        assert_eq!(
            read_chunks(&[b"Subject: x\r", b"\n\r\nbody\r\n"]).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        // A missing final CRLF is added.
        assert_eq!(read_chunks(&[b"a\r\nb"]).unwrap(), b"a\r\nb\r\n");
        assert_eq!(read_chunks(&[]).unwrap(), b"");
    }

    #[test]
    fn chunks_with_bare_cr_or_lf_are_refused() {
        assert_eq!(read_chunks(&[b"a\nb\r\n"]).unwrap_err().code, 554);
        assert_eq!(read_chunks(&[b"a\rb\r\n"]).unwrap_err().code, 554);
        assert_eq!(read_chunks(&[b"a\r", b"b\r\n"]).unwrap_err().code, 554);
        assert_eq!(read_chunks(&[b"a\r"]).unwrap_err().code, 554);
        assert_eq!(read_chunks(&[b"\r\n.\n"]).unwrap_err().code, 554);
    }

    /// Found by fuzzing (data_reader, DATA against BDAT): BDAT counted a
    /// line's CR but not its LF, so it took a line of 999 characters that
    /// DATA refuses, and a last line of 999 characters without its CRLF.
    #[test]
    fn bdat_lines_have_the_limit_of_data_lines() {
        let line = |n: usize, end: &[u8]| [vec![b'x'; n], end.to_vec()].concat();
        assert!(read_chunks(&[&line(998, b"\r\n")]).is_ok());
        for refused in [line(999, b"\r\n"), line(999, b"")] {
            let e = read_chunks(&[&refused[..500], &refused[500..]]).unwrap_err();
            assert_eq!((e.code, e.status), (554, Some(Status(5, 6, 0))));
        }
        assert!(read_chunks(&[&line(998, b"")]).is_ok());
    }

    /// Found by fuzzing (smtp_session): the CRLF that BDAT adds to a last
    /// line without one was not counted, so a message of up to two bytes
    /// over `max_message_size` was accepted.
    #[test]
    fn the_crlf_bdat_adds_counts_toward_the_size() {
        let mut r = ChunkReader::new(10);
        r.feed(b"123456789");
        assert_eq!(r.finish().unwrap_err().code, 552);
        let mut r = ChunkReader::new(10);
        r.feed(b"12345678");
        assert_eq!(r.finish().unwrap(), b"12345678\r\n");
    }

    #[test]
    fn chunk_limits() {
        let mut r = ChunkReader::new(8);
        r.feed(b"12345\r\n");
        r.feed(b"67\r\n");
        assert!(r.faults().too_big);
        assert_eq!(r.finish().unwrap_err().code, 552);
        let long = vec![b'x'; 1200];
        assert_eq!(
            read_chunks(&[&long[..600], &long[600..]]).unwrap_err().code,
            554
        );
    }
}
