//! Live state of one event: every dispatched device's command and status, the counts `WatchEvent` streams,
//! and the delivered reduction, recomputed from device reports.

use crate::rebound::{ReboundGuard, TAIL_SLOTS};
use halftime_core::Payback;
use halftime_core::appliance::{N_CLASSES, Timing};
use halftime_core::physics::{Response, expected_response, expected_response_overridden};
use halftime_core::time::{MS_PER_MIN, slot_of};
use halftime_core::{
    ApplianceClass, ApplianceId, DeferralCommand, DeviceStatus, EventProgress, EventRecord, EventState, HouseholdId,
    ProgressCounts,
};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio::sync::watch;

/// Devices the rebound guard holds queued for release, at most: the release of a batch empties the queue.
const GUARD_RELEASES_QUEUED_MAX: usize = 10_000;
/// Candidates the guard weighs per release it may make in a minute: after the window, most releases would only
/// move payback into a minute with no room for it.
const GUARD_TRIES_PER_MINUTE_FACTOR: usize = 4;
/// A release's effect on a minute smaller than this is rounding (its contribution taken out and put back), W.
const DELTA_TOLERANCE_W: f64 = 1e-6;

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
    pub class: ApplianceClass,
    /// The appliance's expected reduction when deferred at a random moment, W.
    pub planned_w: f64,
    /// What the device said it will pay back, latest first.
    pub payback: Option<Payback>,
    /// Chance that the household overrides this deferral (`core::physics::override_chance`).
    pub override_chance: f64,
    /// The appliance's rated draw, W (0 if unknown).
    pub power_w: u32,
    /// Released by the engine, and the device has not yet said when it resumed: the ledger charges the deferral
    /// in full until it does.
    pub resume_unconfirmed: bool,
    /// Queued for release by the rebound guard at this time: the projection counts it as released from then on,
    /// so a burst of reports queues only as many as the cap needs.
    pub guard_released_at: Option<i64>,
}

impl DeviceTrack {
    /// The appliance's rated draw, W: what it reported, or what its expected reduction comes to at its class's
    /// duty cycle.
    pub fn rated_w(&self) -> f64 {
        if self.power_w > 0 {
            return f64::from(self.power_w);
        }
        let duty = f64::from(self.class.profile().duty_cycle_permille) / 1000.0;
        self.planned_w / duty.max(1e-3)
    }

    /// The engine's guess at the payback of a deferral ended early at `at`, until the device says. A paused
    /// session that would have ended within the deferral runs, from `at` or from when it would have ended, for as
    /// long as it was paused; otherwise it is what the device said for the planned end, in proportion to the part
    /// of the window it deferred (a session runs late by as long as it was paused; a compressor makes back what it
    /// shed), from where that payback began.
    pub fn payback_if_ended_at(&self, at: i64) -> Option<Payback> {
        let (p, start) = (self.payback?, self.started_unix_ms?);
        if let Some(session_end) = self.session_end_unix_ms() {
            let (from_unix_ms, to_unix_ms) = (at.max(session_end), at + (session_end - start));
            return (to_unix_ms > from_unix_ms).then_some(Payback { from_unix_ms, to_unix_ms, ..p });
        }
        let planned_ms = i64::from(self.command.deferral_s) * 1000;
        if planned_ms <= 0 {
            return None;
        }
        let share = ((at - start) as f64 / planned_ms as f64).clamp(0.0, 1.0);
        let to_unix_ms = p.from_unix_ms + ((p.to_unix_ms - p.from_unix_ms) as f64 * share) as i64;
        (to_unix_ms > p.from_unix_ms).then_some(Payback { to_unix_ms, ..p })
    }

    /// Whether it has yet to say what it sheds: not started, and not settled without starting.
    pub fn unsaid(&self) -> bool {
        self.started_unix_ms.is_none() && !self.status.is_final()
    }

    /// The interval over which this device was deferred, if it started.
    pub fn deferred_interval(&self) -> Option<(i64, i64)> {
        let start = self.started_unix_ms?;
        let end = self.planned_end_unix_ms(start).min(self.ended_unix_ms.unwrap_or(i64::MAX));
        (end > start).then_some((start, end))
    }

    fn planned_end_unix_ms(&self, start: i64) -> i64 {
        (start + i64::from(self.command.deferral_s) * 1000).min(self.command.not_after_unix_ms)
    }

    /// When a paused cycle or charging session would have ended, if within its deferral. The device reports its
    /// shed as an average over the planned deferral; such a session sheds its full draw until it would have ended
    /// and nothing after (`core::physics`), so less than its full draw says when that is: an EV that reports half
    /// its draw over a twenty-minute deferral had ten minutes of charging left.
    fn session_end_unix_ms(&self) -> Option<i64> {
        let start = self.started_unix_ms?;
        let (reduction_w, power_w) = (f64::from(self.reduction_w), f64::from(self.power_w));
        let session = matches!(self.class.profile().timing, Timing::Cycle { .. });
        if !session || reduction_w <= 0.0 || power_w <= reduction_w {
            return None;
        }
        let planned_ms = (self.planned_end_unix_ms(start) - start) as f64;
        Some(start + (planned_ms * reduction_w / power_w).round() as i64)
    }

    /// When it started, until when it sheds, and at what draw, W: a thermostat sheds about its reported average
    /// throughout, a paused session its full draw until it would have ended.
    pub fn shed(&self) -> Option<(i64, i64, f64)> {
        let (start, end) = self.deferred_interval()?;
        Some(match self.session_end_unix_ms() {
            Some(session_end) => (start, end.min(session_end), f64::from(self.power_w)),
            None => (start, end, f64::from(self.reduction_w)),
        })
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

/// Expected responses of a class to a deferral of a given length, run to the end and overridden at a random
/// moment (`core::physics`), in units of the appliance's expected reduction; computed once per class and length.
#[derive(Debug, Default)]
pub struct ClassResponses(HashMap<(ApplianceClass, u32), (Response, Response)>);

impl ClassResponses {
    pub fn get(&mut self, class: ApplianceClass, minutes: u32) -> &(Response, Response) {
        let minutes = minutes.max(1);
        self.0
            .entry((class, minutes))
            .or_insert_with(|| (expected_response(class, minutes), expected_response_overridden(class, minutes)))
    }

    /// What a device is expected to report shedding when it starts: its expected reduction times the mean of its
    /// class's response over the deferral (an EV's session may end within it).
    fn report_w(&mut self, class: ApplianceClass, reduction_w: f64, deferral_s: u32) -> f64 {
        let shed = &self.get(class, deferral_s / 60).0.shed;
        reduction_w * shed.iter().sum::<f64>() / shed.len().max(1) as f64
    }
}

/// What the devices of an event that have started reported they shed and will pay back, against what the plan
/// expected of them, kept up to date as their reports arrive. A rejection counts as nothing shed or paid back;
/// devices that have not said yet count as planned. The plan counted on each device's household overriding
/// with its chance, at a uniformly random moment of the deferral, and on its class's average payback. A device
/// that starts has that expected override given back and its own payback forecast weighed against the class's;
/// one that is overridden loses what it reported from then on and pays back from then, so overrides and
/// paybacks inside the window weigh against their expectation as they happen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Realised {
    /// Devices that have said whether they started, and how many of them refused.
    pub n_known: u64,
    pub n_rejected: u64,
    /// Over those devices: what the plan expected them to shed, and what they reported, W.
    pub expected_w: f64,
    pub reported_w: f64,
    /// How far `reported_w` may scatter around `expected_w` by chance, W²: each device's rated power times what
    /// was expected of it (an appliance is on or off when it starts).
    pub reported_var_w2: f64,
    /// Per slot of the event, what they delivered (shed less payback) less what was expected of them, W, had
    /// none of them been overridden since they started.
    pub deviation_w: Vec<f64>,
    /// Per slot, what the plan expected the started devices still under way to lose to overrides, per minute of
    /// their deferral before the slot: an override can come in any minute up to the slot, and one that has not
    /// come by then will not take that minute's share (see [`Realised::foreseen_deviation_w`]), W per minute.
    pub override_hazard_w: Vec<f64>,
    /// Devices overridden after they started.
    pub n_overridden: u64,
    /// Per slot, how far what the devices not yet heard from will shed may scatter, W²: each one's rated power
    /// times its expected shed there, the planner's bound. What a top-up keeps in hand for them.
    pub unsaid_var_w2: Vec<f64>,
}

/// What an override with chance `p` is expected to take, minute by minute: `p` times the response run to the end
/// (`full`) less the response overridden.
fn override_loss<'a>(p: f64, full: &'a [f64], overridden: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
    (0..full.len().max(overridden.len()))
        .map(move |i| p * (full.get(i).copied().unwrap_or(0.0) - overridden.get(i).copied().unwrap_or(0.0)))
}

