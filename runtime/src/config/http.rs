//! `[handlers.<name>.http]`: the outbound HTTP a handler is granted, and the grammar of its
//! `allowed_hosts` (Spin's: `scheme://host[:port]`, `*.domain`, an omitted port is the scheme's
//! default port, no paths). Deny by default: a handler without this table sends no request.
//!
//! Only data and matching live here; the sender that enforces it is `engine::outbound`.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use super::reader::Reader;

/// Default `timeout_ms` of one request (the call's remaining time bounds it too).
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 10_000;
/// Default `max_request_bytes`: the largest request body.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Default `max_response_bytes`: the largest response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
/// Default `max_concurrent`: requests of one handler open at once, across its instances.
pub const DEFAULT_MAX_CONCURRENT: u32 = 16;
/// Default `idempotency_header`.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// The outbound HTTP grant of one handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpGrant {
    /// `allowed_hosts`: where requests may go; nothing else is reachable.
    pub allowed_hosts: Vec<AllowedHost>,
    /// `timeout_ms`: bound of one request, from connecting to the last byte of the response
    /// headers, or of a body of declared length up to 64 KiB, which is read with them (each
    /// read of a larger body is bounded by the call's deadline).
    pub timeout_ms: u64,
    /// `max_request_bytes`: largest request body.
    pub max_request_bytes: u64,
    /// `max_response_bytes`: largest response body.
    pub max_response_bytes: u64,
    /// `max_concurrent`: requests open at once for this handler.
    pub max_concurrent: u32,
    /// `ca_file`: PEM certificates trusted besides the webpki roots, resolved against the config
    /// file's directory.
    pub ca_file: Option<PathBuf>,
    /// `idempotency_header`: the header carrying a key stable across retries; `None` when set to
    /// `""` (off).
    pub idempotency_header: Option<String>,
}

/// `http` or `https`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpScheme {
    /// Plain HTTP (default port 80).
    Http,
    /// HTTP over TLS (default port 443).
    Https,
}

impl HttpScheme {
    /// The scheme's well-known port, which an entry without a port allows.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    /// The scheme as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// The host part of an `allowed_hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host. Never reaches a private, loopback or link-local address.
    Any,
    /// `*.example.com`: any name under `.example.com` (not `example.com` itself), stored with its
    /// leading dot. Never reaches a private, loopback or link-local address.
    Suffix(String),
    /// A host name, lower-cased. Named explicitly, so it may resolve to a private address.
    Name(String),
    /// An IP address (IPv6 written in brackets). Named explicitly.
    Ip(IpAddr),
}

/// The port part of an `allowed_hosts` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortPattern {
    /// `:*`: any port.
    Any,
    /// One port (the scheme's default when the entry has none).
    Port(u16),
}

/// One entry of `allowed_hosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    /// The entry as written (for messages).
    pub raw: String,
    /// The scheme it allows.
    pub scheme: HttpScheme,
    /// The hosts it allows.
    pub host: HostPattern,
    /// The ports it allows.
    pub port: PortPattern,
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl AllowedHost {
    /// Reads one entry; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = raw.split_once("://") else {
            return Err("expected `scheme://host[:port]`, e.g. \"https://api.example.com\"".into());
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => HttpScheme::Http,
            "https" => HttpScheme::Https,
            other => return Err(format!("unknown scheme `{other}`; expected http or https")),
        };
        if let Some(at) = rest.find(['/', '?', '#']) {
            return Err(format!(
                "a grant names hosts, not paths: write \"{}://{}\"",
                scheme.as_str(),
                &rest[..at]
            ));
        }
        if rest.contains('@') {
            return Err("credentials do not belong in a grant".into());
        }
        let (host, port) = split_host_port(rest)?;
        let port = match port {
            None => PortPattern::Port(scheme.default_port()),
            Some("*") => PortPattern::Any,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => PortPattern::Port(n),
                _ => return Err(format!("port `{p}` is not a number from 1 to 65535 or `*`")),
            },
        };
        let host = parse_host(host)?;
        Ok(Self {
            raw: raw.to_owned(),
            scheme,
            host,
            port,
        })
    }

    /// Whether a request to `scheme://host:port` is allowed by this entry. `host` is the URL's
    /// host: a name (any case) or an IP literal (IPv6 without brackets).
    pub fn matches(&self, scheme: HttpScheme, host: &str, port: u16) -> bool {
        if scheme != self.scheme {
            return false;
        }
        if let PortPattern::Port(p) = self.port
            && p != port
        {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostPattern::Name(n) => *n == host,
            HostPattern::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
        }
    }

    /// Whether the entry names its host (or IP) exactly: only then may it reach a private,
    /// loopback or link-local address, so a wildcard cannot be pointed inside by DNS.
    pub fn names_host(&self) -> bool {
        matches!(self.host, HostPattern::Name(_) | HostPattern::Ip(_))
    }
}

fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if s.is_empty() {
        return Err("the host is missing".into());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err("an IPv6 address needs its closing `]`".into());
        };
        return match after {
            "" => Ok((ip, None)),
            p => match p.strip_prefix(':') {
                Some(port) => Ok((ip, Some(port))),
                None => Err(format!("unexpected `{p}` after the IPv6 address")),
            },
        };
    }
    match s.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => {
            Err("write an IPv6 address in brackets: `http://[::1]:8080`".into())
        }
        Some((h, p)) => Ok((h, Some(p))),
        None => Ok((s, None)),
    }
}

fn parse_host(host: &str) -> Result<HostPattern, String> {
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(HostPattern::Ip(ip));
    }
    let (wild, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(format!(
            "`{host}` is not a host name, an IP address, `*` or `*.domain`"
        ));
    }
    let name = name.to_ascii_lowercase();
    Ok(if wild {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Name(name)
    })
}

