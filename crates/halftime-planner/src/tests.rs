use super::*;
use halftime_core::RegionId;
use proptest::prelude::*;

fn cohort(region: u16, class: ApplianceClass, budget_band: u8, burden_band: u8, n: u32) -> Cohort {
    let p = class.profile();
    let per_w = f64::from(p.power_w_typical) * f64::from(p.duty_cycle_permille) / 1000.0;
    let net = per_w * (1.0 - f64::from(p.override_rate_permille) / 1000.0);
    Cohort {
        key: CohortKey { region: RegionId(region), class, budget_band, burden_band },
        n_appliances: n,
        reduction_w_sum: per_w * f64::from(n),
        reduction_w_net_sum: net * f64::from(n),
    }
}

fn request(target_kw: &[f64], cohorts: Vec<Cohort>) -> PlanRequest {
    PlanRequest {
        target_w: target_kw.iter().map(|k| k * 1e3).collect(),
        cohorts,
        rebound_fraction_max: 0.1,
        rebound_reference_w: None,
        prior_rebound_w: Vec::new(),
        prior_rebound_var_kw2: Vec::new(),
        rebound_sigmas: 0.0,
        rebound_margin_share: 0.0,
        delivery_sigmas: 0.0,
        deferral_min_max: 30,
        randomize_start_s: 0,
    }
}

fn assert_within_cohorts(req: &PlanRequest, plan: &Plan) {
    let mut used = vec![0u32; req.cohorts.len()];
    for a in &plan.allocations {
        used[a.cohort] += a.n;
        assert!(a.deferral_min <= req.cohorts[a.cohort].deferral_min_cap(), "{a:?} over its budget band");
        assert!(a.deferral_min <= req.deferral_min_max);
    }
    for (i, c) in req.cohorts.iter().enumerate() {
        assert!(used[i] <= c.n_appliances, "cohort {i} over-allocated: {} > {}", used[i], c.n_appliances);
    }
}

#[test]
fn meets_a_target_the_population_can_supply_with_rebound_capped() {
    let mut cohorts = Vec::new();
    for region in 0..3 {
        for class in
            [ApplianceClass::Fridge, ApplianceClass::Freezer, ApplianceClass::WaterHeater, ApplianceClass::EvCharger]
        {
            for burden_band in 0..3 {
                cohorts.push(cohort(region, class, 6, burden_band, 2_000));
            }
        }
    }
    let target_kw = [200.0, 400.0, 600.0, 600.0, 600.0, 600.0, 500.0, 300.0, 200.0, 100.0];
    let req = request(&target_kw, cohorts);
    let plan = plan(&req).unwrap();
    assert_within_cohorts(&req, &plan);
    for (t, (&target, &expected)) in req.target_w.iter().zip(&plan.evaluation.expected_w).enumerate() {
        assert!(expected >= target * 0.999, "slot {t}: expected {expected} < target {target}");
    }
    assert!(plan.evaluation.shortfall_w.iter().all(|&s| s < 1.0), "{:?}", plan.evaluation.shortfall_w);
    let cap = 0.1 * 600e3;
    for (t, &r) in plan.evaluation.rebound_w.iter().enumerate() {
        // Rounding up to whole appliances may add a little.
        assert!(r <= cap * 1.05 + 5e3, "slot {t}: rebound {r} W above cap {cap} W");
    }
}

#[test]
fn reports_shortfall_honestly_when_supply_is_short() {
    let req = request(&[1_000.0; 5], vec![cohort(0, ApplianceClass::Fridge, 4, 0, 100)]);
    let plan = plan(&req).unwrap();
    assert_within_cohorts(&req, &plan);
    for t in 0..5 {
        let e = &plan.evaluation;
        assert!(e.shortfall_w[t] > 900e3, "slot {t}: shortfall {}", e.shortfall_w[t]);
        assert!((e.shortfall_w[t] - (req.target_w[t] - e.expected_w[t])).abs() < 1e-6);
    }
}

