//! # Halftime client SDK
//!
//! For appliance makers: embed this in an appliance, or in an appliance cloud or gateway that speaks for many
//! appliances, to take part in Halftime demand response.
//!
//! What it does for you:
//! - keeps a `DeviceLink` stream to the engine, reconnecting with jittered exponential backoff, and resyncs
//!   active commands after a reconnect;
//! - verifies every command: Ed25519 signature over the canonical bytes, key id against the keys you
//!   provisioned, expiry, and a per-device replay counter;
//! - enforces your device's own caps (longest deferral, total per day) whatever the engine asks;
//! - applies a deferral through your [`Appliance`] implementation with a random start offset, ends it on time
//!   (and by its expiry even if the engine is never heard from again), and lets the household override at
//!   any moment ([`LinkHandle::override_now`]);
//! - reports received, started (with the load shed), completed, overridden, released and rejected-with-reason.
//!
//! ```no_run
//! use halftime_client::{Appliance, Deferral, DevicePolicy, LinkBuilder, LinkConfig, ResumeReason, clock::SystemClock};
//! use halftime_core::ApplianceId;
//! use std::sync::Arc;
//!
//! struct Fridge;
//! impl Appliance for Fridge {
//!     fn defer(&self, _d: &Deferral) -> Result<u32, String> {
//!         // Hold the compressor off; report what was shed.
//!         Ok(135)
//!     }
//!     fn resume(&self, _d: &Deferral, _why: ResumeReason) {}
//! }
//!
//! # async fn run(trusted: halftime_signer::TrustedKeys) {
//! let link = LinkBuilder::new(LinkConfig {
//!     endpoint: "http://127.0.0.1:50051".into(),
//!     name: "fridge-0042".into(),
//!     trusted,
//!     backoff_min: std::time::Duration::from_millis(200),
//!     backoff_max: std::time::Duration::from_secs(30),
//!     clock: Arc::new(SystemClock),
//!     seed: 42,
//! })
//! .device(ApplianceId(0x0042), DevicePolicy::default(), 0, Arc::new(Fridge))
//! .spawn();
//! // Later, when the household presses "resume now":
//! link.override_now(ApplianceId(0x0042)).await;
//! # }
//! ```
//!
//! See `examples/fridge.rs` for a runnable appliance.

pub mod clock;
pub mod guard;
mod link;

pub use guard::{DeviceGuard, DevicePolicy, Verdict};
pub use link::{DEVICES_PER_LINK_MAX, LinkBuilder, LinkConfig, LinkHandle, PENDING_REPORTS_MAX};

use halftime_core::EventId;

/// A deferral the device is asked to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferral {
    pub event: EventId,
    pub counter: u64,
    pub start_unix_ms: i64,
    /// The appliance resumes by this time at the latest.
    pub end_unix_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeReason {
    Completed,
    Released,
    Overridden,
}

/// What the appliance maker implements. Calls are short and must not block for long: they run on the link's
/// task.
pub trait Appliance: Send + Sync + 'static {
    /// Start deferring now (pause the compressor, delay the cycle). Returns the load shed in W (0 if the
    /// appliance was idle), or refuses with a reason if its own safety logic says no.
    fn defer(&self, deferral: &Deferral) -> Result<u32, String>;
    /// Resume normal operation.
    fn resume(&self, deferral: &Deferral, why: ResumeReason);
    /// What the appliance expects to draw above its normal use once `deferral` ends at `end_unix_ms`, paying back
    /// what it shed (a compressor running longer, the rest of a cycle or charging session running late). Asked
    /// when the deferral starts (for its planned end) and when it ends; sent with those reports. The engine uses
    /// it to keep an event's rebound under its cap, releasing a deferral early where the sum would go over.
    /// `None` (the default) if the appliance cannot say: the engine then counts on its class's average.
    fn payback(&self, deferral: &Deferral, end_unix_ms: i64) -> Option<halftime_core::Payback> {
        let _ = (deferral, end_unix_ms);
        None
    }
}
