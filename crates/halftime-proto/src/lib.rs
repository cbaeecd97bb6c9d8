//! The `halftime.v1` protobuf API: generated messages and tonic services, and the conversions between them
//! and the domain core. The only crate that knows protobuf.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("halftime.v1");
}

/// Encoded file descriptor set of `halftime.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/halftime_v1_descriptor.bin"));

/// Most reports a device link puts in one uplink `ReportBatch`; the server hands the engine at most this many
/// at a time.
pub const REPORT_BATCH_MAX: usize = 10_000;

use halftime_core::{
    ApplianceClass, ApplianceId, CommandKind, DeferralCommand, DeviceReport, DeviceStatus, EventId, EventProgress,
    EventState, FieldError, Limits, PlanSummary, Priority, QuietWindow, RejectReason, SignedCommand,
};

pub fn class_from_pb(v: i32, field: &str) -> Result<ApplianceClass, FieldError> {
    use pb::ApplianceClass as P;
    Ok(match P::try_from(v) {
        Ok(P::Fridge) => ApplianceClass::Fridge,
        Ok(P::Freezer) => ApplianceClass::Freezer,
        Ok(P::HeatPump) => ApplianceClass::HeatPump,
        Ok(P::WaterHeater) => ApplianceClass::WaterHeater,
        Ok(P::WashingMachine) => ApplianceClass::WashingMachine,
        Ok(P::Dishwasher) => ApplianceClass::Dishwasher,
        Ok(P::TumbleDryer) => ApplianceClass::TumbleDryer,
        Ok(P::EvCharger) => ApplianceClass::EvCharger,
        Ok(P::Unspecified) => return Err(FieldError::new(field, "must be set")),
        Err(_) => {
            return Err(FieldError::new(field, format!("unknown appliance class {v}")));
        }
    })
}

pub fn class_to_pb(c: ApplianceClass) -> pb::ApplianceClass {
    use pb::ApplianceClass as P;
    match c {
        ApplianceClass::Fridge => P::Fridge,
        ApplianceClass::Freezer => P::Freezer,
        ApplianceClass::HeatPump => P::HeatPump,
        ApplianceClass::WaterHeater => P::WaterHeater,
        ApplianceClass::WashingMachine => P::WashingMachine,
        ApplianceClass::Dishwasher => P::Dishwasher,
        ApplianceClass::TumbleDryer => P::TumbleDryer,
        ApplianceClass::EvCharger => P::EvCharger,
    }
}

pub fn priority_from_pb(v: i32, field: &str) -> Result<Priority, FieldError> {
    match pb::Priority::try_from(v) {
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Ok(pb::Priority::Emergency) => Ok(Priority::Emergency),
        Err(_) => Err(FieldError::new(field, format!("unknown priority {v}"))),
    }
}

pub fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
        Priority::Emergency => pb::Priority::Emergency,
    }
}

pub fn state_to_pb(s: EventState) -> pb::EventState {
    match s {
        EventState::Scheduled => pb::EventState::Scheduled,
        EventState::Active => pb::EventState::Active,
        EventState::Completed => pb::EventState::Completed,
        EventState::Cancelled => pb::EventState::Cancelled,
    }
}

pub fn status_to_pb(s: DeviceStatus) -> pb::DeviceStatus {
    use pb::DeviceStatus as P;
    match s {
        DeviceStatus::Dispatched => P::Dispatched,
        DeviceStatus::Received => P::Received,
        DeviceStatus::Started => P::Started,
        DeviceStatus::Completed => P::Completed,
        DeviceStatus::Overridden => P::Overridden,
        DeviceStatus::Rejected => P::Rejected,
        DeviceStatus::Released => P::Released,
        DeviceStatus::Expired => P::Expired,
    }
}

