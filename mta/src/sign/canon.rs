//! Relaxed canonicalization (RFC 6376 §3.4.2 and §3.4.4).
//!
//! The body is hashed as it is canonicalized: runs of lines that relaxed
//! canonicalization leaves unchanged (no tab, no double space, no trailing
//! space — most lines of real mail) go to SHA-256 as one slice, so a 10 KB
//! body costs a handful of hash updates, not one per byte.

use aws_lc_rs::digest::{Context, SHA256};

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Appends `name:value\r\n` in relaxed form: the name lower-cased and
/// trimmed, the value unfolded, runs of white space reduced to one space,
/// white space at its start and end removed.
pub fn relaxed_header(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let name = name.trim_ascii();
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.push(b':');
    relaxed_value(value, out);
    out.extend_from_slice(b"\r\n");
}

/// The value part of [`relaxed_header`], without the CRLF.
pub fn relaxed_value(value: &[u8], out: &mut Vec<u8>) {
    let mut started = false;
    let mut space = false;
    for &b in value {
        match b {
            b'\r' | b'\n' => {} // unfolding: the WSP after the CRLF remains
            b if is_wsp(b) => space = started,
            b => {
                if space {
                    out.push(b' ');
                    space = false;
                }
                out.push(b);
                started = true;
            }
        }
    }
}

/// Relaxed form of one body line (without CRLF): the definition the fast
/// canonicalizer is tested against.
#[cfg(test)]
fn relaxed_line(line: &[u8], out: &mut Vec<u8>) {
    let mut space = false;
    for &b in line {
        if is_wsp(b) {
            space = true;
        } else {
            if space {
                out.push(b' ');
                space = false;
            }
            out.push(b);
        }
    }
}

const LO7: u64 = 0x7F7F_7F7F_7F7F_7F7F;

/// High bit set in each byte of `x` that equals `b` (exact, no false hits).
#[inline]
fn eq_bytes(x: u64, b: u8) -> u64 {
    let y = x ^ (0x0101_0101_0101_0101 * b as u64);
    !(((y & LO7).wrapping_add(LO7)) | y | LO7)
}

/// The first position from `i` that starts a white space run relaxed
/// canonicalization changes: a tab, or a space followed by a space, a tab
/// or a CR.
fn next_change(b: &[u8], i: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let i = match sse2::next_change(b, i) {
        Ok(found) => return Some(found),
        Err(resume) => resume,
    };
    next_change_swar(b, i)
}

/// Eight bytes at a time, for any architecture.
fn next_change_swar(b: &[u8], mut i: usize) -> Option<usize> {
    while i + 9 <= b.len() {
        let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let next = u64::from_le_bytes(b[i + 1..i + 9].try_into().expect("8 bytes"));
        let hit = eq_bytes(w, b'\t')
            | (eq_bytes(w, b' ')
                & (eq_bytes(next, b' ') | eq_bytes(next, b'\t') | eq_bytes(next, b'\r')));
        if hit != 0 {
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'\t', _) | (b' ', Some(b' ' | b'\t' | b'\r')) => return Some(i),
            _ => i += 1,
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };

    /// Sixteen bytes at a time (SSE2 is part of every x86_64 CPU). `Err`
    /// gives the position where the scalar scan must go on (the last 16
    /// bytes, which cannot be loaded with their next byte).
    pub(super) fn next_change(b: &[u8], mut i: usize) -> Result<usize, usize> {
        // SAFETY: SSE2 is always present on x86_64; every load reads
        // b[i..i + 16] or b[i + 1..i + 17], within bounds by the loop
        // condition i + 17 <= b.len().
        unsafe {
            let sp = _mm_set1_epi8(b' ' as i8);
            let tab = _mm_set1_epi8(b'\t' as i8);
            let cr = _mm_set1_epi8(b'\r' as i8);
            while i + 17 <= b.len() {
                let w = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
                let n = _mm_loadu_si128(b.as_ptr().add(i + 1) as *const __m128i);
                let next_ws = _mm_or_si128(
                    _mm_or_si128(_mm_cmpeq_epi8(n, sp), _mm_cmpeq_epi8(n, tab)),
                    _mm_cmpeq_epi8(n, cr),
                );
                let hit = _mm_or_si128(
                    _mm_cmpeq_epi8(w, tab),
                    _mm_and_si128(_mm_cmpeq_epi8(w, sp), next_ws),
                );
                let mask = _mm_movemask_epi8(hit) as u32;
                if mask != 0 {
                    return Ok(i + mask.trailing_zeros() as usize);
                }
                i += 16;
            }
        }
        Err(i)
    }
}

