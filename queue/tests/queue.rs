//! The queue's contract, through its public API, on a real sled store.

use queue::{
    AfterOutcome, Filter, MessageState, NewMessage, Outcome, Queue, QueueConfig, QueueError,
    RecipientState, Submission, SummaryBy,
};

const T0: u64 = 1_800_000_000_000;
const MIN: u64 = 60_000;

fn open(dir: &tempfile::TempDir) -> Queue {
    reopen(&QueueConfig::new(dir.path().join("queue"))).0
}

/// Opens the store, waiting out sled 0.34's background threads, which hold
/// a dropped instance's file lock for a moment (a new process never sees it).
fn reopen(config: &QueueConfig) -> (Queue, queue::RecoveryReport) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Queue::open(config) {
            Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened.unwrap(),
        }
    }
}

/// [`reopen`] for [`Queue::open_for_inspection`].
fn inspect(dir: &tempfile::TempDir) -> Queue {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Queue::open_for_inspection(&dir.path().join("queue")) {
            Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened.unwrap(),
        }
    }
}

fn message(q: &Queue, at: u64, tenant: &str, rcpts: &[&str]) -> NewMessage {
    NewMessage {
        id: q.next_id(at),
        received_ms: at,
        tenant: Some(tenant.into()),
        sender: format!("news@{tenant}.example"),
        recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        submission: Submission {
            peer_ip: Some("127.0.0.1".into()),
            ..Default::default()
        },
        head: Vec::new(),
        content: format!("Subject: hi\r\n\r\nbody for {rcpts:?}\r\n").into_bytes(),
    }
}

#[tokio::test]
async fn an_enqueued_message_survives_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@dest.example", "b@dest.example"]);
    let id = msg.id;
    let content = msg.content.clone();
    q.enqueue(msg).await.unwrap();
    drop(q);

    let (q, report) = reopen(&QueueConfig::new(dir.path().join("queue")));
    assert_eq!(report.messages, 1);
    assert_eq!(report.pending_recipients, 2);
    assert_eq!(report.scheduled, 1);
    let rec = q.get(id).unwrap();
    assert_eq!(rec.sender, "news@acme.example");
    assert_eq!(rec.tenant.as_deref(), Some("acme"));
    assert_eq!(rec.size, content.len() as u64);
    assert!(
        rec.recipients
            .iter()
            .all(|r| r.state == RecipientState::Queued)
    );
    assert_eq!(q.content(id).unwrap(), content);
    // New IDs continue after the stored ones even if the clock went back.
    assert!(q.next_id(T0 - 10 * MIN) > id);
}

#[tokio::test]
async fn duplicate_recipients_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(
        &q,
        T0,
        "acme",
        &["a@d.example", "A@D.example", "b@d.example"],
    );
    let id = msg.id;
    q.enqueue(msg).await.unwrap();
    assert_eq!(q.get(id).unwrap().recipients.len(), 2);
}

#[tokio::test]
async fn a_message_is_never_claimed_twice_and_returns_when_a_claim_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@d.example"]);
    let id = msg.id;
    q.enqueue(msg).await.unwrap();

    assert!(
        q.claim_due(T0 - 1, 10).unwrap().is_empty(),
        "not due before reception"
    );
    let claims = q.claim_due(T0, 10).unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].record.id, id);
    assert!(
        q.claim_due(T0 + MIN, 10).unwrap().is_empty(),
        "claimed twice"
    );
    drop(claims);
    let again = q.claim_due(T0 + MIN, 10).unwrap();
    assert_eq!(again.len(), 1, "a dropped claim puts the message back");
}

#[tokio::test]
async fn concurrent_claimers_split_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    for i in 0..200 {
        q.enqueue(message(&q, T0 + i, "acme", &["a@d.example"]))
            .await
            .unwrap();
    }
    let mut handles = Vec::new();
    for _ in 0..4 {
        let q = q.clone();
        handles.push(std::thread::spawn(move || {
            let mut ids = Vec::new();
            loop {
                let claims = q.claim_due(T0 + 1000, 7).unwrap();
                if claims.is_empty() {
                    break;
                }
                for c in claims {
                    ids.push(c.record.id);
                    std::mem::forget(c); // keep it claimed
                }
            }
            ids
        }));
    }
    let mut all: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, 200);
    assert_eq!(all.len(), 200, "some message was claimed twice");
}

