//! The Halftime engine: the main path from a stress event to signed commands queued at the head-end, and the
//! closed loop back from device reports. Transport-free: the gRPC server and the scenario runner drive it.
//!
//! Submit: validate, record durably (with its idempotency key), plan and pick on a blocking thread (cohorts,
//! LP, least-burdened first, atomic reservations in the ledger), sign, make reservations, commands and the
//! counter high-water mark durable in one transaction, then queue at the head-end and answer with the plan.

mod dispatch;
mod rebound;
mod registry;
mod runtime;

pub use registry::Registry;
pub use runtime::add_interval;

use dashmap::DashMap;
use halftime_core::physics::override_chance;
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_core::validate::{self, StressEventInput};
use halftime_core::{
    Appliance, ApplianceClass, ApplianceId, CommandKind, DeferralCommand, DeviceReport, DeviceStatus, EventId,
    EventProgress, EventRecord, EventState, FieldError, HouseholdId, Limits, Outcome, Payback, PlanSummary, Priority,
    RegionId, RegionSet, SignedCommand, StressEventSpec,
};
use halftime_headend::{HeadEnd, HeadEndConfig, LinkId, LinkReceiver};
use halftime_ledger::Ledger;
use halftime_signer::Signer;
use halftime_store::{Dispatch, Store};
use runtime::EventRuntime;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub regions: RegionSet,
    /// System-wide fairness caps; a household's effective limits are the tighter of these and its own.
    pub system_caps: Limits,
    /// Rebound in any slot may not exceed this fraction of the event's peak reduction (see `rebound_reference`).
    pub rebound_fraction_max: f64,
    /// What the rebound cap is a fraction of.
    pub rebound_reference: ReboundReference,
    /// Standard deviations of the scatter among individual appliances that the planned rebound leaves room for
    /// under the cap (a plan to the cap itself would break it about half the time).
    pub rebound_sigmas: f64,
    /// Standard deviations of the scatter among individual appliances that the planned reduction leaves room
    /// for above the target, so that what the devices really shed meets it (a plan to the target itself would
    /// fall short about half the time).
    pub delivery_sigmas: f64,
    pub fairness_window_days: u32,
    pub retention_days: u32,
    /// Devices pick a random start offset in [0, this] (IEEE 2030.5 randomizeStart).
    pub randomize_start_s: u32,
    /// Cancel staggers releases over this many minutes unless the request says otherwise.
    pub release_over_min_default: u32,
    pub headend: HeadEndConfig,
    /// Real time between ticks of the closed loop (retries, expiries, progress).
    pub tick_interval_ms: u64,
    /// Top an event up when its started devices report shedding less than the plan expected of them (a share
    /// of the EV chargers it counted on were not charging): the shortfall they foretell is planned again, from
    /// the next minute, among appliances not yet deferred.
    pub top_up: bool,
    /// Hold each event's rebound under this share of its cap by what its devices say they will pay back: a
    /// device whose payback lands where the projection is over is released as soon as it says so (see
    /// `rebound.rs`). Plans expect no more than this share either. 0 turns the guard off. Below 1 because the
    /// cap is a share of the planned peak reduction, and what the devices really deliver at the peak scatters
    /// around it.
    pub rebound_guard_share: f64,
    /// Dispatches planned and signed at once, at most; more wait their turn. Each holds a scan of the whole
    /// eligible population, so this bounds memory as well as CPU under a burst of submissions.
    pub plans_in_flight_max: usize,
}

/// What an event's rebound cap is a fraction of (`"delivered_peak"` or `"peak_target"` in a config file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReboundReference {
    /// The peak reduction the plan delivers (at most the peak target): where a plan falls short, its rebound
    /// shrinks with it. Every kWh shed comes back, so a fleet that cannot push its payback past the next hours
    /// (fridges and freezers alone) or is too small to stagger it (one heater's payback is more than the
    /// share) gets no plan at all for a long event; it reports the whole target as shortfall.
    #[default]
    DeliveredPeak,
    /// The event's peak target, whatever the plan delivers: such fleets deliver something, and their rebound may
    /// be a larger share of what they deliver.
    PeakTarget,
}

impl EngineConfig {
    /// How far under the cap, as a share of it, each plan keeps its expected rebound at least: down to the
    /// rebound guard's line, so that the guard acts on what the devices do beyond the plan, not on the plan.
    pub fn rebound_margin_share(&self) -> f64 {
        if self.rebound_guard_share > 0.0 { 1.0 - self.rebound_guard_share } else { 0.0 }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            regions: RegionSet::gb_dno_areas(),
            system_caps: Limits::system_default(),
            rebound_fraction_max: 0.1,
            rebound_reference: ReboundReference::DeliveredPeak,
            rebound_sigmas: 2.0,
            delivery_sigmas: 1.5,
            // A month: who goes first is decided by burden over the month, so deferrals even out over a
            // season. With a week, a household deferred for 30 minutes tied a week later with one deferred for
            // 5, and the burden bands saw almost everyone at zero.
            fairness_window_days: 30,
            retention_days: 30,
            randomize_start_s: 30,
            release_over_min_default: 5,
            headend: HeadEndConfig::default(),
            tick_interval_ms: 200,
            top_up: true,
            rebound_guard_share: 0.95,
            plans_in_flight_max: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<halftime_store::StoreError> for EngineError {
    fn from(e: halftime_store::StoreError) -> Self {
        EngineError::Internal(e.to_string())
    }
}

/// What an operator may ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// Regions the caller may target; `None` for all.
    pub regions: Option<Vec<RegionId>>,
    /// Largest per-slot target the caller may ask for, W.
    pub target_w_max: f64,
}

impl Grant {
    pub fn unrestricted() -> Self {
        Self { regions: None, target_w_max: f64::INFINITY }
    }
}

/// A stress event as submitted, before validation.
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitRequest {
    pub regions: Vec<String>,
    pub start_unix_ms: i64,
    pub target_mw: Vec<f64>,
    pub target_kw: Vec<f64>,
    pub deferral_min_max: u32,
    pub priority: Priority,
    pub idempotency_key: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Flexibility {
    /// The engine's clock when this was computed.
    pub as_of_unix_ms: i64,
    pub deferrable_w: f64,
    pub n_appliances_eligible: u64,
    pub by_class: Vec<(ApplianceClass, f64, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub event: EventId,
    pub appliance: ApplianceId,
    pub class: ApplianceClass,
    pub not_before_unix_ms: i64,
    pub not_after_unix_ms: i64,
    pub deferral_s: u32,
    pub status: DeviceStatus,
}

pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) store: Arc<Store>,
    pub(crate) ledger: Ledger,
    pub(crate) registry: Registry,
    pub(crate) signer: Signer,
    pub(crate) next_counter: AtomicU64,
    headend: Arc<HeadEnd>,
    events: DashMap<EventId, Arc<EventRuntime>>,
    next_event_id: AtomicU64,
    key_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    plan_permits: tokio::sync::Semaphore,
    limits_writes: mpsc::Sender<LimitsWrite>,
    outcomes: mpsc::Sender<WriterMsg>,
    stopping: watch::Sender<bool>,
}

/// A household's limits on their way to the store.
struct LimitsWrite {
    household: HouseholdId,
    limits: Limits,
    done: tokio::sync::oneshot::Sender<Result<(), EngineError>>,
}

enum WriterMsg {
    Outcome(Outcome),
    /// Write what is queued, then stop and let go of the store.
    Stop(tokio::sync::oneshot::Sender<()>),
}

/// The engine. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Outcomes queued for the store at most; reports wait when it is full.
const OUTCOME_QUEUE_LEN: usize = 65_536;
/// Outcomes written per store transaction at most.
const OUTCOME_BATCH_LEN: usize = 16_384;
/// Limit changes waiting for the store at most; callers wait when it is full.
const LIMITS_QUEUE_LEN: usize = 8_192;
/// Limit changes written per store transaction at most.
const LIMITS_BATCH_LEN: usize = 4_096;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| EngineError::Internal(format!("blocking task: {e}")))
}

