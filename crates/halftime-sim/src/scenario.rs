//! Scenario files (`scenarios/*.toml`), format version 1. Unknown keys are refused; errors name the file, the
//! line and the key. `scenarios/README.md` documents every key.

use halftime_core::ApplianceClass;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}:{line}: {key}: {reason}", path.display())]
    Invalid { path: PathBuf, line: usize, key: String, reason: String },
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
    #[serde(default)]
    pub baseline: BaselineSpec,
    #[serde(rename = "event", default)]
    pub events: Vec<EventSpec>,
    #[serde(default)]
    pub run: RunSpec,
    #[serde(default)]
    pub engine: EngineSpec,
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

/// Demand without Halftime, scaled to the population's share of GB households.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "source", rename_all = "snake_case")]
pub enum BaselineSpec {
    /// A column of the NESO half-hourly national demand file (relative to the scenario file).
    National {
        data: String,
        #[serde(default = "nd")]
        column: String,
    },
    /// One event's ~5-minute series from the TV pickups file.
    Pickup { data: String, event_id: String },
    /// The enrolled appliances' own average draw (flat): for scenarios without a real series.
    #[default]
    Population,
}

fn nd() -> String {
    "ND".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum EventSpec {
    /// Explicit per-minute targets, announced `run.submit_lead_min` ahead; optionally repeated daily.
    Explicit {
        regions: Vec<String>,
        /// ISO-8601 UTC start, e.g. "2018-07-03T19:00:00Z".
        start: String,
        target_mw: Vec<f64>,
        deferral_min_max: u32,
        /// The same event on this many consecutive days.
        #[serde(default = "one_day")]
        repeat_days: u32,
        /// Days of the week (mon..sun) a repeated event skips.
        #[serde(default)]
        skip_weekdays: Vec<String>,
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
    /// A sudden loss of `lost_mw` nationally at `at`, lasting `minutes`, scaled to the population. Submitted at
    /// `at` with no warning, to start at once.
    Trip { regions: Vec<String>, at: String, lost_mw: f64, minutes: u32, deferral_min_max: u32 },
}

fn one() -> f64 {
    1.0
}

fn one_day() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Virtual minutes per real minute.
    pub speed: f64,
    /// Gateway links the simulated devices are spread over.
    pub gateways: u32,
    /// Minutes to keep running after each event's window (rebound and completion); the run keeps going longer
    /// where the event's last deferral can still be running.
    pub tail_min: u32,
    /// Minutes before its start that an announced event is submitted (trips are never announced).
    pub submit_lead_min: u32,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self { speed: 60.0, gateways: 4, tail_min: 45, submit_lead_min: 1 }
    }
}

/// Settings for the in-process engine that differ from its defaults (a served engine keeps its own).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSpec {
    /// What the rebound cap is a share of: "delivered_peak" (the default) or "peak_target", as the engine's
    /// `engine.rebound_reference`.
    pub rebound_reference: Option<String>,
}

