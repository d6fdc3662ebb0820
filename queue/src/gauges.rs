//! The queue's shape (messages, pending recipients, bytes by state),
//! maintained as the records change, so that a metrics scrape reads a few
//! atomics instead of decoding every record.
//!
//! Every path that writes or removes a message record reports the record's
//! contribution before and after (see `Queue::update`, `enqueue`, `delete`);
//! recovery starts the totals from its scan of every record. What counts is
//! every record that decodes: records whose content is missing stay in the
//! store for a postmaster and are counted too, while undecodable ones are
//! never changed by any path and never counted.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::record::{MessageRecord, MessageState};

/// Totals of one state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateTotals {
    pub messages: i64,
    /// Recipients not yet final.
    pub recipients: i64,
    /// Stored content bytes.
    pub bytes: i64,
}

/// Messages in the queue by [`MessageState`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueShape {
    pub queued: StateTotals,
    pub deferred: StateTotals,
    pub held: StateTotals,
}

impl QueueShape {
    /// The totals of one state.
    pub fn get(&self, state: MessageState) -> StateTotals {
        match state {
            MessageState::Queued => self.queued,
            MessageState::Deferred => self.deferred,
            MessageState::Held => self.held,
        }
    }

    /// Counts records one by one: what the maintained totals must agree
    /// with.
    pub fn count<'a>(records: impl IntoIterator<Item = &'a MessageRecord>) -> QueueShape {
        let mut shape = QueueShape::default();
        for rec in records {
            shape.add(Contribution::of(rec));
        }
        shape
    }

    pub(crate) fn add(&mut self, c: Contribution) {
        let t = match c.state {
            MessageState::Queued => &mut self.queued,
            MessageState::Deferred => &mut self.deferred,
            MessageState::Held => &mut self.held,
        };
        t.messages += 1;
        t.recipients += c.recipients;
        t.bytes += c.bytes;
    }
}

/// What one record adds to the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Contribution {
    state: MessageState,
    recipients: i64,
    bytes: i64,
}

impl Contribution {
    pub(crate) fn of(rec: &MessageRecord) -> Contribution {
        Contribution {
            state: rec.state(),
            recipients: rec
                .recipients
                .iter()
                .filter(|r| !r.state.is_final())
                .count() as i64,
            bytes: rec.size as i64,
        }
    }
}

const STATES: [MessageState; 3] = [
    MessageState::Queued,
    MessageState::Deferred,
    MessageState::Held,
];

fn index(state: MessageState) -> usize {
    match state {
        MessageState::Queued => 0,
        MessageState::Deferred => 1,
        MessageState::Held => 2,
    }
}

/// The running totals: messages, recipients, bytes for each state.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    totals: [[AtomicI64; 3]; 3],
}

impl Gauges {
    pub(crate) fn starting_at(shape: QueueShape) -> Gauges {
        let g = Gauges::default();
        for state in STATES {
            let t = shape.get(state);
            let slot = &g.totals[index(state)];
            slot[0].store(t.messages, Ordering::Relaxed);
            slot[1].store(t.recipients, Ordering::Relaxed);
            slot[2].store(t.bytes, Ordering::Relaxed);
        }
        g
    }

    fn apply(&self, c: Contribution, sign: i64) {
        let slot = &self.totals[index(c.state)];
        slot[0].fetch_add(sign, Ordering::Relaxed);
        slot[1].fetch_add(sign * c.recipients, Ordering::Relaxed);
        slot[2].fetch_add(sign * c.bytes, Ordering::Relaxed);
    }

    /// A record was written where `before` stood (`None`: a new message)
    /// and is now `after` (`None`: removed).
    pub(crate) fn changed(&self, before: Option<Contribution>, after: Option<Contribution>) {
        if before == after {
            return;
        }
        if let Some(b) = before {
            self.apply(b, -1);
        }
        if let Some(a) = after {
            self.apply(a, 1);
        }
    }

    pub(crate) fn snapshot(&self) -> QueueShape {
        let read = |state: MessageState| {
            let slot = &self.totals[index(state)];
            StateTotals {
                messages: slot[0].load(Ordering::Relaxed),
                recipients: slot[1].load(Ordering::Relaxed),
                bytes: slot[2].load(Ordering::Relaxed),
            }
        };
        QueueShape {
            queued: read(MessageState::Queued),
            deferred: read(MessageState::Deferred),
            held: read(MessageState::Held),
        }
    }
}
