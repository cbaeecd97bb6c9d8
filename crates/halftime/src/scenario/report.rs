//! A run's report, built from what the simulated appliances really did (their physics: what each one shed and
//! paid back), independently of the engine's own estimate. Limits are audited against each household's
//! effective limits with the core's independent `audit`.
//!
//! Definitions (also in `report.md`):
//! - `shed_mw`: load the deferred appliances shed in the minute; `payback_mw`: load released appliances drew
//!   above their baseline paying it back. `delivered_mw` is the net reduction (shed less payback, where
//!   positive) and `rebound_mw` the net rise (payback less shed, where positive), as the grid sees them; demand
//!   with Halftime is `baseline - delivered + rebound`.
//! - `suppliable_mw`: the expected shed of every enrolled appliance whose household's limits would have allowed
//!   a deferral in that minute, given what it had already been deferred (the rebound cap aside). A minute counts
//!   as suppliable when that covers the target and the plan reported no shortfall (the rebound cap binds too:
//!   every kWh shed comes back, and a long plateau runs out of room to put it).
//! - Burden: minutes deferred, weighted by each appliance's expected kW. Jain's index is taken over households
//!   enrolled alike: the same appliance classes, on the system's default limits (households with limits of their
//!   own differ by choice). `jain_burden` is the household-weighted mean over such groups of 20 or more.

use super::{Baseline, plot};
use halftime_core::limits::check_reservation;
use halftime_core::time::MS_PER_MIN;
use halftime_core::{ApplianceClass, EventId, Limits, Reservation, audit};
use halftime_proto::pb;
use halftime_sim::demand::format_utc;
use halftime_sim::{Applied, Population, Scenario};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// Minutes after each window over which late payback (EV sessions ending later) is still counted.
const PAYBACK_TAIL_MIN: usize = 6 * 60;
/// Smallest group of alike households that counts toward Jain's index.
const FAIRNESS_GROUP_MIN: usize = 20;

/// Real time from an event's submission to the first, half and 99 % of its devices acknowledging, as the
/// operator sees it on `WatchEvent` (so to within the engine's progress tick).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AckTimes {
    pub first_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl AckTimes {
    pub fn observe(&mut self, acknowledged: u64, dispatched: u64, at_ms: f64) {
        if dispatched == 0 {
            return;
        }
        let reached = |share: f64| acknowledged as f64 >= share * dispatched as f64;
        if acknowledged > 0 && self.first_ms.is_none() {
            self.first_ms = Some(at_ms);
        }
        if reached(0.5) && self.p50_ms.is_none() {
            self.p50_ms = Some(at_ms);
        }
        if reached(0.99) && self.p99_ms.is_none() {
            self.p99_ms = Some(at_ms);
        }
    }
}

/// One submitted event, as the operator saw it.
#[derive(Clone, Debug)]
pub struct EventRun {
    pub event_id: u64,
    pub label: String,
    pub submit_rpc_ms: f64,
    pub plan: pb::PlanSummary,
    pub acks: AckTimes,
    pub engine: EngineActions,
}

/// What the engine did on its own for an event after planning it, as its last `WatchEvent` update said.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineActions {
    /// Top-ups planned in the window (its devices reporting less than planned) and after it (a rebound to come
    /// over the guard's line).
    pub top_ups: u32,
    pub tail_top_ups: u32,
    /// Deferrals the rebound guard released early.
    pub guard_released: u64,
    /// The run watched the event until its last deferral ended.
    pub closed: bool,
}

impl EngineActions {
    pub fn of(p: &pb::EventProgress) -> Self {
        Self { top_ups: p.top_ups, tail_top_ups: p.tail_top_ups, guard_released: p.guard_released, closed: p.closed }
    }
}

impl EventRun {
    pub fn describe(&self) -> String {
        let p = &self.plan;
        format!(
            "event {} ({}) submitted: {} slots from {}, peak target {:.3} MW, {} appliances in {} households, {} cohorts, LP {:.1} ms, plan ready {:.1} ms, all queued {:.1} ms, shortfall {:.4} MWh",
            self.event_id,
            self.label,
            p.target_kw.len(),
            format_utc(p.start_unix_ms),
            p.target_kw.iter().copied().fold(0.0, f64::max) / 1e3,
            p.n_appliances,
            p.n_households,
            p.n_cohorts,
            p.lp_solve_us as f64 / 1e3,
            p.plan_ready_us as f64 / 1e3,
            p.queued_us as f64 / 1e3,
            p.shortfall_kw.iter().sum::<f64>() / 1e3 / 60.0,
        )
    }
}

