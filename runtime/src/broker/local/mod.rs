//! The embedded development broker: durable, append-only topics in a directory, committed
//! positions per consumer group, usable by several processes at once (`lockgate send` appends
//! while `lockgate run` consumes).
//!
//! Not a distributed broker: one partition per topic, no retention, no replication.
//!
//! # On disk
//!
//! ```text
//! <dir>/topics/<topic>/log            frames, append-only
//! <dir>/topics/<topic>/lock           advisory lock taken by appenders (never by readers)
//! <dir>/topics/<topic>/groups/<group> {"offset":N,"position":P} (JSON, replaced by rename)
//! ```
//!
//! A frame is `u32 LE body length`, `u32 LE crc32(body)`, then the body: `u64 LE timestamp_ms`,
//! `u8` key flag (0 = none, 1 = `u32 LE length` + key), `u32 LE header count`, per header
//! `u32 LE length` + UTF-8 name and `u32 LE length` + value, then `u32 LE length` + payload.
//! The offset of a record is its index in the log; a group file stores the committed offset
//! together with the byte position of that record, so a consumer resumes without a scan.
//!
//! # Concurrency and crashes
//!
//! Appenders (in any process) take an exclusive `File::lock` on `lock`, read the frames other
//! processes appended since they last looked (to learn the record count and the
//! [`LOCKGATE_ID_HEADER`] values present, for deduplication), truncate a torn frame left at the
//! tail by a crash, then write their frames with one `write(2)`. Readers never lock: they stop at
//! the first incomplete or corrupt frame (it may be being written) and retry from there.
//!
//! A write is durable against a process crash once `append` returns. Without
//! [`LocalBroker::with_fsync`] a power loss may lose the last writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::{
    Ack, AckHandle, AckKind, BoxFuture, BrokerError, Delivery, LOCKGATE_ID_HEADER, OutRecord,
    Record, Scan, Sink, Source,
};
use crate::pipeline::ack::OffsetTracker;

/// Bytes before a frame's body: length and crc.
const FRAME_HEADER: u64 = 8;
/// Largest body accepted; a longer length field is treated as corruption.
const MAX_BODY: usize = 64 << 20;
/// Smallest valid body: timestamp, key flag, header count, payload length.
const MIN_BODY: usize = 8 + 1 + 4 + 4;
/// One byte position is remembered every this many records, so `read` does not scan from 0.
const INDEX_EVERY: u64 = 256;
/// How often a source at the end of its topic looks for records appended by other processes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Least time between two background commits of a source.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// The file-backed broker. Cheap to clone: clones share in-process state (append bookkeeping and
/// wakeups of sources).
#[derive(Clone)]
pub struct LocalBroker {
    inner: Arc<Inner>,
    fsync: bool,
}

struct Inner {
    dir: PathBuf,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

/// Per-topic in-process state.
struct Topic {
    name: String,
    dir: PathBuf,
    append: Mutex<AppendState>,
    /// Woken after every in-process append to this topic.
    appended: Notify,
}

/// What this process knows of a topic's log, up to byte `scanned`.
#[derive(Default)]
struct AppendState {
    lock: Option<Arc<File>>,
    log: Option<Arc<File>>,
    /// Byte position up to which the log was read: the end of the last valid frame seen.
    scanned: u64,
    /// Records in the log up to `scanned`.
    count: u64,
    /// `lockgate-id` values present up to `scanned`.
    ids: HashSet<Vec<u8>>,
    /// `index[k]` is the byte position of record `k * INDEX_EVERY`.
    index: Vec<u64>,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBroker")
            .field("dir", &self.inner.dir)
            .field("fsync", &self.fsync)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, path: &Path, e: &io::Error) -> BrokerError {
    BrokerError::Unavailable(format!("{what} {}: {e}", path.display()))
}

/// Checks a topic or group name: 1-249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
fn validate_name(kind: &str, name: &str) -> Result<(), BrokerError> {
    let ok = (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1-249 characters of A-Z a-z 0-9 . _ - (not \".\" or \"..\")"
        )))
    }
}