/// Weekday names a repeated event may skip.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ScenarioError> {
        let s: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Parse { path: path.into(), message: e.to_string() })?;
        s.validate().map_err(|(key, reason)| ScenarioError::Invalid {
            path: path.into(),
            line: line_of(text, &key),
            key,
            reason: reason.into(),
        })?;
        Ok(s)
    }

    /// The first invalid key and why.
    fn validate(&self) -> Result<(), (String, &'static str)> {
        let bad = |key: &str, reason: &'static str| Err((key.to_string(), reason));
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
        if self.events.len() > 1000 {
            return bad("event", "at most 1000 events");
        }
        for (i, e) in self.events.iter().enumerate() {
            let key = |k: &str| format!("event[{i}].{k}");
            let (regions, deferral_min_max) = match e {
                EventSpec::Explicit { regions, deferral_min_max, .. }
                | EventSpec::Pickup { regions, deferral_min_max, .. }
                | EventSpec::Trip { regions, deferral_min_max, .. } => (regions, *deferral_min_max),
            };
            if regions.is_empty() {
                return bad(&key("regions"), "name at least one region");
            }
            if !(1..=240).contains(&deferral_min_max) {
                return bad(&key("deferral_min_max"), "must be 1..=240");
            }
            match e {
                EventSpec::Explicit { target_mw, repeat_days, skip_weekdays, .. } => {
                    if target_mw.is_empty() || target_mw.len() > 1440 {
                        return bad(&key("target_mw"), "need 1..=1440 one-minute slots");
                    }
                    if target_mw.iter().any(|t| !t.is_finite() || *t < 0.0 || *t > 100_000.0) {
                        return bad(&key("target_mw"), "every slot must be a number in 0..=100000");
                    }
                    if !(1..=366).contains(repeat_days) {
                        return bad(&key("repeat_days"), "must be 1..=366");
                    }
                    if skip_weekdays.iter().any(|d| !WEEKDAYS.contains(&d.as_str())) {
                        return bad(&key("skip_weekdays"), "days are mon, tue, wed, thu, fri, sat, sun");
                    }
                }
                EventSpec::Pickup { share, .. } => {
                    if !share.is_finite() || *share <= 0.0 || *share > 1000.0 {
                        return bad(&key("share"), "must be in (0, 1000]");
                    }
                }
                EventSpec::Trip { lost_mw, minutes, .. } => {
                    if !lost_mw.is_finite() || *lost_mw <= 0.0 || *lost_mw > 100_000.0 {
                        return bad(&key("lost_mw"), "must be in (0, 100000]");
                    }
                    if !(1..=1440).contains(minutes) {
                        return bad(&key("minutes"), "must be 1..=1440");
                    }
                }
            }
        }
        if !(self.run.speed >= 1.0 && self.run.speed <= 10_000.0) {
            return bad("run.speed", "must be 1..=10000");
        }
        if self.run.gateways == 0 || self.run.gateways > 10_000 {
            return bad("run.gateways", "must be 1..=10000");
        }
        if self.run.tail_min > 24 * 60 {
            return bad("run.tail_min", "must be 0..=1440");
        }
        if self.run.submit_lead_min > 24 * 60 {
            return bad("run.submit_lead_min", "must be 0..=1440");
        }
        if self.engine.rebound_reference.as_deref().is_some_and(|r| r != "delivered_peak" && r != "peak_target") {
            return bad("engine.rebound_reference", "must be \"delivered_peak\" or \"peak_target\"");
        }
        Ok(())
    }
}

