//! What the three participants share: the command handler shell (inbox, decision, reply via the
//! outbox, chaos knobs), chaos settings and the `/chaos` admin endpoint, and start-up.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use saga_shared_events::auth::{Admin, Authorized};
use saga_shared_events::config::{CommonArgs, parse_rate};
use saga_shared_events::consumer::{self, Handler, HandlerError, Incoming};
use saga_shared_events::contract::{Body, Envelope, Participant, STREAM_CMD};
use saga_shared_events::http::{ApiJson, FieldError, Problem};
use saga_shared_events::nats::ConsumerSpec;
use saga_shared_events::outbox::{Outbox, OutgoingMessage};
use saga_shared_events::service::{Runtime, StartupError};
use saga_shared_events::{inbox, telemetry};

/// Fault injection for tests and chaos runs; defaults come from the environment, `PUT /chaos`
/// changes them at run time.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Probability that handling a command fails transiently (it is then redelivered).
    #[arg(long, env = "CHAOS_ERROR_RATE", default_value = "0", value_parser = parse_rate)]
    pub chaos_error_rate: f64,
    /// Probability that a reply is published twice.
    #[arg(long, env = "CHAOS_DUPLICATE_RATE", default_value = "0", value_parser = parse_rate)]
    pub chaos_duplicate_rate: f64,
    /// Added handler latency in milliseconds (with up to 100 % jitter).
    #[arg(long, env = "CHAOS_LATENCY_MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub chaos_latency_ms: u64,
}

/// Current chaos and outcome rates of a participant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chaos {
    /// See `CHAOS_ERROR_RATE`.
    pub error_rate: f64,
    /// See `CHAOS_DUPLICATE_RATE`.
    pub duplicate_rate: f64,
    /// See `CHAOS_LATENCY_MS`.
    pub latency_ms: u64,
    /// `PAYMENT_SUCCESS_RATE` or `SHIPPING_SUCCESS_RATE`; absent for inventory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
}

impl Chaos {
    /// From start-up settings.
    pub fn from_args(a: &ChaosArgs, success_rate: Option<f64>) -> Self {
        Chaos {
            error_rate: a.chaos_error_rate,
            duplicate_rate: a.chaos_duplicate_rate,
            latency_ms: a.chaos_latency_ms,
            success_rate,
        }
    }

    fn validate(&self, has_success_rate: bool) -> Result<(), Problem> {
        let mut errors = Vec::new();
        let rate_ok = |v: f64| (0.0..=1.0).contains(&v);
        if !rate_ok(self.error_rate) {
            errors.push(FieldError::new("error_rate", "must be 0.0 to 1.0"));
        }
        if !rate_ok(self.duplicate_rate) {
            errors.push(FieldError::new("duplicate_rate", "must be 0.0 to 1.0"));
        }
        if self.latency_ms > 60_000 {
            errors.push(FieldError::new("latency_ms", "must be 0 to 60000"));
        }
        match (self.success_rate, has_success_rate) {
            (Some(v), true) if !rate_ok(v) => {
                errors.push(FieldError::new("success_rate", "must be 0.0 to 1.0"))
            }
            (Some(_), false) => errors.push(FieldError::new(
                "success_rate",
                "this participant has no success rate",
            )),
            (None, true) => errors.push(FieldError::new("success_rate", "is required")),
            _ => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Problem::invalid(errors))
        }
    }
}

/// Shared, changeable chaos settings.
pub type ChaosHandle = Arc<RwLock<Chaos>>;

/// Reads the current settings (a poisoned lock still holds valid plain data).
pub fn current(chaos: &ChaosHandle) -> Chaos {
    *chaos.read().unwrap_or_else(|e| e.into_inner())
}

/// `GET /chaos` and `PUT /chaos`.
pub fn chaos_router(chaos: ChaosHandle) -> Router {
    Router::new()
        .route("/chaos", get(get_chaos).put(put_chaos))
        .with_state(chaos)
}

async fn get_chaos(_auth: Authorized<Admin>, State(chaos): State<ChaosHandle>) -> Json<Chaos> {
    Json(current(&chaos))
}

async fn put_chaos(
    _auth: Authorized<Admin>,
    State(chaos): State<ChaosHandle>,
    ApiJson(new): ApiJson<Chaos>,
) -> Result<Json<Chaos>, Problem> {
    let has_success_rate = current(&chaos).success_rate.is_some();
    new.validate(has_success_rate)?;
    *chaos.write().unwrap_or_else(|e| e.into_inner()) = new;
    tracing::info!(?new, "chaos settings changed");
    Ok(Json(new))
}

