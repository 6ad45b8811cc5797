//! The one place where SDK calls reach the host: the WIT imports in a component, or the
//! in-memory [`crate::testing::TestHost`] in native tests. Keeping the switch here means the
//! public modules never need a `cfg`.

#[cfg(not(all(feature = "testing", not(target_arch = "wasm32"))))]
mod imp {
    use crate::__private::bindings::lockgate::handler::{config, emit, kv, log, types};
    use crate::emit::{Outgoing, PublishError};
    use crate::kv::KvError;
    use crate::log::Level;

    pub(crate) fn publish(message: Outgoing) -> Result<(), PublishError> {
        let (topic, key, headers, payload) = message.into_parts();
        let outgoing = types::Outgoing {
            topic,
            key,
            headers: headers
                .into_iter()
                .map(|header| types::Header {
                    name: header.name,
                    value: header.value,
                })
                .collect(),
            payload,
        };
        emit::publish(&outgoing).map_err(|err| match err {
            emit::PublishError::NotAllowed(topic) => PublishError::NotAllowed(topic),
            emit::PublishError::TooLarge(limit) => PublishError::TooLarge(limit),
            emit::PublishError::TooMany(limit) => PublishError::TooMany(limit),
        })
    }

    fn kv_error(err: kv::KvError) -> KvError {
        match err {
            kv::KvError::Unavailable(reason) => KvError::Unavailable(reason),
            kv::KvError::InvalidKey(reason) => KvError::InvalidKey(reason),
            kv::KvError::TooLarge(limit) => KvError::TooLarge(limit),
        }
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        kv::get(key).map_err(kv_error)
    }

    pub(crate) fn kv_set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
        kv::set(key, value, ttl_ms).map_err(kv_error)
    }

    pub(crate) fn kv_delete(key: &str) -> Result<bool, KvError> {
        kv::delete(key).map_err(kv_error)
    }

    pub(crate) fn kv_compare_and_swap(
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        kv::compare_and_swap(key, expected, new, ttl_ms).map_err(kv_error)
    }

    pub(crate) fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => log::Level::Trace,
            Level::Debug => log::Level::Debug,
            Level::Info => log::Level::Info,
            Level::Warn => log::Level::Warn,
            Level::Error => log::Level::Error,
        };
        log::log(level, message);
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        // An instance's config never changes (a new config is a new handler version with new
        // instances), so each key crosses into the host once per instance, not once per call:
        // a handler that reads its config per message saves a host call and a copy each time.
        thread_local! {
            static CACHE: std::cell::RefCell<std::collections::HashMap<String, Option<String>>> =
                std::cell::RefCell::default();
        }
        CACHE.with(|cache| {
            if let Some(v) = cache.borrow().get(key) {
                return v.clone();
            }
            let v = config::get(key);
            cache.borrow_mut().insert(key.to_owned(), v.clone());
            v
        })
    }
}

#[cfg(not(all(feature = "testing", not(target_arch = "wasm32"))))]
mod http_imp {
    use crate::__private::bindings::wasi::http::{outgoing_handler, types as ht};
    use crate::__private::bindings::wasi::io::streams::StreamError;
    use crate::http::{HttpError, Method, Request, Response, split_url};

    fn error(e: ht::ErrorCode, url: &str) -> HttpError {
        use ht::ErrorCode as E;
        match e {
            E::HttpRequestDenied => HttpError::Denied(format!(
                "{url} is not allowed by the handler's grant (allowed_hosts)"
            )),
            E::DestinationIpProhibited => HttpError::Denied(format!(
                "{url} resolves to an internal address its allowed_hosts entry does not name"
            )),
            E::ConnectionTimeout | E::ConnectionReadTimeout | E::HttpResponseTimeout => {
                HttpError::Timeout(url.to_owned())
            }
            E::HttpRequestBodySize(n) => HttpError::TooLarge(format!(
                "the request body is over the grant's max_request_bytes ({})",
                n.map_or_else(|| "?".into(), |n| n.to_string())
            )),
            E::HttpResponseBodySize(n) => HttpError::TooLarge(format!(
                "the response of {url} is over the grant's max_response_bytes ({})",
                n.map_or_else(|| "?".into(), |n| n.to_string())
            )),
            E::HttpRequestMethodInvalid | E::HttpRequestUriInvalid => {
                HttpError::Invalid(format!("{url}: {e:?}"))
            }
            other => HttpError::Connection(format!("{url}: {other:?}")),
        }
    }

