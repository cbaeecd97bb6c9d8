//! The fairness ledger: every household's limits, reservations and burden, in a concurrent map.
//!
//! A reservation is checked and recorded under the household's map-entry lock
//! ([`halftime_core::limits::check_reservation`] against every reservation the household already holds), so
//! two overlapping events, planning and picking concurrently, can never together break a household's limits.
//! The ledger is in memory; the store makes reservations durable and replays them on restart.

use dashmap::DashMap;
use halftime_core::limits::check_reservation;
use halftime_core::time::MS_PER_DAY;
use halftime_core::{ApplianceId, DeviceStatus, EventId, HouseholdId, Limits, Reservation, ReservationCheck};

/// Most reservations one household may hold inside the retention window; a bound on per-household work.
pub const N_RESERVATIONS_PER_HOUSEHOLD_MAX: usize = 512;

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub reservation: Reservation,
    pub status: DeviceStatus,
}

/// One per enrolled household, so kept small: most households never set limits of their own.
#[derive(Clone, Debug)]
struct Book {
    /// `None` for a household on the system caps.
    own: Option<Box<OwnLimits>>,
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct OwnLimits {
    own: Limits,
    /// The tighter of `own` and the system caps, kept so that reserving allocates nothing.
    effective: Limits,
}

impl Book {
    fn effective<'a>(&'a self, system_caps: &'a Limits) -> &'a Limits {
        self.own.as_ref().map_or(system_caps, |o| &o.effective)
    }
}

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ReserveError {
    #[error("unknown household")]
    UnknownHousehold,
    #[error(transparent)]
    Limit(#[from] ReservationCheck),
    #[error("household holds too many reservations")]
    Full,
}

/// What the planner needs to know about a household to place it in a cohort.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Standing {
    /// Longest deferral that still fits today's minutes and the household's longest deferral.
    pub budget_min: u32,
    pub burden_kw_min: f64,
    /// Start of the household's latest deferral still on record (`i64::MIN` if none): among households with the
    /// same burden in the fairness window, the least recently deferred go first, so picking rotates through
    /// everyone instead of returning to the same ones once their burden leaves the window.
    pub last_deferred_unix_ms: i64,
    /// Deferrals on record the household overrode, and the exposure they had: each ended deferral's length in
    /// units of 20 minutes (an overridden one counts twice what it ran, as overrides come halfway through on
    /// average). The planner pools these per class to learn how often households really override.
    pub n_overridden: u32,
    pub override_exposure: f64,
}

#[derive(Debug)]
pub struct Ledger {
    system_caps: Limits,
    /// Reservations older than this are forgotten (history and burden look back this far).
    retention_ms: i64,
    /// Burden is summed over this window.
    fairness_window_ms: i64,
    books: DashMap<HouseholdId, Book, ahash::RandomState>,
}

impl Ledger {
    pub fn new(system_caps: Limits, fairness_window_days: u32, retention_days: u32) -> Self {
        assert!(fairness_window_days >= 1 && retention_days >= fairness_window_days);
        Self {
            system_caps,
            retention_ms: i64::from(retention_days) * MS_PER_DAY,
            fairness_window_ms: i64::from(fairness_window_days) * MS_PER_DAY,
            books: DashMap::with_hasher(ahash::RandomState::new()),
        }
    }

    pub fn system_caps(&self) -> &Limits {
        &self.system_caps
    }

    fn new_book(&self) -> Book {
        Book { own: None, entries: Vec::new() }
    }

    /// Registers a household (with no limits of its own) if it is new.
    pub fn ensure_household(&self, household: HouseholdId) {
        self.books.entry(household).or_insert_with(|| self.new_book());
    }

    pub fn contains(&self, household: HouseholdId) -> bool {
        self.books.contains_key(&household)
    }

    pub fn n_households(&self) -> usize {
        self.books.len()
    }

    pub fn set_limits(&self, household: HouseholdId, own: Limits) {
        let mut book = self.books.entry(household).or_insert_with(|| self.new_book());
        let effective = own.tighter(&self.system_caps);
        book.own = Some(Box::new(OwnLimits { own, effective }));
    }

    /// The household's own limits (the system caps if it set none).
    pub fn own_limits(&self, household: HouseholdId) -> Option<Limits> {
        self.books.get(&household).map(|b| b.own.as_ref().map_or_else(|| self.system_caps.clone(), |o| o.own.clone()))
    }

    pub fn effective_limits(&self, household: HouseholdId) -> Option<Limits> {
        self.books.get(&household).map(|b| b.effective(&self.system_caps).clone())
    }

    /// Checks and records a reservation atomically for its household.
    pub fn try_reserve(
        &self,
        reservation: Reservation,
        appliance_deferral_min_max: u32,
        now_unix_ms: i64,
    ) -> Result<(), ReserveError> {
        let mut book = self.books.get_mut(&reservation.household).ok_or(ReserveError::UnknownHousehold)?;
        let horizon = now_unix_ms - self.retention_ms;
        book.entries.retain(|e| e.reservation.not_after_unix_ms >= horizon);
        if book.entries.len() >= N_RESERVATIONS_PER_HOUSEHOLD_MAX {
            return Err(ReserveError::Full);
        }
        check_reservation(
            book.effective(&self.system_caps),
            appliance_deferral_min_max,
            book.entries.iter().map(|e| &e.reservation),
            &reservation,
        )?;
        book.entries.push(Entry { reservation, status: DeviceStatus::Dispatched });
        Ok(())
    }