#[tokio::test]
async fn outcomes_are_per_recipient_and_a_complete_message_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(
        &q,
        T0,
        "acme",
        &["ok@d.example", "later@d.example", "no@d.example"],
    );
    let id = msg.id;
    q.enqueue(msg).await.unwrap();

    let claim = q.claim_due(T0, 1).unwrap().pop().unwrap();
    let after = q
        .record_outcomes(
            claim,
            vec![
                (
                    0,
                    Outcome::Delivered {
                        reply: "250 2.0.0 ok".into(),
                    },
                ),
                (
                    1,
                    Outcome::Deferred {
                        reply: "451 4.7.1 later".into(),
                        next_attempt_ms: T0 + 5 * MIN,
                    },
                ),
                (
                    2,
                    Outcome::Bounced {
                        reply: "550 5.1.1 no such user".into(),
                    },
                ),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        after,
        AfterOutcome::Pending {
            next_due_ms: Some(T0 + 5 * MIN)
        }
    );
    let rec = q.get(id).unwrap();
    let states: Vec<_> = rec.recipients.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        [
            RecipientState::Delivered,
            RecipientState::Deferred,
            RecipientState::Bounced
        ]
    );
    assert_eq!(rec.recipients[1].attempts, 1);
    assert_eq!(
        rec.recipients[1].last_reply.as_deref(),
        Some("451 4.7.1 later")
    );
    assert_eq!(rec.state(), MessageState::Deferred);

    assert!(
        q.claim_due(T0 + 4 * MIN, 10).unwrap().is_empty(),
        "due too early"
    );
    let claim = q.claim_due(T0 + 5 * MIN, 10).unwrap().pop().unwrap();
    let after = q
        .record_outcomes(
            claim,
            vec![(
                1,
                Outcome::Delivered {
                    reply: "250 ok".into(),
                },
            )],
        )
        .await
        .unwrap();
    assert_eq!(after, AfterOutcome::Complete);
    assert!(matches!(q.get(id), Err(QueueError::NotFound(_))));
    assert!(matches!(q.content(id), Err(QueueError::NotFound(_))));
    assert!(q.is_empty());
}

#[tokio::test]
async fn held_messages_are_not_due_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@d.example"]);
    let id = msg.id;
    q.enqueue(msg).await.unwrap();
    let rec = q.hold(id).await.unwrap();
    assert_eq!(rec.state(), MessageState::Held);
    assert!(q.claim_due(T0 + MIN, 10).unwrap().is_empty());

    // Still held after a restart.
    drop(q);
    let q = open(&dir);
    assert!(q.claim_due(T0 + MIN, 10).unwrap().is_empty());
    q.release(id).await.unwrap();
    assert_eq!(q.claim_due(T0 + MIN, 10).unwrap().len(), 1);
}

#[tokio::test]
async fn hold_during_delivery_stops_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@d.example"]);
    let id = msg.id;
    q.enqueue(msg).await.unwrap();
    let claim = q.claim_due(T0, 1).unwrap().pop().unwrap();
    q.hold(id).await.unwrap();
    q.record_outcomes(
        claim,
        vec![(
            0,
            Outcome::Deferred {
                reply: "421".into(),
                next_attempt_ms: T0 + MIN,
            },
        )],
    )
    .await
    .unwrap();
    assert!(q.claim_due(T0 + 10 * MIN, 10).unwrap().is_empty());
    q.release(id).await.unwrap();
    assert_eq!(q.claim_due(T0 + 10 * MIN, 10).unwrap().len(), 1);
}

