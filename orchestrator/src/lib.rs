//! The order saga orchestrator: REST API, the saga state machine and its Postgres store, the
//! reply consumer and the deadline sweeper.

pub mod audit;
pub mod config;
pub mod consumer;
pub mod http;
pub mod saga;
pub mod startup;