pub struct Inputs<'a> {
    pub scenario: &'a Scenario,
    pub population: &'a Population,
    pub limits_of: &'a HashMap<u64, Limits>,
    pub applied: &'a [Applied],
    pub windows: &'a [(i64, i64)],
    pub baseline: &'a Baseline,
    pub events: &'a [EventRun],
    pub estimated_mw: &'a [f64],
    pub estimated_rebound_mw: &'a [f64],
    pub applied_mw: &'a [f64],
    pub overrides_sent: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Minute {
    pub t: String,
    #[serde(skip)]
    pub t_unix_ms: i64,
    pub baseline_mw: f64,
    pub target_mw: f64,
    /// Net reduction below baseline: shed less payback, where positive.
    pub delivered_mw: f64,
    /// Net rise above baseline: payback less shed, where positive.
    pub rebound_mw: f64,
    pub suppliable_mw: f64,
    /// Gross load the deferred appliances shed.
    pub shed_mw: f64,
    /// Gross load the released appliances drew paying back.
    pub payback_mw: f64,
    /// The plan's expected net reduction.
    pub expected_mw: f64,
    /// The plan's expected net rise above baseline (its rebound estimate).
    pub planned_rebound_mw: f64,
    /// Target the plan said it could not meet (within the rebound cap and every limit).
    pub shortfall_mw: f64,
    /// The engine's own estimate on `WatchEvent`.
    pub estimated_mw: f64,
    /// The engine's projected rebound on `WatchEvent` at the minute's end (what the devices said they would pay
    /// back, less shed still under way): what its rebound guard holds under its line where it can.
    pub estimated_rebound_mw: f64,
    /// What the appliances reported shedding when they started (their average over the planned window).
    pub reported_mw: f64,
    pub with_halftime_mw: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    pub event_id: u64,
    pub label: String,
    pub start: String,
    pub slots: usize,
    pub peak_target_mw: f64,
    pub n_appliances: u64,
    pub n_households: u64,
    pub n_cohorts: u32,
    pub lp_solve_ms: f64,
    pub plan_ready_ms: f64,
    pub all_queued_ms: f64,
    pub submit_rpc_ms: f64,
    pub shortfall_mwh: f64,
    /// Largest net rise above baseline in the event's stretch of the run (its tail of late payback included),
    /// MW, when it came, and its share of the stretch's peak delivered reduction. Overlapping events share a
    /// stretch, and these.
    pub rebound_peak_mw: f64,
    pub rebound_peak_at: String,
    pub rebound_peak_fraction: f64,
    pub acks: AckTimes,
    pub engine: EngineActions,
}

/// Worst (largest) over the run's events, ms of real time.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub submit_rpc: f64,
    pub plan_ready: f64,
    pub all_queued: f64,
    pub ack_first: Option<f64>,
    pub ack_p50: Option<f64>,
    pub ack_p99: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FairnessGroup {
    pub classes: String,
    pub n_households: usize,
    pub jain: f64,
    pub burden_mean_kw_min: f64,
    /// Deferrals applied per household, on average, and the share of households never deferred.
    pub deferrals_mean: f64,
    pub never_deferred_share: f64,
    /// The highest index the group's deferrals could have given, however they were shared: an index is at most
    /// the share of households carrying any burden (Cauchy–Schwarz), so a group deferred fewer times than it has
    /// households cannot reach 1. Tells a planner that left some out from a group that had little to share.
    pub jain_reachable: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub n_households: usize,
    pub n_appliances: usize,
    pub n_events: usize,
    pub violations: usize,
    pub jain_burden: f64,
    pub jain_burden_min_group: f64,
    pub fairness_groups: Vec<FairnessGroup>,
    pub burden_median_minutes: f64,
    pub burden_max_minutes: f64,
    pub households_deferred: usize,
    pub overrides: u64,
    pub overrides_sent: u64,
    pub override_lost_mwh: f64,
    pub target_mwh: f64,
    pub delivered_mwh: f64,
    pub rebound_mwh: f64,
    pub shed_mwh: f64,
    pub payback_mwh: f64,
    /// Payback that landed after a window closed (EV sessions end hours later); not in `payback_mwh`.
    pub payback_after_window_mwh: f64,
    /// Shed after the listed minutes by deferrals that started in them (the plan's last deferrals, absorbing
    /// earlier payback), MWh.
    pub shed_after_window_mwh: f64,
    pub peak_delivered_mw: f64,
    /// Largest net rise above baseline (rebound less shed, any minute including after the windows) over the
    /// peak delivered reduction.
    pub rebound_peak_fraction: f64,
    pub minutes_with_target: usize,
    /// Minutes with a target that the enrolled population could supply within every household's limit
    /// (`suppliable_mw`) and within the rebound cap (the plan reports no shortfall).
    pub minutes_suppliable: usize,
    /// Target the plans could not meet, MWh (reported to the operator with each plan).
    pub shortfall_mwh: f64,
    /// Of those, minutes where delivered reached 95 % of target.
    pub minutes_met: usize,
    /// Lowest delivered / target over the suppliable minutes.
    pub delivered_to_target_min: f64,
    pub latency_ms: Latency,
    pub events: Vec<EventSummary>,
    pub minutes: Vec<Minute>,
    pub wall_s: f64,
    pub peak_rss_mb: f64,
    /// Burden minutes of every participating enrolled household, for the histogram.
    #[serde(skip)]
    pub burden_minutes: Vec<f64>,
}

