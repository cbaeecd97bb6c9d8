//! Live state of one event: every dispatched device's command and status, the counts `WatchEvent` streams,
//! and the delivered reduction, recomputed from device reports.

use halftime_core::appliance::N_CLASSES;
use halftime_core::time::{MS_PER_MIN, slot_of};
use halftime_core::{
    ApplianceClass, ApplianceId, DeferralCommand, DeviceStatus, EventProgress, EventRecord, EventState, HouseholdId,
    ProgressCounts,
};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio::sync::watch;

/// How long after its last command's end an event waits for device reports still in flight before its
/// progress is final.
const REPORT_GRACE_MS: i64 = 60_000;

#[derive(Clone, Debug)]
pub struct DeviceTrack {
    pub household: HouseholdId,
    pub command: DeferralCommand,
    pub status: DeviceStatus,
    pub acked: bool,
    pub started_unix_ms: Option<i64>,
    pub reduction_w: u32,
    /// What the plan expects the device to report shedding when it starts (an average over its window), W.
    pub expected_w: f64,
    /// When the deferral was ended early (override, release, rejection), if it was.
    pub ended_unix_ms: Option<i64>,
}

impl DeviceTrack {
    /// The interval over which this device shed load, if it started.
    fn shed_interval(&self) -> Option<(i64, i64)> {
        let start = self.started_unix_ms?;
        let mut end = (start + i64::from(self.command.deferral_s) * 1000).min(self.command.not_after_unix_ms);
        if let Some(e) = self.ended_unix_ms {
            end = end.min(e);
        }
        (end > start).then_some((start, end))
    }
}

/// What a status change means for the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// No such device in this event.
    Unknown,
    /// Nothing changes.
    Ignored,
    /// Record the new status.
    Status,
    /// End the reservation early at this time, with the new status.
    EndEarly(i64),
}

/// What a device is expected to report shedding when it starts: its expected reduction times the mean of its
/// class's response over the deferral (an EV's session may end within it). Cached per class and length.
#[derive(Debug, Default)]
struct ExpectedReport(HashMap<(ApplianceClass, u32), f64>);

impl ExpectedReport {
    fn w(&mut self, class: ApplianceClass, reduction_w: f64, deferral_s: u32) -> f64 {
        let minutes = (deferral_s / 60).max(1);
        let share = *self.0.entry((class, minutes)).or_insert_with(|| {
            let shed = halftime_core::physics::expected_response(class, minutes).shed;
            shed.iter().sum::<f64>() / shed.len().max(1) as f64
        });
        reduction_w * share
    }
}

/// What the devices of an event that have started reported they shed, against what the plan expected of them,
/// kept up to date as their reports arrive. A rejection counts as nothing shed over the window it was given;
/// devices that have not said yet count as planned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Realised {
    /// Devices that have said whether they started, and how many of them refused.
    pub n_known: u64,
    pub n_rejected: u64,
    /// Over those devices: what the plan expected them to shed, and what they reported, W.
    pub expected_w: f64,
    pub reported_w: f64,
    /// Per slot of the event, what they reported less what was expected of them over their windows, W.
    pub deviation_w: Vec<f64>,
}

impl Realised {
    /// Adds a device's start (or refusal) over its window from `from_unix_ms`, in the slots of an event that
    /// starts at `slot0_unix_ms` and has `n_slots`.
    fn note(
        &mut self,
        slot0_unix_ms: i64,
        n_slots: usize,
        from_unix_ms: i64,
        deferral_s: u32,
        reported_w: f64,
        expected_w: f64,
    ) {
        self.deviation_w.resize(n_slots, 0.0);
        self.n_known += 1;
        self.expected_w += expected_w;
        self.reported_w += reported_w;
        let to_unix_ms = from_unix_ms + i64::from(deferral_s) * 1000;
        add_interval(&mut self.deviation_w, slot0_unix_ms, from_unix_ms, to_unix_ms, reported_w - expected_w);
    }
}

#[derive(Debug)]
pub struct RuntimeState {
    pub record: EventRecord,
    pub devices: HashMap<ApplianceId, DeviceTrack>,
    pub counts: ProgressCounts,
    pub households: HashSet<HouseholdId>,
    pub last_not_after_unix_ms: i64,
    pub dirty: bool,
    pub closed: bool,
    pub realised: Realised,
    expected_report: ExpectedReport,
    /// Expected reduction of the devices dispatched, per appliance class, W.
    pub planned_by_class_w: [f64; N_CLASSES],
    /// When the devices' reports were last weighed against the plan, engine time.
    pub weighed_unix_ms: i64,
    /// Top-ups dispatched so far, and whether one is being planned.
    pub n_top_ups: u32,
    pub top_up_in_flight: bool,
}

