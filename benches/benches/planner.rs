//! LP build + solve time against the number of cohorts and slots.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use halftime_core::{ApplianceClass, RegionId};
use halftime_planner::{Cohort, CohortKey, PlanRequest, plan};

fn cohorts(n_regions: u16, n_budget_bands: u8) -> Vec<Cohort> {
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

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("planner_lp");
    g.sample_size(10);
    for (n_slots, n_budget_bands) in [(10usize, 1u8), (20, 2), (30, 3)] {
        let req = PlanRequest {
            // A half-time pickup shape, 100 MW at peak.
            target_w: (0..n_slots).map(|t| 1e8 * (1.0 - ((t as f64 / n_slots as f64) - 0.4).abs())).collect(),
            cohorts: cohorts(14, n_budget_bands),
            rebound_fraction_max: 0.1,
            rebound_sigmas: 2.0,
            deferral_min_max: 30,
        };
        let columns = 8 * usize::from(n_budget_bands) * 3;
        g.bench_with_input(
            BenchmarkId::new(format!("{columns}_columns"), format!("{n_slots}_slots")),
            &req,
            |b, req| b.iter(|| plan(req).expect("plans")),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
