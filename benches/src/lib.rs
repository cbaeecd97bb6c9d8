//! Shared fixtures for the benchmarks in `benches/`, and `bench-table` (`src/bin/`).

use halftime_core::{Appliance, ApplianceClass, ApplianceId, HouseholdId, RegionId};

/// The `i`-th appliance of a synthetic population: the eight classes in turn with their typical figures, two
/// appliances per household.
pub fn appliance(i: u64, region: RegionId) -> Appliance {
    let class = ApplianceClass::ALL[(i % 8) as usize];
    let p = class.profile();
    Appliance {
        id: ApplianceId(i + 1),
        household: HouseholdId(i / 2 + 1),
        region,
        class,
        rated_power_w: p.power_w_typical,
        duty_cycle_permille: p.duty_cycle_permille as u16,
        deferral_min_max: p.deferral_min_max_safe as u16,
        override_rate_permille: p.override_rate_permille as u16,
    }
}
