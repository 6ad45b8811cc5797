//! `[telemetry]`: export beyond `/metrics` and the logs. For now one exporter, OpenTelemetry
//! over OTLP/HTTP (`[telemetry.otlp]`, docs/operate/observability.md#opentelemetry):
//!
//! ```toml
//! [telemetry.otlp]
//! endpoint = "http://collector:4318"          # <endpoint>/v1/traces and /v1/metrics
//! headers = { authorization = { env = "OTLP_AUTHORIZATION" } }
//! sampling_ratio = 0.1                        # of traces that start here
//! resource = { "deployment.environment" = "production" }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use super::reader::{Reader, describe, scalar};
use super::schema;
use super::secret::{Secret, SecretSource, parse_secret_value};

/// Default of `max_queue_spans`.
pub const DEFAULT_OTLP_MAX_QUEUE_SPANS: u64 = 2048;
/// Default of `export_timeout_ms`.
pub const DEFAULT_OTLP_EXPORT_TIMEOUT_MS: u64 = 10_000;
/// Default of `metrics_interval_ms`: a typical Prometheus scrape interval, so a dashboard on
/// the exported metrics looks like one on `/metrics`.
pub const DEFAULT_OTLP_METRICS_INTERVAL_MS: u64 = 15_000;

/// `[telemetry]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TelemetrySettings {
    /// `[telemetry.otlp]`, when present.
    pub otlp: Option<OtlpSettings>,
}

/// `[telemetry.otlp]`.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// The collector's base URL, without a trailing `/`.
    pub endpoint: String,
    /// Headers of every export request; the values may be secrets.
    pub headers: BTreeMap<String, Secret>,
    /// The share of new traces exported (0 to 1).
    pub sampling_ratio: f64,
    /// Resource attributes besides `service.name` and `service.version`.
    pub resource: BTreeMap<String, String>,
    /// Spans waiting to be sent at most.
    pub max_queue_spans: usize,
    /// How long one export request may take.
    pub export_timeout: Duration,
    /// Whether the message traces are exported.
    pub traces: bool,
    /// The metrics export's interval, if metrics are exported.
    pub metrics_interval: Option<Duration>,
}

impl OtlpSettings {
    /// Where traces are posted.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint)
    }

    /// Where metrics are posted.
    pub fn metrics_url(&self) -> String {
        format!("{}/v1/metrics", self.endpoint)
    }
}

/// Reads `[telemetry]` (the reader is on that table).
pub(super) fn parse_telemetry(r: &mut Reader<'_>) -> TelemetrySettings {
    let otlp = r.table("otlp").and_then(|t| {
        let mut o = r.child("otlp", t, &[&schema::TELEMETRY_OTLP]);
        let settings = parse_otlp(&mut o);
        o.finish();
        settings
    });
    r.finish();
    TelemetrySettings { otlp }
}

fn parse_otlp(r: &mut Reader<'_>) -> Option<OtlpSettings> {
    let endpoint = match r.non_empty("endpoint") {
        None => {
            if !r.has("endpoint") {
                r.problem(
                    "endpoint",
                    "missing: the collector's OTLP/HTTP URL, e.g. \"http://127.0.0.1:4318\"".into(),
                );
            }
            None
        }
        Some(e) => {
            let e = e.trim_end_matches('/').to_owned();
            let valid = e
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if valid.is_none() {
                r.problem(
                    "endpoint",
                    format!("\"{e}\" is not an http:// or https:// URL with a host"),
                );
                None
            } else {
                Some(e)
            }
        }
    };
    let _ = r.choice("protocol", &[("http/protobuf", ())]);
    let sampling_ratio = match r.number("sampling_ratio") {
        Some(x) if (0.0..=1.0).contains(&x) => x,
        Some(x) => {
            r.problem(
                "sampling_ratio",
                format!("{x} is not between 0 and 1 (the share of traces exported)"),
            );
            1.0
        }
        None => 1.0,
    };
    let mut headers = BTreeMap::new();
    if let Some(t) = r.table("headers") {
        for (name, value) in t {
            let path = r.key_path(&format!("headers.{name}"));
            let secret = match (value, scalar(value)) {
                (toml::Value::Table(_), _) => parse_secret_value(r.out, &path, value),
                (_, Some(s)) => {
                    Some(Secret::new(&path, SecretSource::Inline(s)).in_file(&r.out.file))
                }
                (other, None) => {
                    r.out.problems.push(super::Problem::new(
                        &path,
                        format!(
                            "expected a string or a secret ({{ env = \"NAME\" }} or {{ file = \"path\" }}), found {}",
                            describe(other)
                        ),
                    ));
                    None
                }
            };
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                r.out.problems.push(super::Problem::new(
                    &path,
                    format!("\"{name}\" is not a valid HTTP header name"),
                ));
                continue;
            }
            if let Some(s) = secret {
                headers.insert(name.to_ascii_lowercase(), s);
            }
        }
    }
    let mut resource = BTreeMap::new();
    if let Some(t) = r.table("resource") {
        for (k, v) in t {
            match scalar(v) {
                Some(s) => {
                    resource.insert(k.clone(), s);
                }
                None => {
                    let path = r.key_path(&format!("resource.{k}"));
                    r.out.problems.push(super::Problem::new(
                        &path,
                        format!(
                            "expected a string, number or boolean, found {}",
                            describe(v)
                        ),
                    ));
                }
            }
        }
    }
    let max_queue_spans = r
        .positive("max_queue_spans")
        .unwrap_or(DEFAULT_OTLP_MAX_QUEUE_SPANS);
    let export_timeout = Duration::from_millis(
        r.positive("export_timeout_ms")
            .unwrap_or(DEFAULT_OTLP_EXPORT_TIMEOUT_MS),
    );
    let traces = r.bool("traces").unwrap_or(true);
    let metrics = r.bool("metrics").unwrap_or(true);
    let interval = Duration::from_millis(
        r.positive("metrics_interval_ms")
            .unwrap_or(DEFAULT_OTLP_METRICS_INTERVAL_MS),
    );
    Some(OtlpSettings {
        endpoint: endpoint?,
        traces,
        metrics_interval: metrics.then_some(interval),
        headers,
        sampling_ratio,
        resource,
        max_queue_spans: usize::try_from(max_queue_spans).unwrap_or(usize::MAX),
        export_timeout,
    })
}
