//! The order saga orchestrator.

pub mod saga;
