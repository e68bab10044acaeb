//! The registry: every sandbox this process runs, one [`Entry`] each.
//!
//! An entry's fields are private but for its id, which cannot change. Its
//! lifecycle state and its thermal state change only through
//! [`Entry::set_state`] and [`Entry::set_thermal`] (and `fail`,
//! `start_running`, `install_restored`), which enforce the tables in
//! [`crate::state`]: a transition the table forbids is a typed error
//! ([`CoreError::Transition`], [`CoreError::ThermalTransition`]) and
//! changes nothing.
//!
//! Each entry also carries the sandbox's lifecycle lock (create, boot,
//! stop, start, destroy and every thermal transition take it, so they are
//! serialised per sandbox) and a cancellation flag: a destroy raises it
//! before it waits for the lock, and a create or boot in progress watches
//! it and gives up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use agent_client::AgentClient;
use net::Attachment;
use tokio::sync::watch;

use crate::error::{CoreError, Result};
use crate::id::SandboxId;
use crate::machine::Vm;
use crate::record::{BootTimings, SandboxRecord};
use crate::state::{thermal_transition, transition, SandboxState, ThermalState};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One sandbox in the registry.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Readable by all; it cannot change (an `Entry` is only ever shared,
    /// behind an `Arc`, and has no setter).
    pub(crate) id: SandboxId,
    /// Serialises create, boot, stop, start, destroy and thermal
    /// transitions of this sandbox. The only lock held across `.await`.
    lifecycle: tokio::sync::Mutex<()>,
    record: Mutex<SandboxRecord>,
    /// The VM while there is a VMM (hot or warm); `None` while cold.
    vm: Mutex<Option<Vm>>,
    /// Host-side last use (Unix ms): every agent call touches it.
    last_activity_ms: AtomicU64,
    /// Host-side guest calls in flight (each holds a [`CallInFlight`]): a
    /// sandbox with one is busy whatever its idle time or its agent says —
    /// a call can take longer than `warm_after` before the agent counts it
    /// (connecting, authenticating on a loaded host).
    calls_in_flight: Arc<AtomicUsize>,
    /// While cold: the agent client of the VM that was snapshotted. Its
    /// idle connections are frozen in the snapshot with the guest and work
    /// again after the restore, which saves the first calls a TCP
    /// handshake and an auth round trip through a guest whose code is
    /// cold. A connection that turns out dead is replaced transparently.
    cold_client: Mutex<Option<AgentClient>>,
    /// Raised by destroy (and shutdown): a create or boot in progress
    /// gives up.
    cancel: watch::Sender<bool>,
}

impl Entry {
    /// An entry for `record` as it is (recovery: a cold sandbox).
    pub(crate) fn new(record: SandboxRecord) -> Entry {
        Entry {
            id: record.id.clone(),
            lifecycle: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            vm: Mutex::new(None),
            last_activity_ms: AtomicU64::new(now_unix_ms()),
            calls_in_flight: Arc::new(AtomicUsize::new(0)),
            cold_client: Mutex::new(None),
            cancel: watch::Sender::new(false),
        }
    }

    /// An entry for a sandbox about to be created or booted: `creating`,
    /// no VMM, and (once running) hot.
    pub(crate) fn creating(record: SandboxRecord) -> Entry {
        Entry::new(SandboxRecord {
            state: SandboxState::Creating,
            failure: None,
            vmm_pid: None,
            boot: None,
            thermal: ThermalState::Hot,
            thermal_since_unix_ms: now_unix_ms(),
            ..record
        })
    }

    // The lifecycle lock.

