//! What every service process does around its own logic: connect to Postgres (creating and
//! migrating its database) and NATS (creating the streams), run the outbox relay, serve HTTP with
//! health, readiness and metrics, and stop gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::CommonArgs;
use crate::http::{ReadyCheck, install_metrics, not_found_fallback, ops_router, track_metrics};
use crate::outbox::{Outbox, Relay};

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Postgres.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// NATS.
    #[error(transparent)]
    Nats(#[from] crate::nats::NatsError),
    /// Authentication settings.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
    /// SIGTERM or Ctrl-C arrived while the service was still waiting for Postgres or NATS.
    #[error("stopped by a signal before start-up finished")]
    Stopped,
    /// The HTTP listener.
    #[error("HTTP_ADDR: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How a service's run ended, logged: a signal that arrived during start-up is a clean stop,
/// like one that arrives later, not a failure.
pub fn ended(service: &str, result: Result<(), StartupError>) -> Result<(), StartupError> {
    match result {
        Err(StartupError::Stopped) => {
            tracing::info!("{service} stopped before start-up finished");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "{service} failed");
            Err(e)
        }
        Ok(()) => Ok(()),
    }
}

/// The connections and lifecycle of one service process.
#[derive(Clone)]
pub struct Runtime {
    /// The service's own database.
    pub pool: PgPool,
    /// The same database for the batch statements of consumers (and the orchestrator's intake):
    /// one connection per batch in flight, plus one ([`crate::db::batch_pool`]).
    pub batch_pool: crate::db::BatchPool,
    /// The NATS client.
    pub nats: async_nats::Client,
    /// JetStream on that client.
    pub js: jetstream::Context,
    /// Cancelled when the process should stop.
    pub shutdown: CancellationToken,
    /// The service name (logs, NATS client name).
    pub service: &'static str,
    /// The service's outbox (fast path plus relay).
    pub outbox: Outbox,
    /// Bearer-token verification (`None` with `AUTH_MODE=none`).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    limits: HttpLimits,
    /// Bound before anything else, so a taken port fails the start at once; `run` serves it.
    listener: Arc<std::sync::Mutex<Option<tokio::net::TcpListener>>>,
    addr: std::net::SocketAddr,
}

#[derive(Clone, Copy)]
struct HttpLimits {
    max_in_flight: usize,
    timeout: Duration,
}

/// Load shedding and a request timeout around the API: beyond `max_in_flight` requests, or past
/// the timeout, the answer is a `503` problem with `Retry-After` instead of a growing queue.
fn harden(api: Router, limits: &HttpLimits) -> Router {
    use tower::ServiceBuilder;
    let overload = |err: tower::BoxError| async move {
        if err.is::<tower::timeout::error::Elapsed>() {
            metrics::counter!("http_requests_timed_out_total").increment(1);
            crate::http::Problem::unavailable("the request took too long", 1)
        } else {
            metrics::counter!("http_requests_shed_total").increment(1);
            crate::http::Problem::unavailable("the service is saturated; retry shortly", 1)
        }
    };
    api.layer(
        ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(overload))
            .load_shed()
            .concurrency_limit(limits.max_in_flight)
            .timeout(limits.timeout),
    )
}

/// What a service connects to before it can start.
struct Backends {
    pool: PgPool,
    batch_pool: crate::db::BatchPool,
    nats: async_nats::Client,
    js: jetstream::Context,
}

impl Backends {
    /// Postgres (database created and migrated) and NATS (streams created or updated), each
    /// waited for up to a minute.
    async fn connect(
        service: &'static str,
        common: &CommonArgs,
        opts: sqlx::postgres::PgConnectOptions,
        migrator: &Migrator,
    ) -> Result<Self, StartupError> {
        let wait = Duration::from_secs(60);
        let pool = crate::db::connect(opts, migrator, common.db_pool_size, wait).await?;
        let batches = common
            .consumer_concurrency
            .div_ceil(common.consumer_batch.max(1));
        let batch_pool = crate::db::batch_pool(&pool, batches + 1);
        let nats = crate::nats::connect(&common.nats_url, service, &common.nats_auth, wait).await?;
        let js = jetstream::new(nats.clone());
        let clustered = nats.server_info().cluster.is_some_and(|c| !c.is_empty());
        // A fresh cluster may not have elected its JetStream leader yet: retry for a while.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match crate::nats::ensure_streams(&js, common.stream_replicas as usize, clustered).await
            {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "streams not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Backends {
            pool,
            batch_pool,
            nats,
            js,
        })
    }
}

