//! `halftime bench`: the end-to-end load generator. For each population size it starts an engine on a loopback
//! port (or targets `--server`), enrols the appliances over the Household API, attaches them through gateway
//! links that speak the real `DeviceLink` protocol, and submits stress events as an operator would. It measures:
//!
//! - `SubmitStressEvent` latency, unloaded (one event at a time) and under a steady rate of small events, with a
//!   plain gRPC health check on the same server as the floor;
//! - submitted → plan ready → every command signed, durable and queued (the engine's own timings from the plan
//!   summary), → 50 % and 99 % of the commands acknowledged by the gateways;
//! - commands per second through the head-end and the gateway links;
//! - resident memory per enrolled appliance, and the peak (for the first size only: run one size per process
//!   for each memory figure).
//!
//! The gateways acknowledge each command as it arrives. By default they do not verify signatures: each real
//! device verifies its own on its own processor, and a million verifications on the engine's two cores would
//! measure the devices, not the engine. `--verify` makes them verify (Ed25519, off the async executor).
//!
//! Repetitions are spaced a day apart in event time, so every one meets households with their daily limits
//! fresh; events may start at most 7 days ahead, so there are at most 6.

use crate::config::Config;
use anyhow::Context;
use halftime_client::clock::SystemClock;
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_core::{Appliance, DeviceStatus};
use halftime_proto::pb;
use halftime_proto::pb::device_link_client::DeviceLinkClient;
use halftime_proto::pb::grid_operator_client::GridOperatorClient;
use halftime_proto::pb::household_client::HouseholdClient;
use halftime_signer::TrustedKeys;
use halftime_sim::{Population, Scenario};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Most repetitions: one a day, within the 7 days ahead an event may be submitted.
pub const REPETITIONS_MAX: usize = 6;
/// Most events in the steady-rate phase.
const LOADED_EVENTS_MAX: usize = 10_000;
/// Health checks for the gRPC floor.
const FLOOR_CALLS: usize = 2_000;
/// Enrolment batches in flight at once.
const ENROL_IN_FLIGHT: usize = 4;
/// How long to wait for every command of one event to be acknowledged.
const ACK_WAIT: Duration = Duration::from_secs(300);
const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
const DAY_MS: i64 = 24 * 60 * MS_PER_MIN;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Population sizes, in enrolled appliances.
    pub n_appliances: Vec<u64>,
    /// Gateway links, at least (more if a link would carry more than the SDK's per-link maximum).
    pub gateways: usize,
    /// Unloaded events per size, 1..=6.
    pub repetitions: usize,
    /// Share of the population's expected reduction each unloaded event asks for.
    pub target_share: f64,
    /// Small events per second in the steady-rate phase (0 skips it), and how long it lasts.
    pub rate_per_s: f64,
    pub loaded_s: f64,
    /// A scenario file whose population mix (classes, ownership, enrolment, regions) to use.
    pub population: PathBuf,
    /// Gateways verify every signature.
    pub verify: bool,
    /// Target this engine instead of starting one; its public key (hex) with `verify`.
    pub server: Option<String>,
    pub trust_key: Option<String>,
}

/// One measured figure. `reference` names the figure measured in the same run that it is best read against.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    pub name: &'static str,
    pub n_appliances: u64,
    pub unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub n_samples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'static str>,
}

impl Measurement {
    fn percentiles(name: &'static str, n_appliances: u64, unit: &'static str, samples: &[f64]) -> Self {
        Self {
            name,
            n_appliances,
            unit,
            p50: percentile(samples, 0.50),
            p99: percentile(samples, 0.99),
            value: None,
            n_samples: samples.len(),
            reference: None,
        }
    }

    fn value(name: &'static str, n_appliances: u64, unit: &'static str, value: f64) -> Self {
        Self { name, n_appliances, unit, p50: None, p99: None, value: Some(value), n_samples: 1, reference: None }
    }

