//! A postmaster's bounce (`mta queue bounce`): every pending recipient of a
//! message fails now, the sender gets a DSN saying so, and the message
//! leaves the queue.
//!
//! Order, as for bounces from MX hosts: the DSN is durable before the
//! message is removed, so a crash in between can send the DSN twice (the
//! message is still there to bounce again) but never lose it.

use queue::{MessageRecord, QueueError, QueueId};

use super::{Delivery, Kind, Via, dsn, reply_line};
use crate::delivery::outcome::{Failure, RcptResult, Scope};
use crate::smtp::{Reply, Status};

/// What a bounce did.
#[derive(Debug, Clone)]
pub struct Bounced {
    /// The message as it was before it was removed.
    pub record: MessageRecord,
    /// The recipients that were pending and are now bounced.
    pub recipients: Vec<String>,
    /// The DSN's queue ID; `None` for a null sender or with `bounces = false`.
    pub dsn_queue_id: Option<String>,
}

impl Delivery {
    /// Bounces every pending recipient of `id` on `who`'s word.
    pub async fn bounce_now(&self, id: QueueId, who: &str) -> Result<Bounced, QueueError> {
        let rec = self.queue.get(id)?;
        let now = self.clock.now();
        let reply = Reply::new(
            550,
            Status(5, 0, 0),
            format!("returned to the sender by the postmaster ({who})"),
        );
        let pending: Vec<usize> = rec
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.state.is_final())
            .map(|(i, _)| i)
            .collect();
        let dsn_queue_id =
            if self.settings.delivery.bounces && !rec.sender.is_empty() && !pending.is_empty() {
                let recipients: Vec<dsn::DsnRecipient> = pending
                    .iter()
                    .map(|&i| dsn::DsnRecipient {
                        address: rec.recipients[i].address.clone(),
                        action: dsn::Action::Failed,
                        status: "5.0.0".into(),
                        remote_mta: None,
                        diagnostic: Some(reply_line(&reply)),
                        last_attempt: None,
                        will_retry_until: None,
                    })
                    .collect();
                // Without its DSN the bounce is refused: the message stays.
                Some(self.queue_dsn(&rec, &recipients, now).await?)
            } else {
                None
            };
        let removed = self.queue.delete(id).await?;
        // Recipients that became final while the DSN was being queued (a
        // delivery under way) are not bounced.
        let still: Vec<usize> = pending
            .into_iter()
            .filter(|&i| {
                removed
                    .recipients
                    .get(i)
                    .is_some_and(|r| !r.state.is_final())
            })
            .collect();
        let failure = RcptResult::Failed(Failure::new(Scope::Message, reply));
        for &i in &still {
            let r = &removed.recipients[i];
            let mut a = self.attempt_record(
                &removed,
                i,
                &failure,
                &Via::default(),
                now,
                r.attempts,
                None,
                dsn_queue_id.clone(),
            );
            a.scope = Some("admin".into());
            self.metrics.settled(
                Kind::Bounce.outcome(),
                removed.tenant.as_deref(),
                &r.domain,
                std::time::Duration::from_millis(
                    crate::clock::millis(now).saturating_sub(removed.received_ms),
                ),
            );
            self.log.write(Kind::Bounce.record(a));
        }
        tracing::info!(queue_id = %id, recipients = still.len(), dsn = ?dsn_queue_id, "bounced by the postmaster");
        Ok(Bounced {
            recipients: still
                .iter()
                .map(|&i| removed.recipients[i].address.clone())
                .collect(),
            record: removed,
            dsn_queue_id,
        })
    }
}
