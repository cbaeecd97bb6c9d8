//! Scenario files (`scenarios/*.toml`), format version 1. Unknown keys are refused; errors name the file and
//! the key (and the line, where TOML parsing knows it).

use halftime_core::ApplianceClass;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid { path: PathBuf, key: String, reason: String },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Format version; must be 1.
    pub version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seed for the population, appliance behaviour and overrides.
    pub seed: u64,
    pub population: PopulationSpec,
    #[serde(rename = "event", default)]
    pub events: Vec<EventSpec>,
    #[serde(default)]
    pub run: RunSpec,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PopulationSpec {
    pub n_households: u32,
    /// Region id to share of households; shares are normalised.
    pub regions: BTreeMap<String, f64>,
    /// Per appliance class (by name: fridge, freezer, heat_pump, water_heater, washing_machine, dishwasher,
    /// tumble_dryer, ev_charger).
    pub classes: BTreeMap<String, ClassSpec>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Base chance that a household overrides a 20-minute deferral.
    pub override_propensity: f64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    /// Share of households that own one.
    pub ownership: f64,
    /// Share of owners who enrol it.
    pub enrolment: f64,
    /// Draw while running; the class default if absent.
    pub power_w: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Share of households that set limits of their own (tighter than the system caps).
    pub custom_share: f64,
    /// Share that never take part (vulnerable, medical).
    pub never_share: f64,
    /// Share that have paused participation.
    pub paused_share: f64,
    /// Share with a quiet window 22:00-07:00 UTC.
    pub quiet_night_share: f64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self { custom_share: 0.2, never_share: 0.02, paused_share: 0.03, quiet_night_share: 0.2 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum EventSpec {
    /// Explicit per-minute targets.
    Explicit {
        regions: Vec<String>,
        /// ISO-8601 UTC start, e.g. "2018-07-03T19:00:00Z".
        start: String,
        target_mw: Vec<f64>,
        deferral_min_max: u32,
    },
    /// Shave the part of a real TV pickup that rises above the level at `from`, scaled to the population.
    Pickup {
        regions: Vec<String>,
        /// CSV of `event_id,timestamp_utc,demand_mw` (relative to the scenario file).
        data: String,
        event_id: String,
        from: String,
        to: String,
        deferral_min_max: u32,
        /// Multiplier on the population's share of the national rise.
        #[serde(default = "one")]
        share: f64,
    },
    /// A sudden loss of `lost_mw` nationally at `at`, lasting `minutes`, scaled to the population.
    Trip { regions: Vec<String>, at: String, lost_mw: f64, minutes: u32, deferral_min_max: u32 },
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Virtual minutes per real minute.
    pub speed: f64,
    /// Gateway links the simulated devices are spread over.
    pub gateways: u32,
    /// Minutes to keep running after the last event's window (rebound and completion).
    pub tail_min: u32,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self { speed: 60.0, gateways: 4, tail_min: 45 }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ScenarioError> {
        let s: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Parse { path: path.into(), message: e.to_string() })?;
        s.validate(path)?;
        Ok(s)
    }

    fn validate(&self, path: &Path) -> Result<(), ScenarioError> {
        let bad = |key: &str, reason: &str| {
            Err(ScenarioError::Invalid { path: path.into(), key: key.into(), reason: reason.into() })
        };
        if self.version != FORMAT_VERSION {
            return bad("version", "must be 1");
        }
        let p = &self.population;
        if p.n_households == 0 || p.n_households > 30_000_000 {
            return bad("population.n_households", "must be 1..=30000000");
        }
        if p.regions.is_empty()
            || p.regions.values().any(|s| !s.is_finite() || *s < 0.0)
            || p.regions.values().sum::<f64>() <= 0.0
        {
            return bad("population.regions", "need at least one region with a positive share");
        }
        for (name, c) in &p.classes {
            if ApplianceClass::from_name(name).is_none() {
                return bad(&format!("population.classes.{name}"), "unknown appliance class");
            }
            if !(0.0..=1.0).contains(&c.ownership) || !(0.0..=1.0).contains(&c.enrolment) {
                return bad(&format!("population.classes.{name}"), "ownership and enrolment must be in 0..=1");
            }
            if c.power_w.is_some_and(|w| w == 0 || w > 20_000) {
                return bad(&format!("population.classes.{name}.power_w"), "must be 1..=20000");
            }
        }
        let l = &p.limits;
        for (k, v) in [
            ("custom_share", l.custom_share),
            ("never_share", l.never_share),
            ("paused_share", l.paused_share),
            ("quiet_night_share", l.quiet_night_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(&format!("population.limits.{k}"), "must be in 0..=1");
            }
        }
        if !(0.0..=1.0).contains(&p.override_propensity) {
            return bad("population.override_propensity", "must be in 0..=1");
        }
        if self.events.is_empty() {
            return bad("event", "at least one [[event]] is required");
        }
        if !(self.run.speed >= 1.0 && self.run.speed <= 10_000.0) {
            return bad("run.speed", "must be 1..=10000");
        }
        if self.run.gateways == 0 || self.run.gateways > 10_000 {
            return bad("run.gateways", "must be 1..=10000");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 1
name = "t"
seed = 1
[population]
n_households = 10
regions = { "_A" = 1.0 }
override_propensity = 0.1
[population.classes.fridge]
ownership = 1.0
enrolment = 1.0
[[event]]
kind = "explicit"
regions = ["_A"]
start = "2018-07-03T19:00:00Z"
target_mw = [0.001]
deferral_min_max = 20
"#;

    #[test]
    fn parses_a_good_file_and_names_what_is_wrong_in_bad_ones() {
        let path = Path::new("t.toml");
        let s = Scenario::parse(GOOD, path).unwrap();
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.run, RunSpec::default());
        let cases = [
            (GOOD.replace("version = 1", "version = 2"), "version"),
            (GOOD.replace("seed = 1", "seed = 1\ncolour = 3"), "colour"),
            (GOOD.replace("n_households = 10", "n_households = 0"), "population.n_households"),
            (GOOD.replace("[population.classes.fridge]", "[population.classes.kettle]"), "population.classes.kettle"),
            (GOOD.replace("ownership = 1.0", "ownership = 1.5"), "population.classes.fridge"),
            (GOOD.replace("override_propensity = 0.1", "override_propensity = -1"), "population.override_propensity"),
            (GOOD.replace("kind = \"explicit\"", "kind = \"meteor\""), "meteor"),
        ];
        for (text, key) in cases {
            let err = Scenario::parse(&text, path).unwrap_err().to_string();
            assert!(err.contains(key) && err.starts_with("t.toml"), "{key}: {err}");
        }
    }
}
