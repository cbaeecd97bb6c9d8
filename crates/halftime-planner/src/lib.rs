//! The deferral planner.
//!
//! Given a per-minute reduction target and the eligible supply grouped into cohorts, an LP (built with
//! `good_lp`, solved by the pure-Rust `microlp` by default) decides how many appliances of each cohort start a
//! deferral in each slot and for how long, so that:
//!
//! - the target is met in every slot, net of expected overrides (an overridden appliance sheds only until the
//!   override and pays back from then) and of the rebound of appliances already released, with an allowance for
//!   the scatter among individual appliances, or the shortfall per slot is reported;
//! - no cohort is given a deferral longer than its budget band allows;
//! - the rebound (payback) of released appliances never exceeds a configured fraction of the peak reduction the
//!   plan delivers, which forces releases to be staggered;
//! - discomfort is least, weighted by appliance class and by burden band, so the least-burdened go first.
//!
//! Cohorts that differ only by region have identical coefficients, so the LP runs over "columns" (class x
//! budget band x burden band) and each column's result is split back over its cohorts in proportion to their
//! sizes. Every term is linear in the count, so the split preserves expected reduction and rebound exactly.
//!
//! Pure: no I/O, no clock, no async. The caller runs it off the async executor.

mod cohort;

pub use cohort::{
    BUDGET_BAND_FLOORS_MIN, BURDEN_BAND_WEIGHTS, Cohort, CohortKey, DEFERRAL_MIN_MIN, N_BURDEN_BANDS, budget_band,
    budget_band_floor_min,
};

use good_lp::{Expression, ProblemVariables, Solution, SolverModel, Variable, variable};
use halftime_core::ApplianceClass;
use halftime_core::appliance::{N_CLASSES, Timing};
use halftime_core::physics::{Response, expected_response, expected_response_overridden, override_chance};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Most start slots per column in the LP; longer events start deferrals every few slots instead.
pub const N_START_SLOTS_MAX: usize = 60;
/// Most cohorts one plan may consider.
pub const N_COHORTS_MAX: usize = 100_000;
/// Slots after the last possible start over which the rebound cap is enforced in every slot, at least: longer
/// if a deferral released later still has a thermostat's payback to run (a water heater may wait two hours).
pub const REBOUND_HORIZON_TAIL_SLOTS: u32 = 90;
/// Beyond those, out to the end of the longest payback (EV sessions end up to four hours after release), the cap
/// is enforced every this many slots. Only the tails of cycles and charging sessions land there, and those
/// change slowly in expectation (an appliance's payback steps up at its release, which is inside the rows
/// enforced every slot). Without them a deferral released near the horizon paid back unseen by the LP.
pub const REBOUND_FAR_TAIL_STRIDE_SLOTS: u32 = 5;
/// Longest prior rebound a request may carry: a day of slots (EV payback runs for hours, not days).
pub const PRIOR_REBOUND_SLOTS_MAX: usize = 24 * 60;
/// Penalty per kW-slot of shortfall: far above the cost of any deferral, so the target is met when it can be.
const SHORTFALL_PENALTY_PER_KW_SLOT: f64 = 1e4;
/// How much more a kW-slot below the target itself costs than one below the target with its allowance for
/// scatter, where the target comes first.
const BELOW_TARGET_PENALTY_FACTOR: f64 = 100.0;
/// A plan short of its target by at most this share in some slot is planned again with the target first.
const TARGET_FIRST_SHORT_MAX: f64 = 0.02;
/// The first slots of a plan, which a later dispatch backs up late or not at all: the engine weighs an event's
/// reports half a minute into each slot, a top-up then takes its own planning and its devices' random start,
/// and the devices starting in a slot report only in that slot. In the season, top-ups shed from the second to
/// the fourth slot.
const UNBACKED_SLOTS: usize = 5;
/// How much more a share of the allowance for scatter costs in the unbacked slots than in the later ones, where
/// the target comes first.
const UNBACKED_PENALTY_FACTOR: f64 = 10.0;
/// A plan on target whose unbacked slots are short of their allowance by less than this share of it is kept.
const UNBACKED_SHORT_MIN: f64 = 1e-3;

#[derive(Clone, Debug, PartialEq)]
pub struct PlanRequest {
    /// Reduction wanted per one-minute slot, W.
    pub target_w: Vec<f64>,
    pub cohorts: Vec<Cohort>,
    /// Rebound in any slot may not exceed this fraction of the peak reduction.
    pub rebound_fraction_max: f64,
    /// The peak reduction the rebound cap is a fraction of, W. `None`: the reduction this plan delivers at the
    /// peak of `target_w`, which is the peak target where the plan meets it and shrinks with the plan where it
    /// falls short. A later dispatch of an event (an update, a top-up) plans a residual under the event's cap,
    /// so the caller gives the peak reduction the event's plan already promises.
    pub rebound_reference_w: Option<f64>,
    /// Rebound already expected from the event's earlier dispatches, W per slot from this request's slot 0:
    /// after the target slots, this plan's rebound shares the cap with it. Only with a `rebound_reference_w`.
    pub prior_rebound_w: Vec<f64>,
    /// How far the earlier dispatches' rebound may scatter around `prior_rebound_w`: its variance per slot, kW²,
    /// from the same slot 0 (empty: none). This plan's allowance for scatter covers the two together, so a
    /// residual does not spend, as its own headroom, what the earlier plan kept back for its scatter.
    pub prior_rebound_var_kw2: Vec<f64>,
    /// Plan the expected rebound low enough that this many standard deviations of the scatter among individual
    /// appliances still fit under the cap (0 plans to the cap itself). See [`solve_lp`].
    pub rebound_sigmas: f64,
    /// Keep the expected rebound at least this share of the cap under it, however small the allowance for
    /// scatter: the engine's rebound guard holds each event under its own line below the cap, and releases at
    /// once a starting deferral whose payback lands over that line. A plan expected over the line (at national
    /// scale the allowance is a fraction of a percent) lost its first deferrals as they started.
    pub rebound_margin_share: f64,
    /// Plan the expected reduction high enough that this many standard deviations of the scatter among
    /// individual appliances still meet the target (0 plans to the target itself). See [`solve_lp`].
    pub delivery_sigmas: f64,
    /// The event's longest deferral.
    pub deferral_min_max: u32,
    /// Devices start each deferral at a uniform random offset in [0, this] seconds, so a share of every
    /// minute's shed and payback lands a minute later; the plan counts on that.
    pub randomize_start_s: u32,
}

