//! The metrics over OTLP/HTTP (`[telemetry.otlp]`, docs/operate/observability.md#opentelemetry):
//! every `metrics_interval_ms`, and once more when the runtime stops, the same snapshot that
//! `/metrics` renders ([`AdminRoutes::families`]) is posted to `<endpoint>/v1/metrics`.
//!
//! Counters become cumulative monotonic sums (named without Prometheus's `_total`, which a
//! Prometheus fed from OTLP adds back), gauges gauges, histograms explicit-bucket histograms;
//! labels become attributes. Each point starts when its series started counting (a reloaded
//! route's counters start again, and so does their start time), so a backend computes rates
//! across reloads correctly.
//!
//! Nothing in the pipeline waits on it: a task of its own reads the atomics and sends; a
//! collector that is down costs a failed request per interval, counted in
//! `lockgate_otlp_metric_exports_failed_total` and logged at the first failure and every 100th.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tokio::sync::oneshot;

use super::AdminRoutes;
use super::otlp::{Client, OtlpError};
use crate::config::telemetry::OtlpSettings;
use crate::metrics::{Family, Kind, Value};

/// How long the stop waits for the last export (the traces' flush waits as long).
pub const FINAL_EXPORT_WAIT: Duration = Duration::from_secs(5);

/// Metrics exports the collector did not accept.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Metrics exports that failed since the process started.
pub fn failed_exports() -> u64 {
    FAILED.load(Ordering::Relaxed)
}

/// A running metrics export; [`MetricsExport::finish`] sends the last snapshot and ends it.
pub struct MetricsExport {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MetricsExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsExport").finish_non_exhaustive()
    }
}

impl MetricsExport {
    /// Sends what the routes counted last (after they drained) and waits for it, at most
    /// [`FINAL_EXPORT_WAIT`]: a collector that does not answer must not hold the exit.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(FINAL_EXPORT_WAIT, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for MetricsExport {
    fn drop(&mut self) {
        // Dropped without `finish` (a failed start): nothing more to send.
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Starts exporting `routes`' metrics on the current tokio runtime, if `settings` asks for
/// metrics. Secrets in `headers` are read now.
pub fn start(
    settings: &OtlpSettings,
    routes: AdminRoutes,
) -> Result<Option<MetricsExport>, OtlpError> {
    let Some(interval) = settings.metrics_interval else {
        return Ok(None);
    };
    let exporter = Exporter::new(settings)?;
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: the first export goes out one interval after the start.
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => exporter.export(&routes.families()).await,
                _ = &mut stopped => {
                    exporter.export(&routes.families()).await;
                    return;
                }
            }
        }
    });
    Ok(Some(MetricsExport {
        stop: Some(stop),
        task,
    }))
}

/// Where and how snapshots are sent.
struct Exporter {
    client: Client,
    url: String,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    resource: Resource,
    scope: InstrumentationScope,
}

impl Exporter {
    fn new(settings: &OtlpSettings) -> Result<Self, OtlpError> {
        let mut headers = Vec::new();
        for (name, secret) in &settings.headers {
            let value = secret
                .resolve()
                .map_err(|e| OtlpError::Secret(e.to_string()))?;
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| OtlpError::Exporter(format!("header {name}: {e}")))?;
            let value = http::HeaderValue::from_str(&value)
                .map_err(|e| OtlpError::Exporter(format!("header {name}: {e}")))?;
            headers.push((name, value));
        }
        let mut attributes = BTreeMap::from([
            ("service.name".to_owned(), "lockgate".to_owned()),
            (
                "service.version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            ),
        ]);
        attributes.extend(settings.resource.clone());
        Ok(Self {
            client: Client::new(settings.export_timeout),
            url: settings.metrics_url(),
            headers,
            resource: Resource {
                attributes: attributes
                    .into_iter()
                    .map(|(k, v)| text_attribute(k, v))
                    .collect(),
                ..Resource::default()
            },
            scope: InstrumentationScope {
                name: "lockgate".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..InstrumentationScope::default()
            },
        })
    }