/// The canonical body on its way to the hash: short pieces are gathered in
/// a small buffer that stays in cache (one hash update per piece would cost
/// more than the copy), long ones are hashed where they lie.
struct Staged<'a> {
    ctx: &'a mut Context,
    buf: Vec<u8>,
}

impl<'a> Staged<'a> {
    const CAPACITY: usize = 4096;
    /// Pieces at least this long are not copied.
    const DIRECT: usize = 512;

    fn new(ctx: &'a mut Context) -> Self {
        Staged {
            ctx,
            buf: Vec::with_capacity(Self::CAPACITY),
        }
    }

    fn extend(&mut self, piece: &[u8]) {
        if piece.len() >= Self::DIRECT {
            self.flush();
            self.ctx.update(piece);
            return;
        }
        if self.buf.len() + piece.len() > Self::CAPACITY {
            self.flush();
        }
        self.buf.extend_from_slice(piece);
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.ctx.update(&self.buf);
            self.buf.clear();
        }
    }

    fn finish(mut self) {
        self.flush();
    }
}

/// SHA-256 of the relaxed canonical body: white space runs reduced to one
/// space, white space at line ends removed, empty lines at the end removed,
/// and a final CRLF when the body is not empty. Only CRLF ends a line.
pub fn relaxed_body_hash(body: &[u8]) -> [u8; 32] {
    // Empty lines (and lines of only white space) at the end go first,
    // CRLF by CRLF, so that a bare CR of the content stays.
    let mut end = body.len();
    loop {
        if body[..end].ends_with(b"\r\n") {
            end -= 2;
        } else if end > 0 && is_wsp(body[end - 1]) {
            end -= 1;
        } else {
            break;
        }
    }
    let body = &body[..end];
    let mut ctx = Context::new(&SHA256);
    if body.is_empty() {
        return ctx
            .finish()
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
    }
    match next_change(body, 0) {
        // Nothing to change: the common case for plain text.
        None => ctx.update(body),
        Some(first) => {
            let mut out = Staged::new(&mut ctx);
            let mut copied = 0;
            let mut at = Some(first);
            while let Some(run) = at {
                out.extend(&body[copied..run]);
                let mut after = run;
                while after < body.len() && is_wsp(body[after]) {
                    after += 1;
                }
                // White space before a CRLF goes; any other run becomes one space.
                if !body[after..].starts_with(b"\r\n") {
                    out.extend(b" ");
                }
                copied = after;
                at = next_change(body, after);
            }
            out.extend(&body[copied..]);
            out.finish();
        }
    }
    ctx.update(b"\r\n");
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&SHA256, data);
        d.as_ref().try_into().unwrap()
    }

    /// The example of RFC 6376 §3.4.5.
    #[test]
    fn rfc6376_section_3_4_5_example() {
        let mut h = Vec::new();
        relaxed_header(b"A", b" X", &mut h);
        relaxed_header(b"B ", b" Y\t\r\n\tZ  ", &mut h);
        assert_eq!(h, b"a:X\r\nb:Y Z\r\n");
        let body = b" C \r\nD \t E\r\n\r\n\r\n";
        assert_eq!(relaxed_body_hash(body), sha(b" C\r\nD E\r\n"));
    }

    #[test]
    fn the_wide_and_narrow_scans_agree() {
        let mut body = Vec::new();
        for i in 0..400u32 {
            body.extend_from_slice(match i % 7 {
                0 => b"word ".as_slice(),
                1 => b"  ",
                2 => b"x\t",
                3 => b" \r\n",
                4 => b"abcdefghijklmnopq ",
                5 => b"\r\n",
                _ => b"z",
            });
        }
        for start in 0..body.len() {
            assert_eq!(
                next_change(&body, start),
                next_change_swar(&body, start),
                "from {start}"
            );
        }
    }

    #[test]
    fn body_rules() {
        // Empty body: the empty string (relaxed).
        assert_eq!(relaxed_body_hash(b""), sha(b""));
        assert_eq!(relaxed_body_hash(b"\r\n\r\n"), sha(b""));
        // A final CRLF is added.
        assert_eq!(relaxed_body_hash(b"abc"), sha(b"abc\r\n"));
        // Lines of only white space count as empty, also at the end.
        assert_eq!(
            relaxed_body_hash(b"a\r\n \t \r\nb\r\n  \r\n"),
            sha(b"a\r\n\r\nb\r\n")
        );
        // Empty lines in the middle stay.
        assert_eq!(
            relaxed_body_hash(b"a\r\n\r\n\r\nb\r\n"),
            sha(b"a\r\n\r\n\r\nb\r\n")
        );
        // Runs of unchanged lines and changed lines interleave correctly.
        let body = b"one\r\ntwo  spaces\r\nthree\r\nfour\t\r\nfive\r\n";
        assert_eq!(
            relaxed_body_hash(body),
            sha(b"one\r\ntwo spaces\r\nthree\r\nfour\r\nfive\r\n")
        );
    }

    #[test]
    fn the_fast_path_agrees_with_a_straightforward_implementation() {
        use memchr::memmem;
        fn reference(body: &[u8]) -> Vec<u8> {
            let text = body;
            let mut lines: Vec<Vec<u8>> = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                let (line, next) = match memmem::find(rest, b"\r\n") {
                    Some(i) => (&rest[..i], &rest[i + 2..]),
                    None => (rest, &rest[rest.len()..]),
                };
                let mut l = Vec::new();
                relaxed_line(line, &mut l);
                lines.push(l);
                rest = next;
            }
            while lines.last().is_some_and(|l| l.is_empty()) {
                lines.pop();
            }
            let mut out = Vec::new();
            for l in lines {
                out.extend_from_slice(&l);
                out.extend_from_slice(b"\r\n");
            }
            out
        }
        let pieces: [&[u8]; 9] = [
            b"word",
            b" ",
            b"  ",
            b"\t",
            b"\r\n",
            b"x y",
            b"",
            b"\r\n\r\n",
            b"\r",
        ];
        // Every combination of up to five pieces.
        let mut stack = vec![Vec::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for s in &stack {
                for p in pieces {
                    let mut v: Vec<u8> = s.clone();
                    v.extend_from_slice(p);
                    next.push(v);
                }
            }
            for body in &next {
                assert_eq!(
                    relaxed_body_hash(body),
                    sha(&reference(body)),
                    "{:?}",
                    String::from_utf8_lossy(body)
                );
            }
            stack = next;
        }
        // Long bodies: pieces gathered past the staging buffer, and runs
        // long enough to be hashed where they lie, between changes.
        let long = vec![b'a'; Staged::DIRECT];
        let grow: [&[u8]; 6] = [
            b"  <p>text</p>",
            b"\r\n",
            b"\t",
            &long,
            b"x  \r\n",
            b"word ",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..40 {
            let mut body = Vec::new();
            while body.len() < 3 * Staged::CAPACITY {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.extend_from_slice(grow[(seed % grow.len() as u64) as usize]);
            }
            assert_eq!(relaxed_body_hash(&body), sha(&reference(&body)));
        }
    }
}
