//! The embedded development broker: durable, append-only topics in a directory, committed
//! positions per consumer group, usable by several processes at once (`lockgate send` appends
//! while `lockgate run` consumes). Segmented logs with retention and a bounded duplicate window
//! keep its disk, memory and startup time bounded, so it can be left running for months.
//!
//! Not a distributed broker: one partition per topic, no replication.
//!
//! # On disk
//!
//! ```text
//! <dir>/topics/<topic>/segments/<base>.log  frames, append-only; <base> (20 digits) is the
//!                                          offset of the segment's first record
//! <dir>/topics/<topic>/dedup               the duplicate window and where the log ends
//! <dir>/topics/<topic>/lock                advisory lock taken by appenders (never by readers)
//! <dir>/topics/<topic>/groups/<group>      {"offset":N,"position":P,"segment":B} (JSON,
//!                                          replaced by rename)
//! ```
//!
//! A frame is `u32 LE body length`, `u32 LE crc32(body)`, then the body (see
//! [`frame::encode_frame`]). Offsets are global and dense: segment `<base>.log` holds offsets
//! `base..` up to the base of the next segment. A group file stores the committed offset
//! together with the segment and byte position of that record, so a consumer resumes without a
//! scan. The `dedup` file is described in [`dedup`].
//!
//! # Segments and retention
//!
//! An append to a segment of [`TopicSettings::segment_bytes`] or more first starts a new
//! segment at the next offset, so retention can delete whole files. Retention deletes segments
//! oldest first while all of a topic's segments together are larger than `max_bytes`, or while
//! the next segment's first record (so every record of this one) is older than `max_age`. It
//! never deletes the last segment (appends go there), and never a segment holding an offset
//! that a consumer group (a file in `groups/`) has not committed, unless `delete_unconsumed` is
//! set: a group that falls behind holds retention back, with a warning, rather than lose
//! records. A topic that a route uses as its DLQ has no limits unless its own settings give
//! some, so pending dead letters are never dropped silently (see [`LocalSettings`]).
//!
//! Retention runs in `lockgate run` only: once a second ([`LocalBroker::run_retention`]) and
//! right after one of its appends started a new segment ([`LocalBroker::with_retention`]).
//! `lockgate send`, `tail` and `dlq` never delete: retention needs the config (which topics are
//! DLQs), and one `lockgate run` owns a state directory.
//!
//! A reader whose next records were deleted (a group behind retention with
//! `delete_unconsumed`, a `tail --from 0`) continues at the earliest retained offset, with a
//! warning naming what it missed. A reader holding a deleted segment open reads it to its end
//! first (the file lives on until it is closed).
//!
//! # The duplicate window
//!
//! A record whose [`LOCKGATE_ID_HEADER`] was appended to its topic within the window is not
//! stored again. The window holds each id with its append time: at most
//! `duplicate_window_ids` ids and none older than `duplicate_window` (JetStream's
//! `duplicate_window`, with a count bound so memory is bounded too, at about 100 bytes per id).
//! A record repeated after its id left the window is stored again. The window is persisted in
//! the `dedup` file, so a restart, or another process (`lockgate send`), keeps it.
//!
//! # Startup cost
//!
//! A process's first append to a topic reads the `dedup` file (at most about twice the window),
//! then only the frames appended after the end its last entry records (there are some only
//! after a crash between an append's frames and its entry), and opens the last segment: its
//! cost does not depend on the length of the log. A consumer starts at its group's segment and
//! byte position. [`LocalBroker::read`] continues where the previous read of the same topic
//! ended, or reads the segment holding `from` from its start.
//!
//! # Upgrade from the single-file log
//!
//! lockgate before segments wrote one file per topic, `<topic>/log`. It is read as segment 0
//! (its byte positions, so group files, stay valid), and the first append moves it to
//! `segments/00000000000000000000.log` by a rename and builds the `dedup` file by reading it
//! once. After the next roll retention may delete it like any segment. Stop every lockgate
//! before upgrading: an older one still running would write a new `log` beside the segments.
//! A group file without `segment` means segment 0.
//!
//! # Concurrency and crashes
//!
//! Appenders (in any process) take an exclusive `File::lock` on `lock`, read the `dedup`
//! entries other processes wrote since they last looked (their ids and the new end of the
//! log), read any frames after that end (their ids go into the next entry), truncate a torn
//! frame left at the tail by a crash, then write their frames with one `write(2)`, then their
//! entry. Readers never lock: they stop at the first incomplete or corrupt frame (it may be
//! being written) and retry from there; at the end of a segment they go on with the segment
//! named after their next offset, once it exists.
//!
//! A write is durable against a process crash once `append` returns. Without
//! [`LocalBroker::with_fsync`] a power loss may lose the last writes; if it loses frames that
//! the `dedup` file recorded, the next appender notices (the segment is shorter than recorded),
//! forgets the window and rebuilds it from the last segment.