impl Engine {
    /// Opens the engine on a data directory, restoring everything it held, and starts its background tasks
    /// (the closed-loop tick and the outcome writer) on the current Tokio runtime.
    pub async fn open(config: EngineConfig, data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, EngineError> {
        let dir = data_dir.to_path_buf();
        let store = Arc::new(blocking(move || Store::open(&dir)).await??);
        let s = Arc::clone(&store);
        let signer = blocking(move || -> Result<Signer, EngineError> {
            match s.signing_seed()? {
                Some(seed) => Ok(Signer::from_seed(seed)),
                None => {
                    let signer = Signer::generate().map_err(|e| EngineError::Internal(e.to_string()))?;
                    s.set_signing_seed(&signer.seed())?;
                    Ok(signer)
                }
            }
        })
        .await??;
        let (outcome_tx, outcome_rx) = mpsc::channel(OUTCOME_QUEUE_LEN);
        let (limits_tx, limits_rx) = mpsc::channel(LIMITS_QUEUE_LEN);
        let plans_in_flight_max = config.plans_in_flight_max.max(1);
        let inner = Arc::new(Inner {
            ledger: Ledger::new(config.system_caps.clone(), config.fairness_window_days, config.retention_days),
            registry: Registry::new(config.regions.len()),
            headend: HeadEnd::new(config.headend.clone()),
            config,
            clock,
            store,
            signer,
            next_counter: AtomicU64::new(1),
            events: DashMap::new(),
            next_event_id: AtomicU64::new(1),
            key_locks: DashMap::new(),
            plan_permits: tokio::sync::Semaphore::new(plans_in_flight_max),
            limits_writes: limits_tx,
            outcomes: outcome_tx,
            stopping: watch::channel(false).0,
        });
        let engine = Engine { inner };
        engine.recover().await?;
        tokio::spawn(write_outcomes(Arc::clone(&engine.inner.store), outcome_rx));
        tokio::spawn(tick_loop(Arc::downgrade(&engine.inner)));
        tokio::spawn(write_limits(Arc::downgrade(&engine.inner), limits_rx));
        Ok(engine)
    }

    async fn recover(&self) -> Result<(), EngineError> {
        let store = Arc::clone(&self.inner.store);
        let (appliances, limits, events, dispatches, outcomes, hwm) = blocking(move || {
            Ok::<_, EngineError>((
                store.appliances()?,
                store.limits()?,
                store.events()?,
                store.dispatches()?,
                store.outcomes()?,
                store.counter_hwm()?,
            ))
        })
        .await??;
        let inner = &self.inner;
        let n_regions = inner.config.regions.len();
        if let Some(a) = appliances.iter().find(|a| usize::from(a.region.0) >= n_regions) {
            return Err(EngineError::Internal(format!(
                "the store holds appliance {} in region #{}, but the configuration has only {n_regions} regions: \
                 regions may be added at the end of the list, never removed or reordered",
                a.id, a.region.0
            )));
        }
        inner.registry.upsert(&appliances);
        for a in &appliances {
            inner.ledger.ensure_household(a.household);
        }
        for (h, l) in limits {
            inner.ledger.set_limits(h, l);
        }
        // Counters past the high-water mark were never issued; skipping the rest of a lease never reuses one.
        inner.next_counter.store(hwm + 1, Ordering::SeqCst);
        let mut max_id = 0;
        for record in events {
            max_id = max_id.max(record.id.0);
            inner.events.insert(record.id, Arc::new(EventRuntime::new(record)));
        }
        inner.next_event_id.store(max_id + 1, Ordering::SeqCst);
        for (event, _, d) in dispatches {
            for r in &d.reservations {
                inner.ledger.restore(*r, DeviceStatus::Dispatched);
            }
            let Some(rt) = inner.events.get(&event).map(|e| Arc::clone(&e)) else {
                continue;
            };
            let mut st = rt.lock();
            for c in &d.commands {
                inner.headend.restore_active(*c);
                if c.command.kind == CommandKind::Defer
                    && let Some(a) = inner.registry.get(c.command.device)
                {
                    let p = override_chance(a.override_rate(), f64::from(c.command.deferral_s) / 60.0);
                    st.add_device(a.household, c.command, a.class, a.expected_reduction_w(), p, a.rated_power_w);
                }
            }
        }
        // Payback forecasts are not stored: after a restart the guard counts on class averages.
        for o in outcomes {
            // The first `Released` a deferral has is the engine's own (it is stored before it is sent): charged
            // until the device says it resumed, as when it was sent. An override is the household's: ended then.
            self.apply_outcome(&o, None, o.status == DeviceStatus::Released);
        }
        for e in inner.events.iter() {
            e.advance_and_publish(inner.clock.now_unix_ms());
        }
        tracing::info!(
            appliances = inner.registry.len(),
            events = inner.events.len(),
            counter_next = inner.next_counter.load(Ordering::SeqCst),
            "engine recovered"
        );
        Ok(())
    }

    /// What an event's rebound cap is a fraction of: the peak reduction its plan promises (at most its peak
    /// target; `None` before anything is planned) or its peak target, as configured.
    fn rebound_reference_w(&self, st: &runtime::RuntimeState) -> Option<f64> {
        let peak_target_w = st.record.spec.target_peak_w();
        match self.inner.config.rebound_reference {
            ReboundReference::DeliveredPeak => {
                let peak_planned_w = st.record.plan.expected_w.iter().copied().fold(0.0, f64::max);
                (peak_planned_w > 0.0).then(|| peak_planned_w.min(peak_target_w))
            }
            ReboundReference::PeakTarget => Some(peak_target_w),
        }
    }

    /// Applies a status change to its event; returns the event, and whether its rebound guard now has devices
    /// to release.
    /// `charge_until_resumed` is for a release the engine sends: the event stops counting the device's shed at
    /// once, but the ledger charges the deferral in full until the device says it resumed. A release may never
    /// reach the device, and budget given back at once could defer another of the household's appliances while
    /// this one still waits (at 120x virtual time, a second of delivery is two minutes of deferral).
    fn apply_outcome(
        &self,
        o: &Outcome,
        payback: Option<Payback>,
        charge_until_resumed: bool,
    ) -> Option<(Arc<EventRuntime>, bool)> {
        let rt = self.inner.events.get(&o.event).map(|e| Arc::clone(&e))?;
        let (applied, guard_pending) = {
            let mut st = rt.lock();
            let mut applied = st.apply(o.appliance, o.status, o.at_unix_ms, o.reduction_w, payback);
            if charge_until_resumed
                && let (runtime::Applied::EndEarly(_), Some(t)) = (applied, st.devices.get_mut(&o.appliance))
            {
                t.resume_unconfirmed = true;
                applied = runtime::Applied::Status;
            }
            (applied, !st.guard_releases.is_empty())
        };
        match applied {
            runtime::Applied::Unknown => return None,
            runtime::Applied::Ignored => {}
            runtime::Applied::Status => self.inner.ledger.set_status(o.household, o.event, o.appliance, o.status),
            runtime::Applied::EndEarly(at) => {
                self.inner.ledger.end_early(o.household, o.event, o.appliance, at, o.status);
            }
        }
        Some((rt, guard_pending))
    }

    pub fn now_unix_ms(&self) -> i64 {
        self.inner.clock.now_unix_ms()
    }

    pub fn regions(&self) -> &RegionSet {
        &self.inner.config.regions
    }

    pub fn key_id(&self) -> u32 {
        self.inner.signer.key_id()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.inner.signer.public_key()
    }

    pub fn n_appliances(&self) -> usize {
        self.inner.registry.len()
    }

    /// The ledger, for invariant checks.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn appliance(&self, id: ApplianceId) -> Option<Appliance> {
        self.inner.registry.get(id)
    }

    /// Enrols or updates appliances (already validated): durable first, then live.
    pub async fn enrol(&self, appliances: Vec<Appliance>) -> Result<(u64, u64), EngineError> {
        let store = Arc::clone(&self.inner.store);
        let appliances = blocking(move || store.put_appliances(&appliances).map(|()| appliances)).await??;
        for a in &appliances {
            self.inner.ledger.ensure_household(a.household);
        }
        let (new, updated) = self.inner.registry.upsert(&appliances);
        metrics::counter!("halftime_appliances_enrolled_total").increment(new);
        metrics::gauge!("halftime_appliances").set(self.inner.registry.len() as f64);
        Ok((new, updated))
    }

    fn known_household(&self, household: HouseholdId) -> Result<(), EngineError> {
        if self.inner.ledger.contains(household) {
            Ok(())
        } else {
            Err(EngineError::NotFound(format!("household_id: household {household} is not enrolled")))
        }
    }

