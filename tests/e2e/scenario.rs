//! The main job, `halftime scenario run`, runs to completion on a small population.

use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_scenario_runs_to_completion_within_every_limit() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/small.toml");
    let mut out = Vec::new();
    let report = halftime::scenario::run(&path, halftime::scenario::RunOptions::default(), &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(report.violations, 0, "{text}");
    assert!(report.n_appliances > 0 && !report.minutes.is_empty());
    assert!(text.contains("summary:"), "{text}");
    let plan = &report.events[0].1;
    assert!(plan.n_appliances > 0);
    // In every minute of the window the appliances really shed something, and the engine's estimate follows
    // what they shed.
    let window: Vec<_> = report.minutes.iter().filter(|m| m.target_mw > 0.0).collect();
    assert!(!window.is_empty());
    for m in &window {
        assert!(m.applied_mw > 0.0, "{text}");
        assert!((m.delivered_mw - m.applied_mw).abs() <= 0.25 * m.applied_mw + 1e-4, "{text}");
    }
}
