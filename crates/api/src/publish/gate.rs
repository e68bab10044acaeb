//! The public proxy's admission: how many sandboxes may be woken for
//! public requests at once, and how many requests each publication may
//! have in flight. Both answer at once (no queueing): a public caller who
//! is over a cap gets a 503 with `Retry-After` rather than a hung request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `max` sandboxes waking at once. Requests for a sandbox that is
/// already waking share its permit (core coalesces the wake itself), so a
/// burst of first requests to one cold sandbox costs one permit.
#[derive(Debug)]
pub struct WakeGate {
    permits: Arc<Semaphore>,
    waking: Mutex<HashMap<String, Weak<OwnedSemaphorePermit>>>,
}

/// Held while a request waits for its sandbox to wake.
pub type WakePermit = Arc<OwnedSemaphorePermit>;

impl WakeGate {
    pub fn new(max: usize) -> WakeGate {
        WakeGate {
            permits: Arc::new(Semaphore::new(max.max(1))),
            waking: Mutex::new(HashMap::new()),
        }
    }

    /// A permit to wake `sandbox`: the one its wake in progress holds, or a
    /// new one; `None` when `max` other sandboxes are waking.
    pub fn enter(&self, sandbox: &str) -> Option<WakePermit> {
        let mut waking = self.waking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = waking.get(sandbox).and_then(Weak::upgrade) {
            return Some(p);
        }
        let permit = Arc::new(self.permits.clone().try_acquire_owned().ok()?);
        waking.retain(|_, w| w.strong_count() > 0);
        waking.insert(sandbox.to_string(), Arc::downgrade(&permit));
        Some(permit)
    }
}

/// At most `max` requests in flight per publication.
#[derive(Debug)]
pub struct Inflight {
    max: usize,
    per: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Entries kept before idle ones are dropped.
const INFLIGHT_KEEP: usize = 1024;

impl Inflight {
    pub fn new(max: usize) -> Inflight {
        Inflight {
            max: max.max(1),
            per: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more request to `publication`, or `None` when it
    /// has `max` in flight.
    pub fn enter(&self, publication: &str) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut per = self.per.lock().unwrap_or_else(|p| p.into_inner());
            if per.len() >= INFLIGHT_KEEP && !per.contains_key(publication) {
                let max = self.max;
                per.retain(|_, s| s.available_permits() < max);
            }
            per.entry(publication.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max)))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_of_one_sandbox_share_a_permit_and_others_are_capped() {
        let g = WakeGate::new(2);
        let a1 = g.enter("a").unwrap();
        let a2 = g.enter("a").unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        let b = g.enter("b").unwrap();
        assert!(g.enter("c").is_none(), "two sandboxes are waking");
        assert!(g.enter("a").is_some(), "a third request for 'a' joins it");
        drop(a1);
        assert!(g.enter("c").is_none(), "'a' still waking for a2");
        drop(a2);
        let c = g.enter("c").unwrap();
        drop((b, c));
        assert!(g.enter("d").is_some());
    }

    #[test]
    fn inflight_is_per_publication() {
        let f = Inflight::new(2);
        let x1 = f.enter("x").unwrap();
        let _x2 = f.enter("x").unwrap();
        assert!(f.enter("x").is_none());
        assert!(f.enter("y").is_some());
        drop(x1);
        assert!(f.enter("x").is_some());
    }

    #[test]
    fn idle_inflight_entries_are_dropped() {
        let f = Inflight::new(1);
        let busy = f.enter("busy").unwrap();
        for i in 0..INFLIGHT_KEEP + 10 {
            drop(f.enter(&i.to_string()));
        }
        let n = f.per.lock().unwrap().len();
        assert!(n < INFLIGHT_KEEP, "{n}");
        assert!(f.enter("busy").is_none(), "the busy one was kept");
        drop(busy);
    }
}
