//! Plan, pick and reserve, sign: the CPU-bound part of a dispatch. Runs on a blocking thread, never on the
//! async executor.

use crate::{EngineError, Inner};
use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use halftime_core::appliance::N_CLASSES;
use halftime_core::physics::observed_override_rate;
use halftime_core::time::MS_PER_MIN;
use halftime_core::{
    Appliance, ApplianceId, CommandKind, DeferralCommand, EventId, HouseholdId, RegionId, Reservation, SignedCommand,
};
use halftime_ledger::Standing;
use halftime_planner::{Allocation, Cohort, CohortKey, Evaluation, N_BURDEN_BANDS, PlanRequest, budget_band};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What one dispatch produced, before it is made durable.
pub struct Picked {
    pub reservations: Vec<Reservation>,
    pub commands: Vec<SignedCommand>,
    pub evaluation: Evaluation,
    pub n_cohorts: u32,
    pub lp_solve_us: u64,
    pub plan_us: u64,
    /// When the plan was solved and its appliances picked and reserved (before signing).
    pub picked_at: Instant,
    /// Highest counter used.
    pub counter_hwm: u64,
    /// Per class, how much more often its households override than they declared (what the plan counted on).
    pub override_factor: [f64; N_CLASSES],
}

pub struct DispatchInput<'a> {
    pub event: EventId,
    pub regions: &'a [RegionId],
    pub start_unix_ms: i64,
    pub target_w: &'a [f64],
    pub deferral_min_max: u32,
    pub now_unix_ms: i64,
    /// Appliances that already have a deferral in this event (an update adds others, never these).
    pub already_deferred: &'a HashSet<ApplianceId>,
    /// The peak reduction the rebound cap is a fraction of, W: what the event's plan already promises at its
    /// peak, for a residual; `None` for the event's first plan (its own delivered peak).
    pub rebound_reference_w: Option<f64>,
    /// Rebound the event's earlier dispatches are expected to cause, W per slot from `start_unix_ms` on (at most
    /// `PRIOR_REBOUND_SLOTS_MAX` slots).
    pub prior_rebound_w: &'a [f64],
    /// Its variance per slot, kW², where known (the rebound guard's projection); shorter or empty elsewhere.
    pub prior_rebound_var_kw2: &'a [f64],
    /// Only appliances of these classes, if given (a top-up draws on the classes the event relies on).
    pub classes: Option<[bool; N_CLASSES]>,
}

struct Member {
    burden_kw_min: f64,
    last_deferred_unix_ms: i64,
    appliance: Appliance,
}

