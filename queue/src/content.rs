//! Message content in append-only segment files.
//!
//! Why not in sled: sled 0.34 copies whole leaf nodes on every insert (with
//! 10 KB values that is most of its CPU time), and its `flush` only calls
//! `sync_file_range`, while values above a quarter segment go to blob files
//! that are never fsynced at all. Content here is written once with
//! `pwrite`, made durable with `fdatasync` in the group commit, and read
//! back with a CRC check. A segment file is deleted once no live message
//! points into it.
//!
//! Entry layout: `MTAC` magic, queue ID (8 bytes, BE), length (4, BE),
//! CRC-32 of the content (4, BE), then the content. The header lets a
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
const HEADER: u64 = 20;

/// Where a message's content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentRef {
    pub segment: u32,
    /// Offset of the entry header in the segment file.
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl ContentRef {
    /// Bytes the entry occupies in its segment.
    fn span(&self) -> u64 {
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
    live: Mutex<HashMap<u32, u64>>,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> QueueError {
    QueueError::Store(sled::Error::Io(std::io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    )))
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.seg"))
}

fn segment_id(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?.strip_suffix(".seg")?;
    u32::from_str_radix(name, 16).ok()
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

    /// Writes one message's content. Not durable until the next [`sync`](Self::sync).
    pub(crate) fn append(&self, id: QueueId, content: &[u8]) -> Result<ContentRef, QueueError> {
        let len = u32::try_from(content.len()).map_err(|_| {
            QueueError::Store(sled::Error::Unsupported("content over 4 GiB".into()))
        })?;
        let crc = crc32fast::hash(content);
        let (segment, file, offset) = {
            let mut guard = self.current.lock().expect("content lock");
            let cur = guard.as_mut().ok_or_else(|| {
                QueueError::Store(sled::Error::Unsupported(
                    "the queue was opened for reading only".into(),
                ))
            })?;
            if cur.len >= self.segment_bytes {
                self.roll(cur)?;
            }
            let offset = cur.len;
            cur.len += HEADER + len as u64;
            (cur.id, cur.file.clone(), offset)
        };
        let r = ContentRef {
            segment,
            offset,
            len,
            crc,
        };
        let mut header = [0u8; HEADER as usize];
        header[..4].copy_from_slice(MAGIC);
        header[4..12].copy_from_slice(&id.as_u64().to_be_bytes());
        header[12..16].copy_from_slice(&len.to_be_bytes());
        header[16..20].copy_from_slice(&crc.to_be_bytes());
        let path = || segment_path(&self.dir, segment);
        file.write_all_at(&header, offset)
            .and_then(|_| file.write_all_at(content, offset + HEADER))
            .map_err(|e| io(&path(), "writing", e))?;
        // Marked after the write, so a sync that sees the mark covers it.
        self.dirty.lock().expect("dirty lock").insert(segment);
        *self
            .live
            .lock()
            .expect("live lock")
            .entry(segment)
            .or_default() += r.span();
        Ok(r)
    }

    fn roll(&self, cur: &mut Current) -> Result<(), QueueError> {
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
        // The old segment may already hold nothing live; it is deleted when
        // its last message is released, or at the next recovery.
        let _ = old;
        Ok(())
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

    /// Reads an entry back, checking its header and CRC.
    pub(crate) fn read(&self, id: QueueId, r: &ContentRef) -> Result<Vec<u8>, QueueError> {
        let corrupt = |reason: String| QueueError::Corrupt { id, reason };
        let file = self.file(r.segment).map_err(corrupt)?;
        let mut buf = vec![0u8; r.span() as usize];
        file.read_exact_at(&mut buf, r.offset).map_err(|e| {
            corrupt(format!(
                "cannot read {} bytes at {} of segment {:08x}: {e}",
                r.span(),
                r.offset,
                r.segment
            ))
        })?;
        let content = buf.split_off(HEADER as usize);
        if &buf[..4] != MAGIC || buf[4..12] != id.as_u64().to_be_bytes() {
            return Err(corrupt(
                "content entry header does not match the record".into(),
            ));
        }
        if crc32fast::hash(&content) != r.crc {
            return Err(corrupt("content CRC mismatch".into()));
        }
        Ok(content)
    }

    /// The content is no longer needed (its record's removal is durable).
    pub(crate) fn release(&self, r: &ContentRef) {
        let empty = {
            let mut live = self.live.lock().expect("live lock");
            match live.get_mut(&r.segment) {
                Some(n) => {
                    *n = n.saturating_sub(r.span());
                    *n == 0
                }
                None => true,
            }
        };
        if empty {
            self.maybe_delete(r.segment);
        }
    }

    fn is_current(&self, seg: u32) -> bool {
        self.current
            .lock()
            .map(|c| c.as_ref().is_some_and(|c| c.id == seg))
            .unwrap_or(true)
    }

    fn maybe_delete(&self, seg: u32) {
        if self.is_current(seg) {
            return;
        }
        {
            let mut live = self.live.lock().expect("live lock");
            if live.get(&seg).is_some_and(|&n| n > 0) {
                return;
            }
            live.remove(&seg);
        }
        self.files.lock().expect("files lock").remove(&seg);
        self.dirty.lock().expect("dirty lock").remove(&seg);
        let path = segment_path(&self.dir, seg);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a content segment");
        }
    }

    /// At recovery: registers the content a live record points to, or says
    /// why it cannot be there.
    pub(crate) fn adopt(&self, r: &ContentRef) -> Result<(), String> {
        let file = self.file(r.segment)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if r.offset + r.span() > size {
            return Err(format!(
                "content segment {:08x} ends at {size}, before the entry at {}",
                r.segment, r.offset
            ));
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
            if !self.is_current(seg) && !live.contains(&seg) {
                self.maybe_delete(seg);
                removed += 1;
            }
        }
        removed
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
