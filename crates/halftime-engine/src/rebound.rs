//! The rebound guard: an event's projected load above baseline after its window, from what its devices say they
//! will pay back, held under the event's rebound cap by releasing a deferral whose payback would take it over.
//!
//! A plan keeps its expected rebound a couple of standard deviations under the cap, and at least under the
//! guard's line (`PlanRequest::rebound_margin_share`), but a handful of EV chargers decide the late payback of
//! an evening (each pays back 7 kW for as long as it was deferred, when its session would have ended), and over
//! a season some evening's highest minute went a few percent over. Devices know
//! where they are in their cycle or session, so they say what they will pay back when they start; the engine
//! sums that (with the class average for devices that have not said) and releases at once a device whose payback
//! lands where the sum is over the cap. Released within a minute of starting, a paused charging session runs a
//! minute late instead of half an hour; what it would have shed is planned again by the closed loop's top-up.

use crate::runtime::{ClassResponses, DeviceTrack, add_interval};
use halftime_core::physics::Response;
use halftime_core::time::MS_PER_MIN;
use halftime_core::{ApplianceClass, DeviceStatus, Payback};
use std::collections::HashMap;

/// Minutes after an event's window that its rebound is followed for: a charging session paused late in a long
/// window pays back up to four hours after release.
pub const TAIL_SLOTS: usize = 480;

#[derive(Debug, Default)]
pub struct ReboundGuard {
    /// Projected net load above baseline from this event's devices, W, per minute from the end of its window:
    /// paybacks less any shed still under way.
    pub tail_w: Vec<f64>,
    /// How far the projection may scatter, W² per minute: for a device not heard from, its rated power times its
    /// expected gross shed and payback (the planner's bound); for one that has said, the same for the two ways
    /// it may still go (overridden or not), weighted by the chance of each times the other. A residual plan keeps
    /// its allowance for both (`PlanRequest::prior_rebound_var_kw2`).
    pub tail_var_w2: Vec<f64>,
    /// The cap the projection is held under; `None` while not guarding (turned off, or nothing planned yet).
    pub cap_w: Option<f64>,
    /// Deferrals released because their payback would have gone over the cap.
    pub n_released: u64,
    /// Run to the end, and overridden at a random moment, by class and deferral length: the event's one cache
    /// of them, which its realised account uses too.
    pub responses: ClassResponses,
    /// What a device not yet heard from contributes per W of its expected reduction, from its first tail slot on,
    /// by class, deferral length, override chance (its bits) and start relative to the window's end: a plan's
    /// devices share a few of these, and adding one is a pass over a short slice (at national scale, a million
    /// devices join an event at once).
    expected: HashMap<(ApplianceClass, u32, u64, i64), UnitContribution>,
}

/// A contribution per W of expected reduction: the first tail slot it touches, and its values from there.
type UnitContribution = (usize, Vec<f64>);

/// Expected contributions kept, at most.
const EXPECTED_CACHED_MAX: usize = 4_096;

/// The expected contribution per W of expected reduction of a device of a class with responses `r` (run to the
/// end, overridden), overridden with chance `p_override`, deferred for `minutes` from `from`: shed still under way
/// after the window counts against, payback for.
fn unit_expected(
    r: &(Response, Response),
    p_override: f64,
    from: i64,
    minutes: u32,
    window_end: i64,
) -> UnitContribution {
    let mut tail = vec![0.0; TAIL_SLOTS];
    let release = from + i64::from(minutes) * MS_PER_MIN;
    for (response, weight) in [(&r.0, 1.0 - p_override), (&r.1, p_override)] {
        for (k, shed) in response.shed.iter().enumerate() {
            let a = from + k as i64 * MS_PER_MIN;
            if a + MS_PER_MIN > window_end {
                add_interval(&mut tail, window_end, a, a + MS_PER_MIN, -weight * shed);
            }
        }
        for (k, payback) in response.payback.iter().enumerate() {
            let a = release + k as i64 * MS_PER_MIN;
            add_interval(&mut tail, window_end, a, a + MS_PER_MIN, weight * payback);
        }
    }
    let first = tail.iter().position(|&x| x != 0.0).unwrap_or(TAIL_SLOTS);
    let last = tail.iter().rposition(|&x| x != 0.0).map_or(first, |i| i + 1);
    (first, tail[first..last].to_vec())
}