    fn against(mut self, reference: &'static str) -> Self {
        self.reference = Some(reference);
        self
    }
}

/// Nearest-rank percentile; `None` for no samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    assert!((0.0..=1.0).contains(&q));
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Runs every size in turn; measurements come back in the order they were taken.
pub async fn run(opts: &BenchOptions, mut on_measurement: impl FnMut(&Measurement)) -> anyhow::Result<()> {
    anyhow::ensure!((1..=REPETITIONS_MAX).contains(&opts.repetitions), "--repetitions: must be 1..={REPETITIONS_MAX}");
    anyhow::ensure!(opts.target_share > 0.0 && opts.target_share <= 1.0, "--target-share: must be in (0, 1]");
    anyhow::ensure!(opts.rate_per_s >= 0.0 && opts.loaded_s >= 0.0, "--rate and --loaded-s: must not be negative");
    anyhow::ensure!(
        opts.rate_per_s * opts.loaded_s <= LOADED_EVENTS_MAX as f64,
        "--rate × --loaded-s: at most {LOADED_EVENTS_MAX} events"
    );
    let scenario = Scenario::load(&opts.population)?;
    for (i, &n) in opts.n_appliances.iter().enumerate() {
        anyhow::ensure!(n > 0, "--appliances: sizes must be positive");
        // Memory freed by an earlier size is reused without growing the resident set, so only the first size
        // in a process measures memory truthfully.
        let measure_memory = i == 0;
        for m in one_size(opts, &scenario, n, measure_memory).await.with_context(|| format!("{n} appliances"))? {
            on_measurement(&m);
        }
    }
    Ok(())
}

/// The scenario's population mix, grown to at least `n` appliances and cut to exactly `n`.
fn population(scenario: &Scenario, regions: &halftime_core::RegionSet, n: u64) -> anyhow::Result<Vec<Appliance>> {
    let mut spec = scenario.population.clone();
    spec.n_households = 10_000;
    let pilot = Population::generate(&spec, regions, scenario.seed).map_err(anyhow::Error::msg)?;
    let per_household = pilot.appliances.len().max(1) as f64 / 10_000.0;
    let households = (n as f64 / per_household * 1.02).ceil() + 100.0;
    anyhow::ensure!(households <= f64::from(u32::MAX), "too many appliances for this population mix");
    spec.n_households = households as u32;
    let mut appliances = Population::generate(&spec, regions, scenario.seed).map_err(anyhow::Error::msg)?.appliances;
    anyhow::ensure!(appliances.len() as u64 >= n, "the population mix gave too few appliances");
    appliances.truncate(n as usize);
    appliances.shrink_to_fit();
    Ok(appliances)
}

