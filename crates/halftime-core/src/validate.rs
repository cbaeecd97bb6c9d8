//! Validation of everything that arrives from the network or from disk. Every error names its field.

use crate::appliance::{Appliance, ApplianceClass};
use crate::event::{Priority, StressEventSpec};
use crate::ids::{ApplianceId, HouseholdId};
use crate::limits::{Limits, N_QUIET_WINDOWS_MAX, QuietWindow};
use crate::region::{RegionId, RegionSet};
use crate::time::{MS_PER_DAY, MS_PER_S};
use std::fmt;

/// Most one-minute slots in one event's target.
pub const N_SLOTS_MAX: usize = 240;
/// Sanity cap on a slot's target: about a third of GB peak demand.
pub const TARGET_MW_MAX: f64 = 20_000.0;
/// Longest deferral an event may ask for.
pub const EVENT_DEFERRAL_MIN_MAX: u32 = 120;
/// Longest deferral an appliance maker may declare safe.
pub const APPLIANCE_DEFERRAL_MIN_MAX: u32 = 240;
/// How far ahead an event may be scheduled.
pub const START_AHEAD_MS_MAX: i64 = 7 * MS_PER_DAY;
/// How far in the past a start may be (clock skew between operator and engine).
pub const START_PAST_MS_MAX: i64 = 60 * MS_PER_S;
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
pub const RATED_POWER_W_MAX: u32 = 20_000;
pub const REGIONS_PER_EVENT_MAX: usize = 64;

/// An invalid field: `field` is its path in the request (`appliances[3].rated_power_w`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

fn fail<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError::new(field, reason))
}

/// A device's payback forecast: none when `power_w` is 0; otherwise a stretch of at most a day with a rated
/// appliance's power. Fields are named within the report (`payback_w`); the caller adds the report's path.
pub fn payback(power_w: u32, from_unix_ms: i64, to_unix_ms: i64) -> Result<Option<crate::report::Payback>, FieldError> {
    if power_w == 0 {
        return Ok(None);
    }
    if power_w > RATED_POWER_W_MAX {
        return fail("payback_w", format!("at most {RATED_POWER_W_MAX} W"));
    }
    let span_ms = to_unix_ms.checked_sub(from_unix_ms).unwrap_or(-1);
    if span_ms <= 0 {
        return fail("payback_to_unix_ms", "must be after payback_from_unix_ms");
    }
    if span_ms > crate::report::Payback::SPAN_MS_MAX {
        return fail("payback_to_unix_ms", "at most a day after payback_from_unix_ms");
    }
    Ok(Some(crate::report::Payback { power_w, from_unix_ms, to_unix_ms }))
}

/// A target per slot given in MW or kW (exactly one), returned in W.
pub fn target_w(target_mw: &[f64], target_kw: &[f64], field_mw: &str, field_kw: &str) -> Result<Vec<f64>, FieldError> {
    let (values, field, to_w) = match (target_mw.is_empty(), target_kw.is_empty()) {
        (false, true) => (target_mw, field_mw, 1e6),
        (true, false) => (target_kw, field_kw, 1e3),
        (true, true) => {
            return fail(field_mw, format!("one of {field_mw} or {field_kw} must be given"));
        }
        (false, false) => {
            return fail(field_mw, format!("give {field_mw} or {field_kw}, not both"));
        }
    };
    if values.len() > N_SLOTS_MAX {
        return fail(field, format!("at most {N_SLOTS_MAX} one-minute slots, got {}", values.len()));
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() || v < 0.0 {
            return fail(format!("{field}[{i}]"), "must be finite and >= 0");
        }
        let w = v * to_w;
        if w > TARGET_MW_MAX * 1e6 {
            return fail(format!("{field}[{i}]"), format!("above the sanity cap of {TARGET_MW_MAX} MW"));
        }
        out.push(w);
    }
    if out.iter().all(|&w| w == 0.0) {
        return fail(field, "at least one slot must ask for a reduction above 0");
    }
    Ok(out)
}

