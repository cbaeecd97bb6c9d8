//! What a device checks before it obeys a command, with no I/O: signature and key id, the per-device replay
//! counter, expiry, and its own local caps. The device enforces these whatever the engine asks, so that even a
//! stolen signing key cannot hold an appliance off for longer than its maker allows.

use halftime_core::time::day_of;
use halftime_core::{ApplianceId, CommandKind, EventId, RejectReason, SignedCommand};
use halftime_signer::{TrustedKeys, VerifyError};

/// The device's own caps, set by the appliance maker (and the household).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePolicy {
    /// Longest single deferral the device accepts.
    pub deferral_s_max: u32,
    /// Most deferred seconds per UTC day.
    pub deferred_s_per_day_max: u32,
}

impl Default for DevicePolicy {
    fn default() -> Self {
        Self { deferral_s_max: 30 * 60, deferred_s_per_day_max: 90 * 60 }
    }
}

/// The device's decision on one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Defer over `[start_unix_ms, end_unix_ms)`.
    Defer {
        start_unix_ms: i64,
        end_unix_ms: i64,
    },
    /// End the active deferral of this event at `at_unix_ms`.
    Release {
        at_unix_ms: i64,
    },
    /// Already seen (a re-delivery): acknowledge again, do nothing.
    Duplicate,
    Reject(RejectReason),
}

/// The deferral a device is holding or will hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Active {
    pub event: EventId,
    pub counter: u64,
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
}

/// Retries come soon after the original; older counters are refused as replays by `last_counter`.
const N_RECENT: usize = 8;

#[derive(Clone, Debug)]
pub struct DeviceGuard {
    device: ApplianceId,
    policy: DevicePolicy,
    last_counter: u64,
    /// The last commands that verified, so a re-sent copy is recognised without verifying it again.
    recent: Vec<SignedCommand>,
    day: i64,
    deferred_s_today: u32,
    active: Option<Active>,
}

impl DeviceGuard {
    /// `last_counter` is the highest counter the device has accepted before (persisted by the maker).
    pub fn new(device: ApplianceId, policy: DevicePolicy, last_counter: u64) -> Self {
        Self { device, policy, last_counter, recent: Vec::new(), day: i64::MIN, deferred_s_today: 0, active: None }
    }

    pub fn device(&self) -> ApplianceId {
        self.device
    }

    /// The counter to persist so a restart cannot be replayed into.
    pub fn last_counter(&self) -> u64 {
        self.last_counter
    }

    pub fn active(&self) -> Option<Active> {
        self.active
    }

    /// Forgets the active deferral (it completed, was released or overridden).
    pub fn clear_active(&mut self) {
        self.active = None;
    }