/// `n` appliances of cohort `cohort` start a deferral of `deferral_min` minutes at `start_slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub cohort: usize,
    pub start_slot: u32,
    pub deferral_min: u32,
    pub n: u32,
}

/// Expected effect of a set of allocations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Net expected reduction per target slot, W (active reduction less rebound).
    pub expected_w: Vec<f64>,
    /// Target not met per slot, W.
    pub shortfall_w: Vec<f64>,
    /// Expected load above baseline per slot from slot 0 (payback not absorbed by other deferrals), W; runs past
    /// the target window.
    pub rebound_w: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub allocations: Vec<Allocation>,
    pub evaluation: Evaluation,
    pub lp_solve_us: u64,
    pub n_columns: usize,
    pub n_variables: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid plan request: {0}")]
    Invalid(&'static str),
    #[error("LP solver failed: {0}")]
    Solver(String),
}

/// Per column, the mean rated power of its class's appliances in the plan, kW (expected reduction over duty
/// cycle). One figure per class, not per column: the columns of a class differ only in burden and budget, and
/// their appliances' powers by chance. Per column, the scatter allowance (∝ power) told the LP that the
/// most-burdened band, whose appliances happened to be a few percent smaller, delivered a little more within
/// the rebound cap, and where the cap bound it picked them over the least burdened every time.
fn class_rated_power_kw(columns: &[Column]) -> Vec<f64> {
    let mut by_class = [(0.0f64, 0u64); N_CLASSES];
    for col in columns {
        let c = &mut by_class[col.key.class.index()];
        c.0 += col.reduction_w * f64::from(col.n_appliances);
        c.1 += u64::from(col.n_appliances);
    }
    columns
        .iter()
        .map(|col| {
            let (sum_w, n) = by_class[col.key.class.index()];
            let duty = f64::from(col.key.class.profile().duty_cycle_permille) / 1000.0;
            sum_w / (n.max(1) as f64) / duty.max(1e-3) / 1e3
        })
        .collect()
}

/// Expected responses (shed and payback per minute) by class, deferral length and override rate, computed
/// once per plan, as devices will run them: after their random start offset, and overridden by a share of
/// households.
struct Responses {
    /// Mean start offset as a share of a minute.
    offset_share: f64,
    /// Responses run to the end and overridden, by class and deferral length.
    base: HashMap<(ApplianceClass, u32), (Response, Response)>,
    cache: HashMap<(ApplianceClass, u32, u32), Response>,
}

impl Responses {
    fn new(randomize_start_s: u32) -> Self {
        Self {
            offset_share: (f64::from(randomize_start_s) / 120.0).clamp(0.0, 1.0),
            base: HashMap::new(),
            cache: HashMap::new(),
        }
    }

    /// Shed from the start slot on (one minute longer than the deferral when there is an offset), and payback
    /// from the slot the deferral nominally ends, for appliances whose households override a 20-minute
    /// deferral with chance `override_rate` (kept to the per mille).
    fn get(&mut self, class: ApplianceClass, deferral_min: u32, override_rate: f64) -> &Response {
        let f = self.offset_share;
        let permille = (override_rate.clamp(0.0, 1.0) * 1000.0).round() as u32;
        let base = &mut self.base;
        self.cache.entry((class, deferral_min, permille)).or_insert_with(|| {
            let (full, overridden) = base.entry((class, deferral_min)).or_insert_with(|| {
                (expected_response(class, deferral_min), expected_response_overridden(class, deferral_min))
            });
            let p = override_chance(f64::from(permille) / 1000.0, f64::from(deferral_min));
            let mix = |a: &[f64], b: &[f64]| -> Vec<f64> {
                (0..a.len().max(b.len()))
                    .map(|i| (1.0 - p) * a.get(i).copied().unwrap_or(0.0) + p * b.get(i).copied().unwrap_or(0.0))
                    .collect()
            };
            Response {
                shed: delay(&mix(&full.shed, &overridden.shed), f),
                payback: delay(&mix(&full.payback, &overridden.payback), f),
            }
        })
    }
}

/// Chance a cohort's household overrides a 20-minute deferral: the expected reduction it loses to overrides,
/// as the engine reports it (`reduction_w_net_sum` is the reduction less each appliance's override rate).
fn override_rate(c: &Cohort) -> f64 {
    override_rate_of(c.reduction_w_sum, c.reduction_w_net_sum)
}

/// The override rate behind an expected reduction and the same net of overrides.
fn override_rate_of(reduction_w: f64, reduction_w_net: f64) -> f64 {
    if reduction_w <= 0.0 { 0.0 } else { (1.0 - reduction_w_net / reduction_w).clamp(0.0, 1.0) }
}

/// Moves a share `f` of each minute's value into the next minute: the mean effect of a start offset of `f`
/// minutes on a per-minute series. Keeps the total.
fn delay(v: &[f64], f: f64) -> Vec<f64> {
    if f <= 0.0 || v.is_empty() {
        return v.to_vec();
    }
    let mut out = vec![0.0; v.len() + 1];
    for (i, x) in v.iter().enumerate() {
        out[i] += (1.0 - f) * x;
        out[i + 1] += f * x;
    }
    out
}

/// The LP's grouping of cohorts with identical coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ColumnKey {
    class: ApplianceClass,
    budget_band: u8,
    burden_band: u8,
}

struct Column {
    key: ColumnKey,
    cohorts: Vec<usize>,
    n_appliances: u32,
    /// Per appliance: mean expected shed, W, and chance of an override of a 20-minute deferral.
    reduction_w: f64,
    override_rate: f64,
    deferral_options_min: Vec<u32>,
}

