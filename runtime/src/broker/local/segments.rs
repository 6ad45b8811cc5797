//! A topic's segments on disk and the lock-free reader that walks them.
//!
//! Segment files are `segments/<base offset, 20 digits>.log`, so their names sort by offset and
//! a segment's first offset is in its name. A topic written by an older lockgate has one file,
//! `log`: it is segment 0 until the first append moves it into `segments/` (a rename, so readers
//! holding it open keep reading).

use std::fs::{self, File};
use std::io::{self, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::super::{BrokerError, Record};
use super::frame::read_frame;
use super::unavailable;

/// Directory of the segments in a topic's directory.
pub(super) const SEGMENTS_DIR: &str = "segments";
/// The single log file of a topic written by lockgate before segments.
pub(super) const LEGACY_LOG: &str = "log";

/// Path of segment `base` of the topic in `dir`.
pub(super) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(SEGMENTS_DIR).join(format!("{base:020}.log"))
}

/// One segment file.
#[derive(Clone, Debug)]
pub(super) struct Segment {
    /// Offset of its first record.
    pub(super) base: u64,
    pub(super) path: PathBuf,
}

/// The segments of the topic in `dir`, oldest first (none if the topic does not exist). A
/// single-file log of an older lockgate counts as segment 0 until it is moved.
pub(super) fn list(dir: &Path) -> Result<Vec<Segment>, BrokerError> {
    let seg_dir = dir.join(SEGMENTS_DIR);
    let mut out = Vec::new();
    match fs::read_dir(&seg_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| unavailable("cannot list", &seg_dir, &e))?;
                let name = entry.file_name();
                let Some(base) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .filter(|n| n.len() == 20)
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                out.push(Segment {
                    base,
                    path: entry.path(),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(unavailable("cannot list", &seg_dir, &e)),
    }
    out.sort_by_key(|s| s.base);
    if out.first().is_none_or(|s| s.base != 0) {
        let legacy = dir.join(LEGACY_LOG);
        if legacy.is_file() {
            out.insert(
                0,
                Segment {
                    base: 0,
                    path: legacy,
                },
            );
        }
    }
    Ok(out)
}

/// Opens segment `base` for reading (the legacy log for 0 when it was not moved yet).
pub(super) fn open(dir: &Path, base: u64) -> io::Result<(File, PathBuf)> {
    let path = segment_path(dir, base);
    match File::open(&path) {
        Ok(f) => Ok((f, path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && base == 0 => {
            let legacy = dir.join(LEGACY_LOG);
            File::open(&legacy).map(|f| (f, legacy))
        }
        Err(e) => Err(e),
    }
}

/// Moves the single-file log of an older lockgate into `segments/` as segment 0 (called under
/// the topic lock). True if it moved one.
pub(super) fn migrate_legacy(topic: &str, dir: &Path) -> Result<bool, BrokerError> {
    let legacy = dir.join(LEGACY_LOG);
    if !legacy.is_file() {
        return Ok(false);
    }
    let first = segment_path(dir, 0);
    if first.exists() {
        return Err(BrokerError::Invalid(format!(
            "{} and {} both exist: a lockgate older than segments appended to topic {topic} after the upgrade; stop it, then move the records of {} elsewhere and delete it",
            legacy.display(),
            first.display(),
            legacy.display()
        )));
    }
    let seg_dir = dir.join(SEGMENTS_DIR);
    fs::create_dir_all(&seg_dir).map_err(|e| unavailable("cannot create", &seg_dir, &e))?;
    fs::rename(&legacy, &first).map_err(|e| unavailable("cannot move", &legacy, &e))?;
    tracing::info!(
        topic,
        "Moved {} (the single-file log of an older lockgate) to {}; its offsets, committed positions and records are unchanged",
        legacy.display(),
        first.display()
    );
    Ok(true)
}

/// A buffered reader of a topic that never locks: it follows the records across segments, stops
/// at the first incomplete or corrupt frame (it may still be being written) and tries again from
/// there on the next call.
pub(super) struct Cursor {
    topic: String,
    dir: PathBuf,
    /// Who reads, for log messages ("group g", "a read").
    who: String,
    /// Base offset of the segment being read.
    pub(super) base: u64,
    /// The open segment and its path.
    file: Option<(BufReader<File>, PathBuf)>,
    /// Byte position of the next frame in the segment.
    pub(super) pos: u64,
    /// Offset of the next record.
    pub(super) offset: u64,
    /// Ends of data in a row; every `check_every`-th looks for a corrupt segment to skip.
    idle: u32,
    check_every: u32,
}

impl Cursor {
    /// A cursor at `offset`, which is at byte `pos` of segment `base`. `check_every`: how many
    /// ends of data in a row before the cursor lists the segments to look for a reason it
    /// cannot go on (1 for one-shot reads, more for a polling source).
    pub(super) fn new(
        topic: &str,
        dir: &Path,
        who: &str,
        (base, pos, offset): (u64, u64, u64),
        check_every: u32,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            dir: dir.to_owned(),
            who: who.to_owned(),
            base,
            file: None,
            pos,
            offset,
            idle: 0,
            check_every: check_every.max(1),
        }
    }

    /// A cursor at `offset`, found by reading its segment from the start. An offset before the
    /// earliest one retained gives a cursor at the earliest.
    pub(super) fn seek(
        topic: &str,
        dir: &Path,
        who: &str,
        offset: u64,
        check_every: u32,
    ) -> Result<Self, BrokerError> {
        let segments = list(dir)?;
        let base = match segments.iter().rev().find(|s| s.base <= offset) {
            Some(s) => s.base,
            None => segments.first().map_or(0, |s| s.base),
        };
        let mut c = Self::new(topic, dir, who, (base, 0, base), check_every);
        while c.offset < offset {
            if c.next()?.is_none() {
                break;
            }
        }
        Ok(c)
    }

    /// The next record, or `None` at the current end of the valid data.
    pub(super) fn next(&mut self) -> Result<Option<Record>, BrokerError> {
        // Bounds the (unlikely) case of a segment that keeps vanishing between list and open.
        for _ in 0..1000 {
            if !self.ensure_open()? {
                if self.relocate()? {
                    continue;
                }
                return Ok(None);
            }
            if let Some(r) = self.read_one()? {
                return Ok(Some(r));
            }
            // The end of this segment's valid data. If the next segment exists, this one is
            // sealed: read once more (its last frame may have become visible since) and move on.
            if self.offset > self.base && segment_path(&self.dir, self.offset).exists() {
                if let Some(r) = self.read_one()? {
                    return Ok(Some(r));
                }
                self.base = self.offset;
                self.pos = 0;
                self.file = None;
                continue;
            }
            self.idle += 1;
            if self.idle.is_multiple_of(self.check_every) {
                // No segment starts at the next offset. Later ones mean that this segment was
                // deleted by retention (its records were read through the open file) or is
                // corrupt before its end; either way the cursor goes on where records exist.
                let segments = list(&self.dir)?;
                if let Some(next) = segments.iter().find(|s| s.base > self.base) {
                    if let Some(r) = self.read_one()? {
                        return Ok(Some(r));
                    }
                    if segments.iter().any(|s| s.base == self.base) {
                        tracing::error!(
                            topic = %self.topic,
                            "{}: segment {} is corrupt at byte {}: offsets {}..{} cannot be read and are skipped; continuing at {}",
                            self.who,
                            segment_path(&self.dir, self.base).display(),
                            self.pos,
                            self.offset,
                            next.base.saturating_sub(1),
                            next.base
                        );
                        self.base = next.base;
                        self.pos = 0;
                        self.offset = next.base;
                        self.file = None;
                        continue;
                    }
                    self.file = None;
                    if self.relocate()? {
                        continue;
                    }
                }
            }
            return Ok(None);
        }
        Ok(None)
    }

    fn read_one(&mut self) -> Result<Option<Record>, BrokerError> {
        let Some((file, path)) = &mut self.file else {
            return Ok(None);
        };
        match read_frame(file).map_err(|e| unavailable("cannot read", path, &e))? {
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
                    delivery: None,
                };
                self.pos += size;
                self.offset += 1;
                self.idle = 0;
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

    /// The segment being read is gone (deleted by retention, or moved by the migration of a
    /// legacy log): finds `offset` again. An offset that retention deleted continues at the
    /// earliest one retained, with a warning. False if the topic has no segment at all.
    fn relocate(&mut self) -> Result<bool, BrokerError> {
        let segments = list(&self.dir)?;
        let Some(first) = segments.first() else {
            return Ok(false);
        };
        match segments.iter().rev().find(|s| s.base <= self.offset) {
            // The same segment under another path (a legacy log moved into segments/).
            Some(s) if s.base == self.base => {}
            Some(s) if s.base == self.offset => {
                self.base = s.base;
                self.pos = 0;
            }
            Some(s) => {
                // `offset` lies inside a segment whose byte positions are not known: read to it.
                let mut c = Cursor::new(
                    &self.topic,
                    &self.dir,
                    &self.who,
                    (s.base, 0, s.base),
                    self.check_every,
                );
                while c.offset < self.offset {
                    if c.read_one_opening()?.is_none() {
                        break;
                    }
                }
                self.base = c.base;
                self.pos = c.pos;
                self.offset = c.offset;
            }
            None => {
                tracing::warn!(
                    topic = %self.topic,
                    "{}: offsets {}..{} were deleted by retention before they were read; continuing at {}",
                    self.who,
                    self.offset,
                    first.base - 1,
                    first.base
                );
                self.base = first.base;
                self.pos = 0;
                self.offset = first.base;
            }
        }
        self.file = None;
        Ok(true)
    }

    /// Opens the segment being read if it is not open; false if it does not exist.
    fn ensure_open(&mut self) -> Result<bool, BrokerError> {
        if self.file.is_some() {
            return Ok(true);
        }
        match open(&self.dir, self.base) {
            Ok((f, path)) => {
                let mut r = BufReader::new(f);
                r.seek(SeekFrom::Start(self.pos))
                    .map_err(|e| unavailable("cannot read", &path, &e))?;
                self.file = Some((r, path));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(unavailable(
                "cannot open",
                &segment_path(&self.dir, self.base),
                &e,
            )),
        }
    }

    /// [`Cursor::read_one`], opening the segment first if needed (and staying in it).
    fn read_one_opening(&mut self) -> Result<Option<Record>, BrokerError> {
        if !self.ensure_open()? {
            return Ok(None);
        }
        self.read_one()
    }
}
