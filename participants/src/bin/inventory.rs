use clap::Parser;

use saga_participants::common::{self, Chaos, ChaosArgs};
use saga_participants::inventory::{Inventory, MIGRATOR, router};
use saga_shared_events::config::CommonArgs;

/// Inventory participant: stock reservations.
#[derive(Parser)]
#[command(name = "inventory", version)]
struct Settings {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    chaos: ChaosArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = Settings::parse();
    let chaos = Chaos::from_args(&s.chaos, None);
    common::main(
        s.common,
        &MIGRATOR,
        8081,
        Inventory::default(),
        chaos,
        router,
    )
    .await
}
