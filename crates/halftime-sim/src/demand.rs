//! Real GB demand: TV pickups (Gridwatch, ~5-minute samples) for targets and baselines, and the national
//! half-hourly series (NESO) for baselines, interpolated to one-minute slots.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use std::path::Path;

/// GB households, to scale national figures to a simulated population.
pub const GB_HOUSEHOLDS: f64 = 28_000_000.0;

#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    #[error("{path}: {reason}")]
    Data { path: String, reason: String },
    #[error("time {0:?}: expected ISO-8601 UTC like 2018-07-03T19:00:00Z")]
    Time(String),
}

pub fn parse_utc(s: &str) -> Result<i64, DemandError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .map(|t| t.and_utc().timestamp_millis())
        .map_err(|_| DemandError::Time(s.to_string()))
}

pub fn format_utc(unix_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(unix_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// One event's samples: (Unix ms, MW), sorted.
pub fn load_pickup(path: &Path, event_id: &str) -> Result<Vec<(i64, f64)>, DemandError> {
    let err = |reason: String| DemandError::Data { path: path.display().to_string(), reason };
    let mut rdr = csv::Reader::from_path(path).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (i, row) in rdr.records().enumerate() {
        let row = row.map_err(|e| err(e.to_string()))?;
        if row.get(0) != Some(event_id) {
            continue;
        }
        let t = parse_utc(row.get(1).unwrap_or("")).map_err(|e| err(format!("row {}: {e}", i + 2)))?;
        let mw: f64 =
            row.get(2).unwrap_or("").parse().map_err(|_| err(format!("row {}: demand_mw is not a number", i + 2)))?;
        out.push((t, mw));
    }
    if out.len() < 2 {
        return Err(err(format!("no samples for event {event_id:?}")));
    }
    out.sort_by_key(|s| s.0);
    Ok(out)
}

/// A column of the NESO historic demand file (`TIMESTAMP` in UK clock time, start of the settlement period),
/// as (Unix ms, MW) at the middle of each half hour, sorted. Rows the clock change makes ambiguous take the
/// earlier instant; empty cells (gaps in the source) are skipped, so readers interpolate across them.
pub fn load_national(path: &Path, column: &str) -> Result<Vec<(i64, f64)>, DemandError> {
    let err = |reason: String| DemandError::Data { path: path.display().to_string(), reason };
    let mut rdr = csv::Reader::from_path(path).map_err(|e| err(e.to_string()))?;
    let headers = rdr.headers().map_err(|e| err(e.to_string()))?.clone();
    let col = headers.iter().position(|h| h == column).ok_or_else(|| err(format!("no column {column:?}")))?;
    let mut out = Vec::new();
    for (i, row) in rdr.records().enumerate() {
        let row = row.map_err(|e| err(e.to_string()))?;
        let line = i + 2;
        let local = NaiveDateTime::parse_from_str(row.get(0).unwrap_or(""), "%Y-%m-%d %H:%M:%S")
            .map_err(|_| err(format!("row {line}: TIMESTAMP is not YYYY-MM-DD HH:MM:SS")))?;
        // A local time the spring clock change skips is read as GMT.
        let t = chrono_tz::Europe::London
            .from_local_datetime(&local)
            .earliest()
            .map_or_else(|| local.and_utc().timestamp_millis(), |t| t.timestamp_millis());
        let cell = row.get(col).unwrap_or("").trim();
        if cell.is_empty() {
            // A gap in the source (around clock changes): interpolated across.
            continue;
        }
        let mw: f64 = cell.parse().map_err(|_| err(format!("row {line}: {column} is not a number")))?;
        out.push((t + 15 * 60_000, mw));
    }
    if out.len() < 2 {
        return Err(err("fewer than two rows".into()));
    }
    out.sort_by_key(|s| s.0);
    Ok(out)
}

/// Linear interpolation of the samples at `t`.
pub fn demand_at(samples: &[(i64, f64)], t: i64) -> f64 {
    match samples.partition_point(|s| s.0 < t) {
        0 => samples[0].1,
        i if i == samples.len() => samples[samples.len() - 1].1,
        i => {
            let (a, b) = (samples[i - 1], samples[i]);
            a.1 + (b.1 - a.1) * (t - a.0) as f64 / (b.0 - a.0).max(1) as f64
        }
    }
}

/// Per-minute rise above the level at `from`, over `[from, to)`, in national MW.
pub fn pickup_rise_mw(samples: &[(i64, f64)], from: i64, to: i64) -> Vec<f64> {
    let base = demand_at(samples, from);
    (0..((to - from) / 60_000).max(0)).map(|m| (demand_at(samples, from + m * 60_000) - base).max(0.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_and_measures_the_rise() {
        let s = vec![(0, 100.0), (300_000, 150.0), (600_000, 120.0)];
        assert_eq!(demand_at(&s, 150_000), 125.0);
        assert_eq!(pickup_rise_mw(&s, 0, 600_000), vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 44.0, 38.0, 32.0, 26.0]);
        assert_eq!(parse_utc("2018-07-03T19:00:00Z").unwrap(), 1_530_644_400_000);
        assert_eq!(format_utc(1_530_644_400_000), "2018-07-03T19:00:00Z");
    }

    #[test]
    fn reads_national_demand_in_uk_clock_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nd.csv");
        let text = "TIMESTAMP,ND,TSD\n2018-07-03 20:00:00,30000.0,31000.0\n2018-07-03 20:30:00,32000.0,33000.0\n";
        std::fs::write(&path, text).unwrap();
        let s = load_national(&path, "ND").unwrap();
        // 20:00 BST is 19:00 UTC; each sample sits at the middle of its half hour.
        assert_eq!(s[0], (parse_utc("2018-07-03T19:15:00Z").unwrap(), 30000.0));
        assert_eq!(demand_at(&s, parse_utc("2018-07-03T19:30:00Z").unwrap()), 31000.0);
        let err = load_national(&path, "XX").unwrap_err().to_string();
        assert!(err.contains("no column \"XX\""), "{err}");
        std::fs::write(&path, format!("{text}2018-07-03 21:00:00,,\n")).unwrap();
        assert_eq!(load_national(&path, "ND").unwrap().len(), 2, "an empty cell is a gap");
        std::fs::write(&path, "TIMESTAMP,ND\n2018-07-03 20:00:00,lots\n").unwrap();
        let err = load_national(&path, "ND").unwrap_err().to_string();
        assert!(err.contains("row 2: ND is not a number"), "{err}");
    }
}