/// A device's start (or refusal), as [`Realised`] weighs it.
struct Start<'a> {
    from_unix_ms: i64,
    deferral_s: u32,
    /// What it reported shedding (an average over the deferral), and what the plan expected it to report, W.
    reported_w: f64,
    expected_w: f64,
    /// The appliance's expected reduction at a random moment: the unit of `responses`, W.
    planned_w: f64,
    rated_w: f64,
    override_chance: f64,
    /// What it says it will pay back at the deferral's end.
    payback: Option<Payback>,
    /// Whether it started (a refusal: it will not be overridden either).
    started: bool,
    /// Its class's expected responses to the deferral, run to the end and overridden.
    responses: &'a (Response, Response),
}

impl<'a> Start<'a> {
    /// What the plan expected of `t`, and what it reported and will pay back, from its start (or its command's).
    fn of(t: &DeviceTrack, responses: &'a mut ClassResponses) -> Self {
        let responses = responses.get(t.class, t.command.deferral_s / 60);
        Start {
            from_unix_ms: t.started_unix_ms.unwrap_or(t.command.not_before_unix_ms),
            deferral_s: t.command.deferral_s,
            reported_w: f64::from(t.reduction_w),
            expected_w: t.expected_w,
            planned_w: t.planned_w,
            rated_w: t.rated_w(),
            override_chance: t.override_chance,
            payback: t.payback,
            started: t.started_unix_ms.is_some(),
            responses,
        }
    }
}

impl Realised {
    /// What a window top-up counts on its devices shedding, as a share of their class's expectation: what the
    /// devices heard from shed against what was expected of them, given the benefit of one standard deviation of
    /// chance, and no less than `yield_min`. 1 before any has said. On a season evening whose first few hundred
    /// devices shed 72 % of their expectation (a few EV chargers, a sixth of which charge, decide it), each
    /// top-up planned at the class's expectation fell as short, and the ramp's second to fourth minutes missed.
    pub fn yield_counted_on(&self, yield_min: f64) -> f64 {
        if self.expected_w <= 0.0 {
            return 1.0;
        }
        let sd = self.reported_var_w2.max(0.0).sqrt() / self.expected_w;
        (self.reported_w / self.expected_w + sd).clamp(yield_min, 1.0)
    }

    /// Adds a device's start (or refusal) in the slots of an event that starts at `slot0_unix_ms` and has
    /// `n_slots`.
    fn note(&mut self, slot0_unix_ms: i64, n_slots: usize, s: &Start) {
        self.deviation_w.resize(n_slots, 0.0);
        self.override_hazard_w.resize(n_slots, 0.0);
        self.n_known += 1;
        self.expected_w += s.expected_w;
        self.reported_w += s.reported_w;
        self.reported_var_w2 += s.rated_w * s.expected_w;
        let (from, window_end) = (s.from_unix_ms, slot0_unix_ms + n_slots as i64 * MS_PER_MIN);
        let end = from + i64::from(s.deferral_s) * 1000;
        let dev = &mut self.deviation_w;
        add_interval(dev, slot0_unix_ms, from, end, s.reported_w - s.expected_w);
        if let Some(p) = s.payback {
            add_interval(dev, slot0_unix_ms, p.from_unix_ms, p.to_unix_ms, -f64::from(p.power_w));
        }
        // The plan's expectation, minute by minute after `at`: `x` per W of expected reduction. Only the minutes
        // inside the event's slots: a long deferral's tail and late payback are no one's concern here.
        let mut expect = |at: i64, x: &mut dyn Iterator<Item = f64>, sign: f64| {
            let n = (window_end - at).div_euclid(MS_PER_MIN) + 1;
            for (k, x) in (0..n.max(0)).zip(x) {
                let a = at + k * MS_PER_MIN;
                add_interval(dev, slot0_unix_ms, a, a + MS_PER_MIN, sign * s.planned_w * x);
            }
        };
        let (full, overridden) = s.responses;
        // Its class's payback from the deferral's end, had it run to the end.
        expect(end, &mut full.payback.iter().copied(), 1.0);
        // What the plan expected it to lose to an override, given back: the shed it would not have made and the
        // payback it would have started inside the deferral, and the payback after the deferral that it would
        // then not owe. Until an override could no longer come, the hazard keeps its share of it.
        let p = s.override_chance.clamp(0.0, 1.0);
        if p > 0.0 {
            expect(from, &mut override_loss(p, &full.shed, &overridden.shed), 1.0);
            expect(end, &mut override_loss(p, &full.payback, &overridden.payback), -1.0);
            if s.started {
                self.hazard(slot0_unix_ms, from, s.planned_w, override_loss(p, &full.shed, &overridden.shed), 1.0);
            }
        }
    }

    /// Adds `sign` times the scatter of `t`'s shed in the event's slots while it has not said what it sheds: from
    /// the middle of its command's random start, as the rebound guard counts it, so taking it out when it says
    /// leaves nothing behind.
    fn unsaid(
        &mut self,
        slot0_unix_ms: i64,
        n_slots: usize,
        t: &DeviceTrack,
        responses: &mut ClassResponses,
        sign: f64,
    ) {
        let shed = &responses.get(t.class, t.command.deferral_s / 60).0.shed;
        self.unsaid_var_w2.resize(n_slots, 0.0);
        let c = &t.command;
        let from = c.not_before_unix_ms + i64::from(c.randomize_start_s) * 500;
        let w2 = sign * t.rated_w() * t.planned_w;
        for (k, x) in shed.iter().enumerate().take(n_slots + 1) {
            let a = from + k as i64 * MS_PER_MIN;
            add_interval(&mut self.unsaid_var_w2, slot0_unix_ms, a, a + MS_PER_MIN, w2 * x.abs());
        }
    }