    pub(crate) fn http_send(req: &Request) -> Result<Response, HttpError> {
        let url = req.url.as_str();
        let parts = split_url(url)?;
        let headers = ht::Fields::new();
        for (name, value) in &req.headers {
            headers
                .append(name, value.as_bytes())
                .map_err(|e| HttpError::Invalid(format!("header `{name}`: {e:?}")))?;
        }
        if !req.body.is_empty()
            && !req
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            let _ = headers.append("content-length", req.body.len().to_string().as_bytes());
        }
        let out = ht::OutgoingRequest::new(headers);
        let method = match &req.method {
            Method::Get => ht::Method::Get,
            Method::Head => ht::Method::Head,
            Method::Post => ht::Method::Post,
            Method::Put => ht::Method::Put,
            Method::Patch => ht::Method::Patch,
            Method::Delete => ht::Method::Delete,
            Method::Other(m) => ht::Method::Other(m.clone()),
        };
        let invalid = |what: &str| HttpError::Invalid(format!("{url}: bad {what}"));
        out.set_method(&method).map_err(|()| invalid("method"))?;
        out.set_scheme(Some(if parts.https {
            &ht::Scheme::Https
        } else {
            &ht::Scheme::Http
        }))
        .map_err(|()| invalid("scheme"))?;
        out.set_authority(Some(parts.authority))
            .map_err(|()| invalid("host"))?;
        out.set_path_with_query(Some(parts.path))
            .map_err(|()| invalid("path"))?;
        // A request without a body never asks for one: the host then sends it whole, with no
        // chunked body left open for the guest to finish (one hand-off less per GET).
        let body = if req.body.is_empty() {
            None
        } else {
            Some(out.body().map_err(|()| invalid("body"))?)
        };
        let options = req.timeout.map(|t| {
            let o = ht::RequestOptions::new();
            let _ = o.set_first_byte_timeout(Some(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)));
            o
        });
        // Sent first, written after: the host reads the body while it is written.
        let future = outgoing_handler::handle(out, options).map_err(|e| error(e, url))?;
        if let Some(body) = body {
            {
                let stream = body.write().map_err(|()| invalid("body"))?;
                for chunk in req.body.chunks(4096) {
                    if stream.blocking_write_and_flush(chunk).is_err() {
                        break;
                    }
                }
            }
            let _ = ht::OutgoingBody::finish(body, None);
        }
        let response = loop {
            match future.get() {
                Some(r) => break r,
                None => future.subscribe().block(),
            }
        };
        let response = response
            .map_err(|()| HttpError::Connection(format!("{url}: response taken twice")))?
            .map_err(|e| error(e, url))?;
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| HttpError::Connection(format!("{url}: no body")))?;
        let mut data = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| HttpError::Connection(format!("{url}: no body stream")))?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(match ht::http_error_code(&e) {
                            Some(code) => error(code, url),
                            None => HttpError::Connection(format!(
                                "{url}: reading the response failed: {}",
                                e.to_debug_string()
                            )),
                        });
                    }
                }
            }
        }
        let _ = ht::IncomingBody::finish(incoming);
        Ok(Response {
            status,
            headers,
            body: data,
        })
    }
}

#[cfg(not(all(feature = "testing", not(target_arch = "wasm32"))))]
pub(crate) use http_imp::http_send;

#[cfg(not(all(feature = "testing", not(target_arch = "wasm32"))))]
mod sql_imp {
    use crate::__private::bindings::lockgate::handler::sql as wit;
    use crate::sql::{DbError, Rows, SqlError, Value};

    fn to_wit(v: &Value) -> wit::Value {
        match v.clone() {
            Value::Null => wit::Value::Null,
            Value::Bool(x) => wit::Value::Boolean(x),
            Value::I16(x) => wit::Value::Int16(x),
            Value::I32(x) => wit::Value::Int32(x),
            Value::I64(x) => wit::Value::Int64(x),
            Value::F32(x) => wit::Value::Float32(x),
            Value::F64(x) => wit::Value::Float64(x),
            Value::Text(x) => wit::Value::Text(x),
            Value::Bytes(x) => wit::Value::Bytes(x),
            Value::Json(x) => wit::Value::Json(x),
            Value::Uuid(x) => wit::Value::Uuid(x),
            Value::Numeric(x) => wit::Value::Numeric(x),
            Value::Date(x) => wit::Value::Date(x),
            Value::Time(x) => wit::Value::Time(x),
            Value::Timestamp(x) => wit::Value::Timestamp(x),
            Value::Timestamptz(x) => wit::Value::Timestamptz(x),
            Value::BoolArray(x) => wit::Value::BooleanArray(x),
            Value::I16Array(x) => wit::Value::Int16Array(x),
            Value::I32Array(x) => wit::Value::Int32Array(x),
            Value::I64Array(x) => wit::Value::Int64Array(x),
            Value::F32Array(x) => wit::Value::Float32Array(x),
            Value::F64Array(x) => wit::Value::Float64Array(x),
            Value::TextArray(x) => wit::Value::TextArray(x),
            Value::BytesArray(x) => wit::Value::BytesArray(x),
            Value::UuidArray(x) => wit::Value::UuidArray(x),
            Value::NumericArray(x) => wit::Value::NumericArray(x),
            Value::JsonArray(x) => wit::Value::JsonArray(x),
            Value::DateArray(x) => wit::Value::DateArray(x),
            Value::TimestamptzArray(x) => wit::Value::TimestamptzArray(x),
        }
    }