mod connector;
mod dedup;
mod frame;
mod retention;
mod segments;
mod sink;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use self::dedup::{COMPACT_CHUNK, COMPACT_MIN_BYTES, End, Window, encode_entry, read_entries};
use self::frame::{encode_frame, read_frame};
use self::segments::{Cursor, SEGMENTS_DIR, segment_path};
use super::{Ack, AckHandle, AckKind, BrokerError, Delivery, Scan, Source};
use crate::broker::offsets::OffsetTracker;
use crate::config::local::{LocalSettings, TopicSettings, name_ok};
use crate::message::{LOCKGATE_ID_HEADER, OutRecord, Record};
use futures_util::future::BoxFuture;

pub use self::retention::Removed;
pub use self::sink::LocalSink;

/// How often a source at the end of its topic looks for records appended by other processes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Ends of data in a row after which a source lists the segments, to notice one it cannot
/// leave (deleted by retention, or corrupt): about once a second at [`POLL_INTERVAL`].
const SOURCE_CHECK_EVERY: u32 = 20;
/// Least time between two background commits of a source.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How often `lockgate run` applies retention (see [`LocalBroker::run_retention`]).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(1);
/// Name of the dedup file in a topic's directory.
const DEDUP_FILE: &str = "dedup";
/// Read positions remembered per topic, so consecutive [`LocalBroker::read`]s do not seek.
const READ_HINTS: usize = 16;