    /// Sets a household's own limits (validated) once they are durable; returns the effective ones. Calls
    /// arriving together share one store transaction (group commit), so enrolling millions of households with
    /// limits of their own does not cost one disk sync each.
    pub async fn set_limits(&self, household: HouseholdId, limits: Limits) -> Result<Limits, EngineError> {
        self.known_household(household)?;
        validate::limits(&limits, "limits")?;
        let (done, written) = tokio::sync::oneshot::channel();
        let stopped = || EngineError::Internal("the limits writer has stopped".into());
        self.inner.limits_writes.send(LimitsWrite { household, limits, done }).await.map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())??;
        self.inner.ledger.effective_limits(household).ok_or_else(|| EngineError::Internal("limits vanished".into()))
    }

    /// (own, effective) limits.
    pub fn get_limits(&self, household: HouseholdId) -> Result<(Limits, Limits), EngineError> {
        self.known_household(household)?;
        let own = self.inner.ledger.own_limits(household);
        let eff = self.inner.ledger.effective_limits(household);
        own.zip(eff)
            .ok_or_else(|| EngineError::NotFound(format!("household_id: household {household} is not enrolled")))
    }

    fn validate_submit(&self, req: &SubmitRequest, grant: &Grant) -> Result<StressEventSpec, EngineError> {
        let input = StressEventInput {
            regions: &req.regions,
            start_unix_ms: req.start_unix_ms,
            target_mw: &req.target_mw,
            target_kw: &req.target_kw,
            deferral_min_max: req.deferral_min_max,
            priority: req.priority,
            idempotency_key: &req.idempotency_key,
        };
        let spec = validate::stress_event(&input, &self.inner.config.regions, self.now_unix_ms())?;
        self.authorise(grant, &spec.regions, spec.target_peak_w())?;
        Ok(spec)
    }

    /// Whether `grant` covers every region of an event and a per-slot target of `peak_w`.
    fn authorise(&self, grant: &Grant, regions: &[RegionId], peak_w: f64) -> Result<(), EngineError> {
        if let Some(allowed) = &grant.regions
            && let Some(r) = regions.iter().find(|r| !allowed.contains(r))
        {
            return Err(EngineError::PermissionDenied(format!(
                "regions: caller has no authority over region {}",
                self.inner.config.regions.code(*r)
            )));
        }
        if peak_w > grant.target_w_max {
            return Err(EngineError::PermissionDenied(format!(
                "target: caller may ask for at most {} MW per slot",
                grant.target_w_max / 1e6
            )));
        }
        Ok(())
    }

    /// Accepts, records, plans, reserves, signs and queues a stress event.
    pub async fn submit(&self, req: SubmitRequest, grant: &Grant) -> Result<(EventId, PlanSummary), EngineError> {
        let received = std::time::Instant::now();
        let spec = self.validate_submit(&req, grant)?;
        let lock = Arc::clone(&self.inner.key_locks.entry(spec.idempotency_key.clone()).or_default());
        let _held = lock.lock().await;
        let store = Arc::clone(&self.inner.store);
        let key = spec.idempotency_key.clone();
        if let Some(id) = blocking(move || store.event_by_key(&key)).await?? {
            let rt = self.runtime(id)?;
            let st = rt.lock();
            let mut prior = st.record.spec.clone();
            if req.start_unix_ms == 0 {
                prior.start_unix_ms = spec.start_unix_ms;
            }
            if prior != spec {
                return Err(EngineError::AlreadyExists(format!(
                    "idempotency_key: {:?} was used for a different request (event {id})",
                    spec.idempotency_key
                )));
            }
            return Ok((id, st.record.plan.clone()));
        }
        self.inner.headend.admit(0).map_err(|e| EngineError::ResourceExhausted(e.to_string()))?;
        let id = EventId(self.inner.next_event_id.fetch_add(1, Ordering::SeqCst));
        let now = self.now_unix_ms();
        let mut record =
            EventRecord { id, spec, state: EventState::Scheduled, plan: PlanSummary::default(), accepted_unix_ms: now };
        record.plan.start_unix_ms = record.spec.start_unix_ms;
        record.plan.target_w = record.spec.target_w.clone();
        self.put_event(record.clone()).await?;
        let rt = Arc::new(EventRuntime::new(record.clone()));
        self.inner.events.insert(id, Arc::clone(&rt));
        metrics::counter!("halftime_events_submitted_total").increment(1);

        let target = record.spec.target_w.clone();
        let (plan, _) = self.dispatch(&rt, 0, target, None, 1.0, received).await?;
        metrics::histogram!("halftime_submit_seconds").record(received.elapsed().as_secs_f64());
        tracing::info!(
            event = id.0,
            appliances = plan.n_appliances,
            households = plan.n_households,
            cohorts = plan.n_cohorts,
            lp_ms = plan.lp_solve_us as f64 / 1e3,
            submit_ms = received.elapsed().as_secs_f64() * 1e3,
            shortfall_kwh = plan.shortfall_w.iter().sum::<f64>() / 60e3,
            "event dispatched"
        );
        Ok((id, plan))
    }

    /// Plans `target_w` (the event's slots from `first_slot` on) over its regions and dispatches what was
    /// picked. Merges the result into the event's plan summary (additive, for updates) and records it. A later
    /// dispatch shares the event's rebound cap with what the earlier ones expect, scaled by
    /// `prior_rebound_scale` (what their devices reported shedding, as a share of the plan). Returns the event's
    /// plan summary and the most this dispatch left of `target_w` unplanned in any slot, W.
    async fn dispatch(
        &self,
        rt: &Arc<EventRuntime>,
        first_slot: usize,
        target_w: Vec<f64>,
        classes: Option<[bool; halftime_core::appliance::N_CLASSES]>,
        prior_rebound_scale: f64,
        received: std::time::Instant,
    ) -> Result<(PlanSummary, f64), EngineError> {
        let (event, event_start, already_deferred, rebound_reference_w, prior, regions, deferral_min_max) = {
            let st = rt.lock();
            let spec = &st.record.spec;
            let already_deferred: ahash::AHashSet<ApplianceId> = st.devices.keys().copied().collect();
            // A residual shares the cap the event's plan already has: a share of the peak reduction it promises.
            // Before anything is planned, the plan's own delivered peak is the reference.
            let rebound_reference_w = self.rebound_reference_w(&st);
            // After the window, what the devices said they will pay back where the guard has it; the plan's own
            // expectation where it has not (the guard off, a recovered event).
            let n_slots = spec.target_w.len();
            let planned = &st.record.plan.rebound_w;
            // With the guard, also how far its projection may scatter; without, none is allowed for.
            let (guard_tail, guard_var): (&[f64], &[f64]) = match st.rebound.cap_w {
                Some(_) => (&st.rebound.tail_w, &st.rebound.tail_var_w2),
                None => (&[], &[]),
            };
            let prior: (Vec<f64>, Vec<f64>) = match rebound_reference_w {
                Some(_) => (first_slot..planned.len().max(n_slots + guard_tail.len()))
                    .take(halftime_planner::PRIOR_REBOUND_SLOTS_MAX)
                    .map(|t| match t.checked_sub(n_slots).and_then(|i| Some((guard_tail.get(i)?, guard_var.get(i)?))) {
                        Some((g, v)) => (g.max(0.0), v.max(0.0) / 1e6),
                        None => (planned.get(t).copied().unwrap_or(0.0) * prior_rebound_scale, 0.0),
                    })
                    .unzip(),
                None => (Vec::new(), Vec::new()),
            };
            let regions = spec.regions.clone();
            (
                st.record.id,
                spec.start_unix_ms,
                already_deferred,
                rebound_reference_w,
                prior,
                regions,
                spec.deferral_min_max,
            )
        };
        let start_unix_ms = event_start + first_slot as i64 * MS_PER_MIN;
        let inner = Arc::clone(&self.inner);
        let permit =
            self.inner.plan_permits.acquire().await.map_err(|_| EngineError::Internal("plan permits closed".into()))?;
        let now = self.now_unix_ms();
        let picked = blocking(move || {
            dispatch::plan_pick_sign(
                &inner,
                &dispatch::DispatchInput {
                    event,
                    regions: &regions,
                    start_unix_ms,
                    target_w: &target_w,
                    deferral_min_max,
                    now_unix_ms: now,
                    already_deferred: &already_deferred,
                    rebound_reference_w,
                    prior_rebound_w: &prior.0,
                    prior_rebound_var_kw2: &prior.1,
                    classes,
                },
            )
        })
        .await??;
        drop(permit);
        metrics::histogram!("halftime_plan_seconds").record(picked.plan_us as f64 / 1e6);
        metrics::histogram!("halftime_lp_solve_seconds").record(picked.lp_solve_us as f64 / 1e6);
        if let Err(e) = self.inner.headend.admit(picked.commands.len()) {
            self.unreserve(&picked.reservations);
            return Err(EngineError::ResourceExhausted(e.to_string()));
        }
        if rt.lock().record.state == EventState::Cancelled {
            // Cancelled while this was planned (an update or a top-up racing a cancel): send nothing.
            self.unreserve(&picked.reservations);
            return Err(EngineError::Invalid(FieldError::new("event_id", "event is cancelled")));
        }
        let store = Arc::clone(&self.inner.store);
        let dispatch = Dispatch { reservations: picked.reservations, commands: picked.commands };
        let hwm = picked.counter_hwm;
        // The batch comes back whether or not the write succeeded, so a failure undoes exactly its reservations.
        let (dispatch, persisted) = blocking(move || {
            let written = store.append_dispatch(event, &dispatch, hwm);
            (dispatch, written)
        })
        .await?;
        if let Err(e) = persisted {
            // Nothing left the engine: give the budget back.
            self.unreserve(&dispatch.reservations);
            return Err(e.into());
        }
        let plan_ready_us = micros(picked.picked_at.saturating_duration_since(received));
        let unplanned_w = picked.evaluation.shortfall_w.iter().copied().fold(0.0, f64::max);
        {
            let mut st = rt.lock();
            for (r, c) in dispatch.reservations.iter().zip(&dispatch.commands) {
                let a = self.inner.registry.get(r.appliance);
                // At the rate the plan counted on: households deferred often override more than they declared.
                let rate = a.map_or(0.0, |a| a.override_rate()) * picked.override_factor[r.class.index()];
                let p = override_chance(rate, f64::from(r.deferral_s) / 60.0);
                let power_w = a.map_or(0, |a| a.rated_power_w);
                st.add_device(r.household, c.command, r.class, f64::from(r.reduction_kw) * 1e3, p, power_w);
            }
            let plan = &mut st.record.plan;
            merge_evaluation(plan, &picked.evaluation, first_slot);
            plan.n_appliances += dispatch.commands.len() as u64;
            plan.n_cohorts = plan.n_cohorts.max(picked.n_cohorts);
            plan.lp_solve_us += picked.lp_solve_us;
            if plan.plan_ready_us == 0 {
                plan.plan_ready_us = plan_ready_us;
            }
            st.record.plan.n_households = st.households.len() as u64;
            let guard_share = self.inner.config.rebound_guard_share;
            if guard_share > 0.0 {
                // The first dispatch's cap is on what its own plan delivers.
                let reference_w = rebound_reference_w.or_else(|| self.rebound_reference_w(&st)).unwrap_or(0.0);
                st.rebound.cap_w = Some(guard_share * self.inner.config.rebound_fraction_max * reference_w);
            }
            st.dirty = true;
        }
        // The dispatch is durable: hand it to the head-end, then record the event's summary with its timings.
        let now = self.now_unix_ms();
        self.inner.headend.enqueue(&dispatch.commands, now);
        let queued_us = micros(received.elapsed());
        let (record, summary) = {
            let mut st = rt.lock();
            if st.record.plan.queued_us == 0 {
                st.record.plan.queued_us = queued_us;
            }
            (st.record.clone(), st.record.plan.clone())
        };
        self.put_event(record).await?;
        metrics::counter!("halftime_commands_signed_total").increment(dispatch.commands.len() as u64);
        rt.publish();
        Ok((summary, unplanned_w))
    }

    /// Plans `residual_w` (the event's slots from `first_slot` on) among appliances not yet deferred: what the
    /// started devices' reports say the plan will fall short by. Only classes that carry a good share of the
    /// event's planned reduction: a top-up is small and its rebound headroom thin, so the LP reaches for classes
    /// plans otherwise leave alone (tumble dryers, water heaters), and over a season a few of their households
    /// carried all of it (Jain 0.11 among households with only a tumble dryer).
    async fn top_up(&self, rt: Arc<EventRuntime>, top_up: TopUp) {
        let TopUp { phase, first_slot, residual_w, realised_ratio } = top_up;
        let (event, n_before, classes) = {
            let st = rt.lock();
            let total_w: f64 = st.planned_by_class_w.iter().sum();
            let classes = st.planned_by_class_w.map(|w| w > 0.0 && w >= TOP_UP_CLASS_SHARE_MIN * total_w);
            (st.record.id, st.record.plan.n_appliances, classes)
        };
        let received = std::time::Instant::now();
        let top_up = self.dispatch(&rt, first_slot, residual_w, Some(classes), realised_ratio, received).await;
        rt.lock().top_up_in_flight = false;
        match top_up {
            Ok((plan, unplanned_w)) => {
                let n = plan.n_appliances.saturating_sub(n_before);
                let phase = phase.label();
                metrics::counter!("halftime_top_ups_total", "phase" => phase).increment(1);
                metrics::counter!("halftime_top_up_appliances_total", "phase" => phase).increment(n);
                // What it could not plan: the rebound's room, households' limits, or classes it may not use.
                let unplanned_kw = unplanned_w / 1e3;
                tracing::info!(event = event.0, appliances = n, first_slot, phase, unplanned_kw, "event topped up");
            }
            Err(e) => tracing::warn!(event = event.0, error = %e, phase = phase.label(), "top-up not dispatched"),
        }
    }

    fn unreserve(&self, reservations: &[halftime_core::Reservation]) {
        for r in reservations {
            self.inner.ledger.unreserve(r.household, r.event, r.appliance);
        }
    }

    async fn put_event(&self, record: EventRecord) -> Result<(), EngineError> {
        let store = Arc::clone(&self.inner.store);
        blocking(move || store.put_event(&record)).await??;
        Ok(())
    }

    fn runtime(&self, id: EventId) -> Result<Arc<EventRuntime>, EngineError> {
        self.inner
            .events
            .get(&id)
            .map(|e| Arc::clone(&e))
            .ok_or_else(|| EngineError::NotFound(format!("event_id: event {id} does not exist")))
    }

    /// Supersedes an event's target from now on: adds devices where the new target is above what is planned,
    /// and releases the most-burdened where it is well below.
    pub async fn update(
        &self,
        event: EventId,
        target_mw: &[f64],
        target_kw: &[f64],
        grant: &Grant,
    ) -> Result<(EventId, PlanSummary), EngineError> {
        let received = std::time::Instant::now();
        let new_target = validate::target_w(target_mw, target_kw, "target_mw", "target_kw")?;
        let rt = self.runtime(event)?;
        let regions = rt.lock().record.spec.regions.clone();
        self.authorise(grant, &regions, new_target.iter().copied().fold(0.0, f64::max))?;
        let now = self.now_unix_ms();
        let (spec, expected) = {
            let st = rt.lock();
            if st.record.state == EventState::Cancelled {
                return Err(EngineError::Invalid(FieldError::new("event_id", "event is cancelled")));
            }
            (st.record.spec.clone(), st.record.plan.expected_w.clone())
        };
        // New deferrals start at the next whole minute at the earliest.
        let first_slot = ((now - spec.start_unix_ms).max(0) + MS_PER_MIN - 1).div_euclid(MS_PER_MIN) as usize;
        let residual: Vec<f64> = new_target
            .iter()
            .enumerate()
            .skip(first_slot)
            .map(|(t, &w)| (w - expected.get(t).copied().unwrap_or(0.0)).max(0.0))
            .collect();
        {
            let mut st = rt.lock();
            st.record.spec.target_w = new_target.clone();
            st.record.plan.target_w = new_target.clone();
            let n = new_target.len();
            st.record.plan.expected_w.resize(n, 0.0);
            st.record.plan.shortfall_w =
                (0..n).map(|t| (new_target[t] - st.record.plan.expected_w[t]).max(0.0)).collect();
            st.dirty = true;
        }
        if residual.iter().any(|&w| w > 1.0) {
            self.dispatch(&rt, first_slot, residual, None, 1.0, received).await?;
        }
        self.release_excess(&rt, &new_target, now).await?;
        let record = rt.lock().record.clone();
        self.put_event(record.clone()).await?;
        rt.publish();
        Ok((event, record.plan))
    }

    /// Releases the most-burdened devices whose deferral is not needed to hold the target.
    async fn release_excess(&self, rt: &Arc<EventRuntime>, target_w: &[f64], now: i64) -> Result<(), EngineError> {
        let releases: Vec<(HouseholdId, DeferralCommand, i64)> = {
            let mut st = rt.lock();
            let start = st.record.spec.start_unix_ms;
            let mut expected = st.record.plan.expected_w.clone();
            let mut candidates: Vec<(f64, ApplianceId)> = st
                .devices
                .values()
                .filter(|t| !t.status.is_final() && t.command.latest_end_unix_ms() > now)
                .map(|t| (self.inner.ledger.burden_kw_min(t.household, now), t.command.device))
                .collect();
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut out = Vec::new();
            for (_, device) in candidates {
                let t = &st.devices[&device];
                let per_w = self.inner.registry.get(device).map(|a| a.expected_reduction_w()).unwrap_or(0.0);
                let mut contrib = vec![0.0; expected.len()];
                add_interval(
                    &mut contrib,
                    start,
                    now.max(t.command.not_before_unix_ms),
                    t.command.latest_end_unix_ms(),
                    per_w,
                );
                let fits = expected.iter().zip(&contrib).zip(target_w).all(|((e, c), tw)| c == &0.0 || e - c >= *tw);
                if fits && contrib.iter().any(|c| *c > 0.0) {
                    for (e, c) in expected.iter_mut().zip(&contrib) {
                        *e -= c;
                    }
                    out.push((t.household, t.command, now));
                }
            }
            st.record.plan.expected_w = expected;
            let n = target_w.len();
            st.record.plan.shortfall_w =
                (0..n).map(|i| (target_w[i] - st.record.plan.expected_w[i]).max(0.0)).collect();
            out
        };
        self.send_releases(rt, releases, DeviceStatus::Released).await?;
        Ok(())
    }

    /// Signs, records and queues release commands; ends the reservations in the ledger.
    async fn send_releases(
        &self,
        rt: &Arc<EventRuntime>,
        releases: Vec<(HouseholdId, DeferralCommand, i64)>,
        status: DeviceStatus,
    ) -> Result<u64, EngineError> {
        if releases.is_empty() {
            return Ok(0);
        }
        let n = releases.len() as u64;
        let first = self.inner.next_counter.fetch_add(n, Ordering::SeqCst);
        let commands: Vec<SignedCommand> = releases
            .iter()
            .enumerate()
            .map(|(i, (_, c, at))| {
                self.inner.signer.sign(DeferralCommand {
                    kind: CommandKind::Release,
                    key_id: 0,
                    device: c.device,
                    event: c.event,
                    counter: first + i as u64,
                    not_before_unix_ms: *at,
                    not_after_unix_ms: c.not_after_unix_ms.max(*at + 1),
                    deferral_s: 0,
                    randomize_start_s: 0,
                })
            })
            .collect();
        let event = rt.lock().record.id;
        let store = Arc::clone(&self.inner.store);
        let d = Dispatch { reservations: Vec::new(), commands };
        let outcomes: Vec<Outcome> = releases
            .iter()
            .map(|(h, c, at)| Outcome {
                event,
                appliance: c.device,
                household: *h,
                status,
                at_unix_ms: *at,
                reduction_w: 0,
            })
            .collect();
        let o = outcomes.clone();
        let d = blocking(move || -> Result<Dispatch, EngineError> {
            store.append_dispatch(event, &d, first + n)?;
            store.append_outcomes(&o)?;
            Ok(d)
        })
        .await??;
        for o in &outcomes {
            // An override is the household's own: its deferral counts as ended when it asked (the rate of
            // overrides learned per class counts on that).
            self.apply_outcome(o, None, status != DeviceStatus::Overridden);
        }
        self.inner.headend.enqueue(&d.commands, self.now_unix_ms());
        rt.publish();
        Ok(n)
    }

    /// Cancels an event: every device still deferred is released, staggered over `release_over_min` minutes.
    pub async fn cancel(&self, event: EventId, release_over_min: u32, grant: &Grant) -> Result<u64, EngineError> {
        if release_over_min > 30 {
            return Err(FieldError::new("release_over_min", "must be 0..=30 minutes").into());
        }
        let steps =
            if release_over_min == 0 { self.inner.config.release_over_min_default } else { release_over_min }.max(1);
        let rt = self.runtime(event)?;
        let regions = rt.lock().record.spec.regions.clone();
        self.authorise(grant, &regions, 0.0)?;
        let now = self.now_unix_ms();
        let releases: Vec<(HouseholdId, DeferralCommand, i64)> = {
            let mut st = rt.lock();
            if st.record.state == EventState::Cancelled {
                return Ok(0);
            }
            st.record.state = EventState::Cancelled;
            st.dirty = true;
            let mut live: Vec<_> = st
                .devices
                .values()
                .filter(|t| !t.status.is_final() && t.command.latest_end_unix_ms() > now)
                .map(|t| (t.household, t.command))
                .collect();
            live.sort_by_key(|(_, c)| c.device);
            live.into_iter()
                .enumerate()
                .map(|(i, (h, c))| {
                    let at = (now + (i as i64 % i64::from(steps)) * MS_PER_MIN).min(c.not_after_unix_ms);
                    (h, c, at.max(now))
                })
                .collect()
        };
        let record = rt.lock().record.clone();
        self.put_event(record).await?;
        let n = self.send_releases(&rt, releases, DeviceStatus::Released).await?;
        metrics::counter!("halftime_events_cancelled_total").increment(1);
        tracing::info!(event = event.0, released = n, over_min = steps, "event cancelled");
        Ok(n)
    }

    pub fn watch(&self, event: EventId) -> Result<watch::Receiver<EventProgress>, EngineError> {
        Ok(self.runtime(event)?.watch.subscribe())
    }

    pub fn progress(&self, event: EventId) -> Result<EventProgress, EngineError> {
        Ok(self.runtime(event)?.lock().progress())
    }

    /// Events, newest first.
    pub fn list_events(&self, limit: usize) -> Vec<EventRecord> {
        let mut v: Vec<EventRecord> = self.inner.events.iter().map(|e| e.lock().record.clone()).collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.id));
        v.truncate(limit);
        v
    }

    /// Expected reduction that could be held over `horizon_min` in a region, within every household's limits.
    pub fn flexibility(&self, region: RegionId, horizon_min: u32, deferral_min_max: u32) -> Flexibility {
        let now = self.now_unix_ms();
        let mut standing = std::collections::HashMap::new();
        let probe = EventId(0);
        // Eligible appliances with their budgets, then per class at the rate households really override, as
        // plans count on it.
        let mut eligible: Vec<(Appliance, u8, halftime_ledger::Standing)> = Vec::new();
        let mut budgets: Vec<u32> = Vec::new();
        self.inner.registry.for_each_in(&[region], |a| {
            let s = *standing
                .entry(a.household)
                .or_insert_with(|| self.inner.ledger.standing(a.household, probe, now, now));
            let Some(s) = s else { return };
            let budget = s.budget_min.min(u32::from(a.deferral_min_max)).min(deferral_min_max);
            if budget >= halftime_planner::DEFERRAL_MIN_MIN {
                eligible.push((*a, 0, s));
                budgets.push(budget);
            }
        });
        let override_factor = dispatch::override_factor_by_class(&eligible);
        let mut by_class = [(0.0f64, 0u64); halftime_core::appliance::N_CLASSES];
        for ((a, _, _), budget) in eligible.iter().zip(budgets) {
            // Staggered, each appliance can hold its share for budget / horizon of the time.
            let share = (f64::from(budget) / f64::from(horizon_min.max(1))).min(1.0);
            let override_rate = (a.override_rate() * override_factor[a.class.index()]).min(1.0);
            let e = &mut by_class[a.class.index()];
            e.0 += a.expected_reduction_w() * (1.0 - override_rate) * share;
            e.1 += 1;
        }
        Flexibility {
            as_of_unix_ms: now,
            deferrable_w: by_class.iter().map(|c| c.0).sum(),
            n_appliances_eligible: by_class.iter().map(|c| c.1).sum(),
            by_class: ApplianceClass::ALL.iter().map(|c| (*c, by_class[c.index()].0, by_class[c.index()].1)).collect(),
        }
    }

    /// Ends a household's active deferrals now (one appliance, or all). Always honoured.
    pub async fn override_now(
        &self,
        household: HouseholdId,
        appliance: Option<ApplianceId>,
    ) -> Result<u64, EngineError> {
        self.known_household(household)?;
        let mine = self.inner.registry.of_household(household);
        if let Some(a) = appliance
            && !mine.iter().any(|m| m.id == a)
        {
            return Err(EngineError::NotFound(format!(
                "appliance_id: appliance {a} is not enrolled in household {household}"
            )));
        }
        let now = self.now_unix_ms();
        let mut by_event: std::collections::HashMap<EventId, Vec<(HouseholdId, DeferralCommand, i64)>> =
            Default::default();
        for a in mine.iter().filter(|m| appliance.is_none_or(|id| id == m.id)) {
            for c in self.inner.headend.active_for(a.id, now) {
                if c.command.kind == CommandKind::Defer && c.command.latest_end_unix_ms() > now {
                    let final_already = self
                        .inner
                        .events
                        .get(&c.command.event)
                        .and_then(|rt| rt.lock().devices.get(&a.id).map(|t| t.status.is_final()))
                        .unwrap_or(true);
                    if !final_already {
                        by_event.entry(c.command.event).or_default().push((household, c.command, now));
                    }
                }
            }
        }
        let mut n = 0;
        for (event, list) in by_event {
            let rt = self.runtime(event)?;
            n += self.send_releases(&rt, list, DeviceStatus::Overridden).await?;
        }
        metrics::counter!("halftime_household_overrides_total").increment(n);
        Ok(n)
    }

    /// A household's own deferrals, newest first, and its burden.
    pub fn history(&self, household: HouseholdId, limit: usize) -> Result<(Vec<HistoryEntry>, f64), EngineError> {
        self.known_household(household)?;
        let mut entries: Vec<HistoryEntry> = self
            .inner
            .ledger
            .entries(household)
            .into_iter()
            .map(|e| HistoryEntry {
                event: e.reservation.event,
                appliance: e.reservation.appliance,
                class: e.reservation.class,
                not_before_unix_ms: e.reservation.not_before_unix_ms,
                not_after_unix_ms: e.reservation.not_after_unix_ms,
                deferral_s: e.reservation.deferral_s,
                status: e.status,
            })
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.not_before_unix_ms));
        entries.truncate(limit);
        Ok((entries, self.inner.ledger.burden_kw_min(household, self.now_unix_ms())))
    }

    /// Attaches a device link. Every device must be enrolled.
    pub fn attach(&self, devices: &[ApplianceId]) -> Result<(LinkId, LinkReceiver), EngineError> {
        if devices.is_empty() || devices.len() > 100_000 {
            return Err(FieldError::new("hello.device_ids", "need 1..=100000 devices").into());
        }
        if let Some((i, d)) = devices.iter().enumerate().find(|(_, d)| self.inner.registry.get(**d).is_none()) {
            return Err(EngineError::NotFound(format!("hello.device_ids[{i}]: device {d} is not enrolled")));
        }
        Ok(self.inner.headend.attach(devices, self.now_unix_ms()))
    }

    pub fn detach(&self, link: LinkId) {
        self.inner.headend.detach(link);
    }

    /// Commands still active for a device.
    pub fn resync(&self, device: ApplianceId) -> Result<Vec<SignedCommand>, EngineError> {
        if self.inner.registry.get(device).is_none() {
            return Err(EngineError::NotFound(format!("device_id: device {device} is not enrolled")));
        }
        Ok(self.inner.headend.active_for(device, self.now_unix_ms()))
    }

    /// Takes a batch of device reports: acknowledgements, status changes, overrides. Reports about unknown
    /// events or devices are counted and dropped.
    pub async fn report(&self, reports: &[DeviceReport]) -> Result<(), EngineError> {
        let mut dropped = 0u64;
        let mut guarded: Vec<Arc<EventRuntime>> = Vec::new();
        for r in reports {
            if r.status != DeviceStatus::Expired && r.status != DeviceStatus::Dispatched {
                self.inner.headend.ack(r.device, r.counter);
            }
            let Some(a) = self.inner.registry.get(r.device) else {
                dropped += 1;
                continue;
            };
            let o = Outcome {
                event: r.event,
                appliance: r.device,
                household: a.household,
                status: r.status,
                at_unix_ms: r.at_unix_ms,
                reduction_w: r.reduction_w,
            };
            match self.apply_outcome(&o, r.payback, false) {
                // Progress is published by the tick, at most a few times a second.
                Some((rt, guard_pending)) => {
                    if guard_pending && !guarded.iter().any(|g| Arc::ptr_eq(g, &rt)) {
                        guarded.push(rt);
                    }
                    self.inner
                        .outcomes
                        .send(WriterMsg::Outcome(o))
                        .await
                        .map_err(|_| EngineError::Internal("outcome writer stopped".into()))?;
                }
                None => dropped += 1,
            }
        }
        // Per batch, labelled by status only (eight values): never a household or device id.
        for (status, n) in DeviceStatus::ALL.iter().zip(DeviceStatus::tally(reports.iter().map(|r| r.status))) {
            if n > 0 {
                metrics::counter!("halftime_device_reports_total", "status" => status.name()).increment(n);
            }
        }
        metrics::counter!("halftime_device_reports_dropped_total").increment(dropped);
        for rt in guarded {
            self.release_over_cap(&rt).await?;
        }
        Ok(())
    }

    /// Releases the devices the rebound guard queued: their payback would take the event's rebound over its cap.
    async fn release_over_cap(&self, rt: &Arc<EventRuntime>) -> Result<(), EngineError> {
        let now = self.now_unix_ms();
        let (releases, event, cap_w, peak_w, peak_at) = {
            let mut st = rt.lock();
            let devices = std::mem::take(&mut st.guard_releases);
            let releases: Vec<(HouseholdId, DeferralCommand, i64)> = devices
                .iter()
                .filter_map(|d| st.devices.get(d))
                .filter(|t| !t.status.is_final())
                .map(|t| (t.household, t.command, now))
                .collect();
            let tail = &st.rebound.tail_w;
            let (at, peak) = tail.iter().enumerate().fold((0, 0.0), |a, (i, &w)| if w > a.1 { (i, w) } else { a });
            (releases, st.record.id, st.rebound.cap_w.unwrap_or(0.0), peak, at)
        };
        let n = self.send_releases(rt, releases, DeviceStatus::Released).await?;
        // Another batch's call may have taken the queue first: nothing to say then.
        if n > 0 {
            metrics::counter!("halftime_rebound_guard_releases_total").increment(n);
            tracing::info!(
                event = event.0,
                released = n,
                cap_kw = cap_w / 1e3,
                projected_peak_kw = peak_w / 1e3,
                peak_min_after_window = peak_at,
                "rebound guard released deferrals"
            );
        }
        Ok(())
    }

    /// Tells long-lived tasks (device links) to finish, writes every queued outcome and stops the background
    /// writer, so that the store is released when the last clone of the engine is dropped. Calls after this
    /// that report outcomes fail.
    pub async fn shutdown(&self) {
        self.inner.stopping.send_replace(true);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inner.outcomes.send(WriterMsg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves once [`Self::shutdown`] has been called.
    pub async fn stopped(&self) {
        let mut rx = self.inner.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Shuts down and waits until this is the last handle on the engine, then drops it, closing the store.
    /// Gives up waiting after `grace` (the store then closes when the last handle goes).
    pub async fn close(self, grace: Duration) -> bool {
        self.shutdown().await;
        let deadline = tokio::time::Instant::now() + grace;
        while Arc::strong_count(&self.inner) > 1 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(handles = Arc::strong_count(&self.inner), "engine still in use at close");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Runs one closed-loop tick now (the background task does this every `tick_interval_ms`).
    pub fn tick(&self) {
        tick(&self.inner);
    }
}

impl EventRuntime {
    fn advance_and_publish(&self, now: i64) {
        self.lock().advance(now);
        self.publish();
    }
}

/// Adds a new dispatch's evaluation, which starts at slot `offset`, onto the event's plan (an update plans only
/// the residual from the next minute on).
fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn merge_evaluation(plan: &mut PlanSummary, e: &halftime_planner::Evaluation, offset: usize) {
    let n = plan.target_w.len();
    plan.expected_w.resize(n, 0.0);
    for (x, y) in plan.expected_w.iter_mut().skip(offset).zip(&e.expected_w) {
        *x += y;
    }
    if plan.rebound_w.len() < offset + e.rebound_w.len() {
        plan.rebound_w.resize(offset + e.rebound_w.len(), 0.0);
    }
    for (x, y) in plan.rebound_w.iter_mut().skip(offset).zip(&e.rebound_w) {
        *x += y;
    }
    plan.shortfall_w = (0..n).map(|t| (plan.target_w[t] - plan.expected_w[t]).max(0.0)).collect();
}

fn tick(inner: &Arc<Inner>) {
    let now = inner.clock.now_unix_ms();
    let (expired, _) = inner.headend.tick(now);
    let engine = Engine { inner: Arc::clone(inner) };
    for c in expired {
        if c.command.kind != CommandKind::Defer {
            continue;
        }
        if let Some(a) = inner.registry.get(c.command.device) {
            let o = Outcome {
                event: c.command.event,
                appliance: c.command.device,
                household: a.household,
                status: DeviceStatus::Expired,
                at_unix_ms: now,
                reduction_w: 0,
            };
            engine.apply_outcome(&o, None, false);
            // Best effort: with the writer's queue full, the expiry shows in progress but is not persisted.
            let _ = inner.outcomes.try_send(WriterMsg::Outcome(o));
        }
    }
    weigh_events(inner, now);
    let (mut active, mut target_w, mut expected_w, mut delivered_w) = (0u64, 0.0, 0.0, 0.0);
    for e in inner.events.iter() {
        e.advance_and_publish(now);
        let p = e.watch.borrow();
        if p.state == EventState::Active {
            let slot = halftime_core::time::slot_of(p.start_unix_ms, now).max(0) as usize;
            active += 1;
            target_w += p.target_w.get(slot).copied().unwrap_or(0.0);
            expected_w += p.expected_w.get(slot).copied().unwrap_or(0.0);
            delivered_w += p.delivered_w.get(slot).copied().unwrap_or(0.0);
        }
    }
    metrics::gauge!("halftime_events_active").set(active as f64);
    metrics::gauge!("halftime_target_mw").set(target_w / 1e6);
    metrics::gauge!("halftime_expected_mw").set(expected_w / 1e6);
    metrics::gauge!("halftime_delivered_mw").set(delivered_w / 1e6);
}

/// A top-up to plan: in the window, what the devices' reports foretell it will fall short by; after it, how far
/// the rebound they foretell goes over the guard's line.
struct TopUp {
    phase: TopUpPhase,
    /// The event's slot it plans from (past the window's end for a tail top-up).
    first_slot: usize,
    /// Net reduction wanted per slot from `first_slot` on, W.
    residual_w: Vec<f64>,
    /// What the earlier dispatches' devices reported shedding, as a share of the plan: their rebound scales with it.
    realised_ratio: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopUpPhase {
    Window,
    Tail,
}

impl TopUpPhase {
    fn label(self) -> &'static str {
        match self {
            TopUpPhase::Window => "window",
            TopUpPhase::Tail => "tail",
        }
    }
}

/// How long after a slot's devices were due to start (their random offset included) an event is weighed: their
/// reports are in by then, so a top-up can still reach the next slot.
const WEIGH_SETTLE_MS: i64 = 5_000;
/// Deferrals the rebound guard releases per event and minute to bring a minute to come back under the cap.
const GUARD_RELEASES_PER_TICK_MAX: usize = 2_000;
/// Top-ups per event, at most: weighed once a minute, an event's ramp can take one a minute, and its plateau
/// still needs some for overrides.
const TOP_UPS_MAX: u32 = 6;
/// A top-up is planned only where the foretold shortfall in some minute is at least this share of the peak
/// target: a few percent is within the plan's own allowance for scatter.
const TOP_UP_SHORTFALL_SHARE_MIN: f64 = 0.02;
/// A window top-up counts on its devices shedding at least this share of their class's expectation, however
/// short the devices before it fell (`Realised::yield_counted_on`).
const TOP_UP_YIELD_MIN: f64 = 0.5;
/// A top-up draws only on classes that carry at least this share of the event's planned reduction.
const TOP_UP_CLASS_SHARE_MIN: f64 = 0.05;
/// Top-ups per event after its window, at most: one a minute can follow a cliff the projection sees late (a block
/// of deferrals ending together). At three, a season evening spent its last on a 5 kW excess and then saw its
/// projection climb 19 kW over the line with none left.
const TAIL_TOP_UPS_MAX: u32 = 6;
/// A tail top-up is planned only where the rebound to come goes over the guard's line by at least this share of
/// it in some minute.
const TAIL_TOP_UP_LINE_SHARE_MIN: f64 = 0.05;
/// Minutes after the window a tail top-up plans for, at most: beyond them, the next weighing sees more.
const TAIL_TOP_UP_SLOTS_MAX: usize = 60;

/// Once a minute per event under way: holds its projected rebound under the cap (from the window's start until
/// its last deferral has ended), and tops the event up on a task of its own where what its devices reported
/// foretells a shortfall in the window, or, after it, a rebound over the guard's line.
fn weigh_events(inner: &Arc<Inner>, now: i64) {
    for e in inner.events.iter() {
        let rt = e.value();
        let top_up = {
            let mut guard = rt.lock();
            let st = &mut *guard;
            // The guard and the tail top-up follow the rebound after the window, while deferrals are still
            // under way.
            let guarding = matches!(st.record.state, EventState::Active | EventState::Completed) && !st.closed;
            let settle_ms = weigh_settle_ms(&inner.config, st.first_slot_led);
            if !guarding || now < weigh_due_unix_ms(st.weighed_unix_ms, st.record.spec.start_unix_ms, settle_ms) {
                continue;
            }
            st.weighed_unix_ms = now;
            if st.shave_rebound(now, GUARD_RELEASES_PER_TICK_MAX) > 0 {
                let engine = Engine { inner: Arc::clone(inner) };
                let rt = Arc::clone(rt);
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        if let Err(e) = engine.release_over_cap(&rt).await {
                            tracing::warn!(error = %e, "rebound guard releases not sent");
                        }
                    });
                }
            }
            let top_up = match st.record.state {
                EventState::Active => window_top_up(st, now, &inner.config),
                EventState::Completed => tail_top_up(st, now, &inner.config),
                _ => None,
            };
            st.top_up_in_flight |= top_up.is_some();
            top_up
        };
        rt.publish();
        if let Some(top_up) = top_up {
            let engine = Engine { inner: Arc::clone(inner) };
            let rt = Arc::clone(rt);
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move { engine.top_up(rt, top_up).await });
                }
                Err(_) => rt.lock().top_up_in_flight = false,
            }
        }
    }
}