impl Report {
    pub fn summary_line(&self) -> String {
        format!(
            "summary: {} | target {:.3} MWh, delivered {:.3} MWh, met >=95% in {}/{} suppliable minutes, rebound peak {:.1}% of peak reduction | {} overrides | Jain {:.3}, burden max {:.0} min | {} limit violations | plan ready {:.1} ms, all queued {:.1} ms, ack p99 {} | {:.0} s, {:.0} MB",
            self.scenario,
            self.target_mwh,
            self.delivered_mwh,
            self.minutes_met,
            self.minutes_suppliable,
            self.rebound_peak_fraction * 100.0,
            self.overrides,
            self.jain_burden,
            self.burden_max_minutes,
            self.violations,
            self.latency_ms.plan_ready,
            self.latency_ms.all_queued,
            self.latency_ms.ack_p99.map_or("n/a".into(), |v| format!("{v:.0} ms")),
            self.wall_s,
            self.peak_rss_mb,
        )
    }
}

fn expected_w(a: &Applied) -> f64 {
    f64::from(a.power_w) * f64::from(a.class.profile().duty_cycle_permille) / 1000.0
}

fn minutes_of(a: &Applied) -> f64 {
    (a.end_unix_ms - a.start_unix_ms).max(0) as f64 / MS_PER_MIN as f64
}

