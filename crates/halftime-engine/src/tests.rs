use super::*;
use halftime_core::limits::audit;
use halftime_core::time::MS_PER_DAY;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicI64;

/// A clock tests move by hand.
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_unix_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

const T0: i64 = 20_000 * MS_PER_DAY + 17 * 3_600_000;

fn limits_strategy() -> impl Strategy<Value = Limits> {
    (
        0u32..4,
        0u32..120,
        0u32..60,
        0u32..120,
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(events, minutes, longest, rest, never, paused, quiet)| Limits {
            events_per_day_max: events,
            deferred_min_per_day_max: minutes,
            deferral_min_max: longest,
            rest_min_min: rest,
            quiet_windows: if quiet {
                vec![halftime_core::QuietWindow { start_min: 17 * 60 + 10, end_min: 17 * 60 + 40 }]
            } else {
                vec![]
            },
            never,
            paused,
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn submit_request(
    key: &str,
    regions: &[&str],
    start_unix_ms: i64,
    target_kw: Vec<f64>,
    deferral_min_max: u32,
) -> SubmitRequest {
    SubmitRequest {
        regions: regions.iter().map(|r| r.to_string()).collect(),
        start_unix_ms,
        target_mw: vec![],
        target_kw,
        deferral_min_max,
        priority: Priority::High,
        idempotency_key: key.to_string(),
    }
}

/// The worlds here are a few thousand fridges, or fewer: they cannot hold a plateau's rebound to a tenth of what
/// they deliver, so under the default rule they get no plan at all
/// (`a_fleet_that_cannot_stagger_its_payback_gets_no_plan_under_the_delivered_peak_rule`). They plan against
/// the peak target instead, which keeps the cap binding where the tests need it to.
fn test_config() -> EngineConfig {
    EngineConfig { tick_interval_ms: 10, rebound_reference: ReboundReference::PeakTarget, ..EngineConfig::default() }
}

/// The ledger's record of the appliance's deferral in the event, if any.
fn entry_of(engine: &Engine, event: EventId, appliance: ApplianceId) -> Option<halftime_ledger::Entry> {
    engine
        .ledger()
        .all_entries()
        .into_iter()
        .find(|e| e.reservation.event == event && e.reservation.appliance == appliance)
}

async fn open(dir: &Path, clock: Arc<TestClock>) -> Engine {
    Engine::open(test_config(), dir, clock).await.expect("engine opens")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random populations, random household limits, two overlapping events in the same region submitted at the
    /// same time: no household ends up past any of its limits.
    #[test]
    fn overlapping_events_never_break_a_household_limit(
        households in proptest::collection::vec((limits_strategy(), proptest::collection::vec(0usize..8, 1..4), proptest::bool::ANY), 1..40),
        target_a in proptest::collection::vec(0.1f64..20.0, 1..15),
        target_b in proptest::collection::vec(0.1f64..20.0, 1..15),
        offset_min in 0i64..20,
        deferral_a in 5u32..60,
        deferral_b in 5u32..60,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        let rt = runtime();
        let result: Result<(), TestCaseError> = rt.block_on(async {
            let engine = open(dir.path(), Arc::clone(&clock)).await;
            let regions = engine.regions().clone();
            let mut appliances = Vec::new();
            let mut own: HashMap<HouseholdId, Limits> = HashMap::new();
            for (h, (limits, classes, in_b)) in households.iter().enumerate() {
                let household = HouseholdId(h as u64 + 1);
                for (k, c) in classes.iter().enumerate() {
                    let class = ApplianceClass::ALL[*c];
                    let p = class.profile();
                    appliances.push(Appliance {
                        id: ApplianceId(household.0 * 10 + k as u64),
                        household,
                        region: regions.lookup(if *in_b { "_B" } else { "_A" }).unwrap(),
                        class,
                        rated_power_w: p.power_w_typical,
                        duty_cycle_permille: p.duty_cycle_permille as u16,
                        deferral_min_max: p.deferral_min_max_safe as u16,
                        override_rate_permille: p.override_rate_permille as u16,
                    });
                }
                own.insert(household, limits.clone());
            }
            engine.enrol(appliances.clone()).await.unwrap();
            for (h, l) in &own {
                engine.set_limits(*h, l.clone()).await.unwrap();
            }
            let a = submit_request("a", &["_A", "_B"], T0 + 60_000, target_a.clone(), deferral_a);
            let b = submit_request("b", &["_A"], T0 + 60_000 + offset_min * 60_000, target_b.clone(), deferral_b);
            let grant = Grant::unrestricted();
            let (ra, rb) = tokio::join!(engine.submit(a, &grant), engine.submit(b, &grant));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            prop_assert_ne!(ra.0, rb.0);
            let max_of: HashMap<ApplianceId, u32> = appliances.iter().map(|a| (a.id, u32::from(a.deferral_min_max))).collect();
            let mut n_reserved = 0;
            for (h, l) in &own {
                let set: Vec<_> = engine.ledger().entries(*h).into_iter().map(|e| e.reservation).collect();
                n_reserved += set.len();
                let effective = l.tighter(&Limits::system_default());
                let v = audit(&effective, |a| max_of[&a], &set);
                prop_assert!(v.is_empty(), "household {h}: {v:?} under {effective:?}: {set:?}");
                for r in &set {
                    prop_assert!(appliances.iter().any(|a| a.id == r.appliance && a.household == *h));
                }
            }
            let reported = ra.1.n_appliances + rb.1.n_appliances;
            prop_assert_eq!(reported as usize, n_reserved, "the plans report exactly what was reserved");
            Ok(())
        });
        result?;
    }
}

#[test]
fn idempotent_submit_and_durable_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    runtime().block_on(async {
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let region = engine.regions().lookup("_C").unwrap();
        let appliances: Vec<Appliance> = (1..=50)
            .map(|i| Appliance {
                id: ApplianceId(1000 + i),
                household: HouseholdId(i),
                region,
                class: ApplianceClass::WaterHeater,
                rated_power_w: 3000,
                duty_cycle_permille: 120,
                deferral_min_max: 60,
                override_rate_permille: 20,
            })
            .collect();
        engine.enrol(appliances).await.unwrap();
        let own = Limits { events_per_day_max: 1, ..Limits::system_default() };
        engine.set_limits(HouseholdId(1), own.clone()).await.unwrap();
        let req = submit_request("evening-1", &["_C"], T0 + 60_000, vec![2.0; 10], 20);
        let (id, plan) = engine.submit(req.clone(), &Grant::unrestricted()).await.unwrap();
        assert!(plan.n_appliances > 0);
        let (id2, plan2) = engine.submit(req.clone(), &Grant::unrestricted()).await.unwrap();
        assert_eq!((id, &plan), (id2, &plan2), "a retry gets the same answer");
        let other = SubmitRequest { deferral_min_max: 25, ..req.clone() };
        assert!(matches!(engine.submit(other, &Grant::unrestricted()).await, Err(EngineError::AlreadyExists(_))));
        let entries_before = engine.ledger().all_entries();
        let counter_before = engine.inner.next_counter.load(Ordering::SeqCst);
        engine.shutdown().await;
        drop(engine);

        let engine = open(dir.path(), Arc::clone(&clock)).await;
        assert_eq!(engine.n_appliances(), 50);
        assert_eq!(engine.get_limits(HouseholdId(1)).unwrap().0, own);
        let (id3, plan3) = engine.submit(req, &Grant::unrestricted()).await.unwrap();
        assert_eq!((id3, plan3), (id, plan), "the idempotency key survives a restart");
        let mut a = entries_before.clone();
        let mut b = engine.ledger().all_entries();
        a.sort_by_key(|e| e.reservation.appliance);
        b.sort_by_key(|e| e.reservation.appliance);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.reservation == y.reservation));
        assert!(engine.inner.next_counter.load(Ordering::SeqCst) >= counter_before, "counters are never reused");
        assert_eq!(engine.list_events(10).len(), 1);
    });
}

