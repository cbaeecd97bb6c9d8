//! Household limits, reservations, and the pure check that decides whether one more deferral fits.
//!
//! This is the rule that never bends: the fairness ledger calls [`check_reservation`] under the household's
//! lock before recording anything, so every reservation it holds passed this check against every other.

use crate::appliance::ApplianceClass;
use crate::ids::{ApplianceId, EventId, HouseholdId};
use crate::time::{MS_PER_DAY, MS_PER_MIN, day_of};
use serde::{Deserialize, Serialize};

/// Most quiet windows a household may set.
pub const N_QUIET_WINDOWS_MAX: usize = 4;

/// A daily window `[start_min, end_min)` in UTC minutes after midnight; `start_min > end_min` wraps midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietWindow {
    pub start_min: u16,
    pub end_min: u16,
}

impl QuietWindow {
    /// Whether `[from_unix_ms, to_unix_ms)` touches this window on any day.
    pub fn overlaps(&self, from_unix_ms: i64, to_unix_ms: i64) -> bool {
        if to_unix_ms <= from_unix_ms || self.start_min == self.end_min {
            return false;
        }
        let start_ms = i64::from(self.start_min) * MS_PER_MIN;
        let end_ms = i64::from(self.end_min) * MS_PER_MIN;
        // A wrapping window is the union of [start, 24h) and [0, end) of each day; check the day before the
        // interval too, since its wrapped tail reaches into the interval's first day.
        let (first_day, last_day) = (day_of(from_unix_ms) - 1, day_of(to_unix_ms - 1));
        // Deferrals are hours long at most; bound the loop regardless of input.
        for day in first_day..=last_day.min(first_day + 8) {
            let base = day * MS_PER_DAY;
            let windows: [(i64, i64); 2] = if start_ms < end_ms {
                [(base + start_ms, base + end_ms), (0, 0)]
            } else {
                [(base + start_ms, base + MS_PER_DAY + end_ms), (0, 0)]
            };
            if windows.iter().any(|&(a, b)| a < b && a < to_unix_ms && from_unix_ms < b) {
                return true;
            }
        }
        false
    }
}

/// Limits on how a household may be deferred. The effective limits are [`Limits::tighter`] of the household's
/// own and the system-wide fairness caps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most distinct events that may defer this household in one UTC day.
    pub events_per_day_max: u32,
    /// Most deferred appliance-minutes in one UTC day (summed over appliances; a deferral counts on the day
    /// it may start).
    pub deferred_min_per_day_max: u32,
    /// Longest single deferral of any appliance.
    pub deferral_min_max: u32,
    /// Least gap between a deferral window of one event and one of another event.
    pub rest_min_min: u32,
    /// Daily windows in which nothing is deferred.
    pub quiet_windows: Vec<QuietWindow>,
    /// Never defer (vulnerable or medical).
    pub never: bool,
    /// Participation paused.
    pub paused: bool,
}

impl Limits {
    /// Default system-wide fairness caps.
    pub fn system_default() -> Self {
        Self {
            events_per_day_max: 2,
            deferred_min_per_day_max: 90,
            deferral_min_max: 60,
            rest_min_min: 60,
            quiet_windows: Vec::new(),
            never: false,
            paused: false,
        }
    }

    /// The tighter of two limit sets, field by field.
    pub fn tighter(&self, other: &Limits) -> Limits {
        let mut quiet_windows = self.quiet_windows.clone();
        quiet_windows.extend(other.quiet_windows.iter().copied());
        Limits {
            events_per_day_max: self.events_per_day_max.min(other.events_per_day_max),
            deferred_min_per_day_max: self.deferred_min_per_day_max.min(other.deferred_min_per_day_max),
            deferral_min_max: self.deferral_min_max.min(other.deferral_min_max),
            rest_min_min: self.rest_min_min.max(other.rest_min_min),
            quiet_windows,
            never: self.never || other.never,
            paused: self.paused || other.paused,
        }
    }