/// Region codes, resolved, sorted and unique.
pub fn regions(raw: &[String], set: &RegionSet, field: &str) -> Result<Vec<RegionId>, FieldError> {
    if raw.is_empty() {
        return fail(field, "at least one region is required");
    }
    if raw.len() > REGIONS_PER_EVENT_MAX {
        return fail(field, format!("at most {REGIONS_PER_EVENT_MAX} regions"));
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, code) in raw.iter().enumerate() {
        let Some(id) = set.lookup(code) else {
            return fail(format!("{field}[{i}]"), format!("unknown region {:?}", truncate(code)));
        };
        if out.contains(&id) {
            return fail(format!("{field}[{i}]"), format!("region {code:?} is repeated"));
        }
        out.push(id);
    }
    out.sort();
    Ok(out)
}

pub fn region(code: &str, set: &RegionSet, field: &str) -> Result<RegionId, FieldError> {
    set.lookup(code).ok_or_else(|| FieldError::new(field, format!("unknown region {:?}", truncate(code))))
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

pub fn idempotency_key(key: &str, field: &str) -> Result<(), FieldError> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX {
        return fail(field, format!("must be 1..={IDEMPOTENCY_KEY_LEN_MAX} characters"));
    }
    if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return fail(field, "must be printable ASCII without spaces");
    }
    Ok(())
}

pub fn household_id(id: u64, field: &str) -> Result<HouseholdId, FieldError> {
    if id == 0 {
        return fail(field, "must not be 0");
    }
    Ok(HouseholdId(id))
}

pub fn appliance_id(id: u64, field: &str) -> Result<ApplianceId, FieldError> {
    if id == 0 {
        return fail(field, "must not be 0");
    }
    Ok(ApplianceId(id))
}

/// A stress event as it arrives, before validation.
#[derive(Clone, Debug)]
pub struct StressEventInput<'a> {
    pub regions: &'a [String],
    pub start_unix_ms: i64,
    pub target_mw: &'a [f64],
    pub target_kw: &'a [f64],
    pub deferral_min_max: u32,
    pub priority: Priority,
    pub idempotency_key: &'a str,
}

pub fn stress_event(
    input: &StressEventInput<'_>,
    set: &RegionSet,
    now_unix_ms: i64,
) -> Result<StressEventSpec, FieldError> {
    let regions = regions(input.regions, set, "regions")?;
    let start_unix_ms = if input.start_unix_ms == 0 {
        // Round up to the next whole second so that every replica of the answer agrees.
        (now_unix_ms + MS_PER_S - 1).div_euclid(MS_PER_S) * MS_PER_S
    } else {
        if input.start_unix_ms < now_unix_ms - START_PAST_MS_MAX {
            return fail("start_unix_ms", "is in the past (0 means now)");
        }
        if input.start_unix_ms > now_unix_ms + START_AHEAD_MS_MAX {
            return fail("start_unix_ms", "more than 7 days ahead");
        }
        input.start_unix_ms
    };
    let target_w = target_w(input.target_mw, input.target_kw, "target_mw", "target_kw")?;
    if input.deferral_min_max == 0 || input.deferral_min_max > EVENT_DEFERRAL_MIN_MAX {
        return fail("deferral_min_max", format!("must be 1..={EVENT_DEFERRAL_MIN_MAX} minutes"));
    }
    idempotency_key(input.idempotency_key, "idempotency_key")?;
    Ok(StressEventSpec {
        regions,
        start_unix_ms,
        target_w,
        deferral_min_max: input.deferral_min_max,
        priority: input.priority,
        idempotency_key: input.idempotency_key.to_string(),
    })
}

/// An appliance enrolment as it arrives. Zero in an optional field takes the class default.
#[derive(Clone, Debug)]
pub struct ApplianceInput<'a> {
    pub appliance_id: u64,
    pub household_id: u64,
    pub region: &'a str,
    pub class: ApplianceClass,
    pub rated_power_w: u32,
    pub duty_cycle_permille: u32,
    pub deferral_min_max: u32,
    pub override_rate_permille: u32,
}