fn columns(req: &PlanRequest) -> Vec<Column> {
    let mut by_key: BTreeMap<ColumnKey, Vec<usize>> = BTreeMap::new();
    for (i, c) in req.cohorts.iter().enumerate() {
        if c.n_appliances == 0 || c.reduction_w_net_sum <= 0.0 {
            continue;
        }
        let key = ColumnKey { class: c.key.class, budget_band: c.key.budget_band, burden_band: c.key.burden_band };
        by_key.entry(key).or_default().push(i);
    }
    by_key
        .into_iter()
        .filter_map(|(key, cohorts)| {
            let n_appliances: u32 = cohorts.iter().map(|&i| req.cohorts[i].n_appliances).sum();
            let sum: f64 = cohorts.iter().map(|&i| req.cohorts[i].reduction_w_sum).sum();
            let sum_net: f64 = cohorts.iter().map(|&i| req.cohorts[i].reduction_w_net_sum).sum();
            let cap = budget_band_floor_min(key.budget_band).min(req.deferral_min_max);
            if cap < DEFERRAL_MIN_MIN {
                return None;
            }
            let mut deferral_options_min = vec![cap];
            let half = cap.div_ceil(2);
            if half >= DEFERRAL_MIN_MIN && half < cap {
                deferral_options_min.push(half);
            }
            Some(Column {
                key,
                cohorts,
                n_appliances,
                reduction_w: sum / f64::from(n_appliances),
                override_rate: override_rate_of(sum, sum_net),
                deferral_options_min,
            })
        })
        .collect()
}

/// The LP solver. The default build has only the pure-Rust `microlp`; the `highs` feature adds HiGHS (C++,
/// built from source) and makes it the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LpSolver {
    Microlp,
    #[cfg(feature = "highs")]
    Highs,
}

impl LpSolver {
    /// Every solver this build has, default first.
    pub const ALL: &[LpSolver] = &[
        #[cfg(feature = "highs")]
        LpSolver::Highs,
        LpSolver::Microlp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LpSolver::Microlp => "microlp",
            #[cfg(feature = "highs")]
            LpSolver::Highs => "highs",
        }
    }
}

impl Default for LpSolver {
    fn default() -> Self {
        LpSolver::ALL[0]
    }
}

/// Plans the event with the default solver. Always succeeds for a valid request: an unmeetable target shows as
/// shortfall.
pub fn plan(req: &PlanRequest) -> Result<Plan, PlanError> {
    plan_with(req, LpSolver::default())
}

/// Plans the event with the given solver.
pub fn plan_with(req: &PlanRequest, solver: LpSolver) -> Result<Plan, PlanError> {
    validate(req)?;
    let t0 = Instant::now();
    let mut columns = columns(req);
    // Each pass drops at least one class, so there are at most as many passes as classes, plus the last.
    for _ in 0..N_CLASSES {
        let plan = plan_columns(req, &columns, solver, t0)?;
        let sparse = sparse_classes(req, &plan.allocations);
        if !sparse.contains(&true) {
            return Ok(plan);
        }
        columns.retain(|c| !sparse[c.key.class.index()]);
    }
    plan_columns(req, &columns, solver, t0)
}

/// A class with more eligible appliances than this cannot share a few deferrals out fairly over a season: a first
/// plan does not use it a few at a time, and a dispatch does not defer a single one of it.
pub const CLASS_ELIGIBLE_MANY: u32 = 150;
/// A first plan that gives such a class fewer appliances than this, and under [`SPARSE_CLASS_SHARE_MAX`] of its
/// eligible ones, is planned again without that class.
const SPARSE_CLASS_GIVEN_MAX: f64 = 20.0;
const SPARSE_CLASS_SHARE_MAX: f64 = 0.01;

/// Eligible appliances per class.
pub fn eligible_by_class(cohorts: &[Cohort]) -> [u32; N_CLASSES] {
    let mut eligible = [0u32; N_CLASSES];
    for c in cohorts {
        eligible[c.key.class.index()] += c.n_appliances;
    }
    eligible
}

/// Classes a first plan uses so thinly that their households cannot take turns: plans leave such a class alone
/// most evenings, so the few deferred once carry all of their group's burden over a season. The LP reached for a
/// few tumble dryers or washing machines to lift a peak minute or absorb payback, and in two of seven season runs
/// one dryer-only household of 1,190 carried that group's burden (season Jain 0.945 and 0.932, not 0.999), with
/// the engine already giving back a class picked once. Planned again without them, the LP
/// finds the same from the classes it uses every evening (rounding alone would lose what they gave). Residual
/// plans are left alone: the engine's top-ups draw only on classes that carry the event's plan, where a few
/// more are a fair turn.
fn sparse_classes(req: &PlanRequest, allocations: &[Allocation]) -> [bool; N_CLASSES] {
    let mut sparse = [false; N_CLASSES];
    if req.rebound_reference_w.is_some() {
        return sparse;
    }
    let eligible = eligible_by_class(&req.cohorts);
    let mut given = [0u32; N_CLASSES];
    for a in allocations {
        given[req.cohorts[a.cohort].key.class.index()] += a.n;
    }
    for (i, s) in sparse.iter_mut().enumerate() {
        let given_max = SPARSE_CLASS_GIVEN_MAX.min(SPARSE_CLASS_SHARE_MAX * f64::from(eligible[i]));
        *s = given[i] > 0 && eligible[i] > CLASS_ELIGIBLE_MANY && f64::from(given[i]) < given_max;
    }
    sparse
}

