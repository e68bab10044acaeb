//! State shared by every connection: configuration, identity, activity
//! counters and the session registry.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::Activity;

use crate::config::AgentConfig;
use crate::identity::Identity;
use crate::session::Sessions;
use crate::spawner::Spawner;

#[derive(Debug)]
pub struct Agent {
    pub config: AgentConfig,
    pub identity: Identity,
    token: Vec<u8>,
    started: Instant,
    last_activity_ms: AtomicU64,
    pub connections: AtomicU32,
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

/// Compares in time that depends only on the lengths, not the contents.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
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
            token: token.into_bytes(),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(now_unix_ms()),
            connections: AtomicU32::new(0),
            running_execs: AtomicU32::new(0),
            sessions: Sessions::default(),
        })
    }

    pub fn token_matches(&self, presented: &str) -> bool {
        constant_time_eq(presented.as_bytes(), &self.token)
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
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
