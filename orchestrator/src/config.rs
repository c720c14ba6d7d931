//! Orchestrator settings, from environment variables or flags.

use clap::Parser;

use saga_shared_events::config::CommonArgs;

/// Orchestrator settings. Invalid values stop the process naming the variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "orchestrator", version, about = "Order saga orchestrator")]
pub struct Settings {
    /// Connections and logging.
    #[command(flatten)]
    pub common: CommonArgs,
    /// How long a step's first send waits for its answer, in milliseconds.
    #[arg(long, env = "STEP_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub step_timeout_ms: u64,
    /// Sends of a forward command before the saga compensates with `timed_out`.
    #[arg(long, env = "STEP_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub step_max_attempts: u32,
    /// Sends of a compensation command before the saga is marked `failed`.
    #[arg(long, env = "COMPENSATION_MAX_ATTEMPTS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub compensation_max_attempts: u32,
    /// Base URL of the Jaeger UI, for `trace_url` in order responses.
    #[arg(long, env = "JAEGER_UI_URL")]
    pub jaeger_ui_url: Option<String>,
}

impl Settings {
    /// Default HTTP port.
    pub const DEFAULT_PORT: u16 = 8080;
}
