//! `halftime scenario run`: the main job. Starts an engine on a loopback port (or talks to `--server`), enrols
//! a simulated population over the Household API, connects simulated appliances through the client SDK behind
//! a few gateway links, submits the stress events as an operator would, and prints per minute the target, the
//! plan's expectation, the engine's estimate and what the appliances reported shedding. At the end it builds
//! the report (`report.rs`) from what the appliances really did, independently of the engine, and with
//! `--out` writes it as Markdown, JSON and SVG plots.
//!
//! In process, time is virtual: a scaled clock shared by the engine and the appliances. Between event windows
//! that are apart (a season of evenings) the clock jumps ahead, so a month runs in minutes. A served engine
//! (`--server`) keeps its own clock, real or a drill's: the appliances follow it and the events are replayed
//! from a few minutes after its now.

mod plot;
pub mod report;

use crate::config::Config;
use anyhow::Context;
use halftime_client::clock::{ScaledClock, real_duration};
use halftime_client::{DevicePolicy, LinkBuilder, LinkConfig, LinkHandle};
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_core::{ApplianceId, Limits};
use halftime_proto::pb;
use halftime_proto::pb::grid_operator_client::GridOperatorClient;
use halftime_proto::pb::household_client::HouseholdClient;
use halftime_signer::TrustedKeys;
use halftime_sim::demand::{self, format_utc, parse_utc};
use halftime_sim::scenario::{BaselineSpec, WEEKDAYS};
use halftime_sim::{EventSpec, Population, Scenario, SimAppliance, SimLog};
use indicatif::{ProgressBar, ProgressStyle};
use report::{AckTimes, EngineActions, EventRun, Report};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Talk to this engine instead of starting one.
    pub server: Option<String>,
    /// The engine's public key (hex), required with `server`.
    pub trust_key: Option<String>,
    /// Bearer token for the served engine's GridOperator API, if it has operators configured.
    pub token: Option<String>,
    /// Keep the in-process engine's data here instead of a temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Override the scenario's speed.
    pub speed: Option<f64>,
    /// Override the scenario's seed: another draw of the same population and its behaviour.
    pub seed: Option<u64>,
    /// Write `report.md`, `report.json` and the plots here.
    pub out_dir: Option<PathBuf>,
    /// Show a progress bar on standard error (when it is a terminal).
    pub progress: bool,
    /// Print a row per virtual minute.
    pub print_minutes: bool,
}

/// One stress event as the operator will submit it.
#[derive(Clone, Debug)]
pub struct PlannedEvent {
    pub label: String,
    pub regions: Vec<String>,
    pub start_unix_ms: i64,
    pub target_mw: Vec<f64>,
    pub deferral_min_max: u32,
    /// Announced ahead (`run.submit_lead_min`), or a trip submitted the moment it happens.
    pub announced: bool,
}

impl PlannedEvent {
    fn end_unix_ms(&self) -> i64 {
        self.start_unix_ms + self.target_mw.len() as i64 * MS_PER_MIN
    }
}

/// The scenario's events in submission order, repeated events expanded, targets scaled to the population.
pub fn plan_events(s: &Scenario, dir: &Path) -> anyhow::Result<Vec<PlannedEvent>> {
    let share = f64::from(s.population.n_households) / demand::GB_HOUSEHOLDS;
    let mut out = Vec::new();
    for (i, e) in s.events.iter().enumerate() {
        let key = |k: &str| format!("event[{i}].{k}");
        match e {
            EventSpec::Explicit { regions, start, target_mw, deferral_min_max, repeat_days, skip_weekdays } => {
                let first = parse_utc(start).with_context(|| key("start"))?;
                for day in 0..i64::from(*repeat_days) {
                    let start_unix_ms = first + day * 24 * 60 * MS_PER_MIN;
                    let weekday = weekday_name(start_unix_ms);
                    if skip_weekdays.iter().any(|d| d == weekday) {
                        continue;
                    }
                    out.push(PlannedEvent {
                        label: format!("event[{i}] day {}", day + 1),
                        regions: regions.clone(),
                        start_unix_ms,
                        target_mw: target_mw.clone(),
                        deferral_min_max: *deferral_min_max,
                        announced: true,
                    });
                }
            }
            EventSpec::Pickup { regions, data, event_id, from, to, deferral_min_max, share: mult } => {
                let samples = demand::load_pickup(&dir.join(data), event_id).with_context(|| key("data"))?;
                let from = parse_utc(from).with_context(|| key("from"))?;
                let to = parse_utc(to).with_context(|| key("to"))?;
                let rise = demand::pickup_rise_mw(&samples, from, to);
                anyhow::ensure!(!rise.is_empty(), "{}: must be at least a minute after from", key("to"));
                out.push(PlannedEvent {
                    label: format!("event[{i}] {event_id}"),
                    regions: regions.clone(),
                    start_unix_ms: from,
                    target_mw: rise.iter().map(|mw| mw * share * mult).collect(),
                    deferral_min_max: *deferral_min_max,
                    announced: true,
                });
            }
            EventSpec::Trip { regions, at, lost_mw, minutes, deferral_min_max } => out.push(PlannedEvent {
                label: format!("event[{i}] trip {lost_mw} MW"),
                regions: regions.clone(),
                start_unix_ms: parse_utc(at).with_context(|| key("at"))?,
                target_mw: vec![lost_mw * share; *minutes as usize],
                deferral_min_max: *deferral_min_max,
                announced: false,
            }),
        }
    }
    out.sort_by_key(|e| e.start_unix_ms);
    Ok(out)
}

