//! `[local]`: the embedded broker's segment size, retention and duplicate window, for every
//! topic and per topic (`[local.topics.<topic>]`).
//!
//! Example:
//! ```toml
//! [local]
//! segment_bytes = 67108864          # roll a new segment file at 64 MiB
//! max_bytes = 1073741824            # per topic, all segments; or "unlimited"
//! max_age_ms = 604800000            # 7 days; or "unlimited"
//! delete_unconsumed = false         # retention waits for consumer groups
//! duplicate_window_ms = 120000      # lockgate-id remembered for 2 minutes...
//! duplicate_window_ids = 100000     # ...and at most this many per topic
//!
//! [local.topics."orders.dlq"]       # a topic's own settings (any of the above)
//! max_age_ms = 2592000000
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::reader::{Problem, Reader, describe};
use super::schema;

/// The word that lifts a size or age limit.
const UNLIMITED: &str = "unlimited";

/// Reads `[local]` (the reader is on that table). The DLQ topics are filled in by the caller,
/// which knows the routes.
pub(super) fn parse_local(r: &mut Reader<'_>) -> LocalSettings {
    let own = parse_fields(r);
    let mut defaults = TopicSettings::default();
    own.apply_to(&mut defaults);
    check_sizes(r, &defaults, &own);
    let mut topics = BTreeMap::new();
    if let Some(t) = r.table("topics") {
        for (name, value) in t {
            let path = r.key_path(&format!("topics.{name}"));
            if let Err(why) = check_topic_name(name) {
                r.out.problems.push(Problem::new(&path, why));
                continue;
            }
            let Some(table) = value.as_table() else {
                r.out.problems.push(Problem::new(
                    &path,
                    format!("expected a table, found {}", describe(value)),
                ));
                continue;
            };
            let mut tr = Reader::new(&path, table, &[&schema::LOCAL_TOPIC], r.out);
            let o = parse_fields(&mut tr);
            let mut resolved = defaults.clone();
            o.apply_to(&mut resolved);
            check_sizes(&mut tr, &resolved, &o);
            tr.finish();
            topics.insert(name.clone(), o);
        }
    }
    r.finish();
    LocalSettings {
        defaults,
        topics,
        dlq_topics: Default::default(),
    }
}

fn parse_fields(r: &mut Reader<'_>) -> TopicOverride {
    let mut o = TopicOverride::default();
    if let Some(n) = r.positive("segment_bytes") {
        if n < MIN_SEGMENT_BYTES {
            r.problem(
                "segment_bytes",
                format!("{n} is too small: at least {MIN_SEGMENT_BYTES}"),
            );
        } else {
            o.segment_bytes = Some(n);
        }
    }
    o.max_bytes = limit(r, "max_bytes");
    o.max_age = limit(r, "max_age_ms").map(|l| l.map(Duration::from_millis));
    o.delete_unconsumed = r.bool("delete_unconsumed");
    o.duplicate_window = r.positive("duplicate_window_ms").map(Duration::from_millis);
    if let Some(n) = r.positive("duplicate_window_ids") {
        if n > MAX_DUPLICATE_WINDOW_IDS {
            r.problem(
                "duplicate_window_ids",
                format!(
                    "{n} is over the limit of {MAX_DUPLICATE_WINDOW_IDS} (each id is kept in memory)"
                ),
            );
        } else {
            o.duplicate_window_ids = usize::try_from(n).ok();
        }
    }
    o
}

/// A positive integer or `"unlimited"` (`Some(None)`).
fn limit(r: &mut Reader<'_>, key: &str) -> Option<Option<u64>> {
    match r.get(key) {
        Some(toml::Value::String(s)) => {
            if s == UNLIMITED {
                Some(None)
            } else {
                r.problem(
                    key,
                    format!("expected a positive integer or \"{UNLIMITED}\", found string \"{s}\""),
                );
                None
            }
        }
        _ => r.positive(key).map(Some),
    }
}

