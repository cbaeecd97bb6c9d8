//! The planner, side by side.
//!
//! - `planner_lp`: LP build + solve time against the number of columns and slots, with every solver this build
//!   has (`--features highs` adds HiGHS beside the default pure-Rust microlp).
//! - `planner_vs_greedy`: the LP against the greedy reference (largest appliances first, no LP) on cohorts of
//!   the Colombia v England population mix at 100 k, 1 M and 10 M enrolled appliances, asking for a quarter of
//!   what they could shed through a half-time pickup shape. Before timing, it prints what each plan would
//!   deliver: target met, rebound, appliances deferred, how evenly the deferral minutes fall, and discomfort.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use halftime_core::{ApplianceClass, RegionId, RegionSet};
use halftime_engine::EngineConfig;
use halftime_planner::{
    Allocation, Cohort, CohortKey, Evaluation, LpSolver, PlanRequest, budget_band, evaluate, greedy, plan_with,
};
use halftime_sim::{Population, Scenario};
use std::collections::BTreeMap;

fn synthetic_cohorts(n_regions: u16, n_budget_bands: u8) -> Vec<Cohort> {
    let mut out = Vec::new();
    for region in 0..n_regions {
        for class in ApplianceClass::ALL {
            for budget_band in 0..n_budget_bands {
                for burden_band in 0..3 {
                    let p = class.profile();
                    let n = 50_000u32;
                    let per_w = f64::from(p.power_w_typical) * f64::from(p.duty_cycle_permille) / 1000.0;
                    out.push(Cohort {
                        key: CohortKey { region: RegionId(region), class, budget_band: 8 - budget_band, burden_band },
                        n_appliances: n,
                        reduction_w_sum: per_w * f64::from(n),
                        reduction_w_net_sum: per_w * 0.95 * f64::from(n),
                    });
                }
            }
        }
    }
    out
}

/// A half-time pickup: rising to its peak 40 % of the way through, then falling.
fn pickup_w(n_slots: usize, peak_w: f64) -> Vec<f64> {
    (0..n_slots).map(|t| peak_w * (1.0 - ((t as f64 / n_slots as f64) - 0.4).abs())).collect()
}

fn lp(c: &mut Criterion) {
    let mut g = c.benchmark_group("planner_lp");
    // The engine's own allowances, so the figures are those of the plans it makes.
    let engine = EngineConfig::default();
    g.sample_size(10);
    for (n_slots, n_budget_bands) in [(10usize, 1u8), (20, 2), (30, 3)] {
        let req = PlanRequest {
            target_w: pickup_w(n_slots, 1e8),
            cohorts: synthetic_cohorts(14, n_budget_bands),
            rebound_fraction_max: engine.rebound_fraction_max,
            rebound_reference_w: None,
            prior_rebound_w: Vec::new(),
            prior_rebound_var_kw2: Vec::new(),
            rebound_sigmas: engine.rebound_sigmas,
            rebound_margin_share: engine.rebound_margin_share(),
            delivery_sigmas: engine.delivery_sigmas,
            deferral_min_max: 30,
            randomize_start_s: 30,
        };
        let columns = 8 * usize::from(n_budget_bands) * 3;
        for &solver in LpSolver::ALL {
            g.bench_with_input(
                BenchmarkId::new(format!("{}_{columns}_columns", solver.name()), format!("{n_slots}_slots")),
                &req,
                |b, req| b.iter(|| plan_with(req, solver).expect("plans")),
            );
        }
    }
    g.finish();
}

/// Cohorts of `n_appliances` drawn from the Colombia v England population mix, all fresh (burden band 0) and
/// with the system's default limits, for a 20-minute event.
fn population_cohorts(n_appliances: u64) -> Vec<Cohort> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/wc2018-col-eng-halftime.toml");
    let scenario = Scenario::load(std::path::Path::new(path)).expect("the scenario loads");
    let mut spec = scenario.population.clone();
    // A sample of households stands for the population: cohorts are sums, so scale them.
    spec.n_households = 100_000;
    let sample = Population::generate(&spec, &RegionSet::gb_dno_areas(), scenario.seed).expect("generates");
    let scale = n_appliances as f64 / sample.appliances.len() as f64;
    let mut by_key: BTreeMap<(u16, ApplianceClass, u8), (f64, f64, f64)> = BTreeMap::new();
    for a in &sample.appliances {
        let band = budget_band(20.min(u32::from(a.deferral_min_max))).expect("at least 5 minutes");
        let e = by_key.entry((a.region.0, a.class, band)).or_default();
        e.0 += 1.0;
        e.1 += a.expected_reduction_w();
        e.2 += a.expected_reduction_w() * (1.0 - a.override_rate());
    }
    by_key
        .into_iter()
        .map(|((region, class, budget_band), (n, w, w_net))| Cohort {
            key: CohortKey { region: RegionId(region), class, budget_band, burden_band: 0 },
            n_appliances: (n * scale).round() as u32,
            reduction_w_sum: w * scale,
            reduction_w_net_sum: w_net * scale,
        })
        .collect()
}