    /// Whether the household takes part at all.
    pub fn participates(&self) -> bool {
        !self.never && !self.paused
    }
}

/// A household's budget held for one deferral of one appliance in one event.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub household: HouseholdId,
    pub appliance: ApplianceId,
    pub class: ApplianceClass,
    pub event: EventId,
    /// The deferral may start no earlier than this.
    pub not_before_unix_ms: i64,
    /// The appliance resumes by this time whatever happens.
    pub not_after_unix_ms: i64,
    /// Length of the deferral.
    pub deferral_s: u32,
    /// Expected load shed, kW: the weight of this deferral in the household's burden.
    pub reduction_kw: f32,
}

impl Reservation {
    /// Minutes charged against the daily budget (whole minutes, rounded up).
    pub fn charged_min(&self) -> u32 {
        self.deferral_s.div_ceil(60)
    }

    /// Burden in kW-minutes.
    pub fn burden_kw_min(&self) -> f64 {
        f64::from(self.reduction_kw) * f64::from(self.deferral_s) / 60.0
    }

    pub fn day(&self) -> i64 {
        day_of(self.not_before_unix_ms)
    }
}

/// Why a reservation does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ReservationCheck {
    #[error("household never takes part")]
    Never,
    #[error("household participation is paused")]
    Paused,
    #[error("events per day limit reached")]
    EventsPerDay,
    #[error("deferred minutes per day limit reached")]
    MinutesPerDay,
    #[error("deferral longer than the longest allowed")]
    DeferralTooLong,
    #[error("too little rest since another event's deferral")]
    Rest,
    #[error("falls in a quiet window")]
    QuietWindow,
    #[error("appliance already deferred at that time")]
    ApplianceBusy,
    #[error("appliance already deferred in this event")]
    AlreadyInEvent,
    #[error("malformed reservation")]
    Malformed,
}