/// The top-up an event in its window needs, if any: where what its started devices reported foretells a shortfall
/// in a minute still to come (at most [`TOP_UPS_MAX`] per event, one at a time). Records the realised ratio either
/// way.
fn window_top_up(st: &mut runtime::RuntimeState, now: i64, config: &EngineConfig) -> Option<TopUp> {
    let realised = &st.realised;
    if realised.expected_w <= 0.0 {
        return None;
    }
    let ratio = realised.reported_w / realised.expected_w;
    // 0 is kept for "nothing weighed yet".
    st.record.plan.realised_ratio = ratio.max(f64::MIN_POSITIVE);
    st.dirty = true;
    if !config.top_up || st.top_up_in_flight || st.n_top_ups >= TOP_UPS_MAX {
        return None;
    }
    let first_slot = next_slot(st.record.spec.start_unix_ms, now);
    let residual_w =
        top_up_residual_w(&st.record.plan, realised, st.record.spec.start_unix_ms, first_slot, now, config);
    let peak_w = st.record.plan.target_w.iter().copied().fold(0.0, f64::max);
    if !residual_w.iter().any(|&w| w >= TOP_UP_SHORTFALL_SHARE_MIN * peak_w) {
        return None;
    }
    // The top-up draws on the same classes tonight: it asks for as much more as they are falling short by.
    let yield_counted_on = realised.yield_counted_on(TOP_UP_YIELD_MIN);
    let shortfall_kw = residual_w.iter().copied().fold(0.0, f64::max) / 1e3;
    let residual_w: Vec<f64> = residual_w.into_iter().map(|w| w / yield_counted_on).collect();
    tracing::info!(
        event = st.record.id.0,
        reported = realised.n_known,
        rejected = realised.n_rejected,
        overridden = realised.n_overridden,
        expected_kw = realised.expected_w / 1e3,
        reported_kw = realised.reported_w / 1e3,
        shortfall_kw,
        yield_counted_on,
        "devices report less than planned"
    );
    st.n_top_ups += 1;
    // The rebound the earlier dispatches will cause shrinks with what they shed.
    Some(TopUp { phase: TopUpPhase::Window, first_slot, residual_w, realised_ratio: ratio.min(1.0) })
}

