//! The duplicate window of a topic: which `lockgate-id` values were appended recently, in
//! memory and in the topic's `dedup` file.
//!
//! The file is a log of entries, one per append (written under the topic lock right after the
//! append's frames), each framed like a record (`u32 LE length`, `u32 LE crc32`, body). A body is
//! the end of the log after that append (`u64 LE segment base`, `u64 LE byte position`,
//! `u64 LE next offset`) and the ids it stored (`u32 LE count`, then per id `u64 LE append time
//! in ms`, `u32 LE length`, the id). An append without ids still writes its end, so the file
//! always says where the log ends and a new appender reads only frames written after that.
//! When the file grows past twice what the window holds it is rewritten (compacted) with just
//! the window, atomically (temporary file and rename).

use std::collections::{HashSet, VecDeque};
use std::io::{self, BufReader, Read};
use std::sync::Arc;

use super::frame::{FRAME_HEADER, Fields, read_raw, seal};

/// Smallest entry body: the end and the id count.
const MIN_ENTRY: usize = 8 * 3 + 4;
/// Largest entry body accepted when reading; a longer length is treated as corruption.
const MAX_ENTRY: usize = 1 << 30;
/// Ids per entry of a compacted file, so that no entry is huge.
pub(super) const COMPACT_CHUNK: usize = 10_000;
/// The dedup file is not compacted below this size.
pub(super) const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// Bytes an id costs in the file besides itself: time and length.
const ID_OVERHEAD: usize = 12;

/// A position in a topic's log: a segment, a byte position in it, and the offset of the record
/// there. The end of the log is the position after its last record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct End {
    /// Base offset of the segment.
    pub(super) base: u64,
    /// Byte position in the segment.
    pub(super) pos: u64,
    /// Offset of the record at `pos` (the next one to append when this is the end).
    pub(super) count: u64,
}

impl End {
    /// Whether `self` is further into the log than `other`. Equal counts compare by segment: a
    /// segment's end and the start of the next one are the same offset.
    pub(super) fn after(&self, other: &End) -> bool {
        (self.count, self.base) > (other.count, other.base)
    }
}

/// The ids remembered for deduplication, oldest first, at most a given number.
#[derive(Default)]
pub(super) struct Window {
    order: VecDeque<(u64, Arc<[u8]>)>,
    ids: HashSet<Arc<[u8]>>,
    /// Sum of the ids' lengths.
    bytes: usize,
}

impl Window {
    pub(super) fn contains(&self, id: &[u8]) -> bool {
        self.ids.contains(id)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// Remembers `id`, appended at `ts`; forgets the oldest ids beyond `max`. False if it was
    /// already there.
    pub(super) fn insert(&mut self, ts: u64, id: &[u8], max: usize) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        let id: Arc<[u8]> = Arc::from(id);
        self.bytes += id.len();
        self.ids.insert(Arc::clone(&id));
        self.order.push_back((ts, id));
        self.trim(max);
        true
    }

    /// Forgets the oldest ids beyond `max`.
    pub(super) fn trim(&mut self, max: usize) {
        while self.order.len() > max {
            self.pop();
        }
    }

    /// Forgets ids appended more than `window_ms` before `now`.
    pub(super) fn expire(&mut self, now: u64, window_ms: u64) {
        while self
            .order
            .front()
            .is_some_and(|(ts, _)| ts.saturating_add(window_ms) < now)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, id)) = self.order.pop_front() {
            self.bytes -= id.len();
            self.ids.remove(&id);
        }
    }

    /// The ids with their append times, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.order.iter().map(|(ts, id)| (*ts, &id[..]))
    }

    /// Bytes the window takes in a compacted file.
    pub(super) fn file_bytes(&self) -> u64 {
        (self.bytes + self.order.len() * ID_OVERHEAD) as u64
    }
}

/// One entry of the dedup file: the end of the log after an append and the ids it stored.
pub(super) fn encode_entry<'a>(
    end: End,
    ids: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_HEADER as usize];
    f.extend_from_slice(&end.base.to_le_bytes());
    f.extend_from_slice(&end.pos.to_le_bytes());
    f.extend_from_slice(&end.count.to_le_bytes());
    let n = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    f.extend_from_slice(&n.to_le_bytes());
    for (ts, id) in ids.take(n as usize) {
        f.extend_from_slice(&ts.to_le_bytes());
        // An id is a header value of a record, itself under 64 MiB.
        f.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_le_bytes());
        f.extend_from_slice(id);
    }
    seal(&mut f);
    f
}

/// A decoded entry: the end and the ids (time, id).
pub(super) struct Entry<'a> {
    pub(super) end: End,
    pub(super) ids: Vec<(u64, &'a [u8])>,
}

fn decode_entry(body: &[u8]) -> Option<Entry<'_>> {
    let mut f = Fields(body);
    let end = End {
        base: f.u64()?,
        pos: f.u64()?,
        count: f.u64()?,
    };
    let n = f.u32()?;
    let mut ids = Vec::with_capacity((n as usize).min(body.len() / ID_OVERHEAD));
    for _ in 0..n {
        let ts = f.u64()?;
        ids.push((ts, f.bytes()?));
    }
    f.0.is_empty().then_some(Entry { end, ids })
}

/// Reads the valid entries from the reader's position, calling `apply` for each, and returns
/// the bytes they took. Stops at the first incomplete or corrupt entry (it may be being written,
/// or be the torn tail of a crash).
pub(super) fn read_entries(r: impl Read, mut apply: impl FnMut(Entry<'_>)) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let mut read = 0;
    while let Some(body) = read_raw(&mut r, MIN_ENTRY, MAX_ENTRY)? {
        let Some(entry) = decode_entry(&body) else {
            break;
        };
        apply(entry);
        read += FRAME_HEADER + body.len() as u64;
    }
    Ok(read)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_window_forgets_the_oldest_beyond_its_count_and_age() {
        let mut w = Window::default();
        for i in 0..5u64 {
            assert!(w.insert(i * 10, &[i as u8], 3));
        }
        assert_eq!(w.len(), 3);
        assert!(!w.contains(&[0]) && !w.contains(&[1]));
        assert!(!w.insert(40, &[4], 3), "already there");
        // Ids at 20, 30, 40; a window of 15 ms at time 46 keeps 40 only (30 + 15 < 46).
        w.expire(46, 15);
        assert_eq!(w.iter().collect::<Vec<_>>(), [(40, &[4u8][..])]);
        assert_eq!(w.file_bytes(), 1 + ID_OVERHEAD as u64);
    }

    #[test]
    fn entries_round_trip_and_a_torn_one_ends_the_read() {
        let end = End {
            base: 7,
            pos: 99,
            count: 12,
        };
        let ids: Vec<(u64, &[u8])> = vec![(1, b"a"), (2, b""), (3, b"long id")];
        let mut file = encode_entry(end, ids.iter().copied());
        let first = file.len() as u64;
        file.extend(encode_entry(End::default(), std::iter::empty()));
        let whole = file.len() as u64;
        let torn = encode_entry(end, ids.iter().copied());
        file.extend_from_slice(&torn[..torn.len() - 1]);
        let mut seen = Vec::new();
        let read = read_entries(&file[..], |e| {
            seen.push((
                e.end,
                e.ids
                    .iter()
                    .map(|(t, i)| (*t, i.to_vec()))
                    .collect::<Vec<_>>(),
            ));
        })
        .unwrap();
        assert_eq!(read, whole);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, end);
        assert_eq!(seen[0].1[2], (3, b"long id".to_vec()));
        assert!(seen[1].1.is_empty());
        assert!(first < whole);
    }
}