/// The clock of appends (ms since the Unix epoch); tests replace it.
type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The file-backed broker. Cheap to clone: clones share in-process state (append bookkeeping,
/// wakeups of sources, settings).
#[derive(Clone)]
pub struct LocalBroker {
    inner: Arc<Inner>,
    settings: Arc<ArcSwap<LocalSettings>>,
    clock: Clock,
    fsync: bool,
    retention: bool,
}

struct Inner {
    dir: PathBuf,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

/// Per-topic in-process state.
struct Topic {
    name: String,
    dir: PathBuf,
    state: Mutex<TopicState>,
    /// Woken after every in-process append to this topic.
    appended: Notify,
    /// Where recent reads ended: (next offset, segment, byte position).
    hints: Mutex<VecDeque<(u64, u64, u64)>>,
    /// First record time of segments, by base (they never change), for age retention.
    first_times: Mutex<BTreeMap<u64, u64>>,
    /// Whether retention is being held back by a group (warned once until it is not).
    held_back: AtomicBool,
}

/// What this process knows of a topic's log and duplicate window.
#[derive(Default)]
struct TopicState {
    lock: Option<Arc<File>>,
    /// Whether the dedup file (or the log, without one) was read.
    loaded: bool,
    /// Whether a legacy single-file log was looked for (and moved) under the lock.
    migrated: bool,
    /// Whether `window` tracks ids (appenders need them; readers only need `end`).
    with_ids: bool,
    window: Window,
    /// The end of the valid log, as far as read.
    end: End,
    /// Ids read from frames that no dedup entry holds yet, with their offset and append time;
    /// under the lock they belong to a crashed append and go into the next entry.
    unlogged: VecDeque<(u64, u64, Arc<[u8]>)>,
    /// The segment `end.base`, open for reading its tail and appending.
    active: Option<(u64, Arc<File>)>,
    dedup: Option<DedupFile>,
}

/// The open dedup file.
struct DedupFile {
    file: File,
    /// Its inode: a different one at its path means it was compacted (replaced).
    ino: u64,
    /// Bytes of valid entries read or written.
    len: u64,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBroker")
            .field("dir", &self.inner.dir)
            .field("fsync", &self.fsync)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, path: &Path, e: &io::Error) -> BrokerError {
    BrokerError::Unavailable(format!("{what} {}: {e}", path.display()))
}

/// Checks a topic or group name (see [`crate::config::local::name_ok`]).
fn validate_name(kind: &str, name: &str) -> Result<(), BrokerError> {
    if name_ok(name) {
        Ok(())
    } else {
        Err(BrokerError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1-249 characters of A-Z a-z 0-9 . _ - (not \".\" or \"..\")"
        )))
    }
}

impl LocalBroker {
    /// Opens (creating) the broker rooted at `dir` (the caller passes `<state_dir>/local`), with
    /// default settings and no retention.
    pub fn open(dir: &Path) -> Result<Self, BrokerError> {
        let topics = dir.join("topics");
        fs::create_dir_all(&topics).map_err(|e| unavailable("cannot create", &topics, &e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                topics: Mutex::new(HashMap::new()),
            }),
            settings: Arc::new(ArcSwap::from_pointee(LocalSettings::default())),
            clock: Arc::new(crate::message::now_ms),
            fsync: false,
            retention: false,
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

    /// Uses `settings` (`[local]` of runtime.toml) for segment size, retention and the
    /// duplicate window.
    #[must_use]
    pub fn with_settings(self, settings: LocalSettings) -> Self {
        self.set_settings(settings);
        self
    }

    /// Replaces the settings (a reload of runtime.toml); every clone sees the new ones.
    pub fn set_settings(&self, settings: LocalSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// Applies retention to a topic right after an append of this broker started a new segment
    /// in it. Only the process that runs routes does (it also runs
    /// [`LocalBroker::run_retention`]; see the module docs).
    #[must_use]
    pub fn with_retention(mut self, on: bool) -> Self {
        self.retention = on;
        self
    }

    #[cfg(test)]
    fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
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
                state: Mutex::new(TopicState::default()),
                appended: Notify::new(),
                hints: Mutex::new(VecDeque::new()),
                first_times: Mutex::new(BTreeMap::new()),
                held_back: AtomicBool::new(false),
            })
        }))
    }

    /// Appends records (each to its own `topic` field) and returns the offsets assigned, in
    /// order; a record whose `lockgate-id` header is in its topic's duplicate window (or
    /// earlier in the same batch) is skipped (`None`).
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
        let now = (self.clock)();
        let mut frames = Vec::with_capacity(records.len());
        for r in records {
            frames.push(encode_frame(now, r)?);
        }
        let settings = self.settings.load();
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
            let ts = settings.topic(name);
            let rolled = topic.append_batch(&batch, &ts, now, self.fsync, &mut out)?;
            topic.appended.notify_waiters();
            if rolled
                && self.retention
                && let Err(e) = topic.enforce_retention(&ts, now)
            {
                tracing::warn!(topic = name, "Retention failed: {e}");
            }
        }
        Ok(out)
    }

    /// Reads up to `max` records of `topic` starting at offset `from` (empty if none / no
    /// topic). If `from` was deleted by retention, the records start at the earliest offset
    /// retained (their offsets say so).
    pub fn read(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Record>, BrokerError> {
        validate_name("topic", topic)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let t = self.topic(topic);
        let mut cursor = match t.hint(from) {
            Some((base, pos)) => Cursor::new(topic, &t.dir, "a read", (base, pos, from), 1),
            None => Cursor::seek(topic, &t.dir, "a read", from, 1)?,
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some(record) = cursor.next()? else { break };
            if record.offset.is_some_and(|o| o >= from) {
                out.push(record);
            }
        }
        t.remember(cursor.offset, cursor.base, cursor.pos);
        Ok(out)
    }

    /// Number of records ever appended to `topic` (its end offset), deleted ones included.
    pub fn end_offset(&self, topic: &str) -> Result<u64, BrokerError> {
        validate_name("topic", topic)?;
        let t = self.topic(topic);
        let settings = self.settings.load().topic(topic);
        let mut st = t.state.lock().unwrap_or_else(PoisonError::into_inner);
        let with_ids = st.with_ids;
        t.sync(&mut st, false, with_ids, &settings)?;
        Ok(st.end.count)
    }

    /// The earliest offset still stored in `topic` (its end offset when it holds none).
    pub fn start_offset(&self, topic: &str) -> Result<u64, BrokerError> {
        validate_name("topic", topic)?;
        let t = self.topic(topic);
        match segments::list(&t.dir)?.first() {
            Some(s) => Ok(s.base),
            None => self.end_offset(topic),
        }
    }

    /// Bytes of `topic`'s segments on disk.
    pub fn size_bytes(&self, topic: &str) -> Result<u64, BrokerError> {
        validate_name("topic", topic)?;
        let t = self.topic(topic);
        let mut total = 0;
        for s in segments::list(&t.dir)? {
            match fs::metadata(&s.path) {
                Ok(m) => total += m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(unavailable("cannot stat", &s.path, &e)),
            }
        }
        Ok(total)
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

    /// A consumer of `topic` for `group`, resuming at the committed position (a new group
    /// starts at the earliest offset retained).
    pub fn source(&self, topic: &str, group: &str) -> Result<LocalSource, BrokerError> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let t = self.topic(topic);
        let path = t.group_path(group);
        let start = match read_group_file(&path)? {
            Some(g) => {
                match segments::open(&t.dir, g.segment) {
                    Ok((file, seg_path)) => {
                        let len = file
                            .metadata()
                            .map_err(|e| unavailable("cannot stat", &seg_path, &e))?
                            .len();
                        if g.position > len {
                            return Err(BrokerError::Invalid(format!(
                                "{} says position {} but {} has {len} bytes; the log was replaced (delete the group file to start over)",
                                path.display(),
                                g.position,
                                seg_path.display()
                            )));
                        }
                    }
                    // Deleted by retention: the cursor finds the offset again, with a warning
                    // if its records are gone.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(unavailable(
                            "cannot open",
                            &segment_path(&t.dir, g.segment),
                            &e,
                        ));
                    }
                }
                g
            }
            None => {
                let base = segments::list(&t.dir)?.first().map_or(0, |s| s.base);
                GroupPosition {
                    offset: base,
                    position: 0,
                    segment: base,
                }
            }
        };
        let committer = Arc::new(Committer {
            progress: Mutex::new(Progress {
                tracker: OffsetTracker::new(start.offset),
                positions: BTreeMap::from([(start.offset, (start.segment, start.position))]),
            }),
            written: tokio::sync::Mutex::new(start.offset),
            acked: Notify::new(),
            path,
            fsync: self.fsync,
        });
        Ok(LocalSource {
            reader: Cursor::new(
                topic,
                &t.dir,
                &format!("group {group}"),
                (start.segment, start.position, start.offset),
                SOURCE_CHECK_EVERY,
            ),
            topic: t,
            group: group.to_owned(),
            committer,
            task: None,
            poll: POLL_INTERVAL,
        })
    }

    /// A [`Scan`] of `topic` from its earliest retained offset to its current end.
    pub fn scan(&self, topic: &str) -> Result<LocalScan, BrokerError> {
        Ok(LocalScan {
            broker: self.clone(),
            topic: topic.to_owned(),
            next: 0,
            end: self.end_offset(topic)?,
        })
    }

    /// A producer for any topic (runs [`LocalBroker::append`] on a blocking thread, merging
    /// concurrent publishes: `sink.rs`).
    pub fn sink(&self) -> LocalSink {
        LocalSink::new(self.clone())
    }

    /// Applies retention to every topic now (see the module docs): deletes the segments that
    /// are over `max_bytes` or `max_age` and that every group has consumed (or all of them with
    /// `delete_unconsumed`). Returns what it deleted. Works whether or not this broker was made
    /// [`LocalBroker::with_retention`].
    pub fn enforce_retention(&self) -> Result<Vec<Removed>, BrokerError> {
        let settings = self.settings.load();
        let now = (self.clock)();
        let mut out = Vec::new();
        for name in self.topics()? {
            let t = self.topic(&name);
            let removed = t.enforce_retention(&settings.topic(&name), now)?;
            if removed.segments > 0 {
                out.push(removed);
            }
        }
        Ok(out)
    }

    /// Applies retention every [`RETENTION_INTERVAL`] until `stop` completes (`lockgate run`).
    pub async fn run_retention(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(RETENTION_INTERVAL) => {}
            }
            let broker = self.clone();
            match tokio::task::spawn_blocking(move || broker.enforce_retention()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("Retention of the embedded broker failed: {e}"),
                Err(e) => tracing::warn!("Retention of the embedded broker failed: {e}"),
            }
        }
    }
}

