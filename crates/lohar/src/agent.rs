//! State shared by every connection: configuration, identity, activity
//! counters and the session registry.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::Activity;

use crate::auth::Pending;
use crate::config::AgentConfig;
use crate::identity::Identity;
use crate::session::Sessions;
use crate::spawner::Spawner;

#[derive(Debug)]
pub struct Agent {
    pub config: AgentConfig,
    pub identity: Identity,
    /// Replaced when a restored guest is told its new identity
    /// ([`crate::reidentify`]): the next handshake proves the new one.
    token: RwLock<Arc<[u8]>>,
    started: Instant,
    last_activity_ms: AtomicU64,
    /// Authenticated connections.
    pub connections: AtomicU32,
    /// Connections still in the handshake.
    pub pending: Pending,
    pub running_execs: AtomicU32,
    pub sessions: Sessions,
    /// Starts piped commands as the command user cheaply; `None` when
    /// commands run as the agent's own user (or the thread could not start).
    pub spawner: Option<Spawner>,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Agent {
    /// Must be called inside the runtime that will serve the agent.
    pub fn new(config: AgentConfig, identity: Identity, token: String) -> Arc<Agent> {
        let spawner = if identity.switch {
            match Spawner::start(&identity, tokio::runtime::Handle::current()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no spawner thread; commands start through fork");
                    None
                }
            }
        } else {
            None
        };
        Arc::new(Agent {
            spawner,
            config,
            identity,
            token: RwLock::new(Arc::from(token.into_bytes())),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(now_unix_ms()),
            connections: AtomicU32::new(0),
            pending: Pending::default(),
            running_execs: AtomicU32::new(0),
            sessions: Sessions::default(),
        })
    }

    /// The sandbox token now: the key of both handshake proofs. A
    /// handshake takes it once and uses that copy for both.
    pub fn token(&self) -> Arc<[u8]> {
        self.token
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the token: handshakes that start after this prove the new
    /// one; the old one stops working at once.
    pub fn set_token(&self, token: &str) {
        let new: Arc<[u8]> = Arc::from(token.as_bytes());
        *self
            .token
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = new;
    }

    /// Records activity now (a request, input or output).
    pub fn touch(&self) {
        self.last_activity_ms
            .store(now_unix_ms(), Ordering::Relaxed);
    }

    pub fn activity(&self) -> Activity {
        let (sessions, attached) = self.sessions.counts();
        Activity {
            last_activity_unix_ms: self.last_activity_ms.load(Ordering::Relaxed),
            sessions,
            attached,
            running_execs: self.running_execs.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// Decrements a counter when dropped.
#[derive(Debug)]
pub struct CountGuard<'a>(&'a AtomicU32);

impl<'a> CountGuard<'a> {
    pub fn new(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        CountGuard(counter)
    }

    /// Counts one more unless the counter is already at `max`.
    pub fn try_new(counter: &'a AtomicU32, max: usize) -> Option<Self> {
        let before = counter.fetch_add(1, Ordering::Relaxed);
        let guard = CountGuard(counter);
        ((before as usize) < max).then_some(guard)
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_count_guard_refuses_past_the_limit_and_undoes_itself() {
        let n = AtomicU32::new(0);
        let a = CountGuard::try_new(&n, 2).expect("first");
        let b = CountGuard::try_new(&n, 2).expect("second");
        assert!(CountGuard::try_new(&n, 2).is_none());
        assert_eq!(n.load(Ordering::Relaxed), 2);
        drop(a);
        assert!(CountGuard::try_new(&n, 2).is_some());
        drop(b);
        assert_eq!(n.load(Ordering::Relaxed), 0);
    }
}
