//! Queue identifiers: unique, time-ordered, short enough to read out on the phone.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Crockford's base32 alphabet: no I, L, O or U, so an ID read aloud or typed
/// from a log survives.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The identifier of one queued message.
///
/// The upper 48 bits are milliseconds since the Unix epoch and the lower 16 a
/// counter, so IDs sort by reception time, both as numbers and in the store's
/// big-endian keys. Displayed as 13 characters of Crockford base32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(u64);

impl QueueId {
    pub const fn from_u64(raw: u64) -> Self {
        QueueId(raw)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch at which this ID was made.
    pub const fn millis(self) -> u64 {
        self.0 >> 16
    }

    pub(crate) fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 13];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(v & 31) as usize];
            v >>= 5;
        }
        // 13 * 5 = 65 bits: the top character holds the top four bits (0-F).
        f.write_str(std::str::from_utf8(&out).expect("alphabet is ASCII"))
    }
}

/// The text was not a queue ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a queue ID: expected 13 characters of 0-9 and A-Z (as printed by `mta queue list`)"
)]
pub struct ParseQueueIdError(pub String);

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseQueueIdError(s.to_string());
        if s.len() != 13 {
            return Err(err());
        }
        let mut v: u64 = 0;
        for (i, c) in s.bytes().enumerate() {
            let c = c.to_ascii_uppercase();
            // Crockford's decoding folds the look-alikes onto digits.
            let c = match c {
                b'O' => b'0',
                b'I' | b'L' => b'1',
                other => other,
            };
            let digit = ALPHABET.iter().position(|&a| a == c).ok_or_else(err)? as u64;
            if i == 0 && digit > 15 {
                return Err(err());
            }
            v = (v << 5) | digit;
        }
        Ok(QueueId(v))
    }
}

/// Hands out strictly increasing IDs.
///
/// The time comes from the caller (the clock is injected), so tests get the
/// same IDs every run. If the clock stands still or steps back, the counter
/// keeps the IDs increasing.
#[derive(Debug)]
pub(crate) struct IdGenerator {
    last: AtomicU64,
}

impl IdGenerator {
    pub(crate) fn starting_after(last: u64) -> Self {
        IdGenerator {
            last: AtomicU64::new(last),
        }
    }

    pub(crate) fn next(&self, now_ms: u64) -> QueueId {
        let candidate = (now_ms & ((1 << 48) - 1)) << 16;
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = candidate.max(prev + 1);
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return QueueId(next),
                Err(actual) => prev = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for raw in [0, 1, 31, 32, u64::MAX, 0x0193_5A4B_C000_0007] {
            let id = QueueId(raw);
            let text = id.to_string();
            assert_eq!(text.len(), 13);
            assert_eq!(text.parse::<QueueId>().unwrap(), id, "{text}");
        }
    }

    #[test]
    fn parse_folds_lookalikes_and_case() {
        let id = QueueId(0x0193_5A4B_C000_0001);
        let text = id.to_string().to_lowercase();
        assert_eq!(text.parse::<QueueId>().unwrap(), id);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!("short".parse::<QueueId>().is_err());
        assert!("UUUUUUUUUUUUU".parse::<QueueId>().is_err());
        // A first digit above F would overflow 64 bits.
        assert!("G000000000000".parse::<QueueId>().is_err());
    }

    #[test]
    fn ids_increase_even_when_the_clock_stands_still_or_steps_back() {
        let ids = IdGenerator::starting_after(0);
        let a = ids.next(1_000);
        let b = ids.next(1_000);
        let c = ids.next(999);
        let d = ids.next(2_000);
        assert!(a < b && b < c && c < d);
        assert_eq!(a.millis(), 1_000);
        assert_eq!(d.millis(), 2_000);
    }

    #[test]
    fn ids_sort_as_text_in_time_order() {
        let ids = IdGenerator::starting_after(0);
        let a = ids.next(1_700_000_000_000).to_string();
        let b = ids.next(1_700_000_000_001).to_string();
        assert!(a < b);
    }
}
