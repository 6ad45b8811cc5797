//! Asks for a retry while `attempt <= fail_attempts` (config, default 2), then forwards to `target`.

use std::time::Duration;

use lockgate_sdk::{Error, Message, ResultExt, config, emit};

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let fail_attempts = match config::get("fail_attempts") {
        Some(value) => value
            .parse::<u32>()
            .or_reject("config key `fail_attempts`")?,
        None => 2,
    };
    lockgate_sdk::info!(
        "message {} attempt {} (failing while <= {fail_attempts})",
        msg.id(),
        msg.attempt()
    );
    if msg.attempt() <= fail_attempts {
        return Err(Error::retry_after(
            "flaky dependency",
            Duration::from_millis(10),
        ));
    }
    let target =
        config::get("target").ok_or_else(|| Error::reject("config key `target` is not set"))?;
    emit::publish(target, msg.payload())?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::log::Level;
    use lockgate_sdk::testing::TestHost;

    #[test]
    fn retries_twice_by_default_then_publishes_unchanged() {
        let mut host = TestHost::new().config("target", "out");
        for attempt in 1..=2 {
            let err = host
                .call(handle, Message::new("p").with_attempt(attempt))
                .unwrap_err();
            assert_eq!(
                err,
                Error::retry_after("flaky dependency", Duration::from_millis(10))
            );
            assert!(host.published().is_empty());
        }
        host.call(handle, Message::new(vec![0, 159, 255]).with_attempt(3))
            .unwrap();
        let published = host.published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].topic, "out");
        assert_eq!(published[0].payload, vec![0, 159, 255]);

        let logs = host.logs();
        assert_eq!(logs.len(), 3, "one info line per attempt");
        assert!(logs.iter().all(|record| record.level == Level::Info));
        assert!(logs[2].message.contains("attempt 3"), "{:?}", logs[2]);
    }

    #[test]
    fn fail_attempts_comes_from_config() {
        let mut host = TestHost::new()
            .config("target", "out")
            .config("fail_attempts", "0");
        host.call(handle, Message::new("p")).unwrap();
        assert_eq!(host.published().len(), 1);

        let mut host = TestHost::new()
            .config("target", "out")
            .config("fail_attempts", "3");
        let err = host
            .call(handle, Message::new("p").with_attempt(3))
            .unwrap_err();
        assert!(err.is_retry());
    }

    #[test]
    fn bad_config_is_rejected() {
        let mut host = TestHost::new()
            .config("target", "out")
            .config("fail_attempts", "many");
        assert!(
            host.call(handle, Message::new("p"))
                .unwrap_err()
                .is_reject()
        );

        let mut host = TestHost::new();
        let err = host
            .call(handle, Message::new("p").with_attempt(3))
            .unwrap_err();
        assert_eq!(err, Error::reject("config key `target` is not set"));
    }
}
