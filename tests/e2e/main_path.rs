//! The main path: submit, plan, sign, deliver, verify, apply, acknowledge, watch; overrides; rejections.

use crate::harness::*;
use halftime_client::clock::{ScaledClock, SystemClock};
use halftime_client::{DevicePolicy, ResumeReason};
use halftime_core::time::{Clock, MS_PER_MIN};
use halftime_engine::add_interval;
use halftime_proto::pb;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_receive_verify_apply_and_watch_reports_what_they_shed() {
    let world = World::new(30).await;
    let url = &world.url;
    // Two gateways; each device reports shedding its rated power.
    let (left, right) = world.devices.split_at(world.devices.len() / 2);
    let links = vec![
        world.gateway(left, DevicePolicy::default(), None).await,
        world.gateway(right, DevicePolicy::default(), None).await,
    ];

    let mut op = operator(url).await;
    let r = op.submit_stress_event(submit("main-path", vec![3.0, 6.0, 6.0, 6.0, 4.0], 10)).await.unwrap().into_inner();
    let plan = r.plan.unwrap();
    assert!(r.event_id > 0);
    assert!(plan.n_appliances > 0 && plan.n_households > 0 && plan.n_cohorts > 0);
    // The plan is honest: what it expects plus what it says it cannot do covers the target in every slot.
    // (Whether it meets the target is the planner's business, tested there; here the population is small and
    // the rebound cap binds.)
    for (t, target) in plan.target_kw.iter().enumerate() {
        let (expected, shortfall) = (plan.expected_kw[t], plan.shortfall_kw[t]);
        assert!(expected + shortfall + 1e-6 >= *target, "slot {t}: {expected} + {shortfall} kW < target {target} kW");
    }

    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    let all_started = watch_until(&mut watch, "every device to start", |p| {
        p.dispatched == plan.n_appliances && p.started == p.dispatched && p.acknowledged == p.dispatched
    })
    .await;
    assert_eq!(all_started.rejected, 0);
    let last = watch_until(&mut watch, "the event to complete", |p| p.completed == p.dispatched).await;

    // What the devices applied, slot by slot, is what the engine says was delivered.
    let done = world.done();
    assert_eq!(done.len() as u64, plan.n_appliances, "each dispatched device applied exactly one deferral");
    let mut applied_w = vec![0.0; last.delivered_kw.len()];
    for d in &done {
        assert_eq!(d.resumed, Some(ResumeReason::Completed));
        add_interval(&mut applied_w, last.start_unix_ms, d.start_unix_ms, d.end_unix_ms, f64::from(d.reduction_w));
    }
    for (t, (delivered_kw, applied)) in last.delivered_kw.iter().zip(&applied_w).enumerate() {
        let applied_kw = applied / 1e3;
        assert!(
            (delivered_kw - applied_kw).abs() <= 0.01 * applied_kw.max(1.0),
            "slot {t}: engine says {delivered_kw} kW, devices shed {applied_kw} kW"
        );
    }
    // A household sees its own history.
    let some = done[0].device.0 / 10;
    let h = household(url)
        .await
        .get_history(pb::GetHistoryRequest { household_id: some, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(!h.entries.is_empty() && h.burden_kw_min > 0.0);
    assert!(h.entries.iter().all(|e| e.event_id == r.event_id));
    for l in links {
        l.shutdown().await;
    }
    world.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_mid_deferral_is_honoured_at_once_and_reported() {
    let world = World::new(20).await;
    let url = &world.url;
    let link = world.gateway(&world.devices, DevicePolicy::default(), None).await;
    let mut op = operator(url).await;
    // A long flat target so that deferrals are well under way when the households step in.
    let r = op.submit_stress_event(submit("override", vec![2.0; 30], 30)).await.unwrap().into_inner();
    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    watch_until(&mut watch, "a deferral to start", |p| p.started >= 2).await;
    let running_now: Vec<_> = world.done().into_iter().filter(|d| d.resumed.is_none()).collect();
    assert!(running_now.len() >= 2);

    // On the device: the household presses "resume now".
    let local = running_now[0].device;
    assert!(link.override_now(local).await);
    let after = world.done().into_iter().find(|d| d.device == local).unwrap();
    assert_eq!(after.resumed, Some(ResumeReason::Overridden), "the appliance resumed before override_now returned");

    // Through the Household API: the engine releases the other appliance's deferral.
    let remote = running_now[1].device;
    let n = household(url)
        .await
        .r#override(pb::OverrideRequest { household_id: remote.0 / 10, appliance_id: remote.0 })
        .await
        .unwrap()
        .into_inner()
        .n_overridden;
    assert_eq!(n, 1);
    let p = watch_until(&mut watch, "both overrides to be reported", |p| p.overridden >= 2).await;
    assert!(p.overridden >= 2);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let resumed = world.done().into_iter().find(|d| d.device == remote).and_then(|d| d.resumed);
        if resumed.is_some() {
            assert_eq!(resumed, Some(ResumeReason::Released));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the engine's release never reached the device");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let hist = household(url)
        .await
        .get_history(pb::GetHistoryRequest { household_id: remote.0 / 10, limit: 10 })
        .await
        .unwrap()
        .into_inner();
    assert!(hist.entries.iter().any(|e| e.appliance_id == remote.0 && e.status == pb::DeviceStatus::Overridden as i32));
    link.shutdown().await;
    world.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reject_wrong_key_and_over_cap_commands_and_the_engine_sees_it() {
    let world = World::new(10).await;
    let (first, second): (Vec<_>, Vec<_>) = world.devices.iter().partition(|(id, _)| (id / 10) % 2 == 0);
    // One gateway trusts some other key; the other allows no deferral longer than 5 minutes.
    let stranger = halftime_signer::Signer::from_seed([9; 32]).public_key();
    let a = world.gateway(&first, DevicePolicy::default(), Some(stranger)).await;
    let tight = DevicePolicy { deferral_s_max: 5 * 60, deferred_s_per_day_max: 3600 };
    let b = world.gateway(&second, tight, None).await;
    let mut op = operator(&world.url).await;
    let r = op.submit_stress_event(submit("rejects", vec![3.0; 20], 20)).await.unwrap().into_inner();
    let plan = r.plan.unwrap();
    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    let p = watch_until(&mut watch, "every command to be answered", |p| {
        p.rejected + p.started == p.dispatched && p.dispatched > 0
    })
    .await;
    // The engine may top the event up in place of what was refused, and those commands are answered the same way.
    assert!(p.dispatched >= plan.n_appliances, "{} dispatched of a plan of {}", p.dispatched, plan.n_appliances);
    // Deferrals of more than 5 minutes are refused by the tight gateway, and everything the stranger-trusting
    // one got was refused: nothing longer than 5 minutes, and nothing at all on the first gateway, was applied.
    let applied = world.done();
    assert!(p.rejected > 0);
    assert!(
        applied.iter().all(|d| second.iter().any(|(id, _)| *id == d.device.0)),
        "a device that trusts another key applied a command"
    );
    assert!(applied.iter().all(|d| d.end_unix_ms - d.start_unix_ms <= 5 * 60_000 + 1_000));
    a.shutdown().await;
    b.shutdown().await;
    world.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_supersedes_the_target_and_cancel_releases_in_staggered_steps() {
    let world = World::new(60).await;
    let link = world.gateway(&world.devices, DevicePolicy::default(), None).await;
    let mut op = operator(&world.url).await;

    let flex = op
        .get_flexibility(pb::GetFlexibilityRequest { region: "_C".into(), horizon_min: 20, deferral_min_max: 20 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flex.n_appliances_eligible, 120);
    assert!(flex.deferrable_mw > 0.0);
    assert_eq!(flex.by_class.iter().map(|c| c.n_appliances_eligible).sum::<u64>(), 120);
    assert_eq!(
        op.get_flexibility(pb::GetFlexibilityRequest { region: "_A".into(), horizon_min: 20, deferral_min_max: 0 })
            .await
            .unwrap()
            .into_inner()
            .n_appliances_eligible,
        0
    );

    let r = op.submit_stress_event(submit("update-cancel", vec![1.0; 30], 20)).await.unwrap().into_inner();
    let first = r.plan.unwrap();
    // Raise the target: more appliances join, from the next minute on.
    let up = op
        .update_stress_event(pb::UpdateStressEventRequest {
            event_id: r.event_id,
            target_kw: vec![4.0; 30],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert!(up.n_appliances > first.n_appliances, "{} -> {}", first.n_appliances, up.n_appliances);
    assert_eq!(up.target_kw, vec![4.0; 30]);
    for t in 1..30 {
        assert!(up.expected_kw[t] + up.shortfall_kw[t] + 1e-6 >= 4.0, "slot {t}");
    }
    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    watch_until(&mut watch, "deferrals to start", |p| p.started >= 3).await;

    // Cancel: every deferral still running is released, spread over three minutes.
    let n = op
        .cancel_stress_event(pb::CancelStressEventRequest { event_id: r.event_id, release_over_min: 3 })
        .await
        .unwrap()
        .into_inner()
        .n_released;
    assert!(n > 0);
    let events = op.list_events(pb::ListEventsRequest { limit: 0 }).await.unwrap().into_inner().events;
    assert_eq!(events[0].state, pb::EventState::Cancelled as i32);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let released = loop {
        let l = world.done();
        let started: Vec<_> = l.iter().filter(|d| d.resumed != Some(ResumeReason::Completed)).copied().collect();
        if !started.is_empty() && started.iter().all(|d| d.resumed.is_some()) {
            break started;
        }
        assert!(tokio::time::Instant::now() < deadline, "not every device was released: {started:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(released.iter().all(|d| d.resumed == Some(ResumeReason::Released)));
    let ends: Vec<i64> = released.iter().map(|d| d.end_unix_ms).collect();
    let spread = ends.iter().max().unwrap() - ends.iter().min().unwrap();
    if released.len() >= 3 {
        assert!(spread >= 60_000, "releases were not staggered: {ends:?}");
    }
    assert!(spread <= 3 * 60_000 + 10_000, "releases took longer than asked: {ends:?}");
    link.shutdown().await;
    world.running.stop().await;
}

/// A device that sleeps through its deferral's window (suspended, or its clock jumps) does not start it late:
/// it reports the command expired, and the household is not charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_sleeps_through_its_window_does_not_start_late() {
    let clock = Arc::new(ScaledClock::new(SystemClock.now_unix_ms(), SPEED));
    let world = World::on_clock(10, clock.clone()).await;
    let link = world.gateway(&world.devices, DevicePolicy::default(), None).await;
    let mut op = operator(&world.url).await;
    let start = clock.now_unix_ms() + 5 * MS_PER_MIN;
    let request = pb::SubmitStressEventRequest { start_unix_ms: start, ..submit("asleep", vec![2.0; 5], 10) };
    let r = op.submit_stress_event(request).await.unwrap().into_inner();
    let n = r.plan.unwrap().n_appliances;
    assert!(n > 0);
    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    watch_until(&mut watch, "every command to be acknowledged", |p| p.acknowledged == n).await;
    // Every window is over before any device's start timer fires.
    clock.advance_to(start + 60 * MS_PER_MIN);
    // The event closes at once (its stream ends): the devices' reports still reach it.
    let event = halftime_core::EventId(r.event_id);
    let mut last = world.running.engine.progress(event).unwrap();
    for _ in 0..500 {
        if last.counts.rejected + last.counts.started >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        last = world.running.engine.progress(event).unwrap();
    }
    assert_eq!((last.counts.rejected, last.counts.started), (n, 0));
    assert!(world.done().is_empty(), "deferred late: {:?}", world.done());
    let some = world.devices[0].0 / 10;
    let h = household(&world.url)
        .await
        .get_history(pb::GetHistoryRequest { household_id: some, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.burden_kw_min, 0.0);
    link.shutdown().await;
    world.running.stop().await;
}

/// A gateway that sends more reports in one batch than a link should still has every one applied: the server
/// hands them to the engine in bounded chunks rather than dropping the excess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_report_batch_loses_no_report() {
    use halftime_proto::pb::device_link_client::DeviceLinkClient;
    let world = World::new(10).await;
    let (up, up_rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::Hello { link_name: "raw".into(), device_ids: world.devices.iter().map(|d| d.0).collect() };
    up.send(pb::Uplink { msg: Some(pb::uplink::Msg::Hello(hello)) }).await.unwrap();
    let mut link = DeviceLinkClient::connect(world.url.clone()).await.unwrap();
    let mut down = link.attach(tokio_stream::wrappers::ReceiverStream::new(up_rx)).await.unwrap().into_inner();
    assert!(matches!(down.message().await.unwrap().unwrap().msg, Some(pb::downlink::Msg::HelloAck(_))));

    let mut op = operator(&world.url).await;
    let r = op.submit_stress_event(submit("oversized", vec![3.0, 3.0], 10)).await.unwrap().into_inner();
    let n = r.plan.unwrap().n_appliances;
    assert!(n > 0);
    let mut commands = Vec::new();
    while (commands.len() as u64) < n {
        if let Some(pb::downlink::Msg::Commands(b)) = down.message().await.unwrap().unwrap().msg {
            commands.extend(b.commands);
        }
    }
    // Receipts for the real commands come after more filler (reports about devices the engine does not know)
    // than one chunk holds.
    let filler = pb::StatusReport {
        device_id: 999_999,
        event_id: r.event_id,
        counter: 1,
        status: pb::DeviceStatus::Received as i32,
        ..Default::default()
    };
    let mut reports = vec![filler; halftime_proto::REPORT_BATCH_MAX + 1];
    reports.extend(commands.iter().map(|c| pb::StatusReport {
        device_id: c.device_id,
        event_id: c.event_id,
        counter: c.counter,
        status: pb::DeviceStatus::Received as i32,
        at_unix_ms: world.clock.now_unix_ms(),
        ..Default::default()
    }));
    up.send(pb::Uplink { msg: Some(pb::uplink::Msg::Reports(pb::ReportBatch { reports })) }).await.unwrap();
    let mut watch = op.watch_event(pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    watch_until(&mut watch, "every command to be acknowledged", |p| p.acknowledged == n).await;
    drop(up);
    world.running.stop().await;
}
