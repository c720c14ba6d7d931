use clap::Parser;

use saga_orchestrator::config::Settings;
use saga_orchestrator::startup::Application;
use saga_shared_events::{http::shutdown_on_signal, service, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let telemetry = telemetry::init("orchestrator", settings.common.log_format)?;
    let shutdown = shutdown_on_signal();
    let result = async {
        Application::build(settings, shutdown)
            .await?
            .run_until_stopped()
            .await
    }
    .await;
    let result = service::ended("orchestrator", result);
    telemetry.shutdown().await;
    Ok(result?)
}