impl Topic {
    fn group_path(&self, group: &str) -> PathBuf {
        self.dir.join("groups").join(group)
    }

    fn dedup_path(&self) -> PathBuf {
        self.dir.join(DEDUP_FILE)
    }

    /// The byte position of offset `from` if a recent read ended there.
    fn hint(&self, from: u64) -> Option<(u64, u64)> {
        let hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        hints
            .iter()
            .find(|(o, _, _)| *o == from)
            .map(|(_, base, pos)| (*base, *pos))
    }

    fn remember(&self, offset: u64, base: u64, pos: u64) {
        let mut hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        hints.retain(|(o, _, _)| *o != offset);
        if hints.len() >= READ_HINTS {
            hints.pop_front();
        }
        hints.push_back((offset, base, pos));
    }

    fn lock_file(&self, st: &mut TopicState) -> Result<Arc<File>, BrokerError> {
        if let Some(lock) = &st.lock {
            return Ok(Arc::clone(lock));
        }
        fs::create_dir_all(&self.dir).map_err(|e| unavailable("cannot create", &self.dir, &e))?;
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

    /// Brings `st` up to the end of the log: the dedup entries written since it last looked,
    /// then the frames after the end they record. With `locked` (only under the topic lock)
    /// it also moves a legacy log, creates the dedup file, and cuts off an invalid tail: no one
    /// else can be writing it. `with_ids`: track the duplicate window (appenders).
    fn sync(
        &self,
        st: &mut TopicState,
        locked: bool,
        with_ids: bool,
        settings: &TopicSettings,
    ) -> Result<(), BrokerError> {
        if st.loaded && with_ids && !st.with_ids {
            reset(st);
            st.with_ids = true;
        }
        if !st.loaded {
            st.loaded = true;
            st.with_ids = with_ids;
        }
        if locked && !st.migrated {
            if segments::migrate_legacy(&self.name, &self.dir)? {
                // It may be open read-only under its old name.
                st.active = None;
            }
            st.migrated = true;
        }
        self.read_dedup(st, locked, settings)?;
        self.read_tail(st, locked, settings)
    }

    /// Reads the dedup entries after those already read; a replaced (compacted) file is read
    /// from its start.
    fn read_dedup(
        &self,
        st: &mut TopicState,
        locked: bool,
        settings: &TopicSettings,
    ) -> Result<(), BrokerError> {
        let path = self.dedup_path();
        if let Some(d) = &st.dedup {
            let replaced = match fs::metadata(&path) {
                Ok(m) => m.ino() != d.ino,
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) => return Err(unavailable("cannot stat", &path, &e)),
            };
            if replaced {
                reset(st);
            }
        }
        let mut d = match st.dedup.take() {
            Some(d) => d,
            None => {
                let file = match OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(locked)
                    .open(&path)
                {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(unavailable("cannot open", &path, &e)),
                };
                let ino = file
                    .metadata()
                    .map_err(|e| unavailable("cannot stat", &path, &e))?
                    .ino();
                DedupFile { file, ino, len: 0 }
            }
        };
        let mut f = &d.file;
        f.seek(SeekFrom::Start(d.len))
            .map_err(|e| unavailable("cannot read", &path, &e))?;
        let (max_ids, window_ms) = (settings.duplicate_window_ids, settings.window_ms());
        let (entries, read) =
            read_entries(&d.file).map_err(|e| unavailable("cannot read", &path, &e))?;
        for entry in entries {
            if entry.end.after(&st.end) {
                st.end = entry.end;
            }
            while st
                .unlogged
                .front()
                .is_some_and(|(offset, _, _)| *offset < entry.end.count)
            {
                st.unlogged.pop_front();
            }
            if st.with_ids {
                st.window.load(entry, max_ids, window_ms);
            }
        }
        d.len += read;
        if locked {
            let len = d
                .file
                .metadata()
                .map_err(|e| unavailable("cannot stat", &path, &e))?
                .len();
            if len > d.len {
                tracing::warn!(
                    topic = %self.name,
                    "Truncating {} invalid bytes at the end of {} (an append interrupted by a crash)",
                    len - d.len,
                    path.display()
                );
                d.file
                    .set_len(d.len)
                    .map_err(|e| unavailable("cannot truncate", &path, &e))?;
            }
        }
        st.dedup = Some(d);
        Ok(())
    }