pub fn build(i: &Inputs<'_>) -> Report {
    // Truth per minute: shed and payback of every deferral, in the window it started in (payback may run past
    // the window's end, into a tail that is counted but not listed).
    let mut minutes = Vec::new();
    let mut payback_after_w_min = 0.0;
    let mut shed_after_w_min = 0.0;
    let mut by_window: Vec<Vec<&Applied>> = vec![Vec::new(); i.windows.len()];
    for a in i.applied {
        let w = i.windows.partition_point(|(from, _)| *from <= a.start_unix_ms).saturating_sub(1);
        if let Some(list) = by_window.get_mut(w) {
            list.push(a);
        }
    }
    let suppliable = suppliable_w(i);
    // Per stretch: (largest net rise, W; its time; peak delivered reduction, W).
    let mut by_window_rise: Vec<(f64, i64, f64)> = Vec::with_capacity(i.windows.len());
    let mut k = 0;
    for (w, &(from, to)) in i.windows.iter().enumerate() {
        let n = ((to - from) / MS_PER_MIN) as usize;
        let (mut shed, mut payback) = (vec![0.0; n + PAYBACK_TAIL_MIN], vec![0.0; n + PAYBACK_TAIL_MIN]);
        for a in &by_window[w] {
            a.add_to(from, &mut shed, &mut payback);
        }
        payback_after_w_min += payback[n..].iter().sum::<f64>();
        shed_after_w_min += shed[n..].iter().sum::<f64>();
        let (rise_m, rise_w) = shed
            .iter()
            .zip(&payback)
            .map(|(s, p)| p - s)
            .enumerate()
            .fold((0, 0.0), |best, (m, x)| if x > best.1 { (m, x) } else { best });
        let peak_w = shed[..n].iter().zip(&payback[..n]).map(|(s, p)| s - p).fold(0.0, f64::max);
        by_window_rise.push((rise_w, from + rise_m as i64 * MS_PER_MIN, peak_w));
        for m in 0..n {
            let t = from + m as i64 * MS_PER_MIN;
            let slot = |start: i64, v: &[f64]| {
                // Nearest slot: a trip's plan starts when the engine received it, a moment after the minute.
                let s = ((t - start) as f64 / MS_PER_MIN as f64).round() as i64;
                if s < 0 { 0.0 } else { v.get(s as usize).copied().unwrap_or(0.0) }
            };
            let target_kw: f64 = i.events.iter().map(|e| slot(e.plan.start_unix_ms, &e.plan.target_kw)).sum();
            let expected_kw: f64 = i.events.iter().map(|e| slot(e.plan.start_unix_ms, &e.plan.expected_kw)).sum();
            let shortfall_kw: f64 = i.events.iter().map(|e| slot(e.plan.start_unix_ms, &e.plan.shortfall_kw)).sum();
            let planned_rebound_kw: f64 = i.events.iter().map(|e| slot(e.plan.start_unix_ms, &e.plan.rebound_kw)).sum();
            let baseline_mw = i.baseline.mw_at(t + MS_PER_MIN / 2);
            minutes.push(Minute {
                t: format_utc(t),
                t_unix_ms: t,
                baseline_mw,
                target_mw: target_kw / 1e3 + 0.0,
                delivered_mw: (shed[m] - payback[m]).max(0.0) / 1e6,
                rebound_mw: (payback[m] - shed[m]).max(0.0) / 1e6,
                shed_mw: shed[m] / 1e6,
                payback_mw: payback[m] / 1e6,
                suppliable_mw: suppliable.get(k).copied().unwrap_or(0.0) / 1e6,
                expected_mw: expected_kw / 1e3 + 0.0,
                planned_rebound_mw: planned_rebound_kw / 1e3 + 0.0,
                shortfall_mw: shortfall_kw / 1e3 + 0.0,
                estimated_mw: i.estimated_mw.get(k).copied().unwrap_or(0.0),
                estimated_rebound_mw: i.estimated_rebound_mw.get(k).copied().unwrap_or(0.0),
                reported_mw: i.applied_mw.get(k).copied().unwrap_or(0.0),
                with_halftime_mw: baseline_mw + (payback[m] - shed[m]) / 1e6,
            });
            k += 1;
        }
    }
    let net_rise_max_w = by_window_rise.iter().map(|r| r.0).fold(0.0, f64::max);
    let peak_delivered_mw = minutes.iter().map(|m| m.delivered_mw).fold(0.0, f64::max);
    let with_target: Vec<&Minute> = minutes.iter().filter(|m| m.target_mw > 0.0).collect();
    // Suppliable: within every household's limits, and within the rebound cap by the plan's own account.
    let suppliable_minutes: Vec<&&Minute> =
        with_target.iter().filter(|m| m.suppliable_mw >= m.target_mw && m.shortfall_mw <= 0.01 * m.target_mw).collect();
    let ratio = |m: &Minute| m.delivered_mw / m.target_mw;

    let (groups, burden_minutes, households_deferred) = fairness(i);
    let weighted: f64 = groups.iter().map(|g| g.jain * g.n_households as f64).sum();
    let n_grouped: usize = groups.iter().map(|g| g.n_households).sum();
    let mut sorted = burden_minutes.clone();
    sorted.sort_by(f64::total_cmp);

    let events: Vec<EventSummary> = i
        .events
        .iter()
        .map(|e| (e, i.windows.partition_point(|(from, _)| *from <= e.plan.start_unix_ms).saturating_sub(1)))
        .map(|(e, w)| (e, by_window_rise.get(w).copied().unwrap_or((0.0, 0, 0.0))))
        .map(|(e, (rise_w, rise_at, peak_w))| EventSummary {
            event_id: e.event_id,
            label: e.label.clone(),
            start: format_utc(e.plan.start_unix_ms),
            slots: e.plan.target_kw.len(),
            peak_target_mw: e.plan.target_kw.iter().copied().fold(0.0, f64::max) / 1e3,
            n_appliances: e.plan.n_appliances,
            n_households: e.plan.n_households,
            n_cohorts: e.plan.n_cohorts,
            lp_solve_ms: e.plan.lp_solve_us as f64 / 1e3,
            plan_ready_ms: e.plan.plan_ready_us as f64 / 1e3,
            all_queued_ms: e.plan.queued_us as f64 / 1e3,
            submit_rpc_ms: e.submit_rpc_ms,
            shortfall_mwh: e.plan.shortfall_kw.iter().sum::<f64>() / 1e3 / 60.0,
            rebound_peak_mw: rise_w / 1e6,
            rebound_peak_at: format_utc(rise_at),
            rebound_peak_fraction: if peak_w > 0.0 { rise_w / peak_w } else { 0.0 },
            acks: e.acks.clone(),
            engine: e.engine.clone(),
        })
        .collect();
    let worst = |f: &dyn Fn(&EventSummary) -> f64| events.iter().map(f).fold(0.0, f64::max);
    let worst_opt = |f: &dyn Fn(&EventSummary) -> Option<f64>| {
        events.iter().map(f).try_fold(0.0f64, |acc, v| v.map(|v| acc.max(v)))
    };
    let latency_ms = Latency {
        submit_rpc: worst(&|e| e.submit_rpc_ms),
        plan_ready: worst(&|e| e.plan_ready_ms),
        all_queued: worst(&|e| e.all_queued_ms),
        ack_first: worst_opt(&|e| e.acks.first_ms),
        ack_p50: worst_opt(&|e| e.acks.p50_ms),
        ack_p99: worst_opt(&|e| e.acks.p99_ms),
    };
    let mwh = |f: &dyn Fn(&Minute) -> f64| minutes.iter().map(f).sum::<f64>() / 60.0;
    Report {
        scenario: i.scenario.name.clone(),
        seed: i.scenario.seed,
        n_households: i.population.households.len(),
        n_appliances: i.population.appliances.len(),
        n_events: i.events.len(),
        violations: violations(i.applied, i.limits_of),
        jain_burden: if n_grouped > 0 { weighted / n_grouped as f64 } else { 1.0 },
        jain_burden_min_group: groups.iter().map(|g| g.jain).fold(1.0, f64::min),
        fairness_groups: groups,
        burden_median_minutes: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        burden_max_minutes: sorted.last().copied().unwrap_or(0.0),
        households_deferred,
        overrides: i.applied.iter().filter(|a| a.overridden).count() as u64,
        overrides_sent: i.overrides_sent,
        override_lost_mwh: i.applied.iter().map(Applied::override_lost_wh).sum::<f64>() / 1e6,
        target_mwh: mwh(&|m| m.target_mw),
        delivered_mwh: mwh(&|m| m.delivered_mw),
        rebound_mwh: mwh(&|m| m.rebound_mw),
        shed_mwh: mwh(&|m| m.shed_mw),
        payback_mwh: mwh(&|m| m.payback_mw),
        payback_after_window_mwh: payback_after_w_min / 60.0 / 1e6,
        shed_after_window_mwh: shed_after_w_min / 60.0 / 1e6,
        peak_delivered_mw,
        rebound_peak_fraction: if peak_delivered_mw > 0.0 { net_rise_max_w / 1e6 / peak_delivered_mw } else { 0.0 },
        minutes_with_target: with_target.len(),
        shortfall_mwh: mwh(&|m| m.shortfall_mw),
        minutes_suppliable: suppliable_minutes.len(),
        minutes_met: suppliable_minutes.iter().filter(|m| ratio(m) >= 0.95).count(),
        delivered_to_target_min: suppliable_minutes.iter().map(|m| ratio(m)).fold(f64::INFINITY, f64::min).min(1e9),
        latency_ms,
        events,
        minutes,
        wall_s: 0.0,
        peak_rss_mb: 0.0,
        burden_minutes,
    }
}

