//! `halftime serve` configuration: a TOML file with every key documented in `deploy/halftime.example.toml`.
//! Unknown keys are refused; every key has a sensible default.

use halftime_client::clock::{ScaledClock, SystemClock};
use halftime_core::region::RegionDef;
use halftime_core::time::Clock;
use halftime_core::{Limits, RegionSet};
use halftime_engine::{EngineConfig, Grant, ReboundReference};
use halftime_headend::HeadEndConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Embedded store directory.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Prometheus metrics listen address; empty string disables.
    pub metrics_addr: String,
    /// tracing filter, e.g. "info" or "halftime_engine=debug".
    pub log: String,
    pub engine: EngineSection,
    pub caps: CapsSection,
    pub headend: HeadEndSection,
    pub clock: ClockSection,
    /// Regions served; the 14 GB distribution network areas if empty.
    pub regions: Vec<RegionDef>,
    /// Operators' bearer tokens; none means no authentication (development only).
    pub operators: Vec<OperatorSection>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    pub rebound_fraction_max: f64,
    pub rebound_reference: ReboundReference,
    pub rebound_sigmas: f64,
    pub delivery_sigmas: f64,
    pub fairness_window_days: u32,
    pub retention_days: u32,
    pub randomize_start_s: u32,
    pub release_over_min_default: u32,
    pub tick_interval_ms: u64,
    pub top_up: bool,
    pub rebound_guard_share: f64,
    pub plans_in_flight_max: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CapsSection {
    pub events_per_day_max: u32,
    pub deferred_min_per_day_max: u32,
    pub deferral_min_max: u32,
    pub rest_min_min: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeadEndSection {
    pub link_queue_batches: usize,
    pub retry_interval_ms: i64,
    pub outstanding_max: usize,
}

/// The engine's clock: the wall clock, or virtual time for drills and simulations against a served engine.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSection {
    /// Virtual minutes per real minute; 1 is real time.
    pub speed: f64,
    /// Virtual time at start-up (RFC 3339, UTC); empty is now.
    pub start: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperatorSection {
    pub name: String,
    pub token: String,
    /// Regions this operator may target; all if empty.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Largest per-slot target, MW.
    pub target_mw_max: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("halftime-data"),
            grpc_addr: "127.0.0.1:50051".parse().expect("literal address"),
            metrics_addr: "127.0.0.1:9464".into(),
            log: "info".into(),
            engine: EngineSection::default(),
            caps: CapsSection::default(),
            headend: HeadEndSection::default(),
            clock: ClockSection::default(),
            regions: Vec::new(),
            operators: Vec::new(),
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        Self {
            rebound_fraction_max: e.rebound_fraction_max,
            rebound_reference: e.rebound_reference,
            rebound_sigmas: e.rebound_sigmas,
            delivery_sigmas: e.delivery_sigmas,
            fairness_window_days: e.fairness_window_days,
            retention_days: e.retention_days,
            randomize_start_s: e.randomize_start_s,
            release_over_min_default: e.release_over_min_default,
            tick_interval_ms: e.tick_interval_ms,
            top_up: e.top_up,
            rebound_guard_share: e.rebound_guard_share,
            plans_in_flight_max: e.plans_in_flight_max,
        }
    }
}

impl Default for CapsSection {
    fn default() -> Self {
        let l = Limits::system_default();
        Self {
            events_per_day_max: l.events_per_day_max,
            deferred_min_per_day_max: l.deferred_min_per_day_max,
            deferral_min_max: l.deferral_min_max,
            rest_min_min: l.rest_min_min,
        }
    }
}

impl Default for ClockSection {
    fn default() -> Self {
        Self { speed: 1.0, start: String::new() }
    }
}