fn weekday_name(unix_ms: i64) -> &'static str {
    use chrono::Datelike;
    let day = chrono::DateTime::from_timestamp_millis(unix_ms).map_or(0, |t| t.weekday().num_days_from_monday());
    WEEKDAYS[day as usize]
}

/// Demand without Halftime, MW, for this population.
pub enum Baseline {
    /// National samples (Unix ms, MW) and the population's share of them.
    Series {
        samples: Vec<(i64, f64)>,
        share: f64,
    },
    Flat(f64),
}

impl Baseline {
    pub fn load(s: &Scenario, dir: &Path, population: &Population) -> anyhow::Result<Self> {
        let share = f64::from(s.population.n_households) / demand::GB_HOUSEHOLDS;
        Ok(match &s.baseline {
            BaselineSpec::National { data, column } => Baseline::Series {
                samples: demand::load_national(&dir.join(data), column).context("baseline.data")?,
                share,
            },
            BaselineSpec::Pickup { data, event_id } => Baseline::Series {
                samples: demand::load_pickup(&dir.join(data), event_id).context("baseline.data")?,
                share,
            },
            BaselineSpec::Population => {
                Baseline::Flat(population.appliances.iter().map(|a| a.expected_reduction_w()).sum::<f64>() / 1e6)
            }
        })
    }

    /// The same demand, `shift_ms` later.
    pub fn shifted(self, shift_ms: i64) -> Self {
        match self {
            Baseline::Series { samples, share } => {
                Baseline::Series { samples: samples.into_iter().map(|(t, mw)| (t + shift_ms, mw)).collect(), share }
            }
            flat => flat,
        }
    }

    pub fn mw_at(&self, unix_ms: i64) -> f64 {
        match self {
            Baseline::Series { samples, share } => demand::demand_at(samples, unix_ms) * share,
            Baseline::Flat(mw) => *mw,
        }
    }
}

/// Stretches of virtual time the run lives through: from a few minutes before each event is submitted to
/// `tail_min` after it ends, merged where they overlap. Each stretch is whole minutes from its first event's
/// start, so that report minutes line up with the event's slots. The clock jumps over the gaps, and the run
/// ends after the last stretch, but never before every command has run its course: a stretch lasts until its
/// events' last deferral can have ended (one may start up to `deferral_min_max` after the event, to absorb
/// payback, and run as long again). Ending sooner would release the late deferrals early, when the links shut
/// down, and show a rebound the plan never made.
pub fn windows(events: &[PlannedEvent], lead_min: u32, tail_min: u32) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for e in events {
        let lead = if e.announced { i64::from(lead_min) } else { 0 };
        let from = e.start_unix_ms - (lead + 3) * MS_PER_MIN;
        let tail = e.end_unix_ms() + i64::from(tail_min) * MS_PER_MIN;
        let held = e.end_unix_ms() + (2 * i64::from(e.deferral_min_max) + 1) * MS_PER_MIN;
        let to = tail.max(held);
        match out.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out.into_iter()
        .map(|(from, to)| {
            let minutes = (to - from + MS_PER_MIN - 1) / MS_PER_MIN;
            (from, from + minutes * MS_PER_MIN)
        })
        .collect()
}

