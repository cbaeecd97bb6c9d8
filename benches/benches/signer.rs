//! Commands signed per second, and what verification costs a device.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use halftime_core::{ApplianceId, CommandKind, DeferralCommand, EventId};
use halftime_signer::{Signer, TrustedKeys};

fn command(i: u64) -> DeferralCommand {
    DeferralCommand {
        kind: CommandKind::Defer,
        key_id: 0,
        device: ApplianceId(i),
        event: EventId(1),
        counter: i,
        not_before_unix_ms: 1_800_000_000_000,
        not_after_unix_ms: 1_800_000_630_000,
        deferral_s: 600,
        randomize_start_s: 30,
    }
}

fn bench(c: &mut Criterion) {
    let signer = Signer::from_seed([5; 32]);
    let mut trusted = TrustedKeys::new();
    trusted.add(signer.public_key()).unwrap();
    let mut g = c.benchmark_group("signer");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("sign_ed25519_per_command", |b| {
        b.iter(|| {
            i += 1;
            signer.sign(command(i))
        })
    });
    let signed = signer.sign(command(7));
    g.bench_function("verify_ed25519_per_command", |b| b.iter(|| trusted.verify(&signed).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
