//! The head-end alone, in process: commands queued with `enqueue` until every one has come out of a gateway
//! link's queue, at 100 k and 1 M commands over 16 links. No transport, no signatures checked: the ceiling the
//! gRPC path (`halftime bench`, `headend_throughput`) is measured against.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use halftime_core::{ApplianceId, CommandKind, DeferralCommand, EventId, SignedCommand};
use halftime_headend::{HeadEnd, HeadEndConfig};
use std::time::Duration;

const N_LINKS: u64 = 16;

fn command(device: u64, counter: u64) -> SignedCommand {
    SignedCommand {
        command: DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 1,
            device: ApplianceId(device),
            event: EventId(1),
            counter,
            not_before_unix_ms: 1_800_000_000_000,
            not_after_unix_ms: 1_800_000_630_000,
            deferral_s: 600,
            randomize_start_s: 30,
        },
        signature: [7; 64],
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("headend_deliver");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in [100_000u64, 1_000_000] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("16_links", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    // Queues deep enough for the whole burst: this measures the head-end, not backpressure.
                    let config = HeadEndConfig { link_queue_batches: 2_048, ..HeadEndConfig::default() };
                    let headend = HeadEnd::new(config);
                    let now = 1_800_000_000_000 - 60_000;
                    let mut drains = Vec::new();
                    for l in 0..N_LINKS {
                        let devices: Vec<ApplianceId> = (0..n).filter(|d| d % N_LINKS == l).map(ApplianceId).collect();
                        let (_, mut rx) = headend.attach(&devices, now);
                        drains.push(rt.spawn(async move {
                            let mut got = 0u64;
                            while let Some(batch) = rx.recv().await {
                                got += batch.len() as u64;
                            }
                            got
                        }));
                    }
                    let commands: Vec<SignedCommand> = (0..n).map(|d| command(d, i * n + d + 1)).collect();
                    let t0 = std::time::Instant::now();
                    headend.enqueue(&commands, now);
                    // Dropping the head-end closes the links once their queues are read out.
                    drop(headend);
                    let got: u64 = rt.block_on(async {
                        let mut sum = 0;
                        for d in drains {
                            sum += d.await.unwrap();
                        }
                        sum
                    });
                    total += t0.elapsed();
                    assert_eq!(got, n);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