#[test]
fn a_store_from_a_larger_region_set_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    runtime().block_on(async {
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let region = engine.regions().lookup("_P").unwrap();
        let a = Appliance {
            id: ApplianceId(1),
            household: HouseholdId(1),
            region,
            class: ApplianceClass::Fridge,
            rated_power_w: 135,
            duty_cycle_permille: 250,
            deferral_min_max: 30,
            override_rate_permille: 20,
        };
        engine.enrol(vec![a]).await.unwrap();
        assert!(engine.close(Duration::from_secs(5)).await);
        let one_region =
            RegionSet::new(vec![halftime_core::region::RegionDef { id: "_A".into(), name: "Eastern".into() }]).unwrap();
        let config = EngineConfig { regions: one_region, ..EngineConfig::default() };
        let err = Engine::open(config, dir.path(), clock).await.unwrap_err();
        assert!(err.to_string().contains("regions may be added"), "{err}");
    });
}

/// Many households setting limits at once share store transactions, yet each call returns only once its
/// limits are durable and in force, and concurrent writes for one household leave the store and the ledger
/// agreeing on the same one.
#[test]
fn concurrent_limit_changes_are_group_committed_durable_and_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let n: u64 = 3_000;
    let own = |h: u64| Limits { deferred_min_per_day_max: 30 + (h % 60) as u32, ..Limits::system_default() };
    runtime().block_on(async {
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let region = engine.regions().lookup("_C").unwrap();
        let appliances: Vec<Appliance> = (1..=n)
            .map(|i| Appliance {
                id: ApplianceId(10_000 + i),
                household: HouseholdId(i),
                region,
                class: ApplianceClass::Fridge,
                rated_power_w: 135,
                duty_cycle_permille: 250,
                deferral_min_max: 30,
                override_rate_permille: 20,
            })
            .collect();
        engine.enrol(appliances).await.unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for h in 1..=n {
            let engine = engine.clone();
            calls.spawn(async move {
                let effective = engine.set_limits(HouseholdId(h), own(h)).await.unwrap();
                // In force the moment the call returns.
                assert_eq!(engine.get_limits(HouseholdId(h)).unwrap().0, own(h));
                effective
            });
        }
        while let Some(done) = calls.join_next().await {
            let effective = done.unwrap();
            assert!(effective.deferred_min_per_day_max >= 30 && effective.deferred_min_per_day_max < 90);
        }
        // One household, many writes in flight together.
        for k in 0..50u32 {
            let engine = engine.clone();
            let l = Limits { rest_min_min: 60 + k, ..Limits::system_default() };
            calls.spawn(async move { engine.set_limits(HouseholdId(1), l).await.unwrap() });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
        let kept = engine.get_limits(HouseholdId(1)).unwrap().0;
        engine.shutdown().await;
        drop(engine);

        let engine = open(dir.path(), Arc::clone(&clock)).await;
        assert_eq!(engine.get_limits(HouseholdId(1)).unwrap().0, kept, "the store kept what the ledger held");
        for h in 2..=n {
            assert_eq!(engine.get_limits(HouseholdId(h)).unwrap().0, own(h), "household {h} after a restart");
        }
    });
}

