//! Encryption at rest, through the public API, on a real store: what
//! reaches the disk, key rotation and rekeying, quarantine of records that
//! fail authentication, and the keys a store refuses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use queue::{
    NewMessage, Outcome, QuarantineKind, Queue, QueueConfig, QueueError, QueueId, QueueKeys,
    Submission,
};

const T0: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;

const SECRET_SUBJECT: &str = "Subject: quarterly-figures-7f3a";
const SECRET_BODY: &str = "the-merger-is-on-9c21";
const SECRET_RCPT: &str = "ceo-private-5d8e@dest.example";

fn config(dir: &Path, keys: Option<&Arc<QueueKeys>>) -> QueueConfig {
    let mut c = QueueConfig::new(dir.join("queue"));
    c.keys = keys.cloned();
    c
}

/// Opens the store, waiting out sled 0.34's background threads, which hold
/// a dropped instance's file lock for a moment.
fn try_open(config: &QueueConfig) -> Result<(Queue, queue::RecoveryReport), QueueError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Queue::open(config) {
            Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened,
        }
    }
}

fn open(config: &QueueConfig) -> (Queue, queue::RecoveryReport) {
    try_open(config).unwrap()
}

fn key_file(dir: &Path, name: &str) -> (PathBuf, Arc<QueueKeys>) {
    let path = dir.join(name);
    let keys = QueueKeys::generate(&path).unwrap();
    (path, Arc::new(keys))
}

fn message(q: &Queue, at: u64, n: u64) -> NewMessage {
    NewMessage {
        id: q.next_id(at),
        received_ms: at,
        tenant: Some("acme".into()),
        sender: "news@acme.example".into(),
        recipients: vec![SECRET_RCPT.into(), format!("other{n}@dest.example")],
        submission: Submission::default(),
        head: Vec::new(),
        content: format!("{SECRET_SUBJECT}\r\n\r\n{SECRET_BODY} number {n}\r\n").into_bytes(),
    }
}

async fn enqueue(q: &Queue, at: u64, n: u64) -> (QueueId, Vec<u8>) {
    let m = message(q, at, n);
    let (id, content) = (m.id, m.content.clone());
    q.enqueue(m).await.unwrap();
    (id, content)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The files under the store that contain `needle`.
fn holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_under(&dir.join("queue"))
        .into_iter()
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .collect()
}

/// Changes the stored envelope of `id` with sled itself (the store closed).
fn tamper_envelope(dir: &Path, id: QueueId, f: impl FnOnce(&mut Vec<u8>)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match sled::open(dir.join("queue/index")) {
            Ok(db) => break db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let tree = db.open_tree("queue").unwrap();
    let mut k = vec![b'm'];
    k.extend_from_slice(&id.as_u64().to_be_bytes());
    let mut v = tree.get(&k).unwrap().expect("the record").to_vec();
    f(&mut v);
    tree.insert(k, v).unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn a_sealed_message_round_trips_and_leaves_no_plaintext_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    let (id, content) = {
        let (q, _) = open(&config(dir.path(), Some(&keys)));
        let (id, content) = enqueue(&q, T0, 1).await;
        assert_eq!(q.content(id).unwrap(), content);
        assert_eq!(q.get(id).unwrap().recipients[0].address, SECRET_RCPT);
        q.sync().unwrap();
        (id, content)
    };
    for needle in [
        SECRET_SUBJECT,
        SECRET_BODY,
        SECRET_RCPT,
        "news@acme.example",
    ] {
        assert_eq!(
            holding(dir.path(), needle),
            Vec::<PathBuf>::new(),
            "{needle}"
        );
    }
    let (q, report) = open(&config(dir.path(), Some(&keys)));
    assert_eq!((report.messages, report.quarantined.len()), (1, 0));
    assert_eq!(q.content(id).unwrap(), content);
    let claims = q.claim_due(T0, 10).unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].record.sender, "news@acme.example");
}

#[tokio::test]
async fn the_same_store_in_clear_holds_the_plaintext() {
    // The control for the test above: the search does find what is there.
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = open(&config(dir.path(), None));
    enqueue(&q, T0, 1).await;
    q.sync().unwrap();
    assert!(!holding(dir.path(), SECRET_BODY).is_empty());
    assert!(!holding(dir.path(), SECRET_RCPT).is_empty());
}