/// Whether `new` fits beside `existing` (all reservations of the same household) under `limits` (already the
/// effective ones) and the appliance's own longest deferral.
pub fn check_reservation<'a>(
    limits: &Limits,
    appliance_deferral_min_max: u32,
    existing: impl IntoIterator<Item = &'a Reservation>,
    new: &Reservation,
) -> Result<(), ReservationCheck> {
    if new.not_after_unix_ms <= new.not_before_unix_ms || new.deferral_s == 0 {
        return Err(ReservationCheck::Malformed);
    }
    if new.not_after_unix_ms - new.not_before_unix_ms < i64::from(new.deferral_s) * 1000 {
        return Err(ReservationCheck::Malformed);
    }
    if limits.never {
        return Err(ReservationCheck::Never);
    }
    if limits.paused {
        return Err(ReservationCheck::Paused);
    }
    let deferral_s_max = u64::from(limits.deferral_min_max.min(appliance_deferral_min_max)) * 60;
    if u64::from(new.deferral_s) > deferral_s_max {
        return Err(ReservationCheck::DeferralTooLong);
    }
    if limits.quiet_windows.iter().any(|w| w.overlaps(new.not_before_unix_ms, new.not_after_unix_ms)) {
        return Err(ReservationCheck::QuietWindow);
    }
    let day = new.day();
    let mut minutes_today = new.charged_min();
    let mut other_events_today: Vec<EventId> = Vec::new();
    let rest_ms = i64::from(limits.rest_min_min) * MS_PER_MIN;
    for r in existing {
        // One deferral per appliance per event: an event tracks, releases and cancels each device's one command.
        if r.appliance == new.appliance && r.event == new.event {
            return Err(ReservationCheck::AlreadyInEvent);
        }
        if r.appliance == new.appliance
            && r.not_before_unix_ms < new.not_after_unix_ms
            && new.not_before_unix_ms < r.not_after_unix_ms
        {
            return Err(ReservationCheck::ApplianceBusy);
        }
        if r.event != new.event {
            let apart = r.not_after_unix_ms + rest_ms <= new.not_before_unix_ms
                || new.not_after_unix_ms + rest_ms <= r.not_before_unix_ms;
            if !apart {
                return Err(ReservationCheck::Rest);
            }
        }
        if r.day() == day {
            minutes_today += r.charged_min();
            if r.event != new.event && !other_events_today.contains(&r.event) {
                other_events_today.push(r.event);
            }
        }
    }
    if other_events_today.len() as u64 + 1 > u64::from(limits.events_per_day_max) {
        return Err(ReservationCheck::EventsPerDay);
    }
    if minutes_today > limits.deferred_min_per_day_max {
        return Err(ReservationCheck::MinutesPerDay);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: &[Reservation] = &[];

    fn res(event: u64, appliance: u64, start_min: i64, deferral_min: u32) -> Reservation {
        Reservation {
            household: HouseholdId(1),
            appliance: ApplianceId(appliance),
            class: ApplianceClass::Fridge,
            event: EventId(event),
            not_before_unix_ms: start_min * MS_PER_MIN,
            not_after_unix_ms: (start_min + i64::from(deferral_min)) * MS_PER_MIN,
            deferral_s: deferral_min * 60,
            reduction_kw: 0.1,
        }
    }

    #[test]
    fn every_limit_is_enforced() {
        let limits = Limits {
            events_per_day_max: 2,
            deferred_min_per_day_max: 40,
            deferral_min_max: 20,
            rest_min_min: 30,
            quiet_windows: vec![QuietWindow { start_min: 23 * 60, end_min: 6 * 60 }],
            never: false,
            paused: false,
        };
        let day0 = 24 * 60 * 10;
        let noon = day0 + 12 * 60;
        let a = res(1, 1, noon, 15);
        assert_eq!(check_reservation(&limits, 30, NONE, &a), Ok(()));
        assert_eq!(check_reservation(&limits, 30, NONE, &res(1, 1, noon, 25)), Err(ReservationCheck::DeferralTooLong));
        assert_eq!(check_reservation(&limits, 10, NONE, &a), Err(ReservationCheck::DeferralTooLong));
        // Same event, other appliance, overlapping: fine. Same appliance overlapping: busy.
        assert_eq!(check_reservation(&limits, 30, &[a], &res(1, 2, noon, 15)), Ok(()));
        assert_eq!(check_reservation(&limits, 30, &[a], &res(2, 1, noon + 5, 5)), Err(ReservationCheck::ApplianceBusy));
        // Same appliance, same event, later: one deferral per appliance per event.
        assert_eq!(
            check_reservation(&limits, 30, &[a], &res(1, 1, noon + 20, 5)),
            Err(ReservationCheck::AlreadyInEvent)
        );
        // Another event too close: rest.
        assert_eq!(check_reservation(&limits, 30, &[a], &res(2, 2, noon + 30, 10)), Err(ReservationCheck::Rest));
        let b = res(2, 2, noon + 45, 10);
        assert_eq!(check_reservation(&limits, 30, &[a], &b), Ok(()));
        // Third event in the day.
        assert_eq!(
            check_reservation(&limits, 30, &[a, b], &res(3, 3, noon + 120, 5)),
            Err(ReservationCheck::EventsPerDay)
        );
        // Minutes per day across events of the same day.
        assert_eq!(
            check_reservation(&limits, 30, &[a, b], &res(2, 3, noon + 45, 20)),
            Err(ReservationCheck::MinutesPerDay)
        );
        // Quiet window wraps midnight: 23:30 and 05:00 are quiet, 06:00 is not.
        assert_eq!(
            check_reservation(&limits, 30, NONE, &res(1, 1, day0 + 23 * 60 + 30, 5)),
            Err(ReservationCheck::QuietWindow)
        );
        assert_eq!(
            check_reservation(&limits, 30, NONE, &res(1, 1, day0 + 5 * 60, 5)),
            Err(ReservationCheck::QuietWindow)
        );
        assert_eq!(check_reservation(&limits, 30, NONE, &res(1, 1, day0 + 6 * 60, 5)), Ok(()));
        assert_eq!(check_reservation(&limits, 30, NONE, &res(1, 1, day0 + 22 * 60 + 50, 10)), Ok(()));
        assert_eq!(
            check_reservation(&limits, 30, NONE, &res(1, 1, day0 + 22 * 60 + 55, 10)),
            Err(ReservationCheck::QuietWindow)
        );
        let never = Limits { never: true, ..limits.clone() };
        assert_eq!(check_reservation(&never, 30, NONE, &a), Err(ReservationCheck::Never));
        let paused = Limits { paused: true, ..limits };
        assert_eq!(check_reservation(&paused, 30, NONE, &a), Err(ReservationCheck::Paused));
    }

    #[test]
    fn tighter_takes_the_stricter_of_each_field() {
        let own = Limits { events_per_day_max: 5, rest_min_min: 10, never: true, ..Limits::system_default() };
        let eff = own.tighter(&Limits::system_default());
        assert_eq!(eff.events_per_day_max, 2);
        assert_eq!(eff.rest_min_min, 60);
        assert!(eff.never);
    }
}

/// One broken limit found by [`audit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub household: HouseholdId,
    pub what: ReservationCheck,
}