/// Picking rotates through everyone: once earlier deferrals have left the fairness window, households that were
/// never deferred still go before those deferred before, rather than the same lowest ids every time.
#[test]
fn picking_rotates_through_every_household_across_fairness_windows() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let n_households = 40u64;
    runtime().block_on(async {
        let config = EngineConfig { fairness_window_days: 1, ..test_config() };
        let engine = Engine::open(config, dir.path(), Arc::clone(&clock) as Arc<dyn Clock>).await.unwrap();
        let region = engine.regions().lookup("_C").unwrap();
        let appliances: Vec<Appliance> = (1..=n_households)
            .map(|i| Appliance {
                id: ApplianceId(5_000 + i),
                household: HouseholdId(i),
                region,
                class: ApplianceClass::WaterHeater,
                rated_power_w: 3000,
                duty_cycle_permille: 120,
                deferral_min_max: 60,
                override_rate_permille: 0,
            })
            .collect();
        engine.enrol(appliances).await.unwrap();
        for day in 0..5 {
            let now = T0 + day * MS_PER_DAY;
            clock.0.store(now, Ordering::SeqCst);
            let req = submit_request(&format!("day-{day}"), &["_C"], now + 60_000, vec![1.5; 10], 20);
            let (_, plan) = engine.submit(req, &Grant::unrestricted()).await.unwrap();
            assert!(plan.n_appliances > 0 && plan.n_appliances < n_households / 4, "{plan:?}");
        }
        let mut times: HashMap<u64, u32> = (1..=n_households).map(|h| (h, 0)).collect();
        for e in engine.ledger().all_entries() {
            *times.entry(e.reservation.household.0).or_default() += 1;
        }
        let (least, most) = (times.values().min().copied().unwrap(), times.values().max().copied().unwrap());
        assert!(most - least <= 1, "deferrals per household range from {least} to {most}: {times:?}");
    });
}

/// Over a season of evening events, picking spreads the planned burden (kW·min) evenly over households enrolled
/// alike (Jain ≥ 0.98 among fridge-only households), with chargers, freezers and heaters competing beside them.
#[test]
fn a_season_of_events_spreads_burden_evenly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let n_households = 2_000u64;
    let is_fridge = |h: u64| (9..20).contains(&(h % 20));
    runtime().block_on(async {
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let region = engine.regions().lookup("_C").unwrap();
        let appliances: Vec<Appliance> = (1..=n_households)
            .map(|i| {
                // Fridges differ by up to ±10 % in power, as real ones do: the planner must not read that as a
                // reason to prefer some households over others.
                let (class, rated_power_w) = match i % 20 {
                    0 => (ApplianceClass::EvCharger, 7_400),
                    1..=5 => (ApplianceClass::Freezer, 160),
                    6..=8 => (ApplianceClass::WaterHeater, 3_000),
                    _ => (ApplianceClass::Fridge, 122 + (i * 7_919 % 27) as u32),
                };
                let p = class.profile();
                Appliance {
                    id: ApplianceId(10_000 + i),
                    household: HouseholdId(i),
                    region,
                    class,
                    rated_power_w,
                    duty_cycle_permille: p.duty_cycle_permille as u16,
                    deferral_min_max: p.deferral_min_max_safe as u16,
                    override_rate_permille: 100,
                }
            })
            .collect();
        engine.enrol(appliances).await.unwrap();
        let shape = [0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2];
        let target_kw: Vec<f64> = shape.iter().map(|x| x * 40.0).collect();
        for day in 0..20 {
            let now = T0 + day * MS_PER_DAY;
            clock.0.store(now, Ordering::SeqCst);
            let req = submit_request(&format!("day-{day}"), &["_C"], now + 60_000, target_kw.clone(), 30);
            engine.submit(req, &Grant::unrestricted()).await.unwrap();
        }
        // Burden as the brief defines it: minutes deferred, weighted by kW.
        let mut burden: HashMap<u64, f64> = (1..=n_households).filter(|&h| is_fridge(h)).map(|h| (h, 0.0)).collect();
        for e in engine.ledger().all_entries() {
            if let Some(b) = burden.get_mut(&e.reservation.household.0) {
                *b += e.reservation.burden_kw_min();
            }
        }
        let v: Vec<f64> = burden.values().copied().collect();
        let (sum, sum_sq) = v.iter().fold((0.0, 0.0), |(s, q), x| (s + x, q + x * x));
        let jain = sum * sum / (v.len() as f64 * sum_sq);
        assert!(sum > 0.0 && jain >= 0.98, "Jain {jain:.3} over {} fridge households", v.len());
    });
}

/// Household `i`'s one appliance: a 135 W fridge with its class's profile, declaring a 10 % override rate.
fn one_per_household(i: u64, region: RegionId) -> Appliance {
    let p = ApplianceClass::Fridge.profile();
    Appliance {
        id: ApplianceId(10_000 + i),
        household: HouseholdId(i),
        region,
        class: ApplianceClass::Fridge,
        rated_power_w: 135,
        duty_cycle_permille: p.duty_cycle_permille as u16,
        deferral_min_max: p.deferral_min_max_safe as u16,
        override_rate_permille: 100,
    }
}

/// Under the default rule the rebound cap is a share of the peak reduction the plan delivers. Fridges alone cannot
/// hold a 15-minute plateau's payback to a tenth of that, so the engine plans nothing and says so: the whole
/// target is shortfall. Against the peak target the same fleet is given a plan.
#[test]
fn a_fleet_that_cannot_stagger_its_payback_gets_no_plan_under_the_delivered_peak_rule() {
    for (rebound_reference, expect_plan) in
        [(ReboundReference::DeliveredPeak, false), (ReboundReference::PeakTarget, true)]
    {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        runtime().block_on(async {
            let config = EngineConfig { rebound_reference, ..test_config() };
            let engine = Engine::open(config, dir.path(), Arc::clone(&clock) as Arc<dyn Clock>).await.unwrap();
            let region = engine.regions().lookup("_C").unwrap();
            engine.enrol((1..=3_000u64).map(|i| one_per_household(i, region)).collect()).await.unwrap();
            let req = submit_request("plateau", &["_C"], T0 + 60_000, vec![20.0; 15], 30);
            let (_, plan) = engine.submit(req, &Grant::unrestricted()).await.unwrap();
            if expect_plan {
                assert!(plan.n_appliances > 0, "{rebound_reference:?}: no plan");
            } else {
                assert_eq!(plan.n_appliances, 0, "{rebound_reference:?}");
                assert_eq!(plan.shortfall_w, plan.target_w, "the whole target is reported short");
            }
        });
    }
}

