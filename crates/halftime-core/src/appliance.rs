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
    /// How the class runs, which decides what a deferral sheds and how it pays back (`crate::physics`).
    pub timing: Timing,
    /// Relative discomfort of one minute of deferral, used to weigh the LP's objective.
    pub discomfort_weight: f64,
}

/// How an appliance class runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Timing {
    /// Cycles on for `on_min` at a time, at the class's duty cycle.
    Thermostat { on_min: f64 },
    /// Runs cycles or sessions of `len_min` when in use (the duty cycle is the chance it is in use).
    Cycle { len_min: f64 },
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
                 timing,
                 discomfort_weight| ClassProfile {
            power_w_typical,
            duty_cycle_permille,
            deferral_min_max_safe,
            override_rate_permille,
            timing,
            discomfort_weight,
        };
        let thermostat = |on_min| Timing::Thermostat { on_min };
        let cycle = |len_min| Timing::Cycle { len_min };
        match self {
            // tracebase refrigerator (cycle_stats.csv): 135 W running, 25 cycles a day of 14.3 min on, 24.5 % duty.
            ApplianceClass::Fridge => p(135, 250, 30, 20, thermostat(14.3), 1.0),
            // tracebase freezer: 160 W, 27 cycles a day of 9.7 min on, 15.8 % duty.
            ApplianceClass::Freezer => p(160, 160, 60, 10, thermostat(9.7), 0.8),
            // Assumption: compressor minimum run of 20 min at 45 % winter duty.
            ApplianceClass::HeatPump => p(2_000, 450, 30, 80, thermostat(20.0), 2.0),
            // Assumption: the element reheats for 15 min at a time, 12 % of the evening.
            ApplianceClass::WaterHeater => p(3_000, 120, 120, 20, thermostat(15.0), 0.5),
            // Cycle lengths: UK-DALE, REFIT and IDEAL medians 38-137 min (washing machine), 32-93 min (dishwasher),
            // tracebase 149 min (tumble dryer).
            ApplianceClass::WashingMachine => p(1_800, 60, 20, 100, cycle(90.0), 1.5),
            ApplianceClass::Dishwasher => p(1_800, 60, 20, 80, cycle(75.0), 1.2),
            ApplianceClass::TumbleDryer => p(2_300, 50, 20, 100, cycle(120.0), 1.5),
            // 7.4 kW home charge point; about one in six charging on a winter evening, sessions of ~20 kWh
            // (~160 min); the energy is made up at the end of the session.
            ApplianceClass::EvCharger => p(7_400, 170, 60, 60, cycle(240.0), 1.0),
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