/// Validates one appliance; `prefix` is its path in the request (`appliances[3]`).
pub fn appliance(input: &ApplianceInput<'_>, set: &RegionSet, prefix: &str) -> Result<Appliance, FieldError> {
    let f = |name: &str| format!("{prefix}.{name}");
    let id = appliance_id(input.appliance_id, &f("appliance_id"))?;
    let household = household_id(input.household_id, &f("household_id"))?;
    let region = region(input.region, set, &f("region"))?;
    if input.rated_power_w == 0 || input.rated_power_w > RATED_POWER_W_MAX {
        return fail(f("rated_power_w"), format!("must be 1..={RATED_POWER_W_MAX} W"));
    }
    let profile = input.class.profile();
    let permille = |v: u32, default: u32, name: &str| -> Result<u16, FieldError> {
        match v {
            0 => Ok(default as u16),
            1..=1000 => Ok(v as u16),
            _ => fail(f(name), "must be 0..=1000 per mille"),
        }
    };
    let duty_cycle_permille = permille(input.duty_cycle_permille, profile.duty_cycle_permille, "duty_cycle_permille")?;
    let override_rate_permille =
        permille(input.override_rate_permille, profile.override_rate_permille, "override_rate_permille")?;
    let deferral_min_max = match input.deferral_min_max {
        0 => profile.deferral_min_max_safe,
        v if v <= APPLIANCE_DEFERRAL_MIN_MAX => v,
        _ => {
            return fail(f("deferral_min_max"), format!("must be 0..={APPLIANCE_DEFERRAL_MIN_MAX} minutes"));
        }
    };
    Ok(Appliance {
        id,
        household,
        region,
        class: input.class,
        rated_power_w: input.rated_power_w,
        duty_cycle_permille,
        // Bounded to APPLIANCE_DEFERRAL_MIN_MAX above.
        deferral_min_max: deferral_min_max as u16,
        override_rate_permille,
    })
}

/// Validates a household's own limits; `prefix` is their path (`limits`).
pub fn limits(l: &Limits, prefix: &str) -> Result<(), FieldError> {
    let f = |name: &str| format!("{prefix}.{name}");
    if l.events_per_day_max > 48 {
        return fail(f("events_per_day_max"), "must be 0..=48");
    }
    if l.deferred_min_per_day_max > 24 * 60 {
        return fail(f("deferred_min_per_day_max"), "must be 0..=1440");
    }
    if l.deferral_min_max > APPLIANCE_DEFERRAL_MIN_MAX {
        return fail(f("deferral_min_max"), format!("must be 0..={APPLIANCE_DEFERRAL_MIN_MAX}"));
    }
    if l.rest_min_min > 7 * 24 * 60 {
        return fail(f("rest_min_min"), "must be 0..=10080 (one week)");
    }
    if l.quiet_windows.len() > N_QUIET_WINDOWS_MAX {
        return fail(f("quiet_windows"), format!("at most {N_QUIET_WINDOWS_MAX} windows"));
    }
    for (i, QuietWindow { start_min, end_min }) in l.quiet_windows.iter().enumerate() {
        if *start_min >= 1440 {
            return fail(format!("{prefix}.quiet_windows[{i}].start_min"), "must be 0..=1439");
        }
        if *end_min > 1440 {
            return fail(format!("{prefix}.quiet_windows[{i}].end_min"), "must be 0..=1440");
        }
        if start_min == end_min {
            return fail(format!("{prefix}.quiet_windows[{i}]"), "start_min and end_min must differ");
        }
    }
    Ok(())
}