/// Per minute of the windows, in order: the expected shed, W, of enrolled appliances whose households' limits
/// allow a deferral then, given the deferrals they had already started.
fn suppliable_w(i: &Inputs<'_>) -> Vec<f64> {
    struct Home<'a> {
        limits: &'a Limits,
        expected_w: f64,
        deferral_min_max: u32,
        class: ApplianceClass,
        appliance: halftime_core::ApplianceId,
        history: Vec<Reservation>,
    }
    let mut homes: HashMap<u64, Home<'_>> = HashMap::new();
    let fallback = Limits { never: true, ..Limits::system_default() };
    for a in &i.population.appliances {
        let h = homes.entry(a.household.0).or_insert_with(|| Home {
            limits: i.limits_of.get(&a.household.0).unwrap_or(&fallback),
            expected_w: 0.0,
            deferral_min_max: 0,
            class: a.class,
            appliance: a.id,
            history: Vec::new(),
        });
        h.expected_w += a.expected_reduction_w();
        h.deferral_min_max = h.deferral_min_max.max(u32::from(a.deferral_min_max));
    }
    for a in i.applied {
        if let (Some(h), Some(r)) = (homes.get_mut(&a.household.0), reservation_of(a)) {
            h.history.push(r);
        }
    }
    let times: Vec<i64> = i
        .windows
        .iter()
        .flat_map(|&(from, to)| (0..(to - from) / MS_PER_MIN).map(move |m| from + m * MS_PER_MIN))
        .collect();
    let homes: Vec<Home<'_>> = homes.into_values().collect();
    let n_threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let chunk = homes.len().div_ceil(n_threads).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = homes
            .chunks(chunk)
            .map(|part| {
                let times = &times;
                scope.spawn(move || {
                    let mut w = vec![0.0; times.len()];
                    for h in part {
                        for (k, &t) in times.iter().enumerate() {
                            let candidate = Reservation {
                                household: halftime_core::HouseholdId(0),
                                appliance: h.appliance,
                                class: h.class,
                                event: EventId(u64::MAX),
                                not_before_unix_ms: t,
                                not_after_unix_ms: t + MS_PER_MIN,
                                deferral_s: 60,
                                reduction_kw: 0.0,
                            };
                            let before = h.history.iter().filter(|r| r.not_before_unix_ms < t);
                            if check_reservation(h.limits, h.deferral_min_max, before, &candidate).is_ok() {
                                w[k] += h.expected_w;
                            }
                        }
                    }
                    w
                })
            })
            .collect();
        let mut total = vec![0.0; times.len()];
        for p in parts {
            for (x, y) in total.iter_mut().zip(p.join().unwrap_or_default()) {
                *x += y;
            }
        }
        total
    })
}

