//! Every request type refuses bad input with INVALID_ARGUMENT naming the field; unknown ids are NOT_FOUND.

use crate::harness::*;
use halftime_proto::pb;
use halftime_proto::pb::device_link_client::DeviceLinkClient;
use tonic::Code;

fn expect(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, field: &str, what: &str) {
    match result {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(s.message().starts_with(field), "{what}: message {:?} does not start with {field:?}", s.message());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), clock()).await;
    let url = running.url();
    enrol(&url, 2).await;
    let mut op = operator(&url).await;
    let mut hh = household(&url).await;
    let mut link = DeviceLinkClient::connect(url.clone()).await.unwrap();
    let ok = submit("ok", vec![1.0], 10);
    let ia = Code::InvalidArgument;

    let submits: Vec<(pb::SubmitStressEventRequest, &str)> = vec![
        (pb::SubmitStressEventRequest { regions: vec![], ..ok.clone() }, "regions"),
        (pb::SubmitStressEventRequest { regions: vec!["_Q".into()], ..ok.clone() }, "regions[0]"),
        (pb::SubmitStressEventRequest { target_kw: vec![], ..ok.clone() }, "target_mw"),
        (pb::SubmitStressEventRequest { target_kw: vec![1.0, f64::INFINITY], ..ok.clone() }, "target_kw[1]"),
        (pb::SubmitStressEventRequest { target_kw: vec![1.0; 241], ..ok.clone() }, "target_kw"),
        (pb::SubmitStressEventRequest { target_mw: vec![1.0], ..ok.clone() }, "target_mw"),
        (pb::SubmitStressEventRequest { deferral_min_max: 0, ..ok.clone() }, "deferral_min_max"),
        (pb::SubmitStressEventRequest { deferral_min_max: 500, ..ok.clone() }, "deferral_min_max"),
        (pb::SubmitStressEventRequest { priority: 42, ..ok.clone() }, "priority"),
        (pb::SubmitStressEventRequest { idempotency_key: String::new(), ..ok.clone() }, "idempotency_key"),
        (pb::SubmitStressEventRequest { start_unix_ms: 1, ..ok.clone() }, "start_unix_ms"),
    ];
    for (req, field) in submits {
        expect(op.submit_stress_event(req).await, ia, field, "SubmitStressEvent");
    }
    let event = op.submit_stress_event(ok.clone()).await.unwrap().into_inner().event_id;
    let changed = pb::SubmitStressEventRequest { deferral_min_max: 11, ..ok.clone() };
    expect(op.submit_stress_event(changed).await, Code::AlreadyExists, "idempotency_key", "reused key");

    expect(
        op.update_stress_event(pb::UpdateStressEventRequest {
            event_id: 0,
            target_kw: vec![1.0],
            ..Default::default()
        })
        .await,
        ia,
        "event_id",
        "UpdateStressEvent",
    );
    expect(
        op.update_stress_event(pb::UpdateStressEventRequest {
            event_id: event,
            target_kw: vec![-1.0],
            ..Default::default()
        })
        .await,
        ia,
        "target_kw[0]",
        "UpdateStressEvent",
    );
    expect(
        op.update_stress_event(pb::UpdateStressEventRequest {
            event_id: 999,
            target_kw: vec![1.0],
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "event_id",
        "UpdateStressEvent",
    );
    expect(
        op.cancel_stress_event(pb::CancelStressEventRequest { event_id: 0, release_over_min: 0 }).await,
        ia,
        "event_id",
        "CancelStressEvent",
    );
    expect(
        op.cancel_stress_event(pb::CancelStressEventRequest { event_id: event, release_over_min: 99 }).await,
        ia,
        "release_over_min",
        "CancelStressEvent",
    );
    expect(op.watch_event(pb::WatchEventRequest { event_id: 0 }).await, ia, "event_id", "WatchEvent");
    expect(op.watch_event(pb::WatchEventRequest { event_id: 999 }).await, Code::NotFound, "event_id", "WatchEvent");
    expect(
        op.get_flexibility(pb::GetFlexibilityRequest {
            region: "nowhere".into(),
            horizon_min: 10,
            deferral_min_max: 0,
        })
        .await,
        ia,
        "region",
        "GetFlexibility",
    );
    expect(
        op.get_flexibility(pb::GetFlexibilityRequest { region: "_C".into(), horizon_min: 0, deferral_min_max: 0 })
            .await,
        ia,
        "horizon_min",
        "GetFlexibility",
    );
    expect(op.list_events(pb::ListEventsRequest { limit: 5000 }).await, ia, "limit", "ListEvents");

    let good = pb::Appliance {
        appliance_id: 77,
        household_id: 7,
        region: "_C".into(),
        class: pb::ApplianceClass::Freezer as i32,
        rated_power_w: 150,
        ..Default::default()
    };
    let enrols: Vec<(Vec<pb::Appliance>, &str)> = vec![
        (vec![], "appliances"),
        (vec![pb::Appliance { appliance_id: 0, ..good.clone() }], "appliances[0].appliance_id"),
        (vec![good.clone(), pb::Appliance { household_id: 0, ..good.clone() }], "appliances[1].household_id"),
        (vec![pb::Appliance { region: "_Z".into(), ..good.clone() }], "appliances[0].region"),
        (vec![pb::Appliance { class: 0, ..good.clone() }], "appliances[0].class"),
        (vec![pb::Appliance { class: 99, ..good.clone() }], "appliances[0].class"),
        (vec![pb::Appliance { rated_power_w: 0, ..good.clone() }], "appliances[0].rated_power_w"),
        (vec![pb::Appliance { duty_cycle_permille: 1001, ..good.clone() }], "appliances[0].duty_cycle_permille"),
        (vec![pb::Appliance { deferral_min_max: 999, ..good.clone() }], "appliances[0].deferral_min_max"),
    ];
    for (appliances, field) in enrols {
        expect(hh.enrol_appliances(pb::EnrolAppliancesRequest { appliances }).await, ia, field, "EnrolAppliances");
    }
    // Nothing of a refused batch was enrolled.
    expect(hh.get_limits(pb::GetLimitsRequest { household_id: 7 }).await, Code::NotFound, "household_id", "GetLimits");

    let limits = pb::Limits {
        events_per_day_max: 1,
        deferred_min_per_day_max: 30,
        deferral_min_max: 15,
        rest_min_min: 60,
        ..Default::default()
    };
    expect(
        hh.set_limits(pb::SetLimitsRequest { household_id: 0, limits: Some(limits.clone()) }).await,
        ia,
        "household_id",
        "SetLimits",
    );
    expect(hh.set_limits(pb::SetLimitsRequest { household_id: 1, limits: None }).await, ia, "limits", "SetLimits");
    let bad_window =
        pb::Limits { quiet_windows: vec![pb::QuietWindow { start_min: 2000, end_min: 10 }], ..limits.clone() };
    expect(
        hh.set_limits(pb::SetLimitsRequest { household_id: 1, limits: Some(bad_window) }).await,
        ia,
        "limits.quiet_windows[0].start_min",
        "SetLimits",
    );
    expect(
        hh.set_limits(pb::SetLimitsRequest {
            household_id: 1,
            limits: Some(pb::Limits { events_per_day_max: 100, ..limits.clone() }),
        })
        .await,
        ia,
        "limits.events_per_day_max",
        "SetLimits",
    );
    expect(
        hh.set_limits(pb::SetLimitsRequest { household_id: 555, limits: Some(limits.clone()) }).await,
        Code::NotFound,
        "household_id",
        "SetLimits",
    );
    expect(hh.get_limits(pb::GetLimitsRequest { household_id: 0 }).await, ia, "household_id", "GetLimits");
    expect(
        hh.r#override(pb::OverrideRequest { household_id: 0, appliance_id: 0 }).await,
        ia,
        "household_id",
        "Override",
    );
    expect(
        hh.r#override(pb::OverrideRequest { household_id: 1, appliance_id: 21 }).await,
        Code::NotFound,
        "appliance_id",
        "Override",
    );
    expect(hh.get_history(pb::GetHistoryRequest { household_id: 0, limit: 0 }).await, ia, "household_id", "GetHistory");
    expect(hh.get_history(pb::GetHistoryRequest { household_id: 1, limit: 100_000 }).await, ia, "limit", "GetHistory");

    expect(link.resync(pb::ResyncRequest { device_id: 0 }).await, ia, "device_id", "Resync");
    expect(link.resync(pb::ResyncRequest { device_id: 424242 }).await, Code::NotFound, "device_id", "Resync");
    let reports_first = pb::Uplink { msg: Some(pb::uplink::Msg::Reports(pb::ReportBatch::default())) };
    expect(link.attach(tokio_stream::iter(vec![reports_first])).await, ia, "hello", "Attach");
    let unknown = pb::Uplink {
        msg: Some(pb::uplink::Msg::Hello(pb::Hello { link_name: "x".into(), device_ids: vec![11, 999_999] })),
    };
    expect(link.attach(tokio_stream::iter(vec![unknown])).await, Code::NotFound, "hello.device_ids[1]", "Attach");
    let zero =
        pb::Uplink { msg: Some(pb::uplink::Msg::Hello(pb::Hello { link_name: "x".into(), device_ids: vec![0] })) };
    expect(link.attach(tokio_stream::iter(vec![zero])).await, ia, "hello.device_ids[0]", "Attach");

    // And the engine is still well: a valid call goes through.
    assert!(op.list_events(pb::ListEventsRequest { limit: 0 }).await.is_ok());
    running.stop().await;
}

const LONDON: &str = "london-token-0123456789";

fn authorised<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_without_authority_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.operators = vec![
        halftime::config::OperatorSection {
            name: "dno-london".into(),
            token: LONDON.into(),
            regions: vec!["_C".into()],
            target_mw_max: 1.0,
        },
        halftime::config::OperatorSection {
            name: "national".into(),
            token: "national-token-0123456789".into(),
            regions: vec![],
            target_mw_max: 3000.0,
        },
    ];
    let running = halftime::start(&config, dir.path(), "127.0.0.1:0".parse().unwrap(), clock()).await.unwrap();
    let url = running.url();
    enrol(&url, 2).await;
    let mut op = operator(&url).await;
    let pd = Code::PermissionDenied;
    expect(op.submit_stress_event(submit("a", vec![1.0], 10)).await, pd, "authorization", "no token");
    expect(
        op.submit_stress_event(authorised(submit("a", vec![1.0], 10), "nope")).await,
        pd,
        "authorization",
        "bad token",
    );
    let other_region = pb::SubmitStressEventRequest { regions: vec!["_A".into()], ..submit("b", vec![1.0], 10) };
    expect(op.submit_stress_event(authorised(other_region, LONDON)).await, pd, "regions", "other region");
    let too_big = submit("c", vec![5_000.0], 10);
    expect(op.submit_stress_event(authorised(too_big, LONDON)).await, pd, "target", "too big");
    let fine = op.submit_stress_event(authorised(submit("d", vec![1.0], 10), LONDON)).await;
    assert!(fine.is_ok(), "{fine:?}");
    let london_event = fine.unwrap().into_inner().event_id;
    // Another operator's event elsewhere may be neither updated nor cancelled from London.
    let elsewhere = pb::SubmitStressEventRequest { regions: vec!["_A".into()], ..submit("e", vec![1.0], 10) };
    let national =
        op.submit_stress_event(authorised(elsewhere, "national-token-0123456789")).await.unwrap().into_inner().event_id;
    let update = pb::UpdateStressEventRequest { event_id: national, target_kw: vec![1.0], ..Default::default() };
    expect(op.update_stress_event(authorised(update, LONDON)).await, pd, "regions", "update elsewhere");
    let cancel = pb::CancelStressEventRequest { event_id: national, release_over_min: 0 };
    expect(op.cancel_stress_event(authorised(cancel, LONDON)).await, pd, "regions", "cancel elsewhere");
    let too_big =
        pb::UpdateStressEventRequest { event_id: london_event, target_kw: vec![5_000.0], ..Default::default() };
    expect(op.update_stress_event(authorised(too_big, LONDON)).await, pd, "target", "update too big");
    let mine = pb::CancelStressEventRequest { event_id: london_event, release_over_min: 0 };
    assert!(op.cancel_stress_event(authorised(mine, LONDON)).await.is_ok());
    running.stop().await;
}
