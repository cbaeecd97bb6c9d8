//! The head-end: delivers signed commands to devices over links, each link a device or a gateway that
//! multiplexes many devices.
//!
//! - Every link has a bounded queue of command batches. Delivery never waits on a link: a full queue leaves
//!   the command unacknowledged, and the retry tick sends it again later, so a slow link never stalls others.
//! - A command stays unacknowledged until its device reports receipt, and is given up and reported as expired
//!   at its expiry. Until then it is re-sent when it looks lost, not merely late: when a command sent after it
//!   down the same link has been acknowledged (links are ordered), or when the link has been silent about it
//!   for [`HeadEnd::silent_link_retry_ms`]. Re-sends back off exponentially (`retry_interval`, doubling up to
//!   [`RETRY_DOUBLINGS_MAX`] times). A link with more than half its queue unread gets no re-sends at all.
//!   Why: a gateway verifying a million commands acknowledges them a minute late; re-sending on a fixed
//!   interval sent each one ten times, and each copy came back as another receipt to process.
//! - A device with no link (offline) gets its commands when it attaches.
//! - Every command not yet expired is kept per device for resync after a reconnect.
//!
//! Time is passed in. The transport (gRPC streams) lives in the server; this crate sees only channels.

use ahash::RandomState;
use dashmap::DashMap;
use halftime_core::{ApplianceId, SignedCommand};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// Most commands in one batch sent down a link.
pub const BATCH_LEN_MAX: usize = 1024;
/// A command's retry delay doubles after each re-send, this many times at most (5 s becomes 80 s); a link silent
/// about a command for that long gets it again.
pub const RETRY_DOUBLINGS_MAX: u32 = 4;

#[derive(Clone, Debug)]
pub struct HeadEndConfig {
    /// Batches a link may have queued before it counts as slow.
    pub link_queue_batches: usize,
    /// Re-send an unacknowledged command after this long.
    pub retry_interval_ms: i64,
    /// Most commands held unacknowledged at once; beyond it, new dispatches are refused.
    pub outstanding_max: usize,
}

impl Default for HeadEndConfig {
    fn default() -> Self {
        Self { link_queue_batches: 256, retry_interval_ms: 5_000, outstanding_max: 20_000_000 }
    }
}

pub type LinkId = u64;

/// What a link receives: batches of commands.
pub type LinkReceiver = mpsc::Receiver<Vec<SignedCommand>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadEndError {
    #[error("head-end full: {outstanding} commands outstanding, {requested} more would pass the limit of {max}")]
    Full { outstanding: usize, requested: usize, max: usize },
}

/// A command kept for its device until it expires: for retries until acknowledged, and for resync.
struct Held {
    command: SignedCommand,
    acked: bool,
    next_retry_unix_ms: i64,
    /// Times re-sent since it was queued or its device attached.
    resends: u32,
    /// The link it last went into the queue of, and when; `None` if it has not (offline, or a full queue).
    sent: Option<(LinkId, i64)>,
}

impl Held {
    fn new(command: SignedCommand, next_retry_unix_ms: i64) -> Self {
        Self { command, acked: false, next_retry_unix_ms, resends: 0, sent: None }
    }

    fn expired(&self, now_unix_ms: i64) -> bool {
        self.command.command.not_after_unix_ms <= now_unix_ms
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    pub resent: u64,
    /// Not re-sent because the link's queue is more than half full, or it could not take them.
    pub deferred_by_backpressure: u64,
    /// Due but not re-sent: nothing sent after them down their link has been acknowledged yet.
    pub awaiting_link: u64,
}

struct Link {
    tx: mpsc::Sender<Vec<SignedCommand>>,
    /// The latest send time among the commands acknowledged through this link: a command sent before it and
    /// still unacknowledged was most likely lost.
    acked_sent_unix_ms: AtomicI64,
}

pub struct HeadEnd {
    config: HeadEndConfig,
    next_link: AtomicU64,
    links: DashMap<LinkId, Link>,
    // Per-device maps use aHash: they are looked up for every command, and SipHash was most of their cost.
    routes: DashMap<ApplianceId, LinkId, RandomState>,
    /// Every command not yet expired, per device; one map so a command costs one lookup and one copy.
    held: DashMap<ApplianceId, Vec<Held>, RandomState>,
    n_unacked: AtomicUsize,
}

impl std::fmt::Debug for HeadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadEnd").field("links", &self.links.len()).finish_non_exhaustive()
    }
}