/// Builds cohorts from the registry and the ledger, solves the LP, reserves concrete appliances least-burdened
/// first, and signs their commands.
pub fn plan_pick_sign(inner: &Inner, input: &DispatchInput<'_>) -> Result<Picked, EngineError> {
    let t0 = Instant::now();
    let mut standing: HashMap<HouseholdId, Option<Standing>> = HashMap::new();
    let mut eligible: Vec<(Appliance, u8, Standing)> = Vec::new();
    inner.registry.for_each_in(input.regions, |a| {
        if input.already_deferred.contains(&a.id) || input.classes.is_some_and(|c| !c[a.class.index()]) {
            return;
        }
        let s = *standing
            .entry(a.household)
            .or_insert_with(|| inner.ledger.standing(a.household, input.event, input.start_unix_ms, input.now_unix_ms));
        let Some(s) = s else { return };
        let budget_min = s.budget_min.min(u32::from(a.deferral_min_max)).min(input.deferral_min_max);
        if let Some(band) = budget_band(budget_min) {
            eligible.push((*a, band, s));
        }
    });
    let cuts = burden_cuts(standing.values().flatten().map(|s| s.burden_kw_min).collect());
    let override_factor = override_factor_by_class(&eligible);
    let mut index: HashMap<CohortKey, usize> = HashMap::new();
    let mut cohorts: Vec<Cohort> = Vec::new();
    let mut members: Vec<Vec<Member>> = Vec::new();
    for (a, budget_band, standing) in eligible {
        let burden = standing.burden_kw_min;
        let burden_band = cuts.iter().filter(|&&c| burden > c).count() as u8;
        let key = CohortKey { region: a.region, class: a.class, budget_band, burden_band };
        let i = *index.entry(key).or_insert_with(|| {
            cohorts.push(Cohort { key, n_appliances: 0, reduction_w_sum: 0.0, reduction_w_net_sum: 0.0 });
            members.push(Vec::new());
            cohorts.len() - 1
        });
        let r = a.expected_reduction_w();
        let c = &mut cohorts[i];
        c.n_appliances += 1;
        c.reduction_w_sum += r;
        c.reduction_w_net_sum += r * (1.0 - (a.override_rate() * override_factor[a.class.index()]).min(1.0));
        members[i].push(Member {
            burden_kw_min: burden,
            last_deferred_unix_ms: standing.last_deferred_unix_ms,
            appliance: a,
        });
    }
    for m in &mut members {
        m.sort_by(|a, b| {
            a.burden_kw_min
                .total_cmp(&b.burden_kw_min)
                .then(a.last_deferred_unix_ms.cmp(&b.last_deferred_unix_ms))
                .then(a.appliance.id.cmp(&b.appliance.id))
        });
    }
    let req = PlanRequest {
        target_w: input.target_w.to_vec(),
        cohorts,
        rebound_fraction_max: inner.config.rebound_fraction_max,
        rebound_reference_w: input.rebound_reference_w,
        prior_rebound_w: input.prior_rebound_w.to_vec(),
        prior_rebound_var_kw2: input.prior_rebound_var_kw2.to_vec(),
        rebound_sigmas: inner.config.rebound_sigmas,
        rebound_margin_share: inner.config.rebound_margin_share(),
        delivery_sigmas: inner.config.delivery_sigmas,
        deferral_min_max: input.deferral_min_max,
        randomize_start_s: inner.config.randomize_start_s,
    };
    let plan = halftime_planner::plan(&req).map_err(|e| EngineError::Internal(e.to_string()))?;

    // Pick and reserve: least burdened first within each cohort, each appliance at most once per dispatch.
    let mut cursor = vec![0usize; members.len()];
    let mut reserved: Vec<Allocation> = Vec::with_capacity(plan.allocations.len());
    let mut reservations: Vec<Reservation> = Vec::new();
    let randomize_ms = i64::from(inner.config.randomize_start_s) * 1000;
    for alloc in &plan.allocations {
        let not_before = not_before_unix_ms(input.start_unix_ms, alloc.start_slot, input.now_unix_ms, randomize_ms);
        let deferral_s = alloc.deferral_min * 60;
        let list = &members[alloc.cohort];
        let mut got = 0u32;
        while got < alloc.n && cursor[alloc.cohort] < list.len() {
            let m = &list[cursor[alloc.cohort]];
            cursor[alloc.cohort] += 1;
            let r = Reservation {
                household: m.appliance.household,
                appliance: m.appliance.id,
                class: m.appliance.class,
                event: input.event,
                not_before_unix_ms: not_before,
                not_after_unix_ms: not_before + randomize_ms + i64::from(deferral_s) * 1000,
                deferral_s,
                reduction_kw: (m.appliance.expected_reduction_w() / 1e3) as f32,
            };
            if inner.ledger.try_reserve(r, u32::from(m.appliance.deferral_min_max), input.now_unix_ms).is_ok() {
                reservations.push(r);
                got += 1;
            }
        }
        if got > 0 {
            reserved.push(Allocation { n: got, ..*alloc });
        }
    }
    let unreserve = |r: &Reservation| inner.ledger.unreserve(r.household, r.event, r.appliance);
    drop_lone_appliances(&req, &mut reserved, &mut reservations, unreserve);
    let evaluation = halftime_planner::evaluate(&req, &reserved);
    let picked_at = Instant::now();

    // Counters: strictly increasing per device because they come from one engine-wide sequence.
    let n = reservations.len() as u64;
    let first = inner.next_counter.fetch_add(n, Ordering::SeqCst);
    let commands = sign_all(&inner.signer, &reservations, first, inner.config.randomize_start_s);
    Ok(Picked {
        reservations,
        commands,
        evaluation,
        n_cohorts: req.cohorts.len() as u32,
        lp_solve_us: plan.lp_solve_us,
        plan_us: u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
        picked_at,
        counter_hwm: first + n,
        override_factor,
    })
}

