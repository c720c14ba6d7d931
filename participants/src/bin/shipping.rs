use clap::Parser;

use saga_participants::common::{self, Chaos, ChaosArgs};
use saga_participants::shipping::{MIGRATOR, Shipping, router};
use saga_shared_events::config::{CommonArgs, parse_rate};

/// Shipping participant: shipments.
#[derive(Parser)]
#[command(name = "shipping", version)]
struct Settings {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    chaos: ChaosArgs,
    /// Probability that a shipment succeeds (0.0 to 1.0).
    #[arg(long, env = "SHIPPING_SUCCESS_RATE", default_value = "1.0", value_parser = parse_rate)]
    shipping_success_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = Settings::parse();
    let chaos = Chaos::from_args(&s.chaos, Some(s.shipping_success_rate));
    common::main(s.common, &MIGRATOR, 8083, Shipping, chaos, router).await
}