    /// Reads the frames after `st.end`, following new segments, and (with `locked`) cuts off
    /// an invalid tail of the last one.
    fn read_tail(
        &self,
        st: &mut TopicState,
        locked: bool,
        settings: &TopicSettings,
    ) -> Result<(), BrokerError> {
        // A pass that reached the end of a segment whose successor exists reads it once more:
        // its last frames may have become visible after the first pass.
        let mut confirmed = false;
        loop {
            let Some(file) = self.active(st)? else {
                return Ok(());
            };
            let path = segment_path(&self.dir, st.end.base);
            let len = file
                .metadata()
                .map_err(|e| unavailable("cannot stat", &path, &e))?
                .len();
            if len < st.end.pos {
                tracing::warn!(
                    topic = %self.name,
                    "{} is shorter ({len} bytes) than its dedup file says ({}): writes were lost (a power loss without fsync?); rebuilding the duplicate window from this segment",
                    path.display(),
                    st.end.pos
                );
                st.window = Window::default();
                st.unlogged.clear();
                st.end = End {
                    base: st.end.base,
                    pos: 0,
                    count: st.end.base,
                };
                continue;
            }
            let before = st.end;
            if len > st.end.pos {
                let mut r = BufReader::new(&*file);
                r.seek(SeekFrom::Start(st.end.pos))
                    .map_err(|e| unavailable("cannot read", &path, &e))?;
                while let Some((body, size)) =
                    read_frame(&mut r).map_err(|e| unavailable("cannot read", &path, &e))?
                {
                    if st.with_ids
                        && let Some(id) = lockgate_id(&body.headers)
                        && {
                            st.window.expire(body.timestamp_ms, settings.window_ms());
                            st.window
                                .insert(body.timestamp_ms, id, settings.duplicate_window_ids)
                        }
                    {
                        st.unlogged
                            .push_back((st.end.count, body.timestamp_ms, Arc::from(id)));
                    }
                    st.end.count += 1;
                    st.end.pos += size;
                }
            }
            if st.end.count > st.end.base && segment_path(&self.dir, st.end.count).exists() {
                if st.end != before || !confirmed {
                    confirmed = true;
                    continue;
                }
                st.end = End {
                    base: st.end.count,
                    pos: 0,
                    count: st.end.count,
                };
                st.active = None;
                confirmed = false;
                continue;
            }
            if locked && len > st.end.pos {
                let last = segments::list(&self.dir)?.pop();
                if let Some(last) = last.filter(|l| l.base > st.end.base) {
                    tracing::error!(
                        topic = %self.name,
                        "{} is corrupt at byte {} (offset {}) and is followed by {}: appends continue after the last segment",
                        path.display(),
                        st.end.pos,
                        st.end.count,
                        last.path.display()
                    );
                    st.end = End {
                        base: last.base,
                        pos: 0,
                        count: last.base,
                    };
                    st.active = None;
                    continue;
                }
                tracing::warn!(
                    topic = %self.name,
                    "Truncating {} invalid bytes at the end of {} (an append interrupted by a crash)",
                    len - st.end.pos,
                    path.display()
                );
                file.set_len(st.end.pos)
                    .map_err(|e| unavailable("cannot truncate", &path, &e))?;
            }
            return Ok(());
        }
    }

