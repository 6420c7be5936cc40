//! Per-user request rates: a GCRA limiter (governor) keyed by the token's `sub`,
//! checked once per authenticated request and socket upgrade.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use threadline_engine::UserId;

type Keyed = RateLimiter<UserId, DefaultKeyedStateStore<UserId>, DefaultClock>;

/// The request-rate limit of every user. Cheap to clone.
#[derive(Clone)]
pub struct RateLimits {
    limiter: Option<Arc<Keyed>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("enabled", &self.limiter.is_some())
            .finish()
    }
}

impl RateLimits {
    /// `per_second` requests a second on average per user, up to `burst` at once;
    /// `per_second` 0 turns the limit off.
    pub fn new(per_second: u32, burst: u32) -> RateLimits {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        RateLimits { limiter }
    }

    /// No limit.
    pub fn off() -> RateLimits {
        RateLimits { limiter: None }
    }

    /// Counts one request of `user`: `Err(wait)` when it is over its rate.
    pub fn check(&self, user: &UserId) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(user)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets users whose allowance is full again, so the table holds only
    /// recently active users.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_user() {
        let rate = RateLimits::new(1, 3);
        let (alice, bob) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        for _ in 0..3 {
            assert!(rate.check(&alice).is_ok());
        }
        let wait = rate.check(&alice).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(rate.check(&bob).is_ok(), "another user is not affected");
        rate.forget_idle();
        let off = RateLimits::off();
        assert!((0..1000).all(|_| off.check(&alice).is_ok()));
    }
}
