//! Standard gRPC tools work against the server: health checking and server reflection (what grpcurl uses).

use crate::harness::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), clock()).await;
    let url = running.url();
    let channel = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["halftime.v1.GridOperator", "halftime.v1.Household", "halftime.v1.DeviceLink"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let symbol = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("halftime.v1.SubmitStressEventRequest".into())),
    };
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter(vec![list, symbol])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(services)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    for want in ["halftime.v1.GridOperator", "halftime.v1.Household", "halftime.v1.DeviceLink", "grpc.health.v1.Health"]
    {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(file)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor for a halftime message")
    };
    assert!(!file.file_descriptor_proto.is_empty());
    running.stop().await;
}

/// Metrics are per batch with bounded labels: the series an operator's dashboard needs exist, and no label
/// value is a household or device id. (The only test in this binary that installs the global recorder.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_per_batch_and_carry_no_ids() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
    let world = World::new(8).await;
    let link = world.gateway(&world.devices, halftime_client::DevicePolicy::default(), None).await;
    let mut op = operator(&world.url).await;
    let r = op.submit_stress_event(submit("metrics", vec![0.5; 5], 10)).await.unwrap().into_inner();
    let mut watch =
        op.watch_event(halftime_proto::pb::WatchEventRequest { event_id: r.event_id }).await.unwrap().into_inner();
    watch_until(&mut watch, "a deferral to start", |p| p.started >= 1).await;
    // Give the tick a moment to set the gauges for the current minute.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let text = handle.render();
    for series in [
        "halftime_events_submitted_total",
        "halftime_commands_signed_total",
        "halftime_device_reports_total{status=\"started\"}",
        "halftime_device_reports_total{status=\"received\"}",
        "halftime_submit_seconds",
        "halftime_lp_solve_seconds",
        "halftime_delivered_mw",
        "halftime_target_mw",
        "halftime_headend_links",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    let ids: std::collections::HashSet<String> =
        world.devices.iter().flat_map(|(d, _)| [d.to_string(), (d / 10).to_string()]).collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some(labels) = line.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map(|(l, _)| l) {
            // `quantile` and `le` are the exporter's own numeric labels; every other label is the engine's.
            let ours =
                labels.split(',').filter_map(|kv| kv.split_once('=')).filter(|(k, _)| *k != "quantile" && *k != "le");
            for (key, value) in ours {
                assert!(!ids.contains(value.trim_matches('"')), "an id in metric label {key}: {line}");
            }
        }
    }
    link.shutdown().await;
    world.running.stop().await;
}
