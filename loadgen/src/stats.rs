//! Latency statistics: nearest-rank percentiles and a run summary.

use std::time::Duration;

/// A request slower than this is a stall.
pub const STALL: Duration = Duration::from_millis(100);

/// The `permille`-th percentile (e.g. 500 for p50, 990 for p99, 999 for
/// p99.9) of `sorted`, by the nearest-rank method: the smallest sample such
/// that at least `permille`/1000 of all samples are at or below it.
///
/// `None` for an empty slice. `sorted` must be in ascending order;
/// `permille` is clamped to 1..=1000.
#[must_use]
pub fn percentile(sorted: &[u64], permille: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u128;
    let p = u128::from(permille.clamp(1, 1000));
    // rank = ceil(p * n / 1000), in integers so that p99 of 100 samples is
    // the 99th, not the 100th through a rounding error.
    let rank = (p * n).div_ceil(1000).max(1);
    let index = usize::try_from(rank - 1).ok()?;
    sorted.get(index).copied()
}

/// What a measured run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Requests completed (answered correctly or not).
    pub requests: u64,
    /// Requests that failed or got a wrong answer.
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Slowest request.
    pub max: Duration,
    /// Requests slower than [`STALL`].
    pub stalls: u64,
}

impl Summary {
    /// Summarise per-request latencies in nanoseconds (any order).
    #[must_use]
    pub fn from_latencies(mut latencies_ns: Vec<u64>, errors: u64, elapsed: Duration) -> Self {
        latencies_ns.sort_unstable();
        let at = |permille| Duration::from_nanos(percentile(&latencies_ns, permille).unwrap_or(0));
        let stall_ns = u64::try_from(STALL.as_nanos()).unwrap_or(u64::MAX);
        Self {
            requests: latencies_ns.len() as u64,
            errors,
            elapsed,
            p50: at(500),
            p99: at(990),
            max: Duration::from_nanos(latencies_ns.last().copied().unwrap_or(0)),
            stalls: latencies_ns.iter().filter(|&&l| l > stall_ns).count() as u64,
        }
    }

    /// Correct answers per second of wall time.
    #[must_use]
    pub fn ok_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests.saturating_sub(self.errors) as f64 / secs
        } else {
            0.0
        }
    }
}

/// A duration as milliseconds with three decimals, for tables.
#[must_use]
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nearest_rank() {
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 500), Some(50));
        assert_eq!(percentile(&hundred, 990), Some(99));
        assert_eq!(percentile(&hundred, 999), Some(100));
        assert_eq!(percentile(&hundred, 1000), Some(100));
        assert_eq!(percentile(&hundred, 10), Some(1));
        // Out-of-range requests are clamped.
        assert_eq!(percentile(&hundred, 0), Some(1));
        assert_eq!(percentile(&hundred, 5000), Some(100));

        assert_eq!(percentile(&[], 500), None);
        assert_eq!(percentile(&[7], 500), Some(7));
        assert_eq!(percentile(&[7], 990), Some(7));
        // Textbook example: 15, 20, 35, 40, 50.
        let five = [15, 20, 35, 40, 50];
        assert_eq!(percentile(&five, 50), Some(15));
        assert_eq!(percentile(&five, 300), Some(20));
        assert_eq!(percentile(&five, 400), Some(20));
        assert_eq!(percentile(&five, 500), Some(35));
        assert_eq!(percentile(&five, 1000), Some(50));
        // p99 of 1000 samples is the 990th; of 1001 samples the 991st.
        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 990), Some(990));
        let more: Vec<u64> = (1..=1001).collect();
        assert_eq!(percentile(&more, 990), Some(991));
    }

    #[test]
    fn summary_counts_stalls_and_rate() {
        let ms_ns = 1_000_000;
        // Unsorted on purpose.
        let lat = vec![3 * ms_ns, ms_ns, 150 * ms_ns, 2 * ms_ns, 100 * ms_ns];
        let s = Summary::from_latencies(lat, 1, Duration::from_secs(2));
        assert_eq!(s.requests, 5);
        assert_eq!(s.errors, 1);
        assert_eq!(s.p50, Duration::from_millis(3));
        assert_eq!(s.p99, Duration::from_millis(150));
        assert_eq!(s.max, Duration::from_millis(150));
        // Exactly 100 ms is not a stall; more is.
        assert_eq!(s.stalls, 1);
        assert!((s.ok_per_second() - 2.0).abs() < 1e-9);

        let empty = Summary::from_latencies(Vec::new(), 0, Duration::ZERO);
        assert_eq!((empty.requests, empty.p99, empty.stalls), (0, Duration::ZERO, 0));
        assert!(empty.ok_per_second().abs() < f64::EPSILON);
        assert_eq!(ms(Duration::from_micros(1234)), "1.234");
    }
}
