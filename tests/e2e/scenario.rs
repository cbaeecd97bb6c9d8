//! The main job, `halftime scenario run`, runs the small scenario to completion, and its report holds the
//! invariants: no limit violations, the engine never claims more than the appliances reported, the appliances
//! never shed more than they draw, and the files an operator looks at are written.

use halftime::scenario::RunOptions;
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_scenario_runs_to_completion_and_its_report_holds_the_invariants() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/small.toml");
    let out_dir = tempfile::tempdir().unwrap();
    let opts = RunOptions { out_dir: Some(out_dir.path().to_path_buf()), print_minutes: true, ..Default::default() };
    let mut out = Vec::new();
    let report = halftime::scenario::run(&path, opts, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(report.violations, 0, "{text}");
    assert!(report.n_appliances > 0 && !report.minutes.is_empty(), "{text}");
    assert!(text.contains("summary: small"), "{text}");
    assert_eq!(report.events.len(), 1);
    assert!(report.events[0].n_appliances > 0, "{text}");

    let window: Vec<_> = report.minutes.iter().filter(|m| m.target_mw > 0.0).collect();
    assert_eq!(window.len(), 10, "{text}");
    for m in &report.minutes {
        // The engine's estimate never exceeds what the appliances reported (1 % and 1 W of rounding).
        assert!(m.estimated_mw <= m.reported_mw * 1.01 + 1e-6, "{}: estimate above reports\n{text}", m.t);
        assert!(m.delivered_mw >= 0.0 && m.rebound_mw >= 0.0 && m.suppliable_mw >= 0.0, "{}", m.t);
    }
    for m in &window {
        assert!(m.shed_mw > 0.0, "{}: nothing shed\n{text}", m.t);
    }
    // Energy is conserved: what was shed is paid back, in the windows or after them.
    let shed = report.shed_mwh + report.shed_after_window_mwh;
    let paid = report.payback_mwh + report.payback_after_window_mwh;
    assert!((paid - shed).abs() <= 0.02 * shed, "shed {shed} paid {paid}");
    // The net figures follow from the gross ones.
    for m in &report.minutes {
        assert!((m.delivered_mw - m.rebound_mw - (m.shed_mw - m.payback_mw)).abs() < 1e-9, "{}", m.t);
    }
    // The one event's stretch is the whole run: its rebound is the run's.
    let e = &report.events[0];
    assert!(
        (e.rebound_peak_mw - report.rebound_peak_fraction * report.peak_delivered_mw).abs() < 1e-9
            && (e.rebound_peak_fraction - report.rebound_peak_fraction).abs() < 1e-9,
        "event {} MW {}, run {}\n{text}",
        e.rebound_peak_mw,
        e.rebound_peak_fraction,
        report.rebound_peak_fraction
    );
    assert!(report.jain_burden > 0.0 && report.jain_burden <= 1.0);
    assert!(report.latency_ms.plan_ready > 0.0 && report.latency_ms.all_queued >= report.latency_ms.plan_ready);
    assert!(report.latency_ms.ack_p99.is_some(), "no acknowledgements seen");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap()).unwrap();
    for key in [
        "scenario",
        "seed",
        "n_households",
        "n_appliances",
        "violations",
        "jain_burden",
        "burden_max_minutes",
        "overrides",
    ] {
        assert!(json.get(key).is_some(), "report.json lacks {key}");
    }
    let minute = &json["minutes"][0];
    for key in ["t", "baseline_mw", "target_mw", "delivered_mw", "rebound_mw", "suppliable_mw"] {
        assert!(minute.get(key).is_some(), "report.json minutes lack {key}");
    }
    for key in ["plan_ready", "all_queued", "ack_p50", "ack_p99"] {
        assert!(json["latency_ms"].get(key).is_some(), "report.json latency_ms lacks {key}");
    }
    // What the engine did on its own comes from its last WatchEvent update.
    for key in ["top_ups", "tail_top_ups", "guard_released"] {
        assert!(json["events"][0]["engine"][key].is_u64(), "report.json events lack engine.{key}");
    }
    // The run kept the clock going until the engine was done with every event.
    assert!(report.events.iter().all(|e| e.engine.closed), "an event still open when the run ended\n{text}");
    assert!(std::fs::read_to_string(out_dir.path().join("report.md")).unwrap().contains("## Fairness"));
    for plot in ["demand.svg", "target.svg", "burden.svg"] {
        let svg = std::fs::read_to_string(out_dir.path().join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text"), "{plot} has no labels");
    }
}

