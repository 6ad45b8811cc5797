//! The duplicate window of a topic: which `lockgate-id` values were appended recently, in
//! memory and in the topic's `dedup` file.
//!
//! The file is a log of entries, one per append (written under the topic lock right after the
//! append's frames), each framed like a record (`u32 LE length`, `u32 LE crc32`, body). A body
//! is the end of the log after that append (`u64 LE segment base`, `u64 LE byte position`,
//! `u64 LE next offset`), the append's time (`u64 LE` ms), and the ids it stored (`u32 LE
//! count`, then per id `u64 LE append time in ms`, `u32 LE length`, the id). An append without
//! ids still writes its end, so the file always says where the log ends and a new appender
//! reads only frames written after that. When the file grows past twice what the window holds
//! it is rewritten (compacted) with just the window, atomically (temporary file and rename).

use std::collections::{HashSet, VecDeque};
use std::io::{self, BufReader, Read};
use std::sync::Arc;

use super::frame::{FRAME_HEADER, Fields, read_raw, seal};

/// Where the ids start in an entry body: after the end, the time and the id count.
const IDS_AT: usize = 8 * 4 + 4;
/// Largest entry body accepted when reading; a longer length is treated as corruption.
const MAX_ENTRY: usize = 1 << 30;
/// Ids per entry of a compacted file, so that no entry is huge.
pub(super) const COMPACT_CHUNK: usize = 10_000;
/// The dedup file is not compacted below this size.
pub(super) const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// Bytes an id costs in the file besides itself: time and length.
const ID_OVERHEAD: usize = 12;
/// Lookups answered by scanning the entries loaded from the dedup file before their ids are
/// indexed.
const COLD_LOOKUPS: u32 = 8;

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

/// One entry of the dedup file: the end of the log after an append at `time` and the ids it
/// stored.
pub(super) fn encode_entry<'a>(
    end: End,
    time: u64,
    ids: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_HEADER as usize];
    f.extend_from_slice(&end.base.to_le_bytes());
    f.extend_from_slice(&end.pos.to_le_bytes());
    f.extend_from_slice(&end.count.to_le_bytes());
    f.extend_from_slice(&time.to_le_bytes());
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

/// A valid entry: the end it records, its time, and its ids (time, id) left in its body.
pub(super) struct Entry {
    pub(super) end: End,
    pub(super) time: u64,
    /// Number of ids.
    pub(super) count: usize,
    body: Vec<u8>,
}

impl Entry {
    /// Reads the head of an entry body (which passed its crc); `None` if it is too short.
    fn new(body: Vec<u8>) -> Option<Self> {
        let mut f = Fields(&body);
        let end = End {
            base: f.u64()?,
            pos: f.u64()?,
            count: f.u64()?,
        };
        let time = f.u64()?;
        let count = usize::try_from(f.u32()?).ok()?;
        Some(Entry {
            end,
            time,
            count,
            body,
        })
    }

    /// The id at byte `at` of the body and where the next one starts; `None` past the last
    /// (or at a malformed one).
    fn id_at(&self, at: usize) -> Option<((u64, &[u8]), usize)> {
        let head = self.body.get(at..at + ID_OVERHEAD)?;
        let ts = u64::from_le_bytes(head[..8].try_into().ok()?);
        let len = u32::from_le_bytes(head[8..].try_into().ok()?) as usize;
        let start = at + ID_OVERHEAD;
        let id = self.body.get(start..start + len)?;
        Some(((ts, id), start + len))
    }

    /// The ids from byte `at` of the body on.
    fn ids_from(&self, mut at: usize) -> impl Iterator<Item = (u64, &[u8])> {
        std::iter::from_fn(move || {
            let (id, next) = self.id_at(at)?;
            at = next;
            Some(id)
        })
    }

    /// The ids, as far as they are well formed.
    pub(super) fn ids(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.ids_from(IDS_AT)
    }
}

