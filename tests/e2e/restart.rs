//! Restarting from the same data directory keeps events, limits, the ledger and the command counters.

use crate::harness::*;
use halftime_client::DevicePolicy;
use halftime_proto::pb;
use std::sync::{Arc, Mutex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_events_limits_ledger_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let log = Arc::new(Mutex::new(Vec::new()));
    let limits = pb::Limits {
        events_per_day_max: 1,
        deferred_min_per_day_max: 45,
        deferral_min_max: 20,
        rest_min_min: 30,
        ..Default::default()
    };
    let (event, plan, history_before, key) = {
        let running = start(dir.path(), clock.clone()).await;
        let url = running.url();
        let appliances = enrol(&url, 12).await;
        household(&url)
            .await
            .set_limits(pb::SetLimitsRequest { household_id: 3, limits: Some(limits.clone()) })
            .await
            .unwrap();
        let devices: Vec<(u64, u32)> = appliances.iter().map(|a| (a.appliance_id, a.rated_power_w)).collect();
        let mut link =
            gateway(&url, trusted(running.engine.public_key()), &clock, &devices, DevicePolicy::default(), 0, &log);
        link.wait_connected().await;
        let mut op = operator(&url).await;
        let r = op.submit_stress_event(submit("before-restart", vec![2.0; 5], 10)).await.unwrap().into_inner();
        let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
        let n = r.plan.as_ref().unwrap().n_appliances;
        watch_until(&mut watch, "all started", |p| p.started == n).await;
        let some = log.lock().unwrap()[0].device.0 / 10;
        let h = household(&url)
            .await
            .get_history(pb::GetHistoryRequest { household_id: some, limit: 0 })
            .await
            .unwrap()
            .into_inner();
        link.shutdown().await;
        let key = running.engine.public_key();
        running.stop().await;
        (r.event_id, r.plan.unwrap(), (some, h), key)
    };
    let max_counter = log.lock().unwrap().iter().map(|d| d.counter).max().unwrap();

    let running = start(dir.path(), clock.clone()).await;
    let url = running.url();
    assert_eq!(running.engine.public_key(), key, "the signing key is kept");
    let mut op = operator(&url).await;
    let events = op.list_events(pb::ListEventsRequest { limit: 0 }).await.unwrap().into_inner().events;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].event_id, events[0].n_appliances), (event, plan.n_appliances));
    // A retry of the same submission after the restart gets the same answer, not a second event.
    let again = op.submit_stress_event(submit("before-restart", vec![2.0; 5], 10)).await.unwrap().into_inner();
    assert_eq!((again.event_id, again.plan.unwrap().n_appliances), (event, plan.n_appliances));
    let own = household(&url).await.get_limits(pb::GetLimitsRequest { household_id: 3 }).await.unwrap().into_inner();
    assert_eq!(own.own.unwrap(), limits);
    let (some, before) = history_before;
    let after = household(&url)
        .await
        .get_history(pb::GetHistoryRequest { household_id: some, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.entries.len(), before.entries.len(), "the ledger is restored");
    assert!((after.burden_kw_min - before.burden_kw_min).abs() < 1e-9);

    // Devices that remember the highest counter they accepted take the new commands: counters went on rising.
    // Households that took part before are resting, so new ones join.
    let fresh: Vec<pb::Appliance> = (13..=24u64)
        .map(|h| pb::Appliance {
            appliance_id: h * 10 + 1,
            household_id: h,
            region: "_C".into(),
            class: pb::ApplianceClass::WaterHeater as i32,
            rated_power_w: 3000,
            ..Default::default()
        })
        .collect();
    household(&url).await.enrol_appliances(pb::EnrolAppliancesRequest { appliances: fresh.clone() }).await.unwrap();
    let appliances: Vec<(u64, u32)> = fresh.iter().map(|a| (a.appliance_id, a.rated_power_w)).collect();
    let log2 = Arc::new(Mutex::new(Vec::new()));
    let mut link = gateway(&url, trusted(key), &clock, &appliances, DevicePolicy::default(), max_counter, &log2);
    link.wait_connected().await;
    let r = op.submit_stress_event(submit("after-restart", vec![0.5; 3], 10)).await.unwrap().into_inner();
    let n = r.plan.unwrap().n_appliances;
    assert!(n > 0);
    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    let p = watch_until(&mut watch, "new commands answered", |p| p.started + p.rejected == n).await;
    assert_eq!(p.rejected, 0, "a command reused a counter");
    assert!(log2.lock().unwrap().iter().all(|d| d.counter > max_counter));
    link.shutdown().await;
    running.stop().await;
}