impl LocalBroker {
    /// Opens (creating) the broker rooted at `dir` (the caller passes `<state_dir>/local`).
    pub fn open(dir: &Path) -> Result<Self, BrokerError> {
        let topics = dir.join("topics");
        fs::create_dir_all(&topics).map_err(|e| unavailable("cannot create", &topics, &e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                topics: Mutex::new(HashMap::new()),
            }),
            fsync: false,
        })
    }

    /// Whether appends and commits are flushed to stable storage (`fsync`) before returning.
    /// Off by default: without it a process crash loses nothing that `append` returned, but a
    /// power loss or OS crash may lose the last writes.
    #[must_use]
    pub fn with_fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self
            .inner
            .topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(topics.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Topic {
                name: name.to_owned(),
                dir: self.inner.dir.join("topics").join(name),
                append: Mutex::new(AppendState::default()),
                appended: Notify::new(),
            })
        }))
    }

    /// Appends records (each to its own `topic` field) and returns the offsets assigned, in
    /// order; a record whose `lockgate-id` header is already present in its topic (or earlier
    /// in the same batch) is skipped (`None`).
    ///
    /// Synchronous (blocks on file I/O and on other appenders of the same topic). Durable
    /// against a process crash when it returns; see [`LocalBroker::with_fsync`].
    pub fn append(&self, records: &[OutRecord]) -> Result<Vec<Option<u64>>, BrokerError> {
        let mut topics: Vec<&str> = Vec::new();
        for r in records {
            validate_name("topic", &r.topic)?;
            if !topics.contains(&r.topic.as_str()) {
                topics.push(&r.topic);
            }
        }
        let timestamp_ms = crate::state::now_ms();
        let mut frames = Vec::with_capacity(records.len());
        for r in records {
            frames.push(encode_frame(timestamp_ms, r)?);
        }
        let mut out = vec![None; records.len()];
        for name in topics {
            let topic = self.topic(name);
            let batch: Vec<Pending<'_>> = records
                .iter()
                .zip(&frames)
                .enumerate()
                .filter(|(_, (r, _))| r.topic == name)
                .map(|(i, (r, frame))| (i, frame.as_slice(), lockgate_id(&r.headers)))
                .collect();
            topic.append_batch(&batch, self.fsync, &mut out)?;
            topic.appended.notify_waiters();
        }
        Ok(out)
    }

    /// Reads up to `max` records of `topic` starting at offset `from` (empty if none / no
    /// topic).
    pub fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Record>, BrokerError> {
        validate_name("topic", topic)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let t = self.topic(topic);
        let (offset, pos) = {
            let mut st = t.append.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(log) = t.log(&mut st, false)? else {
                return Ok(Vec::new());
            };
            t.catch_up(&mut st, &log, false)?;
            let k = usize::try_from(from / INDEX_EVERY)
                .unwrap_or(usize::MAX)
                .min(st.index.len().saturating_sub(1));
            match st.index.get(k) {
                Some(pos) => (k as u64 * INDEX_EVERY, *pos),
                None => (0, 0),
            }
        };
        let mut reader = LogReader::new(topic, t.dir.join("log"), offset, pos);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(record) = reader.next()? else { break };
            if reader.offset > from {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Number of records in `topic` (its end offset).
    pub fn end_offset(&self, topic: &str) -> Result<u64, BrokerError> {
        validate_name("topic", topic)?;
        let t = self.topic(topic);
        let mut st = t.append.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = t.log(&mut st, false)? else {
            return Ok(0);
        };
        t.catch_up(&mut st, &log, false)?;
        Ok(st.count)
    }

    /// The committed position of `group` on `topic` (0 when none).
    pub fn committed(&self, topic: &str, group: &str) -> Result<u64, BrokerError> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let path = self.topic(topic).group_path(group);
        Ok(read_group_file(&path)?.map_or(0, |g| g.offset))
    }

    /// Topic names present.
    pub fn topics(&self) -> Result<Vec<String>, BrokerError> {
        let dir = self.inner.dir.join("topics");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(unavailable("cannot list", &dir, &e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| unavailable("cannot list", &dir, &e))?;
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if let Some(name) = entry.file_name().to_str()
                && is_dir
                && validate_name("topic", name).is_ok()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// A consumer of `topic` for `group`, resuming at the committed position.
    pub fn source(&self, topic: &str, group: &str) -> Result<LocalSource, BrokerError> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let t = self.topic(topic);
        let path = t.group_path(group);
        let start = read_group_file(&path)?.unwrap_or_default();
        let log = t.dir.join("log");
        let len = match fs::metadata(&log) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(unavailable("cannot stat", &log, &e)),
        };
        if start.position > len {
            return Err(BrokerError::Invalid(format!(
                "{} says position {} but {} has {len} bytes; the log was replaced (delete the group file to start over)",
                path.display(),
                start.position,
                log.display()
            )));
        }
        let committer = Arc::new(Committer {
            progress: Mutex::new(Progress {
                tracker: OffsetTracker::new(start.offset),
                positions: BTreeMap::from([(start.offset, start.position)]),
            }),
            written: tokio::sync::Mutex::new(start.offset),
            acked: Notify::new(),
            path,
            fsync: self.fsync,
        });
        Ok(LocalSource {
            reader: LogReader::new(topic, log, start.offset, start.position),
            topic: t,
            group: group.to_owned(),
            committer,
            task: None,
            poll: POLL_INTERVAL,
        })
    }

    /// A [`Scan`] of `topic` from offset 0 to its current end.
    pub fn scan(&self, topic: &str) -> Result<LocalScan, BrokerError> {
        Ok(LocalScan {
            broker: self.clone(),
            topic: topic.to_owned(),
            next: 0,
            end: self.end_offset(topic)?,
        })
    }

    /// A producer for any topic (runs [`LocalBroker::append`] on a blocking thread).
    pub fn sink(&self) -> LocalSink {
        LocalSink {
            broker: self.clone(),
        }
    }
}

impl Topic {
    fn group_path(&self, group: &str) -> PathBuf {
        self.dir.join("groups").join(group)
    }