#[tokio::test]
async fn retry_now_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@d.example"]);
    let id = msg.id;
    q.enqueue(msg).await.unwrap();
    let claim = q.claim_due(T0, 1).unwrap().pop().unwrap();
    q.record_outcomes(
        claim,
        vec![(
            0,
            Outcome::Deferred {
                reply: "451".into(),
                next_attempt_ms: T0 + 60 * MIN,
            },
        )],
    )
    .await
    .unwrap();
    assert!(q.claim_due(T0 + MIN, 10).unwrap().is_empty());
    q.retry_now(id, T0 + MIN).await.unwrap();
    assert_eq!(q.claim_due(T0 + MIN, 10).unwrap().len(), 1);

    let removed = q.delete(id).await.unwrap();
    assert_eq!(removed.id, id);
    assert!(matches!(q.delete(id).await, Err(QueueError::NotFound(_))));
    assert!(q.claim_due(u64::MAX - 1, 10).unwrap().is_empty());
    assert!(matches!(q.hold(id).await, Err(QueueError::NotFound(_))));
}

#[tokio::test]
async fn a_message_claimed_when_the_process_died_is_due_again_after_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@d.example"]);
    let id = msg.id;
    q.enqueue(msg).await.unwrap();
    let claim = q.claim_due(T0, 1).unwrap().pop().unwrap();
    // A crash: the claim never settles and never runs its Drop.
    std::mem::forget(claim);
    q.sync().unwrap();
    drop(q);

    let (q, report) = reopen(&QueueConfig::new(dir.path().join("queue")));
    assert_eq!(report.scheduled, 1);
    let claims = q.claim_due(T0, 10).unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].record.id, id);
}

#[tokio::test]
async fn list_filters_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    q.enqueue(message(
        &q,
        T0,
        "acme",
        &["a@gmail.example", "b@yahoo.example"],
    ))
    .await
    .unwrap();
    q.enqueue(message(&q, T0 + 30 * MIN, "acme", &["c@gmail.example"]))
        .await
        .unwrap();
    let bank = message(&q, T0 + 50 * MIN, "bank", &["d@gmail.example"]);
    let bank_id = bank.id;
    q.enqueue(bank).await.unwrap();
    q.hold(bank_id).await.unwrap();

    let all = q.list(&Filter::default()).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    let by_domain = |d: &str| Filter {
        domain: Some(d.into()),
        ..Default::default()
    };
    assert_eq!(q.list(&by_domain("YAHOO.example")).unwrap().len(), 1);
    assert_eq!(q.list(&by_domain("gmail.example")).unwrap().len(), 3);
    let f = Filter {
        tenant: Some("bank".into()),
        ..Default::default()
    };
    assert_eq!(q.list(&f).unwrap()[0].id, bank_id);
    let f = Filter {
        state: Some(MessageState::Held),
        ..Default::default()
    };
    assert_eq!(q.list(&f).unwrap().len(), 1);
    let f = Filter {
        received_before_ms: Some(T0 + 40 * MIN),
        ..Default::default()
    };
    assert_eq!(q.list(&f).unwrap().len(), 2);
    let f = Filter {
        sender: Some("NEWS@bank.example".into()),
        ..Default::default()
    };
    assert_eq!(q.list(&f).unwrap().len(), 1);
    let f = Filter {
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(q.list(&f).unwrap().len(), 2);

    let s = q.summary(T0 + 60 * MIN, SummaryBy::Domain).unwrap();
    assert_eq!(s.total.messages, 3);
    assert_eq!(s.total.recipients, 4);
    assert_eq!(s.rows[0].key, "gmail.example");
    assert_eq!(s.rows[0].messages, 3);
    // Ages 60, 30 and 10 minutes: buckets <80, <40 and <20.
    let bucket = |minutes: u64| s.bounds_minutes.iter().position(|&b| minutes < b).unwrap();
    assert_eq!(s.rows[0].counts[bucket(60)], 1);
    assert_eq!(s.rows[0].counts[bucket(30)], 1);
    assert_eq!(s.rows[0].counts[bucket(10)], 1);
    assert_eq!(s.rows[1].key, "yahoo.example");
    let s = q.summary(T0 + 60 * MIN, SummaryBy::Tenant).unwrap();
    assert_eq!(s.rows[0].key, "acme");
    assert_eq!(s.rows[0].messages, 2);
}

