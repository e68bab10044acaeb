//! Percentiles and the printed table.

use std::time::Duration;

/// Samples of one measured operation.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// Nearest-rank percentile, `p` in 0..=100.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// The samples, in the order taken.
    pub fn iter(&self) -> impl Iterator<Item = &Duration> {
        self.0.iter()
    }

    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// One table row: an operation and its baseline.
pub fn row(name: &str, measured: &Samples, baseline: &Samples) -> String {
    let ratio = measured.p50().as_secs_f64() / baseline.p50().as_secs_f64().max(1e-9);
    format!(
        "{name:<28} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {ratio:>6.2}",
        ms(measured.p50()),
        ms(measured.percentile(95.0)),
        ms(measured.percentile(99.0)),
        ms(baseline.p50()),
        ms(baseline.percentile(95.0)),
        ms(baseline.percentile(99.0)),
    )
}

pub fn header() -> String {
    format!(
        "{:<28} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>6}\n{}",
        "operation (ms)",
        "p50",
        "p95",
        "p99",
        "raw p50",
        "raw p95",
        "raw p99",
        "ratio",
        "-".repeat(100)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        assert_eq!(s.p50(), Duration::from_millis(50));
        assert_eq!(s.percentile(95.0), Duration::from_millis(95));
        assert_eq!(s.percentile(99.0), Duration::from_millis(99));
        assert_eq!(s.percentile(100.0), Duration::from_millis(100));
        assert_eq!(Samples::default().p50(), Duration::ZERO);
        let mut one = Samples::default();
        one.push(Duration::from_millis(7));
        assert_eq!(one.percentile(1.0), Duration::from_millis(7));
    }
}
