//! End-to-end tests: the real binaries against real Postgres and a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod auth;
mod database;
mod faults;
mod flows;
mod messaging;
mod nats_security;
mod observability;
mod schema;
