//! The link runtime: one `DeviceLink.Attach` stream for one device or a gateway of many, kept up with
//! reconnects and jittered exponential backoff. Commands are checked by each device's [`DeviceGuard`],
//! applied through the maker's [`Appliance`], and reported back in batches. Deferrals keep running, end on
//! time, and can be overridden while the link is down; reports wait (bounded) for the next connection.

use crate::clock::real_duration;
use crate::guard::{DeviceGuard, DevicePolicy, Verdict};
use crate::{Appliance, Deferral, ResumeReason};
use halftime_core::time::Clock;
use halftime_core::{ApplianceId, DeviceReport, DeviceStatus, EventId, Payback, RejectReason, SignedCommand};
use halftime_proto::pb;
use halftime_proto::pb::device_link_client::DeviceLinkClient;
use halftime_signer::TrustedKeys;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Reports held while the link is down, at most; the oldest are dropped past this.
pub const PENDING_REPORTS_MAX: usize = 100_000;
/// Devices behind one link, at most.
pub const DEVICES_PER_LINK_MAX: usize = 100_000;

#[derive(Clone)]
pub struct LinkConfig {
    /// Engine address, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// Name for the engine's logs.
    pub name: String,
    /// Engine keys this link trusts, provisioned out of band.
    pub trusted: TrustedKeys,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub clock: Arc<dyn Clock>,
    /// Seed for backoff jitter and start randomisation.
    pub seed: u64,
}

impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig").field("endpoint", &self.endpoint).field("name", &self.name).finish_non_exhaustive()
    }
}

struct Device {
    guard: DeviceGuard,
    appliance: Arc<dyn Appliance>,
    /// Started, with its load shed.
    running: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Start,
    End,
    Release,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at_unix_ms: i64,
    kind: TimerKind,
    device: ApplianceId,
    counter: u64,
}

enum Control {
    Override(ApplianceId, oneshot::Sender<bool>),
    Shutdown,
}

/// Builds a link: add devices, then [`LinkBuilder::spawn`].
pub struct LinkBuilder {
    config: LinkConfig,
    devices: Vec<(ApplianceId, DeviceGuard, Arc<dyn Appliance>)>,
}

impl LinkBuilder {
    pub fn new(config: LinkConfig) -> Self {
        Self { config, devices: Vec::new() }
    }

    /// Adds a device with its own caps; `last_counter` is the highest counter it accepted before.
    pub fn device(
        mut self,
        id: ApplianceId,
        policy: DevicePolicy,
        last_counter: u64,
        appliance: Arc<dyn Appliance>,
    ) -> Self {
        assert!(self.devices.len() < DEVICES_PER_LINK_MAX, "too many devices on one link");
        self.devices.push((id, DeviceGuard::new(id, policy, last_counter), appliance));
        self
    }

    /// Starts the link on the current Tokio runtime.
    pub fn spawn(self) -> LinkHandle {
        let (control_tx, control_rx) = mpsc::channel(1024);
        let (connected_tx, connected_rx) = watch::channel(false);
        let clock = Arc::clone(&self.config.clock);
        let runtime = Runtime {
            rng: SmallRng::seed_from_u64(self.config.seed),
            config: self.config,
            ids: self.devices.iter().map(|d| d.0.0).collect(),
            devices: self
                .devices
                .into_iter()
                .map(|(id, guard, appliance)| (id, Device { guard, appliance, running: None }))
                .collect(),
            timers: BinaryHeap::new(),
            outbox: Outbox { pending: VecDeque::new(), dropped: 0, clock },
            connected: connected_tx,
        };
        let task = tokio::spawn(runtime.run(control_rx));
        LinkHandle { control: control_tx, connected: connected_rx, task }
    }
}

/// A running link.
pub struct LinkHandle {
    control: mpsc::Sender<Control>,
    connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle").field("connected", &*self.connected.borrow()).finish()
    }
}

