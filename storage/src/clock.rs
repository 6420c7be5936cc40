//! The clock that stamps `recorded_at`: a seam for tests (a [`ManualClock`] can jump
//! backwards), and the rule that keeps `recorded_at` monotonic per log.
//!
//! A log never stamps a record earlier than the one before it: `recorded_at` is
//! `max(wall clock, last recorded_at)`. When the wall clock jumps backwards, records
//! keep the last stamp until the clock catches up, so `recorded_at` never decreases
//! along positions and a `since`/`until` filter selects a suffix/prefix of the log.
//! The log's [`crate::EventLog::now_ms`] is the same clamped time, so run TTLs,
//! measured against recorded times, never see a run idle for longer than it was.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Wall-clock milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::now_ms()
    }
}

/// A clock that moves only when told (tests: jumps backwards and forwards).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(now_ms)))
    }

    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Jumps the clock back by `ms` (saturating at 0).
    pub fn back(&self, ms: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_sub(ms))
            });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// `recorded_at` for a log: a clock and the last stamp given, never going back.
pub(crate) struct Stamps {
    clock: Arc<dyn Clock>,
    last: AtomicU64,
}

impl fmt::Debug for Stamps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stamps")
            .field("last", &self.last.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Stamps {
    pub(crate) fn new(clock: Arc<dyn Clock>, last: u64) -> Stamps {
        Stamps {
            clock,
            last: AtomicU64::new(last),
        }
    }

    /// The time now, never before the last stamp.
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ms().max(self.last.load(Ordering::Acquire))
    }

    /// The stamp for the next batch, which it records as the last.
    pub(crate) fn stamp(&self) -> u64 {
        let now = self.clock.now_ms();
        let prev = self.last.fetch_max(now, Ordering::AcqRel);
        now.max(prev)
    }
}
