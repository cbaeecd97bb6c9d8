//! A whole dispatch through the engine: `submit` returns once the event is durable, the plan is made
//! (cohorts, LP, pick and reserve), every command is signed, reservations and commands are durable, and
//! every command is queued at the head-end. Measured for 10 k and 100 k enrolled appliances.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use halftime_client::clock::SystemClock;
use halftime_core::{Appliance, ApplianceClass, ApplianceId, HouseholdId, Priority};
use halftime_engine::{Engine, EngineConfig, Grant, SubmitRequest};
use std::sync::Arc;

fn population(n: u64, region: halftime_core::RegionId) -> Vec<Appliance> {
    (0..n)
        .map(|i| {
            let class = ApplianceClass::ALL[(i % 8) as usize];
            let p = class.profile();
            Appliance {
                id: ApplianceId(i + 1),
                household: HouseholdId(i / 2 + 1),
                region,
                class,
                rated_power_w: p.power_w_typical,
                duty_cycle_permille: p.duty_cycle_permille as u16,
                deferral_min_max: p.deferral_min_max_safe as u16,
                override_rate_permille: p.override_rate_permille as u16,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("dispatch");
    g.sample_size(10);
    for n in [10_000u64, 100_000] {
        g.bench_with_input(BenchmarkId::new("submit_to_all_queued", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for i in 0..iters {
                    // A fresh engine each time: households already deferred would be resting.
                    let dir = tempfile::tempdir().unwrap();
                    let (engine, req) = rt.block_on(async {
                        let engine =
                            Engine::open(EngineConfig::default(), dir.path(), Arc::new(SystemClock)).await.unwrap();
                        let region = engine.regions().lookup("_C").unwrap();
                        engine.enrol(population(n, region)).await.unwrap();
                        // Ask for about a third of what the population could shed.
                        let target_kw = n as f64 * 0.12;
                        let req = SubmitRequest {
                            regions: vec!["_C".into()],
                            start_unix_ms: 0,
                            target_mw: vec![],
                            target_kw: vec![target_kw; 10],
                            deferral_min_max: 30,
                            priority: Priority::Emergency,
                            idempotency_key: format!("bench-{i}"),
                        };
                        (engine, req)
                    });
                    let t0 = std::time::Instant::now();
                    let (_, plan) = rt.block_on(engine.submit(req, &Grant::unrestricted())).unwrap();
                    total += t0.elapsed();
                    assert!(plan.n_appliances > 0);
                    eprintln!(
                        "n={n}: {} commands, {} cohorts, LP {:.1} ms, shortfall {:.1} %",
                        plan.n_appliances,
                        plan.n_cohorts,
                        plan.lp_solve_us as f64 / 1e3,
                        100.0 * plan.shortfall_w.iter().sum::<f64>() / plan.target_w.iter().sum::<f64>()
                    );
                    rt.block_on(engine.close(std::time::Duration::from_secs(5)));
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