    async fn export(&self, families: &[Family]) {
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(self.scope.clone()),
                    metrics: to_otlp(families, SystemTime::now()),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let mut http = http::Request::new(Bytes::from(request.encode_to_vec()));
        *http.method_mut() = http::Method::POST;
        let Ok(uri) = self.url.parse::<http::Uri>() else {
            return;
        };
        *http.uri_mut() = uri;
        let h = http.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        for (name, value) in &self.headers {
            h.insert(name.clone(), value.clone());
        }
        let error = match self.client.send_within(http).await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => format!("the collector answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        let failures = FAILED.fetch_add(1, Ordering::Relaxed) + 1;
        // The first failure of a run, then one in a hundred: an absent collector must not
        // flood the log.
        if failures == 1 || failures.is_multiple_of(100) {
            tracing::warn!(error = %error, failures, url = %self.url, "Cannot export metrics over OTLP (lockgate_otlp_metric_exports_failed_total)");
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
        .try_into()
        .unwrap_or(u64::MAX)
}

fn text_attribute(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

/// The OTLP metrics of `families` at `now` (families without series are left out).
fn to_otlp(families: &[Family], now: SystemTime) -> Vec<Metric> {
    let now = unix_nanos(now);
    let cumulative = AggregationTemporality::Cumulative as i32;
    families
        .iter()
        .filter(|f| !f.samples.is_empty())
        .map(|f| {
            let attributes = |labels: &[(&str, String)]| -> Vec<KeyValue> {
                labels
                    .iter()
                    .map(|(k, v)| text_attribute(*k, v.clone()))
                    .collect()
            };
            let number = |s: &crate::metrics::Sample, v: i64| NumberDataPoint {
                attributes: attributes(&s.labels),
                start_time_unix_nano: unix_nanos(s.start),
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(v)),
                ..NumberDataPoint::default()
            };
            let data = match f.kind {
                Kind::Counter => metric::Data::Sum(Sum {
                    data_points: f
                        .samples
                        .iter()
                        .filter_map(|s| match s.value {
                            Value::Counter(n) => {
                                Some(number(s, i64::try_from(n).unwrap_or(i64::MAX)))
                            }
                            _ => None,
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                Kind::Gauge => metric::Data::Gauge(Gauge {
                    data_points: f
                        .samples
                        .iter()
                        .filter_map(|s| match s.value {
                            Value::Gauge(v) => Some(number(s, v)),
                            _ => None,
                        })
                        .collect(),
                }),
                Kind::Histogram => metric::Data::Histogram(Histogram {
                    data_points: f
                        .samples
                        .iter()
                        .filter_map(|s| match &s.value {
                            Value::Histogram(h) => Some(HistogramDataPoint {
                                attributes: attributes(&s.labels),
                                start_time_unix_nano: unix_nanos(s.start),
                                time_unix_nano: now,
                                count: h.count,
                                sum: Some(h.sum),
                                bucket_counts: h.counts.clone(),
                                explicit_bounds: h.bounds.clone(),
                                ..HistogramDataPoint::default()
                            }),
                            _ => None,
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                }),
            };
            Metric {
                name: f.name.to_owned(),
                description: f.help.to_owned(),
                unit: f.unit().to_owned(),
                data: Some(data),
                ..Metric::default()
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::metrics::Histogram as Buckets;

    #[test]
    fn each_kind_becomes_its_otlp_shape_with_the_labels_as_attributes() {
        let start = UNIX_EPOCH + Duration::from_secs(10);
        let mut counter = Family::new("c", "a counter", Kind::Counter);
        counter.push(vec![("route", "r".into())], Value::Counter(7), start);
        let mut gauge = Family::new("g", "a gauge", Kind::Gauge);
        gauge.push(Vec::new(), Value::Gauge(-2), start);
        let h = Buckets::new([0.1, 1.0]);
        h.observe(0.5);
        h.observe(5.0);
        let mut histogram = Family::new("h_seconds", "a histogram", Kind::Histogram);
        histogram.push(Vec::new(), Value::Histogram(h.snapshot()), start);
        let empty = Family::new("e", "no series", Kind::Counter);
        let now = UNIX_EPOCH + Duration::from_secs(20);
        let m = to_otlp(&[counter, gauge, histogram, empty], now);
        assert_eq!(m.len(), 3, "the empty family is left out");
        let Some(metric::Data::Sum(sum)) = &m[0].data else {
            panic!("{:?}", m[0]);
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, 2);
        let p = &sum.data_points[0];
        assert_eq!(p.value, Some(number_data_point::Value::AsInt(7)));
        assert_eq!(p.start_time_unix_nano, 10_000_000_000);
        assert_eq!(p.time_unix_nano, 20_000_000_000);
        assert_eq!(p.attributes, vec![text_attribute("route", "r")]);
        let Some(metric::Data::Gauge(g)) = &m[1].data else {
            panic!("{:?}", m[1]);
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsInt(-2))
        );
        let Some(metric::Data::Histogram(h)) = &m[2].data else {
            panic!("{:?}", m[2]);
        };
        assert_eq!(m[2].unit, "s");
        let p = &h.data_points[0];
        assert_eq!(p.explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(p.bucket_counts, vec![0, 1, 1]);
        assert_eq!((p.count, p.sum), (2, Some(5.5)));
    }
}
