//! Halftime's pure domain core.
//!
//! Ids, units, appliance classes, household limits, stress events, commands and their canonical encoding,
//! and the validation every request passes through. Nothing here does I/O or reads a clock: time is passed in
//! as milliseconds since the Unix epoch (`*_unix_ms`). Every other crate builds on these types.

pub mod appliance;
pub mod command;
pub mod event;
pub mod ids;
pub mod limits;
pub mod physics;
pub mod region;
pub mod report;
pub mod time;
pub mod validate;

pub use appliance::{Appliance, ApplianceClass, ClassProfile};
pub use command::{CommandKind, DeferralCommand, SignedCommand};
pub use event::{EventProgress, EventRecord, EventState, PlanSummary, Priority, ProgressCounts, StressEventSpec};
pub use ids::{ApplianceId, EventId, HouseholdId};
pub use limits::{Limits, QuietWindow, Reservation, ReservationCheck, Violation, audit};
pub use region::{RegionId, RegionSet};
pub use report::{DeviceReport, DeviceStatus, Outcome, Payback, RejectReason};
pub use validate::FieldError;
