//! The load generator end to end: a real engine on a loopback port, gateways on the `DeviceLink` protocol
//! that verify every signature, events submitted over gRPC, every headline figure measured.

use halftime::bench::{BenchOptions, Measurement, run};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_measures_every_headline_figure() {
    let opts = BenchOptions {
        n_appliances: vec![3_000],
        gateways: 3,
        repetitions: 2,
        target_share: 0.25,
        rate_per_s: 4.0,
        loaded_s: 1.0,
        population: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/wc2018-col-eng-halftime.toml"),
        verify: true,
        server: None,
        trust_key: None,
    };
    let mut got: Vec<Measurement> = Vec::new();
    run(&opts, |m| got.push(m.clone())).await.expect("the load generator runs");
    let find = |name: &str| got.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no {name} in {got:?}"));
    for name in ["submit_rpc", "plan_ready", "submit_to_all_queued", "ack_50pct", "ack_99pct", "grpc_floor"] {
        let m = find(name);
        assert_eq!((m.unit, m.n_appliances), ("ms", 3_000), "{m:?}");
        let (p50, p99) = (m.p50.unwrap(), m.p99.unwrap());
        assert!(p50 > 0.0 && p50 <= p99, "{m:?}");
    }
    assert_eq!(find("submit_rpc").n_samples, 2);
    assert_eq!(find("submit_rpc_loaded").n_samples, 4);
    // Every command reached a gateway, verified, and was acknowledged: the wait would have failed otherwise.
    assert!(find("commands_per_event").value.unwrap() > 0.0);
    assert!(find("headend_throughput").value.unwrap() > 0.0);
    // Acknowledgement can only follow queueing, which follows the plan.
    assert!(find("ack_99pct").p50.unwrap() >= find("submit_to_all_queued").p50.unwrap());
    assert!(find("submit_to_all_queued").p50.unwrap() >= find("plan_ready").p50.unwrap());
    assert!(find("memory_per_appliance").value.is_some() && find("peak_rss").value.unwrap() > 0.0);
    let line = serde_json::to_value(find("headend_throughput")).unwrap();
    for key in ["name", "n_appliances", "unit", "p50", "p99", "value"] {
        assert!(line.get(key).is_some(), "{key} missing from {line}");
    }
}
