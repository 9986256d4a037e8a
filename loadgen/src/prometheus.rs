//! Reading a Prometheus text exposition back: the services' `/metrics`
//! (or a `render_metrics` string), so that a benchmark can take the
//! difference of two scrapes.

use std::collections::BTreeMap;

/// The samples of one scrape, keyed by the series exactly as written
/// (`name` or `name{labels}`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples(BTreeMap<String, f64>);

impl Samples {
    /// Parse the text format; comments and lines that do not parse are
    /// skipped, and a timestamp after the value is ignored.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut out = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            // The series ends at the closing brace if there are labels
            // (label values may hold spaces), else at the first space.
            let split = match line.find('{') {
                Some(open) if line[..open].find(' ').is_none() => line[open..].find('}').map(|close| open + close + 1),
                _ => line.find(' '),
            };
            let Some(at) = split else { continue };
            let (series, rest) = line.split_at(at);
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            out.insert(series.to_owned(), value);
        }
        Self(out)
    }

    /// The value of `series` (`name` or `name{labels}` as the service
    /// writes it).
    #[must_use]
    pub fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// `series` in `self` minus in `earlier` (a missing sample counts 0).
    #[must_use]
    pub fn delta(&self, earlier: &Self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0) - earlier.get(series).unwrap_or(0.0)
    }

    /// The buckets of histogram `name` (`name_bucket{le="…"}`), as
    /// (upper bound, cumulative count) in increasing bound order, `+Inf`
    /// last. Only series whose only label is `le`.
    #[must_use]
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut out: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(series, value)| {
                let bound = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
                Some((bound, *value))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// Of a histogram's observations made between two scrapes, the upper
/// bound of the highest bucket that received any (`None` if none did).
#[must_use]
pub fn highest_bucket_between(earlier: &Samples, later: &Samples, name: &str) -> Option<f64> {
    let before = earlier.buckets(name);
    let mut highest = None;
    let mut below_now = 0.0;
    let mut below_then = 0.0;
    for (bound, now) in later.buckets(name) {
        let then = before.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, c)| *c);
        // Observations that landed in this bucket alone, in the interval.
        if (now - below_now) - (then - below_then) > 0.0 {
            highest = Some(bound);
        }
        below_now = now;
        below_then = then;
    }
    highest
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\nx_total{status=\"OK\"} 2\n\
        x_total{status=\"a b\"} 1 1700000000\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"4\"} 3\n\
        h_bucket{le=\"+Inf\"} 3\nh_sum 7.5\nh_count 3\ngarbage\nbad_value x\n";
    const B: &str =
        "x_total 10\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 5\nh_bucket{le=\"4\"} 7\nh_bucket{le=\"+Inf\"} 7\nh_sum 15\nh_count 7\n";

    #[test]
    fn parses_series_and_differences() {
        let a = Samples::parse(A);
        assert_eq!(a.get("x_total"), Some(3.0));
        assert_eq!(a.get("x_total{status=\"OK\"}"), Some(2.0));
        assert_eq!(a.get("x_total{status=\"a b\"}"), Some(1.0));
        assert_eq!(a.get("garbage"), None);
        assert_eq!(a.get("bad_value"), None);
        let b = Samples::parse(B);
        assert!((b.delta(&a, "x_total") - 7.0).abs() < 1e-9);
        assert!((b.delta(&a, "h_sum") - 7.5).abs() < 1e-9);
        assert!((b.delta(&a, "missing") - 0.0).abs() < 1e-9);
        assert_eq!(a.buckets("h"), vec![(1.0, 1.0), (2.0, 1.0), (4.0, 3.0), (f64::INFINITY, 3.0)]);
    }

    #[test]
    fn highest_bucket_of_an_interval() {
        let (a, b) = (Samples::parse(A), Samples::parse(B));
        // Between A and B: 4 new observations in (1, 2], 0 new in (2, 4].
        assert_eq!(highest_bucket_between(&a, &b, "h"), Some(2.0));
        assert_eq!(highest_bucket_between(&b, &b, "h"), None);
        // From nothing: everything in B counts.
        assert_eq!(highest_bucket_between(&Samples::default(), &b, "h"), Some(4.0));
        let c = Samples::parse("h_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 5\nh_bucket{le=\"4\"} 7\nh_bucket{le=\"+Inf\"} 8\n");
        assert_eq!(highest_bucket_between(&b, &c, "h"), Some(f64::INFINITY));
    }
}