/// The planner counts on overrides as households really make them: pooled per class from the ledger's record,
/// starting from the declared rate, the same for every household of the class.
#[test]
fn override_rates_are_learned_per_class_from_the_record() {
    let appliance = |i: u64, class: ApplianceClass| Appliance { class, ..one_per_household(i, RegionId(0)) };
    let standing = |n_overridden: u32, override_exposure: f64| halftime_ledger::Standing {
        budget_min: 30,
        burden_kw_min: 0.0,
        last_deferred_unix_ms: i64::MIN,
        n_overridden,
        override_exposure,
    };
    // 200 fridge households with 2 overrides in 10 twenty-minute deferrals each (20 % against the declared 10 %);
    // freezers with no record yet.
    let mut eligible: Vec<(Appliance, u8, halftime_ledger::Standing)> =
        (1..=200).map(|i| (appliance(i, ApplianceClass::Fridge), 4, standing(2, 10.0))).collect();
    eligible.extend((201..=300).map(|i| (appliance(i, ApplianceClass::Freezer), 4, standing(0, 0.0))));
    let factor = dispatch::override_factor_by_class(&eligible);
    let fridge = factor[ApplianceClass::Fridge.index()];
    assert!((1.9..2.0).contains(&fridge), "fridges override about twice as often as declared: {fridge}");
    assert_eq!(factor[ApplianceClass::Freezer.index()], 1.0);
    assert_eq!(factor[ApplianceClass::EvCharger.index()], 1.0);
}

/// GetFlexibility counts on overrides as plans do: after households of a class overrode, the region's
/// flexibility is lower the next day (budgets are whole again, so only the learned rate differs).
#[test]
fn flexibility_counts_on_overrides_as_households_make_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    runtime().block_on(async {
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let region = engine.regions().lookup("_C").unwrap();
        let appliances: Vec<Appliance> = (1..=200u64).map(|i| one_per_household(i, region)).collect();
        engine.enrol(appliances).await.unwrap();
        let before = engine.flexibility(region, 30, 30).deferrable_w;
        let start = T0 + 60_000;
        engine
            .submit(submit_request("day-0", &["_C"], start, vec![4.0; 15], 30), &Grant::unrestricted())
            .await
            .unwrap();
        clock.0.store(start + 5 * MS_PER_MIN, Ordering::SeqCst);
        let mut n_overridden = 0;
        for h in 1..=200 {
            n_overridden += engine.override_now(HouseholdId(h), None).await.unwrap();
        }
        assert!(n_overridden >= 20, "{n_overridden} overrides");
        clock.0.store(T0 + MS_PER_DAY, Ordering::SeqCst);
        let after = engine.flexibility(region, 30, 30).deferrable_w;
        // Every deferral on record was overridden within minutes: the class's rate rises well above the declared
        // 10 %, and every fridge's expected reduction net of overrides with it.
        assert!(after < before * 0.8, "flexibility {before} W before, {after} W after {n_overridden} overrides");
    });
}

const FRIDGE_EVENT_START: i64 = T0 + 60_000;
const FRIDGE_EVENT_SLOTS: usize = 15;
const FRIDGE_EVENT_KW: f64 = 20.0;

/// Enrols 3,000 one-fridge households in `_C` and submits a flat event of [`FRIDGE_EVENT_KW`] for
/// [`FRIDGE_EVENT_SLOTS`] minutes from [`FRIDGE_EVENT_START`]: its id, plan and reservations.
async fn fridge_event(engine: &Engine, key: &str) -> (EventId, PlanSummary, Vec<halftime_ledger::Entry>) {
    let region = engine.regions().lookup("_C").unwrap();
    engine.enrol((1..=3_000u64).map(|i| one_per_household(i, region)).collect()).await.unwrap();
    let target_kw = vec![FRIDGE_EVENT_KW; FRIDGE_EVENT_SLOTS];
    let (id, plan) = engine
        .submit(submit_request(key, &["_C"], FRIDGE_EVENT_START, target_kw, 30), &Grant::unrestricted())
        .await
        .unwrap();
    let entries = engine.ledger().all_entries().into_iter().filter(|e| e.reservation.event == id).collect();
    (id, plan, entries)
}

/// [`fridge_event`] on an engine whose rebound cap is the whole target, so that it never binds a top-up.
async fn uncapped_fridge_event(
    dir: &Path,
    clock: &Arc<TestClock>,
    key: &str,
) -> (Engine, EventId, PlanSummary, Vec<halftime_ledger::Entry>) {
    let config = EngineConfig { rebound_fraction_max: 1.0, ..test_config() };
    let engine = Engine::open(config, dir, Arc::clone(clock) as Arc<dyn Clock>).await.unwrap();
    let (id, plan, entries) = fridge_event(&engine, key).await;
    (engine, id, plan, entries)
}