/// When the deferrals starting in slot `start_slot` of a dispatch whose slot 0 opens at `slot0_unix_ms` may
/// start, dispatched at `now_unix_ms`: at their slot, each device a random offset of up to `randomize_ms`
/// after it; except in slot 0 where there is time for the offset before it (an event announced ahead, a top-up
/// weighed early in the slot before), where they go out that much ahead, so that every device is off when the
/// slot opens and has said what it sheds.
///
/// No later dispatch reaches a dispatch's first slot, and the plan counts on a quarter of its devices' first
/// minute landing in the next: there the lead is a margin, at no extra appliance. In the season, planned with the
/// same allowance as the rest, the first minutes delivered 126 % of target on average but scattered by 16 % (a
/// few hundred EV chargers, a sixth of which charge), and one or two evenings a run fell under 95 %; twice the
/// allowance there instead took a fifth more chargers, whose payback put 4 and 3 evenings a run over the
/// rebound cap. An event whose first slot led is weighed five seconds into each slot, not thirty-five, so that
/// its top-ups go out in time to lead theirs (`RuntimeState::first_slot_led`). Only the first slot: with every
/// slot of a plan led, its deferrals ended half a minute before the plan counted on, and the plateau's last
/// minutes, where the ramp's short deferrals end, fell under 95 % on a third of the evenings.
fn not_before_unix_ms(slot0_unix_ms: i64, start_slot: u32, now_unix_ms: i64, randomize_ms: i64) -> i64 {
    let at = slot0_unix_ms + i64::from(start_slot) * MS_PER_MIN;
    if start_slot == 0 && now_unix_ms <= at - randomize_ms { at - randomize_ms } else { at }
}

/// Gives back the reservation of a class that ended up with a single appliance where it has hundreds eligible:
/// the planner drops classes it gives less than one and a half, but picking can still leave one when the
/// households of the others refuse (their limits). Over a season that was one tumble dryer deferred once among
/// 1,190 dryer-only households, all of their group's burden on one of them (Jain 0.0008). The delivery
/// allowance covers one appliance.
fn drop_lone_appliances(
    req: &PlanRequest,
    reserved: &mut Vec<Allocation>,
    reservations: &mut Vec<Reservation>,
    mut unreserve: impl FnMut(&Reservation),
) {
    let eligible = halftime_planner::eligible_by_class(&req.cohorts);
    let mut picked = [0u32; N_CLASSES];
    for r in reservations.iter() {
        picked[r.class.index()] += 1;
    }
    let lone = |class: halftime_core::ApplianceClass| {
        let i = class.index();
        picked[i] == 1 && eligible[i] > halftime_planner::CLASS_ELIGIBLE_MANY
    };
    reservations.retain(|r| {
        if lone(r.class) {
            unreserve(r);
        }
        !lone(r.class)
    });
    reserved.retain(|a| !lone(req.cohorts[a.cohort].key.class));
}

/// Prior weight of the rates households declared, per class, in 20-minute deferrals: enough to steady a thin
/// record, little against a season's.
const OVERRIDE_PRIOR_EXPOSURE: f64 = 50.0;

/// Per class, how much more (or less) often the eligible households overrode than they declared, from the
/// ledger's record. Pooled per class, never per household or burden band: a rate that differed between the
/// bands of a class would make the LP choose by it over burden (tried per household: season fairness fell from
/// 0.997 to 0.884).
pub(crate) fn override_factor_by_class(eligible: &[(Appliance, u8, Standing)]) -> [f64; N_CLASSES] {
    // Overrides, exposure, declared rates summed, appliances.
    let mut pooled = [(0u64, 0.0f64, 0.0f64, 0u64); N_CLASSES];
    for (a, _, s) in eligible {
        let p = &mut pooled[a.class.index()];
        p.0 += u64::from(s.n_overridden);
        p.1 += s.override_exposure;
        p.2 += a.override_rate();
        p.3 += 1;
    }
    pooled.map(|(n_overridden, exposure, declared_sum, n)| {
        let declared = declared_sum / (n.max(1) as f64);
        let observed = observed_override_rate(declared, n_overridden, exposure, OVERRIDE_PRIOR_EXPOSURE);
        if declared <= 0.0 { 1.0 } else { observed / declared }
    })
}

/// Burden cut points between the three bands: terciles of the burden of eligible households that carry any.
/// Households with no burden are always in band 0.
fn burden_cuts(mut burdens: Vec<f64>) -> [f64; 2] {
    const _: () = assert!(N_BURDEN_BANDS == 3);
    burdens.retain(|b| *b > 0.0);
    if burdens.is_empty() {
        return [f64::INFINITY; 2];
    }
    burdens.sort_by(f64::total_cmp);
    let n = burdens.len();
    [burdens[n / 3], burdens[(2 * n) / 3]]
}

/// Below this many commands, signing on one thread is quicker than starting others.
const SIGN_PARALLEL_MIN: usize = 2_048;