    /// The open log (and lock file), opening them if needed; `None` when the topic does not
    /// exist and `create` is false.
    fn log(&self, st: &mut AppendState, create: bool) -> Result<Option<Arc<File>>, BrokerError> {
        if let Some(log) = &st.log {
            return Ok(Some(Arc::clone(log)));
        }
        if create {
            fs::create_dir_all(&self.dir)
                .map_err(|e| unavailable("cannot create", &self.dir, &e))?;
        }
        let path = self.dir.join("log");
        let log = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => Arc::new(f),
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable("cannot open", &path, &e)),
        };
        st.log = Some(Arc::clone(&log));
        Ok(Some(log))
    }

    fn lock_file(&self, st: &mut AppendState) -> Result<Arc<File>, BrokerError> {
        if let Some(lock) = &st.lock {
            return Ok(Arc::clone(lock));
        }
        let path = self.dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| unavailable("cannot open", &path, &e))?;
        let lock = Arc::new(lock);
        st.lock = Some(Arc::clone(&lock));
        Ok(lock)
    }

    /// Reads the frames appended (by any process) since `st.scanned`. With `truncate` (only
    /// under the topic lock) an invalid tail is cut off: no one else can be writing it.
    fn catch_up(
        &self,
        st: &mut AppendState,
        log: &File,
        truncate: bool,
    ) -> Result<(), BrokerError> {
        let path = self.dir.join("log");
        let len = log
            .metadata()
            .map_err(|e| unavailable("cannot stat", &path, &e))?
            .len();
        if len < st.scanned {
            tracing::warn!(
                topic = %self.name,
                "{} shrank below the position already read; rescanning it",
                path.display()
            );
            *st = AppendState {
                lock: st.lock.take(),
                log: st.log.take(),
                ..AppendState::default()
            };
        }
        let mut r = BufReader::new(log);
        r.seek(SeekFrom::Start(st.scanned))
            .map_err(|e| unavailable("cannot read", &path, &e))?;
        while let Some((body, size)) =
            read_frame(&mut r).map_err(|e| unavailable("cannot read", &path, &e))?
        {
            if st.count.is_multiple_of(INDEX_EVERY)
                && st.index.len() as u64 == st.count / INDEX_EVERY
            {
                st.index.push(st.scanned);
            }
            if let Some(id) = lockgate_id(&body.headers) {
                st.ids.insert(id.to_vec());
            }
            st.count += 1;
            st.scanned += size;
        }
        if truncate && len > st.scanned {
            tracing::warn!(
                topic = %self.name,
                "truncating {} invalid bytes at the end of {} (an append interrupted by a crash)",
                len - st.scanned,
                path.display()
            );
            log.set_len(st.scanned)
                .map_err(|e| unavailable("cannot truncate", &path, &e))?;
        }
        Ok(())
    }

    /// Appends `batch` (original index, encoded frame, lockgate-id) under the topic lock,
    /// writing the assigned offsets into `out`.
    fn append_batch(
        &self,
        batch: &[Pending<'_>],
        fsync: bool,
        out: &mut [Option<u64>],
    ) -> Result<(), BrokerError> {
        let mut st = self.append.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = self.log(&mut st, true)? else {
            return Err(BrokerError::Unavailable(format!(
                "cannot open {}",
                self.dir.join("log").display()
            )));
        };
        let lock = self.lock_file(&mut st)?;
        let lock_path = self.dir.join("lock");
        lock.lock()
            .map_err(|e| unavailable("cannot lock", &lock_path, &e))?;
        let _unlock = Unlock(lock);
        self.catch_up(&mut st, &log, true)?;

        let mut buf = Vec::new();
        let mut new_ids: HashSet<&[u8]> = HashSet::new();
        let mut new_index = Vec::new();
        let (mut count, mut pos) = (st.count, st.scanned);
        let mut assigned = Vec::new();
        for &(i, frame, id) in batch {
            if let Some(id) = id
                && (st.ids.contains(id) || !new_ids.insert(id))
            {
                tracing::debug!(topic = %self.name, "skipping a duplicate lockgate-id");
                continue;
            }
            if count.is_multiple_of(INDEX_EVERY) {
                new_index.push(pos);
            }
            assigned.push((i, count));
            count += 1;
            pos += frame.len() as u64;
            buf.extend_from_slice(frame);
        }
        if !buf.is_empty() {
            let path = self.dir.join("log");
            let mut w: &File = &log;
            w.seek(SeekFrom::Start(st.scanned))
                .and_then(|_| w.write_all(&buf))
                .map_err(|e| unavailable("cannot write", &path, &e))?;
            if fsync {
                log.sync_data()
                    .map_err(|e| unavailable("cannot sync", &path, &e))?;
            }
        }
        st.count = count;
        st.scanned = pos;
        st.ids.extend(new_ids.into_iter().map(<[u8]>::to_vec));
        st.index.extend(new_index);
        for (i, offset) in assigned {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(offset);
            }
        }
        Ok(())
    }
}

/// One record of an append: its index in the caller's batch, its encoded frame, its
/// `lockgate-id`.
type Pending<'a> = (usize, &'a [u8], Option<&'a [u8]>);

/// Releases the advisory lock when dropped (also on error paths).
struct Unlock(Arc<File>);

impl Drop for Unlock {
    fn drop(&mut self) {
        if let Err(e) = self.0.unlock() {
            tracing::warn!("cannot unlock a local topic: {e}");
        }
    }
}

