//! Wiring: settings to a running orchestrator.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use saga_shared_events::consumer;
use saga_shared_events::contract::STREAM_REPLY;
use saga_shared_events::nats::ConsumerSpec;
use saga_shared_events::service::{Runtime, StartupError};

use crate::config::Settings;
use crate::consumer::ReplyHandler;
use crate::http::{AppState, api_router};
use crate::saga::machine::Policy;
use crate::saga::store::{SagaStore, Timing};

/// The orchestrator's migrations (messaging tables, sagas).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orchestrator");

/// Durable consumer name of the reply consumer, shared by all replicas.
pub const REPLY_CONSUMER: &str = "orchestrator";

/// A connected orchestrator, ready to run.
pub struct Application {
    runtime: Runtime,
    settings: Settings,
    store: SagaStore,
}

impl Application {
    /// Connects to Postgres and NATS and prepares the schema and streams.
    pub async fn build(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Self, StartupError> {
        let runtime = Runtime::connect(
            "orchestrator",
            &settings.common,
            Settings::DEFAULT_PORT,
            &MIGRATOR,
            shutdown,
        )
        .await?;
        let mut store = SagaStore::new(
            runtime.pool.clone(),
            runtime.batch_pool.clone(),
            runtime.outbox.clone(),
            Policy {
                step_max_attempts: settings.step_max_attempts,
                compensation_max_attempts: settings.compensation_max_attempts,
            },
            Timing {
                step_timeout: Duration::from_millis(settings.step_timeout_ms),
            },
            settings.jaeger_ui_url.clone(),
        );
        // New orders that arrive together share a transaction. One batch in flight: the next one
        // gathers while it commits (paired runs: 3 % less CPU per saga than with two).
        store.start_intake(64, 1);
        Ok(Application {
            runtime,
            settings,
            store,
        })
    }

    /// Serves the API and runs the reply consumer, the deadline sweeper and the outbox relay
    /// until shutdown.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let rt = self.runtime;
        let spec = ConsumerSpec {
            stream: STREAM_REPLY.into(),
            durable: REPLY_CONSUMER.into(),
            filter_subject: "saga.reply.>".into(),
            max_deliver: self.settings.common.consumer_max_deliver as i64,
            ack_wait: Duration::from_secs(10),
            concurrency: self.settings.common.consumer_concurrency as usize,
            batch_size: self.settings.common.consumer_batch as usize,
        };
        let handler = Arc::new(ReplyHandler {
            store: self.store.clone(),
        });
        let js = rt.js.clone();
        let shutdown = rt.shutdown.clone();
        let consume: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move {
                if let Err(e) = consumer::run(js, spec, handler, shutdown.clone()).await {
                    tracing::error!(error = %e, "reply consumer stopped");
                    shutdown.cancel();
                }
            });
        let sweep = Box::pin(sweep_deadlines(
            self.store.clone(),
            Duration::from_millis(self.settings.step_timeout_ms),
            rt.shutdown.clone(),
        ));
        let api = api_router(AppState { store: self.store });
        rt.run(api, vec![consume, sweep]).await
    }
}

/// Fires `StepTimedOut` at sagas whose deadline passed. Every replica runs one; `skip locked`
/// keeps them apart.
async fn sweep_deadlines(store: SagaStore, step_timeout: Duration, shutdown: CancellationToken) {
    let interval = (step_timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        match store.sweep_due(200).await {
            Ok(n) if n > 0 => {
                tracing::debug!(count = n, "deadlines fired");
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "deadline sweep failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