/// The top-up an event after its window needs, if any: where the rebound its devices foretell goes over the
/// guard's line in a minute to come (at most [`TAIL_TOP_UPS_MAX`] per event, one at a time).
fn tail_top_up(st: &mut runtime::RuntimeState, now: i64, config: &EngineConfig) -> Option<TopUp> {
    if !config.top_up || st.top_up_in_flight || st.n_tail_top_ups >= TAIL_TOP_UPS_MAX {
        return None;
    }
    let line_w = st.rebound.cap_w?;
    let first = next_slot(st.record.spec.end_unix_ms(), now);
    let excess_w = tail_top_up_w(&st.rebound.tail_w, first, line_w);
    if !excess_w.iter().any(|&w| w >= TAIL_TOP_UP_LINE_SHARE_MIN * line_w) {
        return None;
    }
    tracing::info!(
        event = st.record.id.0,
        first_minute_after_window = first,
        excess_kw = excess_w.iter().copied().fold(0.0, f64::max) / 1e3,
        "rebound to come over the guard's line"
    );
    st.n_tail_top_ups += 1;
    let first_slot = st.record.spec.target_w.len() + first;
    Some(TopUp { phase: TopUpPhase::Tail, first_slot, residual_w: excess_w, realised_ratio: 1.0 })
}