fn lockgate_id(headers: &[(String, Vec<u8>)]) -> Option<&[u8]> {
    headers
        .iter()
        .find(|(n, _)| n == LOCKGATE_ID_HEADER)
        .map(|(_, v)| v.as_slice())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), BrokerError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| BrokerError::Invalid("record field larger than 4 GiB".to_owned()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Header (length, crc) and body of one record.
fn encode_frame(timestamp_ms: u64, r: &OutRecord) -> Result<Vec<u8>, BrokerError> {
    let mut f = vec![0u8; FRAME_HEADER as usize];
    f.extend_from_slice(&timestamp_ms.to_le_bytes());
    match &r.key {
        None => f.push(0),
        Some(key) => {
            f.push(1);
            put_bytes(&mut f, key)?;
        }
    }
    let headers = u32::try_from(r.headers.len())
        .map_err(|_| BrokerError::Invalid("too many headers".to_owned()))?;
    f.extend_from_slice(&headers.to_le_bytes());
    for (name, value) in &r.headers {
        put_bytes(&mut f, name.as_bytes())?;
        put_bytes(&mut f, value)?;
    }
    put_bytes(&mut f, &r.payload)?;
    let body_len = f.len() - FRAME_HEADER as usize;
    if body_len > MAX_BODY {
        return Err(BrokerError::Invalid(format!(
            "record for topic {} is {body_len} bytes encoded; the local broker takes at most {MAX_BODY}",
            r.topic
        )));
    }
    let crc = crc32fast::hash(&f[FRAME_HEADER as usize..]);
    // body_len <= MAX_BODY fits in u32.
    f[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(f)
}

/// A decoded frame body.
struct Body {
    timestamp_ms: u64,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Vec<u8>,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

fn decode_body(body: &[u8]) -> Option<Body> {
    let mut c = Cursor(body);
    let timestamp_ms = c.u64()?;
    let key = match c.u8()? {
        0 => None,
        1 => Some(c.bytes()?.to_vec()),
        _ => return None,
    };
    let n = c.u32()?;
    let mut headers = Vec::new();
    for _ in 0..n {
        let name = std::str::from_utf8(c.bytes()?).ok()?.to_owned();
        headers.push((name, c.bytes()?.to_vec()));
    }
    let payload = c.bytes()?.to_vec();
    c.0.is_empty().then_some(Body {
        timestamp_ms,
        key,
        headers,
        payload,
    })
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The next valid frame and its size in bytes, or `None` at the end of the valid data
/// (end of file, a frame still being written, or a torn or corrupt frame). The caller
/// re-positions the reader after `None`.
fn read_frame(r: &mut impl Read) -> io::Result<Option<(Body, u64)>> {
    let mut header = [0u8; FRAME_HEADER as usize];
    if read_full(r, &mut header)? < header.len() {
        return Ok(None);
    }
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    let Ok(len_usize) = usize::try_from(len) else {
        return Ok(None);
    };
    if !(MIN_BODY..=MAX_BODY).contains(&len_usize) {
        return Ok(None);
    }
    // Grows with the data actually present, so a garbage length does not allocate 64 MiB.
    let mut body = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut body)?;
    if body.len() < len_usize || crc32fast::hash(&body) != crc {
        return Ok(None);
    }
    Ok(decode_body(&body).map(|b| (b, FRAME_HEADER + u64::from(len))))
}

/// A buffered, lock-free reader of one log, positioned by byte offset.
struct LogReader {
    topic: String,
    path: PathBuf,
    file: Option<BufReader<File>>,
    /// Byte position of the next frame.
    pos: u64,
    /// Offset of the next record.
    offset: u64,
}

impl LogReader {
    fn new(topic: &str, path: PathBuf, offset: u64, pos: u64) -> Self {
        Self {
            topic: topic.to_owned(),
            path,
            file: None,
            pos,
            offset,
        }
    }

    /// The next record, or `None` at the current end of the valid data.
    fn next(&mut self) -> Result<Option<Record>, BrokerError> {
        let path = &self.path;
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let mut f = match File::open(path) {
                    Ok(f) => BufReader::new(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(unavailable("cannot open", path, &e)),
                };
                f.seek(SeekFrom::Start(self.pos))
                    .map_err(|e| unavailable("cannot read", path, &e))?;
                self.file.insert(f)
            }
        };
        match read_frame(&mut *file).map_err(|e| unavailable("cannot read", path, &e))? {
            Some((body, size)) => {
                let record = Record {
                    topic: self.topic.clone(),
                    partition: Some(0),
                    offset: Some(self.offset),
                    key: body.key,
                    headers: body.headers,
                    payload: body.payload,
                    timestamp_ms: Some(body.timestamp_ms),
                    reply_to: None,
                };
                self.pos += size;
                self.offset += 1;
                Ok(Some(record))
            }
            None => {
                // Back to the last good position: the tail may be completed later.
                file.seek(SeekFrom::Start(self.pos))
                    .map_err(|e| unavailable("cannot read", path, &e))?;
                Ok(None)
            }
        }
    }
}

/// A group file's content.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
struct GroupPosition {
    /// The committed offset: the next record to consume.
    offset: u64,
    /// Byte position of that record in the log.
    position: u64,
}

fn read_group_file(path: &Path) -> Result<Option<GroupPosition>, BrokerError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable("cannot read", path, &e)),
    };
    serde_json::from_slice(&text).map(Some).map_err(|e| {
        BrokerError::Invalid(format!("{} is not a group position: {e}", path.display()))
    })
}

