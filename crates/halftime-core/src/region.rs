//! Regions: GB distribution network areas, named by their GSP group id.

use serde::{Deserialize, Serialize};

/// Index of a region within the engine's [`RegionSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RegionId(pub u16);

/// Most regions one engine knows. Bounded so that cohort keys stay small.
pub const N_REGIONS_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionDef {
    /// GSP group id, e.g. "_A".
    pub id: String,
    /// Human name, e.g. "Eastern England".
    pub name: String,
}

/// The regions an engine serves, in a fixed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSet {
    defs: Vec<RegionDef>,
}

impl RegionSet {
    /// Builds a region set; ids must be unique, non-empty, and at most [`N_REGIONS_MAX`].
    pub fn new(defs: Vec<RegionDef>) -> Result<Self, String> {
        if defs.is_empty() || defs.len() > N_REGIONS_MAX {
            return Err(format!("regions: need 1..={N_REGIONS_MAX} regions, got {}", defs.len()));
        }
        for (i, d) in defs.iter().enumerate() {
            if d.id.is_empty() || d.id.len() > 16 {
                return Err(format!("regions[{i}].id: must be 1..=16 characters"));
            }
            if defs[..i].iter().any(|e| e.id == d.id) {
                return Err(format!("regions[{i}].id: {:?} is repeated", d.id));
            }
        }
        Ok(Self { defs })
    }

    /// The 14 GB distribution network areas (GSP groups _A to _P, without _I and _O).
    pub fn gb_dno_areas() -> Self {
        let defs = [
            ("_A", "Eastern England"),
            ("_B", "East Midlands"),
            ("_C", "London"),
            ("_D", "Merseyside and North Wales"),
            ("_E", "West Midlands"),
            ("_F", "North East England"),
            ("_G", "North West England"),
            ("_H", "Southern England"),
            ("_J", "South East England"),
            ("_K", "South Wales"),
            ("_L", "South West England"),
            ("_M", "Yorkshire"),
            ("_N", "South and Central Scotland"),
            ("_P", "North Scotland"),
        ]
        .into_iter()
        .map(|(id, name)| RegionDef { id: id.to_string(), name: name.to_string() })
        .collect();
        Self { defs }
    }

    pub fn len(&self) -> usize {
        self.defs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    pub fn lookup(&self, id: &str) -> Option<RegionId> {
        // Construction bounds len() to N_REGIONS_MAX, so the index fits in u16.
        self.defs.iter().position(|d| d.id == id).map(|i| RegionId(i as u16))
    }

    pub fn code(&self, region: RegionId) -> &str {
        &self.defs[usize::from(region.0)].id
    }

    pub fn defs(&self) -> &[RegionDef] {
        &self.defs
    }
}
