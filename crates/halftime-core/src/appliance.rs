//! Appliance classes and enrolled appliances.

use crate::ids::{ApplianceId, HouseholdId};
use crate::region::RegionId;
use serde::{Deserialize, Serialize};

/// The classes that may be deferred. Kettles, showers, cookers and lighting are never deferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ApplianceClass {
    Fridge,
    Freezer,
    HeatPump,
    WaterHeater,
    WashingMachine,
    Dishwasher,
    TumbleDryer,
    EvCharger,
}

pub const N_CLASSES: usize = 8;

/// Starting figures per class: the brief's table, and `../shared/data/appliances/cycle_stats.csv`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassProfile {
    /// Draw while running.
    pub power_w_typical: u32,
    /// Share of time running, per mille: the chance that an enrolled appliance is drawing power at a given
    /// minute (evening figures).
    pub duty_cycle_permille: u32,
    /// Longest deferral that is safe for the class by default.
    pub deferral_min_max_safe: u32,
    /// Share of deferrals households are expected to override, per mille.
    pub override_rate_permille: u32,
    /// After release, the deferred energy is paid back over `ceil(deferral_min * payback_window_factor)`
    /// minutes. Thermostatic loads run flat out until they recover: duty / (1 - duty). Wet appliances resume
    /// their cycle: about the deferral itself. EV chargers and water heaters spread recovery over their session.
    pub payback_window_factor: f64,
    /// Relative discomfort of one minute of deferral, used to weigh the LP's objective.
    pub discomfort_weight: f64,
}

impl ApplianceClass {
    pub const ALL: [ApplianceClass; N_CLASSES] = [
        ApplianceClass::Fridge,
        ApplianceClass::Freezer,
        ApplianceClass::HeatPump,
        ApplianceClass::WaterHeater,
        ApplianceClass::WashingMachine,
        ApplianceClass::Dishwasher,
        ApplianceClass::TumbleDryer,
        ApplianceClass::EvCharger,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            ApplianceClass::Fridge => "fridge",
            ApplianceClass::Freezer => "freezer",
            ApplianceClass::HeatPump => "heat_pump",
            ApplianceClass::WaterHeater => "water_heater",
            ApplianceClass::WashingMachine => "washing_machine",
            ApplianceClass::Dishwasher => "dishwasher",
            ApplianceClass::TumbleDryer => "tumble_dryer",
            ApplianceClass::EvCharger => "ev_charger",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    pub fn profile(self) -> ClassProfile {
        let p = |power_w_typical,
                 duty_cycle_permille,
                 deferral_min_max_safe,
                 override_rate_permille,
                 payback_window_factor,
                 discomfort_weight| ClassProfile {
            power_w_typical,
            duty_cycle_permille,
            deferral_min_max_safe,
            override_rate_permille,
            payback_window_factor,
            discomfort_weight,
        };
        match self {
            // 135 W running, 25 % duty, 14 min cycles (tracebase refrigerator, cycle_stats.csv).
            ApplianceClass::Fridge => p(135, 250, 30, 20, 1.0 / 3.0, 1.0),
            // 160 W, 16 % duty (tracebase freezer).
            ApplianceClass::Freezer => p(160, 160, 60, 10, 0.16 / 0.84, 0.8),
            ApplianceClass::HeatPump => p(2_000, 450, 30, 80, 0.45 / 0.55, 2.0),
            // The tank reheats flat out after release.
            ApplianceClass::WaterHeater => p(3_000, 120, 120, 20, 0.12 / 0.88, 0.5),
            ApplianceClass::WashingMachine => p(1_800, 60, 20, 100, 1.0, 1.5),
            ApplianceClass::Dishwasher => p(1_800, 60, 20, 80, 1.0, 1.2),
            ApplianceClass::TumbleDryer => p(2_300, 50, 20, 100, 1.0, 1.5),
            // 7.4 kW home charge point; about one in six charging on a winter evening.
            // The charger resumes at its old rate; the energy is made up at the end of the session, hours later.
            ApplianceClass::EvCharger => p(7_400, 170, 60, 60, 8.0, 1.0),
        }
    }
}

/// An enrolled appliance. `duty_cycle_permille`, `deferral_min_max` and `override_rate_permille` are already
/// resolved (class defaults filled in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appliance {
    pub id: ApplianceId,
    pub household: HouseholdId,
    pub region: RegionId,
    pub class: ApplianceClass,
    pub rated_power_w: u32,
    pub duty_cycle_permille: u16,
    pub deferral_min_max: u16,
    pub override_rate_permille: u16,
}

impl Appliance {
    /// Expected load shed by deferring this appliance at a random minute, in W.
    pub fn expected_reduction_w(&self) -> f64 {
        f64::from(self.rated_power_w) * f64::from(self.duty_cycle_permille) / 1000.0
    }

    pub fn override_rate(&self) -> f64 {
        f64::from(self.override_rate_permille) / 1000.0
    }
}
