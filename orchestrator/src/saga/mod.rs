//! The saga: the pure machine and the Postgres-backed driver around it.

mod cache;
pub mod machine;
pub mod store;