#[tokio::test]
async fn concurrent_writers_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let before = q.commit_stats();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue(message(&q, T0 + i, "acme", &["a@d.example"]))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let after = q.commit_stats();
    let flushes = after.flushes - before.flushes;
    let waiters = after.waiters - before.waiters;
    assert_eq!(waiters, 64);
    assert!(
        flushes < waiters,
        "{flushes} flushes for {waiters} writers: no group commit"
    );
    assert_eq!(q.len(), 64);
}

#[tokio::test]
async fn a_second_opener_is_told_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _q = open(&dir);
    let err = Queue::open(&QueueConfig::new(dir.path().join("queue"))).unwrap_err();
    assert!(matches!(err, QueueError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("is an mta daemon running"),
        "{err}"
    );
}

fn segment_files(dir: &tempfile::TempDir) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.path().join("queue/content"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn content_space_is_given_back_when_messages_complete() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("queue"));
    config.segment_bytes = 4096;
    let (q, _) = reopen(&config);
    let mut ids = Vec::new();
    for i in 0..20 {
        let mut m = message(&q, T0 + i, "acme", &["a@d.example"]);
        m.content = vec![b'x'; 1000];
        ids.push(m.id);
        q.enqueue(m).await.unwrap();
    }
    assert!(segment_files(&dir).len() >= 4, "20 KB in 4 KB segments");
    for claim in q.claim_due(T0 + 100, 100).unwrap() {
        q.record_outcomes(
            claim,
            vec![(
                0,
                Outcome::Delivered {
                    reply: "250".into(),
                },
            )],
        )
        .await
        .unwrap();
    }
    assert!(q.is_empty());
    assert_eq!(
        segment_files(&dir).len(),
        1,
        "only the current segment is left"
    );
}

#[tokio::test]
async fn a_record_whose_content_is_gone_is_reported_and_never_scheduled() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, lost) = {
        let q = open(&dir);
        let a = message(&q, T0, "acme", &["a@d.example"]);
        let kept = a.id;
        q.enqueue(a).await.unwrap();
        drop(q);
        // A second run writes into a new segment, which then disappears.
        let q = open(&dir);
        let b = message(&q, T0 + 1, "acme", &["b@d.example"]);
        let lost = b.id;
        q.enqueue(b).await.unwrap();
        (kept, lost)
    };
    let newest = segment_files(&dir).pop().unwrap();
    std::fs::remove_file(newest).unwrap();
    let (q, report) = reopen(&QueueConfig::new(dir.path().join("queue")));
    assert_eq!(report.corrupt, vec![lost]);
    assert_eq!(report.messages, 1);
    let due: Vec<_> = q
        .claim_due(T0 + 10, 10)
        .unwrap()
        .iter()
        .map(|c| c.record.id)
        .collect();
    assert_eq!(due, vec![kept], "the damaged message must not be delivered");
    assert!(q.get(lost).is_ok(), "and must not be dropped silently");
}

#[tokio::test]
async fn tampered_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let m = message(&q, T0, "acme", &["a@d.example"]);
    let id = m.id;
    q.enqueue(m).await.unwrap();
    let seg = segment_files(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x01;
    std::fs::write(&seg, bytes).unwrap();
    assert!(matches!(q.content(id), Err(QueueError::Corrupt { .. })));
}

#[tokio::test]
async fn inspection_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = open(&dir);
        let m = message(&q, T0, "acme", &["a@d.example"]);
        let id = m.id;
        q.enqueue(m).await.unwrap();
        id
    };
    let before = segment_files(&dir);
    let q = inspect(&dir);
    assert!(q.content(id).unwrap().starts_with(b"Subject: hi"));
    assert_eq!(segment_files(&dir), before);
}

// Compaction of content segments.

/// Content that differs from message to message, about 3 KB.
fn noise(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..3000 + (i % 7) * 100)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn small_segments(dir: &tempfile::TempDir) -> QueueConfig {
    let mut config = QueueConfig::new(dir.path().join("queue"));
    config.segment_bytes = 64 * 1024;
    config
}

fn delivered() -> Outcome {
    Outcome::Delivered {
        reply: "250 2.0.0 ok".into(),
    }
}

