//! Simulated appliances behind the client SDK: they shed what a real appliance of their class would, and
//! their households sometimes override.

use halftime_client::{Appliance, Deferral, ResumeReason};
use halftime_core::time::Clock;
use halftime_core::{ApplianceClass, ApplianceId, EventId, HouseholdId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A deferral an appliance really applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    pub device: ApplianceId,
    pub household: HouseholdId,
    pub event: EventId,
    pub start_unix_ms: i64,
    /// When it ended (completed, released or overridden); the planned end until then.
    pub end_unix_ms: i64,
    pub planned_end_unix_ms: i64,
    pub reduction_w: u32,
    pub overridden: bool,
}

/// What every simulated appliance did, for the run's own accounting (independent of the engine's).
#[derive(Debug, Default)]
pub struct SimLog {
    applied: Mutex<Vec<Applied>>,
}

impl SimLog {
    pub fn applied(&self) -> Vec<Applied> {
        self.applied.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A household's decision to override a device at a time.
pub type OverrideRequest = (ApplianceId, i64);

pub struct SimAppliance {
    pub device: ApplianceId,
    pub household: HouseholdId,
    pub class: ApplianceClass,
    pub power_w: u32,
    pub duty: f64,
    pub override_propensity: f64,
    rng: Mutex<SmallRng>,
    clock: Arc<dyn Clock>,
    log: Arc<SimLog>,
    overrides: mpsc::Sender<OverrideRequest>,
}

impl SimAppliance {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: &halftime_core::Appliance,
        override_propensity: f64,
        seed: u64,
        clock: Arc<dyn Clock>,
        log: Arc<SimLog>,
        overrides: mpsc::Sender<OverrideRequest>,
    ) -> Self {
        Self {
            device: a.id,
            household: a.household,
            class: a.class,
            power_w: a.rated_power_w,
            duty: f64::from(a.duty_cycle_permille) / 1000.0,
            override_propensity,
            rng: Mutex::new(SmallRng::seed_from_u64(seed ^ a.id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15))),
            clock,
            log,
            overrides,
        }
    }
}

impl Appliance for SimAppliance {
    fn defer(&self, d: &Deferral) -> Result<u32, String> {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let thermostatic = matches!(
            self.class,
            ApplianceClass::Fridge | ApplianceClass::Freezer | ApplianceClass::HeatPump | ApplianceClass::WaterHeater
        );
        // A thermostatic load sheds its average draw over the window (the compressor or element cycles would
        // have run part of it); a wet appliance or charger sheds its full draw if it was running, else nothing.
        let reduction_w = if thermostatic {
            (f64::from(self.power_w) * self.duty * rng.gen_range(0.8..1.2)) as u32
        } else if rng.gen_bool(self.duty.clamp(0.0, 1.0)) {
            self.power_w
        } else {
            0
        };
        // Overrides grow with the deferral's length.
        let minutes = (d.end_unix_ms - d.start_unix_ms) as f64 / 60_000.0;
        let p = (self.override_propensity * minutes / 20.0).clamp(0.0, 1.0);
        if rng.gen_bool(p) {
            let at = rng.gen_range(d.start_unix_ms..d.end_unix_ms.max(d.start_unix_ms + 1));
            // A full queue only loses the override: the household changed its mind.
            let _ = self.overrides.try_send((self.device, at));
        }
        self.log.applied.lock().unwrap_or_else(|e| e.into_inner()).push(Applied {
            device: self.device,
            household: self.household,
            event: d.event,
            start_unix_ms: self.clock.now_unix_ms().max(d.start_unix_ms),
            end_unix_ms: d.end_unix_ms,
            planned_end_unix_ms: d.end_unix_ms,
            reduction_w,
            overridden: false,
        });
        Ok(reduction_w)
    }

    fn resume(&self, d: &Deferral, why: ResumeReason) {
        let now = self.clock.now_unix_ms();
        let mut log = self.log.applied.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = log.iter_mut().rev().find(|a| a.device == self.device && a.event == d.event) {
            a.end_unix_ms = now.clamp(a.start_unix_ms, a.planned_end_unix_ms);
            a.overridden = why == ResumeReason::Overridden;
        }
    }
}