#[tokio::test]
async fn after_a_rotation_old_and_new_keys_open_their_records_until_rekeyed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, a) = key_file(dir.path(), "queue.key");
    let (old_id, old_content) = {
        let (q, _) = open(&config(dir.path(), Some(&a)));
        enqueue(&q, T0, 1).await
    };
    let (new_path, b) = key_file(dir.path(), "new.key");
    let ring = Arc::new(QueueKeys::rotate(&path, &new_path).unwrap());
    assert_eq!(ring.ids(), vec![b.current(), a.current()]);

    let new_id = {
        let (q, report) = open(&config(dir.path(), Some(&ring)));
        assert_eq!(report.messages, 1);
        let (new_id, _) = enqueue(&q, T0 + 1, 2).await;
        // Mixed key ids: the old content opens with the old key, the new
        // message is sealed with the new one.
        assert_eq!(q.content(old_id).unwrap(), old_content);
        assert!(
            q.content(new_id)
                .unwrap()
                .starts_with(SECRET_SUBJECT.as_bytes())
        );
        new_id
    };

    // Without the old key, the old message cannot open: it waits in
    // quarantine (never delivered, never dropped) ...
    {
        let (q, report) = open(&config(dir.path(), Some(&b)));
        assert_eq!(report.messages, 1);
        assert_eq!(report.quarantined.len(), 1, "{report:?}");
        assert_eq!(report.quarantined[0].0, old_id);
        assert!(report.quarantined[0].1.contains(&a.current().to_string()));
        let quarantined = q.quarantined().unwrap();
        assert_eq!(quarantined[0].kind, QuarantineKind::UnknownKey);
        let due: Vec<QueueId> = q
            .claim_due(T0 + HOUR, 10)
            .unwrap()
            .iter()
            .map(|c| c.record.id)
            .collect();
        assert_eq!(due, vec![new_id]);
    }
    // ... until the key is back.
    let (q, report) = open(&config(dir.path(), Some(&ring)));
    assert_eq!((report.messages, report.restored), (2, 1), "{report:?}");
    assert!(q.quarantined().unwrap().is_empty());
    assert_eq!(q.content(old_id).unwrap(), old_content);

    let r = q.rekey_blocking().unwrap();
    assert_eq!(r.contents, 1, "only the old content: {r:?}");
    assert_eq!(r.keys_in_use, vec![b.current()]);
    assert_eq!(
        QueueKeys::retire(&path, &r.keys_in_use).unwrap(),
        vec![a.current()]
    );
    drop(q);
    // The new key alone now opens everything.
    let only_b = Arc::new(QueueKeys::load(&path).unwrap());
    assert_eq!(only_b.ids(), vec![b.current()]);
    let (q, report) = open(&config(dir.path(), Some(&only_b)));
    assert_eq!((report.messages, report.quarantined.len()), (2, 0));
    assert_eq!(q.content(old_id).unwrap(), old_content);
}

#[tokio::test]
async fn envelopes_are_sealed_again_at_every_change_and_content_is_moved_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let (path, a) = key_file(dir.path(), "queue.key");
    let mut c = config(dir.path(), Some(&a));
    c.segment_bytes = 512;
    c.compact_below = 0.5;
    let mut kept = Vec::new();
    {
        let (q, _) = open(&c);
        for i in 0..12 {
            kept.push(enqueue(&q, T0 + i, i).await);
        }
    }
    let (new_path, _) = key_file(dir.path(), "new.key");
    c.keys = Some(Arc::new(QueueKeys::rotate(&path, &new_path).unwrap()));
    let (q, _) = open(&c);
    // Defer one in three for an hour, deliver the rest; the deferred
    // envelopes are now under the new key, their content under the old.
    for (n, claim) in q.claim_due(T0 + 100, 100).unwrap().into_iter().enumerate() {
        let outcome = if n % 3 == 0 {
            Outcome::Deferred {
                reply: "451 later".into(),
                next_attempt_ms: T0 + HOUR,
            }
        } else {
            Outcome::Delivered {
                reply: "250 ok".into(),
            }
        };
        let outcomes = (0..2).map(|i| (i, outcome.clone())).collect();
        q.record_outcomes(claim, outcomes).await.unwrap();
    }
    let left: Vec<_> = kept.iter().step_by(3).cloned().collect();
    let r = q.compact().await.unwrap();
    assert!(r.messages_moved > 0, "{r:?}");
    for (id, content) in &left {
        assert_eq!(&q.content(*id).unwrap(), content);
    }
    assert_eq!(q.len(), left.len());
}