    /// The open segment `st.end.base`. If it does not exist (deleted, or a dedup file that
    /// outlived its log), `st.end` moves to the start of the last segment, which is read from
    /// there; `None` when the topic has no segment.
    fn active(&self, st: &mut TopicState) -> Result<Option<Arc<File>>, BrokerError> {
        if let Some((base, file)) = &st.active
            && *base == st.end.base
        {
            return Ok(Some(Arc::clone(file)));
        }
        st.active = None;
        loop {
            let path = segment_path(&self.dir, st.end.base);
            let opened = OpenOptions::new().read(true).write(true).open(&path);
            let opened = match opened {
                Err(e) if e.kind() == io::ErrorKind::NotFound && st.end.base == 0 => {
                    // A legacy log that was not moved yet (only readers get here).
                    OpenOptions::new()
                        .read(true)
                        .open(self.dir.join(segments::LEGACY_LOG))
                }
                other => other,
            };
            match opened {
                Ok(f) => {
                    let f = Arc::new(f);
                    st.active = Some((st.end.base, Arc::clone(&f)));
                    return Ok(Some(f));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let segments = segments::list(&self.dir)?;
                    let Some(last) = segments.last() else {
                        return Ok(None);
                    };
                    if last.base == st.end.base {
                        continue;
                    }
                    if st.end.count > 0 || st.end.pos > 0 {
                        tracing::warn!(
                            topic = %self.name,
                            "Segment {} is gone; reading {} from its start",
                            path.display(),
                            last.path.display()
                        );
                    }
                    st.end = End {
                        base: last.base,
                        pos: 0,
                        count: last.base,
                    };
                }
                Err(e) => return Err(unavailable("cannot open", &path, &e)),
            }
        }
    }