#[test]
fn least_burdened_go_first() {
    let cohorts = vec![
        cohort(0, ApplianceClass::Freezer, 5, 2, 5_000),
        cohort(0, ApplianceClass::Freezer, 5, 0, 5_000),
        cohort(1, ApplianceClass::Freezer, 5, 1, 5_000),
    ];
    let req = PlanRequest { rebound_fraction_max: 1.0, ..request(&[20.0; 5], cohorts) };
    let plan = plan(&req).unwrap();
    let used = |i: usize| plan.allocations.iter().filter(|a| a.cohort == i).map(|a| a.n).sum::<u32>();
    assert!(used(1) > 0);
    assert_eq!(used(0), 0, "most burdened used while the least burdened had room");
    assert_eq!(used(2), 0);
}

/// Within a class, burden decides who goes first even where the rebound cap binds and the least burdened
/// happen to own slightly larger appliances (their scatter allowance is a little larger per kW).
#[test]
fn least_burdened_go_first_even_when_their_appliances_are_a_little_larger() {
    let sized = |burden_band: u8, n: u32, power_w: f64| {
        let c = cohort(0, ApplianceClass::Fridge, 4, burden_band, n);
        let scale = power_w / f64::from(ApplianceClass::Fridge.profile().power_w_typical);
        Cohort { reduction_w_sum: c.reduction_w_sum * scale, reduction_w_net_sum: c.reduction_w_net_sum * scale, ..c }
    };
    let cohorts = vec![sized(1, 8_000, 130.0), sized(0, 6_000, 139.0), sized(2, 2_000, 130.0)];
    let target_kw = [20.0, 40.0, 60.0, 80.0, 80.0, 80.0, 80.0, 80.0, 80.0, 80.0, 70.0, 60.0, 50.0, 30.0, 20.0];
    // A cap fixed at the peak target: fridges alone cannot hold this plateau's rebound to 10 % of what they
    // deliver, so with the cap on the delivered peak they would get no plan at all.
    let req = PlanRequest {
        rebound_sigmas: 2.0,
        delivery_sigmas: 1.5,
        rebound_reference_w: Some(80e3),
        ..request(&target_kw, cohorts)
    };
    let plan = plan(&req).unwrap();
    assert_within_cohorts(&req, &plan);
    let used = |i: usize| plan.allocations.iter().filter(|a| a.cohort == i).map(|a| a.n).sum::<u32>();
    assert!(plan.evaluation.shortfall_w.iter().sum::<f64>() > 0.0, "the rebound cap must bind for this test");
    assert!(used(1) > 0, "{:?}", plan.allocations);
    assert!(used(1) == 6_000 || used(0) == 0, "band 1 used ({}) while band 0 had room ({} of 6000)", used(0), used(1));
    assert_eq!(used(2), 0);
}

/// The rebound margin is a floor on the allowance below the cap, not an addition to it: with no allowance for
/// scatter the plan's rebound stops at the margin's line, and where the allowance is larger than the margin (a
/// fleet of a few thousand, whose scatter is a good share of its cap) the plan is the same with or without it.
#[test]
fn the_rebound_margin_is_a_floor_under_the_allowance() {
    let cohorts = vec![cohort(0, ApplianceClass::Fridge, 4, 0, 16_000)];
    let target_kw = [80.0; 15];
    let base = PlanRequest { rebound_reference_w: Some(80e3), ..request(&target_kw, cohorts) };
    let peak_rebound_w = |req: &PlanRequest| {
        let plan = plan(req).unwrap();
        let peak_w = plan.evaluation.rebound_w.iter().skip(target_kw.len()).copied().fold(0.0, f64::max);
        (plan, peak_w)
    };
    let cap_w = 0.1 * 80e3;
    let (_, whole_w) = peak_rebound_w(&base);
    assert!(whole_w >= 0.95 * cap_w, "{whole_w} W: the cap does not bind under {cap_w} W");
    // Each plan's evaluation runs a few percent over the line its LP kept to, so the two are compared.
    let (_, held_w) = peak_rebound_w(&PlanRequest { rebound_margin_share: 0.2, ..base.clone() });
    let ratio = held_w / whole_w;
    assert!((0.76..=0.84).contains(&ratio), "with a 20 % margin the rebound is {ratio} of the whole cap's");
    let sigmas = PlanRequest { rebound_sigmas: 2.0, ..base };
    let (without, _) = peak_rebound_w(&sigmas);
    let (with, _) = peak_rebound_w(&PlanRequest { rebound_margin_share: 0.05, ..sigmas });
    assert_eq!(with.allocations, without.allocations, "a margin inside the allowance changed the plan");
}

