//! A fridge that joins Halftime: `cargo run -p halftime-client --example fridge -- <engine-url> <public-key-hex> <device-id>`.
//!
//! Start an engine (`cargo run -p halftime -- serve`), enrol device 42 (see the README), and run this with the
//! engine's public key, which `halftime serve` prints at start-up.

use halftime_client::clock::SystemClock;
use halftime_client::{Appliance, Deferral, DevicePolicy, LinkBuilder, LinkConfig, ResumeReason};
use halftime_core::{ApplianceId, Payback};
use halftime_signer::TrustedKeys;
use std::sync::Arc;
use std::time::Duration;

struct Fridge;

impl Appliance for Fridge {
    fn defer(&self, d: &Deferral) -> Result<u32, String> {
        println!("compressor held off for event {} until {}", d.event, d.end_unix_ms);
        Ok(135)
    }

    fn resume(&self, d: &Deferral, why: ResumeReason) {
        println!("compressor back on after event {} ({why:?})", d.event);
    }

    /// The compressor runs about a quarter of the time, so after being held off it runs flat out for about a
    /// third of the time it was held off to make the cold back.
    fn payback(&self, d: &Deferral, end_unix_ms: i64) -> Option<Payback> {
        let held_ms = end_unix_ms - d.start_unix_ms;
        (held_ms > 0).then(|| Payback {
            power_w: 135,
            from_unix_ms: end_unix_ms,
            to_unix_ms: end_unix_ms + held_ms / 3,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let key = args.next().ok_or_else(|| anyhow::anyhow!("usage: fridge <engine-url> <public-key-hex> [device-id]"))?;
    let device: u64 = args.next().as_deref().unwrap_or("42").parse()?;
    let mut trusted = TrustedKeys::new();
    trusted.add_hex(&key)?;
    let mut link = LinkBuilder::new(LinkConfig {
        endpoint,
        name: format!("fridge-{device}"),
        trusted,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(30),
        clock: Arc::new(SystemClock),
        seed: device,
    })
    .device(ApplianceId(device), DevicePolicy::default(), 0, Arc::new(Fridge))
    .spawn();
    link.wait_connected().await;
    println!("connected; waiting for commands (Ctrl-C to stop)");
    tokio::signal::ctrl_c().await?;
    link.shutdown().await;
    Ok(())
}
