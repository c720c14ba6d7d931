//! The saga participants: inventory, payment and shipping. Each is its own binary with its own
//! database; `common` holds the handler shell they share.

pub mod common;
pub mod inventory;
pub mod payment;
pub mod shipping;
