//! An in-memory host for native unit tests of handlers (feature `testing`, non-wasm32 only).
//!
//! With the feature on, every host call made by the SDK (emit, kv, log, config) goes to the
//! [`TestHost`] that is running the handler on the current thread, so `cargo test` can exercise a
//! handler without a runtime. State is per thread, so tests running in parallel do not see each
//! other. A host call made outside [`TestHost::run`] panics, because there is no host to answer.
//!
//! The test host follows the real host's publishing rule: outputs are buffered during a call and
//! released only when the handler returns `Ok`; a refused output turns `Ok` into a reject.
//!
//! ```
//! use std::time::Duration;
//! use lockgate_sdk::testing::TestHost;
//! use lockgate_sdk::{config, emit, kv, Error, Message};
//!
//! fn handle(msg: Message) -> Result<(), Error> {
//!     let target = config::get("target").ok_or_else(|| Error::reject("no target"))?;
//!     kv::set_with_ttl("last", msg.payload(), Duration::from_secs(60))?;
//!     emit::publish(target, msg.payload())?;
//!     Ok(())
//! }
//!
//! let mut host = TestHost::new().config("target", "out").allow_outputs(["out"]);
//! host.call(handle, Message::new("hi")).unwrap();
//! assert_eq!(host.published()[0].payload, b"hi");
//! assert_eq!(host.kv_get("last").as_deref(), Some(&b"hi"[..]));
//! host.advance(Duration::from_secs(61));
//! assert_eq!(host.kv_get("last"), None);
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::emit::PublishError;
use crate::log::Level;
use crate::{Error, Header, Message};

/// A message the handler published and the test host released (the call returned `Ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// Destination topic.
    pub topic: String,
    /// Key, when set.
    pub key: Option<Vec<u8>>,
    /// Headers, in the order they were added.
    pub headers: Vec<Header>,
    /// Body.
    pub payload: Vec<u8>,
}

impl Published {
    /// The body as UTF-8, or `None` if it is not valid UTF-8.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The key as UTF-8; `None` when absent or not valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|key| std::str::from_utf8(key).ok())
    }

    /// The first header named `name`, as UTF-8; `None` when absent or not valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|header| header.name() == name)
            .and_then(Header::value_str)
    }
}

/// One record logged by the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogRecord {
    /// Severity.
    pub level: Level,
    /// Text.
    pub message: String,
}

#[derive(Debug, Clone)]
struct KvEntry {
    value: Vec<u8>,
    /// On the host's manual clock; `None` never expires.
    expires_at: Option<Duration>,
}

#[derive(Debug, Default)]
struct State {
    config: BTreeMap<String, String>,
    allowed_outputs: Option<BTreeSet<String>>,
    max_output_bytes: Option<u64>,
    max_outputs: Option<u32>,
    kv: BTreeMap<String, KvEntry>,
    kv_failure: Option<String>,
    now: Duration,
    published: Vec<Published>,
    logs: Vec<LogRecord>,
    /// Outputs of the call in progress, released only if it returns `Ok`.
    pending: Vec<Published>,
    /// Refusals during the call in progress; any of them fails the call like the real host does.
    refused: Vec<PublishError>,
    /// HTTP stubs: `(method, url)` to the response (or error) the handler gets.
    http_stubs: Vec<(
        String,
        String,
        Result<crate::http::Response, crate::http::HttpError>,
    )>,
    /// Every HTTP request the handler made, in order.
    requests: Vec<crate::http::Request>,
}

impl State {
    fn live(&self, key: &str) -> Option<&KvEntry> {
        self.kv
            .get(key)
            .filter(|entry| entry.expires_at.is_none_or(|at| self.now < at))
    }

    fn check_kv(&self, key: &str) -> Result<(), crate::kv::KvError> {
        if let Some(reason) = &self.kv_failure {
            return Err(crate::kv::KvError::Unavailable(reason.clone()));
        }
        if key.is_empty() {
            return Err(crate::kv::KvError::InvalidKey("key is empty".to_owned()));
        }
        Ok(())
    }

    fn put(&mut self, key: &str, value: Vec<u8>, ttl_ms: Option<u64>) {
        let expires_at = ttl_ms.map(|ms| self.now.saturating_add(Duration::from_millis(ms)));
        self.kv
            .insert(key.to_owned(), KvEntry { value, expires_at });
    }
}

thread_local! {
    /// The state of the `TestHost` whose `run` is on this thread's stack. Thread-local because
    /// the SDK's host functions take no handle, and cargo test runs tests on parallel threads.
    static ACTIVE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn with_active<R>(f: impl FnOnce(&mut State) -> R) -> R {
    ACTIVE.with(|active| {
        let mut active = active.borrow_mut();
        match active.as_mut() {
            Some(state) => f(state),
            None => panic!(
                "lockgate_sdk: host call outside TestHost::run; run the handler with \
                 `TestHost::new().run(|| handle(msg))`"
            ),
        }
    })
}

/// Moves the host's state into the thread-local for the duration of one call and back out on
/// drop, so the state survives a panicking handler (e.g. a failed assertion inside it).
struct Installed<'a> {
    home: &'a mut State,
}

