//! Counters of one handler's outbound requests, per host and outcome, and their durations; the
//! admin endpoint renders them as `lockgate_http_requests_total` and
//! `lockgate_http_request_seconds`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use std::time::SystemTime;

use crate::metrics::{Histogram, HistogramSnapshot};

/// How an outbound request ended, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HttpOutcome {
    /// A 1xx, 2xx or 3xx response (redirects are not followed: the handler decides).
    Success,
    /// A 4xx response.
    ClientError,
    /// A 5xx response.
    ServerError,
    /// No response before its timeout or the call's deadline.
    Timeout,
    /// No connection: refused, unreachable, DNS, TLS, or an internal address a wildcard reached.
    Refused,
    /// Not sent: no grant allows the URL, or a limit refused it.
    Denied,
}

impl HttpOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "2xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::Denied => "denied",
        }
    }

    /// The outcome of a response with `status`.
    pub fn of_status(status: u16) -> Self {
        match status {
            500.. => Self::ServerError,
            400..500 => Self::ClientError,
            _ => Self::Success,
        }
    }
}

/// Buckets of the request-duration histogram, in seconds (1 ms .. ~65 s).
fn buckets() -> Vec<f64> {
    crate::metrics::exponential_buckets(0.001, 4.0, 9)
}

/// The counters of one handler's requests.
#[derive(Debug)]
pub struct HttpStats {
    counts: Mutex<BTreeMap<(String, HttpOutcome), u64>>,
    seconds: Mutex<BTreeMap<String, Histogram>>,
    since: SystemTime,
}

impl Default for HttpStats {
    fn default() -> Self {
        Self {
            counts: Mutex::default(),
            seconds: Mutex::default(),
            since: SystemTime::now(),
        }
    }
}

impl HttpStats {
    /// Counts one request to `host` that ended as `outcome` after `seconds` (none for a request
    /// that was not sent).
    pub(crate) fn record(&self, host: &str, outcome: HttpOutcome, seconds: Option<f64>) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry((host.to_owned(), outcome)).or_default() += 1;
        }
        if let (Some(s), Ok(mut h)) = (seconds, self.seconds.lock()) {
            h.entry(host.to_owned())
                .or_insert_with(|| Histogram::new(buckets()))
                .observe(s);
        }
    }

    /// `(host, outcome, count)` of every pair seen.
    pub fn counts(&self) -> Vec<(String, HttpOutcome, u64)> {
        self.counts
            .lock()
            .map(|c| c.iter().map(|((h, o), n)| (h.clone(), *o, *n)).collect())
            .unwrap_or_default()
    }

    /// The duration histogram of every host seen.
    pub fn durations(&self) -> Vec<(String, HistogramSnapshot)> {
        self.seconds
            .lock()
            .map(|h| h.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect())
            .unwrap_or_default()
    }

    /// When these counters started (each handler version has its own).
    pub fn since(&self) -> SystemTime {
        self.since
    }
}
