//! Time arithmetic on milliseconds since the Unix epoch. The core never reads a clock.

pub const MS_PER_S: i64 = 1_000;
pub const MS_PER_MIN: i64 = 60_000;
pub const MS_PER_DAY: i64 = 86_400_000;

/// The UTC day number of an instant (days since 1970-01-01).
pub fn day_of(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(MS_PER_DAY)
}

/// Minute of the UTC day, 0..1440.
pub fn minute_of_day(unix_ms: i64) -> u32 {
    // rem_euclid of a positive modulus is in 0..MS_PER_DAY, so the quotient fits in u32.
    (unix_ms.rem_euclid(MS_PER_DAY) / MS_PER_MIN) as u32
}

/// Slot index of `unix_ms` relative to slot 0 starting at `start_unix_ms` (floor; negative before the start).
pub fn slot_of(start_unix_ms: i64, unix_ms: i64) -> i64 {
    (unix_ms - start_unix_ms).div_euclid(MS_PER_MIN)
}

/// A clock, injected wherever "now" is needed so that tests and simulations can run in virtual time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> i64;
    /// How many virtual milliseconds pass per real millisecond (1 for the wall clock).
    fn speed(&self) -> f64 {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_and_minute_arithmetic() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(-1), -1);
        assert_eq!(minute_of_day(MS_PER_DAY + 61 * MS_PER_S), 1);
        assert_eq!(slot_of(1_000, 1_000 + MS_PER_MIN - 1), 0);
        assert_eq!(slot_of(1_000, 999), -1);
    }
}