/// The valid entries from the reader's position and the bytes they took. Stops at the first
/// incomplete or corrupt entry (it may be being written, or be the torn tail of a crash).
pub(super) fn read_entries(r: impl Read) -> io::Result<(Vec<Entry>, u64)> {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let mut entries = Vec::new();
    let mut read = 0;
    while let Some(body) = read_raw(&mut r, IDS_AT, MAX_ENTRY)? {
        let size = FRAME_HEADER + body.len() as u64;
        let Some(entry) = Entry::new(body) else {
            break;
        };
        entries.push(entry);
        read += size;
    }
    Ok((entries, read))
}

/// The ids remembered for deduplication, oldest first, at most a given number.
///
/// Entries loaded from the dedup file are kept as they were read ("cold") and their ids looked
/// up by a scan: a short-lived appender (`lockgate send` of one message) pays for reading the
/// file, not for hashing every id in it. After [`COLD_LOOKUPS`] lookups they are indexed.
#[derive(Default)]
pub(super) struct Window {
    cold: Cold,
    /// Lookups scanned in `cold` so far.
    cold_lookups: u32,
    /// Indexed ids, newer than the cold ones.
    order: VecDeque<(u64, Arc<[u8]>)>,
    ids: HashSet<Arc<[u8]>>,
    /// Sum of the indexed ids' lengths.
    bytes: usize,
}

/// Loaded entries whose ids are not indexed: the last `left` ids of `entries[0]` (from byte
/// `at` of its body), then all of the others'.
#[derive(Default)]
struct Cold {
    entries: VecDeque<Entry>,
    at: usize,
    left: usize,
    /// Ids in the window.
    len: usize,
    /// Their bytes in a compacted file (ids with time and length).
    bytes: usize,
}

impl Cold {
    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let (at, left) = (self.at, self.left);
        self.entries.iter().enumerate().flat_map(move |(i, e)| {
            if i == 0 {
                e.ids_from(at).take(left)
            } else {
                e.ids_from(IDS_AT).take(e.count)
            }
        })
    }

    fn front(&self) -> Option<(u64, &[u8])> {
        if self.left == 0 {
            return None;
        }
        self.entries.front()?.id_at(self.at).map(|(id, _)| id)
    }

    fn push(&mut self, entry: Entry) {
        if entry.count == 0 {
            return;
        }
        if self.entries.is_empty() {
            self.at = IDS_AT;
            self.left = entry.count;
        }
        self.len += entry.count;
        self.bytes += entry.body.len() - IDS_AT;
        self.entries.push_back(entry);
    }

    /// Forgets what is left of the front entry.
    fn drop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.len = self.len.saturating_sub(self.left);
            self.bytes = self
                .bytes
                .saturating_sub(e.body.len().saturating_sub(self.at));
        }
        match self.entries.front() {
            Some(e) => {
                self.at = IDS_AT;
                self.left = e.count;
            }
            None => *self = Cold::default(),
        }
    }

    /// Forgets the oldest id.
    fn pop(&mut self) {
        let Some(e) = self.entries.front() else {
            return;
        };
        match e.id_at(self.at) {
            Some((_, next)) if self.left > 0 => {
                self.bytes -= next - self.at;
                self.at = next;
                self.left -= 1;
                self.len -= 1;
                if self.left == 0 {
                    self.drop_front();
                }
            }
            // A malformed rest (its crc matched, so never written so): forget it.
            _ => self.drop_front(),
        }
    }

    /// Forgets the oldest ids down to `keep`, whole entries at a time where it can.
    fn trim(&mut self, keep: usize) {
        while self.len > keep {
            let whole = self.entries.front().is_some_and(|e| self.left == e.count);
            if whole && self.len - self.left >= keep {
                self.drop_front();
            } else {
                self.pop();
            }
        }
    }
}