impl Default for HeadEndSection {
    fn default() -> Self {
        let h = HeadEndConfig::default();
        Self {
            link_queue_batches: h.link_queue_batches,
            retry_interval_ms: h.retry_interval_ms,
            outstanding_max: h.outstanding_max,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let c: Config = toml::from_str(text)?;
        c.engine_config()?;
        c.clock()?;
        Ok(c)
    }

    /// Timings that run on the engine's clock but stand for real-time work, fitted to a clock `speed` times
    /// faster than real time: ticks a few virtual seconds apart, and retries seconds apart in real time, as on a
    /// real network (else an accelerated clock re-sends every unacknowledged command many times a second).
    pub fn fit_to_clock_speed(&mut self, speed: f64) {
        if speed > 1.0 {
            self.engine.tick_interval_ms = ((2_000.0 / speed) as u64).clamp(10, self.engine.tick_interval_ms.max(10));
            self.headend.retry_interval_ms = (self.headend.retry_interval_ms as f64 * speed) as i64;
        }
    }

    /// The wall clock, or a virtual one as `[clock]` asks.
    pub fn clock(&self) -> anyhow::Result<Arc<dyn Clock>> {
        let c = &self.clock;
        anyhow::ensure!((1.0..=10_000.0).contains(&c.speed), "clock.speed: must be in 1..=10000");
        if c.speed == 1.0 && c.start.is_empty() {
            return Ok(Arc::new(SystemClock));
        }
        let start_unix_ms = if c.start.is_empty() {
            SystemClock.now_unix_ms()
        } else {
            halftime_sim::demand::parse_utc(&c.start)
                .map_err(|_| anyhow::anyhow!("clock.start: must be RFC 3339, e.g. 2018-07-07T14:30:00Z"))?
        };
        Ok(Arc::new(ScaledClock::new(start_unix_ms, c.speed)))
    }

    pub fn region_set(&self) -> anyhow::Result<RegionSet> {
        if self.regions.is_empty() {
            Ok(RegionSet::gb_dno_areas())
        } else {
            RegionSet::new(self.regions.clone()).map_err(anyhow::Error::msg)
        }
    }

    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let e = &self.engine;
        anyhow::ensure!((0.0..=1.0).contains(&e.rebound_fraction_max), "engine.rebound_fraction_max: must be in 0..=1");
        anyhow::ensure!((0.0..=10.0).contains(&e.rebound_sigmas), "engine.rebound_sigmas: must be in 0..=10");
        anyhow::ensure!((0.0..=10.0).contains(&e.delivery_sigmas), "engine.delivery_sigmas: must be in 0..=10");
        anyhow::ensure!(
            (0.0..=1.0).contains(&e.rebound_guard_share),
            "engine.rebound_guard_share: must be in 0..=1 (0 turns the guard off)"
        );
        anyhow::ensure!(e.fairness_window_days >= 1, "engine.fairness_window_days: must be >= 1");
        anyhow::ensure!(
            e.retention_days >= e.fairness_window_days,
            "engine.retention_days: must be >= fairness_window_days"
        );
        anyhow::ensure!(
            e.randomize_start_s <= 600,
            "engine.randomize_start_s: must be 0..=600 (GB EV rules: 10 minutes)"
        );
        anyhow::ensure!(e.release_over_min_default <= 30, "engine.release_over_min_default: must be 0..=30");
        anyhow::ensure!((10..=10_000).contains(&e.tick_interval_ms), "engine.tick_interval_ms: must be 10..=10000");
        anyhow::ensure!((1..=64).contains(&e.plans_in_flight_max), "engine.plans_in_flight_max: must be 1..=64");
        anyhow::ensure!(self.headend.link_queue_batches > 0, "headend.link_queue_batches: must be > 0");
        anyhow::ensure!(self.headend.retry_interval_ms > 0, "headend.retry_interval_ms: must be > 0");
        let system_caps = Limits {
            events_per_day_max: self.caps.events_per_day_max,
            deferred_min_per_day_max: self.caps.deferred_min_per_day_max,
            deferral_min_max: self.caps.deferral_min_max,
            rest_min_min: self.caps.rest_min_min,
            ..Limits::system_default()
        };
        halftime_core::validate::limits(&system_caps, "caps").map_err(anyhow::Error::msg)?;
        Ok(EngineConfig {
            regions: self.region_set()?,
            system_caps,
            rebound_fraction_max: e.rebound_fraction_max,
            rebound_reference: e.rebound_reference,
            rebound_sigmas: e.rebound_sigmas,
            delivery_sigmas: e.delivery_sigmas,
            fairness_window_days: e.fairness_window_days,
            retention_days: e.retention_days,
            randomize_start_s: e.randomize_start_s,
            release_over_min_default: e.release_over_min_default,
            headend: HeadEndConfig {
                link_queue_batches: self.headend.link_queue_batches,
                retry_interval_ms: self.headend.retry_interval_ms,
                outstanding_max: self.headend.outstanding_max,
            },
            tick_interval_ms: e.tick_interval_ms,
            top_up: e.top_up,
            rebound_guard_share: e.rebound_guard_share,
            plans_in_flight_max: e.plans_in_flight_max,
        })
    }