/// Writes the group file atomically: a temporary file in the same directory, then a rename.
fn write_group_file(path: &Path, pos: GroupPosition, fsync: bool) -> Result<(), BrokerError> {
    static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| unavailable("cannot create", dir, &e))?;
    let name = path
        .file_name()
        .map_or_else(|| "group".to_owned(), |n| n.to_string_lossy().into_owned());
    // `~` never occurs in a valid group name, so a temporary file never shadows a group.
    let tmp = dir.join(format!(
        "{name}~{}-{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let json = serde_json::to_vec(&pos)
        .map_err(|e| BrokerError::Unavailable(format!("cannot encode a group position: {e}")))?;
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| unavailable("cannot create", &tmp, &e))?;
        f.write_all(&json)
            .map_err(|e| unavailable("cannot write", &tmp, &e))?;
        if fsync {
            f.sync_all()
                .map_err(|e| unavailable("cannot sync", &tmp, &e))?;
        }
        fs::rename(&tmp, path).map_err(|e| unavailable("cannot rename to", path, &e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Acked offsets of a source and the byte position of every offset the committed position can
/// take (the start of each delivered record still at or after it, and the end of the last).
struct Progress {
    tracker: OffsetTracker,
    positions: BTreeMap<u64, u64>,
}

/// Shared by a source, its acks and its background commit task.
struct Committer {
    progress: Mutex<Progress>,
    /// The offset last written to the group file; held while writing so writes never reorder.
    written: tokio::sync::Mutex<u64>,
    /// Woken by every ack.
    acked: Notify,
    path: PathBuf,
    fsync: bool,
}

impl Committer {
    async fn commit_now(&self) -> Result<(), BrokerError> {
        let mut written = self.written.lock().await;
        let position = {
            let mut p = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
            let offset = p.tracker.committable();
            p.positions = p.positions.split_off(&offset);
            match p.positions.get(&offset) {
                Some(&position) => GroupPosition { offset, position },
                None => {
                    return Err(BrokerError::Unavailable(format!(
                        "no byte position known for offset {offset} of {}",
                        self.path.display()
                    )));
                }
            }
        };
        if position.offset == *written {
            return Ok(());
        }
        let (path, fsync) = (self.path.clone(), self.fsync);
        tokio::task::spawn_blocking(move || write_group_file(&path, position, fsync))
            .await
            .map_err(|e| BrokerError::Unavailable(format!("group commit task failed: {e}")))??;
        *written = position.offset;
        Ok(())
    }
}

/// A consumer of one topic for one group. Acked positions are committed in the background (at
/// most every 100 ms, by a task that stops when the source is dropped) and by
/// [`Source::commit`].
pub struct LocalSource {
    topic: Arc<Topic>,
    group: String,
    reader: LogReader,
    committer: Arc<Committer>,
    task: Option<tokio::task::AbortHandle>,
    poll: Duration,
}

impl std::fmt::Debug for LocalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSource")
            .field("topic", &self.topic.name)
            .field("group", &self.group)
            .field("next_offset", &self.reader.offset)
            .finish_non_exhaustive()
    }
}

impl LocalSource {
    /// Starts the background commit task (needs a tokio runtime, hence not in `source`).
    fn start_committer(&mut self) {
        if self.task.is_some() {
            return;
        }
        let committer = Arc::clone(&self.committer);
        let handle = tokio::spawn(async move {
            loop {
                committer.acked.notified().await;
                if let Err(e) = committer.commit_now().await {
                    tracing::warn!("local broker commit failed: {e}");
                }
                tokio::time::sleep(COMMIT_INTERVAL).await;
            }
        });
        self.task = Some(handle.abort_handle());
    }

    #[cfg(test)]
    fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

struct LocalAck {
    committer: Arc<Committer>,
    offset: u64,
}

impl Ack for LocalAck {
    fn ack(self: Box<Self>, _kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.committer
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tracker
            .complete(self.offset);
        self.committer.acked.notify_one();
        Box::pin(async { Ok(()) })
    }
}

impl Source for LocalSource {
    fn describe(&self) -> String {
        format!("local topic {}, group {}", self.topic.name, self.group)
    }

    /// Reads are plain buffered file reads done inline (no await between reading and
    /// delivering, so dropping the future loses nothing).
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            self.start_committer();
            loop {
                let appended = self.topic.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let offset = self.reader.offset;
                if let Some(record) = self.reader.next()? {
                    {
                        let mut p = self
                            .committer
                            .progress
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        p.tracker.begin(offset);
                        p.positions.insert(offset + 1, self.reader.pos);
                    }
                    return Ok(Delivery {
                        record,
                        ack: AckHandle::new(LocalAck {
                            committer: Arc::clone(&self.committer),
                            offset,
                        }),
                        previous_attempts: 0,
                    });
                }
                tokio::select! {
                    () = &mut appended => {}
                    () = tokio::time::sleep(self.poll) => {}
                }
            }
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { self.committer.commit_now().await })
    }
}

/// A producer for any topic of a [`LocalBroker`]; deduplicates by `lockgate-id`.
#[derive(Clone, Debug)]
pub struct LocalSink {
    broker: LocalBroker,
}