/// Signs one command per reservation, counters `first..`, spread over the machine's cores.
fn sign_all(
    signer: &halftime_signer::Signer,
    reservations: &[Reservation],
    first: u64,
    randomize_start_s: u32,
) -> Vec<SignedCommand> {
    let sign = |i: usize, r: &Reservation| {
        signer.sign(DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 0,
            device: r.appliance,
            event: r.event,
            counter: first + i as u64,
            not_before_unix_ms: r.not_before_unix_ms,
            not_after_unix_ms: r.not_after_unix_ms,
            deferral_s: r.deferral_s,
            randomize_start_s,
        })
    };
    let n_threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    if reservations.len() < SIGN_PARALLEL_MIN || n_threads == 1 {
        return reservations.iter().enumerate().map(|(i, r)| sign(i, r)).collect();
    }
    let chunk = reservations.len().div_ceil(n_threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = reservations
            .chunks(chunk)
            .enumerate()
            .map(|(k, part)| {
                scope.spawn(move || part.iter().enumerate().map(|(i, r)| sign(k * chunk + i, r)).collect::<Vec<_>>())
            })
            .collect();
        parts.into_iter().flat_map(|p| p.join().expect("signing thread panicked")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::{ApplianceClass, ApplianceId, EventId, RegionId};

    #[test]
    fn a_dispatchs_first_slot_starts_ahead_of_it_when_there_is_time() {
        const START: i64 = 1_000 * MS_PER_MIN;
        let at = |slot, now| not_before_unix_ms(START, slot, now, 30_000);
        // Announced ahead: the first slot's devices go out half a minute early, the later slots' at their slot.
        assert_eq!(at(0, START - 30 * MS_PER_MIN), START - 30_000);
        assert_eq!(at(0, START - 30_000), START - 30_000);
        assert_eq!(at(3, START - 30 * MS_PER_MIN), START + 3 * MS_PER_MIN);
        // With less than the offset to go (a trip, a top-up weighed late in the slot before): at the slot, never
        // in the past.
        assert_eq!(at(0, START - 29_999), START);
        assert_eq!(at(0, START), START);
        // No random start, no lead.
        assert_eq!(not_before_unix_ms(START, 0, START - MS_PER_MIN, 0), START);
    }

    #[test]
    fn a_class_picked_once_among_hundreds_is_given_back() {
        let cohort = |class, n_appliances| Cohort {
            key: CohortKey { region: RegionId(0), class, budget_band: 0, burden_band: 0 },
            n_appliances,
            reduction_w_sum: 0.0,
            reduction_w_net_sum: 0.0,
        };
        let req = PlanRequest {
            target_w: vec![1.0],
            cohorts: vec![
                cohort(ApplianceClass::TumbleDryer, 1_190),
                cohort(ApplianceClass::Fridge, 5_000),
                cohort(ApplianceClass::HeatPump, 40),
            ],
            rebound_fraction_max: 0.1,
            rebound_reference_w: None,
            prior_rebound_w: vec![],
            prior_rebound_var_kw2: vec![],
            rebound_sigmas: 2.0,
            rebound_margin_share: 0.0,
            delivery_sigmas: 1.5,
            deferral_min_max: 30,
            randomize_start_s: 30,
        };
        let reservation = |i: u64, class| Reservation {
            household: HouseholdId(i),
            appliance: ApplianceId(i),
            class,
            event: EventId(1),
            not_before_unix_ms: 0,
            not_after_unix_ms: 1,
            deferral_s: 60,
            reduction_kw: 1.0,
        };
        let mut reservations = vec![
            reservation(1, ApplianceClass::TumbleDryer),
            reservation(2, ApplianceClass::Fridge),
            reservation(3, ApplianceClass::Fridge),
            reservation(4, ApplianceClass::HeatPump),
        ];
        let allocation = |cohort, n| Allocation { cohort, start_slot: 0, deferral_min: 1, n };
        let mut reserved = vec![allocation(0, 1), allocation(1, 2), allocation(2, 1)];
        let mut given_back = Vec::new();
        drop_lone_appliances(&req, &mut reserved, &mut reservations, |r| given_back.push(r.appliance));
        // The dryer goes; a heat pump among forty is a fair turn, and two fridges are two.
        assert_eq!(given_back, vec![ApplianceId(1)]);
        assert_eq!(reservations.iter().map(|r| r.appliance.0).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(reserved.iter().map(|a| (a.cohort, a.n)).collect::<Vec<_>>(), vec![(1, 2), (2, 1)]);
    }
}
