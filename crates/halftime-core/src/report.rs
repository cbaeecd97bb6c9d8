//! What devices report back.

use crate::ids::{ApplianceId, EventId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceStatus {
    /// Reserved and signed; not yet acknowledged (engine side only).
    Dispatched,
    Received,
    Started,
    Completed,
    Overridden,
    Rejected,
    Released,
    /// Expired without acknowledgement (engine side only).
    Expired,
}

impl DeviceStatus {
    pub const ALL: [DeviceStatus; 8] = [
        DeviceStatus::Dispatched,
        DeviceStatus::Received,
        DeviceStatus::Started,
        DeviceStatus::Completed,
        DeviceStatus::Overridden,
        DeviceStatus::Rejected,
        DeviceStatus::Released,
        DeviceStatus::Expired,
    ];

    /// Lower-case name, e.g. for a metric label (a bounded set).
    pub fn name(self) -> &'static str {
        match self {
            DeviceStatus::Dispatched => "dispatched",
            DeviceStatus::Received => "received",
            DeviceStatus::Started => "started",
            DeviceStatus::Completed => "completed",
            DeviceStatus::Overridden => "overridden",
            DeviceStatus::Rejected => "rejected",
            DeviceStatus::Released => "released",
            DeviceStatus::Expired => "expired",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// Counts per status, in the order of [`Self::ALL`].
    pub fn tally(statuses: impl IntoIterator<Item = DeviceStatus>) -> [u64; 8] {
        let mut n = [0u64; 8];
        for s in statuses {
            n[s.index()] += 1;
        }
        n
    }

    /// Whether no further report is expected for this command.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeviceStatus::Completed
                | DeviceStatus::Overridden
                | DeviceStatus::Rejected
                | DeviceStatus::Released
                | DeviceStatus::Expired
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    #[error("bad signature")]
    BadSignature,
    #[error("unknown key id")]
    UnknownKey,
    #[error("expired")]
    Expired,
    #[error("replayed counter")]
    Replayed,
    #[error("longer than the device's own longest deferral")]
    ExceedsLocalCap,
    #[error("device's own daily deferral total reached")]
    DailyCapReached,
    #[error("malformed or misaddressed")]
    Malformed,
    #[error("appliance refused")]
    ApplianceRefused,
}

/// A device's report about one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub device: ApplianceId,
    pub event: EventId,
    pub counter: u64,
    pub status: DeviceStatus,
    pub reject_reason: Option<RejectReason>,
    pub at_unix_ms: i64,
    /// Load shed, for `Started`.
    pub reduction_w: u32,
    /// What the appliance expects to draw above its normal use after the deferral, paying back what it shed:
    /// for `Started`, released at the planned end; for `Completed`, `Released` and `Overridden`, at the real end.
    /// `None` if it cannot say.
    pub payback: Option<Payback>,
}

/// Extra draw after a deferral: `power_w` on average over `[from_unix_ms, to_unix_ms)`. An envelope: a
/// thermostat pays back flat out in what would have been its off-time, a paused cycle or charging session runs
/// its rest late, as one stretch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payback {
    pub power_w: u32,
    pub from_unix_ms: i64,
    pub to_unix_ms: i64,
}

impl Payback {
    /// Longest payback a device may report: a day (an EV session paused near its start runs hours late).
    pub const SPAN_MS_MAX: i64 = 24 * 3_600_000;

    /// Energy, Wh.
    pub fn energy_wh(&self) -> f64 {
        f64::from(self.power_w) * (self.to_unix_ms - self.from_unix_ms).max(0) as f64 / 3_600_000.0
    }
}

/// A status change recorded by the engine for one command (from a device report, an override, a release or
/// an expiry), as the store keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub event: EventId,
    pub appliance: ApplianceId,
    pub household: crate::ids::HouseholdId,
    pub status: DeviceStatus,
    pub at_unix_ms: i64,
    /// Load shed, for `Started`.
    pub reduction_w: u32,
}