/// The first whole minute from `slot0_unix_ms` that a top-up weighed at `now_unix_ms` can still reach: the next
/// one (slot 0 before it has begun).
fn next_slot(slot0_unix_ms: i64, now_unix_ms: i64) -> usize {
    (now_unix_ms - slot0_unix_ms).div_euclid(MS_PER_MIN).max(-1) as usize + 1
}

/// What a top-up is asked for in each slot from `first_slot` on, weighed at `now_unix_ms`: what the plan promises
/// (up to the target; planning again what it could not promise finds nothing new), less what it now looks like
/// delivering (its expectation, earlier top-ups included, with what the started devices reported in place of
/// what was expected of them). Where it promised the target, it promised it with an allowance for scatter: the
/// devices that have said no longer scatter, and what those that have not may still do is kept in hand, as the
/// plan did. Without that, the first devices' shortfall could spend the allowance that the scatter of the devices
/// starting after them needed: most of the season's misses were then the ramp's second and third minutes.
fn top_up_residual_w(
    plan: &PlanSummary,
    realised: &runtime::Realised,
    slot0_unix_ms: i64,
    first_slot: usize,
    now_unix_ms: i64,
    config: &EngineConfig,
) -> Vec<f64> {
    (first_slot..plan.target_w.len())
        .map(|t| {
            let (target_w, expected_w) = (plan.target_w[t], plan.expected_w.get(t).copied().unwrap_or(0.0));
            let deviation_w = realised.foreseen_deviation_w(t, slot0_unix_ms, now_unix_ms);
            let promised_w = if expected_w >= target_w {
                let unsaid_var_w2 = realised.unsaid_var_w2.get(t).copied().unwrap_or(0.0).max(0.0);
                target_w + config.delivery_sigmas * unsaid_var_w2.sqrt()
            } else {
                expected_w
            };
            (promised_w - (expected_w + deviation_w)).max(0.0)
        })
        .collect()
}