#[test]
fn empty_supply_is_all_shortfall() {
    let req = request(&[5.0, 5.0], Vec::new());
    let plan = plan(&req).unwrap();
    assert!(plan.allocations.is_empty());
    assert_eq!(plan.evaluation.shortfall_w, vec![5e3, 5e3]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn plans_stay_within_cohorts_and_report_what_they_miss(
        target in proptest::collection::vec(0.0f64..300.0, 1..12),
        sizes in proptest::collection::vec((0u16..3, 0usize..8, 0u8..9, 0u8..3, 0u32..3000), 0..10),
        rebound in 0.05f64..1.0,
        deferral in 5u32..60,
    ) {
        prop_assume!(target.iter().any(|&t| t > 0.0));
        let cohorts = sizes.iter().map(|&(r, c, bb, burden, n)| cohort(r, ApplianceClass::ALL[c], bb, burden, n)).collect();
        let req = PlanRequest { rebound_fraction_max: rebound, deferral_min_max: deferral, ..request(&target, cohorts) };
        let plan = plan(&req).unwrap();
        assert_within_cohorts(&req, &plan);
        for t in 0..target.len() {
            let e = &plan.evaluation;
            prop_assert!((e.shortfall_w[t] - (req.target_w[t] - e.expected_w[t]).max(0.0)).abs() < 1e-6);
        }
    }
}

/// The allowances for scatter grow with the size of the appliances a plan relies on: the same expected
/// reduction from 7.4 kW chargers is planned with more headroom above the target and below the rebound cap than
/// from 160 W freezers, and with none when no sigmas are asked for.
#[test]
fn the_scatter_allowances_grow_with_the_size_of_the_appliances() {
    let target_kw = [300.0; 10];
    // Delivery with the rebound cap out of the way, rebound with no delivery allowance.
    let plan_of = |class: ApplianceClass, delivery_sigmas: f64, rebound_sigmas: f64| {
        let mut req = request(&target_kw, vec![cohort(0, class, 6, 0, 1_000_000)]);
        req.cohorts[0].reduction_w_net_sum = req.cohorts[0].reduction_w_sum;
        req.rebound_fraction_max = if rebound_sigmas > 0.0 { 0.1 } else { 1.0 };
        // A fixed cap: freezers alone cannot hold a 10-minute plateau's rebound to 10 % of what they deliver.
        req.rebound_reference_w = Some(300e3);
        req.rebound_sigmas = rebound_sigmas;
        req.delivery_sigmas = delivery_sigmas;
        let plan = plan(&req).unwrap();
        let over = plan.evaluation.expected_w.iter().map(|w| w / 300e3 - 1.0).fold(f64::INFINITY, f64::min);
        let rebound =
            plan.evaluation.rebound_w.iter().copied().fold(0.0, f64::max) / (req.rebound_fraction_max * 300e3);
        (over, rebound)
    };
    let (over_none, _) = plan_of(ApplianceClass::EvCharger, 0.0, 0.0);
    assert!(over_none.abs() < 0.01, "{over_none}");
    let (_, rebound_none) = plan_of(ApplianceClass::Freezer, 0.0, 1e-9);
    // To the cap, give or take rounding to whole appliances.
    assert!(rebound_none > 0.95 && rebound_none <= 1.02, "{rebound_none} of the cap");
    let (over_ev, _) = plan_of(ApplianceClass::EvCharger, 2.0, 0.0);
    let (over_freezer, _) = plan_of(ApplianceClass::Freezer, 2.0, 0.0);
    let (_, rebound_ev) = plan_of(ApplianceClass::EvCharger, 0.0, 2.0);
    let (_, rebound_freezer) = plan_of(ApplianceClass::Freezer, 0.0, 2.0);
    // 2 sigmas of 300 kW from 7.4 kW chargers: at least 2·√(7.4 × 300) = 94 kW, 31 %.
    assert!(over_ev >= 0.31, "chargers planned {over_ev} above the target");
    assert!(over_freezer > 0.0 && over_freezer < over_ev / 2.0, "freezers {over_freezer}, chargers {over_ev}");
    assert!(rebound_ev < rebound_freezer && rebound_freezer < 1.0, "rebound {rebound_ev} {rebound_freezer} of the cap");
}

/// A sustained target the population cannot carry under the rebound cap (a trip) falls short in every minute by
/// at most the same fraction, rather than dropping its first minutes; and its rebound stays within the share of
/// the peak reduction it delivers, not of the target it does not reach.
#[test]
fn an_unmeetable_target_falls_short_evenly() {
    let cohorts = vec![
        cohort(0, ApplianceClass::Fridge, 6, 0, 3_000),
        cohort(0, ApplianceClass::WaterHeater, 6, 0, 300),
        cohort(0, ApplianceClass::EvCharger, 6, 0, 100),
    ];
    let req = request(&[300.0; 20], cohorts);
    let plan = plan(&req).unwrap();
    let e = &plan.evaluation;
    let ratios: Vec<f64> = e.expected_w.iter().zip(&req.target_w).map(|(x, t)| x / t).collect();
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    assert!(hi < 0.999, "the target should be out of reach: {ratios:?}");
    // Under the rule this population carries about a third of the target where it is thinnest.
    assert!(lo > 0.3, "a minute left far short of the others: {ratios:?}");
    let peak_w = e.expected_w.iter().copied().fold(0.0, f64::max);
    let rebound_w = e.rebound_w.iter().copied().fold(0.0, f64::max);
    // Rounding to whole appliances may add a hair.
    assert!(rebound_w > 0.0 && rebound_w <= 0.1 * peak_w * 1.02, "rebound {rebound_w} W, peak reduction {peak_w} W");
}

/// A deferral longer than the slots the cap is checked in every minute (a water heater may wait two hours) pays
/// back past them: the cap must hold there too, or the LP hides payback in the slots it does not look at.
#[test]
fn payback_past_the_near_horizon_stays_under_the_cap() {
    let cohorts = vec![
        cohort(0, ApplianceClass::WaterHeater, 8, 0, 3_000),
        cohort(0, ApplianceClass::Fridge, 4, 0, 10_000),
        cohort(0, ApplianceClass::EvCharger, 6, 0, 1_000),
    ];
    let mut req = request(&[300.0; 20], cohorts);
    req.deferral_min_max = 120;
    let plan = plan(&req).unwrap();
    let e = &plan.evaluation;
    let peak_w = e.expected_w.iter().copied().fold(0.0, f64::max);
    let cap_w = 0.1 * peak_w.min(300e3);
    let (t_max, rebound_w) =
        e.rebound_w.iter().copied().enumerate().fold((0, 0.0), |a, (t, r)| if r > a.1 { (t, r) } else { a });
    assert!(peak_w > 0.0);
    // Each allocation is rounded up to whole appliances, and a few of them are chargers (a 30 kW cap is four
    // chargers' payback). Without the rows past the horizon the rebound was 5 times the cap.
    assert!(rebound_w <= cap_w * 1.35, "slot {t_max}: rebound {rebound_w:.0} W over the cap {cap_w:.0} W");
}

#[test]
fn the_greedy_reference_meets_the_target_with_the_largest_appliances_first() {
    let classes =
        [ApplianceClass::Fridge, ApplianceClass::Freezer, ApplianceClass::WaterHeater, ApplianceClass::EvCharger];
    let cohorts: Vec<Cohort> = classes.iter().map(|&class| cohort(0, class, 6, 0, 5_000)).collect();
    let target_kw = [300.0, 600.0, 900.0, 900.0, 900.0, 900.0, 700.0, 400.0, 200.0, 100.0];
    let req = request(&target_kw, cohorts);
    let allocations = greedy(&req).unwrap();
    let plan =
        Plan { evaluation: evaluate(&req, &allocations), allocations, lp_solve_us: 0, n_columns: 0, n_variables: 0 };
    assert_within_cohorts(&req, &plan);
    for (t, (&target, &expected)) in req.target_w.iter().zip(&plan.evaluation.expected_w).enumerate() {
        assert!(expected >= target * 0.999, "slot {t}: expected {expected} < target {target}");
    }
    // The largest appliances go first: EV chargers before anything smaller.
    assert_eq!(req.cohorts[plan.allocations[0].cohort].key.class, ApplianceClass::EvCharger);
}

#[test]
fn the_plan_provisions_for_the_devices_random_start_offset() {
    let cohorts: Vec<Cohort> = [ApplianceClass::Fridge, ApplianceClass::Freezer, ApplianceClass::WaterHeater]
        .iter()
        .flat_map(|&class| (0..3).map(move |band| cohort(0, class, 6, band, 4_000)))
        .collect();
    let target_kw = [80.0; 8];
    let offset = PlanRequest { randomize_start_s: 30, rebound_fraction_max: 1.0, ..request(&target_kw, cohorts) };
    let plan = plan(&offset).unwrap();
    // Devices starting up to 30 s late still meet the first minute...
    assert!(plan.evaluation.expected_w[0] >= 80e3 * 0.999, "{:?}", plan.evaluation.expected_w);
    // ...because the plan asked for more than a prompt start would need.
    let prompt = PlanRequest { randomize_start_s: 0, ..offset.clone() };
    let if_prompt = evaluate(&prompt, &plan.allocations);
    assert!(if_prompt.expected_w[0] > 80e3 * 1.05, "{:?}", if_prompt.expected_w);
}

/// LP values are rounded up to whole appliances, except in a column the LP gives under half an appliance in
/// all, or in a class it gives under one and a half where it has hundreds eligible, which are dropped.
#[test]
fn rounding_drops_slivers_and_rounds_the_rest_up() {
    let classes = [ApplianceClass::Fridge, ApplianceClass::Freezer, ApplianceClass::Dishwasher];
    let n_of = |n: u32, starts: &[(usize, u32, u32)], values: &[f64]| -> Vec<u32> {
        let req = request(&[10.0], classes.iter().map(|&c| cohort(0, c, 6, 0, n)).collect());
        let allocations = round_and_split(&req, &columns(&req), starts, values);
        (0..req.cohorts.len()).map(|i| allocations.iter().filter(|a| a.cohort == i).map(|a| a.n).sum()).collect()
    };
    let one_each = [(0, 0, 10), (1, 0, 10), (2, 0, 10)];
    // A hundred of each class: a class needs one appliance in all (1 %) to be used.
    assert_eq!(n_of(100, &one_each, &[0.4, 2.3, 0.6]), vec![0, 3, 0]);
    assert_eq!(n_of(100, &one_each, &[0.49, 1.04, 250.0]), vec![0, 1, 100]);
    // Slivers in a column that is used: each rounds up.
    assert_eq!(n_of(100, &[(0, 0, 10), (0, 1, 10), (1, 0, 10)], &[0.3, 0.7, 0.2]), vec![2, 0, 0]);
    // Thousands of each: one and a half.
    assert_eq!(n_of(5_000, &one_each, &[0.49, 1.04, 1.6]), vec![0, 0, 2]);
}

/// Four classes, 2,000 of each in each burden band, and their plan for a ramp to a 600 kW plateau.
fn a_first_plan_at_600_kw() -> (Vec<Cohort>, Plan) {
    let mut cohorts = Vec::new();
    for class in
        [ApplianceClass::Fridge, ApplianceClass::Freezer, ApplianceClass::WaterHeater, ApplianceClass::EvCharger]
    {
        for burden_band in 0..3 {
            cohorts.push(cohort(0, class, 6, burden_band, 2_000));
        }
    }
    let target_kw = [200.0, 400.0, 600.0, 600.0, 600.0, 600.0, 600.0, 600.0, 400.0, 200.0];
    let first_plan = plan(&request(&target_kw, cohorts.clone())).unwrap();
    (cohorts, first_plan)
}

#[test]
fn a_residual_plan_shares_the_events_rebound_cap_with_what_was_planned_before() {
    let (cohorts, first_plan) = a_first_plan_at_600_kw();
    let prior_w = first_plan.evaluation.rebound_w.clone();
    // The operator raises the first minutes to the plateau: the peak, and so the cap, stay where they were.
    // (The counts of the second plan's cohorts hardly matter here: 2,000 each is plenty.)
    let residual_kw = [400.0, 200.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let cap_w = 0.1 * 600e3;
    let shared = PlanRequest {
        rebound_reference_w: Some(600e3),
        prior_rebound_w: prior_w.clone(),
        ..request(&residual_kw, cohorts.clone())
    };
    let alone = request(&residual_kw, cohorts);
    // The worst rebound of both plans together, and how much of its target the residual plan delivers.
    let together = |req: &PlanRequest| {
        let p = plan(req).unwrap();
        let delivered = p.evaluation.expected_w.iter().sum::<f64>() / req.target_w.iter().sum::<f64>();
        let n = prior_w.len().max(p.evaluation.rebound_w.len());
        let worst_w = (residual_kw.len()..n)
            .map(|t| prior_w.get(t).unwrap_or(&0.0) + p.evaluation.rebound_w.get(t).unwrap_or(&0.0))
            .fold(0.0, f64::max);
        (worst_w, delivered)
    };
    let (shared_w, shared_delivered) = together(&shared);
    assert!(shared_w <= cap_w * 1.05 + 5e3, "rebound with the earlier plan's {shared_w} W > cap {cap_w} W");
    assert!(shared_delivered > 0.95, "the residual plan delivered {shared_delivered} of its target");
    // Planned on its own, the residual takes a cap of its own peak on top of the earlier plan's rebound.
    let (alone_w, _) = together(&alone);
    assert!(alone_w > cap_w * 1.05 + 5e3, "alone {alone_w} W, shared {shared_w} W");
}

/// A residual's allowance for scatter covers the earlier dispatches' scatter as well as its own: where theirs
/// already fills the cap, it adds no rebound (it may still absorb), instead of spending the room the earlier
/// plan kept back for its scatter as headroom of its own.
#[test]
fn a_residual_keeps_the_earlier_plans_scatter_allowance() {
    let (cohorts, first_plan) = a_first_plan_at_600_kw();
    // Out past any payback of the residual's, so every slot it can touch has a prior.
    let mut prior_w = first_plan.evaluation.rebound_w.clone();
    prior_w.resize(PRIOR_REBOUND_SLOTS_MAX, 0.0);
    let residual_kw = [400.0, 200.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let cap_kw = 0.1 * 600.0;
    let residual_rebound_kw = |prior_var_kw2: Vec<f64>| {
        let req = PlanRequest {
            rebound_reference_w: Some(600e3),
            prior_rebound_w: prior_w.clone(),
            prior_rebound_var_kw2: prior_var_kw2,
            rebound_sigmas: 2.0,
            ..request(&residual_kw, cohorts.clone())
        };
        let p = plan(&req).unwrap();
        p.evaluation.rebound_w.iter().skip(residual_kw.len()).fold(0.0, |a: f64, &w| a.max(w)) / 1e3
    };
    // Two sigma of the earlier plan's scatter is 200 kW, over the whole cap.
    let filled = residual_rebound_kw(vec![100.0 * 100.0; prior_w.len()]);
    assert!(filled <= 0.02 * cap_kw, "{filled} kW of rebound added where the earlier plan's scatter fills the cap");
    let unknown = residual_rebound_kw(Vec::new());
    assert!(unknown > 0.1 * cap_kw, "with no prior scatter given, the residual adds rebound ({unknown} kW)");
    // A smaller scatter (σ 10 kW) counts under the same tangent as the residual's own: the residual adds less
    // than with none given, and more than where it fills the cap (6.1 kW against 9.3 kW and 0 when written).
    let some = residual_rebound_kw(vec![10.0 * 10.0; prior_w.len()]);
    assert!(some > filled && some < unknown, "filled {filled} kW, some {some} kW, unknown {unknown} kW");
}

/// A first plan does not use a class a few at a time where it has hundreds eligible: it is planned again without
/// it, from the classes it uses at scale. A residual plan may (the engine's top-ups choose their classes).
#[test]
fn a_class_used_a_few_at_a_time_is_planned_without() {
    let cohorts =
        vec![cohort(0, ApplianceClass::Fridge, 6, 0, 400), cohort(0, ApplianceClass::Dishwasher, 6, 0, 1_000)];
    let plans = |target_kw: f64| {
        let first = PlanRequest { rebound_fraction_max: 1.0, ..request(&[target_kw; 5], cohorts.clone()) };
        let residual = PlanRequest { rebound_reference_w: Some(target_kw * 1e3), ..first.clone() };
        let used = |req: &PlanRequest| {
            let p = plan(req).unwrap();
            assert!(p.evaluation.shortfall_w.iter().all(|&s| s < 1.0), "{target_kw} kW: {:?}", p.evaluation);
            let n_of = |class| -> u32 {
                p.allocations.iter().filter(|a| req.cohorts[a.cohort].key.class == class).map(|a| a.n).sum()
            };
            (n_of(ApplianceClass::Fridge), n_of(ApplianceClass::Dishwasher))
        };
        (used(&first), used(&residual))
    };
    // The LP would take a few dishwashers beside most of the fridges; the first plan takes more fridges instead.
    let (first, residual) = plans(10.0);
    assert!(residual.1 > 0 && residual.1 < 10, "residual: {residual:?}");
    assert_eq!(first.1, 0, "first: {first:?}");
    assert!(first.0 > residual.0, "first {first:?}, residual {residual:?}");
    // Where the fridges cannot cover it, dishwashers by the dozen are a class in use.
    let (first, _) = plans(20.0);
    assert!(first.1 >= 10, "first: {first:?}");
}

/// The first plan request of the 30-day season scenario, as the engine made it.
fn season_first_evening() -> PlanRequest {
    let cohorts = include_str!("testdata/season_first_evening.csv")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Cohort {
                key: CohortKey {
                    region: RegionId(f[0].parse().unwrap()),
                    class: ApplianceClass::from_name(f[1]).unwrap(),
                    budget_band: f[2].parse().unwrap(),
                    burden_band: f[3].parse().unwrap(),
                },
                n_appliances: f[4].parse().unwrap(),
                reduction_w_sum: f[5].parse().unwrap(),
                reduction_w_net_sum: f[6].parse().unwrap(),
            }
        })
        .collect();
    let target_kw =
        [200.0, 400.0, 600.0, 800.0, 800.0, 800.0, 800.0, 800.0, 800.0, 800.0, 700.0, 600.0, 500.0, 300.0, 200.0];
    PlanRequest {
        rebound_sigmas: 2.0,
        rebound_margin_share: 0.05,
        delivery_sigmas: 1.5,
        randomize_start_s: 30,
        ..request(&target_kw, cohorts)
    }
}

/// Where the rebound cap leaves too little room for the target and its allowance for scatter, the allowance
/// gives way first: the plan expects the whole target in every slot. Before, the shortfall fell evenly on the two
/// together and the season's first evening was planned at 791 kW in its first peak minute and 789 kW in its last,
/// while the minutes between kept up to 25 kW of allowance.
#[test]
fn the_target_comes_before_its_allowance() {
    let req = season_first_evening();
    let plan = plan(&req).unwrap();
    assert_within_cohorts(&req, &plan);
    let e = &plan.evaluation;
    let margin_w: Vec<f64> = e.expected_w.iter().zip(&req.target_w).map(|(e, t)| e - t).collect();
    let least_w = margin_w.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(least_w < 0.02 * 800e3, "the cap must bind for this test: every slot has {least_w} W over its target");
    assert!(least_w >= 0.0, "a slot is planned under its target: {margin_w:?}");
}

/// The first minutes of a plan, before any top-up can reach them, get their allowance for scatter before the
/// later minutes, which top-ups back. On the season's first evening (an EV charger's 7.4 kW is most of a
/// minute's scatter), the second to fifth minutes kept 24, 31, 2 and 33 kW over the target and missed 95 % on
/// a quarter of the evenings; the plateau's last minutes kept up to 21 kW. With the target a fifth higher
/// (where the first plan is on target, and only the allowance is short), 57, 49, 32 and 80 kW.
#[test]
fn the_first_minutes_get_their_allowance_before_the_later_ones() {
    for (scale, each_share_min, sum_share_min) in [(1.0, 0.01, 0.15), (1.2, 0.05, 0.3)] {
        let mut req = season_first_evening();
        for w in &mut req.target_w {
            *w *= scale;
        }
        let plan = plan(&req).unwrap();
        assert_within_cohorts(&req, &plan);
        let margin_w: Vec<f64> = plan.evaluation.expected_w.iter().zip(&req.target_w).map(|(e, t)| e - t).collect();
        let peak_w = req.target_w.iter().copied().fold(0.0, f64::max);
        let unbacked = &margin_w[1..UNBACKED_SLOTS];
        assert!(margin_w.iter().all(|&m| m >= 0.0), "x{scale}: a slot is planned under its target: {margin_w:?}");
        assert!(
            unbacked.iter().all(|&m| m >= each_share_min * peak_w),
            "x{scale}: an unbacked slot keeps under {each_share_min} of the peak target: {margin_w:?}"
        );
        assert!(
            unbacked.iter().sum::<f64>() >= sum_share_min * peak_w,
            "x{scale}: the unbacked slots keep under {sum_share_min} of the peak target between them: {margin_w:?}"
        );
    }
}
