//! The embedded store (redb): making a dispatch durable, and starting again from what is on disk.
//!
//! - `put_dispatch`: one dispatch of 100 k and 1 M reservations with their signed commands, written (as records
//!   of 50 k) and committed (fsync) in one transaction, as the engine does before any command leaves.
//! - `recovery`: opening an engine on a store that holds 100 k or 1 M enrolled appliances and a dispatch to a
//!   third of them: reading everything back, rebuilding the registry, the ledger, the head-end's active
//!   commands and the event runtimes.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use halftime_benches::appliance;
use halftime_client::clock::SystemClock;
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_core::{
    ApplianceClass, ApplianceId, CommandKind, DeferralCommand, EventId, HouseholdId, Priority, Reservation,
    SignedCommand,
};
use halftime_engine::{Engine, EngineConfig, Grant, SubmitRequest};
use halftime_store::{Dispatch, Store};
use std::sync::Arc;
use std::time::Duration;

fn dispatch(n: u64) -> Dispatch {
    let t0 = 1_800_000_000_000;
    let reservations: Vec<Reservation> = (0..n)
        .map(|i| Reservation {
            household: HouseholdId(i / 2 + 1),
            appliance: ApplianceId(i + 1),
            class: ApplianceClass::ALL[(i % 8) as usize],
            event: EventId(1),
            not_before_unix_ms: t0,
            not_after_unix_ms: t0 + 630_000,
            deferral_s: 600,
            reduction_kw: 0.03,
        })
        .collect();
    // The store keeps signatures as bytes and never checks them: any 64 bytes cost the same to write.
    let commands = reservations
        .iter()
        .enumerate()
        .map(|(i, r)| SignedCommand {
            command: DeferralCommand {
                kind: CommandKind::Defer,
                key_id: 1,
                device: r.appliance,
                event: r.event,
                counter: i as u64 + 1,
                not_before_unix_ms: r.not_before_unix_ms,
                not_after_unix_ms: r.not_after_unix_ms,
                deferral_s: r.deferral_s,
                randomize_start_s: 30,
            },
            signature: [i as u8; 64],
        })
        .collect();
    Dispatch { reservations, commands }
}

fn put_dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_put_dispatch");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in [100_000u64, 1_000_000] {
        let d = dispatch(n);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::from_parameter(n), &d, |b, d| {
            b.iter(|| store.append_dispatch(EventId(1), d, n).unwrap())
        });
    }
    g.finish();
}

fn recovery(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("store_recovery");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in [100_000u64, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let n_commands = rt.block_on(async {
            let engine = Engine::open(EngineConfig::default(), dir.path(), Arc::new(SystemClock)).await.unwrap();
            let region = engine.regions().lookup("_C").unwrap();
            for from in (0..n).step_by(100_000) {
                engine.enrol((from..(from + 100_000).min(n)).map(|i| appliance(i, region)).collect()).await.unwrap();
            }
            let expected_w: f64 = (0..n).map(|i| appliance(i, region).expected_reduction_w()).sum();
            let req = SubmitRequest {
                regions: vec!["_C".into()],
                start_unix_ms: SystemClock.now_unix_ms() + 60 * MS_PER_MIN,
                target_mw: vec![],
                target_kw: vec![expected_w * 0.25 / 1e3; 10],
                deferral_min_max: 20,
                priority: Priority::High,
                idempotency_key: "recovery".into(),
            };
            let (_, plan) = engine.submit(req, &Grant::unrestricted()).await.unwrap();
            engine.close(Duration::from_secs(5)).await;
            plan.n_appliances
        });
        eprintln!("recovery of {n} appliances with a dispatch of {n_commands} commands");
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let engine =
                        Engine::open(EngineConfig::default(), dir.path(), Arc::new(SystemClock)).await.unwrap();
                    assert_eq!(engine.n_appliances() as u64, n);
                    engine.close(Duration::from_secs(5)).await;
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, put_dispatch, recovery);
criterion_main!(benches);
