//! Prints the README's benchmark tables from measured results, so no figure is typed by hand:
//!
//! ```sh
//! cargo run -p halftime-benches --bin bench-table -- target/criterion target/bench/*.jsonl
//! ```
//!
//! The first argument is criterion's output directory (every `new/estimates.json` under it, median shown); the
//! rest are `halftime bench --json` outputs.

use anyhow::Context;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct BenchmarkId {
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
    /// `{"Elements": n}` where the benchmark counts elements.
    throughput: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Estimates {
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
}

#[derive(Deserialize, Clone)]
struct Measurement {
    name: String,
    n_appliances: u64,
    unit: String,
    p50: Option<f64>,
    p99: Option<f64>,
    value: Option<f64>,
    n_samples: usize,
    reference: Option<String>,
}

/// Every directory under `dir` holding a criterion `new/` result, at most `limit` deep.
fn result_dirs(dir: &Path, limit: u32, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if limit == 0 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") && path.join("estimates.json").is_file() {
            out.push(path);
        } else {
            result_dirs(&path, limit - 1, out)?;
        }
    }
    Ok(())
}

fn duration(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.2} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.1} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.1} µs", ns / 1e3),
        ns => format!("{ns:.0} ns"),
    }
}

fn rate(per_s: f64) -> String {
    match per_s {
        r if r >= 1e6 => format!("{:.2} M/s", r / 1e6),
        r if r >= 1e3 => format!("{:.0} k/s", r / 1e3),
        r => format!("{r:.0}/s"),
    }
}

fn number(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.3}") }
}

fn criterion_table(dir: &Path) -> anyhow::Result<String> {
    let mut dirs = Vec::new();
    result_dirs(dir, 6, &mut dirs)?;
    let mut rows = BTreeMap::new();
    for d in dirs {
        let id: BenchmarkId = serde_json::from_slice(&std::fs::read(d.join("benchmark.json"))?)
            .with_context(|| d.join("benchmark.json").display().to_string())?;
        let est: Estimates = serde_json::from_slice(&std::fs::read(d.join("estimates.json"))?)
            .with_context(|| d.join("estimates.json").display().to_string())?;
        let ns = est.median.point_estimate;
        let elements = id.throughput.as_ref().and_then(|t| t.get("Elements")).and_then(serde_json::Value::as_u64);
        let per_s = elements.map_or_else(String::new, |n| rate(n as f64 / (ns / 1e9)));
        let name = [Some(id.group_id.clone()), id.function_id, id.value_str].into_iter().flatten().collect::<Vec<_>>();
        rows.insert(name.join(" / "), (id.group_id, duration(ns), per_s));
    }
    let mut s = String::from("| bench | benchmark | median | throughput |\n|---|---|---:|---:|\n");
    for (name, (group, time, per_s)) in rows {
        let bench = match group.as_str() {
            g if g.starts_with("planner") => "planner",
            g if g.starts_with("store") => "store",
            g if g.starts_with("headend") => "headend",
            "whole_plan" | "dispatch" => "dispatch",
            g => g,
        };
        s.push_str(&format!("| `{bench}` | {name} | {time} | {per_s} |\n"));
    }
    Ok(s)
}

fn load_table(files: &[PathBuf]) -> anyhow::Result<String> {
    let all = measurements(files)?;
    let find = |name: &str, n: u64| all.iter().find(|m| m.name == name && m.n_appliances == n).cloned();
    let show = |m: &Measurement| {
        let mut parts = Vec::new();
        if let (Some(p50), Some(p99)) = (m.p50, m.p99) {
            parts.push(format!("p50 {} / p99 {}", number(p50), number(p99)));
        }
        if let Some(v) = m.value.filter(|_| m.p50.is_none() || m.name == "headend_throughput") {
            parts.push(number(v));
        }
        format!("{} {}", parts.join(", "), m.unit)
    };
    let mut s =
        String::from("| figure | appliances | measured | samples | reference (same run) |\n|---|---:|---|---:|---|\n");
    for m in &all {
        let reference = m
            .reference
            .as_deref()
            .and_then(|r| find(r, m.n_appliances).map(|r| format!("`{}`: {}", r.name, show(&r))))
            .unwrap_or_default();
        s.push_str(&format!("| `{}` | {} | {} | {} | {} |\n", m.name, m.n_appliances, show(m), m.n_samples, reference));
    }
    Ok(s)
}

/// The issue's targets for a 2-core machine beside what the load generator measured at each size.
fn targets_table(files: &[PathBuf]) -> anyhow::Result<String> {
    let all = measurements(files)?;
    // (label, measurement, target, which statistic)
    type Target = (&'static str, &'static str, &'static str, fn(&Measurement) -> Option<f64>);
    let targets: [Target; 5] = [
        ("plan ready (p99)", "plan_ready", "≤ 50 ms for 1 M", |m| m.p99),
        ("submit → all commands signed and queued (p99)", "submit_to_all_queued", "≤ 1 s for 1 M", |m| m.p99),
        ("`SubmitStressEvent` p99, unloaded", "submit_rpc", "≤ 1 ms", |m| m.p99),
        ("head-end delivery through gateway links (median)", "headend_throughput", "≥ 1 M commands/s", |m| m.value),
        ("hot memory per enrolled appliance", "memory_per_appliance", "≤ 100 bytes", |m| m.value),
    ];
    let mut s = String::from("| figure | target | measured (appliances: value) |\n|---|---|---|\n");
    for (label, name, target, pick) in targets {
        let measured: Vec<String> = all
            .iter()
            .filter(|m| m.name == name)
            .filter_map(|m| pick(m).map(|v| format!("{}: {} {}", m.n_appliances, number(v), m.unit)))
            .collect();
        let measured = if measured.is_empty() { "not measured".to_string() } else { measured.join("; ") };
        s.push_str(&format!("| {label} | {target} | {measured} |\n"));
    }
    Ok(s)
}

fn measurements(files: &[PathBuf]) -> anyhow::Result<Vec<Measurement>> {
    let mut all: Vec<Measurement> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            all.push(serde_json::from_str(line).with_context(|| format!("{}:{}", f.display(), i + 1))?);
        }
    }
    Ok(all)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (criterion, loads) = args.split_first().context("usage: bench-table CRITERION_DIR [BENCH.jsonl ...]")?;
    println!("{}", criterion_table(criterion)?);
    if !loads.is_empty() {
        println!("{}", targets_table(loads)?);
        println!("{}", load_table(loads)?);
    }
    Ok(())
}