impl ReboundGuard {
    /// Adds `sign` (1 or -1) times what `t` contributes to the projection after `window_end_unix_ms`: its reported
    /// payback less its reported shed once it has said, its class's average response until then (or if it cannot
    /// say), nothing if it never deferred or shed nothing.
    pub fn add(&mut self, window_end_unix_ms: i64, t: &DeviceTrack, sign: f64) {
        if let Some(at) = t.guard_released_at
            && !t.status.is_final()
        {
            // Queued for release: counted as released from then on, with the engine's guess at its payback.
            let released = DeviceTrack {
                status: DeviceStatus::Released,
                ended_unix_ms: Some(t.ended_unix_ms.map_or(at, |e| e.min(at))),
                payback: t.payback_if_ended_at(at),
                guard_released_at: None,
                ..t.clone()
            };
            return self.add(window_end_unix_ms, &released, sign);
        }
        if self.tail_w.is_empty() {
            self.tail_w = vec![0.0; TAIL_SLOTS];
        }
        if self.tail_var_w2.is_empty() {
            self.tail_var_w2 = vec![0.0; TAIL_SLOTS];
        }
        let (tail, var) = (&mut self.tail_w, &mut self.tail_var_w2);
        let rated_w = t.rated_w();
        match (t.started_unix_ms, t.payback) {
            (Some(started), Some(p)) => {
                let (from, to) = t.deferred_interval().unwrap_or((started, started));
                let (shed_to, shed_w) = t.shed().map_or((started, 0.0), |(_, to, w)| (to, w));
                // Until it has ended, the household may still override it halfway, on average: shedding less and
                // paying back sooner.
                let p_override = if t.status.is_final() { 0.0 } else { t.override_chance.clamp(0.0, 1.0) };
                let var_weight = sign * rated_w * p_override * (1.0 - p_override);
                let mut add = |p: Payback, until: i64, weight: f64| {
                    let w = sign * weight;
                    let (payback_w, until) = (f64::from(p.power_w), until.min(shed_to));
                    add_interval(tail, window_end_unix_ms, p.from_unix_ms, p.to_unix_ms, w * payback_w);
                    add_interval(tail, window_end_unix_ms, from, until, -w * shed_w);
                    if var_weight != 0.0 {
                        add_interval(var, window_end_unix_ms, p.from_unix_ms, p.to_unix_ms, var_weight * payback_w);
                        add_interval(var, window_end_unix_ms, from, until, var_weight * shed_w);
                    }
                };
                add(p, to, 1.0 - p_override);
                let half = from + (to - from) / 2;
                if p_override > 0.0
                    && let Some(early) = t.payback_if_ended_at(half)
                {
                    add(early, half, p_override);
                }
            }
            // Never started, or started shedding nothing (an idle appliance): nothing to pay back.
            (None, _) if t.status.is_final() => {}
            (Some(_), None) if t.reduction_w == 0 => {}
            // Ended the moment it started (released at once): it deferred nothing.
            (Some(_), None) if t.deferred_interval().is_none() => {}
            (started, _) => {
                if matches!(t.status, DeviceStatus::Rejected | DeviceStatus::Expired) {
                    return;
                }
                let c = &t.command;
                let from = started.unwrap_or(c.not_before_unix_ms + i64::from(c.randomize_start_s) * 500);
                let minutes = (c.deferral_s / 60).max(1);
                let p_override = t.override_chance.clamp(0.0, 1.0);
                let key = (t.class, minutes, p_override.to_bits(), from - window_end_unix_ms);
                let (w, var_w) = (sign * t.planned_w, sign * t.planned_w * rated_w);
                let add = |tail: &mut [f64], var: &mut [f64], (first, unit): &UnitContribution| {
                    for ((x, v), u) in tail[*first..].iter_mut().zip(&mut var[*first..]).zip(unit) {
                        *x += w * u;
                        *v += var_w * u.abs();
                    }
                };
                if let Some(unit) = self.expected.get(&key) {
                    add(tail, var, unit);
                    return;
                }
                let r = self.responses.get(t.class, minutes);
                let unit = unit_expected(r, p_override, from, minutes, window_end_unix_ms);
                add(tail, var, &unit);
                // Devices that have not said share a few starts; one that started and cannot say has its own.
                if self.expected.len() < EXPECTED_CACHED_MAX {
                    self.expected.insert(key, unit);
                }
            }
        }
    }

    /// The projection up to its last minute with anything in it.
    pub fn projection_w(&self) -> &[f64] {
        let n = self.tail_w.iter().rposition(|w| w.abs() > 1e-6).map_or(0, |i| i + 1);
        &self.tail_w[..n]
    }