/// The line (1-based) where `key` is set: `a.b.c` is the line `c = ...` in table `[a.b]` (or the header
/// `[a.b.c]`), and `event[i].k` the line `k = ...` in the i-th `[[event]]`. 0 when it cannot be found.
pub fn line_of(text: &str, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let is_header = |l: &str| l.starts_with('[');
    let sets = |l: &str, k: &str| l.strip_prefix(k).is_some_and(|r| r.trim_start().starts_with('='));
    let find_in = |from: usize, k: &str| {
        lines[from..].iter().take_while(|l| !is_header(l)).position(|l| sets(l, k)).map(|i| from + i + 1)
    };
    if let Some(rest) = key.strip_prefix("event[") {
        let (i, k) = rest.split_once("].").unwrap_or((rest.trim_end_matches(']'), ""));
        let Ok(i) = i.parse::<usize>() else { return 0 };
        let Some(at) = lines.iter().enumerate().filter(|(_, l)| **l == "[[event]]").map(|(n, _)| n).nth(i) else {
            return 0;
        };
        return find_in(at + 1, k).unwrap_or(at + 1);
    }
    if let Some(n) = lines.iter().position(|l| *l == format!("[{key}]")) {
        return n + 1;
    }
    let (table, k) = key.rsplit_once('.').unwrap_or(("", key));
    let from =
        if table.is_empty() { Some(0) } else { lines.iter().position(|l| *l == format!("[{table}]")).map(|n| n + 1) };
    from.and_then(|f| find_in(f, k)).unwrap_or(0)
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
    fn parses_a_good_file() {
        let s = Scenario::parse(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.run, RunSpec::default());
        assert_eq!(s.baseline, BaselineSpec::Population);
    }

    /// Each bad file is refused with the file, the line (0 where TOML itself reports the position) and the key.
    #[test]
    fn refuses_bad_files_naming_file_line_and_key() {
        let trip = "[[event]]\nkind = \"trip\"\nregions = [\"_A\"]\nat = \"2018-01-17T21:00:00Z\"\nlost_mw = 1000.0\nminutes = 20\ndeferral_min_max = 30\n";
        let cases: Vec<(String, &str)> = vec![
            (GOOD.replace("version = 1", "version = 2"), "t.toml:2: version: must be 1"),
            (GOOD.replace("seed = 1", "seed = 1\ncolour = 3"), "unknown field `colour`"),
            (GOOD.replace("seed = 1", "seed = \"one\""), "invalid type: string \"one\""),
            (GOOD.replace("n_households = 10", "n_households = 0"), "t.toml:6: population.n_households"),
            (GOOD.replace("regions = { \"_A\" = 1.0 }", "regions = {}"), "t.toml:7: population.regions"),
            (
                GOOD.replace("[population.classes.fridge]", "[population.classes.kettle]"),
                "t.toml:9: population.classes.kettle: unknown appliance class",
            ),
            (GOOD.replace("ownership = 1.0", "ownership = 1.5"), "t.toml:9: population.classes.fridge"),
            (
                GOOD.replace("enrolment = 1.0", "enrolment = 1.0\npower_w = 0"),
                "t.toml:12: population.classes.fridge.power_w",
            ),
            (
                GOOD.replace("override_propensity = 0.1", "override_propensity = -1"),
                "t.toml:8: population.override_propensity",
            ),
            (GOOD.replace("kind = \"explicit\"", "kind = \"meteor\""), "unknown variant `meteor`"),
            (
                GOOD.replace("regions = [\"_A\"]", "regions = []"),
                "t.toml:14: event[0].regions: name at least one region",
            ),
            (GOOD.replace("target_mw = [0.001]", "target_mw = [-1.0]"), "t.toml:16: event[0].target_mw"),
            (GOOD.replace("target_mw = [0.001]", "target_mw = []"), "t.toml:16: event[0].target_mw"),
            (GOOD.replace("deferral_min_max = 20", "deferral_min_max = 0"), "t.toml:17: event[0].deferral_min_max"),
            (
                GOOD.replace("deferral_min_max = 20", "deferral_min_max = 20\nrepeat_days = 0"),
                "t.toml:18: event[0].repeat_days",
            ),
            (
                GOOD.replace("deferral_min_max = 20", "deferral_min_max = 20\nskip_weekdays = [\"someday\"]"),
                "t.toml:18: event[0].skip_weekdays",
            ),
            (format!("{GOOD}{}", trip.replace("lost_mw = 1000.0", "lost_mw = -5.0")), "t.toml:22: event[1].lost_mw"),
            (format!("{GOOD}{}", trip.replace("minutes = 20", "minutes = 0")), "t.toml:23: event[1].minutes"),
            (format!("{GOOD}{}", trip.replace("at = ", "when = ")), "unknown field `when`"),
            (format!("{GOOD}[run]\nspeed = 0.5\n"), "t.toml:19: run.speed"),
            (format!("{GOOD}[run]\ngateways = 0\n"), "t.toml:19: run.gateways"),
            (format!("{GOOD}[engine]\nrebound_reference = \"target\"\n"), "t.toml:19: engine.rebound_reference"),
            (format!("{GOOD}[engine]\nrebound_fraction_max = 1.0\n"), "unknown field `rebound_fraction_max`"),
            (format!("{GOOD}[baseline]\nsource = \"moon\"\n"), "unknown variant `moon`"),
            (format!("{GOOD}[baseline]\nsource = \"pickup\"\ndata = \"x.csv\"\n"), "missing field `event_id`"),
            (GOOD.replace("[[event]]", "[[evnt]]"), "unknown field `evnt`"),
        ];
        for (text, want) in cases {
            let err = Scenario::parse(&text, Path::new("t.toml")).unwrap_err().to_string();
            assert!(err.starts_with("t.toml") && err.contains(want), "want {want:?}, got: {err}");
        }
        // TOML's own errors carry the line and column.
        let err = Scenario::parse(&GOOD.replace("seed = 1", "seed = \"one\""), Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
    }
}
