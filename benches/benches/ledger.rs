//! Atomic reservations per second, from one thread and from two.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use halftime_core::{ApplianceClass, ApplianceId, EventId, HouseholdId, Limits, Reservation};
use halftime_ledger::Ledger;
use std::sync::Arc;

const T0: i64 = 20_000 * 86_400_000 + 17 * 3_600_000;
const N: u64 = 100_000;

fn reservation(h: u64, event: u64) -> Reservation {
    Reservation {
        household: HouseholdId(h),
        appliance: ApplianceId(h * 10),
        class: ApplianceClass::Fridge,
        event: EventId(event),
        not_before_unix_ms: T0,
        not_after_unix_ms: T0 + 630_000,
        deferral_s: 600,
        reduction_kw: 0.03,
    }
}

fn fresh() -> Arc<Ledger> {
    let l = Arc::new(Ledger::new(Limits::system_default(), 7, 30));
    for h in 0..N {
        l.ensure_household(HouseholdId(h));
    }
    l
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N));
    g.bench_function("reserve_100k_one_thread", |b| {
        b.iter_batched(
            fresh,
            |l| (0..N).filter(|&h| l.try_reserve(reservation(h, 1), 60, T0).is_ok()).count(),
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("reserve_100k_two_threads_two_events", |b| {
        b.iter_batched(
            fresh,
            |l| {
                let t: Vec<_> = (1..=2u64)
                    .map(|e| {
                        let l = Arc::clone(&l);
                        std::thread::spawn(move || {
                            (0..N / 2).filter(|&h| l.try_reserve(reservation(h * 2 + e - 1, e), 60, T0).is_ok()).count()
                        })
                    })
                    .collect();
                t.into_iter().map(|t| t.join().unwrap()).sum::<usize>()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
