//! The in-memory host behind the `testing` feature.
#![cfg(feature = "testing")]
// A failed unwrap is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lockgate_sdk::emit::{self, Outgoing, PublishError};
use lockgate_sdk::kv::{self, KvError};
use lockgate_sdk::log::Level;
use lockgate_sdk::testing::TestHost;
use lockgate_sdk::{Error, Header, Message, config};

#[test]
fn publishes_are_released_only_when_the_call_succeeds() {
    let mut host = TestHost::new();
    host.run(|| {
        emit::publish("out", "kept")?;
        Ok(())
    })
    .unwrap();

    let err = host
        .run(|| {
            emit::publish("out", "dropped")?;
            Err(Error::retry("dependency down"))
        })
        .unwrap_err();
    assert!(err.is_retry());

    let published = host.published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].topic, "out");
    assert_eq!(published[0].payload_str(), Some("kept"));
}

#[test]
fn outgoing_builder_carries_key_and_headers() {
    let mut host = TestHost::new();
    host.run(|| {
        Outgoing::new("out")
            .key("k1")
            .header("a", "1")
            .headers([Header::new("b", "2")])
            .payload(vec![1, 2, 3])
            .publish()?;
        Outgoing::new("out").maybe_key(None::<&[u8]>).publish()?;
        Ok(())
    })
    .unwrap();
    let published = host.take_published();
    assert_eq!(published[0].key_str(), Some("k1"));
    assert_eq!(published[0].header("a"), Some("1"));
    assert_eq!(published[0].header("b"), Some("2"));
    assert_eq!(published[0].payload, vec![1, 2, 3]);
    assert_eq!(published[1].key, None);
    assert!(published[1].payload.is_empty());
    assert!(
        host.published().is_empty(),
        "take_published empties the list"
    );
}

#[test]
fn refused_publish_fails_an_ok_call_and_publishes_nothing() {
    let mut host = TestHost::new().allow_outputs(["out"]);
    let err = host
        .run(|| {
            emit::publish("out", "fine")?;
            let refused = emit::publish("elsewhere", "nope");
            assert_eq!(refused, Err(PublishError::NotAllowed("elsewhere".into())));
            // Swallowing the error must not make the output loss silent.
            Ok(())
        })
        .unwrap_err();
    assert!(err.is_reject());
    assert!(err.reason().contains("elsewhere"), "{err}");
    assert!(host.published().is_empty());
}

#[test]
fn every_topic_is_allowed_without_an_allow_list() {
    let mut host = TestHost::new();
    host.run(|| Ok(emit::publish("anything", "x")?)).unwrap();
    assert_eq!(host.published()[0].topic, "anything");
}

#[test]
fn output_limits_are_enforced() {
    let mut host = TestHost::new().max_outputs(1).max_output_bytes(4);
    let err = host
        .run(|| {
            assert_eq!(
                emit::publish("out", "12345"),
                Err(PublishError::TooLarge(4))
            );
            emit::publish("out", "1234")?;
            assert_eq!(emit::publish("out", "1"), Err(PublishError::TooMany(1)));
            Ok(())
        })
        .unwrap_err();
    assert!(err.is_reject());

    // Key and header bytes count towards the size limit too.
    let refused = host.run(|| Ok(Outgoing::new("out").key("ab").payload("abc").publish()?));
    assert!(refused.is_err());
    assert!(host.published().is_empty());
}

#[test]
fn config_values_are_visible_to_the_handler() {
    let mut host = TestHost::new().config("target", "out");
    host.run(|| {
        assert_eq!(config::get("target").as_deref(), Some("out"));
        assert_eq!(config::get("missing"), None);
        Ok(())
    })
    .unwrap();
}

#[test]
fn logs_are_recorded_even_for_failed_calls() {
    let mut host = TestHost::new();
    let _ = host.run(|| {
        lockgate_sdk::log::trace("t");
        lockgate_sdk::log::debug(String::from("d"));
        lockgate_sdk::info!("x = {}", 1);
        lockgate_sdk::warn!("w");
        lockgate_sdk::error!("e {}", "!");
        Err(Error::reject("bad"))
    });
    let logs: Vec<_> = host
        .logs()
        .into_iter()
        .map(|record| (record.level, record.message))
        .collect();
    assert_eq!(
        logs,
        vec![
            (Level::Trace, "t".to_owned()),
            (Level::Debug, "d".to_owned()),
            (Level::Info, "x = 1".to_owned()),
            (Level::Warn, "w".to_owned()),
            (Level::Error, "e !".to_owned()),
        ]
    );
}