/// Plans over the given columns: the LP, then rounding to whole appliances.
fn plan_columns(req: &PlanRequest, columns: &[Column], solver: LpSolver, t0: Instant) -> Result<Plan, PlanError> {
    let solve = |lp: LpShape| match solver {
        LpSolver::Microlp => solve_lp(req, columns, lp, good_lp::microlp),
        #[cfg(feature = "highs")]
        // Presolve was most of HiGHS's time on these dense LPs (perf), and its worker pool only adds overhead.
        LpSolver::Highs => solve_lp(req, columns, lp, |p| {
            good_lp::highs(p).set_presolve(good_lp::solvers::highs::HighsPresolveType::Off).set_threads(1)
        }),
    };
    // The even-shortfall row can leave the simplex with a singular basis on some inputs; the plan without it is
    // still valid (the shortfall is then placed where it costs least), so that is the fallback.
    let solve_either = |peak_slot_cap, target_first| {
        solve(LpShape { even_shortfall: true, peak_slot_cap, target_first })
            .or_else(|_| solve(LpShape { even_shortfall: false, peak_slot_cap, target_first }))
    };
    let finish = |lp: LpResult| {
        let lp_solve_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        let allocations = round_and_split(req, columns, &lp.starts, &lp.values);
        let evaluation = evaluate(req, &allocations);
        let plan = Plan { allocations, evaluation, lp_solve_us, n_columns: columns.len(), n_variables: lp.n_variables };
        (plan, lp.unbacked_short)
    };
    // First with the cap on the peak target. Where that plan reaches the peak target it is the cap on the peak
    // reduction it delivers. Where it falls short of it, its rebound would be a larger share of what it delivers
    // (Sweden v England: 13.6 %), so it is planned again with the cap on its own peak slot. Not the other way
    // round: that LP may lift the peak slot with a few appliances of a class plans otherwise leave alone, and
    // did so on evenings all but met (about eight washing machines over a season: Jain 0.003 among their
    // households).
    let (mut on_target, unbacked_short) = finish(solve_either(false, false)?);
    // Where the rebound cap leaves too little for the target and its allowance, the LP's shortfall falls evenly
    // on the two together, and the slots where the cap binds hardest (the first and last at the peak) are
    // planned under the target itself while the minutes between keep some allowance: in the season, the first
    // peak minute's expectation averaged 1 % under the target, and most minutes delivered under 95 % were such
    // minutes. So a plan a little short somewhere is planned again with the target before its allowance, and
    // taken if that meets the target in every slot. Only then: with the target out of reach, an LP that counts
    // no scatter against the target lifts its expectation with fewer, larger appliances (a fleet of fridges,
    // freezers and a few chargers was given 15 chargers and no fridge, evening after evening).
    // A plan on target whose first, unbacked slots lack some of their allowance is planned again the same way:
    // that LP gives those slots their allowance before the later ones, which top-ups can back (in the season,
    // most minutes delivered under 95 % were the ramp's second to fifth, at the EV chargers' scatter).
    let short_share =
        |p: &Plan| p.evaluation.shortfall_w.iter().zip(&req.target_w).map(|(s, t)| s / t.max(1.0)).fold(0.0, f64::max);
    let short = short_share(&on_target);
    if (short > 0.0 && short <= TARGET_FIRST_SHORT_MAX) || (short == 0.0 && unbacked_short > UNBACKED_SHORT_MIN) {
        let (target_first, _) = finish(solve_either(false, true)?);
        if short_share(&target_first) <= 0.0 {
            on_target = target_first;
        }
    }
    let peak_target_w = req.target_w.iter().copied().fold(0.0, f64::max);
    let expected_peak_w = on_target.evaluation.expected_w.iter().copied().fold(0.0, f64::max);
    if req.rebound_reference_w.is_some() || expected_peak_w >= peak_target_w {
        return Ok(on_target);
    }
    Ok(finish(solve_either(true, false)?).0)
}

/// A column given fewer appliances than this by the LP, over all its starts, is dropped, not rounded up (see
/// [`round_and_split`]).
const SLIVER_MAX: f64 = 0.5;
/// A class given fewer appliances than this by the LP, over all its columns and starts, and fewer than
/// [`CLASS_SLIVER_SHARE_MAX`] of its eligible appliances, is dropped too.
const CLASS_SLIVER_MAX: f64 = 1.5;
const CLASS_SLIVER_SHARE_MAX: f64 = 0.01;

/// Response coefficients below this share of an appliance's expected reduction are left out of the LP: they
/// change nothing a plan can see and make the simplex slower and worse conditioned. `evaluate` keeps them all.
const RESPONSE_COEFFICIENT_MIN: f64 = 1e-3;

struct LpResult {
    /// (column, start slot, deferral minutes) of each start variable, and the LP's value for each.
    starts: Vec<(usize, u32, u32)>,
    values: Vec<f64>,
    n_variables: usize,
    /// The largest shortfall in an unbacked slot, as a share of its target with the allowance.
    unbacked_short: f64,
}

/// Which LP to build.
#[derive(Clone, Copy, Debug)]
struct LpShape {
    /// Every slot falls short by at most one fraction of its target, the smallest possible.
    even_shortfall: bool,
    /// Without a rebound reference, the cap is a share of the expected reduction in the first peak-target slot
    /// rather than of the peak target.
    peak_slot_cap: bool,
    /// The expectation alone must reach the target before any allowance for scatter counts (see `below_target`),
    /// and the unbacked slots' allowance before the later slots' (see `unbacked_fraction`).
    target_first: bool,
}

