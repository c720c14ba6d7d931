//! What the three participants share: the command handler shell (inbox, decision, reply via the
//! outbox, chaos knobs), chaos settings and the `/chaos` admin endpoint, and start-up.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use saga_shared_events::auth::{Admin, Authorized};
use saga_shared_events::config::{CommonArgs, parse_rate};
use saga_shared_events::consumer::{self, BatchWork, GroupCommit, HandlerError, Incoming};
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

/// A participant's business logic: decide the replies to a batch of commands inside the
/// transaction that also records their inbox entries and the replies.
pub trait Decide: Send + Sync + 'static {
    /// Which participant this is.
    const PARTICIPANT: Participant;

    /// Applies `commands` (each for a different order) with set-based statements, idempotently:
    /// a command seen before answers with the decision stored the first time. Returns one reply
    /// per command, or a per-command refusal (invalid content); `Err` fails the whole batch.
    fn decide(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        chaos: &Chaos,
    ) -> impl std::future::Future<Output = Result<Vec<Result<Body, HandlerError>>, HandlerError>> + Send;

    /// The fast path of a batch whose every reply follows from a decision made here, as on a
    /// first delivery: decide, turn the replies (one per command, in order) into messages with
    /// `messages`, then claim the decisions, record `inbox` and write the outbox row in one
    /// statement (see [`at_once_sql`]), outside any transaction. It fails with a write conflict,
    /// having written nothing, when a decision or a message was seen before; the batch then
    /// takes the transactional path ([`Decide::decide`]). `None`: no fast path for this batch.
    fn decide_at_once(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        chaos: &Chaos,
        at_once: &AtOnce<'_>,
    ) -> impl std::future::Future<Output = Option<Result<Vec<OutgoingMessage>, sqlx::Error>>> + Send
    {
        let _ = (conn, commands, chaos, at_once);
        async { None }
    }
}

/// True with probability `p`: always at 1 or more, never at 0 or less, without a draw then.
pub fn chance(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && rand::random_bool(p))
}

/// Turns a batch's replies, one per command in order, into the messages that carry them.
pub type ReplyMessages<'a> = dyn Fn(Vec<Body>) -> Vec<OutgoingMessage> + Sync + 'a;

/// What a [`Decide::decide_at_once`] writes besides its decisions: the batch's inbox entries and
/// the outbox row of its replies' messages.
pub struct AtOnce<'a> {
    /// The batch's message ids.
    pub inbox: &'a [Uuid],
    /// Where the replies go.
    pub outbox: &'a Outbox,
    /// Turns the replies into messages.
    pub messages: &'a ReplyMessages<'a>,
}

impl AtOnce<'_> {
    /// The end of every [`Decide::decide_at_once`]: `query` (an [`at_once_sql`] statement with
    /// its writes' parameters bound) gets the inbox entries and the outbox row of the replies'
    /// messages, and runs; each decision's `statuses` is counted in `metric` once it did.
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        query: sqlx::query::QueryAs<'_, sqlx::Postgres, (i64,), sqlx::postgres::PgArguments>,
        replies: Vec<Body>,
        metric: &'static str,
        statuses: &[&'static str],
    ) -> Result<Vec<OutgoingMessage>, sqlx::Error> {
        let messages = (self.messages)(replies);
        self.outbox
            .row(&messages)
            .bind(query.bind(self.inbox))
            .fetch_one(conn)
            .await?;
        for status in statuses {
            metrics::counter!(metric, "result" => *status).increment(1);
        }
        Ok(messages)
    }
}

/// The statement of a [`Decide::decide_at_once`]: `writes`, data-modifying CTEs with
/// parameters `$1` to `$n` that return one row per row written, of which `written` counts the
/// rows and `planned` the rows meant; then the inbox entries (`$n+1`), the outbox row (five
/// parameters from `$n+2`, bound with [`Outbox::row`]) and the check that every planned row was
/// written (no decision was claimed before) and every message was new.
pub fn at_once_sql(writes: &str, written: &str, planned: &str, n: usize) -> String {
    let inbox = n + 1;
    format!(
        "with {writes}, \
         i as (insert into processed_message (message_id) select unnest(${inbox}::uuid[]) \
           on conflict do nothing returning 1), \
         o as ({}) \
         select one_statement_check({written}, {planned}, \
                                    (select count(*) from i), cardinality(${inbox}::uuid[]))",
        saga_shared_events::outbox::OutboxRow::insert_sql(n + 2)
    )
}