async fn one_size(
    opts: &BenchOptions,
    scenario: &Scenario,
    n: u64,
    measure_memory: bool,
) -> anyhow::Result<Vec<Measurement>> {
    let mut config = Config::default();
    // The load generator measures the dispatch path. Its flat 10-minute targets on a few thousand appliances
    // could not hold their rebound to a share of what they deliver and would plan nothing; against the target
    // they plan as a large fleet does.
    config.engine.rebound_reference = halftime_engine::ReboundReference::PeakTarget;
    let regions = config.region_set()?;
    let appliances = population(scenario, &regions, n)?;
    let mut region_codes: Vec<String> = appliances.iter().map(|a| regions.code(a.region).to_string()).collect();
    region_codes.sort();
    region_codes.dedup();
    let expected_w: f64 = appliances.iter().map(Appliance::expected_reduction_w).sum();

    let tmp = tempfile::tempdir()?;
    let (running, url, trusted) = match &opts.server {
        None => {
            let r = crate::start(&config, tmp.path(), "127.0.0.1:0".parse()?, Arc::new(SystemClock)).await?;
            let mut trusted = TrustedKeys::new();
            trusted.add(r.engine.public_key())?;
            let url = r.url();
            (Some(r), url, trusted)
        }
        Some(url) => {
            let mut trusted = TrustedKeys::new();
            if let Some(key) = &opts.trust_key {
                trusted.add_hex(key)?;
            }
            anyhow::ensure!(!opts.verify || opts.trust_key.is_some(), "--verify with --server needs --trust-key");
            (None, url.clone(), trusted)
        }
    };
    let in_process = running.is_some() && measure_memory;
    let result = measure(opts, n, &appliances, &region_codes, expected_w, &url, &trusted, in_process).await;
    if let Some(r) = running {
        r.stop().await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    opts: &BenchOptions,
    n: u64,
    appliances: &[Appliance],
    region_codes: &[String],
    expected_w: f64,
    url: &str,
    trusted: &TrustedKeys,
    measure_memory: bool,
) -> anyhow::Result<Vec<Measurement>> {
    let mut out = Vec::new();
    let regions = Config::default().region_set()?;

    // Enrolment, and what it costs in resident memory.
    let rss_before = rss_bytes("VmRSS:");
    let t = Instant::now();
    enrol(url, appliances, &regions).await?;
    let enrol_s = t.elapsed().as_secs_f64();
    out.push(Measurement::value("enrol_throughput", n, "appliances/s", n as f64 / enrol_s));
    if measure_memory {
        let grown = rss_bytes("VmRSS:").saturating_sub(rss_before);
        out.push(Measurement::value("memory_per_appliance", n, "bytes", grown as f64 / n as f64));
    }

    let tally = Arc::new(Tally::default());
    let n_links = opts.gateways.max(appliances.len().div_ceil(halftime_client::DEVICES_PER_LINK_MAX)).max(1);
    let mut behind: Vec<Vec<u64>> = vec![Vec::new(); n_links];
    for (i, a) in appliances.iter().enumerate() {
        behind[i % n_links].push(a.id.0);
    }
    let verify = opts.verify.then(|| trusted.clone());
    let mut gateways = Vec::with_capacity(n_links);
    for (g, devices) in behind.into_iter().enumerate() {
        gateways.push(gateway(url, format!("bench-gateway-{g}"), devices, verify.clone(), Arc::clone(&tally)).await?);
    }
    out.push(Measurement::value("gateway_links", n, "links", n_links as f64));

    out.push(Measurement::percentiles("grpc_floor", n, "ms", &grpc_floor(url).await?));

    let mut operator = GridOperatorClient::connect(url.to_string()).await?;
    let clock = SystemClock;
    let (mut submit_ms, mut plan_ms, mut queued_ms, mut lp_ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ack50_ms, mut ack99_ms, mut throughput, mut commands) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let run_id = clock.now_unix_ms();
    for r in 0..opts.repetitions {
        tally.reset();
        let request = pb::SubmitStressEventRequest {
            regions: region_codes.to_vec(),
            start_unix_ms: clock.now_unix_ms() + 5 * MS_PER_MIN + r as i64 * DAY_MS,
            target_mw: Vec::new(),
            target_kw: vec![expected_w * opts.target_share / 1e3; 10],
            deferral_min_max: 20,
            priority: pb::Priority::High as i32,
            idempotency_key: format!("bench-{run_id}-{n}-{r}"),
        };
        let t0 = Instant::now();
        let response = operator.submit_stress_event(request).await.context("submitting")?.into_inner();
        submit_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let plan = response.plan.unwrap_or_default();
        plan_ms.push(plan.plan_ready_us as f64 / 1e3);
        queued_ms.push(plan.queued_us as f64 / 1e3);
        lp_ms.push(plan.lp_solve_us as f64 / 1e3);
        commands.push(plan.n_appliances as f64);
        let acks = tally.wait_for(plan.n_appliances, ACK_WAIT).await;
        anyhow::ensure!(
            acks.acknowledged >= plan.n_appliances,
            "event {}: {} of {} commands acknowledged within {ACK_WAIT:?}",
            response.event_id,
            acks.acknowledged,
            plan.n_appliances
        );
        if let (Some(a50), Some(a99)) = (acks.at_share(0.5, t0), acks.at_share(0.99, t0)) {
            ack50_ms.push(a50);
            ack99_ms.push(a99);
        }
        if let Some(rate) = acks.throughput() {
            throughput.push(rate);
        }
    }
    out.push(Measurement::percentiles("submit_rpc", n, "ms", &submit_ms).against("grpc_floor"));
    out.push(Measurement::percentiles("lp_solve", n, "ms", &lp_ms));
    out.push(Measurement::percentiles("plan_ready", n, "ms", &plan_ms));
    out.push(Measurement::percentiles("submit_to_all_queued", n, "ms", &queued_ms));
    out.push(Measurement::percentiles("ack_50pct", n, "ms", &ack50_ms));
    out.push(Measurement::percentiles("ack_99pct", n, "ms", &ack99_ms));
    let mut m = Measurement::percentiles("commands_per_event", n, "commands", &commands);
    m.value = Some(commands.iter().sum::<f64>() / commands.len().max(1) as f64);
    out.push(m);
    let mut m = Measurement::percentiles("headend_throughput", n, "commands/s", &throughput);
    m.value = percentile(&throughput, 0.5);
    out.push(m);

    if opts.rate_per_s > 0.0 && opts.loaded_s > 0.0 {
        let loaded = steady_rate(opts, &operator, region_codes, expected_w, run_id, n).await?;
        out.push(Measurement::percentiles("submit_rpc_loaded", n, "ms", &loaded).against("submit_rpc"));
    }
    if measure_memory {
        out.push(Measurement::value("peak_rss", n, "MB", crate::scenario::peak_rss_mb()));
    }
    for g in gateways {
        g.abort();
    }
    // Let the engine take in the reports already on their way before it stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(out)
}

async fn enrol(url: &str, appliances: &[Appliance], regions: &halftime_core::RegionSet) -> anyhow::Result<()> {
    let client = HouseholdClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let mut in_flight = tokio::task::JoinSet::new();
    for chunk in appliances.chunks(halftime_server::ENROL_BATCH_MAX) {
        if in_flight.len() >= ENROL_IN_FLIGHT
            && let Some(done) = in_flight.join_next().await
        {
            done.context("enrol task")??;
        }
        let request = pb::EnrolAppliancesRequest {
            appliances: chunk.iter().map(|a| halftime_proto::appliance_to_pb(a, regions.code(a.region))).collect(),
        };
        let mut client = client.clone();
        in_flight.spawn(async move { client.enrol_appliances(request).await.map(drop).context("enrolling") });
    }
    while let Some(done) = in_flight.join_next().await {
        done.context("enrol task")??;
    }
    Ok(())
}

/// Sequential health checks on the same server: the least a unary call costs here.
async fn grpc_floor(url: &str) -> anyhow::Result<Vec<f64>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut samples = Vec::with_capacity(FLOOR_CALLS);
    for _ in 0..FLOOR_CALLS {
        let t = Instant::now();
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

/// Small events submitted at a steady rate, open loop (each on its own task, so a slow one does not delay the
/// next), half a day after the first unloaded event. Returns each call's latency.
async fn steady_rate(
    opts: &BenchOptions,
    operator: &GridOperatorClient<tonic::transport::Channel>,
    region_codes: &[String],
    expected_w: f64,
    run_id: i64,
    n: u64,
) -> anyhow::Result<Vec<f64>> {
    let n_events = (opts.rate_per_s * opts.loaded_s).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / opts.rate_per_s);
    let start_unix_ms = SystemClock.now_unix_ms() + DAY_MS / 2;
    let mut tasks = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for k in 0..n_events {
        ticker.tick().await;
        let mut operator = operator.clone();
        let request = pb::SubmitStressEventRequest {
            regions: region_codes.to_vec(),
            start_unix_ms,
            target_mw: Vec::new(),
            // A few households' worth each: the load is the event rate, not the size.
            target_kw: vec![(expected_w * 0.001 / 1e3).max(0.1); 10],
            deferral_min_max: 10,
            priority: pb::Priority::Normal as i32,
            idempotency_key: format!("bench-{run_id}-{n}-loaded-{k}"),
        };
        tasks.spawn(async move {
            let t = Instant::now();
            operator.submit_stress_event(request).await.context("submitting under load")?;
            anyhow::Ok(t.elapsed().as_secs_f64() * 1e3)
        });
    }
    let mut samples = Vec::with_capacity(n_events);
    while let Some(done) = tasks.join_next().await {
        samples.push(done.context("loaded submit task")??);
    }
    Ok(samples)
}

/// Acknowledgements as the gateways sent them, per delivered batch.
#[derive(Default)]
struct Tally {
    deliveries: Mutex<Vec<Delivery>>,
    changed: tokio::sync::Notify,
}

#[derive(Clone, Copy)]
struct Delivery {
    received: Instant,
    acknowledged: Instant,
    n_commands: u64,
}

struct Acks {
    deliveries: Vec<Delivery>,
    acknowledged: u64,
    expected: u64,
}

impl Tally {
    fn reset(&self) {
        self.deliveries.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn push(&self, d: Delivery) {
        self.deliveries.lock().unwrap_or_else(|e| e.into_inner()).push(d);
        self.changed.notify_one();
    }

    /// Waits until `expected` commands are acknowledged, or `timeout`.
    async fn wait_for(&self, expected: u64, timeout: Duration) -> Acks {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let deliveries = self.deliveries.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let acknowledged = deliveries.iter().map(|d| d.n_commands).sum();
            if acknowledged >= expected || tokio::time::Instant::now() >= deadline {
                return Acks { deliveries, acknowledged, expected };
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

impl Acks {
    /// Milliseconds from `t0` until `share` of the expected commands were acknowledged.
    fn at_share(&self, share: f64, t0: Instant) -> Option<f64> {
        let want = (share * self.expected as f64).ceil() as u64;
        let mut sorted = self.deliveries.clone();
        sorted.sort_by_key(|d| d.acknowledged);
        let mut sum = 0;
        for d in &sorted {
            sum += d.n_commands;
            if sum >= want {
                return Some(d.acknowledged.saturating_duration_since(t0).as_secs_f64() * 1e3);
            }
        }
        None
    }

    /// Commands per second from the first command's arrival at a gateway to the last one's.
    fn throughput(&self) -> Option<f64> {
        let first = self.deliveries.iter().map(|d| d.received).min()?;
        let last = self.deliveries.iter().map(|d| d.received).max()?;
        let span = last.saturating_duration_since(first).as_secs_f64();
        (span > 0.0).then(|| self.acknowledged as f64 / span)
    }
}

/// A gateway link: attaches `devices` and acknowledges every command once (re-sends are acknowledged again but
/// counted once), verifying it first with `verify`.
async fn gateway(
    url: &str,
    name: String,
    devices: Vec<u64>,
    verify: Option<TrustedKeys>,
    tally: Arc<Tally>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut client = DeviceLinkClient::connect(url.to_string())
        .await?
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let (tx, rx) = mpsc::channel::<pb::Uplink>(64);
    let hello = pb::Hello { link_name: name.clone(), device_ids: devices };
    tx.send(pb::Uplink { msg: Some(pb::uplink::Msg::Hello(hello)) }).await?;
    let mut downlink = client.attach(ReceiverStream::new(rx)).await.context("attaching")?.into_inner();
    match downlink.message().await?.and_then(|m| m.msg) {
        Some(pb::downlink::Msg::HelloAck(_)) => {}
        _ => anyhow::bail!("{name}: the engine did not acknowledge the hello"),
    }
    let verify = verify.map(Arc::new);
    Ok(tokio::spawn(async move {
        let mut seen: HashSet<u64> = HashSet::new();
        while let Ok(Some(message)) = downlink.message().await {
            let Some(pb::downlink::Msg::Commands(batch)) = message.msg else {
                continue;
            };
            let received = Instant::now();
            let fresh: Vec<pb::SignedCommand> = batch.commands.into_iter().filter(|c| seen.insert(c.counter)).collect();
            let n_commands = fresh.len() as u64;
            let reports = match &verify {
                None => acknowledge(&fresh, None),
                Some(keys) => {
                    let keys = Arc::clone(keys);
                    match tokio::task::spawn_blocking(move || acknowledge(&fresh, Some(&keys))).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            for chunk in reports.chunks(halftime_server::REPORT_BATCH_MAX) {
                let batch = pb::ReportBatch { reports: chunk.to_vec() };
                if tx.send(pb::Uplink { msg: Some(pb::uplink::Msg::Reports(batch)) }).await.is_err() {
                    return;
                }
            }
            tally.push(Delivery { received, acknowledged: Instant::now(), n_commands });
        }
    }))
}

/// A receipt for each command; with `keys`, a rejection for one whose signature does not verify.
fn acknowledge(commands: &[pb::SignedCommand], keys: Option<&TrustedKeys>) -> Vec<pb::StatusReport> {
    let now = SystemClock.now_unix_ms();
    commands
        .iter()
        .map(|c| {
            let ok =
                keys.is_none_or(|k| halftime_proto::command_from_pb(c).is_ok_and(|signed| k.verify(&signed).is_ok()));
            let status = if ok { DeviceStatus::Received } else { DeviceStatus::Rejected };
            pb::StatusReport {
                device_id: c.device_id,
                event_id: c.event_id,
                counter: c.counter,
                status: halftime_proto::status_to_pb(status) as i32,
                reject_reason: if ok { 0 } else { pb::RejectReason::BadSignature as i32 },
                at_unix_ms: now,
                reduction_w: 0,
                ..Default::default()
            }
        })
        .collect()
}

/// A line of `/proc/self/status` (`VmRSS:`, `VmHWM:`) in bytes (Linux; 0 elsewhere).
pub fn rss_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// The human table.
pub fn table(measurements: &[Measurement]) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let mut s = format!(
        "{:<22} {:>12} {:>12} {:>12} {:>14} {:<12} {:>7} {}\n",
        "measurement", "appliances", "p50", "p99", "value", "unit", "samples", "reference"
    );
    for m in measurements {
        s.push_str(&format!(
            "{:<22} {:>12} {:>12} {:>12} {:>14} {:<12} {:>7} {}\n",
            m.name,
            m.n_appliances,
            fmt(m.p50),
            fmt(m.p99),
            fmt(m.value),
            m.unit,
            m.n_samples,
            m.reference.unwrap_or("")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.5), Some(50.0));
        assert_eq!(percentile(&samples, 0.99), Some(99.0));
        assert_eq!(percentile(&samples, 1.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn acknowledgement_shares_and_throughput_come_from_the_deliveries() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let d = |recv: u64, ack: u64, n: u64| Delivery { received: at(recv), acknowledged: at(ack), n_commands: n };
        let acks =
            Acks { deliveries: vec![d(20, 30, 50), d(10, 12, 40), d(110, 120, 10)], acknowledged: 100, expected: 100 };
        // 40 by 12 ms, 90 by 30 ms, 100 by 120 ms.
        assert_eq!(acks.at_share(0.4, t0), Some(12.0));
        assert_eq!(acks.at_share(0.5, t0), Some(30.0));
        assert_eq!(acks.at_share(0.99, t0), Some(120.0));
        // 100 commands arrived between 10 ms and 110 ms.
        let rate = acks.throughput().unwrap();
        assert!((rate - 1_000.0).abs() < 1e-6, "{rate}");
        let short = Acks { deliveries: vec![d(10, 12, 40)], acknowledged: 40, expected: 100 };
        assert_eq!(short.at_share(0.5, t0), None);
    }
}