    /// Adds `sign` times the override hazard of a device that started at `from_unix_ms` and was expected to lose
    /// `lost_shed` (per W of `planned_w`) in each minute of its deferral: an override comes at a uniformly random
    /// moment, so minute k's expected loss is spread over the k + ½ minutes of the deferral before its middle.
    fn hazard(
        &mut self,
        slot0_unix_ms: i64,
        from_unix_ms: i64,
        planned_w: f64,
        lost_shed: impl Iterator<Item = f64>,
        sign: f64,
    ) {
        let window_end = slot0_unix_ms + self.override_hazard_w.len() as i64 * MS_PER_MIN;
        let n = (window_end - from_unix_ms).div_euclid(MS_PER_MIN) + 1;
        for (k, lost) in (0..n.max(0)).zip(lost_shed) {
            let a = from_unix_ms + k * MS_PER_MIN;
            let w = sign * planned_w * lost / (k as f64 + 0.5);
            add_interval(&mut self.override_hazard_w, slot0_unix_ms, a, a + MS_PER_MIN, w);
        }
    }

    /// A started device `s` ended early at `at_unix_ms` (overridden, or released by the engine): it no longer
    /// sheds `shed_w` from then until `shed_to_unix_ms`, pays back `now` instead of `before`, and can no longer
    /// be overridden.
    fn ended_early(
        &mut self,
        slot0_unix_ms: i64,
        s: &Start,
        at_unix_ms: i64,
        (shed_to_unix_ms, shed_w): (i64, f64),
        before: Option<Payback>,
        now: Option<Payback>,
    ) {
        let dev = &mut self.deviation_w;
        add_interval(dev, slot0_unix_ms, at_unix_ms.max(s.from_unix_ms), shed_to_unix_ms, -shed_w);
        for (p, sign) in [(before, 1.0), (now, -1.0)] {
            if let Some(p) = p {
                add_interval(dev, slot0_unix_ms, p.from_unix_ms, p.to_unix_ms, sign * f64::from(p.power_w));
            }
        }
        let p = s.override_chance.clamp(0.0, 1.0);
        if p > 0.0 {
            let (full, overridden) = s.responses;
            let lost_shed = override_loss(p, &full.shed, &overridden.shed);
            self.hazard(slot0_unix_ms, s.from_unix_ms, s.planned_w, lost_shed, -1.0);
        }
    }

    /// What the devices that have said look like delivering in `slot`, less what was expected of them, W, weighed
    /// at `now_unix_ms`: their reports, and the overrides still to come before the slot's middle.
    pub fn foreseen_deviation_w(&self, slot: usize, slot0_unix_ms: i64, now_unix_ms: i64) -> f64 {
        let middle = slot0_unix_ms + slot as i64 * MS_PER_MIN + MS_PER_MIN / 2;
        let minutes_ahead = ((middle - now_unix_ms) as f64 / MS_PER_MIN as f64).max(0.0);
        let deviation_w = self.deviation_w.get(slot).copied().unwrap_or(0.0);
        deviation_w - self.override_hazard_w.get(slot).copied().unwrap_or(0.0) * minutes_ahead
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
    /// Expected reduction of the devices dispatched, per appliance class, W.
    pub planned_by_class_w: [f64; N_CLASSES],
    /// When the devices' reports were last weighed against the plan, engine time.
    pub weighed_unix_ms: i64,
    /// Top-ups dispatched so far (in the window, and after it for the rebound), and whether one is being planned.
    pub n_top_ups: u32,
    pub n_tail_top_ups: u32,
    pub top_up_in_flight: bool,
    pub rebound: ReboundGuard,
    /// Devices the rebound guard asks to release, for the engine to sign and send.
    pub guard_releases: Vec<ApplianceId>,
    /// The event's first slot's devices were sent ahead of it (see `dispatch::not_before_unix_ms`), so they have
    /// all said what they shed when it opens: the event is weighed a settling time into each slot, not a random
    /// start offset and a settling time.
    pub first_slot_led: bool,
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
            planned_by_class_w: [0.0; N_CLASSES],
            weighed_unix_ms: i64::MIN,
            n_top_ups: 0,
            n_tail_top_ups: 0,
            top_up_in_flight: false,
            rebound: ReboundGuard::default(),
            guard_releases: Vec::new(),
            first_slot_led: false,
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
    /// random moment, whose household overrides the deferral with `override_chance`.
    pub fn add_device(
        &mut self,
        household: HouseholdId,
        command: DeferralCommand,
        class: ApplianceClass,
        reduction_w: f64,
        override_chance: f64,
        power_w: u32,
    ) {
        let expected_w = self.rebound.responses.report_w(class, reduction_w, command.deferral_s);
        self.last_not_after_unix_ms = self.last_not_after_unix_ms.max(command.not_after_unix_ms);
        let start_unix_ms = self.record.spec.start_unix_ms;
        if command.not_before_unix_ms + i64::from(command.randomize_start_s) * 1000 <= start_unix_ms {
            self.first_slot_led = true;
        }
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
            class,
            planned_w: reduction_w,
            payback: None,
            override_chance,
            power_w,
            resume_unconfirmed: false,
            guard_released_at: None,
        };
        let window_end = self.record.spec.end_unix_ms();
        let (slot0, n) = (self.record.spec.start_unix_ms, self.record.spec.target_w.len());
        self.rebound.add(window_end, &track, 1.0);
        self.realised.unsaid(slot0, n, &track, &mut self.rebound.responses, 1.0);
        if let Some(old) = self.devices.insert(command.device, track) {
            self.rebound.add(window_end, &old, -1.0);
            if old.unsaid() {
                self.realised.unsaid(slot0, n, &old, &mut self.rebound.responses, -1.0);
            }
        } else {
            self.counts.dispatched += 1;
            self.planned_by_class_w[class.index()] += reduction_w;
        }
        self.dirty = true;
    }

    /// Applies a status change for a device of this event, with the payback it says it will draw after, and
    /// says what the ledger should do about it. Where that payback would take the event's projected rebound over
    /// its cap, the device is queued in `guard_releases`.
    pub fn apply(
        &mut self,
        device: ApplianceId,
        status: DeviceStatus,
        at_unix_ms: i64,
        reduction_w: u32,
        payback: Option<Payback>,
    ) -> Applied {
        if matches!(status, DeviceStatus::Dispatched | DeviceStatus::Received) {
            return self.apply_status(device, status, at_unix_ms, reduction_w, payback);
        }
        let window_end = self.record.spec.end_unix_ms();
        let Some(before) = self.devices.get(&device).cloned() else { return Applied::Unknown };
        let applied = self.apply_status(device, status, at_unix_ms, reduction_w, payback);
        let after = &self.devices[&device];
        self.rebound.add(window_end, &before, -1.0);
        self.rebound.add(window_end, after, 1.0);
        if status == DeviceStatus::Started
            && before.started_unix_ms.is_none()
            && !after.status.is_final()
            && self.rebound.over_cap(window_end, after)
        {
            self.guard_release(device, at_unix_ms, None);
        }
        applied
    }