/// When the devices that have started report shedding less than the plan expected of them, the engine tops the
/// event up from the next minute, within the event's rebound cap, so that what it now looks like delivering is
/// back where the plan was. When they shed what was expected, it does not. The cap here is the whole target, so
/// that it does not bind: where it binds, a top-up keeps the first plan's allowance for scatter and recovers only
/// what fits beside it (the planner's `a_residual_keeps_the_earlier_plans_scatter_allowance`; at half the target,
/// this event's top-up gives back 91 % of the lost shed in its first full minute, at a tenth 31 %).
#[test]
fn devices_that_shed_less_than_planned_are_topped_up() {
    const REBOUND_FRACTION_MAX: f64 = 1.0;
    for (realised, expect_top_up) in [(0.6, true), (1.0, false)] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        runtime().block_on(async {
            let config = EngineConfig { rebound_fraction_max: REBOUND_FRACTION_MAX, ..test_config() };
            let engine = Engine::open(config, dir.path(), Arc::clone(&clock) as Arc<dyn Clock>).await.unwrap();
            let (start, target_kw) = (FRIDGE_EVENT_START, vec![FRIDGE_EVENT_KW; FRIDGE_EVENT_SLOTS]);
            let (id, before, entries) = fridge_event(&engine, "wave").await;
            let first = entries.iter().map(|e| e.reservation.not_before_unix_ms).min().unwrap();
            // Announced a minute ahead: the first slot's devices go out their random start offset ahead of it.
            let randomize_ms = i64::from(EngineConfig::default().randomize_start_s) * 1000;
            assert_eq!(first, start - randomize_ms);
            // The first devices to start report `realised` of what the plan expected of them (a fridge sheds
            // its expected reduction on average over any window); what they lose, per slot.
            let mut lost_w = vec![0.0; target_kw.len()];
            let starts = first_starts(&engine, id, &entries, realised, start + 1_000);
            for s in &starts {
                let r = &s.report;
                let e = entries.iter().find(|e| e.reservation.appliance == r.device).unwrap();
                let to = r.at_unix_ms + i64::from(e.reservation.deferral_s) * 1000;
                add_interval(&mut lost_w, start, r.at_unix_ms, to, s.expected_w - f64::from(r.reduction_w));
                // And what it pays back less than expected, inside the window.
                let p = r.payback.unwrap();
                add_interval(&mut lost_w, start, p.from_unix_ms, p.to_unix_ms, f64::from(p.power_w));
                for (k, w) in (0..).zip(&s.expected_payback_w) {
                    let a = to + k * MS_PER_MIN;
                    add_interval(&mut lost_w, start, a, a + MS_PER_MIN, -w);
                }
            }
            engine.report(&reports_of(&starts)).await.unwrap();
            // The event starts. Its first slot's devices have all said what they shed, so it is weighed five
            // seconds in (not thirty-five).
            clock.0.store(start + 6_000, Ordering::SeqCst);
            let plan_now = || engine.list_events(10).into_iter().find(|r| r.id == id).unwrap().plan;
            let mut after = plan_now();
            for _ in 0..500 {
                if after.realised_ratio > 0.0 && (!expect_top_up || after.n_appliances > before.n_appliances) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                after = plan_now();
            }
            assert!((after.realised_ratio - realised).abs() < 0.02, "realised {} of {realised}", after.realised_ratio);
            if !expect_top_up {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert_eq!(plan_now().n_appliances, before.n_appliances, "topped up at {realised}");
                return;
            }
            let after = plan_now();
            assert!(after.n_appliances > before.n_appliances, "not topped up at {realised}");
            let progress = engine.inner.events.get(&id).map(|e| e.value().lock().progress()).unwrap();
            assert!(progress.n_top_ups >= 1 && progress.n_tail_top_ups == 0, "{progress:?}");
            let all: Vec<_> = engine.ledger().all_entries().into_iter().filter(|e| e.reservation.event == id).collect();
            assert_eq!(all.len() as u64, after.n_appliances);
            for e in &all {
                let r = &e.reservation;
                // Top-up deferrals start from the next minute on (the first of them a random start offset
                // ahead of it, as there is time), never in the past, and keep to the classes the event relies on.
                assert!(r.not_before_unix_ms == first || r.not_before_unix_ms >= start + 60_000 - randomize_ms);
                assert_eq!(r.class, ApplianceClass::Fridge);
            }
            // From the minute after the top-up starts, what the event looks like delivering (the plan with the
            // top-up, less what the first devices lost) is back where the first plan was; and still is if the
            // top-up's own fridges shed only what the engine counts on from how the first ones did (planned at
            // the class's expectation instead, it fell up to 4 % short from slot 4 on).
            let yield_counted_on = {
                let rt = engine.inner.events.get(&id).map(|e| Arc::clone(e.value())).unwrap();
                let st = rt.lock();
                st.realised.yield_counted_on(TOP_UP_YIELD_MIN)
            };
            assert!(yield_counted_on < 0.7, "counted on {yield_counted_on} of what the class is expected to shed");
            for t in 2..target_kw.len() {
                let want_w = target_kw[t].min(before.expected_w[t] / 1e3) * 1e3;
                let now_w = after.expected_w[t] - lost_w[t];
                assert!(now_w >= 0.95 * want_w, "slot {t}: {now_w} W of {want_w} W (lost {} W)", lost_w[t]);
                let added_w = after.expected_w[t] - before.expected_w[t];
                let counted_w = now_w - (1.0 - yield_counted_on) * added_w;
                assert!(counted_w >= want_w, "slot {t}: {counted_w} W of {want_w} W counting on {yield_counted_on}");
            }
            // What the engine projects after the window (the first devices' own payback, the class average for
            // the rest) stays under the cap, and not because the guard released anything.
            let cap_w = REBOUND_FRACTION_MAX * FRIDGE_EVENT_KW * 1e3;
            let rt = engine.inner.events.get(&id).map(|e| Arc::clone(e.value())).unwrap();
            let st = rt.lock();
            assert_eq!(st.rebound.n_released, 0);
            for (t, r) in st.rebound.tail_w.iter().enumerate() {
                assert!(*r <= cap_w, "{t} minutes after the window: rebound {r} W over the cap {cap_w} W");
            }
        });
    }
}

/// A device of the event's first start: its report, and what the plan expected it to report shedding, W.
struct FirstStart {
    report: DeviceReport,
    expected_w: f64,
    /// What the plan expected it to pay back, W per minute from its deferral's end.
    expected_payback_w: Vec<f64>,
}

