//! The saga: the pure machine and the Postgres-backed driver around it.

pub mod machine;
pub mod store;