fn solve_lp<S: good_lp::Solver>(
    req: &PlanRequest,
    columns: &[Column],
    shape: LpShape,
    solver: S,
) -> Result<LpResult, PlanError> {
    let LpShape { even_shortfall, peak_slot_cap, target_first } = shape;
    // validate() bounds the target to N_SLOTS_MAX.
    let n_slots = req.target_w.len() as u32;
    // Deferrals may start after the target window too, to absorb the payback of earlier ones.
    let tail_starts = columns.iter().flat_map(|c| c.deferral_options_min.first().copied()).max().unwrap_or(0);
    let n_start_slots = n_slots + tail_starts;
    let start_step = (n_start_slots as usize).div_ceil(N_START_SLOTS_MAX).max(1);
    let mut responses = Responses::new(req.randomize_start_s);
    // After the last start: when the last payback ends, and when the last that can step up (a release, or a
    // thermostat making back its shed flat out) ends.
    let (mut payback_end, mut steps_end) = (0, REBOUND_HORIZON_TAIL_SLOTS);
    for col in columns {
        let thermostat = matches!(col.key.class.profile().timing, Timing::Thermostat { .. });
        for &d in &col.deferral_options_min {
            let response = responses.get(col.key.class, d, col.override_rate);
            let end = d + response.payback.len() as u32;
            payback_end = payback_end.max(end);
            steps_end = steps_end.max(if thermostat { end } else { d + 1 });
        }
    }
    let near_horizon = n_start_slots + steps_end;
    let horizon = near_horizon.max(n_start_slots + payback_end);
    // Slots with a row: every one up to the near horizon, then every few.
    let is_row = |t: u32| t < near_horizon || (t - near_horizon).is_multiple_of(REBOUND_FAR_TAIL_STRIDE_SLOTS);
    let peak_target_w = req.rebound_reference_w.unwrap_or_else(|| req.target_w.iter().copied().fold(0.0, f64::max));
    let rebound_cap_kw = req.rebound_fraction_max * peak_target_w / 1e3;

    // Allowances for the scatter among individual appliances, in delivery (target slots) and in rebound (after
    // them). Each appliance's draw in a minute lies between 0 and its rated power P, so the variance of what a
    // set of them sheds and pays back in a slot is at most V = Σ P × |expected effect| (shed and payback both
    // count: a plan whose deferrals absorb each other's payback scatters with its gross flows, not its net).
    // z·√V is not linear; but √V ≤ (V + V₀) / (2√V₀) for any V₀ > 0, with equality at V = V₀, so
    //     expected − z·(V + V₀)/(2√V₀) ≥ bound
    // is linear and never allows for less than z·√V. V₀ is a guess: what the slot's target (or the rebound cap)
    // would be from appliances of the population's mean size, weighted by reduction, and at least (z·P_max)²,
    // so no appliance's effect is discounted or inflated by more than half (small populations, where the guess
    // is poor, still get a plan). After the target slots the allowance takes at most half the cap, so planning
    // nothing is always feasible.
    let rated_kw = class_rated_power_kw(columns);
    let (mut rp_sum, mut r_sum) = (0.0, 0.0);
    for (col, p_kw) in columns.iter().zip(&rated_kw) {
        let r = col.reduction_w * f64::from(col.n_appliances);
        rp_sum += r * p_kw;
        r_sum += r;
    }
    let p_mean_kw = if r_sum > 0.0 { rp_sum / r_sum } else { 0.0 };
    let p_max_kw = rated_kw.iter().copied().fold(0.0, f64::max);
    // Per slot: the factor a = z / (2√V₀) on each appliance's P × |effect|, and the bound on the net reduction
    // (the target raised by z√V₀/2, or the rebound cap lowered by it).
    let (scatter, bound_kw): (Vec<f64>, Vec<f64>) = (0..horizon as usize)
        .map(|t| match req.target_w.get(t) {
            Some(w) => {
                let (z, target_kw) = (req.delivery_sigmas, w / 1e3);
                if z <= 0.0 || target_kw <= 0.0 {
                    return (0.0, target_kw);
                }
                let sqrt_v0 = (p_mean_kw * target_kw).max((z * p_max_kw).powi(2)).sqrt();
                (z / (2.0 * sqrt_v0), target_kw + z * sqrt_v0 / 2.0)
            }
            None => {
                // What the event's earlier dispatches left of the cap in this slot, and how far theirs scatters.
                let prior_kw = req.prior_rebound_w.get(t).copied().unwrap_or(0.0) / 1e3;
                let prior_var_kw2 = req.prior_rebound_var_kw2.get(t).copied().unwrap_or(0.0);
                let headroom_kw = (rebound_cap_kw - prior_kw).max(0.0);
                // At most the headroom, so planning nothing stays feasible.
                let margin_kw = (req.rebound_margin_share * rebound_cap_kw).min(headroom_kw);
                let z = req.rebound_sigmas;
                if z <= 0.0 || rebound_cap_kw <= 0.0 || p_mean_kw <= 0.0 {
                    return (0.0, -headroom_kw + margin_kw);
                }
                // With the earlier dispatches' variance Vp: z·√(Vp + V) ≤ z·√V₀/2 + z·(Vp + V)/(2√V₀), V₀ guessed as
                // Vp plus this plan's own guess. The constant part is held to half the headroom, because a small
                // fleet's z·σ can exceed the whole cap and it should still plan something; the earlier plans'
                // variance counts like this plan's own, so a residual does not spend what they kept back.
                let sqrt_v0 = (prior_var_kw2 + p_mean_kw * rebound_cap_kw).max((z * p_max_kw).powi(2)).sqrt();
                let prior_scatter_kw = z * prior_var_kw2 / (2.0 * sqrt_v0);
                let allowance_kw =
                    ((z * sqrt_v0 / 2.0).min(headroom_kw / 2.0) + prior_scatter_kw).min(headroom_kw).max(margin_kw);
                (z / (2.0 * sqrt_v0), -headroom_kw + allowance_kw)
            }
        })
        .unzip();
    let required_kw = &bound_kw[..n_slots as usize];

    let mut vars = ProblemVariables::new();
    let mut starts: Vec<(usize, u32, u32)> = Vec::new();
    let mut start_vars: Vec<Variable> = Vec::new();
    let mut objective = Expression::with_capacity(columns.len() * 64);
    // Net load change below baseline per slot: active deferrals less rebound.
    let mut net: Vec<Expression> = (0..horizon).map(|_| Expression::with_capacity(64)).collect();
    let mut capacity: Vec<Expression> = (0..columns.len()).map(|_| Expression::with_capacity(64)).collect();
    // The first slot with the peak target, and the plan's expected net reduction in it (no allowances): what the
    // rebound cap is a share of when the request gives no reference.
    let peak_slot = (req.rebound_reference_w.is_none() && peak_slot_cap)
        .then(|| req.target_w.iter().position(|&w| w >= peak_target_w).unwrap_or(0) as u32);
    let mut peak_expected = Expression::with_capacity(columns.len() * 4);
    // Per target slot, the expected net reduction with no allowance, where there is one: see `below_target`.
    let target_first = target_first && req.delivery_sigmas > 0.0;
    let mut bare: Vec<Expression> =
        (0..if target_first { n_slots } else { 0 }).map(|_| Expression::with_capacity(64)).collect();
    for (j, col) in columns.iter().enumerate() {
        let profile = col.key.class.profile();
        let weight = profile.discomfort_weight * BURDEN_BAND_WEIGHTS[usize::from(col.key.burden_band)];
        let r_kw = col.reduction_w / 1e3;
        let p_kw = rated_kw[j];
        // An appliance's coefficient in slot t: its expected effect, less its scatter allowance.
        let coefficient = |t: u32, effect: f64| r_kw * effect - scatter[t as usize] * p_kw * r_kw * effect.abs();
        for &d in &col.deferral_options_min {
            let response = responses.get(col.key.class, d, col.override_rate);
            for s in (0..n_start_slots).step_by(start_step) {
                let v = vars.add(variable().min(0.0).max(f64::from(col.n_appliances)));
                starts.push((j, s, d));
                start_vars.push(v);
                // Cost: kW-minutes of discomfort, plus a tie-break towards shorter deferrals.
                objective.add_mul(weight * r_kw * f64::from(d) + 1e-6 * f64::from(d), v);
                for (t, shed) in (s..horizon).zip(&response.shed) {
                    if shed.abs() >= RESPONSE_COEFFICIENT_MIN && is_row(t) {
                        net[t as usize].add_mul(coefficient(t, *shed), v);
                        if Some(t) == peak_slot {
                            peak_expected.add_mul(r_kw * shed, v);
                        }
                        if let Some(e) = bare.get_mut(t as usize) {
                            e.add_mul(r_kw * shed, v);
                        }
                    }
                }
                for (t, payback) in ((s + d)..horizon).zip(&response.payback) {
                    if *payback >= RESPONSE_COEFFICIENT_MIN && is_row(t) {
                        net[t as usize].add_mul(coefficient(t, -payback), v);
                        if Some(t) == peak_slot {
                            peak_expected.add_mul(-r_kw * payback, v);
                        }
                        if let Some(e) = bare.get_mut(t as usize) {
                            e.add_mul(-r_kw * payback, v);
                        }
                    }
                }
                capacity[j].add_mul(1.0, v);
            }
        }
    }
    let shortfall: Vec<Variable> = (0..n_slots).map(|_| vars.add(variable().min(0.0))).collect();
    for &sf in &shortfall {
        objective.add_mul(SHORTFALL_PENALTY_PER_KW_SLOT, sf);
    }
    // Where the target cannot be met, every slot falls short by the same fraction of its target, the smallest
    // possible: without it the LP is free to drop whole minutes (the first minutes of a trip, say) instead.
    // Weighted above any amount of per-slot shortfall, so it is minimised first.
    let short_fraction = even_shortfall.then(|| vars.add(variable().min(0.0).max(1.0)));
    if let Some(f) = short_fraction {
        let required_kw_sum: f64 = required_kw.iter().sum();
        objective.add_mul(SHORTFALL_PENALTY_PER_KW_SLOT * (required_kw_sum + 1.0), f);
    }
    // With `target_first`, the expectation alone must reach the target in every slot, with a shortfall of its
    // own a hundred times dearer and as even, and what is left goes to the allowance (see `plan_columns`).
    let below_target: Vec<Variable> = bare.iter().map(|_| vars.add(variable().min(0.0))).collect();
    for &b in &below_target {
        objective.add_mul(BELOW_TARGET_PENALTY_FACTOR * SHORTFALL_PENALTY_PER_KW_SLOT, b);
    }
    let below_fraction = (even_shortfall && target_first).then(|| vars.add(variable().min(0.0).max(1.0)));
    if let Some(g) = below_fraction {
        let target_kw_sum: f64 = req.target_w.iter().sum::<f64>() / 1e3;
        objective.add_mul(BELOW_TARGET_PENALTY_FACTOR * SHORTFALL_PENALTY_PER_KW_SLOT * (target_kw_sum + 1.0), g);
    }
    // With `target_first`, the unbacked slots' shortfall of their allowance is a fraction of its own, dearer than
    // the later slots' and cheaper than the target's: with the target met, what allowance the cap leaves goes to
    // the first minutes, which no top-up reaches in time.
    let unbacked_fraction = (even_shortfall && target_first).then(|| vars.add(variable().min(0.0).max(1.0)));
    if let Some(h) = unbacked_fraction {
        let required_kw_sum: f64 = required_kw.iter().sum();
        objective.add_mul(UNBACKED_PENALTY_FACTOR * SHORTFALL_PENALTY_PER_KW_SLOT * (required_kw_sum + 1.0), h);
    }
    // With `peak_slot_cap`, the cap is a share of the reduction this plan delivers at its peak: `peak` is at most
    // the plan's expected net reduction in the first slot with the peak target and at most that target, and the
    // cap (with its allowance) scales by peak / peak target, which keeps it linear and planning nothing (peak 0,
    // no rebound) feasible. A plan that falls short keeps its rebound in proportion, and the LP may meet the peak
    // minute more fully than the rest, which is the reduction the rule is a share of. The expectation, not less
    // its allowance: the delivery allowance already plans above it, and the rebound's allowance is what keeps
    // the rule when appliances scatter.
    let peak =
        peak_slot.filter(|_| peak_target_w > 0.0).map(|_| vars.add(variable().min(0.0).max(peak_target_w / 1e3)));
    let n_variables = starts.len()
        + shortfall.len()
        + below_target.len()
        + usize::from(even_shortfall)
        + usize::from(below_fraction.is_some())
        + usize::from(unbacked_fraction.is_some())
        + usize::from(peak.is_some());
    let mut problem = vars.minimise(objective).using(solver);
    if let Some(f) = short_fraction {
        for (t, &sf) in shortfall.iter().enumerate() {
            problem.add_constraint((sf - f * required_kw[t]).leq(0.0));
        }
    }
    if let Some(h) = unbacked_fraction {
        for (t, &sf) in shortfall.iter().enumerate().take(UNBACKED_SLOTS) {
            problem.add_constraint((sf - h * required_kw[t]).leq(0.0));
        }
    }
    if let Some(peak) = peak {
        problem.add_constraint((peak_expected - peak).geq(0.0));
    }
    for ((mut expr, &b), w) in bare.into_iter().zip(&below_target).zip(&req.target_w) {
        let target_kw = w / 1e3;
        if let Some(g) = below_fraction {
            problem.add_constraint((b - g * target_kw).leq(0.0));
        }
        expr.add_mul(1.0, b);
        problem.add_constraint(expr.geq(target_kw));
    }
    for (t, mut expr) in net.into_iter().enumerate() {
        if !is_row(t as u32) {
            continue;
        }
        if t < n_slots as usize {
            expr.add_mul(1.0, shortfall[t]);
            problem.add_constraint(expr.geq(required_kw[t]));
        } else {
            // After the window, load may rise above baseline by at most the rebound cap.
            if let Some(peak) = peak {
                expr.add_mul(-bound_kw[t] / (peak_target_w / 1e3), peak);
                problem.add_constraint(expr.geq(0.0));
            } else {
                problem.add_constraint(expr.geq(bound_kw[t]));
            }
        }
    }
    for (j, expr) in capacity.into_iter().enumerate() {
        problem.add_constraint(expr.leq(f64::from(columns[j].n_appliances)));
    }
    let solution = problem.solve().map_err(|e| PlanError::Solver(e.to_string()))?;
    let values = start_vars.iter().map(|&v| solution.value(v)).collect();
    let unbacked_short = shortfall
        .iter()
        .zip(required_kw)
        .take(UNBACKED_SLOTS)
        .map(|(&sf, r)| solution.value(sf) / r.max(1e-3))
        .fold(0.0, f64::max);
    Ok(LpResult { starts, values, n_variables, unbacked_short })
}