/// A bounded "most entries" request field: 0 takes `default`.
pub fn limit_count(v: u32, default: u32, max: u32, field: &str) -> Result<u32, FieldError> {
    match v {
        0 => Ok(default),
        v if v <= max => Ok(v),
        _ => fail(field, format!("must be 0..={max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input<'a>(regions: &'a [String], target_mw: &'a [f64]) -> StressEventInput<'a> {
        StressEventInput {
            regions,
            start_unix_ms: 0,
            target_mw,
            target_kw: &[],
            deferral_min_max: 30,
            priority: Priority::Normal,
            idempotency_key: "k1",
        }
    }

    #[test]
    fn each_invalid_event_field_is_named() {
        let set = RegionSet::gb_dno_areas();
        let ok_regions = vec!["_A".to_string()];
        let now = 1_700_000_000_123;
        let spec = stress_event(&input(&ok_regions, &[1.0]), &set, now).unwrap();
        assert_eq!(spec.start_unix_ms, 1_700_000_001_000);
        let cases: Vec<(StressEventInput<'_>, &str)> = vec![
            (input(&[], &[1.0]), "regions"),
            (input(&ok_regions, &[]), "target_mw"),
            (input(&ok_regions, &[f64::NAN]), "target_mw[0]"),
            (input(&ok_regions, &[1.0, -1.0]), "target_mw[1]"),
            (input(&ok_regions, &[0.0]), "target_mw"),
            (StressEventInput { deferral_min_max: 0, ..input(&ok_regions, &[1.0]) }, "deferral_min_max"),
            (StressEventInput { idempotency_key: "", ..input(&ok_regions, &[1.0]) }, "idempotency_key"),
            (StressEventInput { idempotency_key: "a b", ..input(&ok_regions, &[1.0]) }, "idempotency_key"),
            (StressEventInput { start_unix_ms: 5, ..input(&ok_regions, &[1.0]) }, "start_unix_ms"),
            (StressEventInput { target_kw: &[1.0], ..input(&ok_regions, &[1.0]) }, "target_mw"),
        ];
        for (case, field) in cases {
            let err = stress_event(&case, &set, now).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let bad_region = vec!["_Z".to_string()];
        assert_eq!(stress_event(&input(&bad_region, &[1.0]), &set, now).unwrap_err().field, "regions[0]");
        let repeated = vec!["_A".to_string(), "_A".to_string()];
        assert_eq!(stress_event(&input(&repeated, &[1.0]), &set, now).unwrap_err().field, "regions[1]");
    }

    #[test]
    fn each_invalid_payback_field_is_named() {
        assert_eq!(payback(0, 5, 1), Ok(None));
        let ok = payback(7_400, 1_000, 61_000).unwrap().unwrap();
        assert!((ok.energy_wh() - 7_400.0 / 60.0).abs() < 1e-9);
        let cases = [
            (20_001, 0, 1, "payback_w"),
            (100, 10, 10, "payback_to_unix_ms"),
            (100, i64::MIN, i64::MAX, "payback_to_unix_ms"),
            (100, 0, crate::report::Payback::SPAN_MS_MAX + 1, "payback_to_unix_ms"),
        ];
        for (w, from, to, field) in cases {
            assert_eq!(payback(w, from, to).unwrap_err().field, field);
        }
    }

    proptest! {
        #[test]
        fn event_validation_never_panics(
            regions in proptest::collection::vec(".{0,4}", 0..4),
            start in any::<i64>(),
            target in proptest::collection::vec(any::<f64>(), 0..300),
            deferral in any::<u32>(),
            key in ".{0,200}",
            now in 0i64..4_000_000_000_000,
        ) {
            let set = RegionSet::gb_dno_areas();
            let inp = StressEventInput {
                regions: &regions,
                start_unix_ms: start,
                target_mw: &target,
                target_kw: &[],
                deferral_min_max: deferral,
                priority: Priority::High,
                idempotency_key: &key,
            };
            if let Ok(spec) = stress_event(&inp, &set, now) {
                prop_assert!(!spec.target_w.is_empty() && spec.target_w.len() <= N_SLOTS_MAX);
                prop_assert!(spec.target_w.iter().all(|w| w.is_finite() && *w >= 0.0));
            }
        }
    }
}
