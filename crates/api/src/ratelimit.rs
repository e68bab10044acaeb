//! Per-user token buckets, one per request class.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a request costs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Create,
    Exec,
    Read,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Buckets of `per_min` tokens refilled continuously; a burst of up to a
/// minute's worth is allowed.
#[derive(Debug)]
pub struct RateLimiter {
    rates: HashMap<Class, u32>,
    buckets: Mutex<HashMap<(String, Class), Bucket>>,
}

impl RateLimiter {
    pub fn new(creates_per_min: u32, execs_per_min: u32, reads_per_min: u32) -> RateLimiter {
        RateLimiter {
            rates: HashMap::from([
                (Class::Create, creates_per_min),
                (Class::Exec, execs_per_min),
                (Class::Read, reads_per_min),
            ]),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn check(&self, user: &str, class: Class) -> Result<(), Duration> {
        self.check_at(user, class, Instant::now())
    }

    /// Forgets buckets that have refilled completely (the same as having
    /// none), so keys that come and go (public clients' addresses) do not
    /// pile up.
    pub fn prune(&self) {
        self.prune_at(Instant::now())
    }

    /// [`RateLimiter::prune`] once more than `n` buckets are held: for
    /// limiters without a pruning task.
    pub fn prune_over(&self, n: usize) {
        let held = self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len();
        if held > n {
            self.prune();
        }
    }

    fn prune_at(&self, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|(_, class), b| {
            let per_min = f64::from(self.rates[class].max(1));
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * per_min / 60.0 < per_min
        });
    }

    fn check_at(&self, user: &str, class: Class, now: Instant) -> Result<(), Duration> {
        let per_min = f64::from(self.rates[&class].max(1));
        let per_sec = per_min / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry((user.to_string(), class)).or_insert(Bucket {
            tokens: per_min,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(per_min);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refills() {
        let r = RateLimiter::new(2, 60, 60);
        let t0 = Instant::now();
        assert!(r.check_at("a", Class::Create, t0).is_ok());
        assert!(r.check_at("a", Class::Create, t0).is_ok());
        let wait = r.check_at("a", Class::Create, t0).unwrap_err();
        assert!(
            wait > Duration::from_secs(29) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        // Other users and classes have their own buckets.
        assert!(r.check_at("b", Class::Create, t0).is_ok());
        assert!(r.check_at("a", Class::Exec, t0).is_ok());
        assert!(r
            .check_at("a", Class::Create, t0 + Duration::from_secs(30))
            .is_ok());
        assert!(r
            .check_at("a", Class::Create, t0 + Duration::from_secs(30))
            .is_err());
    }

    #[test]
    fn prune_forgets_only_full_buckets() {
        let r = RateLimiter::new(2, 60, 60);
        let t0 = Instant::now();
        r.check_at("a", Class::Create, t0).unwrap();
        r.check_at("a", Class::Create, t0).unwrap();
        r.check_at("b", Class::Create, t0).unwrap();
        r.prune_at(t0 + Duration::from_secs(31));
        // b refilled (forgotten); a did not, and is still limited.
        assert_eq!(r.buckets.lock().unwrap().len(), 1);
        r.check_at("a", Class::Create, t0 + Duration::from_secs(31))
            .unwrap();
        assert!(r
            .check_at("a", Class::Create, t0 + Duration::from_secs(31))
            .is_err());
    }
}
