//! Outbound HTTP for handlers (`wasi:http/outgoing-handler`), sent by lockgate's own sender so
//! that every request is under the handler's grant (docs/guarantees.md#g9):
//! - only to a host an `allowed_hosts` entry allows; an internal address only when the entry
//!   names the host (`connect.rs`); redirects are returned to the guest, never followed;
//! - under the call's deadline: the request's timeouts are clamped to the call's remaining time,
//!   every guest wait on it ends with the call at its deadline (`engine`), and whatever the call
//!   left open (a request still waiting, a body not read to its end) is dropped when it ends;
//! - within `max_request_bytes`, `max_response_bytes` and `max_concurrent` (`body.rs`);
//! - over one pooled client per handler, so connections are reused across messages;
//! - carrying an idempotency key stable across retries, redeliveries and restarts and the
//!   message's trace context (`traceparent`);
//! - counted per host and outcome (`stats.rs`).

mod body;
mod connect;
mod stats;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{AbortHandle, Abortable};
use http::{HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::Instrument;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::config::http::HttpGrant;
use crate::deadline::Deadline;

use body::{CappedBody, GuardedBody, Live, OpenBodies};
pub use stats::{HttpOutcome, HttpStats};

/// Why a handler's HTTP client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// `ca_file` could not be read or holds no certificate.
    #[error("ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// One handler's outbound HTTP: its grant, its pooled client and its counters. Shared by every
/// instance of the handler.
pub struct Outbound {
    grant: Arc<HttpGrant>,
    client: Client<connect::Connector, CappedBody>,
    slots: Arc<Semaphore>,
    stats: Arc<HttpStats>,
    /// `lockgate test`: the canned responses of the message being run; a request without one
    /// fails the message unless the grant lets it reach the network.
    stubs: Option<std::sync::Mutex<Vec<HttpStub>>>,
}

/// A canned response of a `lockgate test` fixture: a request with this method and URL gets it
/// instead of reaching the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpStub {
    /// The method, upper-case.
    pub method: String,
    /// The URL as the handler requests it (`https://host/path?query`).
    pub url: String,
    /// The status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

/// How a request of a call was answered, as `lockgate test` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAnswer {
    /// By a fixture's stub, with this status.
    Stub(u16),
    /// Sent to the network (its outcome is in the metrics and the guest's result).
    Sent,
    /// Refused, for this reason.
    Denied(String),
}

/// A request a call made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRecord {
    /// The method.
    pub method: String,
    /// The URL.
    pub url: String,
    /// How it was answered.
    pub answer: HttpAnswer,
}