impl Sink for LocalSink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        let broker = self.broker.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || broker.append(&records))
                .await
                .map_err(|e| BrokerError::Unavailable(format!("local append task failed: {e}")))?
                .map(|_| ())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GUARD: Duration = Duration::from_secs(5);

    fn rec(topic: &str, id: Option<&str>, payload: &[u8]) -> OutRecord {
        OutRecord {
            topic: topic.to_owned(),
            key: None,
            headers: id
                .map(|id| vec![(LOCKGATE_ID_HEADER.to_owned(), id.as_bytes().to_vec())])
                .unwrap_or_default(),
            payload: payload.to_vec(),
        }
    }

    fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
        records.iter().map(|r| r.payload.clone()).collect()
    }

    async fn next(source: &mut LocalSource) -> Delivery {
        tokio::time::timeout(GUARD, source.next())
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn append_and_read_round_trip_keys_headers_and_binary_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        let records = vec![
            OutRecord {
                topic: "orders".into(),
                key: Some(vec![0, 255, 1]),
                headers: vec![
                    ("a".into(), b"1".to_vec()),
                    ("a".into(), vec![]),
                    ("bin".into(), vec![0, 0, 7]),
                ],
                payload: (0..=255u8).collect(),
            },
            OutRecord {
                topic: "orders".into(),
                key: Some(vec![]),
                headers: vec![],
                payload: vec![],
            },
            rec("other", None, b"elsewhere"),
            rec("orders", None, b"third"),
        ];
        let offsets = b.append(&records).unwrap();
        assert_eq!(offsets, vec![Some(0), Some(1), Some(0), Some(2)]);
        assert_eq!(b.end_offset("orders").unwrap(), 3);
        assert_eq!(b.end_offset("other").unwrap(), 1);
        assert_eq!(b.end_offset("missing").unwrap(), 0);
        assert!(b.read("missing", 0, 10).unwrap().is_empty());

        let got = b.read("orders", 0, 10).unwrap();
        assert_eq!(got.len(), 3);
        for (i, (got, want)) in got
            .iter()
            .zip([&records[0], &records[1], &records[3]])
            .enumerate()
        {
            assert_eq!(got.topic, "orders");
            assert_eq!(got.partition, Some(0));
            assert_eq!(got.offset, Some(i as u64));
            assert_eq!(got.key, want.key);
            assert_eq!(got.headers, want.headers);
            assert_eq!(got.payload, want.payload);
            assert!(got.timestamp_ms.is_some_and(|t| t > 0));
            assert_eq!(got.reply_to, None);
        }
        let tail = b.read("orders", 1, 1).unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].offset, Some(1));
        assert!(b.read("orders", 3, 10).unwrap().is_empty());
        assert_eq!(b.topics().unwrap(), vec!["orders", "other"]);
    }

    #[test]
    fn read_from_an_offset_beyond_the_sparse_index() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        let n = INDEX_EVERY * 2 + 10;
        let records: Vec<_> = (0..n)
            .map(|i| rec("t", None, i.to_string().as_bytes()))
            .collect();
        b.append(&records).unwrap();
        // A fresh instance learns the index by scanning; the first one from its appends.
        let fresh = LocalBroker::open(dir.path()).unwrap();
        for broker in [&b, &fresh] {
            for from in [0, INDEX_EVERY - 1, INDEX_EVERY, INDEX_EVERY * 2 + 3, n - 1] {
                let got = broker.read("t", from, 2).unwrap();
                assert_eq!(got[0].offset, Some(from));
                assert_eq!(got[0].payload, from.to_string().as_bytes());
            }
        }
    }

    #[tokio::test]
    async fn data_and_committed_offsets_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = LocalBroker::open(dir.path()).unwrap();
            b.append(&[
                rec("t", None, b"a"),
                rec("t", None, b"b"),
                rec("t", None, b"c"),
            ])
            .unwrap();
            let mut s = b.source("t", "g").unwrap();
            let d = next(&mut s).await;
            d.ack.ack(AckKind::Done).await.unwrap();
            let d = next(&mut s).await;
            d.ack.ack(AckKind::DeadLettered).await.unwrap();
            s.commit().await.unwrap();
        }
        let b = LocalBroker::open(dir.path()).unwrap();
        assert_eq!(b.end_offset("t").unwrap(), 3);
        assert_eq!(payloads(&b.read("t", 0, 10).unwrap()), [b"a", b"b", b"c"]);
        assert_eq!(b.committed("t", "g").unwrap(), 2);
        let mut s = b.source("t", "g").unwrap();
        let d = next(&mut s).await;
        assert_eq!(d.record.offset, Some(2));
        assert_eq!(d.record.payload, b"c");
        // Appending after a reopen continues the offsets.
        assert_eq!(b.append(&[rec("t", None, b"d")]).unwrap(), [Some(3)]);
    }

    #[tokio::test]
    async fn a_torn_tail_is_invisible_and_truncated_by_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        b.append(&[rec("t", None, b"zero"), rec("t", None, b"one")])
            .unwrap();
        let log = dir.path().join("topics/t/log");
        let good_len = fs::metadata(&log).unwrap().len();
        let mut s = b
            .source("t", "g")
            .unwrap()
            .with_poll(Duration::from_millis(10));
        next(&mut s).await;
        next(&mut s).await;

        let torn_tails: Vec<Vec<u8>> = vec![
            // Half a frame: a crash in the middle of write(2).
            {
                let f = encode_frame(1, &rec("t", None, b"lost")).unwrap();
                f[..f.len() / 2].to_vec()
            },
            // A complete frame whose body does not match its crc.
            {
                let mut f = encode_frame(1, &rec("t", None, b"lost")).unwrap();
                let last = f.len() - 1;
                f[last] ^= 0xff;
                f
            },
            // Three bytes: not even a length.
            vec![1, 2, 3],
            // A huge garbage length.
            vec![0xff; 40],
        ];
        let mut expected_end = good_len;
        for (i, tail) in torn_tails.iter().enumerate() {
            let before = fs::metadata(&log).unwrap().len();
            assert_eq!(before, expected_end);
            OpenOptions::new()
                .append(true)
                .open(&log)
                .unwrap()
                .write_all(tail)
                .unwrap();
            let fresh = LocalBroker::open(dir.path()).unwrap();
            let n = 2 + i as u64;
            assert_eq!(fresh.end_offset("t").unwrap(), n, "tail {i}");
            assert_eq!(fresh.read("t", 0, 100).unwrap().len() as u64, n, "tail {i}");
            assert!(
                tokio::time::timeout(Duration::from_millis(100), s.next())
                    .await
                    .is_err(),
                "a reader must not deliver torn tail {i}"
            );

            let payload = format!("after {i}");
            let appended = b.append(&[rec("t", None, payload.as_bytes())]).unwrap();
            assert_eq!(appended, [Some(n)], "tail {i}");
            let frame = encode_frame(0, &rec("t", None, payload.as_bytes())).unwrap();
            expected_end = before + frame.len() as u64;
            assert_eq!(fs::metadata(&log).unwrap().len(), expected_end, "tail {i}");
            let d = next(&mut s).await;
            assert_eq!(d.record.offset, Some(n));
            assert_eq!(d.record.payload, payload.as_bytes());
        }
        let all = b.read("t", 0, 100).unwrap();
        assert_eq!(all.len(), 6);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, r)| r.offset == Some(i as u64))
        );
    }

    #[test]
    fn duplicates_by_lockgate_id_are_stored_once_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let one = LocalBroker::open(dir.path()).unwrap();
        let two = LocalBroker::open(dir.path()).unwrap();
        assert_eq!(one.append(&[rec("t", Some("a"), b"a")]).unwrap(), [Some(0)]);
        assert_eq!(
            one.append(&[rec("t", Some("a"), b"a again")]).unwrap(),
            [None]
        );
        // `two` never saw `a` in memory: it must learn it from the log under the lock.
        assert_eq!(
            two.append(&[rec("t", Some("a"), b"a"), rec("t", Some("b"), b"b")])
                .unwrap(),
            [None, Some(1)]
        );
        // Duplicates inside one batch, records without an id, and the same id on another topic.
        assert_eq!(
            one.append(&[
                rec("t", Some("b"), b"b"),
                rec("t", Some("c"), b"c"),
                rec("t", Some("c"), b"c"),
                rec("t", None, b"no id"),
                rec("t", None, b"no id"),
                rec("u", Some("a"), b"a on u"),
            ])
            .unwrap(),
            [None, Some(2), None, Some(3), Some(4), Some(0)]
        );
        let fresh = LocalBroker::open(dir.path()).unwrap();
        assert_eq!(
            payloads(&fresh.read("t", 0, 100).unwrap()),
            [&b"a"[..], b"b", b"c", b"no id", b"no id"]
        );
        assert_eq!(fresh.append(&[rec("t", Some("c"), b"c")]).unwrap(), [None]);
    }

    #[tokio::test]
    async fn sink_publishes_and_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        let sink = b.sink();
        sink.publish(vec![
            rec("out", Some("x"), b"1"),
            rec("out", Some("y"), b"2"),
        ])
        .await
        .unwrap();
        sink.publish(vec![rec("out", Some("x"), b"1")])
            .await
            .unwrap();
        assert_eq!(payloads(&b.read("out", 0, 10).unwrap()), [b"1", b"2"]);
        assert!(matches!(
            sink.publish(vec![rec("bad/name", None, b"")]).await,
            Err(BrokerError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn source_commits_the_contiguous_prefix_of_acks() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        let records: Vec<_> = (0..6).map(|i| rec("t", None, &[i])).collect();
        b.append(&records).unwrap();
        let mut s = b.source("t", "g").unwrap();
        assert_eq!(s.describe(), "local topic t, group g");
        let mut deliveries = Vec::new();
        for i in 0..4u8 {
            let d = next(&mut s).await;
            assert_eq!(d.record.offset, Some(u64::from(i)));
            assert_eq!(d.record.payload, [i]);
            deliveries.push(Some(d));
        }
        for i in [0, 2, 3] {
            let d = deliveries[i].take().unwrap();
            d.ack.ack(AckKind::Done).await.unwrap();
        }
        s.commit().await.unwrap();
        assert_eq!(b.committed("t", "g").unwrap(), 1);
        {
            let mut again = b.source("t", "g").unwrap();
            assert_eq!(next(&mut again).await.record.offset, Some(1));
        }
        let d = deliveries[1].take().unwrap();
        d.ack.ack(AckKind::Done).await.unwrap();
        s.commit().await.unwrap();
        assert_eq!(b.committed("t", "g").unwrap(), 4);

        // Resumes at the committed offset, from the stored byte position.
        let mut resumed = b.source("t", "g").unwrap();
        let d = next(&mut resumed).await;
        assert_eq!((d.record.offset, d.record.payload), (Some(4), vec![4]));
        let mut other = b.source("t", "other").unwrap();
        assert_eq!(next(&mut other).await.record.offset, Some(0));
        assert_eq!(b.committed("t", "other").unwrap(), 0);
    }

    #[tokio::test]
    async fn acks_are_committed_in_the_background_while_next_waits() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        b.append(&[rec("t", None, b"a"), rec("t", None, b"b")])
            .unwrap();
        let mut s = b.source("t", "g").unwrap();
        let first = next(&mut s).await;
        let second = next(&mut s).await;
        let acker = tokio::spawn(async move {
            first.ack.ack(AckKind::Done).await.unwrap();
            second.ack.ack(AckKind::Done).await.unwrap();
        });
        // `next` is blocked at the end of the topic while the acks arrive.
        let waiting = tokio::time::timeout(Duration::from_millis(500), s.next()).await;
        assert!(waiting.is_err(), "nothing more to deliver");
        acker.await.unwrap();
        tokio::time::timeout(GUARD, async {
            while b.committed("t", "g").unwrap() != 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_source_wakes_up_for_an_in_process_append() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        // Polling effectively off: only the in-process notification can wake the source.
        let mut s = b
            .source("t", "g")
            .unwrap()
            .with_poll(Duration::from_secs(3600));
        let sink = b.sink();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sink.publish(vec![rec("t", None, b"hello")]).await.unwrap();
        });
        let d = next(&mut s).await;
        assert_eq!(d.record.payload, b"hello");
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_source_sees_appends_from_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        let mut s = b.source("t", "g").unwrap();
        let other_dir = dir.path().to_owned();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Another instance shares no Notify with `b`: only polling finds this record.
            let other = LocalBroker::open(&other_dir).unwrap();
            other
                .sink()
                .publish(vec![rec("t", None, b"from afar")])
                .await
                .unwrap();
        });
        let d = next(&mut s).await;
        assert_eq!(d.record.payload, b"from afar");
        producer.await.unwrap();
    }

    #[test]
    fn invalid_topic_and_group_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBroker::open(dir.path()).unwrap();
        let long = "x".repeat(250);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../escape",
            "sp ace",
            "é",
            long.as_str(),
        ] {
            let err = b.append(&[rec(bad, None, b"")]).unwrap_err();
            match err {
                BrokerError::Invalid(msg) => {
                    assert!(msg.contains(&format!("{bad:?}")), "{msg}");
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(b.read(bad, 0, 1), Err(BrokerError::Invalid(_))));
            assert!(matches!(b.source(bad, "g"), Err(BrokerError::Invalid(_))));
            assert!(matches!(b.source("t", bad), Err(BrokerError::Invalid(_))));
            assert!(matches!(
                b.committed("t", bad),
                Err(BrokerError::Invalid(_))
            ));
        }
        // A batch with one bad topic writes nothing.
        assert!(
            b.append(&[rec("ok", None, b""), rec("no/", None, b"")])
                .is_err()
        );
        assert_eq!(b.end_offset("ok").unwrap(), 0);
        for good in ["a", "A.b_c-9", "x".repeat(249).as_str(), "..."] {
            assert_eq!(b.append(&[rec(good, None, b"")]).unwrap(), [Some(0)]);
        }
    }

    #[test]
    fn concurrent_appenders_store_every_record_once_with_unique_offsets() {
        const THREADS: u64 = 8;
        const BATCHES: u64 = 40;
        const PER_BATCH: u64 = 10;
        let total = THREADS * BATCHES * PER_BATCH;
        let dir = tempfile::tempdir().unwrap();
        let shared = LocalBroker::open(dir.path()).unwrap();
        let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                // Half the threads share an instance (in-process mutex), half have their own
                // (the file lock is all that separates them, as between processes).
                let b = if t % 2 == 0 {
                    shared.clone()
                } else {
                    LocalBroker::open(dir.path()).unwrap()
                };
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let mut offsets = Vec::new();
                    for batch in 0..BATCHES {
                        let records: Vec<_> = (0..PER_BATCH)
                            .map(|i| {
                                let id = format!("{t}-{batch}-{i}");
                                let mut payload = id.clone().into_bytes();
                                payload.resize(2000, b'.');
                                rec("t", Some(&id), &payload)
                            })
                            .collect();
                        offsets.extend(b.append(&records).unwrap());
                    }
                    offsets
                })
            })
            .collect();
        let mut offsets: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .map(Option::unwrap)
            .collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (0..total).collect::<Vec<_>>());
        let all = LocalBroker::open(dir.path())
            .unwrap()
            .read("t", 0, usize::MAX)
            .unwrap();
        assert_eq!(all.len() as u64, total);
        let ids: HashSet<_> = all.iter().map(|r| r.payload.clone()).collect();
        assert_eq!(ids.len() as u64, total);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, r)| r.offset == Some(i as u64))
        );
    }
}

/// A [`Scan`] of one topic of the embedded broker.
#[derive(Debug)]
pub struct LocalScan {
    broker: LocalBroker,
    topic: String,
    next: u64,
    end: u64,
}

/// Records a scan reads at once.
const SCAN_BATCH: u64 = 500;

impl Scan for LocalScan {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>> {
        Box::pin(async move {
            if self.next >= self.end {
                return Ok(None);
            }
            let max = (self.end - self.next).min(SCAN_BATCH);
            let broker = self.broker.clone();
            let (topic, from) = (self.topic.clone(), self.next);
            let records = tokio::task::spawn_blocking(move || {
                broker.read(&topic, from, usize::try_from(max).unwrap_or(usize::MAX))
            })
            .await
            .map_err(|e| BrokerError::Unavailable(format!("scan task failed: {e}")))??;
            if records.is_empty() {
                return Ok(None);
            }
            self.next += records.len() as u64;
            Ok(Some(records))
        })
    }
}
