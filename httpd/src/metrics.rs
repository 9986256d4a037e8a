//! Prometheus text-format metrics with lock-free counters.
//!
//! The label sets are closed enums known at compile time, so every series
//! is an atomic in a fixed array: recording a request is a few relaxed
//! atomic adds, with no allocation and no lock on the request path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A latency histogram with [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of observations.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Append the `_bucket`, `_sum` and `_count` series of `name`, with
    /// `labels` (already formatted as `k="v"`, or empty) on each.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        render_buckets(out, name, labels, &LATENCY_BUCKETS, &self.buckets, sum);
    }
}

/// Append a histogram's `_bucket` (cumulative), `_sum` and `_count` series.
/// `counts` holds the non-cumulative count of each bound in `bounds`, then
/// of +Inf; `labels` is `k="v",…` or empty.
pub fn render_buckets<B: std::fmt::Display>(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[B],
    counts: &[AtomicU64],
    sum: impl std::fmt::Display,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0u64;
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
    }
    cumulative += counts.get(bounds.len()).map_or(0, |c| c.load(Ordering::Relaxed));
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

/// Append a `# HELP` and `# TYPE` header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A service's answers by outcome: `requests` (name, help), a counter per
/// `label` value, then `durations` (name, help), a latency histogram per
/// value, from the same histograms.
pub fn answers_by<'a>(
    out: &mut String,
    requests: (&str, &str),
    durations: (&str, &str),
    label: &str,
    rows: impl Iterator<Item = (&'a str, &'a Histogram)> + Clone,
) {
    header(out, requests.0, "counter", requests.1);
    for (value, h) in rows.clone() {
        let _ = writeln!(out, "{}{{{label}=\"{value}\"}} {}", requests.0, h.count());
    }
    header(out, durations.0, "histogram", durations.1);
    for (value, h) in rows {
        h.render(out, durations.0, &format!("{label}=\"{value}\""));
    }
}

/// Append a metric that has one unlabelled sample: its header and `value`.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_everything() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "result=\"ok\"");
        assert!(out.contains("x_seconds_bucket{result=\"ok\",le=\"0.00005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{result=\"ok\",le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{result=\"ok\",le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{result=\"ok\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count{result=\"ok\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum{result=\"ok\"} 60.00071"), "{out}");
        assert_eq!(h.count(), 3);
    }
}
