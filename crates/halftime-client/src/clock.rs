//! Clocks for the SDK, the engine and simulations: the wall clock, and a scaled virtual clock that runs faster
//! than real time for simulations.

use halftime_core::time::Clock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Virtual time starting at `origin_unix_ms` and running `speed` times faster than real time. It can be moved
/// forward (never back), like a machine waking from sleep: simulations set up their population, then jump to
/// just before the first event.
#[derive(Debug)]
pub struct ScaledClock {
    origin_real: Instant,
    origin_unix_ms: AtomicI64,
    speed: f64,
}

impl ScaledClock {
    pub fn new(origin_unix_ms: i64, speed: f64) -> Self {
        assert!(speed.is_finite() && speed >= 1.0, "speed must be >= 1");
        Self { origin_real: Instant::now(), origin_unix_ms: AtomicI64::new(origin_unix_ms), speed }
    }

    /// Moves the clock forward to `unix_ms` if it is behind it.
    pub fn advance_to(&self, unix_ms: i64) {
        let now = self.now_unix_ms();
        if unix_ms > now {
            self.origin_unix_ms.fetch_add(unix_ms - now, Ordering::SeqCst);
        }
    }
}

impl Clock for ScaledClock {
    fn now_unix_ms(&self) -> i64 {
        let real_ms = self.origin_real.elapsed().as_secs_f64() * 1e3;
        self.origin_unix_ms.load(Ordering::SeqCst) + (real_ms * self.speed) as i64
    }

    fn speed(&self) -> f64 {
        self.speed
    }
}

/// Real time to wait for `virtual_ms` to pass on `clock`.
pub fn real_duration(clock: &dyn Clock, virtual_ms: i64) -> std::time::Duration {
    let ms = (virtual_ms.max(0) as f64 / clock.speed()).max(0.0);
    std::time::Duration::from_micros((ms * 1e3) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_clock_runs_fast_and_only_moves_forward() {
        let c = ScaledClock::new(1_000_000, 1000.0);
        let a = c.now_unix_ms();
        c.advance_to(5_000_000);
        let b = c.now_unix_ms();
        assert!(b >= 5_000_000 && a < b);
        c.advance_to(0);
        assert!(c.now_unix_ms() >= b, "never back");
    }
}
