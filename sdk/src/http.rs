//! Outbound HTTP from a handler, synchronous like `handle`.
//!
//! ```no_run
//! use lockgate_sdk::{Error, http};
//!
//! # fn f() -> Result<(), Error> {
//! let customer = http::get("https://customers.example.com/v1/customers/42")
//!     .header("accept", "application/json")
//!     .send()?              // a connection failure or timeout: retry; a denial: reject
//!     .error_for_status()?; // 5xx and 429: retry (after `Retry-After`); other 4xx: reject
//! let name = customer.json::<serde_json::Value>()?["name"].clone();
//! # Ok(()) }
//! ```
//!
//! What a request may reach is the handler's grant in runtime.toml
//! (`[handlers.<name>.http] allowed_hosts = [...]`); anything else fails with
//! [`HttpError::Denied`]. The host never follows a redirect; this helper follows up to five
//! (each hop is checked against the grant again) unless [`Request::follow_redirects`] says not
//! to. Every request carries an `Idempotency-Key` the host derives from the message, the same on
//! every retry and redelivery, so a receiver that deduplicates applies it once.

use std::fmt;
use std::time::Duration;

/// An HTTP method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE
    Delete,
    /// Any other method.
    Other(String),
}

impl Method {
    /// The method as written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
            Self::Other(m) => m,
        }
    }
}

/// A request being built. Send it with [`Request::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub(crate) method: Method,
    pub(crate) url: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) redirects: u8,
}

/// A `GET` of `url`.
pub fn get(url: impl Into<String>) -> Request {
    Request::new(Method::Get, url)
}

/// A `POST` to `url`.
pub fn post(url: impl Into<String>) -> Request {
    Request::new(Method::Post, url)
}

/// A `PUT` to `url`.
pub fn put(url: impl Into<String>) -> Request {
    Request::new(Method::Put, url)
}

/// A `DELETE` of `url`.
pub fn delete(url: impl Into<String>) -> Request {
    Request::new(Method::Delete, url)
}

/// Most redirects [`Request::send`] follows by default.
pub const MAX_REDIRECTS: u8 = 5;

impl Request {
    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The headers the handler set.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// A request with `method` to `url` (`http://` or `https://`).
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
            redirects: MAX_REDIRECTS,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the body to `value` as JSON, with `content-type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        // Serialising plain data to a Vec cannot fail; a map with non-string keys can, and then
        // the body is empty and the receiver says so.
        self.body = serde_json::to_vec(value).unwrap_or_default();
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }

    /// Bounds the wait for the response headers (the grant's `timeout_ms` and the call's
    /// deadline bound it too).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether to follow redirects (default: up to [`MAX_REDIRECTS`]).
    pub fn follow_redirects(mut self, follow: bool) -> Self {
        self.redirects = if follow { MAX_REDIRECTS } else { 0 };
        self
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Result<Response, HttpError> {
        let mut request = self;
        loop {
            let response = crate::host::http_send(&request)?;
            let Some(next) = request.redirected(&response)? else {
                return Ok(response);
            };
            request = next;
        }
    }

    /// The request a redirect `response` leads to, if it is one to follow.
    fn redirected(&self, response: &Response) -> Result<Option<Request>, HttpError> {
        if !matches!(response.status, 301 | 302 | 303 | 307 | 308) || self.redirects == 0 {
            return Ok(None);
        }
        let Some(location) = response.header("location") else {
            return Ok(None);
        };
        let url = resolve(&self.url, location)?;
        let same_origin = origin(&url) == origin(&self.url);
        let mut next = self.clone();
        next.redirects -= 1;
        next.url = url;
        if response.status == 303
            || (response.status != 307 && response.status != 308 && self.method == Method::Post)
        {
            next.method = Method::Get;
            next.body.clear();
            next.headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        }
        if !same_origin {
            // Credentials are for the host they were written for.
            next.headers.retain(|(n, _)| {
                !n.eq_ignore_ascii_case("authorization") && !n.eq_ignore_ascii_case("cookie")
            });
        }
        Ok(Some(next))
    }
}

/// `scheme://authority` of `url`.
fn origin(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some((scheme, &rest[..end]))
}

/// `location` resolved against `base`: absolute URLs as they are, `/path` on the same origin,
/// anything else relative to the base's directory.
fn resolve(base: &str, location: &str) -> Result<String, HttpError> {
    if location.contains("://") {
        return Ok(location.to_owned());
    }
    let (scheme, authority) =
        origin(base).ok_or_else(|| HttpError::Invalid(format!("bad URL `{base}`")))?;
    if let Some(rest) = location.strip_prefix("//") {
        return Ok(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Ok(format!("{scheme}://{authority}{location}"));
    }
    let parts = split_url(base)?;
    let dir = match parts
        .path
        .split(['?', '#'])
        .next()
        .unwrap_or("/")
        .rfind('/')
    {
        Some(i) => &parts.path[..=i],
        None => "/",
    };
    Ok(format!("{scheme}://{authority}{dir}{location}"))
}

/// The parts of a URL the host's request needs.
#[cfg_attr(
    all(feature = "testing", not(target_arch = "wasm32")),
    allow(dead_code)
)]
pub(crate) struct UrlParts<'a> {
    pub https: bool,
    pub authority: &'a str,
    pub path: &'a str,
}

pub(crate) fn split_url(url: &str) -> Result<UrlParts<'_>, HttpError> {
    let bad = |why: &str| HttpError::Invalid(format!("`{url}`: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("not an absolute http:// or https:// URL"))?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(bad("the scheme must be http or https")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() {
        return Err(bad("the host is missing"));
    }
    let path = path.split('#').next().unwrap_or("");
    let path = if path.is_empty() { "/" } else { path };
    Ok(UrlParts {
        https,
        authority,
        path,
    })
}