fn validate(req: &PlanRequest) -> Result<(), PlanError> {
    if req.target_w.is_empty() || req.target_w.len() > halftime_core::validate::N_SLOTS_MAX {
        return Err(PlanError::Invalid("target must have 1..=240 slots"));
    }
    if req.target_w.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(PlanError::Invalid("target must be finite and >= 0"));
    }
    if req.cohorts.len() > N_COHORTS_MAX {
        return Err(PlanError::Invalid("too many cohorts"));
    }
    if !(0.0..=1.0).contains(&req.rebound_margin_share) {
        return Err(PlanError::Invalid("rebound margin share must be in 0..=1"));
    }
    if !(0.0..=10.0).contains(&req.rebound_sigmas) {
        return Err(PlanError::Invalid("rebound sigmas must be in 0..=10"));
    }
    if !(0.0..=10.0).contains(&req.delivery_sigmas) {
        return Err(PlanError::Invalid("delivery sigmas must be in 0..=10"));
    }
    if !(0.0..=1.0).contains(&req.rebound_fraction_max) {
        return Err(PlanError::Invalid("rebound fraction must be in 0..=1"));
    }
    if req.rebound_reference_w.is_some_and(|w| !w.is_finite() || w < 0.0) {
        return Err(PlanError::Invalid("rebound reference must be finite and >= 0"));
    }
    if !req.prior_rebound_w.is_empty() && req.rebound_reference_w.is_none() {
        return Err(PlanError::Invalid("a prior rebound needs a rebound reference"));
    }
    if req.prior_rebound_w.len() > PRIOR_REBOUND_SLOTS_MAX
        || req.prior_rebound_w.iter().any(|w| !w.is_finite() || *w < 0.0)
    {
        return Err(PlanError::Invalid("prior rebound must be finite, >= 0 and at most a day of slots"));
    }
    if req.prior_rebound_var_kw2.len() > req.prior_rebound_w.len()
        || req.prior_rebound_var_kw2.iter().any(|v| !v.is_finite() || *v < 0.0)
    {
        return Err(PlanError::Invalid(
            "prior rebound variance must be finite, >= 0 and no longer than the prior rebound",
        ));
    }
    if req.cohorts.iter().any(|c| !c.reduction_w_sum.is_finite() || !c.reduction_w_net_sum.is_finite()) {
        return Err(PlanError::Invalid("cohort reductions must be finite"));
    }
    Ok(())
}