/// A size limit under one segment cannot be kept: retention deletes whole segments and never
/// the last one.
fn check_sizes(r: &mut Reader<'_>, s: &TopicSettings, o: &TopicOverride) {
    if let Some(max) = s.max_bytes
        && max < s.segment_bytes
        && (o.max_bytes.is_some() || o.segment_bytes.is_some())
    {
        let key = if o.max_bytes.is_some() {
            "max_bytes"
        } else {
            "segment_bytes"
        };
        r.problem(
            key,
            format!(
                "max_bytes {max} is less than segment_bytes {}: retention deletes whole segments and always keeps the last one, so the topic would still hold up to segment_bytes; raise max_bytes or lower segment_bytes",
                s.segment_bytes
            ),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(Path::new("rt.toml"), text)
            .map_err(|e| e.to_string().lines().map(str::to_owned).collect())
    }

    #[test]
    fn defaults_without_a_local_table() {
        let c = parse("").unwrap();
        assert_eq!(c.local.defaults, TopicSettings::default());
        let t = c.local.topic("anything");
        assert_eq!(t.segment_bytes, 64 << 20);
        assert_eq!(t.max_bytes, Some(1 << 30));
        assert_eq!(t.max_age, Some(Duration::from_secs(7 * 24 * 3600)));
        assert!(!t.delete_unconsumed);
        assert_eq!(t.duplicate_window, Duration::from_secs(120));
        assert_eq!(t.duplicate_window_ids, 100_000);
    }

    #[test]
    fn topics_override_the_defaults_and_dlq_topics_are_unlimited() {
        let c = parse(
            "[local]\nsegment_bytes = 1048576\nmax_bytes = 8388608\nmax_age_ms = \"unlimited\"\nduplicate_window_ms = 5000\nduplicate_window_ids = 10\n\n[local.topics.\"orders.v1\"]\nmax_bytes = \"unlimited\"\ndelete_unconsumed = true\n\n[local.topics.\"orders.dlq\"]\nmax_age_ms = 86400000\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"orders\" }\n",
        )
        .unwrap();
        let d = c.local.topic("other");
        assert_eq!(
            (d.segment_bytes, d.max_bytes, d.max_age),
            (1 << 20, Some(8 << 20), None)
        );
        assert_eq!(
            (d.duplicate_window, d.duplicate_window_ids),
            (Duration::from_secs(5), 10)
        );
        let v1 = c.local.topic("orders.v1");
        assert_eq!((v1.max_bytes, v1.delete_unconsumed), (None, true));
        assert_eq!(v1.segment_bytes, 1 << 20);
        // The route's DLQ (orders.dlq, the default) has no size limit; its own age limit holds.
        let dlq = c.local.topic("orders.dlq");
        assert_eq!(
            (dlq.max_bytes, dlq.max_age),
            (None, Some(Duration::from_secs(86400)))
        );
        assert_eq!(c.local.topic("orders").max_bytes, Some(8 << 20));
    }

    #[test]
    fn bad_values_name_the_file_field_and_value() {
        let p = parse(
            "[local]\nsegment_bytes = 100\nmax_bytes = \"lots\"\nmax_age_ms = 0\ndelete_unconsumed = \"yes\"\nduplicate_window_ids = 99999999\nduplicat_window_ms = 5\n\n[local.topics.\"bad/name\"]\nmax_bytes = 1\n\n[local.topics.t]\nmax_bytes = 1000\n\n[local.topics.u]\nsegment_bytes = 2000000000\n",
        )
        .unwrap_err();
        assert_eq!(
            p,
            vec![
                "rt.toml: local.segment_bytes: 100 is too small: at least 4096",
                "rt.toml: local.max_bytes: expected a positive integer or \"unlimited\", found string \"lots\"",
                "rt.toml: local.max_age_ms: must be greater than 0, found 0",
                "rt.toml: local.delete_unconsumed: expected a boolean, found string \"yes\"",
                "rt.toml: local.duplicate_window_ids: 99999999 is over the limit of 10000000 (each id is kept in memory)",
                "rt.toml: local.topics.bad/name: invalid topic name \"bad/name\": use 1-249 characters of A-Z a-z 0-9 . _ - (not \".\" or \"..\")",
                "rt.toml: local.topics.t.max_bytes: max_bytes 1000 is less than segment_bytes 67108864: retention deletes whole segments and always keeps the last one, so the topic would still hold up to segment_bytes; raise max_bytes or lower segment_bytes",
                "rt.toml: local.topics.u.segment_bytes: max_bytes 1073741824 is less than segment_bytes 2000000000: retention deletes whole segments and always keeps the last one, so the topic would still hold up to segment_bytes; raise max_bytes or lower segment_bytes",
                "rt.toml: local.duplicat_window_ms: unknown field `duplicat_window_ms`; did you mean `duplicate_window_ms`?",
            ]
        );
    }
}

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
    pub fn window_ms(&self) -> u64 {
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

/// Whether `name` can name a topic or consumer group of the embedded broker: 1-249 characters
/// of `[A-Za-z0-9._-]`, not `.` or `..` (a name is a directory name).
pub fn name_ok(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a topic name for the embedded broker; the error says what is allowed.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name_ok(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid topic name {name:?}: use 1-249 characters of A-Z a-z 0-9 . _ - (not \".\" or \"..\")"
        ))
    }
}
