//! Seeded populations: households in regions, with the appliances they enrol and the limits they set.

use crate::scenario::PopulationSpec;
use halftime_core::{Appliance, ApplianceClass, ApplianceId, HouseholdId, Limits, QuietWindow, RegionId, RegionSet};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SimHousehold {
    pub id: HouseholdId,
    pub region: RegionId,
    /// Limits of its own, if it set any.
    pub own_limits: Option<Limits>,
    /// Base chance of overriding a 20-minute deferral.
    pub override_propensity: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Population {
    pub households: Vec<SimHousehold>,
    pub appliances: Vec<Appliance>,
}

/// Household ids start here (MPAN-like, 13 digits).
pub const HOUSEHOLD_ID_BASE: u64 = 1_000_000_000_000;

impl Population {
    pub fn generate(spec: &PopulationSpec, regions: &RegionSet, seed: u64) -> Result<Self, String> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut region_shares = Vec::new();
        for (code, share) in &spec.regions {
            let id = regions.lookup(code).ok_or_else(|| format!("population.regions: unknown region {code:?}"))?;
            region_shares.push((id, *share));
        }
        let total: f64 = region_shares.iter().map(|r| r.1).sum();
        let mut classes = Vec::new();
        for (name, c) in &spec.classes {
            let class =
                ApplianceClass::from_name(name).ok_or_else(|| format!("population.classes.{name}: unknown class"))?;
            classes.push((class, c.ownership * c.enrolment, c.power_w.unwrap_or(class.profile().power_w_typical)));
        }
        let mut households = Vec::with_capacity(spec.n_households as usize);
        let mut appliances = Vec::new();
        for i in 0..u64::from(spec.n_households) {
            let id = HouseholdId(HOUSEHOLD_ID_BASE + i);
            let mut pick = rng.gen_range(0.0..total);
            let mut region = region_shares[0].0;
            for (r, s) in &region_shares {
                if pick < *s {
                    region = *r;
                    break;
                }
                pick -= s;
            }
            let l = &spec.limits;
            let mut own: Option<Limits> = None;
            if rng.gen_bool(l.custom_share) {
                own = Some(Limits {
                    events_per_day_max: rng.gen_range(1..=2),
                    deferred_min_per_day_max: [30, 45, 60][rng.gen_range(0..3)],
                    deferral_min_max: [15, 20, 30][rng.gen_range(0..3)],
                    rest_min_min: [60, 120][rng.gen_range(0..2)],
                    ..Limits::system_default()
                });
            }
            let mut set = |f: &dyn Fn(&mut Limits)| {
                let mut x = own.clone().unwrap_or_else(Limits::system_default);
                f(&mut x);
                own = Some(x);
            };
            if rng.gen_bool(l.quiet_night_share) {
                set(&|x| x.quiet_windows = vec![QuietWindow { start_min: 22 * 60, end_min: 7 * 60 }]);
            }
            if rng.gen_bool(l.never_share) {
                set(&|x| x.never = true);
            }
            if rng.gen_bool(l.paused_share) {
                set(&|x| x.paused = true);
            }
            for (class, p, power_w) in &classes {
                if rng.gen_bool(p.clamp(0.0, 1.0)) {
                    let jitter = rng.gen_range(0.9..1.1);
                    let profile = class.profile();
                    appliances.push(Appliance {
                        id: ApplianceId(id.0 * 16 + class.index() as u64 + 1),
                        household: id,
                        region,
                        class: *class,
                        rated_power_w: ((f64::from(*power_w) * jitter) as u32).max(1),
                        duty_cycle_permille: profile.duty_cycle_permille as u16,
                        deferral_min_max: profile.deferral_min_max_safe as u16,
                        override_rate_permille: ((spec.override_propensity * 1000.0) as u16).max(1),
                    });
                }
            }
            households.push(SimHousehold {
                id,
                region,
                own_limits: own,
                override_propensity: spec.override_propensity,
            });
        }
        Ok(Self { households, appliances })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{ClassSpec, LimitsSpec};

    #[test]
    fn same_seed_same_population() {
        let spec = PopulationSpec {
            n_households: 500,
            regions: [("_A".to_string(), 1.0), ("_C".to_string(), 3.0)].into(),
            classes: [("fridge".to_string(), ClassSpec { ownership: 0.9, enrolment: 0.5, power_w: None })].into(),
            limits: LimitsSpec::default(),
            override_propensity: 0.1,
        };
        let set = RegionSet::gb_dno_areas();
        let a = Population::generate(&spec, &set, 7).unwrap();
        assert_eq!(a, Population::generate(&spec, &set, 7).unwrap());
        assert_ne!(a, Population::generate(&spec, &set, 8).unwrap());
        let n = a.appliances.len() as f64;
        assert!((n - 225.0).abs() < 60.0, "{n} fridges enrolled");
        let in_c = a.households.iter().filter(|h| h.region == set.lookup("_C").unwrap()).count();
        assert!(in_c > 300, "{in_c} of 500 in the 3:1 region");
    }
}
