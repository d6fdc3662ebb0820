//! Message content in append-only segment files.
//!
//! Why not in sled: sled 0.34 copies whole leaf nodes on every insert (with
//! 10 KB values that is most of its CPU time), and its `flush` only calls
//! `sync_file_range`, while values above a quarter segment go to blob files
//! that are never fsynced at all. Content here is written once with
//! `pwrite`, made durable with `fdatasync` in the group commit, and read
//! back with a CRC check. A segment file is deleted once no live message
//! points into it; a closed segment that is mostly dead is compacted (its
//! live entries are copied to the current segment and the records repointed,
//! see `Queue::compact`), so that a few long-deferred messages do not keep
//! whole segments on disk.
//!
//! Entry layout: magic (`MTAC` for content in clear, `MTAE` for content
//! sealed by `codec.rs`), queue ID (8 bytes, BE), length (4, BE), CRC-32 of
//! the stored bytes (4, BE), then the stored bytes. The log itself never
//! sees a key: compaction copies sealed bytes as they are. The header lets a
//! damaged segment be salvaged by scanning; the queue itself reads entries
//! through the [`ContentRef`] kept in each message record.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::QueueError;
use crate::id::QueueId;

const MAGIC: &[u8; 4] = b"MTAC";
const MAGIC_SEALED: &[u8; 4] = b"MTAE";
const HEADER: u64 = 20;

/// Where a message's content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentRef {
    pub segment: u32,
    /// Offset of the entry header in the segment file.
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl ContentRef {
    /// Bytes the entry occupies in its segment.
    pub(crate) fn span(&self) -> u64 {
        HEADER + self.len as u64
    }
}

struct Current {
    id: u32,
    file: Arc<File>,
    len: u64,
}

/// The segment files of one queue.
pub(crate) struct ContentLog {
    dir: PathBuf,
    segment_bytes: u64,
    /// The segment being appended to; none when opened for reading only.
    current: Mutex<Option<Current>>,
    /// Files by segment, for reading and syncing.
    files: Mutex<HashMap<u32, Arc<File>>>,
    /// Segments written since the last sync.
    dirty: Mutex<HashSet<u32>>,
    /// Live bytes per segment; a segment at zero (and not current) is deleted.
    /// Every entry is counted once, from its append (or its adoption at
    /// recovery) to its one release, so the count never goes below the
    /// bytes still referenced.
    live: Mutex<HashMap<u32, u64>>,
    /// Entries that live records point to but that recovery could not adopt
    /// (their segment is missing or too short). They were never counted, so
    /// releasing them must not subtract anything: their segment number may
    /// even be reused by a later segment.
    unadopted: Mutex<HashSet<ContentRef>>,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> QueueError {
    QueueError::Store(sled::Error::Io(std::io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    )))
}

fn read_only() -> QueueError {
    QueueError::Store(sled::Error::Unsupported(
        "the queue was opened for reading only".into(),
    ))
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.seg"))
}

fn segment_id(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?.strip_suffix(".seg")?;
    u32::from_str_radix(name, 16).ok()
}

/// The most [`ContentLog::read_entry_split`] sets apart.
pub(crate) const MAX_SPLIT: usize = 32;

/// An entry read back by [`ContentLog::read_entry_split`].
pub(crate) struct Entry<const N: usize> {
    pub(crate) sealed: bool,
    /// A sealed entry's first `N` bytes; `None` when the entry is in clear
    /// or shorter (then `rest` is all of it).
    pub(crate) prefix: Option<[u8; N]>,
    pub(crate) rest: Vec<u8>,
}

/// Makes a new directory entry durable.
fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "syncing directory", e))
}