/// The devices of the event's first start, each reporting at `at` that it started, sheds `realised` of what the
/// plan expected of it (a fridge sheds its expected reduction on average over any window), and will pay back as
/// much as it sheds, over the span of its class's expected payback.
fn first_starts(
    engine: &Engine,
    id: EventId,
    entries: &[halftime_ledger::Entry],
    realised: f64,
    at: i64,
) -> Vec<FirstStart> {
    let first = entries.iter().map(|e| e.reservation.not_before_unix_ms).min().unwrap();
    let starts: Vec<FirstStart> = entries
        .iter()
        .filter(|e| e.reservation.not_before_unix_ms == first)
        .map(|e| {
            let a = engine.appliance(e.reservation.appliance).unwrap();
            let response = halftime_core::physics::expected_response(a.class, e.reservation.deferral_s / 60);
            let planned_w = a.expected_reduction_w();
            let expected_w = planned_w * response.shed.iter().sum::<f64>() / response.shed.len() as f64;
            let expected_payback_w: Vec<f64> = response.payback.iter().map(|x| planned_w * x).collect();
            let from_unix_ms = at + i64::from(e.reservation.deferral_s) * 1000;
            let n_min = expected_payback_w.len() as i64;
            let payback_w = realised * expected_payback_w.iter().sum::<f64>() / n_min as f64;
            let payback = Payback {
                power_w: payback_w.round() as u32,
                from_unix_ms,
                to_unix_ms: from_unix_ms + n_min * MS_PER_MIN,
            };
            let report = DeviceReport {
                device: a.id,
                event: id,
                counter: 0,
                status: DeviceStatus::Started,
                reject_reason: None,
                at_unix_ms: at,
                reduction_w: (realised * expected_w).round() as u32,
                payback: Some(payback),
            };
            FirstStart { report, expected_w, expected_payback_w }
        })
        .collect();
    assert!(starts.len() >= 50, "{} devices start first", starts.len());
    starts
}

fn reports_of(starts: &[FirstStart]) -> Vec<DeviceReport> {
    starts.iter().map(|s| s.report).collect()
}

#[test]
fn an_event_is_weighed_a_minute_apart_a_settling_time_into_each_slot() {
    let start = FRIDGE_EVENT_START;
    assert_eq!(weigh_due_unix_ms(i64::MIN, start, 35_000), start + 35_000, "never weighed: once settled");
    assert_eq!(weigh_due_unix_ms(start, start, 35_000), start + 35_000);
    assert_eq!(weigh_due_unix_ms(start + 35_000, start, 35_000), start + 95_000);
    assert_eq!(weigh_due_unix_ms(start + 94_999, start, 35_000), start + 95_000);
    assert_eq!(weigh_due_unix_ms(start - 600_000, start, 35_000), start - 565_000);
    // A random offset longer than a minute keeps the weighing a minute apart.
    assert_eq!(weigh_due_unix_ms(start, start, 605_000), start + 5_000);
}

