//! What the embedded broker is told by `[local]` in runtime.toml: segment size, retention and
//! the duplicate window, for all topics and per topic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Default roll size of a segment: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Smallest `segment_bytes` accepted.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Default `max_bytes` of a topic: 1 GiB over all its segments.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default `max_age_ms` of a topic: 7 days (Kafka's default).
pub const DEFAULT_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Default duplicate window: 2 minutes (JetStream's default `duplicate_window`).
pub const DEFAULT_DUPLICATE_WINDOW_MS: u64 = 120_000;
/// Default most ids in a topic's duplicate window.
pub const DEFAULT_DUPLICATE_WINDOW_IDS: u64 = 100_000;
/// Largest `duplicate_window_ids` accepted (memory: about 100 bytes per id).
pub const MAX_DUPLICATE_WINDOW_IDS: u64 = 10_000_000;

/// The settings of one topic, resolved from `[local]`, the DLQ rule and `[local.topics.<name>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSettings {
    /// `segment_bytes`: an append to a segment this large or larger starts a new one.
    pub segment_bytes: u64,
    /// `max_bytes`: retention deletes the oldest segments while all segments together are
    /// larger; `None` is unlimited.
    pub max_bytes: Option<u64>,
    /// `max_age_ms`: retention deletes a segment once its newest record is older; `None` is
    /// unlimited.
    pub max_age: Option<Duration>,
    /// `delete_unconsumed`: retention may delete records a consumer group has not committed
    /// (that group then skips them, with a warning). Off by default: a group holds them back.
    pub delete_unconsumed: bool,
    /// `duplicate_window_ms`: how long a `lockgate-id` is remembered after its append.
    pub duplicate_window: Duration,
    /// `duplicate_window_ids`: most ids remembered; the oldest go first.
    pub duplicate_window_ids: usize,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_bytes: Some(DEFAULT_MAX_BYTES),
            max_age: Some(Duration::from_millis(DEFAULT_MAX_AGE_MS)),
            delete_unconsumed: false,
            duplicate_window: Duration::from_millis(DEFAULT_DUPLICATE_WINDOW_MS),
            duplicate_window_ids: DEFAULT_DUPLICATE_WINDOW_IDS as usize,
        }
    }
}

impl TopicSettings {
    /// The duplicate window in ms (saturating).
    pub(super) fn window_ms(&self) -> u64 {
        u64::try_from(self.duplicate_window.as_millis()).unwrap_or(u64::MAX)
    }
}

/// `[local.topics.<name>]`: the fields it sets; the others come from `[local]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicOverride {
    /// `segment_bytes`.
    pub segment_bytes: Option<u64>,
    /// `max_bytes` (`Some(None)`: `"unlimited"`).
    pub max_bytes: Option<Option<u64>>,
    /// `max_age_ms` (`Some(None)`: `"unlimited"`).
    pub max_age: Option<Option<Duration>>,
    /// `delete_unconsumed`.
    pub delete_unconsumed: Option<bool>,
    /// `duplicate_window_ms`.
    pub duplicate_window: Option<Duration>,
    /// `duplicate_window_ids`.
    pub duplicate_window_ids: Option<usize>,
}

/// The embedded broker's settings: `[local]` for every topic, `[local.topics.<name>]` for one.
///
/// A topic that a route uses as its DLQ on the embedded broker has no size or age limit unless
/// its own table sets one: retention never silently drops dead letters that were not replayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalSettings {
    /// `[local]`: every topic's settings unless overridden.
    pub defaults: TopicSettings,
    /// `[local.topics.<name>]`, by topic.
    pub topics: BTreeMap<String, TopicOverride>,
    /// Topics that routes dead-letter to on the embedded broker.
    pub dlq_topics: BTreeSet<String>,
}

impl LocalSettings {
    /// The settings of `topic`.
    pub fn topic(&self, topic: &str) -> TopicSettings {
        let mut s = self.defaults.clone();
        if self.dlq_topics.contains(topic) {
            s.max_bytes = None;
            s.max_age = None;
        }
        if let Some(o) = self.topics.get(topic) {
            o.apply_to(&mut s);
        }
        s
    }
}

impl TopicOverride {
    /// Sets the fields this override has in `s`.
    pub fn apply_to(&self, s: &mut TopicSettings) {
        if let Some(v) = self.segment_bytes {
            s.segment_bytes = v;
        }
        if let Some(v) = self.max_bytes {
            s.max_bytes = v;
        }
        if let Some(v) = self.max_age {
            s.max_age = v;
        }
        if let Some(v) = self.delete_unconsumed {
            s.delete_unconsumed = v;
        }
        if let Some(v) = self.duplicate_window {
            s.duplicate_window = v;
        }
        if let Some(v) = self.duplicate_window_ids {
            s.duplicate_window_ids = v;
        }
    }
}
