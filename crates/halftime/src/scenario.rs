//! `halftime scenario run`: the main job. Starts an engine on a loopback port (or talks to `--server`),
//! enrols a simulated population over the Household API, connects simulated appliances through the client
//! SDK behind a few gateway links, submits the stress events as an operator would, and prints per minute the
//! target, the expected, the engine's delivered estimate and what the appliances really shed, with households
//! deferred, overrides and limit violations (checked independently of the engine against what the appliances
//! applied).

use crate::config::Config;
use anyhow::Context;
use halftime_client::clock::{ScaledClock, SystemClock, real_duration};
use halftime_client::{DevicePolicy, LinkBuilder, LinkConfig, LinkHandle};
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_core::{ApplianceId, Limits, Reservation, audit};
use halftime_proto::pb;
use halftime_proto::pb::grid_operator_client::GridOperatorClient;
use halftime_proto::pb::household_client::HouseholdClient;
use halftime_signer::TrustedKeys;
use halftime_sim::demand::{self, format_utc, parse_utc};
use halftime_sim::{EventSpec, Population, Scenario, SimAppliance, SimLog};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Talk to this engine instead of starting one.
    pub server: Option<String>,
    /// The engine's public key (hex), required with `server`.
    pub trust_key: Option<String>,
    /// Keep the in-process engine's data here instead of a temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Override the scenario's speed.
    pub speed: Option<f64>,
}

/// One printed minute.
#[derive(Clone, Debug, PartialEq)]
pub struct MinuteRow {
    pub t_unix_ms: i64,
    pub target_mw: f64,
    pub expected_mw: f64,
    /// The engine's estimate (WatchEvent).
    pub delivered_mw: f64,
    /// What the simulated appliances really shed.
    pub applied_mw: f64,
    pub households_deferred: usize,
    pub overrides: u64,
    pub violations: usize,
}

#[derive(Clone, Debug, Default)]
pub struct RunReport {
    pub scenario: String,
    pub seed: u64,
    pub n_households: usize,
    pub n_appliances: usize,
    pub minutes: Vec<MinuteRow>,
    pub violations: usize,
    pub overrides: u64,
    pub events: Vec<(u64, pb::PlanSummary)>,
    /// Submit call latency per event, ms (real time).
    pub submit_ms: Vec<f64>,
}

struct PlannedEvent {
    regions: Vec<String>,
    start_unix_ms: i64,
    target_mw: Vec<f64>,
    deferral_min_max: u32,
}

fn plan_events(s: &Scenario, dir: &Path) -> anyhow::Result<Vec<PlannedEvent>> {
    let share = f64::from(s.population.n_households) / demand::GB_HOUSEHOLDS;
    let mut out = Vec::new();
    for (i, e) in s.events.iter().enumerate() {
        let key = |k: &str| format!("event[{i}].{k}");
        out.push(match e {
            EventSpec::Explicit { regions, start, target_mw, deferral_min_max } => PlannedEvent {
                regions: regions.clone(),
                start_unix_ms: parse_utc(start).with_context(|| key("start"))?,
                target_mw: target_mw.clone(),
                deferral_min_max: *deferral_min_max,
            },
            EventSpec::Pickup { regions, data, event_id, from, to, deferral_min_max, share: mult } => {
                let samples = demand::load_pickup(&dir.join(data), event_id).with_context(|| key("data"))?;
                let from = parse_utc(from).with_context(|| key("from"))?;
                let to = parse_utc(to).with_context(|| key("to"))?;
                let rise = demand::pickup_rise_mw(&samples, from, to);
                anyhow::ensure!(!rise.is_empty(), "{}: to must be after from", key("to"));
                PlannedEvent {
                    regions: regions.clone(),
                    start_unix_ms: from,
                    target_mw: rise.iter().map(|mw| mw * share * mult).collect(),
                    deferral_min_max: *deferral_min_max,
                }
            }
            EventSpec::Trip { regions, at, lost_mw, minutes, deferral_min_max } => PlannedEvent {
                regions: regions.clone(),
                start_unix_ms: parse_utc(at).with_context(|| key("at"))?,
                target_mw: vec![lost_mw * share; *minutes as usize],
                deferral_min_max: *deferral_min_max,
            },
        });
    }
    out.sort_by_key(|e| e.start_unix_ms);
    Ok(out)
}

