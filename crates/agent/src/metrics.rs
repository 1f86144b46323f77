//! Per-process metrics: the agent samples CPU, memory, egress and connections at a fixed
//! interval into `DIR/metrics` (one CSV line per sample, kept with the process's log), and the
//! API turns a time window of samples into Hathora's `{timestamp, value}` series.

use std::io::Write;
use std::path::Path;

pub const FILE: &str = "metrics";

/// One sample. Deltas cover the `interval_ms` before `at_ms`, so restarts of Lodge (which
/// reset its byte counters) never make totals go backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at_ms: i64,
    pub interval_ms: u64,
    pub cpu_ns: u64,
    pub rss_bytes: u64,
    pub egress_bytes: u64,
    pub active_connections: u64,
}

pub fn append(dir: &Path, s: &Sample) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(FILE))?;
    writeln!(
        f,
        "{},{},{},{},{},{}",
        s.at_ms, s.interval_ms, s.cpu_ns, s.rss_bytes, s.egress_bytes, s.active_connections
    )
}

fn parse(line: &str) -> Option<Sample> {
    let mut it = line.split(',');
    let mut next = || it.next()?.trim().parse::<i64>().ok();
    let at_ms = next()?;
    let mut u = || next().and_then(|v| u64::try_from(v).ok());
    Some(Sample {
        at_ms,
        interval_ms: u()?,
        cpu_ns: u()?,
        rss_bytes: u()?,
        egress_bytes: u()?,
        active_connections: u()?,
    })
}

/// Every sample of a process, oldest first (an absent file is no samples).
pub fn read(dir: &Path) -> Vec<Sample> {
    std::fs::read_to_string(dir.join(FILE))
        .map(|text| text.lines().filter_map(parse).collect())
        .unwrap_or_default()
}

pub use lodge_model::node::{MetricSeries as Series, Point};

/// Hathora's process metrics over `[start_s, end_s)` in buckets of `step_s` seconds, from the
/// samples.
pub fn series(samples: &[Sample], start_s: i64, end_s: i64, step_s: i64) -> Series {
    let mut out = Series::default();
    let step = step_s.max(1);
    let mut total_egress = 0u64;
    let mut i = 0;
    // Egress before the window still counts towards the total.
    while i < samples.len() && samples[i].at_ms < start_s * 1000 {
        total_egress += samples[i].egress_bytes;
        i += 1;
    }
    let mut bucket = start_s;
    while bucket < end_s && i < samples.len() {
        let bucket_end = (bucket + step).min(end_s);
        let (mut cpu, mut wall, mut rss, mut n, mut egress, mut peak) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        while i < samples.len() && samples[i].at_ms < bucket_end * 1000 {
            let s = &samples[i];
            cpu += s.cpu_ns;
            wall += s.interval_ms;
            rss += s.rss_bytes;
            egress += s.egress_bytes;
            peak = peak.max(s.active_connections);
            n += 1;
            i += 1;
        }
        if n > 0 {
            total_egress += egress;
            let secs = (wall as f64 / 1000.0).max(0.001);
            let round = |v: f64, places: i32| {
                let p = 10f64.powi(places);
                (v * p).round() / p
            };
            out.cpu.push((bucket, round(cpu as f64 / 1e9 / secs, 4)));
            out.memory
                .push((bucket, round(rss as f64 / n as f64 / (1024.0 * 1024.0), 2)));
            out.rate_egress
                .push((bucket, round(egress as f64 / secs, 2)));
            out.total_egress.push((bucket, total_egress as f64));
            out.active_connections.push((bucket, peak as f64));
        }
        bucket = bucket_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_s: i64, cpu_ms: u64, rss_mb: u64, egress: u64, active: u64) -> Sample {
        Sample {
            at_ms: at_s * 1000,
            interval_ms: 10_000,
            cpu_ns: cpu_ms * 1_000_000,
            rss_bytes: rss_mb << 20,
            egress_bytes: egress,
            active_connections: active,
        }
    }

    #[test]
    fn buckets_rates_and_totals() {
        let samples = [
            s(95, 0, 10, 500, 0), // before the window: only counts towards the total
            s(105, 5_000, 10, 1000, 1),
            s(115, 5_000, 30, 3000, 3),
            s(165, 10_000, 20, 0, 0),
            s(300, 1, 1, 1, 1), // after the window
        ];
        let out = series(&samples, 100, 220, 60);
        assert_eq!(out.cpu, vec![(100, 0.5), (160, 1.0)]);
        assert_eq!(out.memory, vec![(100, 20.0), (160, 20.0)]);
        assert_eq!(out.rate_egress, vec![(100, 200.0), (160, 0.0)]);
        assert_eq!(out.total_egress, vec![(100, 4500.0), (160, 4500.0)]);
        assert_eq!(out.active_connections, vec![(100, 3.0), (160, 0.0)]);
        assert_eq!(series(&samples, 400, 500, 60), Series::default());
    }

    #[test]
    fn the_file_round_trips_and_skips_torn_lines() {
        let dir = std::env::temp_dir().join(format!("lodge-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = s(1, 2, 3, 4, 5);
        append(&dir, &a).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(FILE))
            .and_then(|mut f| f.write_all(b"17,10\n"))
            .unwrap();
        append(&dir, &a).unwrap();
        assert_eq!(read(&dir), vec![a, a]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
