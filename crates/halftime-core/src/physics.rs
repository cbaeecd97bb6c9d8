//! Appliance physics: what deferring an appliance sheds, and what it draws afterwards to pay the energy back.
//! The simulator draws each appliance's state at random; the planner plans with the expectation over those
//! states (`expected_response`), so the two share one model.
//!
//! - Thermostatic loads (fridge, freezer, heat pump, water heater) cycle on and off with the class's on-time and
//!   duty cycle. A deferral sheds whatever the compressor or element would have drawn in the window; after
//!   release it runs flat out through its off-time until it has made the shed energy back.
//! - Wet appliances and EV chargers are idle or part-way through a cycle or session. A pause sheds their full
//!   draw until the cycle would have ended; the rest of the cycle runs after release, so its tail lands later.

use crate::appliance::{ApplianceClass, Timing};

/// What the appliance was doing when a deferral began; decides what it sheds and pays back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Physics {
    /// On for `on_s` of every `period_s`; on at `t` (s) when `(t - phase_s) mod period_s < on_s`.
    Thermostat { period_s: i64, on_s: i64, phase_s: i64 },
    /// Part-way through a cycle or charging session that had `remaining_s` left when the deferral began.
    Running { remaining_s: i64 },
    /// Idle: nothing to shed, nothing to pay back.
    Idle,
}

impl Physics {
    /// Seconds the appliance would have been drawing power in `[a_s, b_s)` (seconds after the deferral began),
    /// had it not been deferred.
    pub fn baseline_on_s(&self, a_s: i64, b_s: i64) -> i64 {
        if b_s <= a_s {
            return 0;
        }
        match *self {
            Physics::Thermostat { period_s, on_s, phase_s } => {
                let f = |t: i64| {
                    let u = t - phase_s;
                    u.div_euclid(period_s) * on_s + u.rem_euclid(period_s).min(on_s)
                };
                f(b_s) - f(a_s)
            }
            Physics::Running { remaining_s } => (b_s.min(remaining_s) - a_s.max(0)).max(0),
            Physics::Idle => 0,
        }
    }

    /// Average shed over a planned window of `len_s`: what the appliance reports when it starts.
    pub fn expected_shed_w(&self, power_w: u32, len_s: i64) -> u32 {
        if len_s <= 0 {
            return 0;
        }
        (f64::from(power_w) * self.baseline_on_s(0, len_s) as f64 / len_s as f64).round() as u32
    }

    /// Intervals (seconds after the deferral began) of extra draw after release at `end_s`, each at full power.
    pub fn payback_s(&self, end_s: i64) -> Vec<(i64, i64)> {
        match *self {
            Physics::Thermostat { .. } => {
                // Runs through its off-time from release until the shed on-seconds are made back; a minute at a
                // time, and never for more than a day (an off-time of zero would never pay back).
                let mut owed_s = self.baseline_on_s(0, end_s);
                let mut out = Vec::new();
                let mut t = end_s;
                while owed_s > 0 && t - end_s < 24 * 3600 {
                    let off_s = 60 - self.baseline_on_s(t, t + 60);
                    let take = off_s.min(owed_s);
                    if take > 0 {
                        out.push((t, t + take));
                    }
                    owed_s -= take;
                    t += 60;
                }
                out
            }
            Physics::Running { remaining_s } => {
                // The rest of the cycle runs after release: load above baseline wherever the baseline had ended.
                let from = end_s.max(remaining_s);
                let to = end_s + remaining_s;
                if to > from { vec![(from, to)] } else { Vec::new() }
            }
            Physics::Idle => Vec::new(),
        }
    }
}

/// Expected response of one appliance of `class` deferred for `deferral_min` minutes at a random point of its
/// cycle, per minute, in units of the class's expected reduction (rated power × duty cycle): `shed[k]` for the
/// k-th minute of the deferral, `payback[k]` for the k-th minute after release. Energy is conserved: the sums
/// are equal.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub shed: Vec<f64>,
    pub payback: Vec<f64>,
}

/// Points of the cycle averaged over.
const RESPONSE_SAMPLES: u32 = 96;

/// Moments of a deferral an override is averaged over.
const OVERRIDE_SAMPLES_MAX: i64 = 12;

