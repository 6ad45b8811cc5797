//! Opening a connection for an outbound request: the grant checked again at connect time, DNS,
//! the SSRF guard on the resolved addresses, TCP and TLS (rustls on ring).
//!
//! The guard runs on the addresses the connection is actually made to, after resolution, so a
//! name that resolves to an internal address (or is re-pointed there between two requests, a DNS
//! rebind) cannot get through an entry that does not name it.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::http::{HttpGrant, HttpScheme};

/// Why a connection was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// No `allowed_hosts` entry allows the URL (checked before, so only a bug reaches this).
    #[error("{0} is not allowed by the handler's grant")]
    Denied(String),
    /// Every address the host resolved to is internal and the entry that allowed it does not
    /// name the host.
    #[error(
        "{host} resolves only to internal addresses ({addrs}); name the host or IP in allowed_hosts to allow it"
    )]
    Prohibited { host: String, addrs: String },
    /// The name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Dns { host: String, source: io::Error },
    /// TCP failed.
    #[error("cannot connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    /// The connection did not open in time.
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// The TLS handshake failed (an unknown issuer, a name mismatch, a protocol error).
    #[error("TLS with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
}

/// Whether `ip` is loopback, private, link-local or otherwise not a public unicast address: what a
/// wildcard grant must never reach.
pub(crate) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x64 && v6.segments()[1] == 0xff9b) // NAT64 maps to anything
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

/// The connector of one handler's pooled client.
#[derive(Clone)]
pub(crate) struct Connector {
    pub grant: Arc<HttpGrant>,
    pub tls: tokio_rustls::TlsConnector,
    pub timeout: Duration,
}

/// A plain or TLS connection.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Scheme, host (IPv6 without brackets) and port of `uri`, the port defaulted by the scheme.
pub(crate) fn target(uri: &Uri) -> Option<(HttpScheme, String, u16)> {
    let scheme = match uri.scheme_str()? {
        s if s.eq_ignore_ascii_case("http") => HttpScheme::Http,
        s if s.eq_ignore_ascii_case("https") => HttpScheme::Https,
        _ => return None,
    };
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let port = uri.port_u16().unwrap_or(scheme.default_port());
    Some((scheme, host.to_owned(), port))
}

impl Connector {
    async fn connect(self, uri: Uri) -> Result<TokioIo<Stream>, ConnectError> {
        let Some((scheme, host, port)) = target(&uri) else {
            return Err(ConnectError::Denied(uri.to_string()));
        };
        let Some(entry) = self.grant.allowing(scheme, &host, port) else {
            return Err(ConnectError::Denied(uri.to_string()));
        };
        let named = entry.names_host();
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|source| ConnectError::Dns {
                    host: host.clone(),
                    source,
                })?
                .collect(),
        };
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| named || !is_internal(a.ip()))
            .collect();
        if allowed.is_empty() {
            return Err(ConnectError::Prohibited {
                host,
                addrs: addrs
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let connect = async {
            let mut last = None;
            for addr in &allowed {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(source) => {
                        last = Some(ConnectError::Tcp {
                            addr: *addr,
                            source,
                        })
                    }
                }
            }
            Err(last.unwrap_or_else(|| ConnectError::Timeout(host.clone())))
        };
        let tcp = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout(host.clone()))??;
        let _ = tcp.set_nodelay(true);
        match scheme {
            HttpScheme::Http => Ok(TokioIo::new(Stream::Plain(tcp))),
            HttpScheme::Https => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    ConnectError::Tls {
                        host: host.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, e),
                    }
                })?;
                let tls = tokio::time::timeout(self.timeout, self.tls.connect(name, tcp))
                    .await
                    .map_err(|_| ConnectError::Timeout(host.clone()))?
                    .map_err(|source| ConnectError::Tls { host, source })?;
                Ok(TokioIo::new(Stream::Tls(Box::new(tls))))
            }
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }
}