    fn from_wit(v: wit::Value) -> Value {
        match v {
            wit::Value::Null => Value::Null,
            wit::Value::Boolean(x) => Value::Bool(x),
            wit::Value::Int16(x) => Value::I16(x),
            wit::Value::Int32(x) => Value::I32(x),
            wit::Value::Int64(x) => Value::I64(x),
            wit::Value::Float32(x) => Value::F32(x),
            wit::Value::Float64(x) => Value::F64(x),
            wit::Value::Text(x) => Value::Text(x),
            wit::Value::Bytes(x) => Value::Bytes(x),
            wit::Value::Json(x) => Value::Json(x),
            wit::Value::Uuid(x) => Value::Uuid(x),
            wit::Value::Numeric(x) => Value::Numeric(x),
            wit::Value::Date(x) => Value::Date(x),
            wit::Value::Time(x) => Value::Time(x),
            wit::Value::Timestamp(x) => Value::Timestamp(x),
            wit::Value::Timestamptz(x) => Value::Timestamptz(x),
            wit::Value::BooleanArray(x) => Value::BoolArray(x),
            wit::Value::Int16Array(x) => Value::I16Array(x),
            wit::Value::Int32Array(x) => Value::I32Array(x),
            wit::Value::Int64Array(x) => Value::I64Array(x),
            wit::Value::Float32Array(x) => Value::F32Array(x),
            wit::Value::Float64Array(x) => Value::F64Array(x),
            wit::Value::TextArray(x) => Value::TextArray(x),
            wit::Value::BytesArray(x) => Value::BytesArray(x),
            wit::Value::UuidArray(x) => Value::UuidArray(x),
            wit::Value::NumericArray(x) => Value::NumericArray(x),
            wit::Value::JsonArray(x) => Value::JsonArray(x),
            wit::Value::DateArray(x) => Value::DateArray(x),
            wit::Value::TimestamptzArray(x) => Value::TimestamptzArray(x),
        }
    }

    fn error(e: wit::SqlError) -> SqlError {
        match e {
            wit::SqlError::Failed(d) => SqlError::Failed(DbError {
                code: d.code,
                message: d.message,
                detail: d.detail,
                constraint: d.constraint,
            }),
            wit::SqlError::Unavailable(s) => SqlError::Unavailable(s),
            wit::SqlError::Refused(s) => SqlError::Refused(s),
            wit::SqlError::TooLarge(s) => SqlError::TooLarge(s),
            wit::SqlError::Aborted(s) => SqlError::Aborted(s),
            wit::SqlError::BadParameter(s) => SqlError::BadParameter(s),
        }
    }

    pub(crate) fn sql_query(statement: &str, params: &[Value]) -> Result<Rows, SqlError> {
        let params: Vec<wit::Value> = params.iter().map(to_wit).collect();
        let set = wit::query(statement, &params).map_err(error)?;
        Ok(Rows {
            columns: set.columns.into_iter().map(|c| c.name).collect(),
            rows: set
                .rows
                .into_iter()
                .map(|r| r.into_iter().map(from_wit).collect())
                .collect(),
        })
    }

    pub(crate) fn sql_execute(statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        let params: Vec<wit::Value> = params.iter().map(to_wit).collect();
        wit::execute(statement, &params).map_err(error)
    }
}

#[cfg(not(all(feature = "testing", not(target_arch = "wasm32"))))]
pub(crate) use sql_imp::{sql_execute, sql_query};

#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
mod imp {
    pub(crate) use crate::testing::host_impl::{
        config_get, http_send, kv_compare_and_swap, kv_delete, kv_get, kv_set, log, publish,
        sql_execute, sql_query,
    };
}

pub(crate) use imp::*;