impl LinkHandle {
    /// The household overrides the device's deferral now. Returns whether one was active or scheduled.
    pub async fn override_now(&self, device: ApplianceId) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Override(device, tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Waits until the link has been accepted by the engine.
    pub async fn wait_connected(&mut self) {
        let _ = self.connected.wait_for(|c| *c).await;
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Stops the link: deferrals in progress are resumed first.
    pub async fn shutdown(self) {
        let _ = self.control.send(Control::Shutdown).await;
        let _ = self.task.await;
    }
}

struct Runtime {
    config: LinkConfig,
    rng: SmallRng,
    ids: Vec<u64>,
    devices: HashMap<ApplianceId, Device>,
    timers: BinaryHeap<Reverse<Timer>>,
    outbox: Outbox,
    connected: watch::Sender<bool>,
}

/// Reports waiting to go up, bounded: when full, the oldest goes.
struct Outbox {
    pending: VecDeque<pb::StatusReport>,
    dropped: u64,
    clock: Arc<dyn Clock>,
}

impl Outbox {
    fn report(
        &mut self,
        device: ApplianceId,
        event: EventId,
        counter: u64,
        status: DeviceStatus,
        reason: Option<RejectReason>,
        reduction_w: u32,
    ) {
        self.report_payback(device, event, counter, status, reason, reduction_w, None);
    }

    /// A report with the appliance's payback forecast.
    #[allow(clippy::too_many_arguments)]
    fn report_payback(
        &mut self,
        device: ApplianceId,
        event: EventId,
        counter: u64,
        status: DeviceStatus,
        reason: Option<RejectReason>,
        reduction_w: u32,
        payback: Option<Payback>,
    ) {
        if self.pending.len() >= PENDING_REPORTS_MAX {
            self.pending.pop_front();
            self.dropped += 1;
        }
        let r = DeviceReport {
            device,
            event,
            counter,
            status,
            reject_reason: reason,
            at_unix_ms: self.clock.now_unix_ms(),
            reduction_w,
            payback,
        };
        self.pending.push_back(halftime_proto::report_to_pb(&r));
    }
}

enum Exit {
    Shutdown,
    Disconnected(String),
}

impl Runtime {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        let mut backoff = self.config.backoff_min;
        let mut first = true;
        loop {
            match self.session(&mut control, first).await {
                Exit::Shutdown => break,
                Exit::Disconnected(why) => {
                    if *self.connected.borrow() {
                        // It was up: start the backoff afresh.
                        backoff = self.config.backoff_min;
                    }
                    let _ = self.connected.send(false);
                    tracing::debug!(link = %self.config.name, %why, "link down");
                }
            }
            first = false;
            // Full jitter: sleep a random time up to the current backoff, then double it.
            let wait = Duration::from_millis(self.rng.gen_range(0..=backoff.as_millis() as u64));
            if self.idle(&mut control, wait).await {
                break;
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        self.stop();
    }

    /// Waits `wait` while still running timers and overrides; returns true on shutdown.
    async fn idle(&mut self, control: &mut mpsc::Receiver<Control>, wait: Duration) -> bool {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let next = self.next_timer_sleep().min(until.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(next) => {
                    self.fire_timers();
                    if tokio::time::Instant::now() >= until {
                        return false;
                    }
                }
                c = control.recv() => match c {
                    Some(Control::Override(d, tx)) => { let _ = tx.send(self.override_device(d)); }
                    Some(Control::Shutdown) | None => return true,
                },
            }
        }
    }

    /// Shutting down: whatever is deferred resumes now.
    fn stop(&mut self) {
        for d in self.devices.values_mut() {
            if let (Some(a), Some(_)) = (d.guard.active(), d.running.take()) {
                d.appliance.resume(&deferral_of(a), ResumeReason::Released);
            }
        }
    }

    async fn session(&mut self, control: &mut mpsc::Receiver<Control>, first: bool) -> Exit {
        let channel = match Endpoint::from_shared(self.config.endpoint.clone()) {
            Ok(e) => match e.connect_timeout(Duration::from_secs(5)).connect().await {
                Ok(c) => c,
                Err(e) => return Exit::Disconnected(e.to_string()),
            },
            Err(e) => return Exit::Disconnected(e.to_string()),
        };
        let mut client = DeviceLinkClient::new(channel.clone()).max_decoding_message_size(16 * 1024 * 1024);
        let (up_tx, up_rx) = mpsc::channel::<pb::Uplink>(256);
        let hello = pb::Uplink {
            msg: Some(pb::uplink::Msg::Hello(pb::Hello {
                link_name: self.config.name.clone(),
                device_ids: self.ids.clone(),
            })),
        };
        if up_tx.send(hello).await.is_err() {
            return Exit::Disconnected("uplink closed".into());
        }
        let mut down = match client.attach(ReceiverStream::new(up_rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Exit::Disconnected(s.to_string()),
        };
        match down.message().await {
            Ok(Some(pb::Downlink { msg: Some(pb::downlink::Msg::HelloAck(_)) })) => {}
            Ok(_) => return Exit::Disconnected("no hello ack".into()),
            Err(s) => return Exit::Disconnected(s.to_string()),
        }
        let _ = self.connected.send(true);
        if !first && let Err(why) = self.resync(&channel).await {
            return Exit::Disconnected(why);
        }
        loop {
            while !self.outbox.pending.is_empty() {
                let n = self.outbox.pending.len().min(halftime_proto::REPORT_BATCH_MAX);
                let reports: Vec<pb::StatusReport> = self.outbox.pending.drain(..n).collect();
                let msg = pb::Uplink { msg: Some(pb::uplink::Msg::Reports(pb::ReportBatch { reports })) };
                if up_tx.send(msg).await.is_err() {
                    return Exit::Disconnected("uplink closed".into());
                }
            }
            let sleep = self.next_timer_sleep();
            tokio::select! {
                m = down.message() => match m {
                    Ok(Some(pb::Downlink { msg: Some(pb::downlink::Msg::Commands(batch)) })) => self.on_commands(&batch.commands),
                    Ok(Some(_)) => {}
                    Ok(None) => return Exit::Disconnected("engine closed the stream".into()),
                    Err(s) => return Exit::Disconnected(s.to_string()),
                },
                _ = tokio::time::sleep(sleep) => self.fire_timers(),
                c = control.recv() => match c {
                    Some(Control::Override(d, tx)) => { let _ = tx.send(self.override_device(d)); }
                    Some(Control::Shutdown) | None => return Exit::Shutdown,
                },
            }
        }
    }

    /// After a reconnect, asks for every device's active commands (the engine also re-sends unacknowledged ones).
    async fn resync(&mut self, channel: &Channel) -> Result<(), String> {
        let mut client = DeviceLinkClient::new(channel.clone());
        for id in self.ids.clone() {
            let r = client.resync(pb::ResyncRequest { device_id: id }).await.map_err(|s| s.to_string())?;
            self.on_commands(&r.into_inner().commands);
        }
        Ok(())
    }

    fn on_commands(&mut self, commands: &[pb::SignedCommand]) {
        let now = self.config.clock.now_unix_ms();
        for pc in commands {
            let device = ApplianceId(pc.device_id);
            let Ok(cmd) = halftime_proto::command_from_pb(pc) else {
                self.outbox.report(
                    device,
                    EventId(pc.event_id),
                    pc.counter,
                    DeviceStatus::Rejected,
                    Some(RejectReason::Malformed),
                    0,
                );
                continue;
            };
            self.on_command(&cmd, now);
        }
    }

    fn on_command(&mut self, cmd: &SignedCommand, now: i64) {
        let c = cmd.command;
        let offset = self.rng.gen_range(0..=c.randomize_start_s);
        let Some(d) = self.devices.get_mut(&c.device) else {
            self.outbox.report(c.device, c.event, c.counter, DeviceStatus::Rejected, Some(RejectReason::Malformed), 0);
            return;
        };
        let verdict = d.guard.check(&self.config.trusted, cmd, now, offset);
        match verdict {
            Verdict::Defer { start_unix_ms, end_unix_ms } => {
                self.outbox.report(c.device, c.event, c.counter, DeviceStatus::Received, None, 0);
                self.timers.push(Reverse(Timer {
                    at_unix_ms: start_unix_ms,
                    kind: TimerKind::Start,
                    device: c.device,
                    counter: c.counter,
                }));
                self.timers.push(Reverse(Timer {
                    at_unix_ms: end_unix_ms,
                    kind: TimerKind::End,
                    device: c.device,
                    counter: c.counter,
                }));
                self.fire_timers();
            }
            Verdict::Release { at_unix_ms } => {
                let active = d.guard.active().map(|a| a.counter).unwrap_or(0);
                self.outbox.report(c.device, c.event, c.counter, DeviceStatus::Received, None, 0);
                self.timers.push(Reverse(Timer {
                    at_unix_ms,
                    kind: TimerKind::Release,
                    device: c.device,
                    counter: active,
                }));
                self.fire_timers();
            }
            Verdict::Duplicate => self.outbox.report(c.device, c.event, c.counter, DeviceStatus::Received, None, 0),
            Verdict::Reject(reason) => {
                tracing::debug!(device = %c.device, ?reason, "command rejected");
                self.outbox.report(c.device, c.event, c.counter, DeviceStatus::Rejected, Some(reason), 0);
            }
        }
    }

    fn next_timer_sleep(&self) -> Duration {
        match self.timers.peek() {
            Some(Reverse(t)) => real_duration(&*self.config.clock, t.at_unix_ms - self.config.clock.now_unix_ms()),
            None => Duration::from_secs(3600),
        }
    }

    fn fire_timers(&mut self) {
        let now = self.config.clock.now_unix_ms();
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at_unix_ms > now {
                break;
            }
            self.timers.pop();
            let Some(d) = self.devices.get_mut(&t.device) else {
                continue;
            };
            // A timer for a deferral that has since ended (override, release) is stale.
            let Some(active) = d.guard.active().filter(|a| a.counter == t.counter) else {
                continue;
            };
            let deferral = deferral_of(active);
            match t.kind {
                TimerKind::Start => {
                    // A device that slept through the window (suspended, or its clock jumped) is too late.
                    let started = if now >= deferral.end_unix_ms {
                        Err(RejectReason::Expired)
                    } else {
                        d.appliance.defer(&deferral).map_err(|why| {
                            tracing::debug!(device = %t.device, %why, "appliance refused");
                            RejectReason::ApplianceRefused
                        })
                    };
                    let (status, reason, reduction_w, payback) = match started {
                        Ok(reduction_w) => {
                            d.running = Some(reduction_w);
                            let payback = d.appliance.payback(&deferral, deferral.end_unix_ms);
                            (DeviceStatus::Started, None, reduction_w, payback)
                        }
                        Err(reason) => {
                            d.guard.clear_active();
                            (DeviceStatus::Rejected, Some(reason), 0, None)
                        }
                    };
                    let (event, counter) = (active.event, active.counter);
                    self.outbox.report_payback(t.device, event, counter, status, reason, reduction_w, payback);
                }
                TimerKind::End | TimerKind::Release => {
                    let mut payback = None;
                    if d.running.take().is_some() {
                        let reason =
                            if t.kind == TimerKind::End { ResumeReason::Completed } else { ResumeReason::Released };
                        d.appliance.resume(&deferral, reason);
                        payback = d.appliance.payback(&deferral, now.min(deferral.end_unix_ms));
                    }
                    d.guard.clear_active();
                    let status =
                        if t.kind == TimerKind::End { DeviceStatus::Completed } else { DeviceStatus::Released };
                    let (event, counter) = (active.event, active.counter);
                    self.outbox.report_payback(t.device, event, counter, status, None, 0, payback);
                }
            }
        }
    }

    fn override_device(&mut self, device: ApplianceId) -> bool {
        let Some(d) = self.devices.get_mut(&device) else {
            return false;
        };
        let Some(active) = d.guard.active() else {
            return false;
        };
        let mut payback = None;
        if d.running.take().is_some() {
            let deferral = deferral_of(active);
            d.appliance.resume(&deferral, ResumeReason::Overridden);
            let now = self.config.clock.now_unix_ms();
            payback = d.appliance.payback(&deferral, now.min(deferral.end_unix_ms));
        }
        d.guard.clear_active();
        let (event, counter) = (active.event, active.counter);
        self.outbox.report_payback(device, event, counter, DeviceStatus::Overridden, None, 0, payback);
        true
    }
}

fn deferral_of(a: crate::guard::Active) -> Deferral {
    Deferral { event: a.event, counter: a.counter, start_unix_ms: a.start_unix_ms, end_unix_ms: a.end_unix_ms }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ScaledClock;

    #[test]
    fn a_full_outbox_drops_its_oldest_report() {
        let mut outbox = Outbox { pending: VecDeque::new(), dropped: 0, clock: Arc::new(ScaledClock::new(0, 1.0)) };
        let n = PENDING_REPORTS_MAX as u64 + 3;
        for counter in 0..n {
            outbox.report(ApplianceId(1), EventId(1), counter, DeviceStatus::Received, None, 0);
        }
        assert_eq!(outbox.pending.len(), PENDING_REPORTS_MAX);
        assert_eq!(outbox.dropped, 3);
        let kept: Vec<u64> = Vec::from(std::mem::take(&mut outbox.pending)).iter().map(|r| r.counter).collect();
        assert_eq!(kept.first(), Some(&3), "the three oldest went");
        assert_eq!(kept.last(), Some(&(n - 1)));
    }
}
