//! Retention: deleting a topic's oldest segments by size and by age, never the last one, and
//! never records a consumer group has not committed unless `delete_unconsumed` says so.

use std::fs;
use std::io;
use std::ops::Range;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use super::super::BrokerError;
use super::frame::read_frame;
use super::segments::{self, Segment};
use super::{Topic, TopicSettings, read_group_file, unavailable};

/// What one retention pass deleted from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    /// The topic.
    pub topic: String,
    /// Segments deleted.
    pub segments: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The offsets they held.
    pub offsets: Range<u64>,
}

impl Topic {
    /// Deletes the oldest segments of this topic while they are over `max_bytes` (all segments
    /// together) or `max_age` (the next segment's first record, hence all of this one, is
    /// older), stopping at the last segment and at the first segment a group still needs.
    pub(super) fn enforce_retention(
        &self,
        settings: &TopicSettings,
        now: u64,
    ) -> Result<Removed, BrokerError> {
        let mut removed = Removed {
            topic: self.name.clone(),
            segments: 0,
            bytes: 0,
            offsets: 0..0,
        };
        if settings.max_bytes.is_none() && settings.max_age.is_none() {
            return Ok(removed);
        }
        let segs = segments::list(&self.dir)?;
        if segs.len() < 2 {
            return Ok(removed);
        }
        let mut sizes = Vec::with_capacity(segs.len());
        for s in &segs {
            sizes.push(match fs::metadata(&s.path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(unavailable("cannot stat", &s.path, &e)),
            });
        }
        let mut total: u64 = sizes.iter().sum();
        let slowest = self.slowest_group()?;
        let max_age_ms = settings
            .max_age
            .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
        let mut held = false;
        for (i, seg) in segs.iter().enumerate().take(segs.len() - 1) {
            let next = &segs[i + 1];
            let over_bytes = settings.max_bytes.is_some_and(|m| total > m);
            let expired = !over_bytes
                && max_age_ms.is_some_and(|age| {
                    self.first_time(next)
                        .is_some_and(|t| t.saturating_add(age) < now)
                });
            if !over_bytes && !expired {
                break;
            }
            let why = if over_bytes { "max_bytes" } else { "max_age" };
            if let Some((group, committed)) = &slowest
                && next.base > *committed
            {
                if !settings.delete_unconsumed {
                    held = true;
                    if !self.held_back.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            topic = %self.name,
                            "Retention ({why}) of topic {} is held back by group {group}, which committed offset {committed}: {} (offsets {}..{}) stays until the group consumes past it (delete the group's file in {} if the group is gone, or set delete_unconsumed = true)",
                            self.name,
                            seg.path.display(),
                            seg.base,
                            next.base - 1,
                            self.dir.join("groups").display()
                        );
                    }
                    break;
                }
                tracing::warn!(
                    topic = %self.name,
                    "Retention ({why}, delete_unconsumed) deletes offsets {}..{} of topic {} that group {group} has not consumed (it committed {committed})",
                    seg.base.max(*committed),
                    next.base - 1,
                    self.name
                );
            }
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(unavailable("cannot delete", &seg.path, &e)),
            }
            if removed.segments == 0 {
                removed.offsets.start = seg.base;
            }
            removed.offsets.end = next.base;
            removed.segments += 1;
            removed.bytes += sizes[i];
            total -= sizes[i];
            self.first_times
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&seg.base);
        }
        if !held && self.held_back.swap(false, Ordering::Relaxed) {
            tracing::info!(topic = %self.name, "Retention of topic {} is no longer held back", self.name);
        }
        if removed.segments > 0 {
            tracing::info!(
                topic = %self.name,
                "Retention deleted {} segment{} of topic {} ({} bytes, offsets {}..{}); {} bytes remain",
                removed.segments,
                if removed.segments == 1 { "" } else { "s" },
                self.name,
                removed.bytes,
                removed.offsets.start,
                removed.offsets.end - 1,
                total
            );
        }
        Ok(removed)
    }

    /// The group with the smallest committed offset, if the topic has groups.
    fn slowest_group(&self) -> Result<Option<(String, u64)>, BrokerError> {
        let dir = self.dir.join("groups");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable("cannot list", &dir, &e)),
        };
        let mut slowest: Option<(String, u64)> = None;
        for entry in entries {
            let entry = entry.map_err(|e| unavailable("cannot list", &dir, &e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporary files of a commit in progress.
            if name.contains('~') {
                continue;
            }
            let Some(g) = read_group_file(&entry.path())? else {
                continue;
            };
            if slowest.as_ref().is_none_or(|(_, o)| g.offset < *o) {
                slowest = Some((name, g.offset));
            }
        }
        Ok(slowest)
    }

    /// The append time of a segment's first record (cached: it never changes).
    fn first_time(&self, seg: &Segment) -> Option<u64> {
        let mut cache = self
            .first_times
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = cache.get(&seg.base) {
            return Some(*t);
        }
        let file = fs::File::open(&seg.path).ok()?;
        let (body, _) = read_frame(&mut io::BufReader::new(file)).ok()??;
        cache.insert(seg.base, body.timestamp_ms);
        Some(body.timestamp_ms)
    }
}
