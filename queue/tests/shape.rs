//! The queue's maintained shape (messages, pending recipients and bytes by
//! state) against a count of the records themselves, through every kind of
//! change, and the flush observer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use queue::{
    MessageRecord, NewMessage, Outcome, Queue, QueueConfig, QueueError, QueueShape, StateTotals,
    Submission,
};

const T0: u64 = 1_800_000_000_000;

/// Opens the store, waiting out sled 0.34's background threads, which hold
/// a dropped instance's file lock for a moment.
fn open(dir: &tempfile::TempDir) -> Queue {
    let config = QueueConfig::new(dir.path().join("queue"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Queue::open(&config) {
            Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened.unwrap().0,
        }
    }
}

fn message(q: &Queue, rcpts: &[&str], body: usize) -> NewMessage {
    NewMessage {
        id: q.next_id(T0),
        received_ms: T0,
        tenant: Some("acme".into()),
        sender: "news@acme.example".into(),
        recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        submission: Submission::default(),
        head: Vec::new(),
        content: vec![b'x'; body],
    }
}

/// Enqueues and schedules at once; the ID.
async fn enqueue(q: &Queue, m: NewMessage) -> queue::QueueId {
    let stored = q.enqueue(m).await.unwrap();
    let id = stored.id();
    stored.schedule();
    id
}

/// The maintained shape must equal a count of the stored records.
fn check(q: &Queue) -> QueueShape {
    let records: Vec<MessageRecord> = q.records().map(Result::unwrap).collect();
    let counted = QueueShape::count(&records);
    assert_eq!(q.shape(), Some(counted), "maintained vs counted");
    counted
}

fn totals(messages: i64, recipients: i64, bytes: i64) -> StateTotals {
    StateTotals {
        messages,
        recipients,
        bytes,
    }
}

#[tokio::test]
async fn the_shape_follows_every_change_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    assert_eq!(check(&q), QueueShape::default());

    let a = enqueue(&q, message(&q, &["a@x.example", "b@y.example"], 100)).await;
    let b = enqueue(&q, message(&q, &["c@x.example"], 200)).await;
    // Duplicates are stored once, and counted once.
    let c = enqueue(&q, message(&q, &["d@x.example", "D@X.example"], 300)).await;
    let shape = check(&q);
    assert_eq!(shape.queued, totals(3, 4, 600));

    // Claim everything: a gets one recipient deferred and one delivered;
    // b's only recipient bounces (complete, so gone); c's claim is dropped.
    let claims = q.claim_due(T0, 10).unwrap();
    assert_eq!(claims.len(), 3);
    for claim in claims {
        let id = claim.record.id;
        if id == a {
            q.record_outcomes(
                claim,
                vec![
                    (
                        0,
                        Outcome::Deferred {
                            reply: "451 later".into(),
                            next_attempt_ms: T0 + 60_000,
                        },
                    ),
                    (
                        1,
                        Outcome::Delivered {
                            reply: "250 ok".into(),
                        },
                    ),
                ],
            )
            .await
            .unwrap();
        } else if id == b {
            q.record_outcomes(
                claim,
                vec![(
                    0,
                    Outcome::Bounced {
                        reply: "550 no".into(),
                    },
                )],
            )
            .await
            .unwrap();
        } else {
            // Dropped unsettled: back as it was.
            drop(claim);
        }
    }
    let shape = check(&q);
    assert_eq!(shape.deferred, totals(1, 1, 100));
    assert_eq!(shape.queued, totals(1, 1, 300));

    q.hold(c).await.unwrap();
    let shape = check(&q);
    assert_eq!(shape.held, totals(1, 1, 300));
    assert_eq!(shape.queued, StateTotals::default());

    q.retry_now(a, T0).await.unwrap();
    check(&q);
    q.release(c).await.unwrap();
    assert_eq!(check(&q).queued, totals(1, 1, 300));

    // Expiry of a's last recipient completes it.
    let claim = q
        .claim_due(T0 + 60_000, 10)
        .unwrap()
        .into_iter()
        .find(|c| c.record.id == a)
        .expect("a is due");
    q.record_outcomes(
        claim,
        vec![(
            0,
            Outcome::Expired {
                reply: "451 later".into(),
            },
        )],
    )
    .await
    .unwrap();
    let shape = check(&q);
    assert_eq!(shape.deferred, StateTotals::default());
    assert_eq!(shape.queued, totals(1, 1, 300));

    // Reopening recounts; the counts agree with what was maintained.
    let d = enqueue(&q, message(&q, &["e@z.example", "f@z.example"], 50)).await;
    q.hold(d).await.unwrap();
    let before = check(&q);
    drop(q);
    let q = open(&dir);
    assert_eq!(check(&q), before);

    q.delete(c).await.unwrap();
    q.delete(d).await.unwrap();
    assert_eq!(check(&q), QueueShape::default());
}

#[tokio::test]
async fn a_store_opened_for_inspection_has_no_shape() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    q.enqueue(message(&q, &["a@x.example"], 10)).await.unwrap();
    drop(q);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let q = loop {
        match Queue::open_for_inspection(&dir.path().join("queue")) {
            Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => break opened.unwrap(),
        }
    };
    assert_eq!(q.shape(), None);
}

#[tokio::test]
async fn the_flush_observer_hears_of_every_flush_and_its_writers() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let before = q.commit_stats();
    let (flushes, writers) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    q.observe_flushes({
        let (flushes, writers) = (flushes.clone(), writers.clone());
        move |_took, n| {
            flushes.fetch_add(1, Ordering::SeqCst);
            writers.fetch_add(n, Ordering::SeqCst);
        }
    });
    let mut tasks = Vec::new();
    for i in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let m = message(&q, &[&format!("r{i}@x.example")], 10);
            q.enqueue(m).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = q.commit_stats();
    // The observer runs before the writers are woken, so it has seen every
    // flush that made these writes durable.
    assert_eq!(
        flushes.load(Ordering::SeqCst) as u64,
        after.flushes - before.flushes
    );
    assert_eq!(
        writers.load(Ordering::SeqCst) as u64,
        after.waiters - before.waiters
    );
    assert_eq!(writers.load(Ordering::SeqCst), 8);
}