impl<'a> Installed<'a> {
    fn new(home: &'a mut State) -> Self {
        ACTIVE.with(|active| {
            let mut active = active.borrow_mut();
            assert!(
                active.is_none(),
                "lockgate_sdk: TestHost::run called inside another TestHost::run on this thread"
            );
            *active = Some(std::mem::take(home));
        });
        Self { home }
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        // `try_with` because this may run while the thread is being torn down.
        let state = ACTIVE
            .try_with(|active| active.borrow_mut().take())
            .ok()
            .flatten();
        if let Some(state) = state {
            *self.home = state;
        }
    }
}

/// An in-memory host that runs a handler natively and records what it did.
///
/// Configure it with the builder methods, run the handler with [`TestHost::run`] or
/// [`TestHost::call`], then inspect [`TestHost::published`], [`TestHost::logs`] and
/// [`TestHost::kv_get`]. State (kv, published, logs) accumulates across calls on the same host.
#[derive(Debug, Default)]
pub struct TestHost {
    state: State,
}

impl TestHost {
    /// A host with no config, an empty kv store, no output limits and every topic allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers every `method` request to `url` (exactly as the handler writes it) with `status`
    /// and `body`. A request with no stub fails with [`crate::http::HttpError::Denied`] naming
    /// its URL, as the real host does for a host the grant does not allow.
    pub fn http_stub(
        mut self,
        method: &str,
        url: impl Into<String>,
        status: u16,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> Self {
        let response = crate::http::Response {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), (*v).to_owned()))
                .collect(),
            body: body.into(),
        };
        self.state
            .http_stubs
            .push((method.to_ascii_uppercase(), url.into(), Ok(response)));
        self
    }

    /// Fails every `method` request to `url` with `error` (a timeout, a refused connection).
    pub fn http_fail(
        mut self,
        method: &str,
        url: impl Into<String>,
        error: crate::http::HttpError,
    ) -> Self {
        self.state
            .http_stubs
            .push((method.to_ascii_uppercase(), url.into(), Err(error)));
        self
    }

    /// Every HTTP request the handler made, in order.
    pub fn requests(&self) -> &[crate::http::Request] {
        &self.state.requests
    }

    /// Sets config `key` to `value` (what `config::get` returns).
    #[must_use]
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.state.config.insert(key.into(), value.into());
        self
    }

    /// Restricts publishing to `topics`, like a route's `outputs`; without it every topic is
    /// allowed. Calling it again adds to the list.
    #[must_use]
    pub fn allow_outputs(mut self, topics: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.state
            .allowed_outputs
            .get_or_insert_with(BTreeSet::new)
            .extend(topics.into_iter().map(Into::into));
        self
    }

    /// Refuses outputs whose payload, key and header bytes together exceed `limit`.
    #[must_use]
    pub fn max_output_bytes(mut self, limit: u64) -> Self {
        self.state.max_output_bytes = Some(limit);
        self
    }

    /// Refuses outputs beyond `limit` per call.
    #[must_use]
    pub fn max_outputs(mut self, limit: u32) -> Self {
        self.state.max_outputs = Some(limit);
        self
    }

    /// Presets kv `key` to `value`, with no expiry.
    #[must_use]
    pub fn kv(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.kv_set(&key.into(), value, None);
        self
    }

    /// Runs `handler` with this host answering its host calls, and returns its result, except
    /// that a refused publish turns `Ok` into a reject (as the real host does). Outputs are
    /// released to [`TestHost::published`] only when the final result is `Ok`.
    ///
    /// # Errors
    /// The handler's error, or a reject if it returned `Ok` after a publish was refused.
    ///
    /// # Panics
    /// When called from inside another `run` on the same thread, or when `handler` panics.
    pub fn run<F>(&mut self, handler: F) -> Result<(), Error>
    where
        F: FnOnce() -> Result<(), Error>,
    {
        let result = {
            let _installed = Installed::new(&mut self.state);
            handler()
        };
        let pending = std::mem::take(&mut self.state.pending);
        let refused = std::mem::take(&mut self.state.refused);
        match (result, refused.first()) {
            (Ok(()), None) => {
                self.state.published.extend(pending);
                Ok(())
            }
            (Ok(()), Some(refusal)) => Err(Error::reject(format!("output refused: {refusal}"))),
            (Err(err), _) => Err(err),
        }
    }

    /// Shorthand for `self.run(|| handler(message))`.
    ///
    /// # Errors
    /// See [`TestHost::run`].
    pub fn call<F>(&mut self, handler: F, message: Message) -> Result<(), Error>
    where
        F: FnOnce(Message) -> Result<(), Error>,
    {
        self.run(|| handler(message))
    }

    /// Everything released so far, oldest first.
    pub fn published(&self) -> Vec<Published> {
        self.state.published.clone()
    }

    /// Returns and forgets everything released so far.
    pub fn take_published(&mut self) -> Vec<Published> {
        std::mem::take(&mut self.state.published)
    }

    /// Everything logged so far (by failed calls too), oldest first.
    pub fn logs(&self) -> Vec<LogRecord> {
        self.state.logs.clone()
    }

    /// The live value under `key`, as the handler would see it now.
    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.state.live(key).map(|entry| entry.value.clone())
    }

    /// Stores `value` under `key`, expiring after `ttl` on the manual clock.
    pub fn kv_set(&mut self, key: &str, value: impl Into<Vec<u8>>, ttl: Option<Duration>) {
        let ttl_ms = ttl.map(crate::error::millis_ceil);
        self.state.put(key, value.into(), ttl_ms);
    }

    /// Moves the manual clock used for kv expiry forward.
    pub fn advance(&mut self, by: Duration) {
        self.state.now = self.state.now.saturating_add(by);
    }

    /// Makes every kv call fail with [`crate::kv::KvError::Unavailable`]`(reason)` until
    /// [`TestHost::restore_kv`].
    pub fn fail_kv(&mut self, reason: impl Into<String>) {
        self.state.kv_failure = Some(reason.into());
    }

    /// Undoes [`TestHost::fail_kv`].
    pub fn restore_kv(&mut self) {
        self.state.kv_failure = None;
    }
}