    /// Restores a reservation from the store (already checked when it was made).
    pub fn restore(&self, reservation: Reservation, status: DeviceStatus) {
        let mut book = self.books.entry(reservation.household).or_insert_with(|| self.new_book());
        if let Some(e) =
            book.entries.iter_mut().find(|e| same(&e.reservation, reservation.event, reservation.appliance))
        {
            e.reservation = reservation;
            e.status = status;
        } else {
            book.entries.push(Entry { reservation, status });
        }
    }

    /// Undoes a reservation that was never sent (the store refused the batch).
    pub fn unreserve(&self, household: HouseholdId, event: EventId, appliance: ApplianceId) {
        if let Some(mut book) = self.books.get_mut(&household) {
            book.entries.retain(|e| !same(&e.reservation, event, appliance));
        }
    }

    /// Records a device's status for a reservation.
    pub fn set_status(&self, household: HouseholdId, event: EventId, appliance: ApplianceId, status: DeviceStatus) {
        if let Some(mut book) = self.books.get_mut(&household)
            && let Some(e) = book.entries.iter_mut().find(|e| same(&e.reservation, event, appliance))
        {
            e.status = status;
        }
    }

    /// Ends a deferral early at `at_unix_ms` (override, release, rejection): the household is charged only for
    /// what it actually gave. Returns the shortened reservation, or `None` if there was none.
    pub fn end_early(
        &self,
        household: HouseholdId,
        event: EventId,
        appliance: ApplianceId,
        at_unix_ms: i64,
        status: DeviceStatus,
    ) -> Option<Reservation> {
        let mut book = self.books.get_mut(&household)?;
        let i = book.entries.iter().position(|e| same(&e.reservation, event, appliance))?;
        let e = &mut book.entries[i];
        let r = &mut e.reservation;
        e.status = status;
        if at_unix_ms < r.not_after_unix_ms {
            let given_ms = (at_unix_ms - r.not_before_unix_ms).max(0);
            let given_s = u32::try_from(given_ms.div_euclid(1000)).unwrap_or(u32::MAX);
            r.deferral_s = r.deferral_s.min(given_s);
            r.not_after_unix_ms = at_unix_ms.max(r.not_before_unix_ms);
        }
        Some(*r)
    }

    pub fn entries(&self, household: HouseholdId) -> Vec<Entry> {
        self.books.get(&household).map(|b| b.entries.clone()).unwrap_or_default()
    }

    /// Burden over the fairness window, in kW-minutes.
    pub fn burden_kw_min(&self, household: HouseholdId, now_unix_ms: i64) -> f64 {
        self.books.get(&household).map(|b| self.burden_of(&b, now_unix_ms)).unwrap_or(0.0)
    }

    fn burden_of(&self, book: &Book, now_unix_ms: i64) -> f64 {
        let from = now_unix_ms - self.fairness_window_ms;
        book.entries
            .iter()
            .filter(|e| e.reservation.not_before_unix_ms >= from && e.reservation.deferral_s > 0)
            .map(|e| e.reservation.burden_kw_min())
            .sum()
    }

    /// Where a household stands for an event in `[from_unix_ms, to_unix_ms)`: `None` if it cannot take part
    /// (never, paused, events per day used up, a quiet window or another event's rest covers the window start).
    pub fn standing(
        &self,
        household: HouseholdId,
        event: EventId,
        from_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Option<Standing> {
        let book = self.books.get(&household)?;
        let limits = book.effective(&self.system_caps);
        if !limits.participates() {
            return None;
        }
        let day = halftime_core::time::day_of(from_unix_ms);
        let mut used_min = 0u32;
        let mut other_events: Vec<EventId> = Vec::new();
        let rest_ms = i64::from(limits.rest_min_min) * halftime_core::time::MS_PER_MIN;
        for e in &book.entries {
            let r = &e.reservation;
            if r.day() == day {
                used_min = used_min.saturating_add(r.charged_min());
                if r.event != event && !other_events.contains(&r.event) {
                    other_events.push(r.event);
                }
            }
            if r.event != event
                && r.not_after_unix_ms + rest_ms > from_unix_ms
                && r.not_before_unix_ms < from_unix_ms + rest_ms
            {
                return None;
            }
        }
        if other_events.len() as u64 + 1 > u64::from(limits.events_per_day_max) {
            return None;
        }
        let budget_min = limits.deferred_min_per_day_max.saturating_sub(used_min).min(limits.deferral_min_max);
        let last_deferred_unix_ms = book
            .entries
            .iter()
            .filter(|e| e.reservation.deferral_s > 0)
            .map(|e| e.reservation.not_before_unix_ms)
            .max()
            .unwrap_or(i64::MIN);
        let (mut n_overridden, mut override_exposure) = (0u32, 0.0f64);
        for e in &book.entries {
            let ran_s = f64::from(e.reservation.deferral_s);
            match e.status {
                DeviceStatus::Completed => override_exposure += ran_s / 1200.0,
                DeviceStatus::Overridden => {
                    n_overridden += 1;
                    override_exposure += 2.0 * ran_s / 1200.0;
                }
                _ => {}
            }
        }
        Some(Standing {
            budget_min,
            burden_kw_min: self.burden_of(&book, now_unix_ms),
            last_deferred_unix_ms,
            n_overridden,
            override_exposure,
        })
    }

    /// Every reservation, for invariant checks in tests and simulations.
    pub fn all_entries(&self) -> Vec<Entry> {
        self.books.iter().flat_map(|b| b.entries.clone()).collect()
    }
}

fn same(r: &Reservation, event: EventId, appliance: ApplianceId) -> bool {
    r.event == event && r.appliance == appliance
}

#[cfg(test)]
mod tests;
