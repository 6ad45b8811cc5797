//! Per-route rate limit: a GCRA limiter (governor) with a sustained rate and a burst.
//!
//! The limiter reads tokio's clock instead of a hardware one, so the pipeline's waits and the
//! limiter agree on time, and tests drive both with tokio's paused clock.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A route's `rate_limit` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained messages per second.
    pub per_second: u32,
    /// Messages that may pass at once after a quiet period.
    pub burst: u32,
}

/// Time since a fixed origin, read from tokio's clock.
#[derive(Clone, Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.origin)
    }
}

/// A route's limiter: `per_second` messages per second sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimit {
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>,
    clock: TokioClock,
}

impl RateLimit {
    /// A limiter for `config` (zero values, which validation refuses, are treated as 1).
    pub fn new(config: RateLimitConfig) -> Self {
        let per_second = NonZeroU32::new(config.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        let clock = TokioClock::default();
        let limiter = RateLimiter::direct_with_clock(
            Quota::per_second(per_second).allow_burst(burst),
            clock.clone(),
        );
        Self { limiter, clock }
    }

    /// Takes one permit now, or says how long until one is available.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Waits until a permit is available and takes it.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_acquire() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{Instant, advance};

    fn limit(per_second: u32, burst: u32) -> RateLimit {
        RateLimit::new(RateLimitConfig { per_second, burst })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_at_once_then_the_rate_applies() {
        let l = limit(100, 10);
        for i in 0..10 {
            assert_eq!(l.try_acquire(), Ok(()), "burst permit {i}");
        }
        let wait = l.try_acquire().expect_err("burst exhausted");
        assert_eq!(
            wait,
            Duration::from_millis(10),
            "one permit every 10 ms at 100/s"
        );
        advance(wait).await;
        assert_eq!(l.try_acquire(), Ok(()));
        assert!(l.try_acquire().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_load_is_held_to_the_rate() {
        let l = limit(100, 10);
        let start = Instant::now();
        for _ in 0..1_000 {
            l.acquire().await;
        }
        let took = start.elapsed();
        // 10 from the burst, then 990 at 10 ms each.
        assert_eq!(took, Duration::from_millis(9_900), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_period_refills_the_burst_but_no_more() {
        let l = limit(10, 5);
        for _ in 0..5 {
            l.acquire().await;
        }
        advance(Duration::from_secs(60)).await;
        for i in 0..5 {
            assert_eq!(l.try_acquire(), Ok(()), "refilled permit {i}");
        }
        assert!(
            l.try_acquire().is_err(),
            "the burst caps what a quiet minute saves up"
        );
    }
}