/// Runs a scenario, printing per-minute rows to `out`, and returns its report.
pub async fn run(path: &Path, opts: RunOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<Report> {
    let wall = Instant::now();
    let mut scenario = Scenario::load(path)?;
    if let Some(seed) = opts.seed {
        scenario.seed = seed;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let events = plan_events(&scenario, dir)?;
    anyhow::ensure!(events.len() <= 2_000, "{}: more than 2000 events after repeats", path.display());
    // A served engine keeps its own clock: real time unless it runs a drill clock (`[clock]`), whose speed
    // `--speed` must give.
    let speed = opts.speed.unwrap_or(if opts.server.is_some() { 1.0 } else { scenario.run.speed });
    let mut config = Config::default();
    config.fit_to_clock_speed(speed);
    if let Some(r) = &scenario.engine.rebound_reference {
        // The scenario's parser accepted only the engine's names.
        config.engine.rebound_reference = toml::Value::String(r.clone()).try_into()?;
    }
    let regions = config.region_set()?;
    let system_caps = config.engine_config()?.system_caps;
    let population = Population::generate(&scenario.population, &regions, scenario.seed).map_err(anyhow::Error::msg)?;
    let baseline = Baseline::load(&scenario, dir, &population)?;

    // The engine: in-process on a loopback port in virtual time, or a remote one in real time.
    let first_start = events.first().map(|e| e.start_unix_ms).unwrap_or(0);
    let tmp;
    let mut virtual_clock = None;
    let (clock, running, url, trusted): (Arc<dyn Clock>, Option<crate::Running>, String, TrustedKeys) = match &opts
        .server
    {
        None => {
            // Set-up (enrolment, connecting devices) happens an hour before the first window.
            let scaled = Arc::new(ScaledClock::new(first_start - 120 * MS_PER_MIN, speed));
            virtual_clock = Some(Arc::clone(&scaled));
            let clock: Arc<dyn Clock> = scaled;
            let data_dir = match &opts.data_dir {
                Some(d) => d.clone(),
                None => {
                    tmp = tempfile::tempdir()?;
                    tmp.path().to_path_buf()
                }
            };
            let r = crate::start(&config, &data_dir, "127.0.0.1:0".parse()?, Arc::clone(&clock)).await?;
            let mut trusted = TrustedKeys::new();
            trusted.add(r.engine.public_key())?;
            let url = r.url();
            (clock, Some(r), url, trusted)
        }
        Some(server) => {
            let key = opts.trust_key.as_deref().context("--trust-key is required with --server")?;
            let mut trusted = TrustedKeys::new();
            trusted.add_hex(key)?;
            // A served engine keeps its own time: devices and operator follow its clock, and the events' shape
            // is replayed from a few minutes after its now.
            let region = events.first().and_then(|e| e.regions.first()).cloned().unwrap_or_default();
            let clock = server_clock(&operator_client(server, opts.token.as_deref()).await?, &region, speed).await?;
            (clock, None, server.clone(), trusted)
        }
    };
    writeln!(
        out,
        "scenario {} (seed {}): {} households, {} appliances enrolled, {} events, engine {url}, {speed}x",
        scenario.name,
        scenario.seed,
        population.households.len(),
        population.appliances.len(),
        events.len()
    )?;
    let sim = Sim { scenario: &scenario, population: &population, events: &events, clock: &clock, url: &url };
    let result = drive(&sim, &regions, &system_caps, &trusted, virtual_clock.as_deref(), &opts, out).await;
    if let Some(r) = running {
        r.stop().await;
    }
    let live = result?;
    let baseline = baseline.shifted(live.shift_ms);
    let mut report = report::build(&report::Inputs {
        scenario: &scenario,
        population: &population,
        limits_of: &live.limits_of,
        applied: &live.log.applied(),
        windows: &live.windows,
        baseline: &baseline,
        events: &live.events,
        estimated_mw: &live.estimated_mw,
        estimated_rebound_mw: &live.estimated_rebound_mw,
        applied_mw: &live.applied_mw,
        overrides_sent: live.overrides_sent,
    });
    report.wall_s = wall.elapsed().as_secs_f64();
    report.peak_rss_mb = peak_rss_mb();
    writeln!(out, "{}", report.summary_line())?;
    if let Some(dir) = &opts.out_dir {
        report::write_all(&report, dir).with_context(|| format!("writing the report to {}", dir.display()))?;
        writeln!(out, "report written to {}", dir.join("report.md").display())?;
    }
    Ok(report)
}

/// The GridOperator API, with the operator's bearer token on every call if there is one.
pub type Operator = GridOperatorClient<InterceptedService<Channel, BearerToken>>;

#[derive(Clone, Debug)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

pub async fn operator_client(url: &str, token: Option<&str>) -> anyhow::Result<Operator> {
    let token = token
        .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
        .transpose()
        .context("--token: must be printable ASCII")?;
    let channel =
        Channel::from_shared(url.to_string())?.connect().await.with_context(|| format!("connecting to {url}"))?;
    Ok(GridOperatorClient::with_interceptor(channel, BearerToken(token)))
}

/// A clock that follows a served engine's: set from its `as_of_unix_ms` (half the round trip added; the
/// quickest of a few calls, as NTP does), running at `speed`. Checked a second later: an engine whose clock runs
/// at another speed is refused, because the simulated devices would start their deferrals at the wrong moments.
async fn server_clock(operator: &Operator, region: &str, speed: f64) -> anyhow::Result<Arc<dyn Clock>> {
    const PROBES: usize = 5;
    // The engine's clock now, by the quickest of `PROBES` calls, and that call's half round trip (ms).
    let engine_now = || async {
        let mut best: Option<(i64, f64, Instant)> = None;
        for _ in 0..PROBES {
            let t0 = Instant::now();
            let r = operator
                .clone()
                .get_flexibility(pb::GetFlexibilityRequest {
                    region: region.to_string(),
                    horizon_min: 1,
                    deferral_min_max: 0,
                })
                .await
                .context("reading the engine's clock (GetFlexibility)")?
                .into_inner();
            let half_rtt_ms = t0.elapsed().as_secs_f64() * 1e3 / 2.0;
            if best.is_none_or(|b| half_rtt_ms < b.1) {
                best = Some((r.as_of_unix_ms + (half_rtt_ms * speed) as i64, half_rtt_ms, Instant::now()));
            }
        }
        let (at, half_rtt_ms, seen) = best.context("no probe")?;
        anyhow::Ok((at + (seen.elapsed().as_secs_f64() * 1e3 * speed) as i64, half_rtt_ms))
    };
    let (now, half_rtt_first_ms) = engine_now().await?;
    let clock = Arc::new(ScaledClock::new(now, speed));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (engine, half_rtt_ms) = engine_now().await?;
    let drift_ms = (engine - clock.now_unix_ms()).abs() as f64;
    let tolerance_ms = 500.0 + 2.0 * (half_rtt_first_ms + half_rtt_ms) * speed;
    anyhow::ensure!(
        drift_ms <= tolerance_ms,
        "the engine's clock drifted {drift_ms:.0} ms from ours in a second at --speed {speed}: give --speed the \
         engine's clock speed (its [clock] speed; 1 for real time)"
    );
    Ok(clock)
}

/// Peak resident memory of this process, MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    crate::bench::rss_bytes("VmHWM:") as f64 / (1024.0 * 1024.0)
}

struct Sim<'a> {
    scenario: &'a Scenario,
    population: &'a Population,
    events: &'a [PlannedEvent],
    clock: &'a Arc<dyn Clock>,
    url: &'a str,
}