struct Quality {
    met_pct: f64,
    worst_slot_pct: f64,
    rebound_pct_of_peak: f64,
    deferred: u64,
    jain: f64,
    discomfort_kw_min: f64,
}

fn quality(req: &PlanRequest, allocations: &[Allocation], e: &Evaluation) -> Quality {
    let target: f64 = req.target_w.iter().sum();
    let met: f64 = req.target_w.iter().zip(&e.expected_w).map(|(t, x)| t.min(*x)).sum();
    let worst = req.target_w.iter().zip(&e.expected_w).map(|(t, x)| x / t).fold(f64::INFINITY, f64::min);
    let peak = req.target_w.iter().copied().fold(0.0, f64::max);
    let rebound = e.rebound_w.iter().copied().fold(0.0, f64::max);
    // Jain's index of deferral minutes over every enrolled appliance (those not deferred count as 0).
    let n_enrolled: f64 = req.cohorts.iter().map(|c| f64::from(c.n_appliances)).sum();
    let (mut sum, mut sum_sq, mut discomfort) = (0.0, 0.0, 0.0);
    for a in allocations {
        let c = &req.cohorts[a.cohort];
        let (n, d) = (f64::from(a.n), f64::from(a.deferral_min));
        sum += n * d;
        sum_sq += n * d * d;
        let per_kw = c.reduction_w_sum / f64::from(c.n_appliances) / 1e3;
        discomfort += c.key.class.profile().discomfort_weight * per_kw * n * d;
    }
    Quality {
        met_pct: 100.0 * met / target,
        worst_slot_pct: 100.0 * worst,
        rebound_pct_of_peak: 100.0 * rebound / peak,
        deferred: allocations.iter().map(|a| u64::from(a.n)).sum(),
        jain: if sum_sq > 0.0 { sum * sum / (n_enrolled * sum_sq) } else { 0.0 },
        discomfort_kw_min: discomfort,
    }
}

fn vs_greedy(c: &mut Criterion) {
    let mut g = c.benchmark_group("planner_vs_greedy");
    let engine = EngineConfig::default();
    g.sample_size(10);
    eprintln!(
        "{:<9} {:>11} {:>8} {:>12} {:>12} {:>10} {:>7} {:>14}",
        "planner", "appliances", "met %", "worst min %", "rebound %pk", "deferred", "Jain", "discomfort"
    );
    for n in [100_000u64, 1_000_000, 10_000_000] {
        let cohorts = population_cohorts(n);
        let expected_w: f64 = cohorts.iter().map(|c| c.reduction_w_net_sum).sum();
        let req = PlanRequest {
            target_w: pickup_w(20, expected_w * 0.25),
            cohorts,
            rebound_fraction_max: engine.rebound_fraction_max,
            rebound_reference_w: None,
            prior_rebound_w: Vec::new(),
            prior_rebound_var_kw2: Vec::new(),
            rebound_sigmas: engine.rebound_sigmas,
            rebound_margin_share: engine.rebound_margin_share(),
            delivery_sigmas: engine.delivery_sigmas,
            deferral_min_max: 20,
            randomize_start_s: 30,
        };
        let lp_plan = plan_with(&req, LpSolver::default()).expect("plans");
        let greedy_allocations = greedy(&req).expect("plans");
        let rows = [
            ("lp", quality(&req, &lp_plan.allocations, &lp_plan.evaluation)),
            ("greedy", quality(&req, &greedy_allocations, &evaluate(&req, &greedy_allocations))),
        ];
        for (name, q) in rows {
            eprintln!(
                "{name:<9} {n:>11} {:>8.1} {:>12.1} {:>12.1} {:>10} {:>7.3} {:>14.0}",
                q.met_pct, q.worst_slot_pct, q.rebound_pct_of_peak, q.deferred, q.jain, q.discomfort_kw_min
            );
        }
        g.bench_with_input(BenchmarkId::new("lp", n), &req, |b, req| {
            b.iter(|| plan_with(req, LpSolver::default()).expect("plans"))
        });
        g.bench_with_input(BenchmarkId::new("greedy", n), &req, |b, req| b.iter(|| greedy(req).expect("plans")));
    }
    g.finish();
}

criterion_group!(benches, lp, vs_greedy);
criterion_main!(benches);