#[tokio::test]
async fn a_tampered_envelope_is_quarantined_at_start_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    // The tampered message alone in its segment, so that keeping its
    // content shows.
    let bad = {
        let (q, _) = open(&config(dir.path(), Some(&keys)));
        enqueue(&q, T0, 1).await.0
    };
    let good = {
        let (q, _) = open(&config(dir.path(), Some(&keys)));
        enqueue(&q, T0 + 1, 2).await.0
    };
    let first_segment = dir.path().join("queue/content/00000001.seg");
    assert!(first_segment.exists());
    tamper_envelope(dir.path(), bad, |v| {
        let last = v.len() - 1;
        v[last] ^= 0x80;
    });
    for _ in 0..2 {
        let (q, report) = open(&config(dir.path(), Some(&keys)));
        assert_eq!(report.messages, 1);
        assert_eq!(report.quarantined.len(), 1, "{report:?}");
        assert_eq!(report.quarantined[0].0, bad);
        assert!(
            report.quarantined[0].1.contains("failed authentication"),
            "{report:?}"
        );
        assert!(matches!(q.get(bad), Err(QueueError::NotFound(_))));
        let due: Vec<QueueId> = q
            .claim_due(T0 + HOUR, 10)
            .unwrap()
            .iter()
            .map(|c| c.record.id)
            .collect();
        assert_eq!(due, vec![good], "the tampered one is never due");
        let quarantined = q.quarantined().unwrap();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].kind, QuarantineKind::Forged);
        // Its content is kept too (an orphan segment would be removed).
        assert!(first_segment.exists());
    }
}

#[tokio::test]
async fn an_envelope_swapped_for_another_messages_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    let (a, b) = {
        let (q, _) = open(&config(dir.path(), Some(&keys)));
        (enqueue(&q, T0, 1).await.0, enqueue(&q, T0 + 1, 2).await.0)
    };
    let mut copied = Vec::new();
    tamper_envelope(dir.path(), a, |v| copied = v.clone());
    tamper_envelope(dir.path(), b, |v| *v = copied);
    let (q, report) = open(&config(dir.path(), Some(&keys)));
    assert_eq!(report.messages, 1);
    assert_eq!(
        report
            .quarantined
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        vec![b]
    );
    assert!(q.get(a).is_ok());
}

#[tokio::test]
async fn tampered_content_is_quarantined_when_read_and_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    let (q, _) = open(&config(dir.path(), Some(&keys)));
    let (id, _) = enqueue(&q, T0, 1).await;
    q.sync().unwrap();
    let messages = |q: &Queue| {
        let s = q.shape().expect("a running queue keeps its shape");
        s.queued.messages + s.deferred.messages + s.held.messages
    };
    assert_eq!(messages(&q), 1);
    let seg = files_under(&dir.path().join("queue/content"))
        .pop()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0x01;
    std::fs::write(&seg, bytes).unwrap();

    let claim = q.claim_due(T0, 10).unwrap().pop().unwrap();
    let err = q.content(id).unwrap_err();
    assert!(matches!(err, QueueError::Quarantined { .. }), "{err}");
    assert!(err.to_string().contains("will not be delivered"), "{err}");
    // The delivery that held the claim finds it gone.
    let after = q
        .record_outcomes(
            claim,
            vec![(
                0,
                Outcome::Deferred {
                    reply: "451".into(),
                    next_attempt_ms: T0 + HOUR,
                },
            )],
        )
        .await
        .unwrap();
    assert_eq!(after, queue::AfterOutcome::Gone);
    let quarantined = q.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].kind, QuarantineKind::Content);
    // Out of the gauges at once, not only after a restart.
    assert_eq!(messages(&q), 0);
    q.sync().unwrap();
    drop(q);
    let (q, report) = open(&config(dir.path(), Some(&keys)));
    assert_eq!((report.messages, report.quarantined.len()), (0, 1));
    assert!(q.claim_due(T0 + 2 * HOUR, 10).unwrap().is_empty());
    assert_eq!(report.orphans_removed, 0, "its content is kept");
}

#[tokio::test]
async fn a_wrong_key_is_refused_at_start_naming_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    {
        let (q, _) = open(&config(dir.path(), Some(&keys)));
        enqueue(&q, T0, 1).await;
    }
    let (wrong_path, wrong) = key_file(dir.path(), "wrong.key");
    let err = try_open(&config(dir.path(), Some(&wrong))).unwrap_err();
    assert!(matches!(err, QueueError::WrongKey { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&wrong_path.display().to_string()), "{text}");
    assert!(text.contains(&keys.current().to_string()), "{text}");
    assert!(text.contains("encryption_key_file"), "{text}");

    // Without any key: refused too, saying it is encrypted.
    let err = try_open(&config(dir.path(), None)).unwrap_err();
    assert!(matches!(err, QueueError::Encrypted { .. }), "{err}");
    // Nothing was changed by the refusals.
    let (_, report) = open(&config(dir.path(), Some(&keys)));
    assert_eq!((report.messages, report.quarantined.len()), (1, 0));
}