/// Rounds each LP start count up to whole appliances (within the column's capacity; a column given under half
/// an appliance in all is dropped), then splits it over the column's cohorts in proportion to their remaining
/// sizes (largest remainder).
fn round_and_split(
    req: &PlanRequest,
    columns: &[Column],
    starts: &[(usize, u32, u32)],
    values: &[f64],
) -> Vec<Allocation> {
    let mut left_in_column: Vec<u32> = columns.iter().map(|c| c.n_appliances).collect();
    let mut column_total = vec![0.0; columns.len()];
    let mut class_total = [0.0; N_CLASSES];
    let mut class_n = [0.0; N_CLASSES];
    for (&(j, _, _), &x) in starts.iter().zip(values) {
        column_total[j] += x;
        class_total[columns[j].key.class.index()] += x;
    }
    for col in columns {
        class_n[col.key.class.index()] += f64::from(col.n_appliances);
    }
    let class_used = |c: usize| class_total[c] >= CLASS_SLIVER_MAX.min(CLASS_SLIVER_SHARE_MAX * class_n[c]);
    let mut left_in_cohort: Vec<u32> = req.cohorts.iter().map(|c| c.n_appliances).collect();
    let mut out = Vec::new();
    for (&(j, s, d), &x) in starts.iter().zip(values) {
        // Rounding up keeps the target met (a hair of solver noise is not an appliance). A column the LP gives
        // less than half an appliance in all is dropped: the simplex leaves such slivers on classes it barely
        // uses (0.4 of a dishwasher), and rounded up they became real deferrals, so over a season a handful of
        // households of a rarely used class carried all of its burden. The delivery allowance covers it. So is
        // a class given less than one and a half appliances in all where it has hundreds eligible: rounded up,
        // it was one household deferred once in a season among thousands enrolled alike (a tumble dryer: Jain
        // 0.0008 among 1,190). Among a few dozen, one at a time is a fair turn.
        let used = column_total[j] >= SLIVER_MAX && class_used(columns[j].key.class.index());
        let want = if x > 0.05 && used { (x - 0.05).ceil() as u32 } else { 0 };
        let n = want.min(left_in_column[j]);
        if n == 0 {
            continue;
        }
        left_in_column[j] -= n;
        let cohorts = &columns[j].cohorts;
        let total_left: u32 = cohorts.iter().map(|&i| left_in_cohort[i]).sum();
        debug_assert!(total_left >= n);
        let mut shares: Vec<(usize, u32, f64)> = cohorts
            .iter()
            .map(|&i| {
                let exact = f64::from(n) * f64::from(left_in_cohort[i]) / f64::from(total_left.max(1));
                (i, exact.floor() as u32, exact - exact.floor())
            })
            .collect();
        let mut given: u32 = shares.iter().map(|s| s.1).sum();
        shares.sort_by(|a, b| b.2.total_cmp(&a.2));
        for share in shares.iter_mut() {
            if given >= n {
                break;
            }
            if share.1 < left_in_cohort[share.0] {
                share.1 += 1;
                given += 1;
            }
        }
        for (i, k, _) in shares {
            let k = k.min(left_in_cohort[i]);
            if k > 0 {
                left_in_cohort[i] -= k;
                out.push(Allocation { cohort: i, start_slot: s, deferral_min: d, n: k });
            }
        }
    }
    out
}

