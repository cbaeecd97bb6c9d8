//! Stress events, plan summaries and progress.

use crate::ids::EventId;
use crate::region::RegionId;
use serde::{Deserialize, Serialize};

/// Priority, after the Zigbee Smart Energy DRLC criticality levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Priority {
    Normal,
    High,
    Emergency,
}

/// A validated stress event request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StressEventSpec {
    /// Sorted, unique.
    pub regions: Vec<RegionId>,
    /// Start of slot 0.
    pub start_unix_ms: i64,
    /// Reduction wanted per one-minute slot, W.
    pub target_w: Vec<f64>,
    pub deferral_min_max: u32,
    pub priority: Priority,
    pub idempotency_key: String,
}

impl StressEventSpec {
    pub fn end_unix_ms(&self) -> i64 {
        self.start_unix_ms + self.target_w.len() as i64 * crate::time::MS_PER_MIN
    }

    pub fn target_peak_w(&self) -> f64 {
        self.target_w.iter().copied().fold(0.0, f64::max)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventState {
    Scheduled,
    Active,
    Completed,
    Cancelled,
}

/// What the planner expects to deliver, as recorded and returned for an event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub start_unix_ms: i64,
    pub target_w: Vec<f64>,
    pub expected_w: Vec<f64>,
    pub shortfall_w: Vec<f64>,
    pub rebound_w: Vec<f64>,
    pub n_appliances: u64,
    pub n_households: u64,
    pub n_cohorts: u32,
    pub lp_solve_us: u64,
    /// From the submit request's arrival to the plan solved and its appliances picked, µs.
    pub plan_ready_us: u64,
    /// From the submit request's arrival to every command signed, durable and queued, µs.
    pub queued_us: u64,
    /// What the devices that have started reported shedding, as a share of what the plan expected of them. 0
    /// until the first have started.
    pub realised_ratio: f64,
}

/// How many of an event's devices reached each stage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressCounts {
    pub dispatched: u64,
    pub acknowledged: u64,
    pub started: u64,
    pub completed: u64,
    pub overridden: u64,
    pub rejected: u64,
    pub expired: u64,
}

/// Live progress of an event, as `WatchEvent` streams it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventProgress {
    pub event: EventId,
    pub state: EventState,
    pub counts: ProgressCounts,
    pub start_unix_ms: i64,
    pub target_w: Vec<f64>,
    pub expected_w: Vec<f64>,
    pub delivered_w: Vec<f64>,
    pub n_households: u64,
    /// Projected net load above baseline per minute from the window's end, W: what the event's devices said they
    /// will pay back, less shed still under way, with their class's average for those that have not said. The
    /// rebound guard holds it under `rebound_line_w`. Minutes already past show what the devices reported.
    pub rebound_w: Vec<f64>,
    /// The line the rebound guard holds `rebound_w` under, W; `None` while it is not guarding.
    pub rebound_line_w: Option<f64>,
    /// What the engine has done on its own since the plan: top-ups planned in the window (devices reporting less
    /// than planned) and after it (a rebound to come over the line), and deferrals the rebound guard released.
    pub n_top_ups: u32,
    pub n_tail_top_ups: u32,
    pub n_guard_released: u64,
    /// The event's last deferral has expired: nothing more will change.
    pub closed: bool,
}

/// An accepted event as the store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: EventId,
    pub spec: StressEventSpec,
    pub state: EventState,
    pub plan: PlanSummary,
    pub accepted_unix_ms: i64,
}