#[tokio::test]
async fn an_empty_encrypted_store_takes_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    drop(open(&config(dir.path(), Some(&keys))));
    let (_, other) = key_file(dir.path(), "other.key");
    let (q, _) = open(&config(dir.path(), Some(&other)));
    enqueue(&q, T0, 1).await;
}

#[tokio::test]
async fn the_first_opening_with_keys_seals_what_was_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut kept = Vec::new();
    {
        let (q, _) = open(&config(dir.path(), None));
        for i in 0..3 {
            kept.push(enqueue(&q, T0 + i, i).await);
        }
    }
    let (_, keys) = key_file(dir.path(), "queue.key");
    {
        let (q, report) = open(&config(dir.path(), Some(&keys)));
        assert_eq!((report.messages, report.sealed), (3, 3), "{report:?}");
        for (id, content) in &kept {
            assert_eq!(&q.content(*id).unwrap(), content);
        }
        q.sync().unwrap();
    }
    // The clear segment is gone (sled may keep superseded pages of its
    // own until it reuses them, so only the content is checked here).
    let content_dir = dir.path().join("queue/content");
    for f in files_under(&content_dir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes
                .windows(SECRET_BODY.len())
                .any(|w| w == SECRET_BODY.as_bytes()),
            "{} holds plaintext",
            f.display()
        );
    }
    let (q, report) = open(&config(dir.path(), Some(&keys)));
    assert_eq!((report.messages, report.sealed), (3, 0));
    assert_eq!(q.content(kept[0].0).unwrap(), kept[0].1);
}

#[tokio::test]
async fn a_record_in_clear_in_an_encrypted_store_is_quarantined_until_rekeyed() {
    // Written elsewhere in clear, then put into the encrypted store.
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    let id = {
        let (q, _) = open(&config(dir.path(), Some(&keys)));
        enqueue(&q, T0, 1).await.0
    };
    let clear = {
        let c = tempfile::tempdir().unwrap();
        let (q, _) = open(&config(c.path(), None));
        let m = NewMessage {
            id,
            ..message(&q, T0, 1)
        };
        q.enqueue(m).await.unwrap();
        drop(q);
        let mut v = Vec::new();
        tamper_envelope(c.path(), id, |stored| v = stored.clone());
        v
    };
    tamper_envelope(dir.path(), id, |v| *v = clear);
    {
        let (q, report) = open(&config(dir.path(), Some(&keys)));
        assert_eq!(report.quarantined.len(), 1, "{report:?}");
        assert_eq!(q.quarantined().unwrap()[0].kind, QuarantineKind::Plaintext);
        assert!(report.quarantined[0].1.contains("mta queue rekey"));
    }
    // Its content is not where the clear record says (another store's
    // segment): rekey leaves it in quarantine rather than guess.
    let (q, _) = open(&config(dir.path(), Some(&keys)));
    let r = q.rekey_blocking().unwrap();
    assert_eq!((r.restored, r.quarantined), (0, 1), "{r:?}");
}

/// Reception stores the fields it adds (`head`) apart from the message, so
/// as not to copy it: the store must give back one message, head first, in
/// clear and sealed, before and after reopening, with the size of both.
#[tokio::test]
async fn the_head_is_stored_on_top_of_the_content_in_clear_and_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, keys) = key_file(dir.path(), "queue.key");
    for (name, keys) in [("clear", None), ("sealed", Some(&keys))] {
        let config = config(&dir.path().join(name), keys);
        let (q, _) = open(&config);
        let mut m = message(&q, T0, 1);
        m.head = b"DKIM-Signature: v=1; a=rsa-sha256\r\nReceived: by us\r\n".to_vec();
        let id = m.id;
        let whole = [m.head.clone(), m.content.clone()].concat();
        q.enqueue(m).await.unwrap();
        assert_eq!(q.content(id).unwrap(), whole, "{name}");
        assert_eq!(q.get(id).unwrap().size, whole.len() as u64, "{name}");
        drop(q);
        let (q, report) = open(&config);
        assert_eq!(report.messages, 1, "{name}");
        assert_eq!(q.content(id).unwrap(), whole, "{name} after reopening");
    }
}