/// Chance that a household overrides a deferral of `minutes`, given `rate`, its chance of overriding a
/// 20-minute one: the longer the deferral, the likelier the override (linear, at most 95 %). The override comes
/// at a uniformly random moment of the deferral. The planner plans with this; the simulator's households
/// behave by it (and override more when deferred often).
pub fn override_chance(rate: f64, minutes: f64) -> f64 {
    (rate * minutes / 20.0).clamp(0.0, 0.95)
}

/// How often households really override, as a rate per 20-minute deferral (what [`override_chance`] takes):
/// `n_overridden` overrides over `exposure` (deferral lengths in units of 20 minutes), with the rate they
/// declared at enrolment as the prior, worth `prior_exposure`. Households deferred often override more than
/// they declared, and plans that counted on the declared rate fell short.
pub fn observed_override_rate(declared_rate: f64, n_overridden: u64, exposure: f64, prior_exposure: f64) -> f64 {
    let prior = prior_exposure.max(1e-9);
    ((n_overridden as f64 + prior * declared_rate) / (exposure.max(0.0) + prior)).clamp(0.0, 1.0)
}

pub fn expected_response(class: ApplianceClass, deferral_min: u32) -> Response {
    let end_s = i64::from(deferral_min.max(1)) * 60;
    let mut r = Response { shed: vec![0.0; (end_s / 60) as usize], payback: Vec::new() };
    add_released_at(class, end_s, end_s, 1.0, &mut r);
    trim(r)
}

/// Expected response of one appliance whose household overrides its deferral of `deferral_min` at a uniformly
/// random moment: it sheds until then and starts paying back at once, so part of its payback lands inside the
/// deferral's window, where it counts against the shed (a minute's `shed` may be negative). Same units as
/// [`expected_response`]; energy is conserved.
pub fn expected_response_overridden(class: ApplianceClass, deferral_min: u32) -> Response {
    let end_s = i64::from(deferral_min.max(1)) * 60;
    let n = (end_s / 60).min(OVERRIDE_SAMPLES_MAX);
    let mut r = Response { shed: vec![0.0; (end_s / 60) as usize], payback: Vec::new() };
    for j in 0..n {
        let release_s = ((j as f64 + 0.5) / n as f64 * end_s as f64) as i64;
        add_released_at(class, release_s, end_s, 1.0 / n as f64, &mut r);
    }
    trim(r)
}

fn trim(mut r: Response) -> Response {
    while r.payback.last().is_some_and(|x| *x == 0.0) {
        r.payback.pop();
    }
    r
}