/// The expected effect of allocations: used for the plan, and again after picking with the counts actually
/// reserved, so that what the operator is told matches what was dispatched.
pub fn evaluate(req: &PlanRequest, allocations: &[Allocation]) -> Evaluation {
    let n_slots = req.target_w.len();
    // Net load change below baseline per slot, W, from slot 0 until the last payback ends.
    let mut net_w: Vec<f64> = vec![0.0; n_slots];
    let mut responses = Responses::new(req.randomize_start_s);
    for a in allocations {
        add_response(&mut net_w, req, a, &mut responses);
    }
    let expected_w: Vec<f64> = net_w[..n_slots].to_vec();
    let shortfall_w = req.target_w.iter().zip(&expected_w).map(|(t, e)| (t - e).max(0.0)).collect();
    let rebound_w = net_w.iter().map(|n| (-n).max(0.0)).collect();
    Evaluation { expected_w, shortfall_w, rebound_w }
}

/// Adds an allocation's expected shed and payback (with expected overrides) to the net load change per slot, W,
/// growing it to cover the payback.
fn add_response(net_w: &mut Vec<f64>, req: &PlanRequest, a: &Allocation, responses: &mut Responses) {
    let c = &req.cohorts[a.cohort];
    if c.n_appliances == 0 {
        return;
    }
    let per_w = c.reduction_w_sum / f64::from(c.n_appliances);
    let n = f64::from(a.n);
    let s = a.start_slot as usize;
    let d = a.deferral_min as usize;
    let response = responses.get(c.key.class, a.deferral_min, override_rate(c));
    let end = (s + response.shed.len()).max(s + d + response.payback.len());
    if net_w.len() < end {
        net_w.resize(end, 0.0);
    }
    for (slot, shed) in net_w[s..].iter_mut().zip(&response.shed) {
        *slot += n * per_w * shed;
    }
    for (slot, payback) in net_w[s + d..].iter_mut().zip(&response.payback) {
        *slot -= n * per_w * payback;
    }
}

/// The reference the LP is measured against: largest appliances first, no LP. In each slot, while the target
/// is not met by what is already deferred, the largest appliances left start a deferral as long as their
/// budget and the event allow. It ignores rebound, burden and comfort; [`evaluate`] shows what that costs.
pub fn greedy(req: &PlanRequest) -> Result<Vec<Allocation>, PlanError> {
    validate(req)?;
    let n_slots = req.target_w.len();
    let per_w = |c: &Cohort| c.reduction_w_sum / f64::from(c.n_appliances.max(1));
    let mut order: Vec<usize> = (0..req.cohorts.len()).filter(|&i| req.cohorts[i].n_appliances > 0).collect();
    order.sort_by(|&a, &b| per_w(&req.cohorts[b]).total_cmp(&per_w(&req.cohorts[a])).then(a.cmp(&b)));
    let mut left: Vec<u32> = req.cohorts.iter().map(|c| c.n_appliances).collect();
    let mut net_w: Vec<f64> = vec![0.0; n_slots];
    let mut responses = Responses::new(req.randomize_start_s);
    let mut out = Vec::new();
    let mut next = 0;
    for t in 0..n_slots {
        // Each pass either meets the slot or empties a cohort, so this ends within the number of cohorts.
        while next < order.len() {
            let need_w = req.target_w[t] - net_w[t];
            if need_w <= 0.0 {
                break;
            }
            let i = order[next];
            let c = &req.cohorts[i];
            let deferral_min = c.deferral_min_cap().min(req.deferral_min_max).min((n_slots - t) as u32).max(1);
            let first_w = per_w(c)
                * responses.get(c.key.class, deferral_min, override_rate(c)).shed.first().copied().unwrap_or(0.0);
            let n = if first_w > 0.0 { (need_w / first_w).ceil().min(f64::from(left[i])) as u32 } else { 0 };
            if n == 0 {
                next += 1;
                continue;
            }
            left[i] -= n;
            if left[i] == 0 {
                next += 1;
            }
            let a = Allocation { cohort: i, start_slot: t as u32, deferral_min, n };
            add_response(&mut net_w, req, &a, &mut responses);
            out.push(a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