    /// Checks a command. `random_offset_s` is the device's draw from `[0, randomize_start_s]`.
    pub fn check(
        &mut self,
        trusted: &TrustedKeys,
        signed: &SignedCommand,
        now_unix_ms: i64,
        random_offset_s: u32,
    ) -> Verdict {
        let c = &signed.command;
        if c.device != self.device {
            return Verdict::Reject(RejectReason::Malformed);
        }
        // A byte-for-byte copy of a command that already verified (a retry after a lost acknowledgement) needs
        // no second verification; anything else with a seen counter is verified and then refused as a replay.
        if self.recent.contains(signed) {
            return Verdict::Duplicate;
        }
        match trusted.verify(signed) {
            Ok(()) => {}
            Err(VerifyError::UnknownKey(_)) => return Verdict::Reject(RejectReason::UnknownKey),
            Err(VerifyError::BadSignature) => return Verdict::Reject(RejectReason::BadSignature),
        }
        if self.recent.iter().any(|r| r.command.counter == c.counter) {
            return Verdict::Duplicate;
        }
        if c.counter <= self.last_counter {
            return Verdict::Reject(RejectReason::Replayed);
        }
        // Authentic and fresh: this counter is now used, whatever the verdict.
        self.last_counter = c.counter;
        if self.recent.len() == N_RECENT {
            self.recent.remove(0);
        }
        self.recent.push(*signed);
        if now_unix_ms >= c.not_after_unix_ms {
            return Verdict::Reject(RejectReason::Expired);
        }
        if c.kind == CommandKind::Release {
            return match self.active {
                Some(a) if a.event == c.event => Verdict::Release { at_unix_ms: c.not_before_unix_ms.max(now_unix_ms) },
                _ => Verdict::Duplicate,
            };
        }
        // Saturating: the times come off the wire, and no value may make the device panic.
        let window_ms = c.not_after_unix_ms.saturating_sub(c.not_before_unix_ms);
        let allowed_ms = (i64::from(c.randomize_start_s) + i64::from(c.deferral_s)) * 1000;
        if c.deferral_s == 0 || window_ms <= 0 || window_ms > allowed_ms {
            return Verdict::Reject(RejectReason::Malformed);
        }
        if c.deferral_s > self.policy.deferral_s_max {
            return Verdict::Reject(RejectReason::ExceedsLocalCap);
        }
        let offset_ms = i64::from(random_offset_s.min(c.randomize_start_s)) * 1000;
        let start = c.not_before_unix_ms.saturating_add(offset_ms).max(now_unix_ms);
        let end = start.saturating_add(i64::from(c.deferral_s) * 1000).min(c.not_after_unix_ms);
        if end <= start {
            return Verdict::Reject(RejectReason::Expired);
        }
        if let Some(a) = self.active
            && a.end_unix_ms > start
        {
            return Verdict::Reject(RejectReason::ApplianceRefused);
        }
        let day = day_of(start);
        if day != self.day {
            self.day = day;
            self.deferred_s_today = 0;
        }
        let deferred_s = u32::try_from((end - start) / 1000).unwrap_or(u32::MAX);
        if self.deferred_s_today.saturating_add(deferred_s) > self.policy.deferred_s_per_day_max {
            return Verdict::Reject(RejectReason::DailyCapReached);
        }
        self.deferred_s_today += deferred_s;
        self.active = Some(Active { event: c.event, counter: c.counter, start_unix_ms: start, end_unix_ms: end });
        Verdict::Defer { start_unix_ms: start, end_unix_ms: end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::DeferralCommand;
    use halftime_signer::Signer;

    const NOW: i64 = 1_800_000_000_000;

    fn setup() -> (Signer, TrustedKeys, DeviceGuard) {
        let signer = Signer::from_seed([1; 32]);
        let mut trusted = TrustedKeys::new();
        trusted.add(signer.public_key()).unwrap();
        let guard =
            DeviceGuard::new(ApplianceId(7), DevicePolicy { deferral_s_max: 1200, deferred_s_per_day_max: 1800 }, 0);
        (signer, trusted, guard)
    }

    fn defer(counter: u64, deferral_s: u32) -> DeferralCommand {
        DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 0,
            device: ApplianceId(7),
            event: EventId(1),
            counter,
            not_before_unix_ms: NOW,
            not_after_unix_ms: NOW + (i64::from(deferral_s) + 30) * 1000,
            deferral_s,
            randomize_start_s: 30,
        }
    }

    #[test]
    fn accepts_a_good_command_and_rejects_its_replay() {
        let (signer, trusted, mut guard) = setup();
        let c = signer.sign(defer(5, 600));
        assert_eq!(
            guard.check(&trusted, &c, NOW, 10),
            Verdict::Defer { start_unix_ms: NOW + 10_000, end_unix_ms: NOW + 610_000 }
        );
        assert_eq!(
            guard.check(&trusted, &c, NOW, 0),
            Verdict::Duplicate,
            "a re-delivery is acknowledged, not re-applied"
        );
        // A copy with the same counter but other content is verified, not taken for the re-delivery.
        let mut forged = c;
        forged.command.deferral_s = 900;
        assert_eq!(guard.check(&trusted, &forged, NOW, 0), Verdict::Reject(RejectReason::BadSignature));
        guard.clear_active();
        let old = signer.sign(defer(4, 600));
        assert_eq!(guard.check(&trusted, &old, NOW, 0), Verdict::Reject(RejectReason::Replayed));
    }

    #[test]
    fn rejects_tampered_wrong_key_expired_and_misaddressed() {
        let (signer, trusted, mut guard) = setup();
        let mut tampered = signer.sign(defer(1, 600));
        tampered.command.deferral_s = 1200;
        assert_eq!(guard.check(&trusted, &tampered, NOW, 0), Verdict::Reject(RejectReason::BadSignature));
        let stranger = Signer::from_seed([2; 32]).sign(defer(2, 600));
        assert_eq!(guard.check(&trusted, &stranger, NOW, 0), Verdict::Reject(RejectReason::UnknownKey));
        // A correctly signed command whose key id field was altered fails too.
        let mut rekeyed = signer.sign(defer(3, 600));
        rekeyed.command.key_id ^= 1;
        assert!(matches!(
            guard.check(&trusted, &rekeyed, NOW, 0),
            Verdict::Reject(RejectReason::UnknownKey | RejectReason::BadSignature)
        ));
        let c = signer.sign(defer(4, 600));
        assert_eq!(guard.check(&trusted, &c, NOW + 700_000, 0), Verdict::Reject(RejectReason::Expired));
        let mut other = defer(5, 600);
        other.device = ApplianceId(8);
        assert_eq!(guard.check(&trusted, &signer.sign(other), NOW, 0), Verdict::Reject(RejectReason::Malformed));
        // Expiry must bound the deferral: a window longer than randomisation + deferral is refused.
        let mut open_ended = defer(6, 600);
        open_ended.not_after_unix_ms += 3_600_000;
        assert_eq!(guard.check(&trusted, &signer.sign(open_ended), NOW, 0), Verdict::Reject(RejectReason::Malformed));
    }

    #[test]
    fn local_caps_hold_even_for_correctly_signed_commands() {
        let (signer, trusted, mut guard) = setup();
        let long = signer.sign(defer(1, 1500));
        assert_eq!(guard.check(&trusted, &long, NOW, 0), Verdict::Reject(RejectReason::ExceedsLocalCap));
        // Daily total: 1200 s then 900 s passes 1800 s.
        assert!(matches!(guard.check(&trusted, &signer.sign(defer(2, 1200)), NOW, 0), Verdict::Defer { .. }));
        guard.clear_active();
        let mut later = defer(3, 900);
        later.not_before_unix_ms += 3_600_000;
        later.not_after_unix_ms += 3_600_000;
        assert_eq!(guard.check(&trusted, &signer.sign(later), NOW, 0), Verdict::Reject(RejectReason::DailyCapReached));
    }

    #[test]
    fn extreme_times_are_refused_not_a_panic() {
        let (signer, trusted, mut guard) = setup();
        let mut c = defer(1, 600);
        c.not_before_unix_ms = i64::MIN;
        c.not_after_unix_ms = i64::MAX;
        assert_eq!(guard.check(&trusted, &signer.sign(c), NOW, 0), Verdict::Reject(RejectReason::Malformed));
        let mut late = defer(2, 600);
        late.not_before_unix_ms = i64::MAX - 1;
        late.not_after_unix_ms = i64::MAX;
        late.randomize_start_s = u32::MAX;
        assert!(matches!(
            guard.check(&trusted, &signer.sign(late), NOW, u32::MAX),
            Verdict::Reject(_) | Verdict::Defer { .. }
        ));
    }

    #[test]
    fn release_ends_only_the_same_events_deferral() {
        let (signer, trusted, mut guard) = setup();
        assert!(matches!(guard.check(&trusted, &signer.sign(defer(1, 600)), NOW, 0), Verdict::Defer { .. }));
        let mut release = defer(2, 0);
        release.kind = CommandKind::Release;
        release.not_after_unix_ms = NOW + 600_000;
        assert_eq!(
            guard.check(&trusted, &signer.sign(release), NOW + 5_000, 0),
            Verdict::Release { at_unix_ms: NOW + 5_000 }
        );
        let mut other = release;
        other.counter = 3;
        other.event = EventId(9);
        assert_eq!(guard.check(&trusted, &signer.sign(other), NOW + 6_000, 0), Verdict::Duplicate);
    }
}
