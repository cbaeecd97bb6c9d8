use super::*;
use halftime_core::time::MS_PER_MIN;
use halftime_core::{ApplianceClass, QuietWindow, audit};
use proptest::prelude::*;
use std::sync::Arc;

const DAY0_MS: i64 = 20_000 * MS_PER_DAY;

fn limits_strategy() -> impl Strategy<Value = Limits> {
    (
        0u32..4,
        0u32..90,
        0u32..60,
        0u32..120,
        proptest::option::of((0u16..1440, 0u16..1440)),
        proptest::bool::weighted(0.05),
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(events, minutes, longest, rest, quiet, never, paused)| Limits {
            events_per_day_max: events,
            deferred_min_per_day_max: minutes,
            deferral_min_max: longest,
            rest_min_min: rest,
            quiet_windows: quiet
                .filter(|(a, b)| a != b)
                .map(|(a, b)| QuietWindow { start_min: a, end_min: b })
                .into_iter()
                .collect(),
            never,
            paused,
        })
}

/// A candidate deferral: (household, appliance within household, event, start minute, deferral minutes).
type Candidate = (u64, u64, u64, i64, u32);

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Two (or three) events reserve concurrently from two threads over the same households; whatever order the
    /// threads interleave in, the final ledger breaks no household's limits.
    #[test]
    fn concurrent_events_never_break_a_limit(
        household_limits in proptest::collection::vec(limits_strategy(), 1..12),
        candidates in proptest::collection::vec((0u64..12, 0u64..3, 1u64..4, 0i64..600, 1u32..70), 1..300),
    ) {
        let ledger = Arc::new(Ledger::new(Limits::system_default(), 7, 30));
        for (i, l) in household_limits.iter().enumerate() {
            ledger.set_limits(HouseholdId(i as u64 + 1), l.clone());
        }
        let n_households = household_limits.len() as u64;
        let make = move |&(h, a, e, start, d): &Candidate| {
            let household = HouseholdId(h % n_households + 1);
            let not_before = DAY0_MS + 17 * 60 * MS_PER_MIN + start * MS_PER_MIN;
            Reservation {
                household,
                appliance: ApplianceId(household.0 * 10 + a),
                class: ApplianceClass::Fridge,
                event: EventId(e),
                not_before_unix_ms: not_before,
                not_after_unix_ms: not_before + i64::from(d) * MS_PER_MIN + 30_000,
                deferral_s: d * 60,
                reduction_kw: 0.05,
            }
        };
        let (left, right): (Vec<Candidate>, Vec<Candidate>) = candidates.iter().partition(|c| c.2 % 2 == 0);
        let threads: Vec<_> = [left, right].into_iter().map(|batch| {
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || {
                for c in &batch {
                    let _ = ledger.try_reserve(make(c), 45, DAY0_MS);
                }
            })
        }).collect();
        for t in threads {
            t.join().unwrap();
        }
        for h in 1..=n_households {
            let household = HouseholdId(h);
            let set: Vec<Reservation> = ledger.entries(household).into_iter().map(|e| e.reservation).collect();
            let limits = ledger.effective_limits(household).unwrap();
            let v = audit(&limits, |_| 45, &set);
            prop_assert!(v.is_empty(), "household {h}: {v:?} with {limits:?} over {set:?}");
        }
    }
}

#[test]
fn override_charges_only_what_was_given_and_frees_the_rest() {
    let ledger =
        Ledger::new(Limits { deferred_min_per_day_max: 20, rest_min_min: 0, ..Limits::system_default() }, 7, 30);
    let h = HouseholdId(1);
    ledger.ensure_household(h);
    let r = |event, start_min: i64, minutes: u32| Reservation {
        household: h,
        appliance: ApplianceId(event),
        class: ApplianceClass::Freezer,
        event: EventId(event),
        not_before_unix_ms: DAY0_MS + start_min * MS_PER_MIN,
        not_after_unix_ms: DAY0_MS + (start_min + i64::from(minutes)) * MS_PER_MIN,
        deferral_s: minutes * 60,
        reduction_kw: 0.1,
    };
    ledger.try_reserve(r(1, 0, 20), 60, DAY0_MS).unwrap();
    assert_eq!(
        ledger.try_reserve(r(2, 30, 10), 60, DAY0_MS),
        Err(ReserveError::Limit(ReservationCheck::MinutesPerDay))
    );
    let shortened =
        ledger.end_early(h, EventId(1), ApplianceId(1), DAY0_MS + 5 * MS_PER_MIN, DeviceStatus::Overridden).unwrap();
    assert_eq!(shortened.deferral_s, 300);
    ledger.try_reserve(r(2, 30, 10), 60, DAY0_MS).unwrap();
    assert!((ledger.burden_kw_min(h, DAY0_MS) - (0.1 * 5.0 + 0.1 * 10.0)).abs() < 1e-6);
    // What the household did is on record for the planner: one override after 5 minutes (exposure twice that),
    // and a deferral still running, which counts for nothing yet; then completed, 10 minutes.
    let s = ledger.standing(h, EventId(3), DAY0_MS + MS_PER_DAY, DAY0_MS + MS_PER_DAY).unwrap();
    assert_eq!((s.n_overridden, s.override_exposure), (1, 10.0 / 20.0));
    ledger.set_status(h, EventId(2), ApplianceId(2), DeviceStatus::Completed);
    let s = ledger.standing(h, EventId(3), DAY0_MS + MS_PER_DAY, DAY0_MS + MS_PER_DAY).unwrap();
    assert_eq!((s.n_overridden, s.override_exposure), (1, 20.0 / 20.0));
}

#[test]
fn standing_reflects_budget_and_exclusions() {
    let ledger = Ledger::new(Limits::system_default(), 7, 30);
    let h = HouseholdId(9);
    ledger.set_limits(h, Limits { deferral_min_max: 25, ..Limits::system_default() });
    let s = ledger.standing(h, EventId(1), DAY0_MS, DAY0_MS).unwrap();
    assert_eq!(s.budget_min, 25);
    ledger.set_limits(h, Limits { paused: true, ..Limits::system_default() });
    assert_eq!(ledger.standing(h, EventId(1), DAY0_MS, DAY0_MS), None);
    assert_eq!(ledger.standing(HouseholdId(10), EventId(1), DAY0_MS, DAY0_MS), None);
}
