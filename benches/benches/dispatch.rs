//! A whole dispatch through the engine at 100 k, 1 M and 10 M enrolled appliances, two figures from the same
//! submissions:
//!
//! - `plan_ready`: from the call to the plan being picked and reserved (validation, the event made durable,
//!   cohorts from the registry and the ledger, the LP, least-burdened picking with atomic reservations), as the
//!   engine times it in the plan summary;
//! - `submit_to_all_queued`: the wall time of `submit`, which returns once every command is also signed, the
//!   dispatch is durable and every command is queued at the head-end.
//!
//! One engine per size; each submission asks for 2 % of what the population could shed, in a slot of its own
//! (up to 14 slots over the 7 days ahead an event may start, several events per slot), so every one meets
//! households with budget left. No devices are attached: delivery is measured by `halftime bench`.

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use halftime_benches::appliance;
use halftime_client::clock::SystemClock;
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_core::{PlanSummary, Priority};
use halftime_engine::{Engine, EngineConfig, Grant, SubmitRequest};
use std::sync::Arc;
use std::time::Duration;

/// Submissions one engine takes before its households' budgets could run short.
const EVENTS_MAX: usize = 14 * 8;
const ENROL_CHUNK: u64 = 100_000;

struct Fixture {
    rt: tokio::runtime::Runtime,
    engine: Engine,
    _dir: tempfile::TempDir,
    target_kw: f64,
    n: u64,
    submitted: usize,
}

impl Fixture {
    fn new(n: u64) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = rt.block_on(async {
            let engine = Engine::open(EngineConfig::default(), dir.path(), Arc::new(SystemClock)).await.unwrap();
            let region = engine.regions().lookup("_C").unwrap();
            for from in (0..n).step_by(ENROL_CHUNK as usize) {
                let chunk = (from..(from + ENROL_CHUNK).min(n)).map(|i| appliance(i, region)).collect();
                engine.enrol(chunk).await.unwrap();
            }
            engine
        });
        let region = engine.regions().lookup("_C").unwrap();
        let expected_w: f64 = (0..8).map(|i| appliance(i, region).expected_reduction_w()).sum::<f64>() * n as f64 / 8.0;
        Self { rt, engine, _dir: dir, target_kw: expected_w * 0.02 / 1e3, n, submitted: 0 }
    }

    fn submit(&mut self) -> (Duration, PlanSummary) {
        let k = self.submitted;
        assert!(k < EVENTS_MAX, "{} appliances: more than {EVENTS_MAX} submissions on one engine", self.n);
        self.submitted += 1;
        let slot = (k % 14) as i64;
        let req = SubmitRequest {
            regions: vec!["_C".into()],
            start_unix_ms: SystemClock.now_unix_ms()
                + 10 * MS_PER_MIN
                + (slot / 2) * 24 * 60 * MS_PER_MIN
                + (slot % 2) * 4 * 60 * MS_PER_MIN,
            target_mw: vec![],
            target_kw: vec![self.target_kw; 10],
            deferral_min_max: 20,
            priority: Priority::High,
            idempotency_key: format!("bench-{}-{k}", self.n),
        };
        let t0 = std::time::Instant::now();
        let (_, plan) = self.rt.block_on(self.engine.submit(req, &Grant::unrestricted())).unwrap();
        let wall = t0.elapsed();
        assert!(plan.n_appliances > 0);
        (wall, plan)
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("whole_plan");
    // One submission per sample: each takes from tens of milliseconds to seconds, and an engine takes a limited
    // number of them.
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    for n in [100_000u64, 1_000_000, 10_000_000] {
        let mut f = Fixture::new(n);
        g.bench_function(BenchmarkId::new("plan_ready", n), |b| {
            b.iter_custom(|iters| {
                (0..iters).map(|_| Duration::from_micros(f.submit().1.plan_ready_us)).sum::<Duration>()
            })
        });
        g.bench_function(BenchmarkId::new("submit_to_all_queued", n), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let (wall, plan) = f.submit();
                        eprintln!(
                            "{n} appliances: {} commands, {} cohorts, LP {:.1} ms, plan ready {:.1} ms",
                            plan.n_appliances,
                            plan.n_cohorts,
                            plan.lp_solve_us as f64 / 1e3,
                            plan.plan_ready_us as f64 / 1e3
                        );
                        wall
                    })
                    .sum::<Duration>()
            })
        });
        let Fixture { rt, engine, .. } = f;
        rt.block_on(engine.close(Duration::from_secs(5)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