impl Window {
    /// Whether `id` is in the window.
    pub(super) fn contains(&mut self, id: &[u8]) -> bool {
        if self.ids.contains(id) {
            return true;
        }
        if self.cold.len == 0 {
            return false;
        }
        if self.cold_lookups >= COLD_LOOKUPS {
            self.index();
            return self.ids.contains(id);
        }
        self.cold_lookups += 1;
        self.cold.iter().any(|(_, c)| c == id)
    }

    pub(super) fn len(&self) -> usize {
        self.cold.len + self.order.len()
    }

    /// Remembers `id`, appended at `ts`; forgets the oldest ids beyond `max`. False if it was
    /// already there.
    pub(super) fn insert(&mut self, ts: u64, id: &[u8], max: usize) -> bool {
        if self.contains(id) {
            return false;
        }
        self.push(ts, id, max);
        true
    }

    /// [`Window::insert`] of an id the caller knows is not in the window.
    pub(super) fn push(&mut self, ts: u64, id: &[u8], max: usize) {
        let id: Arc<[u8]> = Arc::from(id);
        self.bytes += id.len();
        self.ids.insert(Arc::clone(&id));
        self.order.push_back((ts, id));
        self.trim(max);
    }

    /// Takes in an entry read from the dedup file, as its appender did: the window as of the
    /// entry's time, then its ids (which that appender checked against it). Kept cold while
    /// nothing was indexed yet.
    pub(super) fn load(&mut self, entry: Entry, max: usize, window_ms: u64) {
        self.expire(entry.time, window_ms);
        if self.order.is_empty() {
            self.cold.push(entry);
            self.trim(max);
        } else {
            for (ts, id) in entry.ids() {
                self.insert(ts, id, max);
            }
        }
    }

    /// Moves the cold ids into the index (in front of the indexed ones, which are newer).
    fn index(&mut self) {
        let cold = std::mem::take(&mut self.cold);
        let hot = std::mem::take(&mut self.order);
        let mut order = VecDeque::with_capacity(cold.len + hot.len());
        let mut ids = HashSet::with_capacity(cold.len + hot.len());
        let mut bytes = 0;
        let all = cold
            .iter()
            .map(|(ts, id)| (ts, Arc::<[u8]>::from(id)))
            .chain(hot);
        for (ts, id) in all {
            if ids.insert(Arc::clone(&id)) {
                bytes += id.len();
                order.push_back((ts, id));
            }
        }
        self.order = order;
        self.ids = ids;
        self.bytes = bytes;
    }

    /// Forgets the oldest ids beyond `max`.
    pub(super) fn trim(&mut self, max: usize) {
        if self.len() <= max {
            return;
        }
        self.cold.trim(max.saturating_sub(self.order.len()));
        while self.len() > max {
            self.pop();
        }
    }

    /// Forgets ids appended more than `window_ms` before `now`.
    pub(super) fn expire(&mut self, now: u64, window_ms: u64) {
        let old = |ts: u64| ts.saturating_add(window_ms) < now;
        loop {
            let oldest = match self.cold.front() {
                Some((ts, _)) => ts,
                None if self.cold.len > 0 => {
                    self.cold.pop();
                    continue;
                }
                None => match self.order.front() {
                    Some((ts, _)) => *ts,
                    None => return,
                },
            };
            if !old(oldest) {
                return;
            }
            self.pop();
        }
    }

    fn pop(&mut self) {
        if self.cold.len > 0 {
            self.cold.pop();
        } else if let Some((_, id)) = self.order.pop_front() {
            self.bytes -= id.len();
            self.ids.remove(&id);
        }
    }