/// Every scenario shipped in `scenarios/` parses, its events expand, and its data files load.
#[test]
fn every_shipped_scenario_parses_and_its_data_loads() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let s = halftime_sim::Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let events = halftime::scenario::plan_events(&s, &dir).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(!events.is_empty(), "{}", path.display());
        for e in &events {
            assert!(e.target_mw.iter().any(|t| *t > 0.0), "{}: {} asks for nothing", path.display(), e.label);
        }
        if s.population.n_households <= 200_000 {
            let regions = halftime_core::RegionSet::gb_dno_areas();
            let population = halftime_sim::Population::generate(&s.population, &regions, s.seed).unwrap();
            let baseline = halftime::scenario::Baseline::load(&s, &dir, &population).unwrap();
            assert!(baseline.mw_at(events[0].start_unix_ms) > 0.0, "{}", path.display());
        }
        n += 1;
    }
    assert!(n >= 7, "{n} scenarios");
}

/// `scenario run --server`: the runner drives an engine it did not start, served on its own port with a drill
/// clock (`[clock]`), sets its devices' clock by the engine's, and still reports from what the appliances did.
/// A runner told the wrong clock speed, or without the operator's token, is refused before it submits anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_scenario_runs_against_a_served_engine_on_a_drill_clock() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/small.toml");
    let speed = 300.0;
    let mut config = halftime::config::Config::parse(&format!(
        "[engine]\nrebound_reference = \"peak_target\"\n\
         [clock]\nspeed = {speed}\nstart = \"2026-01-05T18:00:00Z\"\n\
         [[operators]]\nname = \"drill\"\ntoken = \"drill-token-0000000000\"\ntarget_mw_max = 10.0"
    ))
    .unwrap();
    config.fit_to_clock_speed(speed);
    let data_dir = tempfile::tempdir().unwrap();
    let served = halftime::start(&config, data_dir.path(), "127.0.0.1:0".parse().unwrap(), config.clock().unwrap())
        .await
        .unwrap();
    let remote = |speed: f64| RunOptions {
        server: Some(served.url()),
        trust_key: Some(hex::encode(served.engine.public_key())),
        token: Some("drill-token-0000000000".into()),
        speed: Some(speed),
        print_minutes: true,
        ..Default::default()
    };

    let mut out = Vec::new();
    let e = halftime::scenario::run(&path, remote(1.0), &mut out).await.unwrap_err();
    assert!(format!("{e:#}").contains("--speed"), "{e:#}");
    let e = halftime::scenario::run(&path, RunOptions { token: None, ..remote(speed) }, &mut out).await.unwrap_err();
    assert!(format!("{e:#}").contains("authorization"), "{e:#}");
    assert!(served.engine.list_events(10).is_empty(), "nothing is submitted before the clocks agree");

    let mut out = Vec::new();
    let report = halftime::scenario::run(&path, remote(speed), &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(&format!("engine {}", served.url())), "{text}");
    assert_eq!(report.violations, 0, "{text}");
    assert_eq!(report.events.len(), 1, "{text}");
    assert!(report.events[0].n_appliances > 0, "{text}");
    // The event ran on the engine's clock: its minutes are the engine's, and the devices shed in them.
    let window: Vec<_> = report.minutes.iter().filter(|m| m.target_mw > 0.0).collect();
    assert_eq!(window.len(), 10, "{text}");
    assert!(window[0].t.starts_with("2026-01-05T18:"), "{}", window[0].t);
    let shed_minutes = window.iter().filter(|m| m.shed_mw > 0.0).count();
    assert!(shed_minutes >= 9, "devices shed in {shed_minutes} of 10 minutes\n{text}");
    for m in &report.minutes {
        assert!(m.estimated_mw <= m.reported_mw * 1.01 + 1e-6, "{}: estimate above reports\n{text}", m.t);
    }
    served.stop().await;
}