/// What a tail top-up is asked for in each minute after the window from `first` on: how far the rebound the
/// guard projects there (`tail_w`) goes over its line `line_w`; empty where it does not. Plans keep their
/// expected rebound under the line; what takes it over after the window is mostly EV chargers the plan defers
/// there to absorb payback, which shed less than expected when fewer of them are charging than their class's
/// average (on a season evening, 20 kW of an expected 49). They say so as they start, and new deferrals planned
/// then take over the rest of their stretch. The guard's other remedy, releasing a deferral whose payback lands
/// over the line, only moves that payback sooner, and after the window it rarely fits.
fn tail_top_up_w(tail_w: &[f64], first: usize, line_w: f64) -> Vec<f64> {
    let excess_w: Vec<f64> =
        tail_w.iter().skip(first).take(TAIL_TOP_UP_SLOTS_MAX).map(|w| (w - line_w).max(0.0)).collect();
    let n = excess_w.iter().rposition(|&w| w > 0.0).map_or(0, |i| i + 1);
    excess_w[..n].to_vec()
}

/// How far into each slot an event is weighed: its devices' largest random start offset, and [`WEIGH_SETTLE_MS`].
/// An event whose first slot's devices went out ahead of it (`RuntimeState::first_slot_led`) is weighed
/// [`WEIGH_SETTLE_MS`] in: they have all said by then, and its top-ups go out in time to lead their own first
/// slot.
fn weigh_settle_ms(config: &EngineConfig, first_slot_led: bool) -> i64 {
    if first_slot_led { WEIGH_SETTLE_MS } else { i64::from(config.randomize_start_s) * 1000 + WEIGH_SETTLE_MS }
}