/// The host side of the SDK's calls while a [`TestHost`] runs; see `crate::host`.
pub(crate) mod host_impl {
    use super::{LogRecord, Published, with_active};

    /// The TestHost has no database: a SQL handler is tested against a real one.
    fn no_database() -> crate::sql::SqlError {
        crate::sql::SqlError::Unavailable(
            "TestHost has no database: test SQL handlers with `lockgate test` or a route".into(),
        )
    }

    pub(crate) fn sql_query(
        _statement: &str,
        _params: &[crate::sql::Value],
    ) -> Result<crate::sql::Rows, crate::sql::SqlError> {
        Err(no_database())
    }

    pub(crate) fn sql_execute(
        _statement: &str,
        _params: &[crate::sql::Value],
    ) -> Result<u64, crate::sql::SqlError> {
        Err(no_database())
    }

    pub(crate) fn http_send(
        req: &crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError> {
        with_active(|state| {
            state.requests.push(req.clone());
            let method = req.method.as_str().to_ascii_uppercase();
            state
                .http_stubs
                .iter()
                .find(|(m, u, _)| *m == method && *u == req.url)
                .map(|(_, _, r)| r.clone())
                .unwrap_or_else(|| {
                    Err(crate::http::HttpError::Denied(format!(
                        "no TestHost::http_stub for {method} {}",
                        req.url
                    )))
                })
        })
    }
    use crate::emit::{Outgoing, PublishError};
    use crate::kv::KvError;
    use crate::log::Level;

    pub(crate) fn publish(message: Outgoing) -> Result<(), PublishError> {
        let (topic, key, headers, payload) = message.into_parts();
        with_active(|state| {
            let refusal = if state
                .allowed_outputs
                .as_ref()
                .is_some_and(|allowed| !allowed.contains(&topic))
            {
                Some(PublishError::NotAllowed(topic.clone()))
            } else if let Some(limit) = state
                .max_outputs
                .filter(|&limit| state.pending.len() >= limit as usize)
            {
                Some(PublishError::TooMany(limit))
            } else {
                let size = payload.len()
                    + key.as_ref().map_or(0, Vec::len)
                    + headers
                        .iter()
                        .map(|header| header.name().len() + header.value().len())
                        .sum::<usize>();
                state
                    .max_output_bytes
                    .filter(|&limit| size as u64 > limit)
                    .map(PublishError::TooLarge)
            };
            if let Some(refusal) = refusal {
                state.refused.push(refusal.clone());
                return Err(refusal);
            }
            state.pending.push(Published {
                topic,
                key,
                headers,
                payload,
            });
            Ok(())
        })
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        with_active(|state| {
            state.check_kv(key)?;
            Ok(state.live(key).map(|entry| entry.value.clone()))
        })
    }

    pub(crate) fn kv_set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
        with_active(|state| {
            state.check_kv(key)?;
            state.put(key, value.to_vec(), ttl_ms);
            Ok(())
        })
    }

    pub(crate) fn kv_delete(key: &str) -> Result<bool, KvError> {
        with_active(|state| {
            state.check_kv(key)?;
            let was_live = state.live(key).is_some();
            state.kv.remove(key);
            Ok(was_live)
        })
    }

    pub(crate) fn kv_compare_and_swap(
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        with_active(|state| {
            state.check_kv(key)?;
            let current = state.live(key).map(|entry| entry.value.as_slice());
            if current != expected {
                return Ok(false);
            }
            match new {
                Some(value) => state.put(key, value.to_vec(), ttl_ms),
                None => {
                    state.kv.remove(key);
                }
            }
            Ok(true)
        })
    }

    pub(crate) fn log(level: Level, message: &str) {
        // Echo to stderr too: the test harness captures it per test and shows it on failure.
        eprintln!("[{level}] {message}");
        with_active(|state| {
            state.logs.push(LogRecord {
                level,
                message: message.to_owned(),
            });
        });
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        with_active(|state| state.config.get(key).cloned())
    }
}
