//! The bhatti orchestrator core (work in progress).