    /// Waits for the lifecycle lock.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().await
    }

    /// The lifecycle lock if nobody holds it.
    pub(crate) fn try_lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.lifecycle.try_lock().ok()
    }

    // Cancellation.

    /// Asks a create or boot in progress to give up.
    pub(crate) fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves once [`Entry::cancel`] was called (at once if it was).
    pub(crate) async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        // The sender lives as long as `self`, so this only returns Ok.
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    // Reading.

    /// A copy of the record.
    pub(crate) fn record(&self) -> SandboxRecord {
        lock(&self.record).clone()
    }

    /// Reads the record without copying it.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&SandboxRecord) -> R) -> R {
        f(&lock(&self.record))
    }

    pub(crate) fn state(&self) -> SandboxState {
        lock(&self.record).state
    }

    pub(crate) fn thermal(&self) -> ThermalState {
        lock(&self.record).thermal
    }

    // The tables.

    /// Moves the lifecycle to `to`, or fails with
    /// [`CoreError::Transition`] and changes nothing.
    pub(crate) fn set_state(&self, to: SandboxState) -> Result<()> {
        let mut r = lock(&self.record);
        r.state = transition(r.state, to).map_err(|source| CoreError::Transition {
            id: self.id.clone(),
            source,
        })?;
        tracing::info!(sandbox = %self.id, state = %to, "state");
        Ok(())
    }

    /// `running → failed` (or `destroying → failed`) with the reason, in
    /// one step.
    pub(crate) fn fail(&self, reason: String) -> Result<()> {
        let mut r = lock(&self.record);
        r.state =
            transition(r.state, SandboxState::Failed).map_err(|source| CoreError::Transition {
                id: self.id.clone(),
                source,
            })?;
        tracing::warn!(sandbox = %self.id, %reason, "failed");
        r.failure = Some(reason);
        Ok(())
    }

    /// Moves the thermal state to `to`, or fails with
    /// [`CoreError::ThermalTransition`] and changes nothing.
    pub(crate) fn set_thermal(&self, to: ThermalState) -> Result<()> {
        let mut r = lock(&self.record);
        r.thermal =
            thermal_transition(r.thermal, to).map_err(|source| CoreError::ThermalTransition {
                id: self.id.clone(),
                source,
            })?;
        r.thermal_since_unix_ms = now_unix_ms();
        Ok(())
    }

    // The other fields (no table governs them).

    pub(crate) fn set_network(&self, att: Option<Attachment>) {
        lock(&self.record).network = att;
    }

    pub(crate) fn set_vmm_pid(&self, pid: Option<u32>) {
        lock(&self.record).vmm_pid = pid;
    }

    pub(crate) fn set_breaker(&self, reason: Option<String>) -> Option<String> {
        std::mem::replace(&mut lock(&self.record).breaker, reason)
    }

    pub(crate) fn set_keep_hot(&self, keep_hot: bool) {
        lock(&self.record).keep_hot = keep_hot;
    }

    pub(crate) fn set_egress(&self, egress: net::Egress) {
        lock(&self.record).spec.egress = egress;
    }

    // The VM.

    pub(crate) fn vm(&self) -> Option<Vm> {
        lock(&self.vm).clone()
    }

    /// A booted VM: `creating → running`, hot, its pid and boot timings
    /// recorded. Refused (and nothing changed) unless the sandbox is
    /// `creating`.
    pub(crate) fn start_running(&self, vm: Vm, timings: BootTimings) -> Result<()> {
        {
            let mut r = lock(&self.record);
            r.state = transition(r.state, SandboxState::Running).map_err(|source| {
                CoreError::Transition {
                    id: self.id.clone(),
                    source,
                }
            })?;
            r.boot = Some(timings);
            r.vmm_pid = vm.vmm.pid();
            r.thermal = ThermalState::Hot;
            r.thermal_since_unix_ms = now_unix_ms();
        }
        *lock(&self.vm) = Some(vm);
        self.touch();
        tracing::info!(sandbox = %self.id, state = %SandboxState::Running, "state");
        Ok(())
    }

    /// A VM restored from cold: cold → hot, its pid recorded.
    pub(crate) fn install_restored(&self, vm: Vm) -> Result<()> {
        self.set_thermal(ThermalState::Hot)?;
        {
            let mut r = lock(&self.record);
            r.vmm_pid = vm.vmm.pid();
            r.cold_wakes += 1;
        }
        *lock(&self.vm) = Some(vm);
        Ok(())
    }

    /// Takes the VM out (its VMM is about to end); the pid is forgotten.
    pub(crate) fn take_vm(&self) -> Option<Vm> {
        let vm = lock(&self.vm).take();
        lock(&self.record).vmm_pid = None;
        vm
    }

    pub(crate) fn stash_cold_client(&self, client: AgentClient) {
        *lock(&self.cold_client) = Some(client);
    }

    pub(crate) fn take_cold_client(&self) -> Option<AgentClient> {
        lock(&self.cold_client).take()
    }

    // Activity.

    /// Records host-side use now.
    pub(crate) fn touch(&self) {
        self.last_activity_ms
            .store(now_unix_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last host-side use.
    pub(crate) fn idle_ms(&self) -> u64 {
        now_unix_ms().saturating_sub(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Marks a guest call in flight until the returned guard drops.
    pub(crate) fn begin_call(&self) -> CallInFlight {
        self.calls_in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        CallInFlight(self.calls_in_flight.clone())
    }

    /// Guest calls in flight now.
    pub(crate) fn calls_in_flight(&self) -> usize {
        self.calls_in_flight.load(Ordering::SeqCst)
    }
}

/// One host-side guest call in flight (see [`Entry::begin_call`]).
#[derive(Debug)]
pub(crate) struct CallInFlight(Arc<AtomicUsize>);

impl Clone for CallInFlight {
    fn clone(&self) -> CallInFlight {
        self.0.fetch_add(1, Ordering::SeqCst);
        CallInFlight(self.0.clone())
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every sandbox this process runs, by id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    map: Mutex<BTreeMap<SandboxId, Arc<Entry>>>,
}

impl Registry {
    pub(crate) fn get(&self, id: &SandboxId) -> Option<Arc<Entry>> {
        lock(&self.map).get(id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Entry>> {
        lock(&self.map).values().cloned().collect()
    }

    /// Adds `entry` unless its id is taken or, with `unique_names`, a
    /// sandbox of the registry has its name. One lock for check and insert.
    pub(crate) fn insert(&self, entry: Arc<Entry>, unique_names: bool) -> Result<()> {
        let mut map = lock(&self.map);
        if map.contains_key(&entry.id) {
            return Err(CoreError::IdTaken(entry.id.clone()));
        }
        if unique_names {
            let name = entry.read(|r| r.spec.name.clone());
            if map.values().any(|e| e.read(|r| r.spec.name == name)) {
                return Err(CoreError::NameTaken(name));
            }
        }
        map.insert(entry.id.clone(), entry);
        Ok(())
    }

    /// Removes `entry` (only that very entry: a new one under the same id
    /// stays).
    pub(crate) fn remove(&self, entry: &Entry) {
        let mut map = lock(&self.map);
        if map
            .get(&entry.id)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
        {
            map.remove(&entry.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SandboxSpec;
    use crate::state::{valid_thermal, valid_transition};
    use crate::Token;

    fn record(id: &str, name: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.parse().unwrap(),
            spec: SandboxSpec::new(name, "tiny"),
            state: SandboxState::Creating,
            failure: None,
            engine: vmm::EngineKind::QemuTcg,
            kernel_release: "6.1".into(),
            dir: format!("/d/sandboxes/{id}").into(),
            network: None,
            token: Token::generate().unwrap(),
            vmm_pid: Some(7),
            created_unix_ms: 0,
            boot: None,
            thermal: ThermalState::Cold,
            thermal_since_unix_ms: 0,
            keep_hot: false,
            breaker: None,
            cold_wakes: 0,
        }
    }

    fn entry_in(state: SandboxState, thermal: ThermalState) -> Entry {
        Entry::new(SandboxRecord {
            state,
            thermal,
            ..record("sb-000000000001", "a")
        })
    }

    const STATES: [SandboxState; 5] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Failed,
        SandboxState::Destroying,
        SandboxState::Destroyed,
    ];
    const THERMALS: [ThermalState; 3] = [ThermalState::Hot, ThermalState::Warm, ThermalState::Cold];

    #[test]
    fn every_lifecycle_transition_the_table_forbids_is_an_error_and_changes_nothing() {
        let mut refused = 0;
        for from in STATES {
            for to in STATES {
                let e = entry_in(from, ThermalState::Hot);
                match e.set_state(to) {
                    Ok(()) => {
                        assert!(valid_transition(from, to), "{from} -> {to} allowed");
                        assert_eq!(e.state(), to);
                    }
                    Err(CoreError::Transition { id, source }) => {
                        assert!(!valid_transition(from, to), "{from} -> {to} refused");
                        assert_eq!((source.from, source.to), (from, to));
                        assert_eq!(id, e.id);
                        assert_eq!(e.state(), from, "a refused transition changed the state");
                        refused += 1;
                    }
                    Err(other) => panic!("{from} -> {to}: {other:?}"),
                }
            }
        }
        assert_eq!(refused, 25 - 8);
    }

    #[test]
    fn every_thermal_transition_the_table_forbids_is_an_error_and_changes_nothing() {
        let mut refused = 0;
        for from in THERMALS {
            for to in THERMALS {
                let e = entry_in(SandboxState::Running, from);
                let since = e.read(|r| r.thermal_since_unix_ms);
                match e.set_thermal(to) {
                    Ok(()) => {
                        assert!(valid_thermal(from, to), "{from} -> {to} allowed");
                        assert_eq!(e.thermal(), to);
                        assert!(e.read(|r| r.thermal_since_unix_ms) > since);
                    }
                    Err(CoreError::ThermalTransition { source, .. }) => {
                        assert!(!valid_thermal(from, to), "{from} -> {to} refused");
                        assert_eq!((source.from, source.to), (from, to));
                        assert_eq!(e.thermal(), from);
                        assert_eq!(e.read(|r| r.thermal_since_unix_ms), since);
                        refused += 1;
                    }
                    Err(other) => panic!("{from} -> {to}: {other:?}"),
                }
            }
        }
        assert_eq!(refused, 4);
    }

    #[test]
    fn fail_and_start_running_go_through_the_table() {
        for from in STATES {
            let e = entry_in(from, ThermalState::Hot);
            let r = e.fail("why".into());
            assert_eq!(
                r.is_ok(),
                valid_transition(from, SandboxState::Failed),
                "{from}"
            );
            if r.is_ok() {
                assert_eq!(e.read(|r| r.failure.clone()).as_deref(), Some("why"));
            } else {
                assert_eq!(e.state(), from);
                assert_eq!(e.read(|r| r.failure.clone()), None);
            }
        }
    }

    #[test]
    fn a_creating_entry_starts_clean_and_hot() {
        let e = Entry::creating(SandboxRecord {
            state: SandboxState::Failed,
            failure: Some("old".into()),
            ..record("sb-000000000002", "b")
        });
        let r = e.record();
        assert_eq!(r.state, SandboxState::Creating);
        assert_eq!(r.thermal, ThermalState::Hot);
        assert_eq!((r.failure, r.vmm_pid), (None, None));
    }

    #[test]
    fn take_vm_forgets_the_pid() {
        let e = entry_in(SandboxState::Running, ThermalState::Hot);
        assert!(e.take_vm().is_none());
        assert_eq!(e.read(|r| r.vmm_pid), None);
    }

    #[tokio::test]
    async fn cancellation_wakes_a_waiter_and_sticks() {
        let e = Arc::new(entry_in(SandboxState::Creating, ThermalState::Hot));
        assert!(!e.is_cancelled());
        let waiter = tokio::spawn({
            let e = e.clone();
            async move { e.cancelled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        e.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter woke")
            .unwrap();
        assert!(e.is_cancelled());
        // Already cancelled: resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), e.cancelled())
            .await
            .expect("at once");
    }

    #[test]
    fn the_registry_refuses_a_taken_id_or_name_and_removes_only_its_entry() {
        let reg = Registry::default();
        let a = Arc::new(Entry::new(record("sb-000000000001", "a")));
        reg.insert(a.clone(), true).unwrap();
        let same_id = Arc::new(Entry::new(record("sb-000000000001", "z")));
        assert!(matches!(
            reg.insert(same_id.clone(), true),
            Err(CoreError::IdTaken(_))
        ));
        let same_name = Arc::new(Entry::new(record("sb-000000000002", "a")));
        assert!(matches!(
            reg.insert(same_name.clone(), true),
            Err(CoreError::NameTaken(n)) if n == "a"
        ));
        // Names may repeat when the caller (the daemon) scopes them.
        reg.insert(same_name, false).unwrap();
        assert_eq!(reg.all().len(), 2);
        // An entry that is not the registered one removes nothing.
        reg.remove(&same_id);
        assert!(reg.get(&a.id).is_some());
        reg.remove(&a);
        assert!(reg.get(&a.id).is_none());
        assert_eq!(reg.all().len(), 1);
    }
}