/// Adds `weight` × the expected response of an appliance of `class` in a deferral planned to end at `end_s`
/// and released at `release_s` (≤ `end_s`) into `out`: shed per minute of the deferral, less any payback that
/// falls inside it, and payback per minute after `end_s`.
fn add_released_at(class: ApplianceClass, release_s: i64, end_s: i64, weight: f64, out: &mut Response) {
    let profile = class.profile();
    let duty = f64::from(profile.duty_cycle_permille) / 1000.0;
    // Per unit of expected reduction (P × duty): a thermostat's phases shed `duty` of P on average, so divide
    // by it; the cycle samples are running appliances only (a share `duty` of all), whose P is 1 / duty units,
    // times the `duty` chance of running: no scaling.
    let scale = weight
        * match profile.timing {
            Timing::Thermostat { .. } => 1.0 / (f64::from(RESPONSE_SAMPLES) * duty),
            Timing::Cycle { .. } => 1.0 / f64::from(RESPONSE_SAMPLES),
        };
    for i in 0..RESPONSE_SAMPLES {
        let u = (f64::from(i) + 0.5) / f64::from(RESPONSE_SAMPLES);
        let p = match profile.timing {
            Timing::Thermostat { on_min } => {
                let on_s = (on_min * 60.0) as i64;
                let period_s = ((on_min / duty) * 60.0) as i64;
                Physics::Thermostat { period_s, on_s, phase_s: (u * period_s as f64) as i64 }
            }
            // Given it is running (a share `duty` of them are), the rest of its cycle is uniform.
            Timing::Cycle { len_min } => Physics::Running { remaining_s: 60 + (u * (len_min * 60.0 - 60.0)) as i64 },
        };
        for (k, s) in out.shed.iter_mut().enumerate() {
            let k = k as i64;
            *s += p.baseline_on_s(k * 60, (k * 60 + 60).min(release_s)) as f64 / 60.0 * scale;
        }
        for (a, b) in p.payback_s(release_s) {
            // Inside the deferral's window: against the shed, minute by minute.
            for m in a / 60..=(b.min(end_s) - 1).div_euclid(60) {
                let overlap = (b.min(end_s).min(m * 60 + 60) - a.max(m * 60)).max(0);
                if let Some(x) = out.shed.get_mut(m as usize) {
                    *x -= overlap as f64 / 60.0 * scale;
                }
            }
            let (a, b) = (a.max(end_s) - end_s, b - end_s);
            if b <= a {
                continue;
            }
            let last = (b / 60 + 1) as usize;
            if out.payback.len() < last {
                out.payback.resize(last, 0.0);
            }
            for m in a / 60..=b / 60 {
                let overlap = (b.min(m * 60 + 60) - a.max(m * 60)).max(0);
                if let Some(x) = out.payback.get_mut(m as usize) {
                    *x += overlap as f64 / 60.0 * scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_observed_override_rate_starts_at_the_declared_one_and_follows_what_households_do() {
        assert_eq!(observed_override_rate(0.1, 0, 0.0, 5.0), 0.1);
        // Twenty 20-minute deferrals, five overridden, against a prior worth five: from 10 % most of the way to 25 %.
        assert!((observed_override_rate(0.1, 5, 20.0, 5.0) - 0.22).abs() < 1e-9);
        assert!(observed_override_rate(0.1, 0, 45.0, 5.0) < 0.011);
        assert!(observed_override_rate(0.1, 1_000, 1.0, 5.0) <= 1.0);
    }

    #[test]
    fn expected_response_conserves_energy_and_sheds_the_expected_reduction() {
        for class in ApplianceClass::ALL {
            for d in [1, 5, 15, 30, 60, 120] {
                let r = expected_response(class, d);
                let (s, p) = (r.shed.iter().sum::<f64>(), r.payback.iter().sum::<f64>());
                assert!((s - p).abs() < 1e-6 * s.max(1.0), "{class:?} {d}: shed {s} paid back {p}");
                // A thermostat sheds its expected reduction in every minute; a cycle less as cycles end.
                let mean = s / f64::from(d);
                assert!(mean <= 1.01 && mean > 0.3, "{class:?} {d}: mean shed {mean}");
                if matches!(class.profile().timing, Timing::Thermostat { .. }) {
                    assert!((mean - 1.0).abs() < 0.05, "{class:?} {d}: mean shed {mean}");
                }
            }
        }
    }

    #[test]
    fn an_overridden_deferral_sheds_less_pays_back_less_and_conserves_energy() {
        for class in ApplianceClass::ALL {
            for d in [5, 10, 30, 60] {
                let full = expected_response(class, d);
                let over = expected_response_overridden(class, d);
                let (s, p) = (over.shed.iter().sum::<f64>(), over.payback.iter().sum::<f64>());
                assert!((s - p).abs() < 1e-6 * s.abs().max(1.0), "{class:?} {d}: net shed {s} paid back {p}");
                let full_s: f64 = full.shed.iter().sum();
                assert!(s < full_s, "{class:?} {d}: overridden {s} not below {full_s}");
                // The first minute is shed by (almost) everyone; the last by (almost) no one.
                assert!(over.shed[0] > 0.5 * full.shed[0], "{class:?} {d}: first minute {}", over.shed[0]);
                let last = d as usize - 1;
                assert!(over.shed[last] < 0.5 * full.shed[last], "{class:?} {d}: last minute {}", over.shed[last]);
            }
        }
        assert_eq!(override_chance(0.1, 20.0), 0.1);
        assert!((override_chance(0.1, 10.0) - 0.05).abs() < 1e-12);
        assert_eq!(override_chance(1.0, 600.0), 0.95);
    }

    #[test]
    fn a_water_heater_pays_back_over_about_its_on_time_not_at_once() {
        let r = expected_response(ApplianceClass::WaterHeater, 30);
        // Payback starts at release, and lasts about an on-time (15 min) plus the off-time it falls into.
        assert!(r.payback[0] > 0.0);
        assert!(r.payback.len() >= 15, "{} minutes", r.payback.len());
    }
}
