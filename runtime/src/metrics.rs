//! The metric model: what the admin endpoint renders on `/metrics` (Prometheus text) and what
//! the OTLP export sends (`[telemetry.otlp]`), taken from one snapshot so the two can never
//! disagree (docs/operate/observability.md#metrics).
//!
//! The pipeline and the engine count with plain atomics and the [`Histogram`] here; the
//! telemetry layer reads them into [`Family`]s at scrape or export time.

use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// A histogram with fixed bucket bounds whose buckets can be read back (the OTLP export needs
/// them; `prometheus-client`'s own histogram only renders them as text).
#[derive(Debug)]
pub struct Histogram {
    inner: Mutex<HistogramSnapshot>,
}

/// What a [`Histogram`] holds at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the finite buckets, ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative): one more than `bounds`, the last being the
    /// overflow bucket (`+Inf`).
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// A histogram with these upper bounds (sorted; non-finite ones dropped, the overflow
    /// bucket is implicit).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let mut bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let counts = vec![0; bounds.len() + 1];
        Self {
            inner: Mutex::new(HistogramSnapshot {
                bounds,
                counts,
                sum: 0.0,
                count: 0,
            }),
        }
    }

    /// Records one observation (a NaN counts in the overflow bucket, as Prometheus does).
    pub fn observe(&self, v: f64) {
        let mut h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let i = h
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(h.bounds.len());
        if let Some(c) = h.counts.get_mut(i) {
            *c += 1;
        }
        h.count += 1;
        if !v.is_nan() {
            h.sum += v;
        }
    }

    /// A copy of what it holds now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// `length` bounds from `start`, each `factor` times the one before.
pub fn exponential_buckets(start: f64, factor: f64, length: u16) -> Vec<f64> {
    (0..length)
        .scan(start, |b, _| {
            let this = *b;
            *b *= factor;
            Some(this)
        })
        .collect()
}

/// What kind of series a family holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (from the series' start); Prometheus adds `_total` to its name.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution of observations in buckets.
    Histogram,
}

/// The value of one series.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A counter's count.
    Counter(u64),
    /// A gauge's value.
    Gauge(i64),
    /// A histogram's buckets.
    Histogram(HistogramSnapshot),
}

/// One series of a family: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Label names and values.
    pub labels: Vec<(&'static str, String)>,
    /// The value now.
    pub value: Value,
    /// When the series started counting (a counter that starts again after a reload has a
    /// new start), for cumulative OTLP points.
    pub start: SystemTime,
}

/// A metric: its name (without `_total` for counters), help, kind and series.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// The name.
    pub name: &'static str,
    /// What it measures.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Its series (a family with none is still described).
    pub samples: Vec<Sample>,
}

impl Family {
    /// A family without series yet.
    pub fn new(name: &'static str, help: &'static str, kind: Kind) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a series.
    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: Value, start: SystemTime) {
        self.samples.push(Sample {
            labels,
            value,
            start,
        });
    }

    /// The OTLP unit of the family, from its name's suffix (UCUM).
    pub fn unit(&self) -> &'static str {
        if self.name.ends_with("_seconds") {
            "s"
        } else {
            ""
        }
    }
}

/// When this process started counting: the start of process-wide counters.
pub fn process_start() -> SystemTime {
    static START: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *START.get_or_init(SystemTime::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new([1.0, 0.1, f64::INFINITY, 0.1]);
        for v in [0.05, 0.1, 0.5, 7.0, f64::NAN] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.bounds, vec![0.1, 1.0]);
        assert_eq!(s.counts, vec![2, 1, 2]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 7.65).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn exponential_bounds_grow_by_the_factor() {
        assert_eq!(
            exponential_buckets(0.001, 4.0, 3),
            vec![0.001, 0.004, 0.016]
        );
    }
}