    /// Whether `t`'s reported payback lands in a minute where the projection is over the cap.
    pub fn over_cap(&self, window_end_unix_ms: i64, t: &DeviceTrack) -> bool {
        let (Some(cap_w), Some(p)) = (self.cap_w, t.payback) else { return false };
        let slot = |at: i64| (at - window_end_unix_ms).div_euclid(MS_PER_MIN);
        let first = slot(p.from_unix_ms).max(0);
        let last = slot(p.to_unix_ms - 1).min(self.tail_w.len() as i64 - 1);
        (first..=last).any(|s| self.tail_w[s as usize] > cap_w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::physics::{expected_response, expected_response_overridden};
    use halftime_core::{ApplianceId, CommandKind, DeferralCommand, EventId, HouseholdId};

    fn track(class: ApplianceClass, not_before: i64, minutes: u32, override_chance: f64) -> DeviceTrack {
        DeviceTrack {
            household: HouseholdId(1),
            command: DeferralCommand {
                kind: CommandKind::Defer,
                key_id: 0,
                device: ApplianceId(1),
                event: EventId(1),
                counter: 1,
                not_before_unix_ms: not_before,
                not_after_unix_ms: not_before + i64::from(minutes) * MS_PER_MIN,
                deferral_s: minutes * 60,
                randomize_start_s: 0,
            },
            status: DeviceStatus::Dispatched,
            acked: false,
            started_unix_ms: None,
            reduction_w: 0,
            expected_w: 0.0,
            ended_unix_ms: None,
            class,
            planned_w: 100.0,
            payback: None,
            override_chance,
            power_w: 0,
            resume_unconfirmed: false,
            guard_released_at: None,
        }
    }

    /// Until a device says, it counts as its class's expected payback after the window (overrides included), the
    /// same whether or not its start was seen before, and taking it out leaves nothing behind.
    #[test]
    fn a_device_not_heard_from_counts_as_its_class_average() {
        let window_end = 100 * MS_PER_MIN;
        for class in ApplianceClass::ALL {
            let mut guard = ReboundGuard::default();
            let p = 0.15;
            // Released at the window's end: all of its payback falls after it.
            let t = track(class, window_end - 20 * MS_PER_MIN, 20, p);
            let (full, overridden) = (expected_response(class, 20), expected_response_overridden(class, 20));
            let want =
                100.0 * ((1.0 - p) * full.payback.iter().sum::<f64>() + p * overridden.payback.iter().sum::<f64>());
            for n in 1..=2 {
                guard.add(window_end, &t, 1.0);
                let got: f64 = guard.tail_w.iter().sum();
                assert!(
                    (got - n as f64 * want).abs() < 1e-6 * want.max(1.0),
                    "{class:?}: {got} W·min, want {n} × {want}"
                );
                // Its scatter: its rated power times its gross flows, at least its rated power times the net.
                let var: f64 = guard.tail_var_w2.iter().sum();
                assert!(var >= n as f64 * t.rated_w() * want * (1.0 - 1e-9), "{class:?}: variance {var} W²·min");
            }
            guard.add(window_end, &t, -1.0);
            guard.add(window_end, &t, -1.0);
            assert!(guard.tail_w.iter().all(|w| w.abs() < 1e-9), "{class:?}: left behind");
            assert!(guard.tail_var_w2.iter().all(|v| v.abs() < 1e-6), "{class:?}: variance left behind");
        }
    }

    /// A device that has said what it will pay back scatters only by whether its household still overrides it:
    /// not at all once it has ended, and by the chance of each way times the other while it may.
    #[test]
    fn a_device_that_has_said_scatters_only_by_its_override() {
        let window_end = 100 * MS_PER_MIN;
        let started = window_end - 20 * MS_PER_MIN;
        let mut t = track(ApplianceClass::EvCharger, started, 20, 0.2);
        t.started_unix_ms = Some(started);
        t.reduction_w = 7_000;
        t.power_w = 7_000;
        t.payback =
            Some(Payback { power_w: 7_000, from_unix_ms: window_end, to_unix_ms: window_end + 20 * MS_PER_MIN });
        let var_sum = |t: &DeviceTrack| {
            let mut guard = ReboundGuard::default();
            guard.add(window_end, t, 1.0);
            guard.tail_var_w2.iter().sum::<f64>()
        };
        // Under way: its 20 minutes of payback, 0.2 × 0.8 of the time, at 7 kW times 7 kW, and as much again
        // for the half-way override's payback (from half-way, so 10 of its minutes after the window).
        let under_way = var_sum(&t);
        let full_w2_min = 0.2 * 0.8 * 7_000.0 * 7_000.0 * 20.0;
        assert!(under_way > full_w2_min && under_way < 2.0 * full_w2_min, "{under_way} W²·min");
        t.status = DeviceStatus::Completed;
        t.ended_unix_ms = Some(window_end);
        assert_eq!(var_sum(&t), 0.0, "an ended deferral that has said is known");
    }
}