    /// The ids with their append times, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.cold
            .iter()
            .chain(self.order.iter().map(|(ts, id)| (*ts, &id[..])))
    }

    /// Bytes the window takes in a compacted file.
    pub(super) fn file_bytes(&self) -> u64 {
        (self.cold.bytes + self.bytes + self.order.len() * ID_OVERHEAD) as u64
    }
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

    /// An entry with ids `ids` appended at their number.
    fn entry(ids: std::ops::Range<u8>) -> Entry {
        let ids: Vec<(u64, Vec<u8>)> = ids.map(|i| (u64::from(i), vec![i])).collect();
        let time = ids.last().map_or(0, |(t, _)| *t);
        let frame = encode_entry(
            End::default(),
            time,
            ids.iter()
                .map(|(t, i)| (*t, i.as_slice()))
                .collect::<Vec<_>>()
                .into_iter(),
        );
        let (mut entries, _) = read_entries(&frame[..]).unwrap();
        entries.pop().unwrap()
    }

    #[test]
    fn loaded_ids_are_found_before_and_after_they_are_indexed() {
        let mut w = Window::default();
        for range in [0..3, 3..4, 4..10] {
            w.load(entry(range), 8, 1000);
        }
        // Loaded ids count against the limit like indexed ones: 0 and 1 are gone.
        assert_eq!(w.len(), 8);
        assert_eq!(w.file_bytes(), 8 * (1 + ID_OVERHEAD as u64));
        assert!(w.insert(10, b"new", 9));
        assert_eq!(w.len(), 9);
        let mut found = Vec::new();
        for round in 0..3 {
            for i in 0..10u8 {
                if w.contains(&[i]) {
                    found.push((round, i));
                }
            }
        }
        // The same answers from the scan (first 8 lookups) and from the index after them.
        let want: Vec<(i32, u8)> = (0..3).flat_map(|r| (2..10).map(move |i| (r, i))).collect();
        assert_eq!(found, want);
        assert_eq!(w.cold.len, 0, "indexed after {COLD_LOOKUPS} lookups");
        assert_eq!(
            w.iter().map(|(ts, _)| ts).collect::<Vec<_>>(),
            [2, 3, 4, 5, 6, 7, 8, 9, 10],
            "oldest first"
        );
        // A window of 3 ms at time 8 keeps what was appended at 5 or later.
        w.expire(8, 3);
        assert_eq!(w.len(), 6);
        assert!(!w.contains(&[4]) && w.contains(&[5]));
    }

    #[test]
    fn cold_ids_expire_and_trim_like_indexed_ones() {
        let mut w = Window::default();
        w.load(entry(0..5), 100, 1000);
        w.load(entry(5..10), 100, 1000);
        w.expire(1006, 1000);
        assert_eq!(w.iter().map(|(t, _)| t).collect::<Vec<_>>(), [6, 7, 8, 9]);
        assert_eq!(w.file_bytes(), 4 * (1 + ID_OVERHEAD as u64));
        w.trim(1);
        assert_eq!(w.iter().map(|(t, _)| t).collect::<Vec<_>>(), [9]);
        // Loading at a later time first forgets what is too old by then.
        w.load(entry(10..12), 100, 1);
        assert_eq!(w.iter().map(|(t, _)| t).collect::<Vec<_>>(), [10, 11]);
        assert!(w.contains(&[11]) && !w.contains(&[9]));
    }

    #[test]
    fn entries_round_trip_and_a_torn_one_ends_the_read() {
        let end = End {
            base: 7,
            pos: 99,
            count: 12,
        };
        let ids: Vec<(u64, &[u8])> = vec![(1, b"a"), (2, b""), (3, b"long id")];
        let mut file = encode_entry(end, 5, ids.iter().copied());
        let first = file.len() as u64;
        file.extend(encode_entry(End::default(), 6, std::iter::empty()));
        let whole = file.len() as u64;
        let torn = encode_entry(end, 7, ids.iter().copied());
        file.extend_from_slice(&torn[..torn.len() - 1]);
        let (entries, read) = read_entries(&file[..]).unwrap();
        let seen: Vec<_> = entries
            .iter()
            .map(|e| {
                (
                    e.end,
                    e.time,
                    e.ids().map(|(t, i)| (t, i.to_vec())).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(read, whole);
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].0, seen[0].1), (end, 5));
        assert_eq!(seen[0].2[2], (3, b"long id".to_vec()));
        assert!(seen[1].2.is_empty());
        assert!(first < whole);
    }
}
