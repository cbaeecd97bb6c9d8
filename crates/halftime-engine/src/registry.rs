//! The registry of enrolled appliances: a dense vector with indexes by id, household and region, behind one
//! read-mostly lock. Planning scans a region's appliances without touching a map per appliance.

use ahash::AHashMap as HashMap;
use halftime_core::{Appliance, ApplianceId, HouseholdId, RegionId};
use std::sync::RwLock;

#[derive(Debug, Default)]
struct Data {
    appliances: Vec<Appliance>,
    index: HashMap<ApplianceId, u32>,
    by_household: HashMap<HouseholdId, Vec<u32>>,
    by_region: Vec<Vec<u32>>,
}

#[derive(Debug)]
pub struct Registry {
    data: RwLock<Data>,
}

/// Most appliances one engine holds: indexes are u32.
pub const N_APPLIANCES_MAX: usize = u32::MAX as usize / 2;

impl Registry {
    pub fn new(n_regions: usize) -> Self {
        Self { data: RwLock::new(Data { by_region: vec![Vec::new(); n_regions], ..Data::default() }) }
    }

    /// Inserts or updates appliances; returns (new, updated). The caller has validated regions.
    pub fn upsert(&self, list: &[Appliance]) -> (u64, u64) {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (mut new, mut updated) = (0, 0);
        for a in list {
            match d.index.get(&a.id).copied() {
                Some(ix) => {
                    let old = d.appliances[ix as usize];
                    if old.region != a.region {
                        d.by_region[usize::from(old.region.0)].retain(|&i| i != ix);
                        d.by_region[usize::from(a.region.0)].push(ix);
                    }
                    if old.household != a.household {
                        if let Some(v) = d.by_household.get_mut(&old.household) {
                            v.retain(|&i| i != ix);
                        }
                        d.by_household.entry(a.household).or_default().push(ix);
                    }
                    d.appliances[ix as usize] = *a;
                    updated += 1;
                }
                None => {
                    assert!(d.appliances.len() < N_APPLIANCES_MAX, "registry full");
                    let ix = d.appliances.len() as u32;
                    d.appliances.push(*a);
                    d.index.insert(a.id, ix);
                    d.by_household.entry(a.household).or_default().push(ix);
                    d.by_region[usize::from(a.region.0)].push(ix);
                    new += 1;
                }
            }
        }
        (new, updated)
    }

    pub fn get(&self, id: ApplianceId) -> Option<Appliance> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        d.index.get(&id).map(|&ix| d.appliances[ix as usize])
    }

    pub fn of_household(&self, household: HouseholdId) -> Vec<Appliance> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        d.by_household
            .get(&household)
            .map(|v| v.iter().map(|&ix| d.appliances[ix as usize]).collect())
            .unwrap_or_default()
    }

    pub fn contains_household(&self, household: HouseholdId) -> bool {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        d.by_household.get(&household).is_some_and(|v| !v.is_empty())
    }

    pub fn len(&self) -> usize {
        self.data.read().unwrap_or_else(|e| e.into_inner()).appliances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` for every appliance in the given regions.
    pub fn for_each_in(&self, regions: &[RegionId], mut f: impl FnMut(&Appliance)) {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        for r in regions {
            if let Some(list) = d.by_region.get(usize::from(r.0)) {
                for &ix in list {
                    f(&d.appliances[ix as usize]);
                }
            }
        }
    }
}
