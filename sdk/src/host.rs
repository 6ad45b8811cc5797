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

#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
mod imp {
    pub(crate) use crate::testing::host_impl::{
        config_get, kv_compare_and_swap, kv_delete, kv_get, kv_set, log, publish,
    };
}

pub(crate) use imp::*;