    /// Queues `device` for release by the rebound guard at `at_unix_ms`, if that helps: the release takes nothing
    /// over the cap in a minute from then on that the projection had under it (after the window, a release moves
    /// payback earlier and ends shed that was absorbing payback), and, given `worst_slot`, lowers that minute.
    /// Its shed from then on is lost: the closed loop plans it again among devices not yet deferred. Returns
    /// whether it was queued.
    fn guard_release(&mut self, device: ApplianceId, at_unix_ms: i64, worst_slot: Option<usize>) -> bool {
        if self.guard_releases.len() >= GUARD_RELEASES_QUEUED_MAX {
            return false;
        }
        let Some(before) = self.devices.get(&device) else { return false };
        if before.guard_released_at.is_some() {
            return false;
        }
        let before = before.clone();
        let after = DeviceTrack { guard_released_at: Some(at_unix_ms), ..before.clone() };
        let window_end = self.record.spec.end_unix_ms();
        // The release's effect alone: both contributions summed into an empty projection.
        let projection = std::mem::replace(&mut self.rebound.tail_w, vec![0.0; TAIL_SLOTS]);
        let projection_var = std::mem::replace(&mut self.rebound.tail_var_w2, vec![0.0; TAIL_SLOTS]);
        self.rebound.add(window_end, &before, -1.0);
        self.rebound.add(window_end, &after, 1.0);
        let delta_w = std::mem::replace(&mut self.rebound.tail_w, projection);
        let delta_var_w2 = std::mem::replace(&mut self.rebound.tail_var_w2, projection_var);
        let cap_w = self.rebound.cap_w.unwrap_or(f64::INFINITY);
        let now_slot = (at_unix_ms - window_end).div_euclid(MS_PER_MIN).max(0) as usize;
        let fits = delta_w
            .iter()
            .zip(&self.rebound.tail_w)
            .skip(now_slot)
            .all(|(d, w)| *d <= DELTA_TOLERANCE_W || w + d <= cap_w);
        let lowers = worst_slot.is_none_or(|s| delta_w.get(s).is_some_and(|d| *d < -DELTA_TOLERANCE_W));
        if !(fits && lowers) {
            return false;
        }
        for (w, d) in self.rebound.tail_w.iter_mut().zip(&delta_w) {
            *w += d;
        }
        for (v, d) in self.rebound.tail_var_w2.iter_mut().zip(&delta_var_w2) {
            *v += d;
        }
        if let Some((_, to, shed_w)) = before.shed() {
            let slot0 = self.record.spec.start_unix_ms;
            let start = Start::of(&before, &mut self.rebound.responses);
            let now = before.payback_if_ended_at(at_unix_ms);
            self.realised.ended_early(slot0, &start, at_unix_ms, (to, shed_w), before.payback, now);
        }
        self.devices.insert(device, after);
        self.guard_releases.push(device);
        self.rebound.n_released += 1;
        true
    }

    /// Where the projected rebound is over the cap in a minute to come, queues for release the deferrals still
    /// under way whose payback lands there, largest first, until what they pay back there covers the excess (at
    /// most `n_max`, trying at most [`GUARD_TRIES_PER_MINUTE_FACTOR`] times as many). Released early, a
    /// compressor pays back sooner, inside the window, and a paused session runs late by less; after the window
    /// only where that earlier payback fits under the cap. Devices that said nothing stay: the guard knows their
    /// payback only on average. Runs from the window's start until the event's last deferral has ended.
    pub fn shave_rebound(&mut self, now_unix_ms: i64, n_max: usize) -> usize {
        let Some(cap_w) = self.rebound.cap_w else { return 0 };
        let window_end = self.record.spec.end_unix_ms();
        let first = (now_unix_ms - window_end).div_euclid(MS_PER_MIN).max(0) as usize + 1;
        let worst = self.rebound.tail_w.iter().enumerate().skip(first).max_by(|a, b| a.1.total_cmp(b.1));
        let Some((slot, &peak_w)) = worst else { return 0 };
        if peak_w <= cap_w {
            return 0;
        }
        let (a, b) = (window_end + slot as i64 * MS_PER_MIN, window_end + (slot as i64 + 1) * MS_PER_MIN);
        let mut candidates: Vec<(f64, ApplianceId)> = self
            .devices
            .iter()
            .filter(|(_, t)| t.guard_released_at.is_none() && !t.status.is_final())
            .filter(|(_, t)| t.deferred_interval().is_some_and(|(_, to)| to > now_unix_ms))
            .filter_map(|(&d, t)| {
                let p = t.payback?;
                let overlap_ms = (p.to_unix_ms.min(b) - p.from_unix_ms.max(a)).max(0);
                (overlap_ms > 0).then(|| (f64::from(p.power_w) * overlap_ms as f64 / MS_PER_MIN as f64, d))
            })
            .collect();
        candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let mut excess_w = peak_w - cap_w;
        let mut n = 0;
        for (w, device) in candidates.into_iter().take(n_max.saturating_mul(GUARD_TRIES_PER_MINUTE_FACTOR)) {
            if excess_w <= 0.0 || n >= n_max {
                break;
            }
            if self.guard_release(device, now_unix_ms, Some(slot)) {
                excess_w -= w;
                n += 1;
            }
        }
        n
    }