    pub fn operators(&self) -> anyhow::Result<halftime_server::Operators> {
        let set = self.region_set()?;
        let mut ops = halftime_server::Operators::default();
        for (i, o) in self.operators.iter().enumerate() {
            anyhow::ensure!(o.token.len() >= 16, "operators[{i}].token: must be at least 16 characters");
            let regions = if o.regions.is_empty() {
                None
            } else {
                Some(
                    o.regions
                        .iter()
                        .map(|r| {
                            set.lookup(r).ok_or_else(|| anyhow::anyhow!("operators[{i}].regions: unknown region {r:?}"))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?,
                )
            };
            ops.grants.insert(o.token.clone(), Grant { regions, target_w_max: o.target_mw_max * 1e6 });
        }
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/halftime.example.toml");

    fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    out.push(path.clone());
                    keys(&path, v, out);
                }
            }
            toml::Value::Array(a) => {
                for v in a {
                    keys(prefix, v, out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_example_parses_and_documents_every_key() {
        let parsed = Config::parse(EXAMPLE).unwrap();
        assert_eq!(parsed.region_set().unwrap(), RegionSet::gb_dno_areas());
        assert_eq!(parsed.operators().unwrap().grants.len(), 2);
        let every = Config {
            regions: RegionSet::gb_dno_areas().defs().to_vec(),
            operators: parsed.operators.clone(),
            ..Config::default()
        };
        let mut wanted = Vec::new();
        keys("", &toml::Value::try_from(&every).unwrap(), &mut wanted);
        let mut present = Vec::new();
        keys("", &toml::from_str::<toml::Value>(EXAMPLE).unwrap(), &mut present);
        for k in wanted {
            assert!(present.contains(&k), "deploy/halftime.example.toml lacks {k}");
        }
        // The example's values are the defaults, but for regions and operators.
        assert_eq!(Config { regions: vec![], operators: vec![], ..parsed }, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::parse("grpc_port = 1").unwrap_err().to_string().contains("grpc_port"));
        assert!(Config::parse("[engine]\nrebound = 1").unwrap_err().to_string().contains("rebound"));
        let e = Config::parse("[engine]\nrebound_fraction_max = 2.0").unwrap_err().to_string();
        assert!(e.contains("engine.rebound_fraction_max"), "{e}");
        let e = Config::parse("[engine]\nrebound_reference = \"target\"").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("rebound_reference") && e.contains("`peak_target`"), "{e}");
        assert!(Config::parse("").is_ok());
        let e = Config::parse("[clock]\nspeed = 0.5").unwrap_err().to_string();
        assert!(e.contains("clock.speed"), "{e}");
        let e = Config::parse("[clock]\nstart = \"yesterday\"").unwrap_err().to_string();
        assert!(e.contains("clock.start"), "{e}");
    }

    #[test]
    fn a_drill_clock_starts_where_it_is_told_and_runs_fast() {
        let c = Config::parse("[clock]\nspeed = 60.0\nstart = \"2018-07-07T14:30:00Z\"").unwrap().clock().unwrap();
        let start = halftime_sim::demand::parse_utc("2018-07-07T14:30:00Z").unwrap();
        let now = c.now_unix_ms();
        assert!((start..start + 60_000).contains(&now), "{now}");
        assert_eq!(c.speed(), 60.0);
        assert_eq!(Config::default().clock().unwrap().speed(), 1.0);
    }
}