fn reservation_of(a: &Applied) -> Option<Reservation> {
    let deferral_s = u32::try_from((a.end_unix_ms - a.start_unix_ms).max(0) / 1000).ok()?;
    (deferral_s > 0).then_some(Reservation {
        household: a.household,
        appliance: a.device,
        class: a.class,
        event: a.event,
        not_before_unix_ms: a.start_unix_ms,
        not_after_unix_ms: a.end_unix_ms,
        deferral_s,
        reduction_kw: a.reduction_w as f32 / 1e3,
    })
}

/// Limit violations in what the appliances applied, audited against each household's effective limits.
pub fn violations(applied: &[Applied], limits_of: &HashMap<u64, Limits>) -> usize {
    let mut by_household: HashMap<u64, Vec<Reservation>> = HashMap::new();
    for r in applied.iter().filter_map(reservation_of) {
        by_household.entry(r.household.0).or_default().push(r);
    }
    by_household
        .iter()
        .map(|(h, set)| {
            let limits =
                limits_of.get(h).cloned().unwrap_or_else(|| Limits { never: true, ..Limits::system_default() });
            audit(&limits, |_| u32::MAX, set).len()
        })
        .sum()
}

/// Jain's index per group of alike households, the burden minutes of every participating enrolled household,
/// and how many households were deferred at all.
fn fairness(i: &Inputs<'_>) -> (Vec<FairnessGroup>, Vec<f64>, usize) {
    let mut classes_of: HashMap<u64, u16> = HashMap::new();
    for a in &i.population.appliances {
        *classes_of.entry(a.household.0).or_default() |= 1 << a.class.index();
    }
    let mut kw_min: HashMap<u64, f64> = HashMap::new();
    let mut minutes: HashMap<u64, f64> = HashMap::new();
    let mut deferrals: HashMap<u64, u32> = HashMap::new();
    for a in i.applied {
        *kw_min.entry(a.household.0).or_default() += minutes_of(a) * expected_w(a) / 1e3;
        *minutes.entry(a.household.0).or_default() += minutes_of(a);
        *deferrals.entry(a.household.0).or_default() += 1;
    }
    // Per group: burden (kW·min) and deferrals of each household.
    let mut groups: HashMap<u16, Vec<(f64, u32)>> = HashMap::new();
    let mut burden_minutes = Vec::new();
    for h in &i.population.households {
        let Some(&mask) = classes_of.get(&h.id.0) else { continue };
        let limits = i.limits_of.get(&h.id.0);
        if limits.is_none_or(|l| l.never || l.paused) {
            continue;
        }
        burden_minutes.push(minutes.get(&h.id.0).copied().unwrap_or(0.0));
        if h.own_limits.is_none() {
            let burden = kw_min.get(&h.id.0).copied().unwrap_or(0.0);
            groups.entry(mask).or_default().push((burden, deferrals.get(&h.id.0).copied().unwrap_or(0)));
        }
    }
    let mut out: Vec<FairnessGroup> = groups
        .into_iter()
        .filter(|(_, v)| v.len() >= FAIRNESS_GROUP_MIN)
        .map(|(mask, v)| {
            let burden: Vec<f64> = v.iter().map(|x| x.0).collect();
            let n = v.len() as f64;
            FairnessGroup {
                classes: ApplianceClass::ALL
                    .iter()
                    .filter(|c| mask & (1 << c.index()) != 0)
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join("+"),
                n_households: v.len(),
                jain: jain(&burden),
                burden_mean_kw_min: burden.iter().sum::<f64>() / n,
                deferrals_mean: v.iter().map(|x| f64::from(x.1)).sum::<f64>() / n,
                never_deferred_share: v.iter().filter(|x| x.1 == 0).count() as f64 / n,
                jain_reachable: jain_reachable(v.iter().map(|x| x.1)),
            }
        })
        .collect();
    out.sort_by(|a, b| b.n_households.cmp(&a.n_households).then(a.classes.cmp(&b.classes)));
    (out, burden_minutes, minutes.len())
}