    /// Appends `batch` (original index, encoded frame, lockgate-id) under the topic lock,
    /// writing the assigned offsets into `out`. True if it started a new segment.
    fn append_batch(
        &self,
        batch: &[Pending<'_>],
        settings: &TopicSettings,
        now: u64,
        fsync: bool,
        out: &mut [Option<u64>],
    ) -> Result<bool, BrokerError> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let lock = self.lock_file(&mut st)?;
        let lock_path = self.dir.join("lock");
        lock.lock()
            .map_err(|e| unavailable("cannot lock", &lock_path, &e))?;
        let _unlock = Unlock(lock);
        self.sync(&mut st, true, true, settings)?;
        st.window.expire(now, settings.window_ms());
        st.window.trim(settings.duplicate_window_ids);

        let mut buf = Vec::new();
        let mut new_ids: HashSet<&[u8]> = HashSet::new();
        let mut assigned = Vec::new();
        let mut ids = Vec::new();
        let mut count = st.end.count;
        for &(i, frame, id) in batch {
            if let Some(id) = id {
                if st.window.contains(id) || !new_ids.insert(id) {
                    tracing::debug!(topic = %self.name, "Skipping a duplicate lockgate-id");
                    continue;
                }
                ids.push(id);
            }
            assigned.push((i, count));
            count += 1;
            buf.extend_from_slice(frame);
        }
        if buf.is_empty() && st.unlogged.is_empty() {
            return Ok(false);
        }
        let mut rolled = false;
        if !buf.is_empty() {
            let seg_dir = self.dir.join(SEGMENTS_DIR);
            let needs_new = match self.active(&mut st)? {
                None => true,
                Some(_) => st.end.pos >= settings.segment_bytes && st.end.count > st.end.base,
            };
            if needs_new {
                fs::create_dir_all(&seg_dir)
                    .map_err(|e| unavailable("cannot create", &seg_dir, &e))?;
                let base = st.end.count;
                let path = segment_path(&self.dir, base);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| unavailable("cannot create", &path, &e))?;
                if fsync {
                    sync_dir(&seg_dir)?;
                }
                rolled = st.active.is_some() || base > 0;
                st.active = Some((base, Arc::new(file)));
                st.end = End {
                    base,
                    pos: 0,
                    count: base,
                };
            }
            let Some((_, file)) = &st.active else {
                return Err(BrokerError::Unavailable(format!(
                    "no open segment for {}",
                    self.dir.display()
                )));
            };
            let path = segment_path(&self.dir, st.end.base);
            file.write_all_at(&buf, st.end.pos)
                .map_err(|e| unavailable("cannot write", &path, &e))?;
            if fsync {
                file.sync_data()
                    .map_err(|e| unavailable("cannot sync", &path, &e))?;
            }
            st.end.pos += buf.len() as u64;
            st.end.count = count;
            for id in &ids {
                st.window.push(now, id, settings.duplicate_window_ids);
            }
        }
        // The entry: the ids of this append and of frames no entry holds, and the new end.
        let unlogged = std::mem::take(&mut st.unlogged);
        let entry_ids: Vec<(u64, &[u8])> = unlogged
            .iter()
            .map(|(_, ts, id)| (*ts, &id[..]))
            .chain(ids.iter().map(|id| (now, *id)))
            .collect();
        // Only the newest `duplicate_window_ids` can still be in the window.
        let keep = entry_ids.len().min(settings.duplicate_window_ids);
        let entry = encode_entry(
            st.end,
            now,
            entry_ids[entry_ids.len() - keep..].iter().copied(),
        );
        self.write_entry(&mut st, &entry)?;
        self.maybe_compact(&mut st, fsync)?;
        for (i, offset) in assigned {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(offset);
            }
        }
        Ok(rolled)
    }

    /// Appends an encoded entry to the dedup file (under the topic lock).
    fn write_entry(&self, st: &mut TopicState, entry: &[u8]) -> Result<(), BrokerError> {
        let path = self.dedup_path();
        let Some(d) = &mut st.dedup else {
            return Err(BrokerError::Unavailable(format!(
                "{} is not open",
                path.display()
            )));
        };
        (&d.file)
            .write_all(entry)
            .map_err(|e| unavailable("cannot write", &path, &e))?;
        d.len += entry.len() as u64;
        Ok(())
    }

    /// Rewrites the dedup file with only the window once it is more than twice as large (and
    /// at least [`COMPACT_MIN_BYTES`]), atomically (under the topic lock).
    fn maybe_compact(&self, st: &mut TopicState, fsync: bool) -> Result<(), BrokerError> {
        let Some(d) = &st.dedup else { return Ok(()) };
        if d.len < COMPACT_MIN_BYTES || d.len < 2 * st.window.file_bytes() {
            return Ok(());
        }
        static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
        let path = self.dedup_path();
        let tmp = self.dir.join(format!(
            "{DEDUP_FILE}~{}-{}.tmp",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut bytes = Vec::new();
        let ids: Vec<(u64, &[u8])> = st.window.iter().collect();
        // Each chunk's time is that of its newest id: loading it forgets nothing it holds.
        if ids.is_empty() {
            bytes.extend(encode_entry(st.end, 0, std::iter::empty()));
        }
        for chunk in ids.chunks(COMPACT_CHUNK) {
            let time = chunk.iter().map(|(ts, _)| *ts).max().unwrap_or(0);
            bytes.extend(encode_entry(st.end, time, chunk.iter().copied()));
        }
        let result = (|| {
            let mut f = File::create(&tmp).map_err(|e| unavailable("cannot create", &tmp, &e))?;
            f.write_all(&bytes)
                .map_err(|e| unavailable("cannot write", &tmp, &e))?;
            if fsync {
                f.sync_all()
                    .map_err(|e| unavailable("cannot sync", &tmp, &e))?;
            }
            fs::rename(&tmp, &path).map_err(|e| unavailable("cannot rename to", &path, &e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| unavailable("cannot open", &path, &e))?;
        let ino = file
            .metadata()
            .map_err(|e| unavailable("cannot stat", &path, &e))?
            .ino();
        tracing::debug!(
            topic = %self.name,
            ids = ids.len(),
            "Compacted the dedup file"
        );
        st.dedup = Some(DedupFile {
            file,
            ino,
            len: bytes.len() as u64,
        });
        Ok(())
    }
}

/// Forgets what was read of a topic (its dedup file was replaced, or ids are now needed),
/// keeping the lock file and whether ids are tracked.
fn reset(st: &mut TopicState) {
    *st = TopicState {
        lock: st.lock.take(),
        loaded: st.loaded,
        with_ids: st.with_ids,
        ..TopicState::default()
    };
}

fn sync_dir(dir: &Path) -> Result<(), BrokerError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| unavailable("cannot sync", dir, &e))
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

/// A group file's content.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
struct GroupPosition {
    /// The committed offset: the next record to consume.
    offset: u64,
    /// Byte position of that record in its segment.
    position: u64,
    /// Base offset of the segment `position` is in (0 in files written before segments).
    #[serde(default)]
    segment: u64,
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

/// Acked offsets of a source and the (segment, byte position) of every offset the committed
/// position can take (the start of each delivered record still at or after it, and the end of
/// the last).
struct Progress {
    tracker: OffsetTracker,
    positions: BTreeMap<u64, (u64, u64)>,
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
                Some(&(segment, position)) => GroupPosition {
                    offset,
                    position,
                    segment,
                },
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
    reader: Cursor,
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
                if let Some(record) = self.reader.next()? {
                    // The record's own offset: the reader may have skipped records deleted by
                    // retention before it.
                    let offset = record.offset.unwrap_or(self.reader.offset - 1);
                    {
                        let mut p = self
                            .committer
                            .progress
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        p.tracker.begin(offset);
                        p.positions
                            .insert(offset + 1, (self.reader.base, self.reader.pos));
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
            let mut records = tokio::task::spawn_blocking(move || {
                broker.read(&topic, from, usize::try_from(max).unwrap_or(usize::MAX))
            })
            .await
            .map_err(|e| BrokerError::Unavailable(format!("scan task failed: {e}")))??;
            // Offsets may jump past records deleted by retention.
            let end = self.end;
            records.retain(|r| r.offset.is_some_and(|o| o < end));
            let Some(last) = records.last().and_then(|r| r.offset) else {
                return Ok(None);
            };
            self.next = last + 1;
            Ok(Some(records))
        })
    }
}