pub fn status_from_pb(v: i32, field: &str) -> Result<DeviceStatus, FieldError> {
    use pb::DeviceStatus as P;
    Ok(match P::try_from(v) {
        Ok(P::Received) => DeviceStatus::Received,
        Ok(P::Started) => DeviceStatus::Started,
        Ok(P::Completed) => DeviceStatus::Completed,
        Ok(P::Overridden) => DeviceStatus::Overridden,
        Ok(P::Rejected) => DeviceStatus::Rejected,
        Ok(P::Released) => DeviceStatus::Released,
        // Dispatched and Expired are the engine's own; a device may not claim them.
        Ok(P::Unspecified | P::Dispatched | P::Expired) => {
            return Err(FieldError::new(field, "must be a device status (RECEIVED..RELEASED)"));
        }
        Err(_) => return Err(FieldError::new(field, format!("unknown status {v}"))),
    })
}

pub fn reject_to_pb(r: RejectReason) -> pb::RejectReason {
    use pb::RejectReason as P;
    match r {
        RejectReason::BadSignature => P::BadSignature,
        RejectReason::UnknownKey => P::UnknownKey,
        RejectReason::Expired => P::Expired,
        RejectReason::Replayed => P::Replayed,
        RejectReason::ExceedsLocalCap => P::ExceedsLocalCap,
        RejectReason::DailyCapReached => P::DailyCapReached,
        RejectReason::Malformed => P::Malformed,
        RejectReason::ApplianceRefused => P::ApplianceRefused,
    }
}

pub fn reject_from_pb(v: i32) -> Option<RejectReason> {
    use pb::RejectReason as P;
    match P::try_from(v).ok()? {
        P::Unspecified => None,
        P::BadSignature => Some(RejectReason::BadSignature),
        P::UnknownKey => Some(RejectReason::UnknownKey),
        P::Expired => Some(RejectReason::Expired),
        P::Replayed => Some(RejectReason::Replayed),
        P::ExceedsLocalCap => Some(RejectReason::ExceedsLocalCap),
        P::DailyCapReached => Some(RejectReason::DailyCapReached),
        P::Malformed => Some(RejectReason::Malformed),
        P::ApplianceRefused => Some(RejectReason::ApplianceRefused),
    }
}

/// An appliance as the Household API's `EnrolAppliances` takes it; `region` is its region's code.
pub fn appliance_to_pb(a: &halftime_core::Appliance, region: &str) -> pb::Appliance {
    pb::Appliance {
        appliance_id: a.id.0,
        household_id: a.household.0,
        region: region.to_string(),
        class: class_to_pb(a.class) as i32,
        rated_power_w: a.rated_power_w,
        duty_cycle_permille: u32::from(a.duty_cycle_permille),
        deferral_min_max: u32::from(a.deferral_min_max),
        override_rate_permille: u32::from(a.override_rate_permille),
    }
}

pub fn command_to_pb(c: &SignedCommand) -> pb::SignedCommand {
    let k = &c.command;
    pb::SignedCommand {
        kind: match k.kind {
            CommandKind::Defer => pb::CommandKind::Defer,
            CommandKind::Release => pb::CommandKind::Release,
        } as i32,
        key_id: k.key_id,
        device_id: k.device.0,
        event_id: k.event.0,
        counter: k.counter,
        not_before_unix_ms: k.not_before_unix_ms,
        not_after_unix_ms: k.not_after_unix_ms,
        deferral_s: k.deferral_s,
        randomize_start_s: k.randomize_start_s,
        signature: c.signature.to_vec(),
    }
}

/// A command off the wire. Only its shape is checked here; the signature is the device's to verify.
pub fn command_from_pb(c: &pb::SignedCommand) -> Result<SignedCommand, FieldError> {
    let kind = match pb::CommandKind::try_from(c.kind) {
        Ok(pb::CommandKind::Defer) => CommandKind::Defer,
        Ok(pb::CommandKind::Release) => CommandKind::Release,
        _ => {
            return Err(FieldError::new("kind", format!("unknown command kind {}", c.kind)));
        }
    };
    let signature: [u8; 64] =
        c.signature.as_slice().try_into().map_err(|_| FieldError::new("signature", "must be 64 bytes"))?;
    Ok(SignedCommand {
        command: DeferralCommand {
            kind,
            key_id: c.key_id,
            device: ApplianceId(c.device_id),
            event: EventId(c.event_id),
            counter: c.counter,
            not_before_unix_ms: c.not_before_unix_ms,
            not_after_unix_ms: c.not_after_unix_ms,
            deferral_s: c.deferral_s,
            randomize_start_s: c.randomize_start_s,
        },
        signature,
    })
}