/// When an event weighed at `weighed_unix_ms` (`i64::MIN`: never) is weighed next: once a minute, `settle_ms`
/// into each slot (modulo the minute). Weighed on the minute, an event first saw its first slot's reports a
/// minute in, and its first top-up reached only the third slot; in the season, most minutes delivered under
/// 95 % were the second to fifth. Weighed at its start, it topped up on its first few dozen reports.
fn weigh_due_unix_ms(weighed_unix_ms: i64, start_unix_ms: i64, settle_ms: i64) -> i64 {
    let phase_unix_ms = start_unix_ms + settle_ms.rem_euclid(MS_PER_MIN);
    if weighed_unix_ms == i64::MIN {
        return phase_unix_ms;
    }
    phase_unix_ms + ((weighed_unix_ms - phase_unix_ms).div_euclid(MS_PER_MIN) + 1) * MS_PER_MIN
}

async fn tick_loop(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        let interval = Duration::from_millis(i.config.tick_interval_ms);
        tick(&i);
        drop(i);
        tokio::time::sleep(interval).await;
    }
}

/// Group commit for households' limits: each batch is one store transaction, applied to the ledger in the
/// order it was written, before any caller in it hears back. Holds the engine only while writing, so it never
/// keeps the store open; it ends when the engine is dropped.
async fn write_limits(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<LimitsWrite>) {
    let mut msgs = Vec::with_capacity(LIMITS_BATCH_LEN);
    while rx.recv_many(&mut msgs, LIMITS_BATCH_LEN).await > 0 {
        let Some(i) = inner.upgrade() else {
            break;
        };
        let batch: Vec<(HouseholdId, Limits)> = msgs.iter().map(|m| (m.household, m.limits.clone())).collect();
        let store = Arc::clone(&i.store);
        let written = match blocking(move || store.put_limits(&batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        for m in msgs.drain(..) {
            let result = match &written {
                Ok(()) => {
                    i.ledger.set_limits(m.household, m.limits);
                    Ok(())
                }
                Err(e) => Err(EngineError::Internal(format!("writing limits: {e}"))),
            };
            let _ = m.done.send(result);
        }
    }
}

async fn write_outcomes(store: Arc<Store>, mut rx: mpsc::Receiver<WriterMsg>) {
    let mut msgs = Vec::with_capacity(OUTCOME_BATCH_LEN);
    let mut stop = None;
    while stop.is_none() && rx.recv_many(&mut msgs, OUTCOME_BATCH_LEN).await > 0 {
        let mut batch = Vec::with_capacity(msgs.len());
        for m in msgs.drain(..) {
            match m {
                WriterMsg::Outcome(o) => batch.push(o),
                WriterMsg::Stop(tx) => stop = Some(tx),
            }
        }
        let s = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || s.append_outcomes(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "writing outcomes"),
            Err(e) => tracing::error!(error = %e, "outcome writer task"),
        }
    }
    drop(store);
    if let Some(tx) = stop {
        let _ = tx.send(());
    }
}

#[cfg(test)]
mod tests;