/// Runs a scenario, printing per-minute rows to `out`.
pub async fn run(path: &Path, opts: RunOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<RunReport> {
    let scenario = Scenario::load(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut events = plan_events(&scenario, dir)?;
    let speed = opts.speed.unwrap_or(scenario.run.speed);
    let mut config = Config::default();
    // The closed loop ticks in real time: keep it at a few virtual seconds however fast the clock runs.
    config.engine.tick_interval_ms = ((2_000.0 / speed) as u64).clamp(10, 200);
    let regions = config.region_set()?;
    let system_caps = config.engine_config()?.system_caps;
    let population = Population::generate(&scenario.population, &regions, scenario.seed).map_err(anyhow::Error::msg)?;

    // The engine: in-process on a loopback port in virtual time, or a remote one in real time.
    let first_start = events.first().map(|e| e.start_unix_ms).unwrap_or(0);
    let tmp;
    let mut virtual_clock = None;
    let (clock, running, url, trusted): (Arc<dyn Clock>, Option<crate::Running>, String, TrustedKeys) =
        match &opts.server {
            None => {
                // Set-up (enrolment, connecting devices) happens an hour before; the clock then jumps to just
                // before the first event.
                let scaled = Arc::new(ScaledClock::new(first_start - 60 * MS_PER_MIN, speed));
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
                // A remote engine runs in real time: replay the events' shape starting two minutes from now.
                let clock: Arc<dyn Clock> = Arc::new(SystemClock);
                let shift = clock.now_unix_ms() + 2 * MS_PER_MIN - first_start;
                for e in &mut events {
                    e.start_unix_ms += shift;
                }
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

    let ready = move || {
        if let Some(c) = &virtual_clock {
            c.advance_to(first_start - 2 * MS_PER_MIN);
        }
    };
    let result =
        drive(&scenario, &population, &regions, &events, &system_caps, &clock, &url, &trusted, ready, out).await;
    if let Some(r) = running {
        r.stop().await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    scenario: &Scenario,
    population: &Population,
    regions: &halftime_core::RegionSet,
    events: &[PlannedEvent],
    system_caps: &Limits,
    clock: &Arc<dyn Clock>,
    url: &str,
    trusted: &TrustedKeys,
    ready: impl FnOnce(),
    out: &mut (dyn Write + Send),
) -> anyhow::Result<RunReport> {
    // Enrol the population as households would, and their own limits.
    let mut household = HouseholdClient::connect(url.to_string()).await?.max_encoding_message_size(64 * 1024 * 1024);
    for chunk in population.appliances.chunks(halftime_server::ENROL_BATCH_MAX) {
        let appliances = chunk
            .iter()
            .map(|a| pb::Appliance {
                appliance_id: a.id.0,
                household_id: a.household.0,
                region: regions.code(a.region).to_string(),
                class: halftime_proto::class_to_pb(a.class) as i32,
                rated_power_w: a.rated_power_w,
                duty_cycle_permille: u32::from(a.duty_cycle_permille),
                deferral_min_max: u32::from(a.deferral_min_max),
                override_rate_permille: u32::from(a.override_rate_permille),
            })
            .collect();
        household.enrol_appliances(pb::EnrolAppliancesRequest { appliances }).await?;
    }
    let enrolled: HashSet<u64> = population.appliances.iter().map(|a| a.household.0).collect();
    let mut limits_of: HashMap<u64, Limits> = HashMap::new();
    for h in &population.households {
        let effective = h.own_limits.as_ref().map_or_else(|| system_caps.clone(), |l| l.tighter(system_caps));
        limits_of.insert(h.id.0, effective);
        if let (Some(l), true) = (&h.own_limits, enrolled.contains(&h.id.0)) {
            household
                .set_limits(pb::SetLimitsRequest {
                    household_id: h.id.0,
                    limits: Some(halftime_proto::limits_to_pb(l)),
                })
                .await?;
        }
    }

    // Appliances behind gateway links.
    let log = Arc::new(SimLog::default());
    let (override_tx, mut override_rx) = tokio::sync::mpsc::channel(65_536);
    let n_gateways = (scenario.run.gateways as usize).min(population.appliances.len().max(1));
    let mut gateway_of: HashMap<ApplianceId, usize> = HashMap::new();
    let override_of: HashMap<u64, f64> =
        population.households.iter().map(|h| (h.id.0, h.override_propensity)).collect();
    let mut behind: Vec<Vec<&halftime_core::Appliance>> = vec![Vec::new(); n_gateways];
    for (i, a) in population.appliances.iter().enumerate() {
        gateway_of.insert(a.id, i % n_gateways);
        behind[i % n_gateways].push(a);
    }
    let builders = behind.into_iter().enumerate().map(|(g, list)| {
        let config = LinkConfig {
            endpoint: url.to_string(),
            name: format!("gateway-{g}"),
            trusted: trusted.clone(),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            clock: Arc::clone(clock),
            seed: scenario.seed ^ g as u64,
        };
        list.into_iter().fold(LinkBuilder::new(config), |b, a| {
            let sim = SimAppliance::new(
                a,
                override_of[&a.household.0],
                scenario.seed,
                Arc::clone(clock),
                Arc::clone(&log),
                override_tx.clone(),
            );
            // The maker's own caps: its longest safe deferral, and no daily cap tighter than the engine's.
            let policy =
                DevicePolicy { deferral_s_max: u32::from(a.deferral_min_max) * 60, deferred_s_per_day_max: 24 * 3600 };
            b.device(a.id, policy, 0, Arc::new(sim))
        })
    });
    let mut links: Vec<LinkHandle> = builders.map(LinkBuilder::spawn).collect();
    for l in &mut links {
        tokio::time::timeout(Duration::from_secs(30), l.wait_connected()).await.context("gateway did not connect")?;
    }
    let links = Arc::new(links);
    ready();

    // Households overriding at the moment they chose.
    let overrides_sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let override_task = {
        let (links, clock, sent) = (Arc::clone(&links), Arc::clone(clock), Arc::clone(&overrides_sent));
        tokio::spawn(async move {
            while let Some((device, at)) = override_rx.recv().await {
                let Some(&g) = gateway_of.get(&device) else {
                    continue;
                };
                let (links, clock, sent) = (Arc::clone(&links), Arc::clone(&clock), Arc::clone(&sent));
                tokio::spawn(async move {
                    tokio::time::sleep(real_duration(&*clock, at - clock.now_unix_ms())).await;
                    if links[g].override_now(device).await {
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        })
    };

    // The operator: submit each event a minute before it starts, and watch it.
    let progress: Arc<Mutex<HashMap<u64, pb::EventProgress>>> = Arc::default();
    let mut operator = GridOperatorClient::connect(url.to_string()).await?;
    let mut report = RunReport {
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        n_households: population.households.len(),
        n_appliances: population.appliances.len(),
        ..RunReport::default()
    };
    let first = events.first().map(|e| e.start_unix_ms).unwrap_or(0);
    let last_end =
        events.iter().map(|e| e.start_unix_ms + e.target_mw.len() as i64 * MS_PER_MIN).max().unwrap_or(first);
    let end = last_end + i64::from(scenario.run.tail_min) * MS_PER_MIN;
    let mut pending: Vec<(usize, &PlannedEvent)> = events.iter().enumerate().collect();
    pending.reverse();
    let mut plans: Vec<(i64, Vec<f64>, Vec<f64>)> = Vec::new();
    writeln!(
        out,
        "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10}",
        "minute (UTC)", "target MW", "expected", "delivered", "applied", "households", "overrides", "violations"
    )?;
    let mut minute = first;
    while minute < end {
        // Submit what is due within the next minute.
        while let Some((i, e)) = pending.last().copied() {
            if e.start_unix_ms - MS_PER_MIN > clock.now_unix_ms() && e.start_unix_ms > minute {
                break;
            }
            pending.pop();
            let t0 = std::time::Instant::now();
            let r = operator
                .submit_stress_event(pb::SubmitStressEventRequest {
                    regions: e.regions.clone(),
                    start_unix_ms: e.start_unix_ms.max(clock.now_unix_ms()),
                    target_mw: e.target_mw.clone(),
                    target_kw: Vec::new(),
                    deferral_min_max: e.deferral_min_max,
                    priority: pb::Priority::High as i32,
                    idempotency_key: format!("scenario-{}-{}-{i}", scenario.name, scenario.seed),
                })
                .await?
                .into_inner();
            report.submit_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            let plan = r.plan.unwrap_or_default();
            writeln!(
                out,
                "event {} submitted: {} slots, peak target {:.3} MW, {} appliances in {} households, {} cohorts, LP {:.1} ms, shortfall {:.3} MWh",
                r.event_id,
                plan.target_kw.len(),
                plan.target_kw.iter().copied().fold(0.0, f64::max) / 1e3,
                plan.n_appliances,
                plan.n_households,
                plan.n_cohorts,
                plan.lp_solve_us as f64 / 1e3,
                plan.shortfall_kw.iter().sum::<f64>() / 1e3 / 60.0,
            )?;
            plans.push((plan.start_unix_ms, plan.target_kw.clone(), plan.expected_kw.clone()));
            report.events.push((r.event_id, plan));
            let mut stream = operator.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await?.into_inner();
            let progress = Arc::clone(&progress);
            tokio::spawn(async move {
                while let Ok(Some(p)) = stream.message().await {
                    progress.lock().unwrap_or_else(|e| e.into_inner()).insert(p.event_id, p);
                }
            });
        }
        // Wait for the minute to pass, then account for it.
        let next = minute + MS_PER_MIN;
        tokio::time::sleep(real_duration(&**clock, next - clock.now_unix_ms())).await;
        let row = account(
            minute,
            &plans,
            &progress,
            &log,
            &limits_of,
            overrides_sent.load(std::sync::atomic::Ordering::Relaxed),
        );
        writeln!(
            out,
            "{:<20} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10} {:>9} {:>10}",
            format_utc(row.t_unix_ms),
            row.target_mw,
            row.expected_mw,
            row.delivered_mw,
            row.applied_mw,
            row.households_deferred,
            row.overrides,
            row.violations
        )?;
        report.minutes.push(row);
        minute = next;
    }
    report.overrides = overrides_sent.load(std::sync::atomic::Ordering::Relaxed);
    report.violations = violations(&log, &limits_of);
    let applied_mwh: f64 = report.minutes.iter().map(|m| m.applied_mw).sum::<f64>() / 60.0;
    let target_mwh: f64 = report.minutes.iter().map(|m| m.target_mw).sum::<f64>() / 60.0;
    writeln!(
        out,
        "summary: target {target_mwh:.3} MWh, applied {applied_mwh:.3} MWh, {} overrides, {} limit violations",
        report.overrides, report.violations
    )?;
    override_task.abort();
    let _ = override_task.await;
    if let Ok(links) = Arc::try_unwrap(links) {
        for l in links {
            l.shutdown().await;
        }
    }
    Ok(report)
}

fn account(
    minute: i64,
    plans: &[(i64, Vec<f64>, Vec<f64>)],
    progress: &Mutex<HashMap<u64, pb::EventProgress>>,
    log: &SimLog,
    limits_of: &HashMap<u64, Limits>,
    overrides: u64,
) -> MinuteRow {
    let slot = |start: i64, v: &[f64]| -> f64 {
        let s = (minute - start).div_euclid(MS_PER_MIN);
        if s < 0 { 0.0 } else { v.get(s as usize).copied().unwrap_or(0.0) }
    };
    let target_kw: f64 = plans.iter().map(|(s, t, _)| slot(*s, t)).sum();
    let expected_kw: f64 = plans.iter().map(|(s, _, e)| slot(*s, e)).sum();
    let delivered_kw: f64 = progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|p| slot(p.start_unix_ms, &p.delivered_kw))
        .sum();
    let applied = log.applied();
    let mut slots = [0.0];
    let mut households = HashSet::new();
    for a in &applied {
        halftime_engine::add_interval(&mut slots, minute, a.start_unix_ms, a.end_unix_ms, f64::from(a.reduction_w));
        if a.start_unix_ms < minute + MS_PER_MIN && a.end_unix_ms > minute {
            households.insert(a.household);
        }
    }
    MinuteRow {
        t_unix_ms: minute,
        target_mw: target_kw / 1e3,
        expected_mw: expected_kw / 1e3,
        delivered_mw: delivered_kw.max(0.0) / 1e3,
        applied_mw: slots[0] / 1e6,
        households_deferred: households.len(),
        overrides,
        violations: violations(log, limits_of),
    }
}

/// Limit violations in what the appliances applied, audited against each household's effective limits.
pub fn violations(log: &SimLog, limits_of: &HashMap<u64, Limits>) -> usize {
    let mut by_household: HashMap<u64, Vec<Reservation>> = HashMap::new();
    for a in log.applied() {
        let deferral_s = u32::try_from((a.end_unix_ms - a.start_unix_ms).max(0) / 1000).unwrap_or(u32::MAX);
        if deferral_s == 0 {
            continue;
        }
        by_household.entry(a.household.0).or_default().push(Reservation {
            household: a.household,
            appliance: a.device,
            class: halftime_core::ApplianceClass::Fridge,
            event: a.event,
            not_before_unix_ms: a.start_unix_ms,
            not_after_unix_ms: a.end_unix_ms,
            deferral_s,
            reduction_kw: a.reduction_w as f32 / 1e3,
        });
    }
    by_household
        .iter()
        .map(|(h, set)| {
            let limits =
                limits_of.get(h).cloned().unwrap_or_else(|| Limits { never: true, ..Limits::system_default() });
            audit(&limits, |_| u32::MAX, set).len()
        })
        .sum()
}