/// A participant's business logic: decide the reply to a command inside the transaction that
/// also records the inbox entry and the reply.
pub trait Decide: Send + Sync + 'static {
    /// Which participant this is.
    const PARTICIPANT: Participant;

    /// Whether several commands may share one transaction (only when their rows never overlap
    /// across orders).
    const BATCHES: bool = true;

    /// Applies `command` (idempotently: a repeat returns the stored decision) and returns the
    /// reply to send.
    fn decide(
        &self,
        conn: &mut PgConnection,
        command: &Body,
        chaos: &Chaos,
    ) -> impl std::future::Future<Output = Result<Body, HandlerError>> + Send;
}

/// The consumer handler wrapping a participant's `Decide`.
pub struct CommandHandler<D> {
    pool: sqlx::PgPool,
    outbox: Outbox,
    decide: D,
    chaos: ChaosHandle,
}

impl<D: Decide> CommandHandler<D> {
    /// Does one command's work inside `tx`; returns its replies, or `None` for a duplicate.
    async fn work(
        &self,
        tx: &mut sqlx::PgConnection,
        env: &Envelope,
        chaos: &Chaos,
    ) -> Result<Option<Vec<OutgoingMessage>>, HandlerError> {
        if env.body.order_id() != env.saga_id {
            return Err(HandlerError::Permanent(
                "payload order_id differs from saga_id".into(),
            ));
        }
        if !inbox::record(tx, env.message_id).await? {
            return Ok(None);
        }
        let span = tracing::info_span!(
            "decide",
            otel.name = %format!("{} {}", D::PARTICIPANT.as_str(), env.body.message_type()),
            saga_id = %env.saga_id,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let reply = {
            use tracing::Instrument;
            self.decide
                .decide(tx, &env.body, chaos)
                .instrument(span.clone())
                .await?
        };
        if let Body::InventoryRejected(r) | Body::PaymentDeclined(r) | Body::ShippingFailed(r) =
            &reply
        {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", r.reason.as_str());
        }
        let mut replies = vec![OutgoingMessage::new(&Envelope::new(
            env.saga_id,
            Some(env.message_id),
            reply.clone(),
        ))];
        if chaos.duplicate_rate > 0.0 && rand::random_bool(chaos.duplicate_rate) {
            replies.push(OutgoingMessage::new(&Envelope::new(
                env.saga_id,
                Some(env.message_id),
                reply,
            )));
        }
        self.outbox.enqueue(tx, &replies).await?;
        Ok(Some(replies))
    }
}

impl<D: Decide> Handler for CommandHandler<D> {
    /// Commands of different orders in one transaction, in order-id order; if anything fails,
    /// each command is retried on its own so one bad message cannot hold back the others.
    async fn handle_batch(&self, mut msgs: Vec<Incoming>) -> Vec<Result<(), HandlerError>> {
        use tracing::Instrument;
        let chaos = current(&self.chaos);
        if chaos.latency_ms > 0 {
            let ms = chaos.latency_ms + rand::random_range(0..=chaos.latency_ms);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut order: Vec<usize> = (0..msgs.len()).collect();
        order.sort_by_key(|i| msgs[*i].envelope.saga_id);
        let mut outcomes: Vec<Option<Result<(), HandlerError>>> =
            msgs.iter().map(|_| None).collect();
        let mut all_replies = Vec::new();
        let batch: Result<(), HandlerError> = async {
            let mut tx = self.pool.begin().await?;
            for &i in &order {
                // Injected before the work here, so the rest of the batch goes on.
                if chaos.error_rate > 0.0 && rand::random_bool(chaos.error_rate) {
                    outcomes[i] = Some(Err(HandlerError::Transient(
                        "chaos: injected failure".into(),
                    )));
                    continue;
                }
                let m = &msgs[i];
                match self
                    .work(&mut tx, &m.envelope, &chaos)
                    .instrument(m.span.clone())
                    .await
                {
                    Ok(replies) => {
                        all_replies.extend(replies.unwrap_or_default());
                        outcomes[i] = Some(Ok(()));
                    }
                    Err(HandlerError::Permanent(e)) if !is_db_error(&e) => {
                        // Decided before touching the database (validation): keep going.
                        outcomes[i] = Some(Err(HandlerError::Permanent(e)));
                    }
                    Err(e) => return Err(e),
                }
            }
            tx.commit().await?;
            Ok(())
        }
        .instrument(tracing::info_span!(
            "commit batch",
            db.system = "postgresql",
            messages = msgs.len()
        ))
        .await;
        match batch {
            Ok(()) => {
                self.outbox.publish_committed(all_replies);
                outcomes.into_iter().map(|o| o.unwrap_or(Ok(()))).collect()
            }
            Err(e) => {
                tracing::debug!(error = %e, "batch failed; handling its messages one by one");
                consumer::one_by_one(self, std::mem::take(&mut msgs)).await
            }
        }
    }

    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        use tracing::Instrument;
        let chaos = current(&self.chaos);
        if chaos.latency_ms > 0 {
            let ms = chaos.latency_ms + rand::random_range(0..=chaos.latency_ms);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut tx = self.pool.begin().await?;
        let Some(replies) = self.work(&mut tx, &msg.envelope, &chaos).await? else {
            tracing::debug!("duplicate command ignored");
            return Ok(());
        };
        if chaos.error_rate > 0.0 && rand::random_bool(chaos.error_rate) {
            // Injected after the work, before commit: the rollback must leave no trace.
            return Err(HandlerError::Transient("chaos: injected failure".into()));
        }
        tx.commit()
            .instrument(tracing::info_span!("commit", db.system = "postgresql"))
            .await?;
        self.outbox.publish_committed(replies);
        Ok(())
    }
}

fn is_db_error(e: &str) -> bool {
    e.starts_with("database")
}

/// Refuses a command meant for another participant (the subject filter should make it
/// impossible; a hand-made message may not).
pub fn wrong_command(participant: Participant, body: &Body) -> HandlerError {
    HandlerError::Permanent(format!(
        "{} cannot handle {}",
        participant.as_str(),
        body.message_type()
    ))
}

/// Runs a participant: connect, consume its commands, serve its API, until shutdown.
pub async fn run<D: Decide>(
    common: &CommonArgs,
    migrator: &'static sqlx::migrate::Migrator,
    default_port: u16,
    decide: D,
    chaos: Chaos,
    api: impl FnOnce(sqlx::PgPool) -> Router,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    let name = D::PARTICIPANT.as_str();
    let rt = Runtime::connect(name, common, migrator, shutdown).await?;
    let chaos: ChaosHandle = Arc::new(RwLock::new(chaos));
    let handler = Arc::new(CommandHandler {
        pool: rt.pool.clone(),
        outbox: rt.outbox.clone(),
        decide,
        chaos: chaos.clone(),
    });
    let spec = ConsumerSpec {
        stream: STREAM_CMD.into(),
        durable: name.into(),
        filter_subject: D::PARTICIPANT.command_filter(),
        max_deliver: common.consumer_max_deliver as i64,
        ack_wait: Duration::from_secs(10),
        concurrency: common.consumer_concurrency as usize,
        // Inventory locks shared product rows: batching its commands would invite deadlocks.
        batch_size: if D::BATCHES {
            common.consumer_batch as usize
        } else {
            1
        },
    };
    let js = rt.js.clone();
    let stop = rt.shutdown.clone();
    let consume = Box::pin(async move {
        if let Err(e) = consumer::run(js, spec, handler, stop.clone()).await {
            tracing::error!(error = %e, "command consumer stopped");
            stop.cancel();
        }
    }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let router = api(rt.pool.clone()).merge(chaos_router(chaos));
    let addr = common.http_addr_or(default_port);
    rt.run(addr, router, vec![consume]).await
}

/// The entry point every participant binary calls.
pub async fn main<D: Decide>(
    common: CommonArgs,
    migrator: &'static sqlx::migrate::Migrator,
    default_port: u16,
    decide: D,
    chaos: Chaos,
    api: impl FnOnce(sqlx::PgPool) -> Router,
) -> anyhow::Result<()> {
    let name = D::PARTICIPANT.as_str();
    let guard = telemetry::init(name, common.log_format)?;
    let shutdown = saga_shared_events::http::shutdown_on_signal();
    let result = run(
        &common,
        migrator,
        default_port,
        decide,
        chaos,
        api,
        shutdown,
    )
    .await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "{name} failed");
    }
    guard.shutdown().await;
    Ok(result?)
}

/// Validates a path id (1 to 64 characters).
pub fn check_path_id(id: &str) -> Result<(), Problem> {
    if (1..=64).contains(&id.chars().count()) {
        Ok(())
    } else {
        Err(Problem::not_found("no such resource"))
    }
}

/// Logs a database error and answers `503` (with `Retry-After`) without its cause.
pub fn internal(e: sqlx::Error) -> Problem {
    tracing::error!(error.cause_chain = ?e, "request failed");
    Problem::unavailable("database unavailable", 1)
}
