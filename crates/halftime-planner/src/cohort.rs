//! Cohorts: region x class x remaining-budget band x burden band.

use halftime_core::{ApplianceClass, RegionId};

/// Floors of the remaining-budget bands, in minutes. An appliance's budget is the longest deferral it could
/// take now: the least of the household's remaining minutes today, its longest single deferral, the
/// appliance's own longest safe deferral and the event's longest deferral. Its band is the largest floor not
/// above that budget, and the LP never gives the cohort a deferral longer than the band's floor.
pub const BUDGET_BAND_FLOORS_MIN: [u32; 9] = [5, 10, 15, 20, 30, 45, 60, 90, 120];

/// Burden bands split households by their burden over the fairness window: 0 least burdened.
pub const N_BURDEN_BANDS: u8 = 3;

/// Weight of each burden band in the LP objective: the least burdened are strongly preferred.
pub const BURDEN_BAND_WEIGHTS: [f64; N_BURDEN_BANDS as usize] = [1.0, 4.0, 16.0];

/// Shortest deferral worth sending, minutes.
pub const DEFERRAL_MIN_MIN: u32 = BUDGET_BAND_FLOORS_MIN[0];

/// The band of a budget in minutes, or `None` if it is below the shortest deferral.
pub fn budget_band(budget_min: u32) -> Option<u8> {
    // The table has 9 entries, so the index fits in u8.
    BUDGET_BAND_FLOORS_MIN.iter().rposition(|&floor| floor <= budget_min).map(|i| i as u8)
}

pub fn budget_band_floor_min(band: u8) -> u32 {
    BUDGET_BAND_FLOORS_MIN[usize::from(band)]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CohortKey {
    pub region: RegionId,
    pub class: ApplianceClass,
    pub budget_band: u8,
    pub burden_band: u8,
}

/// One cohort's supply, as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cohort {
    pub key: CohortKey,
    pub n_appliances: u32,
    /// Sum over the cohort of each appliance's expected load shed (rated power x duty cycle), W.
    pub reduction_w_sum: f64,
    /// Sum over the cohort of expected load shed net of expected overrides, W.
    pub reduction_w_net_sum: f64,
}

impl Cohort {
    /// Longest deferral the LP may give this cohort.
    pub fn deferral_min_cap(&self) -> u32 {
        budget_band_floor_min(self.key.budget_band)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands() {
        assert_eq!(budget_band(4), None);
        assert_eq!(budget_band(5), Some(0));
        assert_eq!(budget_band(29), Some(3));
        assert_eq!(budget_band(30), Some(4));
        assert_eq!(budget_band(10_000), Some(8));
    }
}