#[test]
fn kv_set_get_delete() {
    let mut host = TestHost::new().kv("preset", "p");
    host.run(|| {
        assert_eq!(kv::get("preset")?, Some(b"p".to_vec()));
        assert_eq!(kv::get("absent")?, None);
        kv::set("a", b"1")?;
        assert_eq!(kv::get("a")?, Some(b"1".to_vec()));
        assert!(kv::delete("a")?);
        assert!(!kv::delete("a")?);
        assert_eq!(kv::get("a")?, None);
        kv::set("kept", "after failure")?;
        Err(Error::retry("kv writes are not undone"))
    })
    .unwrap_err();
    assert_eq!(host.kv_get("kept"), Some(b"after failure".to_vec()));
}

#[test]
fn kv_rejects_empty_keys() {
    let mut host = TestHost::new();
    host.run(|| {
        assert!(matches!(kv::set("", "v"), Err(KvError::InvalidKey(_))));
        Ok(())
    })
    .unwrap();
}

#[test]
fn kv_compare_and_swap() {
    let mut host = TestHost::new();
    host.run(|| {
        // Absent matches `None`.
        assert!(kv::compare_and_swap("lock", None, Some(b"me"), None)?);
        // Taken: a second claimant loses.
        assert!(!kv::compare_and_swap("lock", None, Some(b"you"), None)?);
        assert!(!kv::compare_and_swap("lock", Some(b"you"), None, None)?);
        assert_eq!(kv::get("lock")?, Some(b"me".to_vec()));
        // Matching value swaps; `None` as new removes.
        assert!(kv::compare_and_swap(
            "lock",
            Some(b"me"),
            Some(b"me2"),
            None
        )?);
        assert!(kv::compare_and_swap("lock", Some(b"me2"), None, None)?);
        assert_eq!(kv::get("lock")?, None);
        Ok(())
    })
    .unwrap();
}

#[test]
fn kv_ttl_follows_the_manual_clock() {
    let mut host = TestHost::new();
    host.run(|| {
        kv::set_with_ttl("session", "s", Duration::from_secs(10))?;
        assert!(kv::compare_and_swap(
            "lease",
            None,
            Some(b"l"),
            Some(Duration::from_millis(1))
        )?);
        Ok(())
    })
    .unwrap();
    host.advance(Duration::from_secs(9));
    assert_eq!(host.kv_get("session"), Some(b"s".to_vec()));
    assert_eq!(host.kv_get("lease"), None);
    host.advance(Duration::from_secs(1));
    assert_eq!(host.kv_get("session"), None);

    host.run(|| {
        assert_eq!(kv::get("session")?, None);
        // An expired entry counts as absent for CAS and delete.
        assert!(!kv::delete("session")?);
        assert!(kv::compare_and_swap("lease", None, Some(b"again"), None)?);
        Ok(())
    })
    .unwrap();

    host.kv_set("manual", "m", Some(Duration::from_millis(5)));
    host.advance(Duration::from_millis(4));
    assert!(host.kv_get("manual").is_some());
    host.advance(Duration::from_millis(1));
    assert!(host.kv_get("manual").is_none());
}

#[test]
fn unavailable_kv_becomes_a_retry() {
    fn handler(_: Message) -> Result<(), Error> {
        kv::set("k", "v")?;
        Ok(())
    }
    let mut host = TestHost::new();
    host.fail_kv("store offline");
    let err = host.call(handler, Message::new("")).unwrap_err();
    assert!(err.is_retry());
    assert!(err.reason().contains("store offline"));
    host.restore_kv();
    host.call(handler, Message::new("")).unwrap();
    assert_eq!(host.kv_get("k"), Some(b"v".to_vec()));
}

#[test]
fn host_calls_outside_run_panic() {
    let outcome = std::panic::catch_unwind(|| config::get("x"));
    assert!(outcome.is_err());
}

#[test]
fn nested_run_panics_and_state_survives_a_panicking_handler() {
    let mut host = TestHost::new().config("k", "v");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        host.run(|| {
            kv::set("before-panic", "x")?;
            let mut inner = TestHost::new();
            let _ = inner.run(|| Ok(()));
            Ok(())
        })
    }));
    assert!(outcome.is_err(), "a nested run must panic");
    assert_eq!(host.kv_get("before-panic"), Some(b"x".to_vec()));
    // The thread is usable again and the host kept its config.
    host.run(|| {
        assert_eq!(config::get("k").as_deref(), Some("v"));
        Ok(())
    })
    .unwrap();
}

#[test]
fn hosts_on_parallel_threads_are_isolated() {
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut host = TestHost::new().config("n", i.to_string());
                for _ in 0..50 {
                    host.run(|| {
                        let n = config::get("n").unwrap_or_default();
                        kv::set("n", n.as_bytes())?;
                        emit::publish("out", n)?;
                        Ok(())
                    })
                    .unwrap();
                }
                let published = host.published();
                assert_eq!(published.len(), 50);
                assert!(
                    published
                        .iter()
                        .all(|p| p.payload == i.to_string().as_bytes())
                );
                assert_eq!(host.kv_get("n"), Some(i.to_string().into_bytes()));
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}