/// Audits a household's final set of reservations against its effective limits, independently of
/// [`check_reservation`] (whole-set aggregates and pairwise gaps rather than one-at-a-time admission). Tests
/// and simulations use it to prove the ledger never admitted a set that breaks a limit.
pub fn audit(
    limits: &Limits,
    appliance_deferral_min_max: impl Fn(ApplianceId) -> u32,
    set: &[Reservation],
) -> Vec<Violation> {
    let mut out = Vec::new();
    let Some(first) = set.first() else { return out };
    let household = first.household;
    let mut flag = |what| out.push(Violation { household, what });
    if !set.is_empty() && limits.never {
        flag(ReservationCheck::Never);
    }
    if !set.is_empty() && limits.paused {
        flag(ReservationCheck::Paused);
    }
    let mut days: Vec<i64> = set.iter().map(Reservation::day).collect();
    days.sort_unstable();
    days.dedup();
    for day in days {
        let today: Vec<&Reservation> = set.iter().filter(|r| r.day() == day).collect();
        let mut events: Vec<EventId> = today.iter().map(|r| r.event).collect();
        events.sort_unstable();
        events.dedup();
        if events.len() as u64 > u64::from(limits.events_per_day_max) {
            flag(ReservationCheck::EventsPerDay);
        }
        let minutes: u64 = today.iter().map(|r| u64::from(r.charged_min())).sum();
        if minutes > u64::from(limits.deferred_min_per_day_max) {
            flag(ReservationCheck::MinutesPerDay);
        }
    }
    let rest_ms = i64::from(limits.rest_min_min) * MS_PER_MIN;
    for (i, a) in set.iter().enumerate() {
        let cap_s = u64::from(limits.deferral_min_max.min(appliance_deferral_min_max(a.appliance))) * 60;
        if u64::from(a.deferral_s) > cap_s {
            flag(ReservationCheck::DeferralTooLong);
        }
        if limits.quiet_windows.iter().any(|w| w.overlaps(a.not_before_unix_ms, a.not_after_unix_ms)) {
            flag(ReservationCheck::QuietWindow);
        }
        for b in &set[i + 1..] {
            let overlap = a.not_before_unix_ms < b.not_after_unix_ms && b.not_before_unix_ms < a.not_after_unix_ms;
            if a.appliance == b.appliance && overlap {
                flag(ReservationCheck::ApplianceBusy);
            }
            let gap_ok = a.not_after_unix_ms + rest_ms <= b.not_before_unix_ms
                || b.not_after_unix_ms + rest_ms <= a.not_before_unix_ms;
            if a.event != b.event && !gap_ok {
                flag(ReservationCheck::Rest);
            }
        }
    }
    out
}
