//! Messages just stored, kept in memory in clear for their first delivery
//! attempt.
//!
//! Mail is usually sent a few milliseconds after it is stored. Reading it
//! back then means a copy out of the page cache and a decryption, for bytes
//! the process held a moment before: a quarter of what a 100 KiB message
//! costs outside its signature. So the store keeps each message it has made
//! durable here, within a byte budget, until the first attempt takes it.
//!
//! Nothing here is durable and nothing depends on it: a message that is not
//! here (over the budget, already taken, after a restart) is read from disk.
//! The budget bounds the memory when delivery falls behind: then new
//! messages are simply not kept. An entry leaves when its message is taken,
//! deleted or quarantined, so no plaintext stays longer than its message.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::id::QueueId;

/// A message's content as delivery gets it ([`Queue::take_content`]): the
/// pieces it was stored in (see [`NewMessage::head`]), each but the last
/// ending a line, so that each can be dot-stuffed and sent as it is rather
/// than joined first.
///
/// [`Queue::take_content`]: crate::Queue::take_content
/// [`NewMessage::head`]: crate::NewMessage::head
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Content {
    /// Content in `head` then `body`. A head that does not end a line is
    /// joined to the body, so that every piece but the last ends one.
    pub fn new(mut head: Vec<u8>, body: Vec<u8>) -> Content {
        if head.is_empty() || head.ends_with(b"\r\n") {
            return Content { head, body };
        }
        head.extend_from_slice(&body);
        Content {
            head: Vec::new(),
            body: head,
        }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces in order, empty ones left out.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        [self.head.as_slice(), self.body.as_slice()]
            .into_iter()
            .filter(|p| !p.is_empty())
    }

    /// The content in one piece.
    pub fn into_vec(self) -> Vec<u8> {
        let Content { mut head, body } = self;
        if head.is_empty() {
            return body;
        }
        head.extend_from_slice(&body);
        head
    }
}

impl From<Vec<u8>> for Content {
    fn from(body: Vec<u8>) -> Content {
        Content {
            head: Vec::new(),
            body,
        }
    }
}

pub(crate) struct FreshContent {
    budget: usize,
    inner: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    bytes: usize,
    messages: HashMap<QueueId, Content>,
}

impl FreshContent {
    /// Keeps at most `budget` bytes of content; 0 keeps nothing.
    pub(crate) fn new(budget: usize) -> Self {
        FreshContent {
            budget,
            inner: Mutex::new(Held::default()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a message just made durable, if it fits in the budget.
    pub(crate) fn put(&self, id: QueueId, head: Vec<u8>, body: Vec<u8>) {
        let content = Content::new(head, body);
        let len = content.len();
        if self.budget == 0 || len > self.budget {
            return;
        }
        let mut held = self.held();
        if held.bytes + len > self.budget {
            return;
        }
        held.bytes += len;
        if let Some(old) = held.messages.insert(id, content) {
            held.bytes -= old.len();
        }
    }

    /// The content of `id`, if it is kept; it is kept no more.
    pub(crate) fn take(&self, id: QueueId) -> Option<Content> {
        let mut held = self.held();
        let content = held.messages.remove(&id)?;
        held.bytes -= content.len();
        Some(content)
    }

    /// Forgets `id` (deleted, quarantined, delivered).
    pub(crate) fn remove(&self, id: QueueId) {
        let mut held = self.held();
        if let Some(content) = held.messages.remove(&id) {
            held.bytes -= content.len();
        }
    }

    /// Bytes kept.
    pub(crate) fn bytes(&self) -> usize {
        self.held().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> QueueId {
        QueueId::from_u64(n)
    }

    #[test]
    fn a_message_is_taken_once_in_one_piece() {
        let fresh = FreshContent::new(1000);
        fresh.put(id(1), b"Head: 1\r\n".to_vec(), b"body\r\n".to_vec());
        fresh.put(id(2), Vec::new(), b"only body\r\n".to_vec());
        assert_eq!(fresh.bytes(), 15 + 11);
        let one = fresh.take(id(1)).unwrap();
        assert_eq!(
            one.pieces().collect::<Vec<_>>(),
            [b"Head: 1\r\n".as_slice(), b"body\r\n"]
        );
        assert_eq!(one.into_vec(), b"Head: 1\r\nbody\r\n");
        assert_eq!(fresh.take(id(1)), None, "taken once");
        assert_eq!(fresh.take(id(2)).unwrap().into_vec(), b"only body\r\n");
        assert_eq!(fresh.bytes(), 0);
    }

    #[test]
    fn every_piece_but_the_last_ends_a_line() {
        let split = Content::new(b"A: 1\r\n".to_vec(), b"B: 2\r\n\r\nx".to_vec());
        assert_eq!(split.pieces().count(), 2);
        assert_eq!(split.len(), 15);
        let joined = Content::new(b"A: 1".to_vec(), b"\r\n\r\nx".to_vec());
        assert_eq!(
            joined.pieces().collect::<Vec<_>>(),
            [b"A: 1\r\n\r\nx".as_slice()]
        );
        let body_only = Content::from(b"x\r\n".to_vec());
        assert_eq!(body_only.pieces().count(), 1);
        assert!(Content::from(Vec::new()).is_empty());
        assert_eq!(Content::from(Vec::new()).pieces().count(), 0);
    }

    #[test]
    fn the_budget_bounds_what_is_kept() {
        let fresh = FreshContent::new(100);
        fresh.put(id(1), Vec::new(), vec![b'a'; 60]);
        fresh.put(id(2), Vec::new(), vec![b'b'; 60]);
        assert_eq!(fresh.bytes(), 60, "the second does not fit");
        assert_eq!(fresh.take(id(2)), None);
        fresh.remove(id(1));
        assert_eq!(fresh.bytes(), 0);
        fresh.put(id(2), Vec::new(), vec![b'b'; 60]);
        assert_eq!(fresh.bytes(), 60, "room again once the first is gone");
        fresh.put(id(3), Vec::new(), vec![b'c'; 101]);
        assert_eq!(fresh.take(id(3)), None, "larger than the budget");
        let none = FreshContent::new(0);
        none.put(id(4), Vec::new(), b"x".to_vec());
        assert_eq!(none.take(id(4)), None, "a budget of 0 keeps nothing");
    }
}