pub fn limits_to_pb(l: &Limits) -> pb::Limits {
    pb::Limits {
        events_per_day_max: l.events_per_day_max,
        deferred_min_per_day_max: l.deferred_min_per_day_max,
        deferral_min_max: l.deferral_min_max,
        rest_min_min: l.rest_min_min,
        quiet_windows: l
            .quiet_windows
            .iter()
            .map(|w| pb::QuietWindow { start_min: u32::from(w.start_min), end_min: u32::from(w.end_min) })
            .collect(),
        never: l.never,
        paused: l.paused,
    }
}

pub fn limits_from_pb(l: &pb::Limits, prefix: &str) -> Result<Limits, FieldError> {
    let mut quiet_windows = Vec::with_capacity(l.quiet_windows.len().min(8));
    if l.quiet_windows.len() > halftime_core::limits::N_QUIET_WINDOWS_MAX {
        return Err(FieldError::new(format!("{prefix}.quiet_windows"), "at most 4 windows"));
    }
    for (i, w) in l.quiet_windows.iter().enumerate() {
        let start_min = u16::try_from(w.start_min)
            .map_err(|_| FieldError::new(format!("{prefix}.quiet_windows[{i}].start_min"), "must be 0..=1439"))?;
        let end_min = u16::try_from(w.end_min)
            .map_err(|_| FieldError::new(format!("{prefix}.quiet_windows[{i}].end_min"), "must be 0..=1440"))?;
        quiet_windows.push(QuietWindow { start_min, end_min });
    }
    let limits = Limits {
        events_per_day_max: l.events_per_day_max,
        deferred_min_per_day_max: l.deferred_min_per_day_max,
        deferral_min_max: l.deferral_min_max,
        rest_min_min: l.rest_min_min,
        quiet_windows,
        never: l.never,
        paused: l.paused,
    };
    halftime_core::validate::limits(&limits, prefix)?;
    Ok(limits)
}

fn kw(w: &[f64]) -> Vec<f64> {
    w.iter().map(|x| x / 1e3).collect()
}

pub fn plan_to_pb(p: &PlanSummary) -> pb::PlanSummary {
    pb::PlanSummary {
        start_unix_ms: p.start_unix_ms,
        target_kw: kw(&p.target_w),
        expected_kw: kw(&p.expected_w),
        shortfall_kw: kw(&p.shortfall_w),
        rebound_kw: kw(&p.rebound_w),
        n_appliances: p.n_appliances,
        n_households: p.n_households,
        n_cohorts: p.n_cohorts,
        lp_solve_us: p.lp_solve_us,
        plan_ready_us: p.plan_ready_us,
        queued_us: p.queued_us,
        realised_ratio: p.realised_ratio,
    }
}

pub fn progress_to_pb(p: &EventProgress) -> pb::EventProgress {
    pb::EventProgress {
        event_id: p.event.0,
        state: state_to_pb(p.state) as i32,
        dispatched: p.counts.dispatched,
        acknowledged: p.counts.acknowledged,
        started: p.counts.started,
        completed: p.counts.completed,
        overridden: p.counts.overridden,
        rejected: p.counts.rejected,
        expired: p.counts.expired,
        start_unix_ms: p.start_unix_ms,
        target_kw: kw(&p.target_w),
        expected_kw: kw(&p.expected_w),
        delivered_kw: kw(&p.delivered_w),
        n_households: p.n_households,
        rebound_kw: kw(&p.rebound_w),
        rebound_line_kw: p.rebound_line_w.map_or(0.0, |w| w / 1e3),
        top_ups: p.n_top_ups,
        tail_top_ups: p.n_tail_top_ups,
        guard_released: p.n_guard_released,
        closed: p.closed,
    }
}