/// Enqueues `n` messages of ~3 KB (about 20 per 64 KiB segment), delivers
/// them and defers one in ten for an hour. Returns the deferred ones with
/// their content.
async fn mostly_delivered(q: &Queue, n: u64) -> Vec<(queue::QueueId, Vec<u8>)> {
    for i in 0..n {
        let mut m = message(q, T0 + i, "acme", &["a@d.example"]);
        m.content = noise(i);
        q.enqueue(m).await.unwrap();
    }
    let mut deferred = Vec::new();
    let claims = q.claim_due(T0 + n, 10_000).unwrap();
    assert_eq!(claims.len() as u64, n);
    for (i, claim) in claims.into_iter().enumerate() {
        let outcome = if i % 10 == 3 {
            deferred.push((claim.record.id, noise(i as u64)));
            Outcome::Deferred {
                reply: "451 4.7.1 later".into(),
                next_attempt_ms: T0 + 60 * MIN,
            }
        } else {
            delivered()
        };
        q.record_outcomes(claim, vec![(0, outcome)]).await.unwrap();
    }
    deferred
}

async fn deliver_everything(q: &Queue) {
    for claim in q.claim_due(u64::MAX - 1, 10_000).unwrap() {
        let after = q.record_outcomes(claim, vec![(0, delivered())]).await;
        assert_eq!(after.unwrap(), AfterOutcome::Complete);
    }
    assert!(q.is_empty());
}

#[tokio::test]
async fn compaction_moves_deferred_messages_and_their_old_segments_disappear() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = reopen(&small_segments(&dir));
    let deferred = mostly_delivered(&q, 150).await;
    // One deferred message in ten keeps every segment on disk.
    let pinned = segment_files(&dir);
    assert!(pinned.len() >= 7, "{pinned:?}");
    let size_before = q.size_on_disk().unwrap();

    let report = q.compact().await.unwrap();
    let closed = pinned.len() - 1;
    assert_eq!(report.segments_compacted, closed, "{report:?}");
    assert_eq!(report.segments_removed, closed, "{report:?}");
    assert!(report.messages_moved >= deferred.len() - 3, "{report:?}");
    assert!(report.bytes_moved >= 3000 * report.messages_moved as u64);
    for old in &pinned[..closed] {
        assert!(!old.exists(), "{} is still on disk", old.display());
    }
    assert!(q.size_on_disk().unwrap() < size_before);
    for (id, content) in &deferred {
        assert_eq!(&q.content(*id).unwrap(), content, "content of {id}");
    }
    assert!(
        q.claim_due(T0 + 59 * MIN, 100).unwrap().is_empty(),
        "the schedule is untouched"
    );

    // Their completion releases the new places: the segments go too.
    deliver_everything(&q).await;
    assert_eq!(segment_files(&dir).len(), 1, "only the current segment");
    let report = q.compact().await.unwrap();
    assert_eq!(report.messages_moved, 0, "{report:?}");
    assert_eq!(segment_files(&dir).len(), 1);
}