/// A top-up restores what the plan promised: where that is the target, with an allowance for the scatter of the
/// devices not yet heard from (those that have said no longer scatter); where the plan fell short, only its
/// expectation.
#[test]
fn a_top_up_keeps_an_allowance_for_the_devices_not_yet_heard_from() {
    let config = test_config();
    let z = config.delivery_sigmas;
    let plan = PlanSummary {
        target_w: vec![100e3, 100e3, 100e3, 100e3],
        expected_w: vec![120e3, 120e3, 120e3, 90e3],
        ..PlanSummary::default()
    };
    // The first devices fall 15 kW short from slot 0 on; slot 2 still has devices to hear from, scattering by
    // 10 kW; slot 3's plan fell short of its target.
    let realised = runtime::Realised {
        deviation_w: vec![-15e3; 4],
        unsaid_var_w2: vec![0.0, 0.0, 10e3 * 10e3, 0.0],
        ..runtime::Realised::default()
    };
    let residual_w = top_up_residual_w(&plan, &realised, 0, 1, 0, &config);
    // Slot 1: 105 kW foreseen, all heard from: nothing. Slot 2: the allowance is short by z × 10 kW − 5 kW.
    // Slot 3: its 90 kW less the 15 kW lost.
    let want = [0.0, z * 10e3 - 5e3, 15e3];
    assert!(residual_w.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{residual_w:?} != {want:?}");
}

/// An event is weighed once its slot's devices have all started (their random offset, and a few seconds), so a
/// shortfall its first devices report is topped up from the second slot. Weighed on the minute, the event saw
/// them only a minute in, and its first top-up reached the third slot.
#[test]
fn a_shortfall_in_the_first_slot_is_topped_up_from_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    runtime().block_on(async {
        // Late enough for an event whose first slot was not sent ahead; this one was, and is weighed by then too.
        let settle_ms = weigh_settle_ms(&test_config(), false);
        let (engine, id, before, entries) = uncapped_fridge_event(dir.path(), &clock, "first-slot").await;
        let start = FRIDGE_EVENT_START;
        // The event starts; no device has reported yet.
        clock.0.store(start + 1_000, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let starts = first_starts(&engine, id, &entries, 0.6, start + 20_000);
        engine.report(&reports_of(&starts)).await.unwrap();
        clock.0.store(start + settle_ms + 1_000, Ordering::SeqCst);
        let plan_now = || engine.list_events(10).into_iter().find(|r| r.id == id).unwrap().plan;
        for _ in 0..500 {
            if plan_now().n_appliances > before.n_appliances {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(plan_now().n_appliances > before.n_appliances, "not topped up within the first minute");
        let first_plan: HashSet<ApplianceId> = entries.iter().map(|e| e.reservation.appliance).collect();
        let top_up_starts: Vec<i64> = engine
            .ledger()
            .all_entries()
            .into_iter()
            .filter(|e| e.reservation.event == id && !first_plan.contains(&e.reservation.appliance))
            .map(|e| e.reservation.not_before_unix_ms)
            .collect();
        assert_eq!(top_up_starts.iter().min(), Some(&(start + MS_PER_MIN)), "the top-up starts in the second slot");
    });
}

/// Households that override more than the plan counted on, mid-window, have the event topped up from the next
/// minute: an override weighs against its expectation as it happens, not only a device's first report. While
/// every device sheds what was expected of it, the event is not topped up.
#[test]
fn overrides_beyond_what_the_plan_expected_are_topped_up() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    runtime().block_on(async {
        let (engine, id, before, entries) = uncapped_fridge_event(dir.path(), &clock, "overrides").await;
        let start = FRIDGE_EVENT_START;
        let reports = reports_of(&first_starts(&engine, id, &entries, 1.0, start + 1_000));
        engine.report(&reports).await.unwrap();
        let plan_now = || engine.list_events(10).into_iter().find(|r| r.id == id).unwrap().plan;
        // The event starts; its reports are weighed within a tick or two.
        clock.0.store(start + 40_000, Ordering::SeqCst);
        for _ in 0..500 {
            if plan_now().realised_ratio > 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(plan_now().n_appliances, before.n_appliances, "topped up with every device as expected");
        // Half of them overridden in the third minute: over three times what a 10 % override rate expects of
        // a 30-minute deferral by then.
        let overridden: Vec<DeviceReport> = reports
            .iter()
            .step_by(2)
            .map(|r| DeviceReport { status: DeviceStatus::Overridden, at_unix_ms: start + 150_000, ..*r })
            .collect();
        engine.report(&overridden).await.unwrap();
        clock.0.store(start + 160_000, Ordering::SeqCst);
        let mut after = plan_now();
        for _ in 0..500 {
            if after.n_appliances > before.n_appliances {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = plan_now();
        }
        assert!(after.n_appliances > before.n_appliances, "not topped up after {} overrides", overridden.len());
        // The top-up starts from the minute after it was weighed.
        let first_plan: HashSet<ApplianceId> = entries.iter().map(|e| e.reservation.appliance).collect();
        for e in engine.ledger().all_entries().into_iter().filter(|e| e.reservation.event == id) {
            let r = &e.reservation;
            assert!(first_plan.contains(&r.appliance) || r.not_before_unix_ms >= start + 180_000, "{r:?}");
        }
    });
}

/// A tail top-up asks, minute by minute from the next one, for what the projection has over the guard's line,
/// and for nothing past the last such minute.
#[test]
fn a_tail_top_up_asks_for_the_excess_over_the_line_from_the_next_minute() {
    let tail_w = [90.0, 120.0, 80.0, 130.0, 100.0, 60.0, 0.0];
    assert_eq!(tail_top_up_w(&tail_w, 1, 100.0), vec![20.0, 0.0, 30.0]);
    assert_eq!(tail_top_up_w(&tail_w, 4, 100.0), Vec::<f64>::new(), "at the line is not over it");
    assert_eq!(tail_top_up_w(&tail_w, 9, 100.0), Vec::<f64>::new(), "past the projection's end");
    let long = vec![200.0; 2 * TAIL_TOP_UP_SLOTS_MAX];
    assert_eq!(tail_top_up_w(&long, 0, 100.0).len(), TAIL_TOP_UP_SLOTS_MAX);
}

/// After the window, where the rebound the devices foretell goes over the guard's line (under the cap) in minutes
/// to come and the guard cannot release it (the devices have ended), the engine plans new deferrals into those
/// minutes, from the next one on, and the projection there comes down. Where it stays under the line, nothing is
/// planned.
#[test]
fn rebound_to_come_over_the_cap_is_topped_up_after_the_window() {
    // What the first devices will pay back together, as a share of the guard's line.
    for (payback_line_share, expect_top_up) in [(2.0, true), (0.2, false)] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        runtime().block_on(async {
            let engine = open(dir.path(), Arc::clone(&clock)).await;
            let (id, before, entries) = fridge_event(&engine, "tail").await;
            let (start, window_end) = (FRIDGE_EVENT_START, FRIDGE_EVENT_START + FRIDGE_EVENT_SLOTS as i64 * MS_PER_MIN);
            let starts = reports_of(&first_starts(&engine, id, &entries, 1.0, start + 1_000));
            engine.report(&starts).await.unwrap();
            let config = test_config();
            let line_w = config.rebound_guard_share * config.rebound_fraction_max * FRIDGE_EVENT_KW * 1e3;
            // They end, each saying it will draw its share from 20 to 30 minutes after the window.
            let (over_from, over_to) = (window_end + 20 * MS_PER_MIN, window_end + 30 * MS_PER_MIN);
            let payback_w = (payback_line_share * line_w / starts.len() as f64).round() as u32;
            let ended: Vec<DeviceReport> = starts
                .iter()
                .map(|r| {
                    let e = entries.iter().find(|e| e.reservation.appliance == r.device).unwrap();
                    DeviceReport {
                        status: DeviceStatus::Completed,
                        at_unix_ms: e.reservation.not_after_unix_ms,
                        payback: Some(Payback { power_w: payback_w, from_unix_ms: over_from, to_unix_ms: over_to }),
                        ..*r
                    }
                })
                .collect();
            engine.report(&ended).await.unwrap();
            let rt = engine.inner.events.get(&id).map(|e| Arc::clone(e.value())).unwrap();
            let peak_over_w = || {
                let st = rt.lock();
                st.rebound.tail_w[20..30].iter().copied().fold(f64::MIN, f64::max)
            };
            let peak_before_w = peak_over_w();
            assert_eq!(
                peak_before_w > line_w,
                expect_top_up,
                "projected {peak_before_w} W against a line of {line_w} W"
            );
            // The window has ended; the event is weighed within a tick or two.
            clock.0.store(window_end + 40_000, Ordering::SeqCst);
            let plan_now = || engine.list_events(10).into_iter().find(|r| r.id == id).unwrap().plan;
            let weighed_after_window = || rt.lock().weighed_unix_ms >= window_end;
            for _ in 0..500 {
                if plan_now().n_appliances > before.n_appliances || (!expect_top_up && weighed_after_window()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !expect_top_up {
                assert!(weighed_after_window(), "not weighed after the window");
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert_eq!(plan_now().n_appliances, before.n_appliances, "topped up under the line");
                assert_eq!(rt.lock().progress().n_tail_top_ups, 0);
                return;
            }
            assert!(plan_now().n_appliances > before.n_appliances, "not topped up");
            // The operator watching the event sees it, as a top-up after the window.
            let progress = rt.lock().progress();
            assert_eq!((progress.n_top_ups, progress.n_tail_top_ups), (0, 1));
            let first_plan: HashSet<ApplianceId> = entries.iter().map(|e| e.reservation.appliance).collect();
            let added: Vec<halftime_core::Reservation> = engine
                .ledger()
                .all_entries()
                .into_iter()
                .filter(|e| e.reservation.event == id && !first_plan.contains(&e.reservation.appliance))
                .map(|e| e.reservation)
                .collect();
            for r in &added {
                assert!(r.not_before_unix_ms >= window_end + MS_PER_MIN, "starts before the next minute: {r:?}");
            }
            // What the new deferrals are expected to shed there (some start after those minutes, to absorb the
            // others' payback) brings the projection down by at least half of what was over.
            let peak_after_w = peak_over_w();
            assert!(
                peak_after_w <= peak_before_w - 0.5 * (peak_before_w - line_w),
                "{} deferrals added; projected {peak_before_w} W, then {peak_after_w} W (line {line_w} W)",
                added.len()
            );
        });
    }
}

/// A plan keeps its rebound under the guard's share of the cap, not the whole cap: a plan over the guard's line
/// had the guard release deferrals the moment they started, costing the event's first minutes. With no
/// allowance for scatter a plan goes up to whatever line it is given, so with the guard on its peak rebound is
/// the guard's share of what it is with the guard off.
#[test]
fn a_plan_keeps_its_rebound_under_the_guards_line() {
    let peak_rebound_w = |rebound_guard_share: f64| {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        runtime().block_on(async {
            let config = EngineConfig { rebound_sigmas: 0.0, rebound_guard_share, ..test_config() };
            let engine = Engine::open(config, dir.path(), Arc::clone(&clock) as Arc<dyn Clock>).await.unwrap();
            let (_, plan, _) = fridge_event(&engine, "line").await;
            plan.rebound_w.iter().skip(FRIDGE_EVENT_SLOTS).copied().fold(0.0, f64::max)
        })
    };
    let (whole_w, held_w) = (peak_rebound_w(0.0), peak_rebound_w(0.9));
    // The cap binds (fridges cannot meet this target within it), so the plan fills it.
    assert!(whole_w >= 0.1 * FRIDGE_EVENT_KW * 1e3, "{whole_w} W: the cap does not bind");
    let ratio = held_w / whole_w;
    assert!((0.87..=0.93).contains(&ratio), "guarded at 0.9, the plan's rebound is {ratio} of the whole cap's");
}

/// Devices say what they will pay back when they start. Once what they said fills the event's rebound cap in some
/// minute, every further device whose payback lands there is released at once, with a signed release the
/// head-end holds for it; the others keep deferring. The ledger charges a released one until it says it resumed.
#[test]
fn deferrals_whose_payback_would_break_the_rebound_cap_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    runtime().block_on(async {
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let (id, _, entries) = fridge_event(&engine, "guard").await;
        let window_end = FRIDGE_EVENT_START + FRIDGE_EVENT_SLOTS as i64 * MS_PER_MIN;
        let first = entries.iter().map(|e| e.reservation.not_before_unix_ms).min().unwrap();
        // Each says it will draw 500 W more for ten minutes two hours after the window, where nothing else pays back.
        let payback_w = 500;
        let reports: Vec<DeviceReport> = entries
            .iter()
            .filter(|e| e.reservation.not_before_unix_ms == first)
            .map(|e| DeviceReport {
                device: e.reservation.appliance,
                event: id,
                counter: 0,
                status: DeviceStatus::Started,
                reject_reason: None,
                at_unix_ms: first + 1_000,
                reduction_w: 100,
                payback: Some(Payback {
                    power_w: payback_w,
                    from_unix_ms: window_end + 120 * MS_PER_MIN,
                    to_unix_ms: window_end + 130 * MS_PER_MIN,
                }),
            })
            .collect();
        assert!(reports.len() >= 20, "{} devices start first", reports.len());
        engine.report(&reports).await.unwrap();
        let config = test_config();
        let cap_w = config.rebound_guard_share * config.rebound_fraction_max * FRIDGE_EVENT_KW * 1e3;
        let status = |d: ApplianceId| entry_of(&engine, id, d);
        let (mut kept, mut released) = (0, 0);
        for r in &reports {
            match status(r.device).unwrap().status {
                DeviceStatus::Released => {
                    released += 1;
                    let held = engine.resync(r.device).unwrap();
                    assert!(held.iter().any(|c| c.command.kind == CommandKind::Release), "no release for {}", r.device);
                }
                DeviceStatus::Started => kept += 1,
                s => panic!("{}: {s:?}", r.device),
            }
        }
        // As many as fit under the cap keep deferring; every one after them is released.
        let fit = (cap_w / f64::from(payback_w)).floor() as usize;
        assert_eq!((kept, released), (fit, reports.len() - fit), "cap {cap_w} W");
        // The ledger charges a released deferral in full until the device says when it resumed: the release may
        // never reach it.
        let r = reports.iter().find(|r| status(r.device).unwrap().status == DeviceStatus::Released).unwrap();
        let planned = entries.iter().find(|e| e.reservation.appliance == r.device).unwrap().reservation;
        assert_eq!(status(r.device).unwrap().reservation, planned);
        // So does an engine restarted before the device said: it replays the release as the engine's own.
        engine.shutdown().await;
        drop(engine);
        let engine = open(dir.path(), Arc::clone(&clock)).await;
        let status = |d: ApplianceId| entry_of(&engine, id, d);
        assert_eq!(status(r.device).unwrap().status, DeviceStatus::Released);
        assert_eq!(status(r.device).unwrap().reservation, planned, "refunded at the release on recovery");
        let resumed_unix_ms = first + 90_000;
        let said = DeviceReport { status: DeviceStatus::Released, at_unix_ms: resumed_unix_ms, payback: None, ..*r };
        engine.report(&[said]).await.unwrap();
        let charged = status(r.device).unwrap().reservation;
        assert_eq!(charged.not_after_unix_ms, resumed_unix_ms);
        assert_eq!(charged.deferral_s, ((resumed_unix_ms - planned.not_before_unix_ms) / 1000) as u32);
    });
}
