use clap::Parser;

use saga_participants::common::{self, Chaos, ChaosArgs};
use saga_participants::payment::{MIGRATOR, Payment, router};
use saga_shared_events::config::{CommonArgs, parse_rate};

/// Payment participant: charges and refunds.
#[derive(Parser)]
#[command(name = "payment", version)]
struct Settings {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    chaos: ChaosArgs,
    /// Probability that a charge succeeds (0.0 to 1.0).
    #[arg(long, env = "PAYMENT_SUCCESS_RATE", default_value = "1.0", value_parser = parse_rate)]
    payment_success_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = Settings::parse();
    let chaos = Chaos::from_args(&s.chaos, Some(s.payment_success_rate));
    common::main(s.common, &MIGRATOR, 8082, Payment, chaos, router).await
}