#[tokio::test]
async fn after_compaction_a_reopened_store_finds_everything() {
    let dir = tempfile::tempdir().unwrap();
    let deferred = {
        let (q, _) = reopen(&small_segments(&dir));
        let deferred = mostly_delivered(&q, 120).await;
        let report = q.compact().await.unwrap();
        assert!(report.messages_moved > 0, "{report:?}");
        deferred
    };
    let (q, report) = reopen(&small_segments(&dir));
    assert_eq!(report.messages, deferred.len());
    assert_eq!(report.scheduled, deferred.len());
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(report.orphans_removed, 0, "{report:?}");
    for (id, content) in &deferred {
        assert_eq!(&q.content(*id).unwrap(), content, "content of {id}");
    }
    let due = q.claim_due(T0 + 60 * MIN, 100).unwrap();
    assert_eq!(due.len(), deferred.len());
    drop(due);
    deliver_everything(&q).await;
    assert_eq!(segment_files(&dir).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_racing_with_outcomes_and_deletes_neither_resurrects_nor_loses() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_segments(&dir);
    // Every closed segment with anything dead is compacted, and the copies
    // keep filling new segments: moves run the whole time.
    config.compact_below = 1.0;
    let (q, _) = reopen(&config);
    let deferred = mostly_delivered(&q, 300).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (q, stop) = (q.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut moved = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                moved += q.compact_blocking().unwrap().messages_moved;
            }
            moved
        })
    };
    let claims = q.claim_due(T0 + 60 * MIN, 10_000).unwrap();
    assert_eq!(claims.len(), deferred.len());
    let mut tasks = Vec::new();
    for (i, claim) in claims.into_iter().enumerate() {
        let q = q.clone();
        let expected = deferred
            .iter()
            .find(|(id, _)| *id == claim.record.id)
            .unwrap()
            .1
            .clone();
        tasks.push(tokio::spawn(async move {
            let id = claim.record.id;
            // Delivery reads the content while it may be moving.
            assert_eq!(q.content(id).unwrap(), expected, "content of {id}");
            tokio::task::yield_now().await;
            match i % 3 {
                0 => {
                    let after = q.record_outcomes(claim, vec![(0, delivered())]).await;
                    assert_eq!(after.unwrap(), AfterOutcome::Complete);
                    (id, None)
                }
                1 => {
                    drop(claim);
                    q.delete(id).await.unwrap();
                    (id, None)
                }
                _ => {
                    let outcome = Outcome::Deferred {
                        reply: "451 again".into(),
                        next_attempt_ms: T0 + 120 * MIN,
                    };
                    q.record_outcomes(claim, vec![(0, outcome)]).await.unwrap();
                    (id, Some(expected))
                }
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // A few more passes with nothing else going on.
    for _ in 0..3 {
        q.compact().await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let moved = compactor.await.unwrap();
    assert!(moved > 0, "the compactor never moved anything");

    let check = |q: &Queue| {
        for (id, kept) in &results {
            match kept {
                None => assert!(
                    matches!(q.get(*id), Err(QueueError::NotFound(_))),
                    "{id} was resurrected"
                ),
                Some(content) => assert_eq!(&q.content(*id).unwrap(), content, "{id}"),
            }
        }
        assert_eq!(q.len(), results.iter().filter(|r| r.1.is_some()).count());
    };
    check(&q);
    drop(q);
    let (q, report) = reopen(&config);
    assert!(report.corrupt.is_empty(), "{report:?}");
    check(&q);
    // Nothing leaked: once all is delivered only the current segment is left.
    deliver_everything(&q).await;
    assert_eq!(segment_files(&dir).len(), 1);
}

#[tokio::test]
async fn compaction_refuses_a_store_opened_for_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let deferred = {
        let (q, _) = reopen(&small_segments(&dir));
        mostly_delivered(&q, 60).await
    };
    let before = segment_files(&dir);
    let q = inspect(&dir);
    assert!(q.compact().await.is_err());
    assert_eq!(segment_files(&dir), before);
    for (id, content) in &deferred {
        assert_eq!(&q.content(*id).unwrap(), content);
    }
}

#[tokio::test]
async fn a_stored_message_is_due_only_once_the_caller_lets_go() {
    // Delivery must never start before the 250's commit point and the
    // Reception record: the schedule key comes after both.
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = Queue::open(&QueueConfig::new(dir.path())).unwrap();
    let id = q.next_id(T0);
    let stored = q
        .enqueue(NewMessage {
            id,
            received_ms: T0,
            tenant: None,
            sender: "s@x.example".into(),
            recipients: vec!["a@d.example".into()],
            submission: Submission::default(),
            head: Vec::new(),
            content: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        })
        .await
        .unwrap();
    assert_eq!(stored.id(), id);
    assert!(
        q.claim_due(T0 + 1, 10).unwrap().is_empty(),
        "due before release"
    );
    assert_eq!(q.next_due_ms().unwrap(), None);
    stored.schedule();
    assert_eq!(q.next_due_ms().unwrap(), Some(T0));
    let claims = q.claim_due(T0 + 1, 10).unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].record.id, id);
}

#[tokio::test]
async fn a_postponed_recipient_keeps_its_state_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let msg = message(&q, T0, "acme", &["a@d.example", "b@e.example"]);
    let id = msg.id;
    q.enqueue(msg).await.unwrap();
    let claim = q.claim_due(T0, 1).unwrap().pop().unwrap();
    q.record_outcomes(
        claim,
        vec![
            (
                0,
                Outcome::Postponed {
                    next_attempt_ms: T0 + 30 * MIN,
                },
            ),
            (
                1,
                Outcome::Deferred {
                    reply: "451 4.4.1 later".into(),
                    next_attempt_ms: T0 + 10 * MIN,
                },
            ),
        ],
    )
    .await
    .unwrap();
    let rec = q.get(id).unwrap();
    assert_eq!(rec.recipients[0].state, RecipientState::Queued);
    assert_eq!(rec.recipients[0].attempts, 0);
    assert_eq!(rec.recipients[0].last_reply, None);
    assert_eq!(rec.recipients[0].next_attempt_ms, T0 + 30 * MIN);
    assert_eq!(rec.recipients[1].attempts, 1);
    // Due at the earlier of the two, and only the deferred one is due then.
    assert!(q.claim_due(T0 + 9 * MIN, 10).unwrap().is_empty());
    let claim = q.claim_due(T0 + 10 * MIN, 10).unwrap().pop().unwrap();
    assert!(claim.record.recipients[0].next_attempt_ms > T0 + 10 * MIN);
}

/// A message just stored is kept in memory for its first attempt: taken
/// once, then read from disk like any other; a deletion forgets it; the
/// budget bounds what is kept, and what is not kept is read from disk.
#[tokio::test]
async fn a_fresh_message_is_taken_from_memory_once_and_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("queue"));
    // Room for one message of `message`'s with a one-letter recipient.
    let one = format!("Subject: hi\r\n\r\nbody for {:?}\r\n", ["a@d.example"]).len();
    config.fresh_content_bytes = one + 10;
    let (q, _) = reopen(&config);

    let mut a = message(&q, T0, "acme", &["a@d.example"]);
    a.head = b"X-Added: 1\r\n".to_vec();
    let (a_id, a_whole) = (a.id, [a.head.clone(), a.content.clone()].concat());
    q.enqueue(a).await.unwrap();
    assert_eq!(
        q.fresh_content_bytes(),
        0,
        "head and content over the budget"
    );
    assert_eq!(
        q.take_content(a_id).unwrap().into_vec(),
        a_whole,
        "read from disk"
    );

    let b = message(&q, T0 + 1, "acme", &["b@d.example"]);
    let (b_id, b_content) = (b.id, b.content.clone());
    q.enqueue(b).await.unwrap();
    assert_eq!(q.fresh_content_bytes(), b_content.len());
    let c = message(&q, T0 + 2, "acme", &["c@d.example"]);
    let (c_id, c_content) = (c.id, c.content.clone());
    q.enqueue(c).await.unwrap();
    assert_eq!(
        q.fresh_content_bytes(),
        b_content.len(),
        "no room for a second"
    );
    assert_eq!(q.take_content(b_id).unwrap().into_vec(), b_content);
    assert_eq!(q.fresh_content_bytes(), 0, "taken");
    assert_eq!(
        q.take_content(b_id).unwrap().into_vec(),
        b_content,
        "then from disk"
    );
    assert_eq!(q.take_content(c_id).unwrap().into_vec(), c_content);

    let d = message(&q, T0 + 3, "acme", &["d@d.example"]);
    let d_id = d.id;
    q.enqueue(d).await.unwrap();
    assert!(q.fresh_content_bytes() > 0);
    q.delete(d_id).await.unwrap();
    assert_eq!(q.fresh_content_bytes(), 0, "a deleted message is forgotten");
    assert!(q.take_content(d_id).is_err());

    let e = message(&q, T0 + 4, "acme", &["e@d.example"]);
    let (e_id, e_content) = (e.id, e.content.clone());
    q.enqueue(e).await.unwrap();
    drop(q);
    let (q, _) = reopen(&config);
    assert_eq!(
        q.fresh_content_bytes(),
        0,
        "memory does not survive a restart"
    );
    assert_eq!(q.take_content(e_id).unwrap().into_vec(), e_content);
}