/// [`at_once_sql`] for one claim statement, whose `$1` is the array of orders to claim.
pub fn claim_at_once_sql(claim: &str, n: usize) -> String {
    at_once_sql(
        &format!("c as ({claim})"),
        "(select count(*) from c)",
        "cardinality($1::uuid[])",
        n,
    )
}

/// The consumer handler wrapping a participant's `Decide`.
pub struct CommandHandler<D> {
    /// The runtime's batch pool.
    pool: saga_shared_events::db::BatchPool,
    outbox: Outbox,
    decide: D,
    chaos: ChaosHandle,
    /// Batches left to decide the transactional way after the fast path met a conflict.
    fast_path_pause: AtomicU32,
}

/// After a fast-path conflict, the next batches skip the fast path: replicas contending for the
/// same rows (inventory's hot products) would otherwise pay for a statement that aborts, then
/// for the transaction anyway, on nearly every batch.
const FAST_PATH_PAUSE: u32 = 16;

impl<D: Decide> GroupCommit for CommandHandler<D> {
    type Committed = ();

    fn pool(&self) -> &saga_shared_events::db::BatchPool {
        &self.pool
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn before(&self) {
        let chaos = current(&self.chaos);
        if chaos.latency_ms > 0 {
            let ms = chaos.latency_ms + rand::random_range(0..=chaos.latency_ms);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// The fast path first (decisions, inbox and outbox row in one statement); when there is
    /// none or it meets a command or decision seen before, a transaction of inbox, decisions
    /// and outbox. Commands of different orders share each statement; a batch holding the same
    /// order twice is refused, so its commands go one by one, in order.
    async fn work(
        &self,
        conn: &mut PgConnection,
        msgs: &[Incoming],
    ) -> Result<BatchWork<()>, HandlerError> {
        let chaos = current(&self.chaos);
        let mut outcomes: Vec<Result<(), HandlerError>> = msgs.iter().map(|_| Ok(())).collect();
        let mut todo = Vec::with_capacity(msgs.len());
        let mut orders = HashSet::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let env = &m.envelope;
            if env.body.order_id() != env.saga_id {
                outcomes[i] = Err(HandlerError::Permanent(
                    "payload order_id differs from saga_id".into(),
                ));
            } else if chance(chaos.error_rate) {
                outcomes[i] = Err(HandlerError::Transient("chaos: injected failure".into()));
            } else if !orders.insert(env.saga_id) {
                return Err(HandlerError::Transient("one order twice in a batch".into()));
            } else {
                todo.push(i);
            }
        }
        todo.sort_by_key(|&i| msgs[i].envelope.saga_id);
        if todo.is_empty() {
            return Ok(BatchWork {
                outcomes,
                messages: Vec::new(),
                committed: (),
            });
        }
        let ids: Vec<Uuid> = todo.iter().map(|&i| msgs[i].envelope.message_id).collect();
        {
            let commands: Vec<&Body> = todo.iter().map(|&i| &msgs[i].envelope.body).collect();
            let build = |replies: Vec<Body>| {
                let replies = todo.iter().copied().zip(replies).collect();
                self.reply_messages(msgs, replies, &chaos)
            };
            let paused = self
                .fast_path_pause
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            let fast = if paused {
                None
            } else {
                let at_once = AtOnce {
                    inbox: &ids,
                    outbox: &self.outbox,
                    messages: &build,
                };
                self.decide
                    .decide_at_once(conn, &commands, &chaos, &at_once)
                    .await
            };
            match fast {
                Some(Ok(messages)) => {
                    return Ok(BatchWork {
                        outcomes,
                        messages,
                        committed: (),
                    });
                }
                Some(Err(e)) if saga_shared_events::db::is_write_conflict(&e) => {
                    self.fast_path_pause
                        .store(FAST_PATH_PAUSE, Ordering::Relaxed);
                    tracing::debug!(error = %e, "seen or changed before; deciding in a transaction")
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        }

        let mut tx = conn.begin().await?;
        let mut new = inbox::record_many(&mut tx, &ids).await?;
        // Redeliveries of handled commands are acknowledged without a second reply.
        todo.retain(|&i| new.remove(&msgs[i].envelope.message_id));
        let commands: Vec<&Body> = todo.iter().map(|&i| &msgs[i].envelope.body).collect();
        let decisions = self.decide.decide(&mut tx, &commands, &chaos).await?;
        let mut replies = Vec::with_capacity(todo.len());
        let mut refused = Vec::new();
        for (&i, decision) in todo.iter().zip(decisions) {
            match decision {
                Ok(reply) => replies.push((i, reply)),
                Err(e) => {
                    refused.push(msgs[i].envelope.message_id);
                    outcomes[i] = Err(e);
                }
            }
        }
        let messages = self.reply_messages(msgs, replies, &chaos);
        // A refused command is dead-lettered; its replay must not look like a duplicate.
        inbox::forget(&mut tx, &refused).await?;
        self.outbox.enqueue(&mut tx, &messages).await?;
        tx.commit().await?;
        Ok(BatchWork {
            outcomes,
            messages,
            committed: (),
        })
    }
}

impl<D: Decide> CommandHandler<D> {
    /// The reply messages, each under a decision span of its command's trace (`replies` pairs
    /// a message's index in `msgs` with its reply); chaos may send one twice.
    fn reply_messages(
        &self,
        msgs: &[Incoming],
        replies: Vec<(usize, Body)>,
        chaos: &Chaos,
    ) -> Vec<OutgoingMessage> {
        let mut messages = Vec::with_capacity(replies.len());
        for (i, reply) in replies {
            let env = &msgs[i].envelope;
            // In the message's scope, which routes it (`telemetry::UNTRACED`).
            let span = msgs[i].span.in_scope(|| {
                tracing::info_span!(
                    "decide",
                    otel.name = tracing::field::Empty,
                    saga_id = %env.saga_id,
                    otel.status_code = tracing::field::Empty,
                    otel.status_description = tracing::field::Empty,
                )
            });
            saga_shared_events::telemetry::name_span(&span, || {
                format!("{} {}", D::PARTICIPANT.as_str(), env.body.message_type())
            });
            if let Body::InventoryRejected(r) | Body::PaymentDeclined(r) | Body::ShippingFailed(r) =
                &reply
            {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", r.reason.as_str());
            }
            let _entered = span.enter();
            let copies = if chance(chaos.duplicate_rate) { 2 } else { 1 };
            for _ in 0..copies {
                messages.push(OutgoingMessage::new(&Envelope::new(
                    env.saga_id,
                    Some(env.message_id),
                    reply.clone(),
                )));
            }
        }
        messages
    }
}

/// The decision of every order in `ids` after a claim statement: the rows it claimed as it
/// returned them, the others (decided by an earlier command) read back with `read_earlier`,
/// whose `$1` is the ids not claimed.
pub async fn with_earlier<D>(
    conn: &mut PgConnection,
    ids: &[Uuid],
    claimed: Vec<D>,
    key: fn(&D) -> Uuid,
    read_earlier: &'static str,
) -> Result<HashMap<Uuid, D>, sqlx::Error>
where
    D: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let mut decided: HashMap<Uuid, D> = claimed.into_iter().map(|d| (key(&d), d)).collect();
    let earlier: Vec<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| !decided.contains_key(id))
        .collect();
    if !earlier.is_empty() {
        let stored: Vec<D> = sqlx::query_as(read_earlier)
            .bind(&earlier)
            .fetch_all(&mut *conn)
            .await?;
        decided.extend(stored.into_iter().map(|d| (key(&d), d)));
    }
    Ok(decided)
}

/// A batch's answers once every command was looked at; one left unanswered is retried.
pub fn answers(out: Vec<Option<Result<Body, HandlerError>>>) -> Vec<Result<Body, HandlerError>> {
    out.into_iter()
        .map(|o| o.unwrap_or(Err(HandlerError::Transient("undecided".into()))))
        .collect()
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
    let rt = Runtime::connect(name, common, default_port, migrator, shutdown).await?;
    let chaos: ChaosHandle = Arc::new(RwLock::new(chaos));
    let handler = Arc::new(CommandHandler {
        pool: rt.batch_pool.clone(),
        outbox: rt.outbox.clone(),
        decide,
        chaos: chaos.clone(),
        fast_path_pause: AtomicU32::new(0),
    });
    let spec = ConsumerSpec {
        stream: STREAM_CMD.into(),
        durable: name.into(),
        filter_subject: D::PARTICIPANT.command_filter(),
        max_deliver: common.consumer_max_deliver as i64,
        ack_wait: Duration::from_secs(10),
        concurrency: common.consumer_concurrency as usize,
        batch_size: common.consumer_batch as usize,
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
    rt.run(router, vec![consume]).await
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
    let result = saga_shared_events::service::ended(name, result);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_draws_only_strictly_between_zero_and_one() {
        for _ in 0..100 {
            assert!(chance(1.0) && chance(2.0));
            assert!(!chance(0.0) && !chance(-1.0) && !chance(f64::NAN));
        }
        let hits = (0..10_000).filter(|_| chance(0.5)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
    }
}