/// A response, read to its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 (invalid sequences replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; a body that is not the expected JSON rejects the message.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            crate::Error::reject(format!(
                "HTTP {}: the response is not the expected JSON: {e}",
                self.status
            ))
        })
    }

    /// The response if its status is a success; otherwise the handler's error for it: a 5xx, a
    /// 429 or a 408 is [`crate::Error::retry`] (after `Retry-After` seconds when the server
    /// sends it), any other 4xx is [`crate::Error::reject`]. So an outage of the dependency
    /// retries and opens the route's breaker, and nothing is dead-lettered while it is down.
    pub fn error_for_status(self) -> Result<Self, crate::Error> {
        let s = self.status;
        if s < 400 {
            return Ok(self);
        }
        let mut snippet = self.text();
        if snippet.len() > 200 {
            let mut cut = 200;
            while !snippet.is_char_boundary(cut) {
                cut -= 1;
            }
            snippet.truncate(cut);
        }
        let reason = format!("HTTP {s}: {}", snippet.trim());
        if s >= 500 || s == 429 || s == 408 {
            let after = self
                .header("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Err(match after {
                Some(after) => crate::Error::retry_after(reason, after),
                None => crate::Error::retry(reason),
            })
        } else {
            Err(crate::Error::reject(reason))
        }
    }
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The handler's grant does not allow the URL (or it resolves to an internal address a
    /// wildcard entry may not reach).
    Denied(String),
    /// No response in time (the request's timeout, the grant's `timeout_ms`, the call's deadline).
    Timeout(String),
    /// The connection failed: refused, reset, DNS, TLS.
    Connection(String),
    /// The request or the response is larger than the grant allows.
    TooLarge(String),
    /// The request is malformed (a bad URL, method or header).
    Invalid(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Denied(s) => write!(f, "HTTP request denied: {s}"),
            Self::Timeout(s) => write!(f, "HTTP request timed out: {s}"),
            Self::Connection(s) => write!(f, "HTTP connection failed: {s}"),
            Self::TooLarge(s) => write!(f, "HTTP message too large: {s}"),
            Self::Invalid(s) => write!(f, "invalid HTTP request: {s}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for crate::Error {
    /// A timeout or a connection failure is transient (retry); a denial, a size limit or a
    /// malformed request will fail the same way every time (reject).
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Timeout(_) | HttpError::Connection(_) => crate::Error::retry(e.to_string()),
            HttpError::Denied(_) | HttpError::TooLarge(_) | HttpError::Invalid(_) => {
                crate::Error::reject(e.to_string())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn response(status: u16, headers: &[(&str, &str)]) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: b"nope".to_vec(),
        }
    }

    #[test]
    fn statuses_map_to_retry_or_reject() {
        assert!(response(200, &[]).error_for_status().is_ok());
        assert!(response(302, &[]).error_for_status().is_ok());
        let e = response(503, &[]).error_for_status().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Retry);
        let e = response(429, &[("Retry-After", "2")])
            .error_for_status()
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Retry);
        assert_eq!(e.retry_delay(), Some(Duration::from_secs(2)));
        let e = response(404, &[]).error_for_status().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Reject);
        assert!(e.reason().contains("HTTP 404: nope"), "{}", e.reason());
    }

    #[test]
    fn errors_map_to_retry_or_reject() {
        let e: crate::Error = HttpError::Connection("refused".into()).into();
        assert_eq!(e.kind(), crate::ErrorKind::Retry);
        let e: crate::Error = HttpError::Denied("x".into()).into();
        assert_eq!(e.kind(), crate::ErrorKind::Reject);
    }

    #[test]
    fn urls_split_and_redirects_resolve() {
        let p = split_url("https://api.example.com:8443/v1/x?q=1#frag").unwrap();
        assert!(p.https);
        assert_eq!(p.authority, "api.example.com:8443");
        assert_eq!(p.path, "/v1/x?q=1");
        assert_eq!(split_url("http://h").unwrap().path, "/");
        assert!(split_url("ftp://h/").is_err());
        assert!(split_url("/relative").is_err());
        assert_eq!(resolve("http://a/b/c", "/d").unwrap(), "http://a/d");
        assert_eq!(resolve("http://a/b/c", "d").unwrap(), "http://a/b/d");
        assert_eq!(resolve("http://a/b", "https://z/").unwrap(), "https://z/");
        assert_eq!(resolve("https://a/b", "//z/y").unwrap(), "https://z/y");
    }

    #[test]
    fn a_redirect_elsewhere_drops_credentials_and_a_303_becomes_a_get() {
        let req = post("http://a/x")
            .header("authorization", "secret")
            .body("b");
        let next = req
            .redirected(&response(303, &[("location", "http://b/y")]))
            .unwrap()
            .unwrap();
        assert_eq!(next.method, Method::Get);
        assert!(next.body.is_empty());
        assert!(next.headers.is_empty());
        assert_eq!(next.redirects, MAX_REDIRECTS - 1);
        let kept = get("http://a/x")
            .header("authorization", "secret")
            .redirected(&response(307, &[("location", "/z")]))
            .unwrap()
            .unwrap();
        assert_eq!(kept.headers.len(), 1);
        assert!(
            get("http://a/")
                .follow_redirects(false)
                .redirected(&response(302, &[("location", "/z")]))
                .unwrap()
                .is_none()
        );
    }
}