/// `url` as `http::Uri` prints it, so `https://h` and `https://h/` are one URL.
fn normal_url(url: &str) -> String {
    http::Uri::try_from(url).map_or_else(|_| url.to_owned(), |u| u.to_string())
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// The client of `grant`: TLS roots are the webpki roots plus `ca_file`.
    pub fn new(grant: HttpGrant) -> Result<Self, OutboundError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &grant.ca_file {
            use rustls::pki_types::pem::PemObject;
            let bad = |reason: String| OutboundError::CaFile {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut added = 0;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("a certificate is not usable: {e}")))?;
                added += 1;
            }
            if added == 0 {
                return Err(bad("holds no PEM certificate".into()));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OutboundError::CaFile {
                path: grant.ca_file.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let grant = Arc::new(grant);
        let connector = connect::Connector {
            grant: grant.clone(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout: Duration::from_millis(grant.timeout_ms),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(grant.max_concurrent as usize)
            .build(connector);
        Ok(Self {
            slots: Arc::new(Semaphore::new(grant.max_concurrent as usize)),
            grant,
            client,
            stats: Arc::new(HttpStats::default()),
            stubs: None,
        })
    }

    /// For `lockgate test`: requests are answered by the stubs given with [`Self::set_stubs`];
    /// one without a stub reaches the network only when the grant allows it, and otherwise fails
    /// its message.
    pub fn with_stubs(mut self) -> Self {
        self.stubs = Some(std::sync::Mutex::new(Vec::new()));
        self
    }

    /// The stubs of the message about to run.
    pub fn set_stubs(&self, stubs: Vec<HttpStub>) {
        if let Some(slot) = &self.stubs
            && let Ok(mut s) = slot.lock()
        {
            *s = stubs
                .into_iter()
                .map(|mut stub| {
                    stub.method = stub.method.to_ascii_uppercase();
                    stub.url = normal_url(&stub.url);
                    stub
                })
                .collect();
        }
    }

    fn stub_for(&self, method: &str, url: &str) -> Option<Option<HttpStub>> {
        let stubs = self.stubs.as_ref()?.lock().ok()?;
        Some(
            stubs
                .iter()
                .find(|s| s.method == method && s.url == url)
                .cloned(),
        )
    }

    /// The grant.
    pub fn grant(&self) -> &HttpGrant {
        &self.grant
    }

    /// The counters of the handler's requests.
    pub fn stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }
}

/// What a running call's requests derive from the message.
#[derive(Clone, Debug)]
pub(crate) struct CallContext {
    /// The call's deadline.
    pub deadline: Deadline,
    /// The message's stable identity (with the handler's name): the idempotency keys' base.
    pub key_base: String,
    /// `(trace id, flags)` of the message's `traceparent`, if it has a valid one.
    pub trace: Option<(String, String)>,
}

/// A response body of at most this many declared bytes is read whole with its head
/// (`Content-Length`), so the guest reads it without waiting on the connection.
const PREFETCH_BYTES: u64 = 64 * 1024;

/// Set when a call ends, before anything it started is aborted: a request that gets its
/// `max_concurrent` slot only because another of the call's was dropped must not go out.
type Ended = Arc<std::sync::atomic::AtomicBool>;

/// The `wasi:http` hooks of one instance: its handler's [`Outbound`] and the running call.
#[derive(Default)]
pub(crate) struct HttpHooks {
    outbound: Option<Arc<Outbound>>,
    call: Option<CallContext>,
    ended: Ended,
    /// Requests made in the running call (the index in their idempotency key).
    sent: u32,
    pending: Vec<AbortHandle>,
    bodies: OpenBodies,
    /// Requests refused by the grant in the running call, for the call's log.
    pub denials: Vec<String>,
    /// Every request of the running call.
    pub records: Vec<HttpRecord>,
    /// A request that had no stub in `lockgate test`: it fails the message.
    pub unmatched: Option<String>,
}

impl HttpHooks {
    /// The hooks of an instance of a handler granted `outbound` (`None`: every request denied).
    pub fn new(outbound: Option<Arc<Outbound>>) -> Self {
        Self {
            outbound,
            ..Self::default()
        }
    }

    /// Starts a call: its requests are bounded by `call.deadline`.
    pub fn begin(&mut self, call: CallContext) {
        self.call = Some(call);
        self.ended = Ended::default();
        self.sent = 0;
        self.denials.clear();
        self.records.clear();
        self.unmatched = None;
    }

    /// Ends the call: a request still waiting for its response and every response body still
    /// open are dropped, so nothing the call started outlives it.
    pub fn end(&mut self) {
        self.call = None;
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        for p in self.pending.drain(..) {
            p.abort();
        }
        self.bodies.close_all();
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

fn refuse(e: Error) -> ResponseFuture {
    Box::new(async move { Err(e) })
}

/// The response of a fixture's stub.
fn stubbed(stub: HttpStub) -> ResponseFuture {
    Box::new(async move {
        let mut response = http::Response::builder().status(stub.status);
        for (name, value) in &stub.headers {
            response = response.header(name, value);
        }
        let body = http_body_util::Full::new(bytes::Bytes::from(stub.body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let response = response
            .body(body)
            .map_err(|e| Error::InternalError(Some(format!("bad stub: {e}"))))?;
        let io: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async { Ok(()) });
        Ok((response, io))
    })
}

/// The header value of the `index`th request of a call whose key base is `base`: hex, 32 digits.
fn derived(base: &str, what: &str, index: u32) -> String {
    let digest = Sha256::digest(format!("{base}\n{what}\n{index}").as_bytes());
    hex::encode(&digest[..16])
}

/// Maps a hyper error from reading a response to what the guest sees.
pub(crate) fn hyper_error(e: &hyper::Error) -> Error {
    if e.is_timeout() {
        Error::ConnectionReadTimeout
    } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        Error::ConnectionTerminated
    } else {
        Error::HttpProtocolError
    }
}

/// Maps a failed request to what the guest sees and the outcome it is counted as.
fn client_error(e: &hyper_util::client::legacy::Error) -> (Error, HttpOutcome) {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<connect::ConnectError>() {
            return match c {
                connect::ConnectError::Denied(_) => (Error::HttpRequestDenied, HttpOutcome::Denied),
                connect::ConnectError::Prohibited { .. } => {
                    (Error::DestinationIpProhibited, HttpOutcome::Denied)
                }
                connect::ConnectError::Dns { .. } => (
                    Error::DnsError {
                        rcode: Some(c.to_string()),
                        info_code: None,
                    },
                    HttpOutcome::Refused,
                ),
                connect::ConnectError::Tcp { source, .. }
                    if source.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    (Error::ConnectionRefused, HttpOutcome::Refused)
                }
                connect::ConnectError::Tcp { .. } => {
                    (Error::DestinationUnavailable, HttpOutcome::Refused)
                }
                connect::ConnectError::Timeout(_) => {
                    (Error::ConnectionTimeout, HttpOutcome::Timeout)
                }
                connect::ConnectError::Tls { source, .. } => {
                    let cert = source
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<rustls::Error>())
                        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
                    if cert {
                        (Error::TlsCertificateError, HttpOutcome::Refused)
                    } else {
                        (Error::TlsProtocolError, HttpOutcome::Refused)
                    }
                }
            };
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return (hyper_error(h), HttpOutcome::Refused);
        }
        if let Some(w) = s.downcast_ref::<Error>() {
            // The request body failed (over `max_request_bytes`).
            return (clone_error(w), HttpOutcome::Denied);
        }
        source = s.source();
    }
    (Error::ConnectionTerminated, HttpOutcome::Refused)
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::HttpRequestBodySize(n) => Error::HttpRequestBodySize(*n),
        _ => Error::InternalError(Some(e.to_string())),
    }
}

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        let uri = request.uri().clone();
        let target = connect::target(&uri);
        let host = target
            .as_ref()
            .map_or_else(|| "-".to_owned(), |(_, h, _)| h.clone());
        let Some(outbound) = self.outbound.clone() else {
            self.denials.push(format!(
                "HTTP request to {uri} denied: the handler has no [handlers.<name>.http] grant"
            ));
            return refuse(Error::HttpRequestDenied);
        };
        let stats = outbound.stats.clone();
        let Some(call) = self.call.clone() else {
            stats.record(&host, HttpOutcome::Denied, None);
            return refuse(Error::HttpRequestDenied);
        };
        let method = request.method().as_str().to_owned();
        let url = uri.to_string();
        let allowed = target
            .as_ref()
            .and_then(|(scheme, h, port)| outbound.grant.allowing(*scheme, h, *port));
        match outbound.stub_for(&method, &url) {
            Some(Some(stub)) => {
                self.records.push(HttpRecord {
                    method,
                    url,
                    answer: HttpAnswer::Stub(stub.status),
                });
                return stubbed(stub);
            }
            Some(None) if allowed.is_none() => {
                let reason = format!(
                    "HTTP request {method} {url} has no stub in the fixture (add it to the message's \"http\" list, or allow its host with --allow-http)"
                );
                self.unmatched.get_or_insert_with(|| reason.clone());
                self.records.push(HttpRecord {
                    method,
                    url,
                    answer: HttpAnswer::Denied(reason),
                });
                return refuse(Error::HttpRequestDenied);
            }
            _ => {}
        }
        if allowed.is_none() {
            stats.record(&host, HttpOutcome::Denied, None);
            let reason =
                format!("HTTP request to {uri} denied: no entry of allowed_hosts allows it");
            self.denials.push(reason.clone());
            self.records.push(HttpRecord {
                method,
                url,
                answer: HttpAnswer::Denied(reason),
            });
            return refuse(Error::HttpRequestDenied);
        }
        // A span per request, inside the call's (the message's trace is on the request as
        // `traceparent`); its outcome is recorded when the response head arrives.
        let span = tracing::debug_span!(
            "http_request",
            method = %method,
            url = %url,
            outcome = tracing::field::Empty,
            status = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        self.records.push(HttpRecord {
            method,
            url,
            answer: HttpAnswer::Sent,
        });
        let grant = &outbound.grant;
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > grant.max_request_bytes) {
            stats.record(&host, HttpOutcome::Denied, None);
            return refuse(Error::HttpRequestBodySize(Some(grant.max_request_bytes)));
        }
        let now = Instant::now();
        let Some(remaining) = call.deadline.remaining(now) else {
            stats.record(&host, HttpOutcome::Timeout, None);
            return refuse(Error::ConnectionTimeout);
        };
        let index = self.sent;
        self.sent = self.sent.saturating_add(1);
        let headers = request.headers_mut();
        if let Some(name) = &grant.idempotency_header
            && let Ok(name) = HeaderName::try_from(name.as_str())
            && !headers.contains_key(&name)
            && let Ok(v) = HeaderValue::try_from(derived(&call.key_base, "http", index))
        {
            headers.insert(name, v);
        }
        if let Some((trace, flags)) = &call.trace
            && !headers.contains_key(crate::message::TRACEPARENT)
        {
            let id = derived(&call.key_base, "span", index);
            if let Ok(v) = HeaderValue::try_from(format!("00-{trace}-{}-{flags}", &id[..16])) {
                headers.insert(crate::message::TRACEPARENT, v);
                // The request's span is the server's parent in the exported trace.
                span.record("span_id", &id[..16]);
            }
        }
        // The head of the response (connecting included) within the grant's timeout, the
        // guest's own options and what is left of the call.
        let mut head = Duration::from_millis(grant.timeout_ms).min(remaining);
        if let Some(o) = &options {
            let guest = match (o.connect_timeout, o.first_byte_timeout) {
                (Some(c), Some(f)) => Some(c.saturating_add(f)),
                (c, f) => c.or(f),
            };
            if let Some(g) = guest {
                head = head.min(g);
            }
        }
        let between = options.and_then(|o| o.between_bytes_timeout);
        let (limit, max_req) = (grant.max_response_bytes, grant.max_request_bytes);
        let request = request.map(|inner| CappedBody {
            inner,
            limit: max_req,
            sent: 0,
        });
        let (abort, registration) = AbortHandle::new_pair();
        self.pending.retain(|p| !p.is_aborted());
        self.pending.push(abort);
        let slot: body::Slot = Arc::new(std::sync::Mutex::new(None));
        self.bodies.track(&slot);
        let ended = self.ended.clone();
        let send = async move {
            let sent = async {
                let permit = outbound
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| (Error::ConnectionLimitReached, HttpOutcome::Denied))?;
                // The call may have ended (or run out of time) while this waited for a slot.
                if ended.load(std::sync::atomic::Ordering::SeqCst) || call.deadline.has_passed() {
                    return Err((Error::ConnectionTimeout, HttpOutcome::Timeout));
                }
                let response = outbound
                    .client
                    .request(request)
                    .await
                    .map_err(|e| client_error(&e))?;
                Ok::<_, (Error, HttpOutcome)>((response, permit))
            };
            let result = match tokio::time::timeout(head, sent).await {
                Err(_) => Err((Error::ConnectionTimeout, HttpOutcome::Timeout)),
                Ok(r) => r,
            };
            let seconds = Some(now.elapsed().as_secs_f64());
            let (response, permit) = match result {
                Ok(r) => r,
                Err((e, outcome)) => {
                    stats.record(&host, outcome, seconds);
                    tracing::Span::current().record("outcome", outcome.as_str());
                    tracing::debug!(error = %e, "HTTP request failed");
                    return Err(e);
                }
            };
            let outcome = HttpOutcome::of_status(response.status().as_u16());
            stats.record(&host, outcome, seconds);
            let current = tracing::Span::current();
            current.record("outcome", outcome.as_str());
            current.record("status", response.status().as_u16());
            let length = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if length.is_some_and(|n| n > limit) {
                return Err(Error::HttpResponseBodySize(Some(limit)));
            }
            let (parts, mut incoming) = response.into_parts();
            // A small body of declared length is read here, in the task that got the head,
            // next to the connection's own task: the guest then reads it from memory instead
            // of waking the connection from its thread and waiting to be woken again for each
            // frame (two thread hand-offs per request). Its time counts against the head's.
            if length.is_some_and(|n| n <= PREFETCH_BYTES) {
                let until = tokio::time::Instant::from_std(now) + head;
                let mut bytes = bytes::BytesMut::new();
                loop {
                    let frame = match tokio::time::timeout_at(until, incoming.frame()).await {
                        Err(_) => return Err(Error::ConnectionReadTimeout),
                        Ok(None) => break,
                        Ok(Some(Err(e))) => return Err(hyper_error(&e)),
                        Ok(Some(Ok(frame))) => frame,
                    };
                    if let Some(data) = frame.data_ref() {
                        if (bytes.len() + data.len()) as u64 > limit {
                            return Err(Error::HttpResponseBodySize(Some(limit)));
                        }
                        bytes.extend_from_slice(data);
                    }
                }
                drop(permit);
                let body = http_body_util::Full::new(bytes.freeze())
                    .map_err(|never| match never {})
                    .boxed_unsync();
                let response = http::Response::from_parts(parts, body);
                let io: Box<dyn Future<Output = Result<(), Error>> + Send> =
                    Box::new(async { Ok(()) });
                return Ok((response, io));
            }
            if let Ok(mut s) = slot.lock() {
                *s = Some(Live {
                    body: incoming,
                    _permit: permit,
                });
            }
            let body = GuardedBody {
                slot,
                limit,
                read: 0,
                between,
                timer: None,
            };
            let response = http::Response::from_parts(parts, body.boxed_unsync());
            let io: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async { Ok(()) });
            Ok((response, io))
        };
        Box::new(async move {
            Abortable::new(send.instrument(span), registration)
                .await
                .unwrap_or(Err(Error::ConnectionTerminated))
        })
    }
}