/// What the run observed live, for the report.
struct Live {
    /// How far the events were moved in time to replay them on a served engine's clock (0 in process).
    shift_ms: i64,
    log: Arc<SimLog>,
    limits_of: HashMap<u64, Limits>,
    windows: Vec<(i64, i64)>,
    events: Vec<EventRun>,
    /// The engine's own estimate (`WatchEvent`) per minute of the windows, in order.
    estimated_mw: Vec<f64>,
    /// The engine's projected rebound (`WatchEvent`) per minute of the windows, as it stood at the minute's end.
    estimated_rebound_mw: Vec<f64>,
    /// What the appliances reported shedding per minute of the windows.
    applied_mw: Vec<f64>,
    overrides_sent: u64,
}

async fn drive(
    sim: &Sim<'_>,
    regions: &halftime_core::RegionSet,
    system_caps: &Limits,
    trusted: &TrustedKeys,
    virtual_clock: Option<&ScaledClock>,
    opts: &RunOptions,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Live> {
    let (scenario, clock) = (sim.scenario, sim.clock);
    let limits_of = enrol(sim, regions, system_caps).await?;
    let log = Arc::new(SimLog::default());
    let (override_tx, override_rx) = tokio::sync::mpsc::channel(65_536);
    let (links, gateway_of) = connect(sim, trusted, &log, override_tx).await?;
    let links = Arc::new(links);
    let overrides_sent = Arc::new(AtomicU64::new(0));
    let override_task =
        spawn_overrides(override_rx, Arc::clone(&links), gateway_of, Arc::clone(clock), &overrides_sent);

    // A served engine keeps its own time: once set up, replay the events' shape from a few minutes after its now.
    let shift_ms = match (virtual_clock, sim.events.first()) {
        (None, Some(first)) => {
            clock.now_unix_ms() + (i64::from(scenario.run.submit_lead_min) + 4) * MS_PER_MIN - first.start_unix_ms
        }
        _ => 0,
    };
    let events: Vec<PlannedEvent> =
        sim.events.iter().map(|e| PlannedEvent { start_unix_ms: e.start_unix_ms + shift_ms, ..e.clone() }).collect();
    let windows = windows(&events, scenario.run.submit_lead_min, scenario.run.tail_min);
    let n_minutes: u64 = windows.iter().map(|(a, b)| ((b - a) / MS_PER_MIN) as u64).sum();
    let bar = if opts.progress { ProgressBar::new(n_minutes) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} virtual minutes {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let progress: Arc<Mutex<HashMap<u64, pb::EventProgress>>> = Arc::default();
    let acks: Arc<Mutex<HashMap<u64, AckTimes>>> = Arc::default();
    let mut operator = operator_client(sim.url, opts.token.as_deref()).await?;
    let mut runs: Vec<EventRun> = Vec::new();
    let mut pending: Vec<(usize, &PlannedEvent)> = events.iter().enumerate().rev().collect();
    let (mut estimated_mw, mut estimated_rebound_mw, mut applied_mw) = (Vec::new(), Vec::new(), Vec::new());
    if opts.print_minutes {
        writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
            "minute (UTC)", "target MW", "expected", "estimated", "reported", "households", "overrides"
        )?;
    }
    let mut ran_windows = Vec::with_capacity(windows.len());
    for (w, &(from, to)) in windows.iter().enumerate() {
        if let Some(c) = virtual_clock {
            c.advance_to(from);
        }
        // The engine still acts on an event after its window until the event's last deferral has ended (the
        // rebound guard's releases, its top-ups after the window, which start deferrals of their own): the clock
        // jumps only once every event is closed, or at the bound, or where the next window begins.
        let next_from = windows.get(w + 1).map_or(i64::MAX, |&(f, _)| f);
        let to_max = (to + WINDOW_EXTENSION_MIN_MAX * MS_PER_MIN).min(next_from);
        // Only this window's events: one an earlier window left open at its bound would hold every later one.
        let first_run = runs.len();
        let mut minute = from;
        while minute < to || (minute < to_max && any_open(&progress, &runs[first_run..])) {
            // Submit what is due: announced events `submit_lead_min` ahead, trips the moment they happen.
            while let Some((i, e)) = pending.last().copied() {
                let lead = if e.announced { i64::from(scenario.run.submit_lead_min) * MS_PER_MIN } else { 0 };
                if e.start_unix_ms - lead > minute {
                    break;
                }
                pending.pop();
                let run = submit(&mut operator, scenario, i, e, clock.now_unix_ms(), &progress, &acks).await?;
                bar.suspend(|| writeln!(out, "{}", run.describe()))?;
                runs.push(run);
            }
            let next = minute + MS_PER_MIN;
            tokio::time::sleep(real_duration(&**clock, next - clock.now_unix_ms())).await;
            let row = live_row(minute, &runs, &progress, &log);
            if opts.print_minutes {
                bar.suspend(|| {
                    writeln!(
                        out,
                        "{:<20} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10} {:>9}",
                        format_utc(minute),
                        row.target_mw,
                        row.expected_mw,
                        row.estimated_mw,
                        row.applied_mw,
                        row.households,
                        overrides_sent.load(Ordering::Relaxed),
                    )
                })?;
            }
            estimated_mw.push(row.estimated_mw);
            estimated_rebound_mw.push(row.estimated_rebound_mw);
            applied_mw.push(row.applied_mw);
            bar.inc(1);
            minute = next;
        }
        ran_windows.push((from, minute));
    }
    bar.finish_and_clear();
    {
        let acks = acks.lock().unwrap_or_else(|e| e.into_inner());
        let progress = progress.lock().unwrap_or_else(|e| e.into_inner());
        for r in &mut runs {
            r.acks = acks.get(&r.event_id).cloned().unwrap_or_default();
            r.engine = progress.get(&r.event_id).map(EngineActions::of).unwrap_or_default();
        }
    }
    override_task.abort();
    let _ = override_task.await;
    if let Ok(links) = Arc::try_unwrap(links) {
        for l in links {
            l.shutdown().await;
        }
    }
    Ok(Live {
        shift_ms,
        log,
        limits_of,
        windows: ran_windows,
        events: runs,
        estimated_mw,
        estimated_rebound_mw,
        applied_mw,
        overrides_sent: overrides_sent.load(Ordering::Relaxed),
    })
}

/// Enrols the population as households would, with the limits they set. Returns each household's effective
/// limits (its own, tightened by the system caps).
async fn enrol(
    sim: &Sim<'_>,
    regions: &halftime_core::RegionSet,
    system_caps: &Limits,
) -> anyhow::Result<HashMap<u64, Limits>> {
    let population = sim.population;
    let mut household =
        HouseholdClient::connect(sim.url.to_string()).await?.max_encoding_message_size(64 * 1024 * 1024);
    for chunk in population.appliances.chunks(halftime_server::ENROL_BATCH_MAX) {
        let appliances = chunk.iter().map(|a| halftime_proto::appliance_to_pb(a, regions.code(a.region))).collect();
        household.enrol_appliances(pb::EnrolAppliancesRequest { appliances }).await.context("enrolling")?;
    }
    let enrolled: std::collections::HashSet<u64> = population.appliances.iter().map(|a| a.household.0).collect();
    let mut limits_of = HashMap::with_capacity(population.households.len());
    // Households set their limits independently: a bounded number of calls in flight at once.
    const IN_FLIGHT_MAX: usize = 64;
    let mut in_flight = tokio::task::JoinSet::new();
    for h in &population.households {
        let effective = h.own_limits.as_ref().map_or_else(|| system_caps.clone(), |l| l.tighter(system_caps));
        limits_of.insert(h.id.0, effective);
        if let (Some(l), true) = (&h.own_limits, enrolled.contains(&h.id.0)) {
            if in_flight.len() >= IN_FLIGHT_MAX
                && let Some(done) = in_flight.join_next().await
            {
                done.context("limits task")??;
            }
            let mut client = household.clone();
            let request = pb::SetLimitsRequest { household_id: h.id.0, limits: Some(halftime_proto::limits_to_pb(l)) };
            in_flight.spawn(async move { client.set_limits(request).await.map(drop).context("setting limits") });
        }
    }
    while let Some(done) = in_flight.join_next().await {
        done.context("limits task")??;
    }
    Ok(limits_of)
}

/// Connects every appliance through the client SDK behind `run.gateways` links.
async fn connect(
    sim: &Sim<'_>,
    trusted: &TrustedKeys,
    log: &Arc<SimLog>,
    override_tx: tokio::sync::mpsc::Sender<halftime_sim::appliance::OverrideRequest>,
) -> anyhow::Result<(Vec<LinkHandle>, HashMap<ApplianceId, usize>)> {
    let (scenario, population) = (sim.scenario, sim.population);
    // As many links as asked for, but never more devices on one than a link takes, nor more links than devices.
    let n_appliances = population.appliances.len().max(1);
    let n_gateways = (scenario.run.gateways as usize)
        .max(n_appliances.div_ceil(halftime_client::DEVICES_PER_LINK_MAX - 1))
        .min(n_appliances);
    let override_of: HashMap<u64, f64> =
        population.households.iter().map(|h| (h.id.0, h.override_propensity)).collect();
    let mut gateway_of = HashMap::with_capacity(population.appliances.len());
    let mut behind: Vec<Vec<&halftime_core::Appliance>> = vec![Vec::new(); n_gateways];
    for (i, a) in population.appliances.iter().enumerate() {
        gateway_of.insert(a.id, i % n_gateways);
        behind[i % n_gateways].push(a);
    }
    let builders = behind.into_iter().enumerate().map(|(g, list)| {
        let config = LinkConfig {
            endpoint: sim.url.to_string(),
            name: format!("gateway-{g}"),
            trusted: trusted.clone(),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            clock: Arc::clone(sim.clock),
            seed: scenario.seed ^ g as u64,
        };
        list.into_iter().fold(LinkBuilder::new(config), |b, a| {
            let appliance = SimAppliance::new(
                a,
                override_of[&a.household.0],
                scenario.seed,
                Arc::clone(sim.clock),
                Arc::clone(log),
                override_tx.clone(),
            );
            // The maker's own caps: its longest safe deferral, and no daily cap tighter than the engine's.
            let policy =
                DevicePolicy { deferral_s_max: u32::from(a.deferral_min_max) * 60, deferred_s_per_day_max: 24 * 3600 };
            b.device(a.id, policy, 0, Arc::new(appliance))
        })
    });
    let mut links: Vec<LinkHandle> = builders.map(LinkBuilder::spawn).collect();
    for l in &mut links {
        tokio::time::timeout(Duration::from_secs(120), l.wait_connected()).await.context("gateway did not connect")?;
    }
    Ok((links, gateway_of))
}

/// Households overriding at the moment they chose, through their device's link.
fn spawn_overrides(
    mut rx: tokio::sync::mpsc::Receiver<halftime_sim::appliance::OverrideRequest>,
    links: Arc<Vec<LinkHandle>>,
    gateway_of: HashMap<ApplianceId, usize>,
    clock: Arc<dyn Clock>,
    sent: &Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let sent = Arc::clone(sent);
    tokio::spawn(async move {
        while let Some((device, at)) = rx.recv().await {
            let Some(&g) = gateway_of.get(&device) else {
                continue;
            };
            let (links, clock, sent) = (Arc::clone(&links), Arc::clone(&clock), Arc::clone(&sent));
            tokio::spawn(async move {
                tokio::time::sleep(real_duration(&*clock, at - clock.now_unix_ms())).await;
                if links[g].override_now(device).await {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    })
}

/// Submits one event as an operator would, and watches it: progress for the live rows, and the real time
/// from submission to the first, half and 99 % of its devices acknowledging.
async fn submit(
    operator: &mut Operator,
    scenario: &Scenario,
    i: usize,
    e: &PlannedEvent,
    now_unix_ms: i64,
    progress: &Arc<Mutex<HashMap<u64, pb::EventProgress>>>,
    acks: &Arc<Mutex<HashMap<u64, AckTimes>>>,
) -> anyhow::Result<EventRun> {
    let t0 = Instant::now();
    let r = operator
        .submit_stress_event(pb::SubmitStressEventRequest {
            regions: e.regions.clone(),
            // A trip starts at once (0 is "now"); an announced event at its start.
            start_unix_ms: if e.announced { e.start_unix_ms.max(now_unix_ms) } else { 0 },
            target_mw: e.target_mw.clone(),
            target_kw: Vec::new(),
            deferral_min_max: e.deferral_min_max,
            priority: pb::Priority::High as i32,
            idempotency_key: format!("scenario-{}-{}-{i}-{}", scenario.name, scenario.seed, e.start_unix_ms),
        })
        .await
        .with_context(|| format!("submitting {}", e.label))?
        .into_inner();
    let submit_rpc_ms = t0.elapsed().as_secs_f64() * 1e3;
    let plan = r.plan.unwrap_or_default();
    let mut stream = operator.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await?.into_inner();
    let (progress, acks) = (Arc::clone(progress), Arc::clone(acks));
    let event_id = r.event_id;
    tokio::spawn(async move {
        let mut times = AckTimes::default();
        while let Ok(Some(p)) = stream.message().await {
            times.observe(p.acknowledged, p.dispatched, t0.elapsed().as_secs_f64() * 1e3);
            acks.lock().unwrap_or_else(|e| e.into_inner()).insert(event_id, times.clone());
            progress.lock().unwrap_or_else(|e| e.into_inner()).insert(p.event_id, p);
        }
    });
    Ok(EventRun {
        event_id,
        label: e.label.clone(),
        submit_rpc_ms,
        plan,
        acks: AckTimes::default(),
        engine: EngineActions::default(),
    })
}

struct LiveRow {
    target_mw: f64,
    expected_mw: f64,
    estimated_mw: f64,
    estimated_rebound_mw: f64,
    applied_mw: f64,
    households: usize,
}

/// Minutes a window runs on past its planned end, at most, for events whose deferrals are still running (top-ups
/// after the window start their own).
const WINDOW_EXTENSION_MIN_MAX: i64 = 120;

/// Whether one of `runs` is not yet closed (its last deferral has not ended), as its last update said.
fn any_open(progress: &Mutex<HashMap<u64, pb::EventProgress>>, runs: &[EventRun]) -> bool {
    let progress = progress.lock().unwrap_or_else(|e| e.into_inner());
    runs.iter()
        .filter_map(|r| progress.get(&r.event_id))
        .any(|p| !p.closed && p.state != pb::EventState::Cancelled as i32)
}

fn live_row(
    minute: i64,
    runs: &[EventRun],
    progress: &Mutex<HashMap<u64, pb::EventProgress>>,
    log: &SimLog,
) -> LiveRow {
    let slot = |start: i64, v: &[f64]| -> f64 {
        // Nearest slot: a trip's plan starts when the engine received it, a moment after the minute.
        let s = ((minute - start) as f64 / MS_PER_MIN as f64).round() as i64;
        if s < 0 { 0.0 } else { v.get(s as usize).copied().unwrap_or(0.0) }
    };
    let target_kw: f64 = runs.iter().map(|r| slot(r.plan.start_unix_ms, &r.plan.target_kw)).sum();
    let expected_kw: f64 = runs.iter().map(|r| slot(r.plan.start_unix_ms, &r.plan.expected_kw)).sum();
    let (estimated_kw, estimated_rebound_kw) = {
        let progress = progress.lock().unwrap_or_else(|e| e.into_inner());
        let estimated_kw: f64 = progress.values().map(|p| slot(p.start_unix_ms, &p.delivered_kw)).sum();
        let rebound_kw: f64 = progress
            .values()
            .map(|p| slot(p.start_unix_ms + p.target_kw.len() as i64 * MS_PER_MIN, &p.rebound_kw))
            .sum();
        (estimated_kw, rebound_kw)
    };
    let (applied_w, households) = log.reported_in_minute(minute);
    // `+ 0.0` turns the empty sum's -0.0 into 0.0 for printing.
    LiveRow {
        target_mw: target_kw / 1e3 + 0.0,
        expected_mw: expected_kw / 1e3 + 0.0,
        estimated_mw: estimated_kw.max(0.0) / 1e3,
        estimated_rebound_mw: estimated_rebound_kw.max(0.0) / 1e3,
        applied_mw: applied_w / 1e6,
        households,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(start_unix_ms: i64, minutes: usize, announced: bool) -> PlannedEvent {
        PlannedEvent {
            label: String::new(),
            regions: vec!["_C".into()],
            start_unix_ms,
            target_mw: vec![1.0; minutes],
            deferral_min_max: 20,
            announced,
        }
    }

    #[test]
    fn windows_line_up_with_event_slots_merge_overlaps_and_skip_gaps() {
        let t = 1_000 * MS_PER_MIN + 33_000;
        let day = 24 * 60 * MS_PER_MIN;
        let w = windows(&[event(t, 10, true), event(t + 5 * MS_PER_MIN, 10, false), event(t + day, 10, true)], 2, 15);
        assert_eq!(w.len(), 2);
        // Announced 2 minutes ahead, 3 minutes before that; the clock jumps after it, so it lasts until the
        // second event's last 20-minute deferral can have ended (one may start 20 minutes after the event).
        assert_eq!(w[0], (t - 5 * MS_PER_MIN, t + 56 * MS_PER_MIN));
        // The last one too lasts until its deferrals can have ended, not just 15 minutes after its event's end:
        // the links shut down after it, and would release them early.
        assert_eq!(w[1], (t + day - 5 * MS_PER_MIN, t + day + 51 * MS_PER_MIN));
        // A trip is not announced; a tail longer than its deferrals can run decides the end.
        assert_eq!(windows(&[event(t, 1, false)], 10, 60), vec![(t - 3 * MS_PER_MIN, t + 61 * MS_PER_MIN)]);
    }
}