    fn apply_status(
        &mut self,
        device: ApplianceId,
        status: DeviceStatus,
        at_unix_ms: i64,
        reduction_w: u32,
        payback: Option<Payback>,
    ) -> Applied {
        let Some(track) = self.devices.get_mut(&device) else { return Applied::Unknown };
        let c = &mut self.counts;
        let at = at_unix_ms.clamp(track.command.not_before_unix_ms, track.command.not_after_unix_ms);
        let unsaid = track.unsaid();
        let mut end_early = None;
        if status != DeviceStatus::Expired && !track.acked {
            track.acked = true;
            c.acknowledged += 1;
        }
        if track.status.is_final() {
            // A late report about a command already settled (the device's own report of an engine release,
            // a retry): acknowledged, and what it will really pay back replaces the engine's guess.
            if payback.is_some() && track.started_unix_ms.is_some() {
                track.payback = payback;
            }
            // The device says when it really resumed after the engine released it: the ledger charges it until
            // then, not until the moment the engine decided.
            if track.resume_unconfirmed
                && matches!(status, DeviceStatus::Released | DeviceStatus::Completed | DeviceStatus::Overridden)
            {
                track.resume_unconfirmed = false;
                return Applied::EndEarly(at);
            }
            return Applied::Ignored;
        }
        match status {
            DeviceStatus::Dispatched | DeviceStatus::Received => {}
            DeviceStatus::Started => {
                if track.started_unix_ms.is_none() {
                    track.started_unix_ms = Some(at);
                    track.reduction_w = reduction_w;
                    track.payback = payback;
                    c.started += 1;
                    let (slot0, n) = (self.record.spec.start_unix_ms, self.record.spec.target_w.len());
                    let start = Start::of(track, &mut self.rebound.responses);
                    self.realised.note(slot0, n, &start);
                }
            }
            DeviceStatus::Completed => {
                c.completed += 1;
                track.payback = payback.or(track.payback);
            }
            DeviceStatus::Overridden => {
                c.overridden += 1;
                let before = track.payback;
                track.payback = payback.or_else(|| track.payback_if_ended_at(at));
                // A deferral the guard has released was weighed as ended then.
                if track.started_unix_ms.is_some() && track.guard_released_at.is_none() {
                    let start = Start::of(track, &mut self.rebound.responses);
                    let shed_to = start.from_unix_ms + i64::from(start.deferral_s) * 1000;
                    let slot0 = self.record.spec.start_unix_ms;
                    self.realised.ended_early(slot0, &start, at, (shed_to, start.reported_w), before, track.payback);
                    self.realised.n_overridden += 1;
                }
                track.ended_unix_ms = Some(at);
                end_early = Some(at);
            }
            DeviceStatus::Released => {
                track.ended_unix_ms = Some(track.ended_unix_ms.map_or(at, |e| e.min(at)));
                end_early = Some(at);
                track.payback = payback.or_else(|| track.payback_if_ended_at(at));
            }
            DeviceStatus::Rejected => {
                c.rejected += 1;
                track.ended_unix_ms = Some(track.command.not_before_unix_ms);
                end_early = Some(track.command.not_before_unix_ms);
                if track.started_unix_ms.is_none() {
                    let (slot0, n) = (self.record.spec.start_unix_ms, self.record.spec.target_w.len());
                    let start =
                        Start { reported_w: 0.0, payback: None, ..Start::of(track, &mut self.rebound.responses) };
                    self.realised.note(slot0, n, &start);
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
        if unsaid && !track.unsaid() {
            let (slot0, n) = (self.record.spec.start_unix_ms, self.record.spec.target_w.len());
            self.realised.unsaid(slot0, n, track, &mut self.rebound.responses, -1.0);
        }
        self.dirty = true;
        match end_early {
            Some(at) => Applied::EndEarly(at),
            None => Applied::Status,
        }
    }

    /// What the devices deliver in each slot, as they report it: their shed, less the payback that falls inside
    /// the window (of a deferral overridden, or ended before the window does).
    fn delivered_w(&self) -> Vec<f64> {
        let start = self.record.spec.start_unix_ms;
        let n = self.record.spec.target_w.len();
        let mut out = vec![0.0; n];
        for t in self.devices.values() {
            let Some((from, to, shed_w)) = t.shed() else {
                continue;
            };
            add_interval(&mut out, start, from, to, shed_w);
            if let Some(p) = t.payback {
                add_interval(&mut out, start, p.from_unix_ms, p.to_unix_ms, -f64::from(p.power_w));
            }
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
            rebound_w: self.rebound.projection_w().to_vec(),
            rebound_line_w: self.rebound.cap_w,
            n_top_ups: self.n_top_ups,
            n_tail_top_ups: self.n_tail_top_ups,
            n_guard_released: self.rebound.n_released,
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

    /// Two devices with 5-minute deferrals in a 10-minute window: one starts, reports half what was expected of
    /// it and a payback of its own, one refuses. What the event realised counts both, slot by slot: the refused
    /// one's shed and its class's payback after it do not come, the started one's payback replaces its class's.
    /// A report repeated changes nothing.
    #[test]
    fn realised_follows_starts_and_refusals_as_they_are_reported() {
        let (mut st, _, command) = event(1_000.0, 5);
        let start = st.record.spec.start_unix_ms;
        // Fridges, whose mean response over any window is what they shed at a random moment.
        st.add_device(HouseholdId(1), command(1, start), ApplianceClass::Fridge, 400.0, 0.0, 135);
        st.add_device(HouseholdId(2), command(2, start), ApplianceClass::Fridge, 600.0, 0.0, 135);
        let payback =
            Payback { power_w: 100, from_unix_ms: start + 5 * MS_PER_MIN, to_unix_ms: start + 10 * MS_PER_MIN };
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 200, Some(payback));
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 200, Some(payback));
        st.apply(ApplianceId(2), DeviceStatus::Rejected, start, 0, None);
        let r = &st.realised;
        assert_eq!((r.n_known, r.n_rejected), (2, 1));
        assert!((r.expected_w - 1_000.0).abs() < 1e-6 && r.reported_w == 200.0, "{r:?}");
        let class_payback = halftime_core::physics::expected_response(ApplianceClass::Fridge, 5).payback;
        assert!(class_payback.len() >= 5 && class_payback[0] > 0.0, "{class_payback:?}");
        let want: Vec<f64> =
            (0..10).map(|k| if k < 5 { -800.0 } else { 1_000.0 * class_payback[k - 5] - 100.0 }).collect();
        assert!(r.deviation_w.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{:?} != {want:?}", r.deviation_w);
    }

    /// A device that starts has what the plan expected it to lose to an override given back: the shed it would
    /// not have made and the payback it would have started inside the deferral. Overridden, it loses what it
    /// reported from then on, and pays back what it says from then.
    #[test]
    fn realised_weighs_an_override_against_its_expectation() {
        let (mut st, _, command) = event(1_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        st.add_device(HouseholdId(1), command(1, start), ApplianceClass::Fridge, 400.0, 0.5, 135);
        let expected_w = st.devices[&ApplianceId(1)].expected_w;
        let reported = expected_w.round() as u32;
        st.apply(ApplianceId(1), DeviceStatus::Started, start, reported, None);
        let full = halftime_core::physics::expected_response(ApplianceClass::Fridge, 10);
        let overridden = halftime_core::physics::expected_response_overridden(ApplianceClass::Fridge, 10);
        let given_back = |k: usize| 400.0 * 0.5 * (full.shed[k] - overridden.shed[k]);
        // More is lost to an override late in the deferral than early; an override's payback inside the
        // deferral makes it more than the shed alone.
        assert!(given_back(9) > given_back(0) && given_back(9) > 400.0 * 0.5 * 0.95 * full.shed[9]);
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 0.5);
        let rounding = f64::from(reported) - expected_w;
        let want: Vec<f64> = (0..10).map(|k| given_back(k) + rounding).collect();
        assert!(close(&st.realised.deviation_w, &want), "{:?} != {want:?}", st.realised.deviation_w);
        // Foreseen at the start, the override may still come in any minute: the plan's expectation stands.
        // Three minutes in, the minutes before are its own; a later minute keeps the share of its expected loss
        // that an override still to come would take.
        let foreseen =
            |now: i64| -> Vec<f64> { (0..10).map(|k| st.realised.foreseen_deviation_w(k, start, now)).collect() };
        assert!(close(&foreseen(start), &[rounding; 10]), "{:?}", foreseen(start));
        let later: Vec<f64> = (0..10)
            .map(|k| rounding + given_back(k) * (1.0 - (k as f64 + 0.5 - 3.0).max(0.0) / (k as f64 + 0.5)))
            .collect();
        assert!(
            close(&foreseen(start + 3 * MS_PER_MIN), &later),
            "{:?} != {later:?}",
            foreseen(start + 3 * MS_PER_MIN)
        );
        let at = start + 4 * MS_PER_MIN;
        let payback = Payback { power_w: 135, from_unix_ms: at, to_unix_ms: at + 2 * MS_PER_MIN };
        st.apply(ApplianceId(1), DeviceStatus::Overridden, at, 0, Some(payback));
        let lost =
            |k: usize| if k >= 4 { f64::from(reported) } else { 0.0 } + if k == 4 || k == 5 { 135.0 } else { 0.0 };
        let want: Vec<f64> = want.iter().enumerate().map(|(k, w)| w - lost(k)).collect();
        assert!(close(&st.realised.deviation_w, &want), "{:?} != {want:?}", st.realised.deviation_w);
        // Overridden, it can be overridden no more: what it reported is all there is to foresee.
        let foreseen: Vec<f64> = (0..10).map(|k| st.realised.foreseen_deviation_w(k, start, at)).collect();
        assert!(close(&foreseen, &want), "{foreseen:?} != {want:?}");
        assert_eq!(st.realised.n_overridden, 1);
    }

    /// Until a device says what it sheds, its slots keep its scatter (rated power times expected shed, as the
    /// planner bounds it); once it starts, is refused or expires, they no longer do, and nothing is left behind.
    #[test]
    fn the_scatter_of_devices_not_yet_heard_from_is_kept_until_they_say() {
        let (mut st, _, command) = event(10_000.0, 5);
        let start = st.record.spec.start_unix_ms;
        let charger = |st: &mut RuntimeState, device: u64, from: i64| {
            st.add_device(HouseholdId(device), command(device, from), ApplianceClass::EvCharger, 1_200.0, 0.1, 7_000)
        };
        charger(&mut st, 1, start);
        charger(&mut st, 2, start + 2 * MS_PER_MIN);
        charger(&mut st, 3, start + 2 * MS_PER_MIN);
        let shed = halftime_core::physics::expected_response(ApplianceClass::EvCharger, 5).shed;
        let unit = 7_000.0 * 1_200.0;
        let want = |n_first: f64, n_later: f64| -> Vec<f64> {
            (0..10)
                .map(|k| {
                    let first = shed.get(k).map_or(0.0, |x| n_first * unit * x);
                    let later = k.checked_sub(2).and_then(|j| shed.get(j)).map_or(0.0, |x| n_later * unit * x);
                    first + later
                })
                .collect()
        };
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-3 * unit);
        assert!(close(&st.realised.unsaid_var_w2, &want(1.0, 2.0)), "{:?}", st.realised.unsaid_var_w2);
        st.apply(ApplianceId(1), DeviceStatus::Started, start + 10_000, 7_000, None);
        assert!(close(&st.realised.unsaid_var_w2, &want(0.0, 2.0)), "{:?}", st.realised.unsaid_var_w2);
        st.apply(ApplianceId(2), DeviceStatus::Rejected, start + 2 * MS_PER_MIN, 0, None);
        // A report that changes nothing about what is known changes nothing here either.
        st.apply(ApplianceId(1), DeviceStatus::Completed, start + 5 * MS_PER_MIN, 0, None);
        assert!(close(&st.realised.unsaid_var_w2, &want(0.0, 1.0)), "{:?}", st.realised.unsaid_var_w2);
        // Never heard from at all.
        st.apply(ApplianceId(3), DeviceStatus::Expired, start + 7 * MS_PER_MIN, 0, None);
        assert!(st.realised.unsaid_var_w2.iter().all(|v| v.abs() < 1e-6), "{:?}", st.realised.unsaid_var_w2);
    }

    /// What an event delivers, as its devices report it, is their shed less the payback they said they will
    /// draw inside the window: here an override's.
    #[test]
    fn delivered_counts_the_payback_inside_the_window() {
        let (mut st, _, command) = event(1_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        st.add_device(HouseholdId(1), command(1, start), ApplianceClass::Fridge, 100.0, 0.0, 135);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 100, None);
        let at = start + 4 * MS_PER_MIN;
        let payback = Payback { power_w: 135, from_unix_ms: at, to_unix_ms: at + 2 * MS_PER_MIN };
        st.apply(ApplianceId(1), DeviceStatus::Overridden, at, 0, Some(payback));
        let want = [100.0, 100.0, 100.0, 100.0, -135.0, -135.0, 0.0, 0.0, 0.0, 0.0];
        let delivered = st.delivered_w();
        assert!(delivered.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{delivered:?}");
    }

    /// A top-up counts on what the devices heard from shed, less sure the fewer they are: nothing known, their
    /// class's expectation; a few chargers short, most of the way there; many, what they shed; never more than
    /// expected, nor less than the floor.
    #[test]
    fn a_top_up_counts_on_what_the_devices_heard_from_shed() {
        let (mut st, _, command) = event(1e6, 10);
        let start = st.record.spec.start_unix_ms;
        assert_eq!(st.realised.yield_counted_on(0.5), 1.0);
        // Chargers of 7 kW expected to shed 1.2 kW each, 7 in 10 of what was expected charging.
        let mut heard = |from: u64, n: u64| {
            for d in from..from + n {
                st.add_device(HouseholdId(d), command(d, start), ApplianceClass::EvCharger, 1_200.0, 0.0, 7_000);
                let reduction_w = if d % 10 < 7 { 1_200 } else { 0 };
                st.apply(ApplianceId(d), DeviceStatus::Started, start, reduction_w, None);
            }
            let ratio = st.realised.reported_w / st.realised.expected_w;
            (ratio, st.realised.yield_counted_on(0.5))
        };
        // What a charger is expected to report is its class's average over the deferral, about its 1.2 kW.
        let (ratio, few) = heard(1, 100);
        assert!((ratio - 0.7).abs() < 0.05, "{ratio}");
        // One standard deviation of 100 such chargers: sqrt(100 × 7 kW × 1.2 kW) / 120 kW = 0.24.
        assert!((few - ratio - 0.24).abs() < 0.03, "{few} for {ratio}");
        let (ratio, many) = heard(101, 9_900);
        assert!(many - ratio > 0.02 && many - ratio < 0.03, "{many} for {ratio}");
        assert_eq!(st.realised.yield_counted_on(0.8), 0.8);
        st.realised.reported_w = 2.0 * st.realised.expected_w;
        assert_eq!(st.realised.yield_counted_on(0.5), 1.0);
    }

    /// `WatchEvent` shows the rebound projection from the window's end up to its last minute with anything in it,
    /// and the line the guard holds it under once it guards.
    #[test]
    fn progress_shows_the_rebound_projection_and_its_line() {
        let (mut st, window_end, command) = event(10_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        st.add_device(HouseholdId(1), command(1, start), ApplianceClass::EvCharger, 0.0, 0.0, 0);
        assert_eq!(st.progress().rebound_line_w, None);
        st.rebound.cap_w = Some(10_000.0);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 7_000, payback(window_end, 3, 5));
        let p = st.progress();
        assert_eq!(p.rebound_w, vec![0.0, 0.0, 0.0, 7_000.0, 7_000.0]);
        assert_eq!(p.rebound_line_w, Some(10_000.0));
    }

    /// An event is marked as having led its first slot once a device is sent to start by the slot's opening
    /// whatever its random offset, and not by one that may start after it.
    #[test]
    fn an_event_whose_first_devices_start_by_its_opening_is_marked_led() {
        let (mut st, _, command) = event(1_000.0, 5);
        let start = st.record.spec.start_unix_ms;
        let with_offset = |device, not_before| DeferralCommand {
            randomize_start_s: 30,
            not_after_unix_ms: not_before + 30_000 + 5 * MS_PER_MIN,
            ..command(device, not_before)
        };
        st.add_device(HouseholdId(1), with_offset(1, start), ApplianceClass::Fridge, 50.0, 0.0, 100);
        st.add_device(HouseholdId(2), with_offset(2, start - 29_999), ApplianceClass::Fridge, 50.0, 0.0, 100);
        assert!(!st.first_slot_led);
        st.add_device(HouseholdId(3), with_offset(3, start - 30_000), ApplianceClass::Fridge, 50.0, 0.0, 100);
        assert!(st.first_slot_led);
    }

    /// An active event of ten one-minute slots from minute 60 asking `target_w`, its window's end, and its
    /// deferral commands of `deferral_min` by device and start.
    fn event(target_w: f64, deferral_min: u32) -> (RuntimeState, i64, impl Fn(u64, i64) -> DeferralCommand) {
        let start = 60 * MS_PER_MIN;
        let spec = StressEventSpec {
            regions: vec![],
            start_unix_ms: start,
            target_w: vec![target_w; 10],
            deferral_min_max: deferral_min,
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
        let command = move |device: u64, not_before: i64| DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 0,
            device: ApplianceId(device),
            event: EventId(1),
            counter: device,
            not_before_unix_ms: not_before,
            not_after_unix_ms: not_before + i64::from(deferral_min) * MS_PER_MIN,
            deferral_s: deferral_min * 60,
            randomize_start_s: 0,
        };
        (EventRuntime::new(record).state.into_inner().unwrap(), start + 10 * MS_PER_MIN, command)
    }

    fn payback(window_end: i64, from_min: i64, to_min: i64) -> Option<Payback> {
        Some(Payback {
            power_w: 7_000,
            from_unix_ms: window_end + from_min * MS_PER_MIN,
            to_unix_ms: window_end + to_min * MS_PER_MIN,
        })
    }

    /// Chargers say when their paused sessions will run late. The one whose payback lands where another's already
    /// takes the projection over the cap is released; the engine's guess at its shorter payback stands until the
    /// device says, then what it says replaces it. The projection is then exactly what the devices said.
    #[test]
    fn the_guard_releases_a_deferral_whose_payback_would_go_over_the_cap() {
        let (mut st, window_end, command) = event(10_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        for d in 1..=3 {
            // planned_w 0: nothing expected of them before they say, so the test sees only what they say.
            st.add_device(HouseholdId(d), command(d, start), ApplianceClass::EvCharger, 0.0, 0.0, 0);
        }
        st.rebound.cap_w = Some(10_000.0);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 7_000, payback(window_end, 60, 65));
        st.apply(ApplianceId(2), DeviceStatus::Started, start, 7_000, payback(window_end, 62, 70));
        st.apply(ApplianceId(3), DeviceStatus::Started, start, 7_000, payback(window_end, 120, 125));
        assert_eq!(st.guard_releases, vec![ApplianceId(2)]);
        assert_eq!(st.rebound.n_released, 1);
        assert_eq!(st.progress().n_guard_released, 1);
        // Released a tenth of the way in: until it says, the engine counts a tenth of its payback (0.8 of 8 minutes),
        // from where it began.
        let released_at = start + MS_PER_MIN;
        st.apply(ApplianceId(2), DeviceStatus::Released, released_at, 0, None);
        let tail = st.rebound.tail_w.clone();
        assert!((tail[62] - 12_600.0).abs() < 1e-6 && (tail[63] - 7_000.0).abs() < 1e-6, "{:?}", &tail[60..66]);
        // What it lost is shed no more: the closed loop counts three chargers' reports (7 kW each, where nothing was
        // expected of them) less the released one's, from the moment it was queued.
        let deviation = &st.realised.deviation_w;
        assert!(deviation.iter().all(|&w| (w - 14_000.0).abs() < 1e-6), "{deviation:?}");
        // It says: its session runs a minute and a half late.
        let said = Payback { to_unix_ms: window_end + 63 * MS_PER_MIN + 30_000, ..payback(window_end, 62, 0).unwrap() };
        st.apply(ApplianceId(2), DeviceStatus::Released, released_at, 0, Some(said));
        for d in [1, 3] {
            st.apply(ApplianceId(d), DeviceStatus::Completed, start + 10 * MS_PER_MIN, 0, None);
        }
        let mut want = vec![0.0; crate::rebound::TAIL_SLOTS];
        add_interval(&mut want, window_end, window_end + 60 * MS_PER_MIN, window_end + 65 * MS_PER_MIN, 7_000.0);
        add_interval(&mut want, window_end, said.from_unix_ms, said.to_unix_ms, 7_000.0);
        add_interval(&mut want, window_end, window_end + 120 * MS_PER_MIN, window_end + 125 * MS_PER_MIN, 7_000.0);
        let off = st.rebound.tail_w.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(off < 1e-6, "projection off by {off} W");
        assert_eq!(st.guard_releases, vec![ApplianceId(2)], "nothing more released");
    }

    /// Where what the devices said takes a minute to come over the cap, the deferrals still under way whose payback
    /// lands there are released, largest first, until they cover the excess; devices that have ended are left.
    #[test]
    fn the_guard_shaves_a_minute_over_the_cap_with_the_largest_paybacks_there() {
        let (mut st, window_end, command) = event(10_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        for d in 1..=4 {
            st.add_device(HouseholdId(d), command(d, start), ApplianceClass::EvCharger, 0.0, 0.0, 0);
        }
        // Reported before the cap was known (the guard was not yet on).
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 7_000, payback(window_end, 5, 6));
        st.apply(ApplianceId(2), DeviceStatus::Started, start, 7_000, payback(window_end, 5, 15));
        st.apply(ApplianceId(3), DeviceStatus::Started, start, 7_000, payback(window_end, 5, 6));
        st.apply(ApplianceId(4), DeviceStatus::Started, start, 7_000, payback(window_end, 5, 6));
        st.apply(ApplianceId(4), DeviceStatus::Overridden, start + MS_PER_MIN, 0, payback(window_end, 5, 6));
        assert!(st.guard_releases.is_empty());
        st.rebound.cap_w = Some(15_000.0);
        // 28 kW in minute 5 against a cap of 15: two of the three still deferred, the lowest ids among equals, at
        // most `n_max` at a time. Released now, device 2's ten minutes of payback would still begin in minute 5
        // (the engine's guess keeps where it began), so it is passed over.
        assert_eq!(st.shave_rebound(start + 2 * MS_PER_MIN, 1), 1);
        assert_eq!(st.shave_rebound(start + 2 * MS_PER_MIN, 100), 1);
        assert_eq!(st.guard_releases, vec![ApplianceId(1), ApplianceId(3)]);
        // Nothing where the projection is under the cap.
        st.rebound.cap_w = Some(30_000.0);
        assert_eq!(st.shave_rebound(start + 2 * MS_PER_MIN, 100), 0);
    }

    /// After the window, releasing a paused session moves its payback earlier and ends shed that absorbed
    /// payback: the guard releases one only where that fits under the cap.
    #[test]
    fn after_the_window_the_guard_releases_only_where_the_earlier_payback_fits() {
        for blocked in [true, false] {
            let (mut st, window_end, command) = event(10_000.0, 30);
            let minute = |m: i64| window_end + m * MS_PER_MIN;
            // Three chargers start five minutes after the window with a quarter of an hour of charging left: they
            // shed 7 kW each until minute 20 and, resumed at minute 35, pay back until minute 50.
            for d in 1..=3 {
                st.add_device(HouseholdId(d), command(d, minute(5)), ApplianceClass::EvCharger, 0.0, 0.0, 7_000);
                st.apply(ApplianceId(d), DeviceStatus::Started, minute(5), 3_500, payback(window_end, 35, 50));
            }
            if blocked {
                // A deferral that has ended pays back 10 kW from minute 20 to 25.
                st.add_device(HouseholdId(4), command(4, minute(-10)), ApplianceClass::Fridge, 0.0, 0.0, 0);
                st.apply(ApplianceId(4), DeviceStatus::Started, minute(-10), 0, None);
                let p = Payback { power_w: 10_000, ..payback(window_end, 20, 25).unwrap() };
                st.apply(ApplianceId(4), DeviceStatus::Completed, minute(-10), 0, Some(p));
            }
            st.rebound.cap_w = Some(15_000.0);
            assert!((st.rebound.tail_w[40] - 21_000.0).abs() < 1e-6, "{}", st.rebound.tail_w[40]);
            // Released at minute 10, a charger runs from then until minute 25, paying back 7 kW from minute 20.
            let released = st.shave_rebound(minute(10), 100);
            if blocked {
                assert_eq!(released, 0, "minutes 20-25 would go to 17 kW");
                assert!((st.rebound.tail_w[40] - 21_000.0).abs() < 1e-6);
            } else {
                assert_eq!(released, 1, "one release brings minute 40 to 14 kW");
                assert!((st.rebound.tail_w[40] - 14_000.0).abs() < 1e-6, "{}", st.rebound.tail_w[40]);
                assert!((st.rebound.tail_w[22] - 7_000.0).abs() < 1e-6, "{}", st.rebound.tail_w[22]);
            }
        }
    }

    /// A deferral the guard releases as it starts counts for nothing in the projection, from the moment it is
    /// queued: a burst of reports then queues only as many as the cap needs. (Counted at its class average
    /// instead, at national scale the projection never came down and the guard released until memory ran out.)
    #[test]
    fn a_deferral_the_guard_releases_as_it_starts_counts_for_nothing() {
        let (mut st, window_end, command) = event(10_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        for d in 1..=2 {
            st.add_device(HouseholdId(d), command(d, start), ApplianceClass::EvCharger, 1_000.0, 0.0, 7_000);
        }
        let mut others = crate::rebound::ReboundGuard::default();
        others.add(window_end, &st.devices[&ApplianceId(2)], 1.0);
        st.rebound.cap_w = Some(1_000.0);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 7_000, payback(window_end, 60, 65));
        assert_eq!(st.guard_releases, vec![ApplianceId(1)]);
        // Queued, and again once the engine's release is applied: nothing of it is left.
        for step in ["queued", "released"] {
            let off = st.rebound.tail_w.iter().zip(&others.tail_w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(off < 1e-6, "{step}: projection off by {off} W");
            st.apply(ApplianceId(1), DeviceStatus::Released, start, 0, None);
        }
        assert_eq!(st.shave_rebound(start, 100), 0, "a queued device is not queued again");
    }

    /// A deferral the guard releases is weighed as ended when it is queued: the household's override that reaches
    /// the engine before the release reaches the device changes nothing more.
    #[test]
    fn an_override_after_the_guard_released_a_deferral_is_not_weighed_twice() {
        let (mut st, window_end, command) = event(10_000.0, 10);
        let start = st.record.spec.start_unix_ms;
        st.add_device(HouseholdId(1), command(1, start), ApplianceClass::EvCharger, 1_000.0, 0.5, 7_000);
        st.rebound.cap_w = Some(1_000.0);
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 7_000, payback(window_end, 60, 65));
        assert_eq!(st.guard_releases, vec![ApplianceId(1)]);
        let released = st.realised.clone();
        assert!(released.deviation_w.iter().all(|&w| w < 0.0), "{released:?}");
        st.apply(ApplianceId(1), DeviceStatus::Overridden, start + 3 * MS_PER_MIN, 0, None);
        assert_eq!(st.realised, released);
    }

    /// A paused charging session sheds its charger's full draw until the session would have ended, and nothing
    /// after: what it reports (an average over its deferral) says when that is. A fridge sheds its average
    /// throughout. Both in what the event delivered and in what the guard projects after the window; and
    /// overridden, the session runs late by as long as it was paused, from when it would have ended.
    #[test]
    fn a_paused_session_sheds_its_full_draw_until_it_would_have_ended() {
        let (mut st, window_end, command) = event(10_000.0, 20);
        let start = st.record.spec.start_unix_ms;
        st.add_device(HouseholdId(1), command(1, start), ApplianceClass::EvCharger, 0.0, 0.0, 7_000);
        st.add_device(HouseholdId(2), command(2, start), ApplianceClass::Fridge, 0.0, 0.0, 135);
        // The session had 15 of the deferral's 20 minutes left: it pays back those 15 minutes after release.
        st.apply(ApplianceId(1), DeviceStatus::Started, start, 5_250, payback(window_end, 10, 25));
        let fridge_payback = Payback { power_w: 135, ..payback(window_end, 30, 32).unwrap() };
        st.apply(ApplianceId(2), DeviceStatus::Started, start, 40, Some(fridge_payback));
        let delivered = st.delivered_w();
        assert!(delivered.iter().all(|&w| (w - 7_040.0).abs() < 1e-6), "{delivered:?}");
        let tail = &st.rebound.tail_w;
        let want = |k: usize| match k {
            0..5 => -7_040.0,
            5..10 => -40.0,
            10..25 => 7_000.0,
            30..32 => 135.0,
            _ => 0.0,
        };
        assert!((0..40).all(|k| (tail[k] - want(k)).abs() < 1e-6), "{:?}", &tail[..30]);
        // Overridden after 12 minutes, it charges the 12 minutes it was paused from when it would have ended.
        let ev = &st.devices[&ApplianceId(1)];
        assert_eq!(ev.payback_if_ended_at(start + 12 * MS_PER_MIN), payback(window_end, 5, 17));
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