#[derive(Debug)]
pub struct EventRuntime {
    pub state: Mutex<RuntimeState>,
    pub watch: watch::Sender<EventProgress>,
}

impl EventRuntime {
    pub fn new(record: EventRecord) -> Self {
        let state = RuntimeState {
            last_not_after_unix_ms: record.spec.end_unix_ms(),
            record,
            devices: HashMap::new(),
            counts: ProgressCounts::default(),
            households: HashSet::new(),
            dirty: true,
            closed: false,
            realised: Realised::default(),
            expected_report: ExpectedReport::default(),
            planned_by_class_w: [0.0; N_CLASSES],
            weighed_unix_ms: i64::MIN,
            n_top_ups: 0,
            top_up_in_flight: false,
        };
        let progress = state.progress();
        Self { state: Mutex::new(state), watch: watch::channel(progress).0 }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, RuntimeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes progress if anything changed.
    pub fn publish(&self) {
        let mut s = self.lock();
        if s.dirty {
            s.dirty = false;
            let p = s.progress();
            drop(s);
            self.watch.send_replace(p);
        }
    }
}

impl RuntimeState {
    /// Tracks a device given `command`: an appliance of `class` the plan expects to shed `reduction_w` at a
    /// random moment.
    pub fn add_device(
        &mut self,
        household: HouseholdId,
        command: DeferralCommand,
        class: ApplianceClass,
        reduction_w: f64,
    ) {
        let expected_w = self.expected_report.w(class, reduction_w, command.deferral_s);
        self.last_not_after_unix_ms = self.last_not_after_unix_ms.max(command.not_after_unix_ms);
        self.households.insert(household);
        let track = DeviceTrack {
            household,
            command,
            status: DeviceStatus::Dispatched,
            acked: false,
            started_unix_ms: None,
            reduction_w: 0,
            expected_w,
            ended_unix_ms: None,
        };
        if self.devices.insert(command.device, track).is_none() {
            self.counts.dispatched += 1;
            self.planned_by_class_w[class.index()] += reduction_w;
        }
        self.dirty = true;
    }

    /// Applies a status change for a device of this event, and says what the ledger should do about it.
    pub fn apply(&mut self, device: ApplianceId, status: DeviceStatus, at_unix_ms: i64, reduction_w: u32) -> Applied {
        let Some(track) = self.devices.get_mut(&device) else { return Applied::Unknown };
        let c = &mut self.counts;
        let at = at_unix_ms.clamp(track.command.not_before_unix_ms, track.command.not_after_unix_ms);
        let mut end_early = None;
        if status != DeviceStatus::Expired && !track.acked {
            track.acked = true;
            c.acknowledged += 1;
        }
        if track.status.is_final() {
            // A late report about a command already settled (the device's own report of an engine release,
            // a retry): acknowledged, nothing else changes.
            return Applied::Ignored;
        }
        match status {
            DeviceStatus::Dispatched | DeviceStatus::Received => {}
            DeviceStatus::Started => {
                if track.started_unix_ms.is_none() {
                    track.started_unix_ms = Some(at);
                    track.reduction_w = reduction_w;
                    c.started += 1;
                    let (slot0, n) = (self.record.spec.start_unix_ms, self.record.spec.target_w.len());
                    let (deferral_s, expected_w) = (track.command.deferral_s, track.expected_w);
                    self.realised.note(slot0, n, at, deferral_s, f64::from(reduction_w), expected_w);
                }
            }
            DeviceStatus::Completed => c.completed += 1,
            DeviceStatus::Overridden => {
                c.overridden += 1;
                track.ended_unix_ms = Some(at);
                end_early = Some(at);
            }
            DeviceStatus::Released => {
                track.ended_unix_ms = Some(track.ended_unix_ms.map_or(at, |e| e.min(at)));
                end_early = Some(at);
            }
            DeviceStatus::Rejected => {
                c.rejected += 1;
                track.ended_unix_ms = Some(track.command.not_before_unix_ms);
                end_early = Some(track.command.not_before_unix_ms);
                if track.started_unix_ms.is_none() {
                    let (slot0, n) = (self.record.spec.start_unix_ms, self.record.spec.target_w.len());
                    let (from, deferral_s) = (track.command.not_before_unix_ms, track.command.deferral_s);
                    self.realised.note(slot0, n, from, deferral_s, 0.0, track.expected_w);
                    self.realised.n_rejected += 1;
                }
            }
            DeviceStatus::Expired => {
                if track.acked {
                    return Applied::Ignored;
                }
                c.expired += 1;
            }
        }
        if status != DeviceStatus::Received {
            track.status = status;
        }
        self.dirty = true;
        match end_early {
            Some(at) => Applied::EndEarly(at),
            None => Applied::Status,
        }
    }

