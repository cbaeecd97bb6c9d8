use halftime::config::Config;
use halftime_client::clock::ScaledClock;
use halftime_client::{Appliance, Deferral, DevicePolicy, LinkBuilder, LinkConfig, LinkHandle, ResumeReason};
use halftime_core::ApplianceId;
use halftime_core::time::Clock;
use halftime_proto::pb;
use halftime_proto::pb::grid_operator_client::GridOperatorClient;
use halftime_proto::pb::household_client::HouseholdClient;
use halftime_signer::TrustedKeys;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

/// Virtual time runs this much faster than real time in these tests, so minutes pass in seconds.
pub const SPEED: f64 = 60.0;

pub fn config() -> Config {
    let mut c = Config::default();
    c.engine.randomize_start_s = 0;
    c.engine.tick_interval_ms = 20;
    // Worlds of a few dozen heaters and fridges: under the 10 % rebound rule one 3 kW heater's payback outweighs a
    // few kW of target, and the plan would rightly dispatch (almost) nothing. These tests exercise the dispatch
    // path; the planner's and the simulator's tests hold the rule.
    c.engine.rebound_fraction_max = 1.0;
    c
}

pub fn clock() -> Arc<dyn Clock> {
    Arc::new(ScaledClock::new(halftime_client::clock::SystemClock.now_unix_ms(), SPEED))
}

pub async fn start(dir: &Path, clock: Arc<dyn Clock>) -> halftime::Running {
    halftime::start(&config(), dir, "127.0.0.1:0".parse().unwrap(), clock).await.expect("engine starts")
}

pub async fn operator(url: &str) -> GridOperatorClient<Channel> {
    GridOperatorClient::connect(url.to_string()).await.expect("connect")
}

pub async fn household(url: &str) -> HouseholdClient<Channel> {
    HouseholdClient::connect(url.to_string()).await.expect("connect")
}

/// Enrols `n` households in London, each with a water heater (3 kW, 12 % duty) and a fridge.
pub async fn enrol(url: &str, n: u64) -> Vec<pb::Appliance> {
    let mut appliances = Vec::new();
    for h in 1..=n {
        for (k, class, power) in [(1, pb::ApplianceClass::WaterHeater, 3000), (2, pb::ApplianceClass::Fridge, 140)] {
            appliances.push(pb::Appliance {
                appliance_id: h * 10 + k,
                household_id: h,
                region: "_C".into(),
                class: class as i32,
                rated_power_w: power,
                ..Default::default()
            });
        }
    }
    let r = household(url)
        .await
        .enrol_appliances(pb::EnrolAppliancesRequest { appliances: appliances.clone() })
        .await
        .unwrap();
    assert_eq!(r.into_inner().n_enrolled, appliances.len() as u64);
    appliances
}

/// What a test appliance did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Done {
    pub device: ApplianceId,
    pub counter: u64,
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
    pub reduction_w: u32,
    pub resumed: Option<ResumeReason>,
}

/// An appliance that sheds a fixed load and records everything.
pub struct TestAppliance {
    pub device: ApplianceId,
    pub reduction_w: u32,
    pub clock: Arc<dyn Clock>,
    pub log: Arc<Mutex<Vec<Done>>>,
}

impl Appliance for TestAppliance {
    fn defer(&self, d: &Deferral) -> Result<u32, String> {
        self.log.lock().unwrap().push(Done {
            device: self.device,
            counter: d.counter,
            start_unix_ms: self.clock.now_unix_ms().max(d.start_unix_ms),
            end_unix_ms: d.end_unix_ms,
            reduction_w: self.reduction_w,
            resumed: None,
        });
        Ok(self.reduction_w)
    }

    fn resume(&self, d: &Deferral, why: ResumeReason) {
        let now = self.clock.now_unix_ms();
        let mut log = self.log.lock().unwrap();
        if let Some(x) = log.iter_mut().rev().find(|x| x.device == self.device && x.counter == d.counter) {
            x.end_unix_ms = now.min(x.end_unix_ms);
            x.resumed = Some(why);
        }
    }
}

pub fn trusted(key: [u8; 32]) -> TrustedKeys {
    let mut t = TrustedKeys::new();
    t.add(key).unwrap();
    t
}

/// A gateway link for `devices`, each shedding its rated power.
pub fn gateway(
    url: &str,
    trusted: TrustedKeys,
    clock: &Arc<dyn Clock>,
    devices: &[(u64, u32)],
    policy: DevicePolicy,
    last_counter: u64,
    log: &Arc<Mutex<Vec<Done>>>,
) -> LinkHandle {
    let config = LinkConfig {
        endpoint: url.to_string(),
        name: "test-gateway".into(),
        trusted,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        clock: Arc::clone(clock),
        seed: 1,
    };
    devices
        .iter()
        .fold(LinkBuilder::new(config), |b, &(id, reduction_w)| {
            let a =
                TestAppliance { device: ApplianceId(id), reduction_w, clock: Arc::clone(clock), log: Arc::clone(log) };
            b.device(ApplianceId(id), policy, last_counter, Arc::new(a))
        })
        .spawn()
}

/// Reads progress until `done` holds (or panics after a while).
pub async fn watch_until(
    stream: &mut tonic::Streaming<pb::EventProgress>,
    what: &str,
    done: impl Fn(&pb::EventProgress) -> bool,
) -> pb::EventProgress {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        match next {
            Ok(Ok(Some(p))) if done(&p) => return p,
            Ok(Ok(Some(_))) => {}
            other => panic!("waiting for {what}: stream gave {other:?}"),
        }
    }
}

pub fn submit(key: &str, target_kw: Vec<f64>, deferral_min_max: u32) -> pb::SubmitStressEventRequest {
    pb::SubmitStressEventRequest {
        regions: vec!["_C".into()],
        start_unix_ms: 0,
        target_mw: vec![],
        target_kw,
        deferral_min_max,
        priority: pb::Priority::High as i32,
        idempotency_key: key.into(),
    }
}

/// An engine on a loopback port, in virtual time, with `n_households` enrolled (a water heater and a fridge
/// each), and a log of what test appliances did.
pub struct World {
    /// Holds the engine's data directory for the life of the test.
    _dir: tempfile::TempDir,
    pub clock: Arc<dyn Clock>,
    pub running: halftime::Running,
    pub url: String,
    /// (device id, load it sheds in W) for every enrolled appliance.
    pub devices: Vec<(u64, u32)>,
    pub log: Arc<Mutex<Vec<Done>>>,
}

impl World {
    pub async fn new(n_households: u64) -> Self {
        Self::on_clock(n_households, clock()).await
    }

    /// The same on a clock the test controls.
    pub async fn on_clock(n_households: u64, clock: Arc<dyn Clock>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let running = start(dir.path(), clock.clone()).await;
        let url = running.url();
        let devices = enrol(&url, n_households).await.iter().map(|a| (a.appliance_id, a.rated_power_w)).collect();
        Self { _dir: dir, clock, running, url, devices, log: Arc::new(Mutex::new(Vec::new())) }
    }

    /// A connected gateway for `devices` that trusts `key` (the engine's when `None`).
    pub async fn gateway(&self, devices: &[(u64, u32)], policy: DevicePolicy, key: Option<[u8; 32]>) -> LinkHandle {
        let key = key.unwrap_or_else(|| self.running.engine.public_key());
        let mut link = gateway(&self.url, trusted(key), &self.clock, devices, policy, 0, &self.log);
        link.wait_connected().await;
        link
    }

    pub fn done(&self) -> Vec<Done> {
        self.log.lock().unwrap().clone()
    }
}