impl Runtime {
    /// Binds the HTTP listener (`HTTP_ADDR`, else `0.0.0.0:default_port`), then connects
    /// everything a service needs; the database is created and migrated, the streams created or
    /// updated.
    pub async fn connect(
        service: &'static str,
        common: &CommonArgs,
        default_port: u16,
        migrator: &Migrator,
        shutdown: CancellationToken,
    ) -> Result<Self, StartupError> {
        let auth = crate::auth::Authenticator::from_args(&common.auth)?;
        let url = common.database_url_or_default(service);
        tracing::info!(service, settings = %common.describe(service), "starting");
        // Before the slow steps: a port conflict should stop the start in milliseconds, not after
        // a minute of waiting for Postgres or a JetStream leader.
        let addr = common.http_addr_or(default_port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let opts = crate::db::options(&url, service)?;
        // The signal handler replaces the default action of SIGTERM, so the waits for Postgres
        // and NATS below (up to a minute each) must give way to it themselves.
        let Backends {
            pool,
            batch_pool,
            nats,
            js,
        } = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(StartupError::Stopped),
            connected = Backends::connect(service, common, opts, migrator) => connected?,
        };
        let outbox = Outbox::new(
            pool.clone(),
            js.clone(),
            common.outbox_fast_path,
            shutdown.clone(),
        );
        Ok(Runtime {
            pool,
            batch_pool,
            nats,
            js,
            shutdown,
            service,
            outbox,
            auth,
            limits: HttpLimits {
                max_in_flight: common.http_max_in_flight as usize,
                timeout: Duration::from_millis(common.http_request_timeout_ms),
            },
            listener: Arc::new(std::sync::Mutex::new(Some(listener))),
            addr,
        })
    }

    /// Ready when Postgres answers, NATS is connected and the streams exist.
    pub fn ready_check(&self) -> ReadyCheck {
        let rt = self.clone();
        Arc::new(move || {
            let rt = rt.clone();
            Box::pin(async move {
                sqlx::query("select 1")
                    .execute(&rt.pool)
                    .await
                    .map_err(|e| format!("postgres: {e}"))?;
                if rt.nats.connection_state() != async_nats::connection::State::Connected {
                    return Err("nats: not connected".into());
                }
                crate::nats::check_streams(&rt.js)
                    .await
                    .map_err(|e| format!("nats: {e}"))
            })
        })
    }

    /// Serves `api` plus the operations routes on the bound listener, runs the outbox relay and
    /// the given background tasks, and on shutdown lets them finish (bounded) before returning.
    pub async fn run<F>(self, api: Router, tasks: Vec<F>) -> Result<(), StartupError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let addr = self.addr;
        let taken = self.listener.lock().map(|mut l| l.take()).ok().flatten();
        let listener = taken.ok_or(StartupError::Bind {
            addr,
            source: std::io::Error::other("the listener was already served"),
        })?;
        let metrics = install_metrics();
        let app = harden(api, &self.limits)
            .layer(crate::auth::layer(self.auth.clone()))
            .merge(ops_router(self.ready_check(), metrics))
            .fallback(not_found_fallback)
            .layer(axum::middleware::from_fn(track_metrics));

        let mut set = JoinSet::new();
        set.spawn(Relay::new(self.pool.clone(), self.js.clone()).run(self.shutdown.clone()));
        set.spawn(crate::outbox::watch_pending(
            self.pool.clone(),
            self.shutdown.clone(),
        ));
        set.spawn(crate::inbox::prune_periodically(
            self.pool.clone(),
            self.shutdown.clone(),
        ));
        for t in tasks {
            set.spawn(t);
        }
        tracing::info!(service = self.service, %addr, "listening");
        let shutdown = self.shutdown.clone();
        let served = crate::http::serve(listener, app, shutdown.clone()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
        shutdown.cancel();
        // In-flight handlers finish and the relay flushes; bounded so SIGTERM exits in time.
        let drained = tokio::time::timeout(Duration::from_secs(8), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("background tasks did not stop in time");
        }
        self.outbox.drain(Duration::from_secs(1)).await;
        if let Err(e) = self.nats.flush().await {
            tracing::warn!(error = %e, "NATS flush failed");
        }
        tracing::info!(service = self.service, "stopped");
        Ok(())
    }
}