/// The highest Jain's index a group can reach with these deferral counts per household shared out anew: the
/// share of households that would carry some burden, one deferral each, at most 1. 1 for a group never deferred.
fn jain_reachable(deferrals: impl Iterator<Item = u32>) -> f64 {
    let (n, sum) = deferrals.fold((0u64, 0u64), |(n, s), d| (n + 1, s + u64::from(d)));
    if sum == 0 { 1.0 } else { (sum as f64 / n as f64).min(1.0) }
}

/// Jain's fairness index: 1 when all are equal, 1/n when one carries everything. 1 for an empty or all-zero set.
pub fn jain(x: &[f64]) -> f64 {
    let (sum, sum_sq) = x.iter().fold((0.0, 0.0), |(s, q), v| (s + v, q + v * v));
    if sum_sq <= 0.0 { 1.0 } else { sum * sum / (x.len() as f64 * sum_sq) }
}

/// Writes `report.md`, `report.json` and the plots into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    plot::demand(r, &dir.join("demand.svg"))?;
    plot::target(r, &dir.join("target.svg"))?;
    plot::burden(r, &dir.join("burden.svg"))?;
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    let _ = writeln!(s, "# Scenario `{}` (seed {})\n", r.scenario, r.seed);
    let _ = writeln!(
        s,
        "{} households, {} enrolled appliances, {} events. Wall time {:.0} s, peak memory {:.0} MB.\n",
        r.n_households, r.n_appliances, r.n_events, r.wall_s, r.peak_rss_mb
    );
    let _ = writeln!(
        s,
        "![demand with and without Halftime](demand.svg)\n\n![target vs delivered](target.svg)\n\n![burden](burden.svg)\n"
    );
    let _ = writeln!(s, "## Totals\n\n| | |\n|---|---|");
    for (k, v) in [
        ("target", format!("{:.4} MWh", r.target_mwh)),
        ("delivered (net reduction below baseline)", format!("{:.4} MWh", r.delivered_mwh)),
        ("rebound (net rise above baseline)", format!("{:.4} MWh", r.rebound_mwh)),
        ("shed by deferred appliances (gross)", format!("{:.4} MWh", r.shed_mwh)),
        ("paid back by released appliances (gross)", format!("{:.4} MWh", r.payback_mwh)),
        ("payback after the windows", format!("{:.4} MWh", r.payback_after_window_mwh)),
        ("shed after the windows", format!("{:.4} MWh", r.shed_after_window_mwh)),
        ("peak delivered reduction", format!("{:.4} MW", r.peak_delivered_mw)),
        ("largest net rise above baseline / peak reduction", format!("{:.1} %", r.rebound_peak_fraction * 100.0)),
        ("minutes with a target", r.minutes_with_target.to_string()),
        (
            "... that the population could supply within every limit and the rebound cap",
            r.minutes_suppliable.to_string(),
        ),
        ("target the plans reported they could not meet", format!("{:.4} MWh", r.shortfall_mwh)),
        ("... of those with delivered >= 95 % of target", r.minutes_met.to_string()),
        ("lowest delivered / target where suppliable", format!("{:.3}", r.delivered_to_target_min)),
        ("households deferred", r.households_deferred.to_string()),
        ("overrides (sent by households)", format!("{} ({})", r.overrides, r.overrides_sent)),
        ("reduction lost to overrides", format!("{:.4} MWh", r.override_lost_mwh)),
        ("limit violations (audited)", r.violations.to_string()),
    ] {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "\n## Fairness\n");
    let _ = writeln!(
        s,
        "Burden is minutes deferred weighted by expected kW. Jain's index over households enrolled alike (same classes, default limits), weighted mean **{:.3}**, lowest group {:.3}. A group deferred fewer times than it has households cannot reach 1: \"reachable\" is the most its deferrals allow. Burden per participating household: median {:.1} min, max {:.1} min.\n",
        r.jain_burden, r.jain_burden_min_group, r.burden_median_minutes, r.burden_max_minutes
    );
    let _ = writeln!(
        s,
        "| classes enrolled | households | Jain | reachable | mean burden kW·min | deferrals per household | never deferred |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    for g in r.fairness_groups.iter().take(12) {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.1} % |",
            g.classes,
            g.n_households,
            g.jain,
            g.jain_reachable,
            g.burden_mean_kw_min,
            g.deferrals_mean,
            100.0 * g.never_deferred_share
        );
    }
    let l = &r.latency_ms;
    let _ = writeln!(s, "\n## Latency (real time, worst event)\n");
    let _ = writeln!(
        s,
        "| submit RPC | plan ready | all commands queued | first ack | 50 % acked | 99 % acked |\n|---:|---:|---:|---:|---:|---:|\n| {:.1} ms | {:.1} ms | {:.1} ms | {} ms | {} ms | {} ms |",
        l.submit_rpc,
        l.plan_ready,
        l.all_queued,
        opt(l.ack_first),
        opt(l.ack_p50),
        opt(l.ack_p99)
    );
    let _ = writeln!(
        s,
        "\n## Events\n\nThe rebound columns are over the event's stretch of the run, its late payback included. Top-ups are what the engine planned on its own, in the window and after it; releases are deferrals its rebound guard ended early.\n\n| event | start | slots | peak target MW | appliances | households | LP ms | shortfall MWh | largest net rise MW | at | / stretch's peak reduction | top-ups (window + after) | guard releases |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    );
    for e in &r.events {
        let _ = writeln!(
            s,
            "| {} {} | {} | {} | {:.3} | {} | {} | {:.1} | {:.4} | {:.4} | {} | {:.1} % | {} + {} | {} |",
            e.event_id,
            e.label,
            e.start,
            e.slots,
            e.peak_target_mw,
            e.n_appliances,
            e.n_households,
            e.lp_solve_ms,
            e.shortfall_mwh,
            e.rebound_peak_mw,
            e.rebound_peak_at,
            100.0 * e.rebound_peak_fraction,
            e.engine.top_ups,
            e.engine.tail_top_ups,
            e.engine.guard_released
        );
    }
    let _ = writeln!(
        s,
        "\n## Per minute (MW)\n\n| minute (UTC) | baseline | target | delivered | rebound | shed | payback | suppliable | engine estimate | engine rebound estimate | with Halftime |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for m in &r.minutes {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.3} |",
            m.t,
            m.baseline_mw,
            m.target_mw,
            m.delivered_mw,
            m.rebound_mw,
            m.shed_mw,
            m.payback_mw,
            m.suppliable_mw,
            m.estimated_mw,
            m.estimated_rebound_mw,
            m.with_halftime_mw
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_for_equal_shares_and_one_over_n_for_one_carrying_all() {
        assert_eq!(jain(&[2.0, 2.0, 2.0]), 1.0);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(jain(&[]), 1.0);
    }

    #[test]
    fn a_group_deferred_fewer_times_than_it_has_households_cannot_reach_one() {
        assert_eq!(jain_reachable([1, 0, 0, 1].into_iter()), 0.5);
        assert_eq!(jain_reachable([3, 0, 0, 0].into_iter()), 0.75);
        assert_eq!(jain_reachable([2, 2, 1].into_iter()), 1.0);
        assert_eq!(jain_reachable([0, 0].into_iter()), 1.0);
        // The bound holds for any sharing of burden among the households that were deferred.
        let burden = [5.0, 0.0, 1.0, 0.0, 0.0];
        assert!(jain(&burden) <= jain_reachable([1, 0, 1, 0, 0].into_iter()));
    }

    #[test]
    fn acknowledgement_times_are_taken_when_each_share_is_first_reached() {
        let mut a = AckTimes::default();
        a.observe(0, 0, 1.0);
        a.observe(0, 100, 2.0);
        a.observe(10, 100, 3.0);
        a.observe(60, 100, 4.0);
        a.observe(99, 100, 5.0);
        a.observe(100, 100, 6.0);
        assert_eq!(a, AckTimes { first_ms: Some(3.0), p50_ms: Some(4.0), p99_ms: Some(5.0) });
    }
}