pub fn report_to_pb(r: &DeviceReport) -> pb::StatusReport {
    pb::StatusReport {
        device_id: r.device.0,
        event_id: r.event.0,
        counter: r.counter,
        status: status_to_pb(r.status) as i32,
        reject_reason: r.reject_reason.map_or(pb::RejectReason::Unspecified, reject_to_pb) as i32,
        at_unix_ms: r.at_unix_ms,
        reduction_w: r.reduction_w,
        payback_w: r.payback.map_or(0, |p| p.power_w),
        payback_from_unix_ms: r.payback.map_or(0, |p| p.from_unix_ms),
        payback_to_unix_ms: r.payback.map_or(0, |p| p.to_unix_ms),
    }
}

/// A device report; an invalid payback forecast is dropped and returned beside it, since the status it came
/// with (an override, say) must not be lost.
pub fn report_from_pb(
    r: &pb::StatusReport,
    prefix: impl Fn() -> String,
) -> Result<(DeviceReport, Option<FieldError>), FieldError> {
    // The field's full name (`reports[i].status`) is built only for a report that fails: a gateway's batch holds
    // thousands, nearly all valid.
    let named = |e: FieldError| FieldError { field: format!("{}.{}", prefix(), e.field), ..e };
    let (payback, payback_error) =
        match halftime_core::validate::payback(r.payback_w, r.payback_from_unix_ms, r.payback_to_unix_ms) {
            Ok(p) => (p, None),
            Err(e) => (None, Some(named(e))),
        };
    let report = DeviceReport {
        device: halftime_core::validate::appliance_id(r.device_id, "device_id").map_err(named)?,
        event: EventId(r.event_id),
        counter: r.counter,
        status: status_from_pb(r.status, "status").map_err(named)?,
        reject_reason: reject_from_pb(r.reject_reason),
        at_unix_ms: r.at_unix_ms,
        reduction_w: r.reduction_w,
        payback,
    };
    Ok((report, payback_error))
}

/// `INVALID_ARGUMENT` naming the field.
pub fn invalid(e: &FieldError) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::{ApplianceId, DeviceStatus, Payback};

    fn started(payback: Option<Payback>) -> DeviceReport {
        DeviceReport {
            device: ApplianceId(0x42),
            event: EventId(7),
            counter: 9,
            status: DeviceStatus::Started,
            reject_reason: None,
            at_unix_ms: 1_000,
            reduction_w: 7_000,
            payback,
        }
    }

    #[test]
    fn a_report_keeps_its_payback_and_a_bad_payback_loses_only_itself() {
        let payback = Some(Payback { power_w: 7_000, from_unix_ms: 60_000, to_unix_ms: 120_000 });
        for r in [started(None), started(payback)] {
            assert_eq!(report_from_pb(&report_to_pb(&r), || "reports[0]".into()).unwrap(), (r, None));
        }
        let mut bad = report_to_pb(&started(payback));
        bad.payback_to_unix_ms = bad.payback_from_unix_ms;
        let (kept, error) = report_from_pb(&bad, || "reports[3]".into()).unwrap();
        assert_eq!(kept, started(None));
        assert_eq!(error.unwrap().field, "reports[3].payback_to_unix_ms");
    }

    #[test]
    fn a_report_that_fails_names_its_field_by_index() {
        let mut no_device = report_to_pb(&started(None));
        no_device.device_id = 0;
        assert_eq!(report_from_pb(&no_device, || "reports[5]".into()).unwrap_err().field, "reports[5].device_id");
        let mut no_status = report_to_pb(&started(None));
        no_status.status = 999;
        assert_eq!(report_from_pb(&no_status, || "reports[6]".into()).unwrap_err().field, "reports[6].status");
    }
}