impl HeadEnd {
    pub fn new(config: HeadEndConfig) -> Arc<Self> {
        assert!(config.link_queue_batches > 0 && config.retry_interval_ms > 0);
        Arc::new(Self {
            config,
            next_link: AtomicU64::new(1),
            links: DashMap::new(),
            routes: DashMap::with_hasher(RandomState::new()),
            held: DashMap::with_hasher(RandomState::new()),
            n_unacked: AtomicUsize::new(0),
        })
    }

    pub fn n_links(&self) -> usize {
        self.links.len()
    }

    pub fn n_unacked(&self) -> usize {
        self.n_unacked.load(Ordering::Relaxed)
    }

    /// Whether `n` more commands may be dispatched.
    pub fn admit(&self, n: usize) -> Result<(), HeadEndError> {
        let outstanding = self.n_unacked();
        if outstanding.saturating_add(n) > self.config.outstanding_max {
            return Err(HeadEndError::Full { outstanding, requested: n, max: self.config.outstanding_max });
        }
        Ok(())
    }

    /// Attaches a link serving `devices` (a later link for the same device takes over its route), and sends it
    /// whatever those devices have unacknowledged.
    pub fn attach(&self, devices: &[ApplianceId], now_unix_ms: i64) -> (LinkId, LinkReceiver) {
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.link_queue_batches);
        self.links.insert(id, Link { tx, acked_sent_unix_ms: AtomicI64::new(i64::MIN) });
        let mut pending = Vec::new();
        for &d in devices {
            self.routes.insert(d, id);
            if let Some(mut list) = self.held.get_mut(&d) {
                for h in list.iter_mut().filter(|h| !h.acked && !h.expired(now_unix_ms)) {
                    h.next_retry_unix_ms = now_unix_ms + self.config.retry_interval_ms;
                    h.resends = 0;
                    h.sent = Some((id, now_unix_ms));
                    pending.push(h.command);
                }
            }
        }
        metrics::gauge!("halftime_headend_links").set(self.links.len() as f64);
        self.send_to_link(id, pending);
        (id, rx)
    }

    /// Detaches a link; its devices become offline until they attach again.
    pub fn detach(&self, link: LinkId) {
        self.links.remove(&link);
        self.routes.retain(|_, l| *l != link);
        metrics::gauge!("halftime_headend_links").set(self.links.len() as f64);
    }

    /// Queues commands for delivery. Never waits: what a link cannot take now is re-sent by [`Self::tick`].
    pub fn enqueue(&self, commands: &[SignedCommand], now_unix_ms: i64) -> u64 {
        let mut by_link: HashMap<LinkId, Vec<SignedCommand>> = HashMap::new();
        for c in commands {
            let device = c.command.device;
            let mut list = self.held.entry(device).or_default();
            // Expired and unacknowledged ones stay for `tick` to report.
            list.retain(|h| !(h.acked && h.expired(now_unix_ms)));
            let mut held = Held::new(*c, now_unix_ms + self.config.retry_interval_ms);
            if let Some(link) = self.routes.get(&device).map(|l| *l) {
                held.sent = Some((link, now_unix_ms));
                by_link.entry(link).or_default().push(*c);
            }
            list.push(held);
        }
        self.n_unacked.fetch_add(commands.len(), Ordering::Relaxed);
        let mut deferred = 0;
        for (link, cmds) in by_link {
            deferred += self.send_to_link(link, cmds);
        }
        metrics::counter!("halftime_headend_commands_enqueued_total").increment(commands.len() as u64);
        deferred
    }

    /// Sends in batches; returns how many commands the link could not take now, and marks those as not sent.
    fn send_to_link(&self, link: LinkId, commands: Vec<SignedCommand>) -> u64 {
        let tx = self.links.get(&link).map(|l| l.tx.clone());
        let mut refused: Vec<SignedCommand> = Vec::new();
        for chunk in commands.chunks(BATCH_LEN_MAX) {
            if tx.as_ref().is_none_or(|tx| tx.try_send(chunk.to_vec()).is_err()) {
                refused.extend_from_slice(chunk);
            }
        }
        for c in &refused {
            if let Some(mut list) = self.held.get_mut(&c.command.device)
                && let Some(h) = list.iter_mut().find(|h| h.command.command.counter == c.command.counter)
            {
                h.sent = None;
            }
        }
        if !refused.is_empty() {
            metrics::counter!("halftime_headend_backpressure_total").increment(refused.len() as u64);
        }
        refused.len() as u64
    }

    /// A device acknowledged the command with this counter.
    pub fn ack(&self, device: ApplianceId, counter: u64) -> bool {
        let Some(mut list) = self.held.get_mut(&device) else {
            return false;
        };
        let Some(h) = list.iter_mut().find(|h| h.command.command.counter == counter && !h.acked) else {
            return false;
        };
        h.acked = true;
        if let Some((link, sent_unix_ms)) = h.sent
            && let Some(l) = self.links.get(&link)
        {
            l.acked_sent_unix_ms.fetch_max(sent_unix_ms, Ordering::Relaxed);
        }
        self.n_unacked.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Re-sends what is due and gives up on what has expired; returns the expired commands.
    pub fn tick(&self, now_unix_ms: i64) -> (Vec<SignedCommand>, TickReport) {
        let mut expired = Vec::new();
        let mut report = TickReport::default();
        // Per link: whether more than half its queue is unread, and the latest send time it has acknowledged.
        let links: HashMap<LinkId, (bool, i64)> = self
            .links
            .iter()
            .map(|l| {
                let busy = l.tx.capacity() < l.tx.max_capacity() / 2;
                (*l.key(), (busy, l.acked_sent_unix_ms.load(Ordering::Relaxed)))
            })
            .collect();
        let silent_ms = self.silent_link_retry_ms();
        let mut by_link: HashMap<LinkId, Vec<SignedCommand>> = HashMap::new();
        self.held.retain(|device, list| {
            list.retain_mut(|h| {
                if h.expired(now_unix_ms) {
                    if !h.acked {
                        expired.push(h.command);
                    }
                    return false;
                }
                if !h.acked && h.next_retry_unix_ms <= now_unix_ms {
                    // Unless re-sent below, looked at again next interval without counting as a re-send. Offline,
                    // it goes out when the device attaches.
                    h.next_retry_unix_ms = now_unix_ms + self.config.retry_interval_ms;
                    let Some(link) = self.routes.get(device).map(|l| *l) else { return true };
                    let (busy, acked_sent_unix_ms) = links.get(&link).copied().unwrap_or((false, i64::MIN));
                    let lost = match h.sent {
                        Some((l, sent_unix_ms)) if l == link => {
                            acked_sent_unix_ms > sent_unix_ms || now_unix_ms.saturating_sub(sent_unix_ms) >= silent_ms
                        }
                        // Never queued, or queued to a link the device has since left.
                        _ => true,
                    };
                    if busy {
                        report.deferred_by_backpressure += 1;
                    } else if !lost {
                        // Late behind a slow link, not lost: sending it again would only add to the queue.
                        report.awaiting_link += 1;
                    } else {
                        h.next_retry_unix_ms = now_unix_ms + self.retry_delay_ms(h.resends);
                        h.resends = h.resends.saturating_add(1);
                        h.sent = Some((link, now_unix_ms));
                        by_link.entry(link).or_default().push(h.command);
                    }
                }
                true
            });
            !list.is_empty()
        });
        self.n_unacked.fetch_sub(expired.len(), Ordering::Relaxed);
        if report.deferred_by_backpressure > 0 {
            metrics::counter!("halftime_headend_backpressure_total").increment(report.deferred_by_backpressure);
        }
        for (link, cmds) in by_link {
            report.resent += cmds.len() as u64;
            report.deferred_by_backpressure += self.send_to_link(link, cmds);
        }
        metrics::counter!("halftime_headend_resent_total").increment(report.resent);
        metrics::counter!("halftime_headend_awaiting_link_total").increment(report.awaiting_link);
        metrics::counter!("halftime_headend_expired_total").increment(expired.len() as u64);
        metrics::gauge!("halftime_headend_unacked").set(self.n_unacked() as f64);
        (expired, report)
    }

    /// How long after its `resends`-th re-send a command is tried again.
    fn retry_delay_ms(&self, resends: u32) -> i64 {
        self.config.retry_interval_ms.saturating_mul(1 << resends.min(RETRY_DOUBLINGS_MAX))
    }

    /// How long a link may stay silent about a command (acknowledging nothing sent after it) before it is sent
    /// again: the longest retry delay.
    pub fn silent_link_retry_ms(&self) -> i64 {
        self.retry_delay_ms(RETRY_DOUBLINGS_MAX)
    }

    /// Commands for a device that have not expired, oldest first (for resync after a reconnect).
    pub fn active_for(&self, device: ApplianceId, now_unix_ms: i64) -> Vec<SignedCommand> {
        self.held
            .get(&device)
            .map(|l| l.iter().filter(|h| !h.expired(now_unix_ms)).map(|h| h.command).collect())
            .unwrap_or_default()
    }

    /// Remembers a command for resync without sending it (recovery after a restart).
    pub fn restore_active(&self, command: SignedCommand) {
        let mut held = Held::new(command, i64::MAX);
        held.acked = true;
        self.held.entry(command.command.device).or_default().push(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::{CommandKind, DeferralCommand, EventId};

    fn cmd(device: u64, counter: u64, not_after: i64) -> SignedCommand {
        SignedCommand {
            command: DeferralCommand {
                kind: CommandKind::Defer,
                key_id: 1,
                device: ApplianceId(device),
                event: EventId(1),
                counter,
                not_before_unix_ms: 0,
                not_after_unix_ms: not_after,
                deferral_s: 60,
                randomize_start_s: 0,
            },
            signature: [0; 64],
        }
    }

    #[tokio::test]
    async fn delivers_acks_retries_and_expires() {
        let he = HeadEnd::new(HeadEndConfig { link_queue_batches: 4, retry_interval_ms: 1_000, outstanding_max: 100 });
        // Device 2 is offline when the command is queued and gets it on attach.
        let (_l1, mut rx1) = he.attach(&[ApplianceId(1)], 0);
        he.enqueue(&[cmd(1, 10, 60_000), cmd(2, 11, 60_000)], 0);
        assert_eq!(rx1.recv().await.unwrap().len(), 1);
        let (_l2, mut rx2) = he.attach(&[ApplianceId(2)], 10);
        assert_eq!(rx2.recv().await.unwrap()[0].command.counter, 11);
        assert_eq!(he.n_unacked(), 2);
        assert!(he.ack(ApplianceId(1), 10));
        assert!(!he.ack(ApplianceId(1), 10), "a second ack changes nothing");
        // Unacknowledged 11 is late, not lost, until its link has been silent for the longest retry delay; then
        // it is re-sent, and at its expiry given up.
        let (expired, report) = he.tick(2_000);
        assert!(expired.is_empty());
        assert_eq!((report.resent, report.awaiting_link), (0, 1));
        assert_eq!(he.silent_link_retry_ms(), 16_000);
        let (_, report) = he.tick(16_010);
        assert_eq!(report.resent, 1);
        assert_eq!(rx2.recv().await.unwrap()[0].command.counter, 11);
        let (expired, _) = he.tick(60_000);
        assert_eq!(expired.len(), 1);
        assert_eq!(he.n_unacked(), 0);
        assert!(he.active_for(ApplianceId(2), 60_000).is_empty());
        assert!(he.admit(100).is_ok());
        assert!(he.admit(101).is_err());
    }

    #[tokio::test]
    async fn a_slow_link_does_not_stall_another() {
        let he =
            HeadEnd::new(HeadEndConfig { link_queue_batches: 1, retry_interval_ms: 1_000, outstanding_max: 1_000_000 });
        let (_slow, _slow_rx) = he.attach(&[ApplianceId(1)], 0);
        let (_fast, mut fast_rx) = he.attach(&[ApplianceId(2)], 0);
        // The slow link never reads; its queue of one batch fills and the rest is deferred.
        let mut deferred = 0;
        for i in 0..5 {
            deferred += he.enqueue(&[cmd(1, 100 + i, 60_000), cmd(2, 200 + i, 60_000)], 0);
        }
        assert_eq!(deferred, 4 + 4, "the slow link and the fast one (whose queue is 1) both defer");
        let got = fast_rx.recv().await.unwrap();
        assert_eq!(got[0].command.counter, 200);
        he.ack(ApplianceId(2), 200);
        // Deferred commands reach the fast link on the next ticks as it drains.
        let mut seen = 1;
        for t in 1..10 {
            he.tick(t * 1_000);
            while let Ok(b) = fast_rx.try_recv() {
                seen += b.len();
                for c in b {
                    he.ack(c.command.device, c.command.counter);
                }
            }
        }
        assert_eq!(seen, 5);
    }

    #[tokio::test]
    async fn a_command_is_re_sent_once_a_later_one_down_its_link_is_acknowledged_with_backoff() {
        let he = HeadEnd::new(HeadEndConfig { link_queue_batches: 4, retry_interval_ms: 1_000, outstanding_max: 100 });
        let (_l, mut rx) = he.attach(&[ApplianceId(1), ApplianceId(2)], 0);
        he.enqueue(&[cmd(1, 10, 1_000_000)], 0);
        rx.recv().await.unwrap();
        // Device 2, on the same link, acknowledges a fresh command every half second; device 1 never does, so
        // its command looks lost and is re-sent after 1 s, then 1 s, 2 s, 4 s, 8 s, 16 s later, and every 16 s.
        let mut resent_at = Vec::new();
        for t in (0..=80_000).step_by(500) {
            he.enqueue(&[cmd(2, 1_000 + t as u64, 1_000_000)], t);
            he.ack(ApplianceId(2), 1_000 + t as u64);
            let (_, report) = he.tick(t);
            if report.resent > 0 {
                resent_at.push(t);
            }
            while rx.try_recv().is_ok() {}
        }
        assert_eq!(resent_at, [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 48_000, 64_000, 80_000]);
    }

    #[tokio::test]
    async fn nothing_is_re_sent_down_a_link_that_has_not_read_half_its_queue() {
        let he = HeadEnd::new(HeadEndConfig { link_queue_batches: 4, retry_interval_ms: 1_000, outstanding_max: 100 });
        let (_busy, _busy_rx) = he.attach(&[ApplianceId(2), ApplianceId(3), ApplianceId(4)], 0);
        for d in 2..=4 {
            he.enqueue(&[cmd(d, 20 + d, 1_000_000)], 0);
        }
        // Long past the silence limit, and still nothing goes.
        let (_, report) = he.tick(30_000);
        assert_eq!(report.resent, 0);
        assert_eq!(report.deferred_by_backpressure, 3);
        assert_eq!(he.n_unacked(), 3);
    }
}