impl HttpGrant {
    /// The entry allowing `scheme://host:port`, preferring one that names the host (so a named
    /// internal service beside a `*` entry may still resolve to a private address).
    pub fn allowing(&self, scheme: HttpScheme, host: &str, port: u16) -> Option<&AllowedHost> {
        let mut found = None;
        for entry in &self.allowed_hosts {
            if entry.matches(scheme, host, port) {
                if entry.names_host() {
                    return Some(entry);
                }
                found.get_or_insert(entry);
            }
        }
        found
    }
}

/// Reads `[handlers.<name>.http]`.
pub(super) fn parse_http(r: &mut Reader<'_>) -> Option<HttpGrant> {
    let before = r.problem_count();
    let mut allowed_hosts = Vec::new();
    match r.strings("allowed_hosts") {
        Some(list) => {
            for (i, raw) in list.iter().enumerate() {
                match AllowedHost::parse(raw) {
                    Ok(h) => allowed_hosts.push(h),
                    Err(why) => {
                        r.problem(&format!("allowed_hosts[{i}]"), format!("\"{raw}\": {why}"))
                    }
                }
            }
        }
        None if !r.has("allowed_hosts") => r.problem(
            "allowed_hosts",
            "missing: the hosts the handler may call, e.g. [\"https://api.example.com\"]".into(),
        ),
        None => {}
    }
    let timeout_ms = r.positive("timeout_ms").unwrap_or(DEFAULT_HTTP_TIMEOUT_MS);
    let max_request_bytes = r
        .positive("max_request_bytes")
        .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
    let max_response_bytes = r
        .positive("max_response_bytes")
        .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    let max_concurrent = r
        .positive_u32("max_concurrent")
        .unwrap_or(DEFAULT_MAX_CONCURRENT);
    let ca_file = r.string("ca_file").map(|p| r.base_dir().join(p));
    let idempotency_header = match r.string("idempotency_header") {
        None => Some(DEFAULT_IDEMPOTENCY_HEADER.to_owned()),
        Some(h) if h.is_empty() => None,
        Some(h) => {
            if !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                r.problem(
                    "idempotency_header",
                    format!("\"{h}\" is not a header name (letters, digits, `-`, `_`)"),
                );
            }
            Some(h)
        }
    };
    r.finish();
    (r.problem_count() == before).then_some(HttpGrant {
        allowed_hosts,
        timeout_ms,
        max_request_bytes,
        max_response_bytes,
        max_concurrent,
        ca_file,
        idempotency_header,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(s: &str) -> AllowedHost {
        AllowedHost::parse(s).unwrap()
    }

    #[test]
    fn an_omitted_port_is_the_schemes_default_and_nothing_else() {
        let e = entry("https://api.example.com");
        assert!(e.matches(HttpScheme::Https, "api.example.com", 443));
        assert!(e.matches(HttpScheme::Https, "API.Example.com", 443));
        assert!(!e.matches(HttpScheme::Https, "api.example.com", 8443));
        assert!(!e.matches(HttpScheme::Http, "api.example.com", 80));
        assert!(!e.matches(HttpScheme::Https, "evil.api.example.com", 443));
        assert!(e.names_host());
    }

    #[test]
    fn wildcards_match_below_the_domain_only_and_never_name_a_host() {
        let e = entry("http://*.example.com:*");
        assert!(e.matches(HttpScheme::Http, "a.example.com", 1));
        assert!(e.matches(HttpScheme::Http, "a.b.example.com", 65535));
        assert!(!e.matches(HttpScheme::Http, "example.com", 80));
        assert!(!e.matches(HttpScheme::Http, "badexample.com", 80));
        assert!(!e.names_host());
        let any = entry("http://*:8080");
        assert!(any.matches(HttpScheme::Http, "localhost", 8080));
        assert!(!any.names_host());
    }

    #[test]
    fn ip_entries_match_the_address_in_any_spelling() {
        let e = entry("http://[::1]:9000");
        assert!(e.matches(HttpScheme::Http, "::1", 9000));
        assert!(e.matches(HttpScheme::Http, "0:0:0:0:0:0:0:1", 9000));
        assert!(entry("http://127.0.0.1:9").matches(HttpScheme::Http, "127.0.0.1", 9));
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        for (raw, why) in [
            ("api.example.com", "expected `scheme://host[:port]`"),
            ("ftp://x", "unknown scheme `ftp`"),
            ("https://x.com/v1", "not paths: write \"https://x.com\""),
            ("https://x.com:0", "port `0`"),
            ("https://x.com:http", "port `http`"),
            ("https://", "host is missing"),
            ("https://a..b", "is not a host name"),
            ("https://u:p@x.com", "credentials"),
            ("http://::1:80", "brackets"),
        ] {
            let e = AllowedHost::parse(raw).unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
        }
    }

    #[test]
    fn a_named_entry_wins_over_a_wildcard() {
        let g = HttpGrant {
            allowed_hosts: vec![entry("http://*:80"), entry("http://intranet")],
            timeout_ms: 1,
            max_request_bytes: 1,
            max_response_bytes: 1,
            max_concurrent: 1,
            ca_file: None,
            idempotency_header: None,
        };
        assert!(
            g.allowing(HttpScheme::Http, "intranet", 80)
                .unwrap()
                .names_host()
        );
        assert!(
            !g.allowing(HttpScheme::Http, "other", 80)
                .unwrap()
                .names_host()
        );
        assert!(g.allowing(HttpScheme::Https, "intranet", 443).is_none());
    }
}
