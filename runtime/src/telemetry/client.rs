//! The admin endpoint's client: one HTTP/1.1 request to a running `lockgate run` (`/status`,
//! `/metrics`, `/reload`), for `lockgate status`, `lockgate reload` and the tests.
//!
//! It speaks HTTP through hyper (so chunked bodies and any framing the server picks work),
//! resolves host names (`localhost:9090` tries every address the name resolves to, IPv6 and
//! IPv4), and every error names the address it was given.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header;
use hyper_util::rt::TokioIo;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the answer may take: a reload compiles modules and drains changed routes.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request to an admin endpoint got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The address is not `host:port`.
    #[error(
        "{addr} is not an admin address: expected host:port (like 127.0.0.1:9090 or localhost:9090)"
    )]
    Address {
        /// The address as given.
        addr: String,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// What the resolver said.
        reason: std::io::Error,
    },
    /// No address the name resolved to accepted a connection.
    #[error("cannot connect to {addr}{tried}: {reason}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The resolved addresses, when they differ from `addr` (` (tried [::1]:9090, ...)`).
        tried: String,
        /// Why the last one failed.
        reason: std::io::Error,
    },
    /// The endpoint accepted the connection but did not answer in time.
    #[error("{addr} did not answer {method} {path} within {} s", after.as_secs())]
    Timeout {
        /// The address as given.
        addr: String,
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// How long it waited.
        after: Duration,
    },
    /// The exchange broke off, or the answer was not HTTP.
    #[error("{addr} answered {method} {path} with no valid HTTP response: {reason}")]
    Http {
        /// The address as given.
        addr: String,
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The client's own runtime could not start (out of threads or file descriptors).
    #[error("cannot start the admin client: {0}")]
    Runtime(std::io::Error),
}

/// `method path` on the admin endpoint at `addr` (`host:port`, or `http://host:port`), with a
/// bearer token if given: (status code, body). Blocks the calling thread; it may be called from
/// anywhere, inside a tokio runtime too (the request runs on a thread of its own).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), AdminClientError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(AdminClientError::Runtime)?
                .block_on(http_request_async(addr, method, path, token))
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The async form of [`http_request`].
pub async fn http_request_async(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), AdminClientError> {
    let given = addr;
    let authority = given
        .strip_prefix("http://")
        .unwrap_or(given)
        .trim_end_matches('/');
    let address = || AdminClientError::Address {
        addr: given.to_owned(),
    };
    // `host:port` with a port: a bare host or a path would be misread by the resolver.
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(address()),
    }
    let stream = connect(given, authority).await?;

    let http = |reason: String| AdminClientError::Http {
        addr: given.to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
        // The connection does the I/O; it ends when the response has been read.
        let driver = tokio::spawn(connection);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority);
        if let Some(t) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = builder
            .body(Empty::new())
            .map_err(|e| http(format!("cannot build the request: {e}")))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| http(e.to_string()))?;
        let code = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
        .await
        .map_err(|_| AdminClientError::Timeout {
            addr: given.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            after: RESPONSE_TIMEOUT,
        })?
}

/// A connection to the first address `authority` resolves to that accepts one.
async fn connect(given: &str, authority: &str) -> Result<tokio::net::TcpStream, AdminClientError> {
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(authority)
        .await
        .map_err(|reason| AdminClientError::Resolve {
            addr: given.to_owned(),
            reason,
        })?
        .collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the name resolved to no address",
    );
    for sock in &resolved {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(sock)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                );
            }
        }
    }
    let listed: Vec<String> = resolved.iter().map(ToString::to_string).collect();
    let tried = if listed.len() == 1 && listed[0] == authority {
        String::new()
    } else {
        format!(" (tried {})", listed.join(", "))
    };
    Err(AdminClientError::Connect {
        addr: given.to_owned(),
        tried,
        reason: last,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server that answers one request with `response` as raw bytes, and returns what it read.
    async fn one_shot(response: &'static [u8]) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let served = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "request ended early");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(response).await.expect("write");
            got
        });
        (format!("localhost:{port}"), served)
    }

    /// A chunked body (what a streaming server sends) arrives whole, through a host name.
    #[tokio::test]
    async fn reads_a_chunked_body_from_a_host_name() {
        let (addr, served) = one_shot(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        )
        .await;
        let got = http_request_async(&addr, "POST", "/reload", Some("s3cret"))
            .await
            .expect("answer");
        assert_eq!(got, (200, "hello, world".to_owned()));
        let sent = String::from_utf8(served.await.expect("server")).expect("utf-8");
        assert!(sent.starts_with("POST /reload HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains(&format!("host: {addr}\r\n")), "{sent}");
        assert!(sent.contains("authorization: Bearer s3cret\r\n"), "{sent}");
    }

    /// The blocking form works inside a runtime (tests and the CLI call it from both sides).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_form_works_inside_a_runtime() {
        let (addr, _served) =
            one_shot(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope").await;
        let addr = format!("http://{addr}/");
        let got = tokio::task::block_in_place(|| http_request(&addr, "GET", "/x", None));
        assert_eq!(got.expect("answer"), (404, "nope".to_owned()));
    }

    #[tokio::test]
    async fn errors_name_the_address() {
        for bad in ["9090", "localhost", "http://:9090", "host:port"] {
            let e = http_request_async(bad, "GET", "/status", None)
                .await
                .expect_err(bad);
            assert!(matches!(e, AdminClientError::Address { .. }), "{bad}: {e}");
            assert!(e.to_string().starts_with(bad), "{e}");
        }
        let e = http_request_async("no-such-host.invalid:9090", "GET", "/status", None)
            .await
            .expect_err("resolves");
        assert!(
            matches!(e, AdminClientError::Resolve { .. }),
            "{e}: a name that does not resolve"
        );
        assert!(
            e.to_string()
                .starts_with("cannot resolve no-such-host.invalid:9090: "),
            "{e}"
        );
        // A port nobody listens on: bound and dropped.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let e = http_request_async(&format!("127.0.0.1:{port}"), "GET", "/status", None)
            .await
            .expect_err("refused");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
            "{e}"
        );
        let (addr, _served) = one_shot(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        let e = http_request_async(&addr, "GET", "/status", None)
            .await
            .expect_err("not HTTP");
        assert!(
            e.to_string()
                .starts_with(&format!("{addr} answered GET /status with no valid HTTP")),
            "{e}"
        );
    }
}
