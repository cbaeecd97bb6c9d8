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