impl ContentLog {
    /// Opens the directory and, if `writable`, starts a fresh segment (an
    /// old one's tail may be torn; old segments are only ever read).
    pub(crate) fn open(
        dir: &Path,
        segment_bytes: u64,
        writable: bool,
    ) -> Result<ContentLog, QueueError> {
        if writable {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, "creating", e))?;
        }
        let mut files = HashMap::new();
        let mut last = 0u32;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e.collect::<Vec<_>>(),
            Err(e) if !writable && e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(dir, "reading", e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| io(dir, "reading", e))?.path();
            let Some(id) = segment_id(&path) else {
                continue;
            };
            let file = File::open(&path).map_err(|e| io(&path, "opening", e))?;
            files.insert(id, Arc::new(file));
            last = last.max(id);
        }
        let current = if writable {
            let id = last + 1;
            let file = Self::create(dir, id)?;
            files.insert(id, file.clone());
            sync_dir(dir)?;
            Some(Current { id, file, len: 0 })
        } else {
            None
        };
        Ok(ContentLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            current: Mutex::new(current),
            files: Mutex::new(files),
            dirty: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            unadopted: Mutex::new(HashSet::new()),
        })
    }

    fn create(dir: &Path, id: u32) -> Result<Arc<File>, QueueError> {
        let path = segment_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io(&path, "creating", e))?;
        Ok(Arc::new(file))
    }

    /// Writes one message's content in clear (tests).
    #[cfg(test)]
    pub(crate) fn append(&self, id: QueueId, content: &[u8]) -> Result<ContentRef, QueueError> {
        self.append_entry(id, false, &[content])
    }

    /// Writes one entry, `sealed` or in clear, whose bytes are the parts
    /// of `content` one after the other. Not durable until the next
    /// [`sync`](Self::sync).
    pub(crate) fn append_entry(
        &self,
        id: QueueId,
        sealed: bool,
        content: &[&[u8]],
    ) -> Result<ContentRef, QueueError> {
        let len = u32::try_from(content.iter().map(|p| p.len()).sum::<usize>()).map_err(|_| {
            QueueError::Store(sled::Error::Unsupported("content over 4 GiB".into()))
        })?;
        let mut hasher = crc32fast::Hasher::new();
        for part in content {
            hasher.update(part);
        }
        let crc = hasher.finalize();
        let (r, file, rolled) = {
            let mut guard = self.current.lock().expect("content lock");
            let cur = guard.as_mut().ok_or_else(read_only)?;
            let rolled = if cur.len >= self.segment_bytes {
                Some(self.roll(cur)?)
            } else {
                None
            };
            let r = ContentRef {
                segment: cur.id,
                offset: cur.len,
                len,
                crc,
            };
            cur.len += r.span();
            // Counted live before the segment can stop being current, so a
            // release elsewhere in it never sees zero while this write runs.
            *self
                .live
                .lock()
                .expect("live lock")
                .entry(r.segment)
                .or_default() += r.span();
            (r, cur.file.clone(), rolled)
        };
        if let Some(old) = rolled {
            // A closed segment with nothing live goes now, not at the
            // next start.
            self.maybe_delete(old);
        }
        let (segment, offset) = (r.segment, r.offset);
        let mut header = [0u8; HEADER as usize];
        header[..4].copy_from_slice(if sealed { MAGIC_SEALED } else { MAGIC });
        header[4..12].copy_from_slice(&id.as_u64().to_be_bytes());
        header[12..16].copy_from_slice(&len.to_be_bytes());
        header[16..20].copy_from_slice(&crc.to_be_bytes());
        let path = || segment_path(&self.dir, segment);
        let write = || {
            file.write_all_at(&header, offset)?;
            let mut at = offset + HEADER;
            for part in content {
                file.write_all_at(part, at)?;
                at += part.len() as u64;
            }
            Ok::<_, std::io::Error>(())
        };
        if let Err(e) = write() {
            self.release(&r);
            return Err(io(&path(), "writing", e));
        }
        // Marked after the write, so a sync that sees the mark covers it.
        self.dirty.lock().expect("dirty lock").insert(segment);
        Ok(r)
    }

    /// Closes the current segment and starts the next; returns the closed one.
    fn roll(&self, cur: &mut Current) -> Result<u32, QueueError> {
        let next = cur.id + 1;
        let file = Self::create(&self.dir, next)?;
        // The new file's name must be durable before any message in it is.
        sync_dir(&self.dir)?;
        self.files
            .lock()
            .expect("files lock")
            .insert(next, file.clone());
        let old = std::mem::replace(
            cur,
            Current {
                id: next,
                file,
                len: 0,
            },
        );
        Ok(old.id)
    }

    /// Makes every write completed so far durable (fdatasync of each
    /// segment written since the last sync).
    pub(crate) fn sync(&self) -> Result<(), QueueError> {
        let dirty: Vec<u32> = self.dirty.lock().expect("dirty lock").drain().collect();
        for seg in dirty {
            // A segment deleted since its write has nothing left to sync.
            if let Ok(f) = self.file(seg) {
                f.sync_data()
                    .map_err(|e| io(&segment_path(&self.dir, seg), "syncing", e))?;
            }
        }
        Ok(())
    }

    fn file(&self, segment: u32) -> Result<Arc<File>, String> {
        self.files
            .lock()
            .expect("files lock")
            .get(&segment)
            .cloned()
            .ok_or_else(|| format!("content segment {segment:08x} is missing"))
    }

    /// Reads an entry in clear back (tests).
    #[cfg(test)]
    pub(crate) fn read(&self, id: QueueId, r: &ContentRef) -> Result<Vec<u8>, QueueError> {
        match self.read_entry(id, r)? {
            (false, content) => Ok(content),
            (true, _) => Err(QueueError::Corrupt {
                id,
                reason: "sealed".into(),
            }),
        }
    }

    /// Reads an entry back, checking its header and CRC. Returns whether
    /// it is sealed, and its bytes.
    pub(crate) fn read_entry(
        &self,
        id: QueueId,
        r: &ContentRef,
    ) -> Result<(bool, Vec<u8>), QueueError> {
        let entry = self.read_entry_split::<0>(id, r)?;
        Ok((entry.sealed, entry.rest))
    }

    /// [`read_entry`](Self::read_entry), with a sealed entry's first `N`
    /// bytes (at most [`MAX_SPLIT`]) apart from the rest: a caller that
    /// takes a fixed-size prefix off then need not move the rest.
    pub(crate) fn read_entry_split<const N: usize>(
        &self,
        id: QueueId,
        r: &ContentRef,
    ) -> Result<Entry<N>, QueueError> {
        const { assert!(N <= MAX_SPLIT) };
        let corrupt = |reason: String| QueueError::Corrupt { id, reason };
        let file = self.file(r.segment).map_err(corrupt)?;
        let cannot_read = |e: std::io::Error| {
            corrupt(format!(
                "cannot read {} bytes at {} of segment {:08x}: {e}",
                r.span(),
                r.offset,
                r.segment
            ))
        };
        // The header (with the first N bytes) and the content into buffers
        // of their own: one buffer for both would mean copying the content
        // out of it.
        let len = (r.span() - HEADER) as usize;
        let h = HEADER as usize;
        let first = N.min(len);
        let mut buf = [0u8; HEADER as usize + MAX_SPLIT];
        file.read_exact_at(&mut buf[..h + first], r.offset)
            .map_err(cannot_read)?;
        let sealed = &buf[..4] == MAGIC_SEALED;
        if (!sealed && &buf[..4] != MAGIC) || buf[4..12] != id.as_u64().to_be_bytes() {
            return Err(corrupt(
                "content entry header does not match the record".into(),
            ));
        }
        let apart = sealed && first == N;
        let mut rest = vec![0u8; if apart { len - N } else { len }];
        let read_from = if apart {
            0
        } else {
            rest[..first].copy_from_slice(&buf[h..h + first]);
            first
        };
        file.read_exact_at(&mut rest[read_from..], r.offset + HEADER + first as u64)
            .map_err(cannot_read)?;
        let mut crc = crc32fast::Hasher::new();
        if apart {
            crc.update(&buf[h..h + N]);
        }
        crc.update(&rest);
        if crc.finalize() != r.crc {
            return Err(corrupt("content CRC mismatch".into()));
        }
        let prefix = apart.then(|| buf[h..h + N].try_into().expect("N bytes"));
        Ok(Entry {
            sealed,
            prefix,
            rest,
        })
    }

    /// The content is no longer needed (no durable record points to it any
    /// more). Each entry is released exactly once. Returns whether its
    /// segment file was deleted as a result.
    pub(crate) fn release(&self, r: &ContentRef) -> bool {
        // A read-only log counted nothing and deletes nothing.
        if !self.is_writable() {
            return false;
        }
        if self.unadopted.lock().expect("unadopted lock").remove(r) {
            return false;
        }
        let (empty, miscounted) = {
            let mut live = self.live.lock().expect("live lock");
            match live.get_mut(&r.segment) {
                Some(n) => {
                    let miscounted = *n < r.span();
                    *n = n.saturating_sub(r.span());
                    (*n == 0, miscounted)
                }
                None => (true, true),
            }
        };
        if miscounted {
            tracing::error!(
                segment = r.segment,
                offset = r.offset,
                "content released that was not counted live"
            );
            debug_assert!(false, "content released that was not counted live: {r:?}");
        }
        empty && self.maybe_delete(r.segment)
    }

    fn is_current(&self, seg: u32) -> bool {
        self.current
            .lock()
            .map(|c| c.as_ref().is_some_and(|c| c.id == seg))
            .unwrap_or(true)
    }

    /// Whether the log was opened for writing (only then is anything
    /// deleted: a read-only log never counted what is live).
    pub(crate) fn is_writable(&self) -> bool {
        self.current.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Deletes a segment that is not current and holds nothing live.
    /// Returns whether it did.
    fn maybe_delete(&self, seg: u32) -> bool {
        if !self.is_writable() || self.is_current(seg) {
            return false;
        }
        {
            let mut live = self.live.lock().expect("live lock");
            if live.get(&seg).is_some_and(|&n| n > 0) {
                return false;
            }
            live.remove(&seg);
        }
        if self
            .files
            .lock()
            .expect("files lock")
            .remove(&seg)
            .is_none()
        {
            return false;
        }
        self.dirty.lock().expect("dirty lock").remove(&seg);
        let path = segment_path(&self.dir, seg);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a content segment");
        }
        true
    }

    /// At recovery: registers the content a live record points to, or says
    /// why it cannot be there.
    /// Orphan entries (a crash between writing content and its record, or
    /// a compaction copy whose record was never repointed) are never
    /// adopted, so they count as garbage.
    pub(crate) fn adopt(&self, r: &ContentRef) -> Result<(), String> {
        let checked = self.file(r.segment).and_then(|file| {
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            if r.offset + r.span() > size {
                return Err(format!(
                    "content segment {:08x} ends at {size}, before the entry at {}",
                    r.segment, r.offset
                ));
            }
            Ok(())
        });
        if let Err(reason) = checked {
            self.unadopted.lock().expect("unadopted lock").insert(*r);
            return Err(reason);
        }
        *self
            .live
            .lock()
            .expect("live lock")
            .entry(r.segment)
            .or_default() += r.span();
        Ok(())
    }

    /// At recovery, after every record was adopted: removes segments that
    /// hold nothing live. Returns how many were removed.
    pub(crate) fn remove_unreferenced(&self) -> usize {
        let segments: Vec<u32> = self
            .files
            .lock()
            .expect("files lock")
            .keys()
            .copied()
            .collect();
        let live: HashSet<u32> = self
            .live
            .lock()
            .expect("live lock")
            .keys()
            .copied()
            .collect();
        let mut removed = 0;
        for seg in segments {
            if !self.is_current(seg) && !live.contains(&seg) && self.maybe_delete(seg) {
                removed += 1;
            }
        }
        removed
    }

    /// The size at which a segment is closed.
    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Whether recovery could not adopt this entry (its record is corrupt).
    pub(crate) fn is_unadopted(&self, r: &ContentRef) -> bool {
        self.unadopted.lock().expect("unadopted lock").contains(r)
    }

    /// For compaction: deletes closed segments that hold nothing live, and
    /// returns the closed segments whose live bytes are under `below` times
    /// their size, with the number of segments deleted.
    pub(crate) fn compaction_candidates(&self, below: f64) -> (Vec<u32>, usize) {
        let mut segments: Vec<(u32, Arc<File>)> = self
            .files
            .lock()
            .expect("files lock")
            .iter()
            .map(|(&id, f)| (id, f.clone()))
            .collect();
        segments.sort_by_key(|&(id, _)| id);
        let (mut candidates, mut removed) = (Vec::new(), 0);
        for (seg, file) in segments {
            if !self.is_writable() || self.is_current(seg) {
                continue;
            }
            let live = self
                .live
                .lock()
                .expect("live lock")
                .get(&seg)
                .copied()
                .unwrap_or(0);
            if live == 0 {
                if self.maybe_delete(seg) {
                    removed += 1;
                }
                continue;
            }
            let Ok(size) = file.metadata().map(|m| m.len()) else {
                continue;
            };
            if (live as f64) < below * size as f64 {
                candidates.push(seg);
            }
        }
        (candidates, removed)
    }

    /// Live bytes of all segments, as counted.
    #[cfg(test)]
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live.lock().expect("live lock").values().sum()
    }

    /// Bytes of all segment files.
    pub(crate) fn size_on_disk(&self) -> u64 {
        self.files
            .lock()
            .expect("files lock")
            .values()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Number of segment files.
    #[cfg(test)]
    pub(crate) fn segments(&self) -> usize {
        self.files.lock().expect("files lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> QueueId {
        QueueId::from_u64(n)
    }

    #[test]
    fn append_read_and_crc() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
        let a = log.append(id(1), b"hello").unwrap();
        let b = log.append(id(2), b"world!").unwrap();
        log.sync().unwrap();
        assert_eq!(log.read(id(1), &a).unwrap(), b"hello");
        assert_eq!(log.read(id(2), &b).unwrap(), b"world!");
        assert!(log.read(id(2), &a).is_err(), "entry of another message");
        let mut bad = b;
        bad.crc ^= 1;
        assert!(
            log.read(id(2), &bad)
                .unwrap_err()
                .to_string()
                .contains("CRC")
        );
    }

    /// Entries written in parts read back whole; read with a prefix
    /// apart, a sealed entry at least that long splits there and anything
    /// else comes back whole; a flipped byte in either piece is caught.
    #[test]
    fn entries_in_parts_and_read_with_a_prefix_apart() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
        let whole = b"0123456789abcdefghij".to_vec();
        for len in [0, 3, 4, 5, 20] {
            let bytes = &whole[..len];
            for sealed in [false, true] {
                let (a, b) = bytes.split_at(len / 2);
                let r = log.append_entry(id(1), sealed, &[a, b, b""]).unwrap();
                assert_eq!(log.read_entry(id(1), &r).unwrap(), (sealed, bytes.to_vec()));
                let e = log.read_entry_split::<4>(id(1), &r).unwrap();
                assert_eq!(e.sealed, sealed);
                if sealed && len >= 4 {
                    assert_eq!(e.prefix.unwrap(), bytes[..4], "len {len}");
                    assert_eq!(e.rest, bytes[4..], "len {len}");
                } else {
                    assert_eq!((e.prefix, e.rest.as_slice()), (None, bytes), "len {len}");
                }
                if len >= 4 {
                    let path = segment_path(dir.path(), r.segment);
                    for at in [1, len as u64 - 1] {
                        let mut disk = std::fs::read(&path).unwrap();
                        disk[(r.offset + HEADER + at) as usize] ^= 1;
                        std::fs::write(&path, &disk).unwrap();
                        let e = log.read_entry_split::<4>(id(1), &r).err().unwrap();
                        assert!(e.to_string().contains("CRC"), "{e}");
                        disk[(r.offset + HEADER + at) as usize] ^= 1;
                        std::fs::write(&path, &disk).unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn a_flipped_byte_on_disk_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
        let r = log.append(id(7), b"important content").unwrap();
        log.sync().unwrap();
        let path = segment_path(dir.path(), r.segment);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(r.offset + HEADER + 3) as usize] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
        let e = log.read(id(7), &r).unwrap_err();
        assert!(matches!(e, QueueError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn segments_roll_and_are_deleted_when_nothing_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContentLog::open(dir.path(), 100, true).unwrap();
        let a = log.append(id(1), &[b'a'; 90]).unwrap();
        let b = log.append(id(2), &[b'b'; 90]).unwrap(); // rolls: the first is full
        assert_ne!(a.segment, b.segment);
        assert_eq!(log.segments(), 2);
        log.release(&a);
        assert_eq!(
            log.segments(),
            1,
            "the first segment is empty and not current"
        );
        assert!(!segment_path(dir.path(), a.segment).exists());
        log.release(&b);
        assert_eq!(log.segments(), 1, "the current segment stays");
        assert_eq!(log.read(id(2), &b).unwrap(), vec![b'b'; 90]);
    }

    #[test]
    fn reopening_starts_a_new_segment_and_recovery_keeps_only_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
            let a = log.append(id(1), b"kept").unwrap();
            let b = log.append(id(2), b"dropped").unwrap();
            log.sync().unwrap();
            (a, b)
        };
        let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
        let c = log.append(id(3), b"new").unwrap();
        assert_ne!(c.segment, a.segment);
        log.adopt(&a).unwrap();
        assert_eq!(
            log.remove_unreferenced(),
            0,
            "the old segment is still live"
        );
        assert_eq!(log.read(id(1), &a).unwrap(), b"kept");
        let _ = b;
        let mut beyond = a;
        beyond.offset = 1 << 30;
        assert!(log.adopt(&beyond).unwrap_err().contains("ends at"));
        let mut missing = a;
        missing.segment = 999;
        assert!(log.adopt(&missing).unwrap_err().contains("missing"));
    }

    #[test]
    fn read_only_opening_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = {
            let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
            let r = log.append(id(1), b"x").unwrap();
            log.sync().unwrap();
            r
        };
        let before = std::fs::read_dir(dir.path()).unwrap().count();
        let log = ContentLog::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before);
        assert_eq!(log.read(id(1), &r).unwrap(), b"x");
        assert!(log.append(id(2), b"y").is_err());
        assert!(ContentLog::open(&dir.path().join("none"), 1, false).is_ok());
    }

    #[test]
    fn a_closed_segment_with_nothing_live_goes_when_the_next_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let log = ContentLog::open(dir.path(), 100, true).unwrap();
        let a = log.append(id(1), &[b'a'; 90]).unwrap();
        assert!(!log.release(&a), "the current segment stays");
        let b = log.append(id(2), &[b'b'; 90]).unwrap(); // rolls
        assert_ne!(a.segment, b.segment);
        assert_eq!(log.segments(), 1);
        assert!(!segment_path(dir.path(), a.segment).exists());
        assert_eq!(log.live_bytes(), b.span());
    }

    #[test]
    fn releasing_what_recovery_could_not_adopt_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
            log.append(id(1), b"kept").unwrap();
            log.sync().unwrap();
        }
        let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
        // A record whose segment was lost, numbered like the new current one.
        let current = log.current.lock().unwrap().as_ref().unwrap().id;
        let ghost = ContentRef {
            segment: current,
            offset: 0,
            len: 10,
            crc: 0,
        };
        assert!(log.adopt(&ghost).is_err());
        let c = log.append(id(3), b"new").unwrap();
        assert!(log.is_unadopted(&ghost));
        assert!(!log.release(&ghost));
        assert_eq!(log.live_bytes(), c.span(), "the new entry is still counted");
        assert!(!log.is_unadopted(&ghost));
    }

    #[test]
    fn a_read_only_log_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = {
            let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
            let r = log.append(id(1), b"x").unwrap();
            log.sync().unwrap();
            r
        };
        let log = ContentLog::open(dir.path(), 1 << 20, false).unwrap();
        assert!(!log.release(&r));
        assert_eq!(log.compaction_candidates(1.0), (Vec::new(), 0));
        assert_eq!(log.remove_unreferenced(), 0);
        assert!(segment_path(dir.path(), r.segment).exists());
    }

    #[test]
    fn unreferenced_segments_are_removed_at_recovery() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
            log.append(id(1), b"orphan").unwrap();
            log.sync().unwrap();
        }
        let log = ContentLog::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(log.segments(), 2);
        assert_eq!(log.remove_unreferenced(), 1);
        assert_eq!(log.segments(), 1);
    }
}