    fn delivered_w(&self) -> Vec<f64> {
        let start = self.record.spec.start_unix_ms;
        let n = self.record.spec.target_w.len();
        let mut out = vec![0.0; n];
        for t in self.devices.values() {
            let Some((from, to)) = t.shed_interval() else {
                continue;
            };
            add_interval(&mut out, start, from, to, f64::from(t.reduction_w));
        }
        out
    }

    pub fn progress(&self) -> EventProgress {
        EventProgress {
            event: self.record.id,
            state: self.record.state,
            counts: self.counts.clone(),
            start_unix_ms: self.record.spec.start_unix_ms,
            target_w: self.record.spec.target_w.clone(),
            expected_w: self.record.plan.expected_w.clone(),
            delivered_w: self.delivered_w(),
            n_households: self.households.len() as u64,
            closed: self.closed,
        }
    }

    /// Moves the event through its states; returns whether anything changed.
    pub fn advance(&mut self, now_unix_ms: i64) -> bool {
        let before = (self.record.state, self.closed);
        if self.record.state == EventState::Scheduled && now_unix_ms >= self.record.spec.start_unix_ms {
            self.record.state = EventState::Active;
        }
        if self.record.state == EventState::Active && now_unix_ms >= self.record.spec.end_unix_ms() {
            self.record.state = EventState::Completed;
        }
        // Closed (the progress stream's last message) once every command has ended and every device has said
        // how, or a grace period after the last command's end for reports still in flight.
        if !self.closed
            && self.record.state != EventState::Scheduled
            && now_unix_ms >= self.last_not_after_unix_ms
            && (now_unix_ms >= self.last_not_after_unix_ms + REPORT_GRACE_MS
                || self.devices.values().all(|t| t.status.is_final()))
        {
            self.closed = true;
        }
        let changed = before != (self.record.state, self.closed);
        self.dirty |= changed;
        changed
    }
}

/// Adds `w` to each one-minute slot in proportion to how much of `[from, to)` falls in it.
pub fn add_interval(slots: &mut [f64], slot0_unix_ms: i64, from: i64, to: i64, w: f64) {
    if to <= from || slots.is_empty() {
        return;
    }
    let first = slot_of(slot0_unix_ms, from).max(0);
    let last = slot_of(slot0_unix_ms, to - 1).min(slots.len() as i64 - 1);
    for s in first..=last {
        let a = slot0_unix_ms + s * MS_PER_MIN;
        let overlap = (to.min(a + MS_PER_MIN) - from.max(a)).max(0);
        slots[s as usize] += w * overlap as f64 / MS_PER_MIN as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::{CommandKind, EventId, Priority, StressEventSpec};

    /// Two devices with 5-minute deferrals: one starts and reports half what was expected of it, one refuses.
    /// What the event realised counts both, slot by slot, and a report repeated changes nothing.
    #[test]
    fn realised_follows_starts_and_refusals_as_they_are_reported() {
        let start = 60 * MS_PER_MIN;
        let spec = StressEventSpec {
            regions: vec![],
            start_unix_ms: start,
            target_w: vec![1_000.0; 10],
            deferral_min_max: 5,
            priority: Priority::High,
            idempotency_key: "k".into(),
        };
        let record = EventRecord {
            id: EventId(1),
            spec,
            state: EventState::Active,
            plan: Default::default(),
            accepted_unix_ms: 0,
        };
        let mut st = EventRuntime::new(record).state.into_inner().unwrap();
        let command = |device: u64| DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 0,
            device: ApplianceId(device),
            event: EventId(1),
            counter: device,
            not_before_unix_ms: start,
            not_after_unix_ms: start + 5 * MS_PER_MIN,
            deferral_s: 300,
            randomize_start_s: 0,
        };
        // Fridges, whose mean response over any window is what they shed at a random moment.
        st.add_device(HouseholdId(1), command(1), ApplianceClass::Fridge, 400.0);
        st.add_device(HouseholdId(2), command(2), ApplianceClass::Fridge, 600.0);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 200);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 200);
        st.apply(ApplianceId(2), DeviceStatus::Rejected, start, 0);
        let r = &st.realised;
        assert_eq!((r.n_known, r.n_rejected), (2, 1));
        assert!((r.expected_w - 1_000.0).abs() < 1e-6 && r.reported_w == 200.0, "{r:?}");
        let want = [vec![-800.0; 5], vec![0.0; 5]].concat();
        assert!(r.deviation_w.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", r.deviation_w);
    }

    #[test]
    fn intervals_spread_over_slots_by_overlap() {
        let mut v = vec![0.0; 3];
        add_interval(&mut v, 0, 30_000, 150_000, 60.0);
        assert_eq!(v, vec![30.0, 60.0, 30.0]);
        let mut w = vec![0.0; 2];
        add_interval(&mut w, 0, -60_000, 500_000, 10.0);
        assert_eq!(w, vec![10.0, 10.0]);
    }
}
