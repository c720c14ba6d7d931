//! The saga services' shared wire contract and messaging plumbing.
//!
//! `contract` is plain data with no I/O. The other modules are the mechanics every service uses
//! to speak it: the transactional outbox and its relay, the inbox, JetStream topology, the
//! consumer loop with dead-lettering, trace propagation, Postgres start-up, HTTP plumbing and
//! telemetry. Each concept lives here once.

pub mod auth;
pub mod config;
pub mod consumer;
pub mod contract;
pub mod db;
pub mod http;
pub mod inbox;
pub mod nats;
pub mod outbox;
pub mod propagation;
pub mod pull;
pub mod service;
pub mod telemetry;

pub use contract::*;

/// Every service (and `sagactl`) links this crate, so they all allocate with mimalloc: the
/// message path makes many small short-lived allocations, where glibc's allocator showed up in
/// profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
