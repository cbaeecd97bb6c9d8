//! Commands signed per second, what verification costs a device, and the references beside them:
//!
//! - Ed25519 per command with `ed25519-dalek` (what the engine and the SDK use);
//! - `ed25519-dalek` batch verification of 1024 commands (what a gateway verifying for its devices could use;
//!   it is not strict verification, which the SDK requires, so it is a reference only);
//! - with `--features aws-lc`, Ed25519 from `aws-lc-rs` (assembly-optimised C), per command.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, VerifyingKey};
use halftime_core::{ApplianceId, CommandKind, DeferralCommand, EventId};
use halftime_signer::{Signer, TrustedKeys};

const SEED: [u8; 32] = [5; 32];
const BATCH: usize = 1024;

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

fn dalek(c: &mut Criterion) {
    let signer = Signer::from_seed(SEED);
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

    let signed: Vec<_> = (0..BATCH as u64).map(|i| signer.sign(command(i))).collect();
    let messages: Vec<Vec<u8>> = signed.iter().map(|s| s.command.canonical_bytes().to_vec()).collect();
    let message_refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let signatures: Vec<Signature> = signed.iter().map(|s| Signature::from_bytes(&s.signature)).collect();
    let key = VerifyingKey::from_bytes(&signer.public_key()).unwrap();
    let keys = vec![key; BATCH];
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(BenchmarkId::new("verify_batch_dalek_reference", BATCH), |b| {
        b.iter(|| ed25519_dalek::verify_batch(&message_refs, &signatures, &keys).unwrap())
    });
    g.finish();
}

#[cfg(feature = "aws-lc")]
fn aws_lc(c: &mut Criterion) {
    use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
    let pair = Ed25519KeyPair::from_seed_unchecked(&SEED).unwrap();
    let public = UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref().to_vec());
    let mut g = c.benchmark_group("signer");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("sign_ed25519_aws_lc_reference", |b| {
        b.iter(|| {
            i += 1;
            pair.sign(&command(i).canonical_bytes())
        })
    });
    let message = command(7).canonical_bytes();
    let signature = pair.sign(&message);
    g.bench_function("verify_ed25519_aws_lc_reference", |b| {
        b.iter(|| public.verify(&message, signature.as_ref()).unwrap())
    });
    g.finish();
}

#[cfg(feature = "aws-lc")]
criterion_group!(benches, dalek, aws_lc);
#[cfg(not(feature = "aws-lc"))]
criterion_group!(benches, dalek);
criterion_main!(benches);
