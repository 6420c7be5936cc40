//! Per-user request rates: GCRA limiters (governor) keyed by the token's `sub`,
//! checked once per authenticated request and socket upgrade. End users and the
//! operator's own services (agents, auditors) differ by orders of magnitude in
//! what is honest, so they have separate limits.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use threadline_engine::{Actor, Role, UserId};

type Keyed = RateLimiter<UserId, DefaultKeyedStateStore<UserId>, DefaultClock>;

/// The request-rate limits of every caller. Cheap to clone.
#[derive(Clone)]
pub struct RateLimits {
    users: Option<Arc<Keyed>>,
    services: Option<Arc<Keyed>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("users", &self.users.is_some())
            .field("services", &self.services.is_some())
            .finish()
    }
}

/// `per_second` on average, up to `burst` at once; `None` when `per_second` is 0 (off).
fn limiter(per_second: u32, burst: u32) -> Option<Arc<Keyed>> {
    NonZeroU32::new(per_second).map(|rate| {
        let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
        Arc::new(RateLimiter::keyed(
            Quota::per_second(rate).allow_burst(burst),
        ))
    })
}

impl RateLimits {
    /// Role `user`: `user_rate` requests a second, `user_burst` at once. Agents and
    /// auditors: `service_rate`, twice that at once. A rate of 0 is no limit.
    pub fn new(user_rate: u32, user_burst: u32, service_rate: u32) -> RateLimits {
        RateLimits {
            users: limiter(user_rate, user_burst),
            services: limiter(service_rate, service_rate.saturating_mul(2)),
        }
    }

    /// No limit.
    #[cfg(test)]
    pub fn off() -> RateLimits {
        RateLimits::new(0, 0, 0)
    }

    /// Counts one request of `actor`: `Err(wait)` when it is over its rate.
    pub fn check(&self, actor: &Actor) -> Result<(), Duration> {
        let limiter = match actor.role {
            Role::User => &self.users,
            _ => &self.services,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter
            .check_key(&actor.user)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets callers whose allowance is full again, so the tables hold only
    /// recently active ones.
    pub fn forget_idle(&self) {
        for limiter in [&self.users, &self.services].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(name: &str, role: Role) -> Actor {
        Actor::new(UserId::parse(name).unwrap(), role)
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_user() {
        let rate = RateLimits::new(1, 3, 0);
        let (alice, bob) = (actor("alice", Role::User), actor("bob", Role::User));
        for _ in 0..3 {
            assert!(rate.check(&alice).is_ok());
        }
        let wait = rate.check(&alice).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(rate.check(&bob).is_ok(), "another user is not affected");
        // Services have their own limit, here none.
        let agent = actor("alice", Role::Agent);
        assert!((0..1000).all(|_| rate.check(&agent).is_ok()));
        rate.forget_idle();
        let off = RateLimits::off();
        assert!((0..1000).all(|_| off.check(&alice).is_ok()));
    }

    #[test]
    fn services_get_twice_their_rate_as_a_burst() {
        let rate = RateLimits::new(0, 0, 2);
        let agent = actor("planner", Role::Agent);
        assert_eq!((0..10).filter(|_| rate.check(&agent).is_ok()).count(), 4);
    }
}
