//! The saga driver: reads a batch of sagas, feeds the pure machine their events, and writes the
//! new states (checked against the versions read), their history rows and their outgoing
//! messages (outbox) in one statement.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use saga_shared_events::db::BatchPool;
use saga_shared_events::outbox::{Outbox, OutboxRow, OutgoingMessage};
use saga_shared_events::{
    Body, CancelReason, ChargePayment, Envelope, Line, OrderEvent, OrderRef, ReserveInventory,
    ShipOrder,
};

use super::cache::{Entry, SagaCache};
use super::machine::{self, Effect, Event, Policy, SagaEnd, State, Step};

/// Saga persistence failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such order (404).
    #[error("order {0} not found")]
    NotFound(Uuid),
    /// The same `Idempotency-Key` came with a different body (422).
    #[error("Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    /// The request does not fit the saga's state (409).
    #[error("{0}")]
    Conflict(String),
    /// Postgres.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// One order line as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Item {
    /// Product.
    pub product_id: String,
    /// Units.
    pub quantity: i64,
    /// Price per unit in minor units.
    pub unit_price_cents: i64,
}

/// A validated new order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// Who orders.
    pub customer_id: String,
    /// What.
    pub items: Vec<Item>,
}

impl NewOrder {
    /// Sum of quantity × unit price (bounded by validation far below `i64::MAX`).
    pub fn total_cents(&self) -> i64 {
        self.items
            .iter()
            .map(|i| i.quantity * i.unit_price_cents)
            .sum()
    }
}

/// One row of the transition history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Transition {
    /// Status before (null for the creation).
    pub from: Option<String>,
    /// Status after.
    pub to: String,
    /// The event that caused it.
    pub event: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderView {
    /// The order (and saga) id.
    pub id: Uuid,
    /// Who ordered.
    pub customer_id: String,
    /// What.
    pub items: Vec<Item>,
    /// Total in minor units.
    pub total_cents: i64,
    /// Saga status.
    pub status: String,
    /// Why it was cancelled or failed.
    pub cancel_reason: Option<String>,
    /// The reason in words.
    pub cancel_detail: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Transitions, oldest first (empty in lists).
    pub history: Vec<Transition>,
    /// The saga's trace id, when traced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// A link to the trace in Jaeger, when `JAEGER_UI_URL` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_url: Option<String>,
}

/// The result of `create`.
#[derive(Debug)]
pub enum Created {
    /// A new order was accepted.
    New(OrderView),
    /// The `Idempotency-Key` was seen before with the same body: the earlier order.
    Replayed(OrderView),
}

/// Timing of deadlines (the machine only counts attempts).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the first send of a step waits for its answer.
    pub step_timeout: Duration,
}

impl Timing {
    /// Deadline after the `attempt`-th send: exponential, with up to 20 % jitter so retries of
    /// many sagas spread out; forward steps cap at 16× and compensations at 60 s.
    pub fn deadline_after(&self, attempt: u32, compensating: bool) -> Duration {
        let factor = 1u32 << attempt.min(4);
        let mut d = self.step_timeout * factor;
        if compensating {
            d = d.min(Duration::from_secs(60).max(self.step_timeout));
        }
        let jitter = rand::random_range(0.0..0.2);
        d.mul_f64(1.0 + jitter)
    }
}

type SagaRow = (
    Uuid,
    Json<State>,
    String,
    i64,
    String,
    Json<Vec<Item>>,
    i64,
    Option<String>,
    Option<String>,
    f64,
    f64,
    Vec<Uuid>,
);

/// A new saga on its way to the batch writer, with where its answer goes.
type Intake = (NewSaga, oneshot::Sender<Result<Created, StoreError>>);

/// A new saga, decided and ready to be written.
struct NewSaga {
    order_id: Uuid,
    order: NewOrder,
    key: Option<String>,
    fingerprint: String,
    state: State,
    trace: BTreeMap<String, String>,
    deadline: Duration,
    messages: Vec<OutgoingMessage>,
}

impl NewSaga {
    /// The saga as its row is once written.
    fn loaded(&self) -> Loaded {
        Loaded {
            state: self.state.clone(),
            status: self.state.status().to_owned(),
            version: 0,
            customer_id: self.order.customer_id.clone(),
            items: self.order.items.clone(),
            total_cents: self.order.total_cents(),
            reason: None,
            detail: None,
            step_seconds: 0.0,
            saga_seconds: 0.0,
            changed: false,
            deadline: None,
            from_cache: true,
        }
    }
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// What a batch of events did: one result per event, and the messages of every transition,
/// already in the outbox, to publish after commit.
#[derive(Debug, Default)]
pub struct AppliedBatch {
    /// One result per event, in order (their `messages` moved to `outbox`).
    pub results: Vec<Result<Applied, StoreError>>,
    /// Every message of the batch, written to the outbox as one row.
    pub outbox: Vec<OutgoingMessage>,
}

/// The write of a batch in one statement: the replies' inbox entries, states (if unchanged since
/// read), history and the outbox row. `one_statement_check` aborts it whole when a saga changed
/// or a reply was recorded since the read, so it needs no transaction around it.
static WRITE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "with u as (update saga_order s set state = v.state::jsonb, status = v.status, \
           version = s.version + 1, \
           deadline_at = case v.mode when 1 then now() + make_interval(secs => v.ms / 1000) \
                                     when 2 then null else s.deadline_at end, \
           cancel_reason = v.reason, cancel_detail = v.detail, updated_at = now() \
           from unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int2[], $6::float8[], \
                       $7::text[], $8::text[]) as v(id, version, state, status, mode, ms, reason, detail) \
           where s.order_id = v.id and s.version = v.version returning s.order_id), \
         t as (insert into saga_transition (order_id, from_status, to_status, event) \
           select * from unnest($9::uuid[], $10::text[], $11::text[], $12::text[])), \
         o as ({}), \
         i as (insert into processed_message (message_id) select unnest($18::uuid[]) \
           on conflict do nothing returning 1) \
         select one_statement_check((select count(*) from u), cardinality($1::uuid[]), \
                                 (select count(*) from i), cardinality($18::uuid[]))",
        OutboxRow::insert_sql(13)
    )
});

/// New orders, their first history rows and, if every order was written (no idempotency key
/// taken meanwhile), the outbox row of their messages, in one statement.
static INSERT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "with o as (insert into saga_order (order_id, customer_id, items, total_cents, state, \
           status, trace_context, idempotency_key, request_fingerprint, deadline_at) \
           select id, customer, items::jsonb, total, state::jsonb, status, trace::jsonb, key, fp, \
                  now() + make_interval(secs => deadline) \
           from unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], \
                       $7::text[], $8::text[], $9::text[], $10::float8[]) \
                as t(id, customer, items, total, state, status, trace, key, fp, deadline) \
           on conflict (idempotency_key) where idempotency_key is not null do nothing \
           returning order_id, status, created_at), \
         h as (insert into saga_transition (order_id, from_status, to_status, event) \
           select order_id, null, status, 'order_created' from o), \
         m as ({}) \
         select order_id, created_at from o",
        OutboxRow::insert_sql_if(12, "(select count(*) from o) = $11::int8")
    )
});

/// One event for one saga, with the span its transition belongs under (the consumer span of
/// the message that carried it).
#[derive(Debug)]
pub struct SagaEvent {
    /// The saga.
    pub order_id: Uuid,
    /// What happened.
    pub event: Event,
    /// The message that carried it.
    pub causation_id: Option<Uuid>,
    /// Parent of the transition span.
    pub parent: tracing::Span,
}

/// A saga as read (with its version), changed in memory by a batch of events.
#[derive(Clone)]
struct Loaded {
    state: State,
    status: String,
    version: i64,
    customer_id: String,
    items: Vec<Item>,
    total_cents: i64,
    reason: Option<String>,
    detail: Option<String>,
    step_seconds: f64,
    saga_seconds: f64,
    changed: bool,
    /// `Some(Some(d))`: due in `d`; `Some(None)`: cleared; `None`: unchanged.
    deadline: Option<Option<Duration>>,
    /// Taken from the cache rather than read.
    from_cache: bool,
}

impl Loaded {
    fn from_cache(e: Entry<Loaded>) -> Self {
        Loaded {
            step_seconds: e.changed.elapsed().as_secs_f64(),
            saga_seconds: e.created.elapsed().as_secs_f64(),
            changed: false,
            deadline: None,
            from_cache: true,
            ..e.saga
        }
    }

    /// The saga as its row is once the batch's write committed (which bumped the version of
    /// every changed saga).
    fn into_cache(self) -> Entry<Loaded> {
        let step_seconds = if self.changed { 0.0 } else { self.step_seconds };
        let saga_seconds = self.saga_seconds;
        let saga = Loaded {
            version: self.version + i64::from(self.changed),
            changed: false,
            deadline: None,
            ..self
        };
        Entry::aged(saga, saga_seconds, step_seconds)
    }
}

/// History rows of a batch, as columns.
#[derive(Default)]
struct History {
    order_ids: Vec<Uuid>,
    from: Vec<String>,
    to: Vec<String>,
    event: Vec<&'static str>,
}

impl History {
    fn push(&mut self, order_id: Uuid, from: &str, to: &str, event: &'static str) {
        self.order_ids.push(order_id);
        self.from.push(from.to_owned());
        self.to.push(to.to_owned());
        self.event.push(event);
    }
}

/// What applying an event did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Status before.
    pub from: String,
    /// Status after.
    pub to: String,
    /// Whether the saga ended with this event.
    pub finished: Option<SagaEnd>,
    /// Whether anything changed (false for ignored late or duplicate events).
    pub changed: bool,
    /// The reply carrying the event was applied before (a redelivery or a second copy): the
    /// machine did not run.
    pub duplicate: bool,
    /// Seconds since the saga's previous change (the step's duration when the status moved).
    pub step_seconds: f64,
    /// Seconds since the saga was created.
    pub saga_seconds: f64,
    /// Messages written to the outbox, to publish once the transaction committed.
    pub messages: Vec<OutgoingMessage>,
}

impl Applied {
    /// The outcome of a reply applied before: nothing ran, nothing changed.
    fn duplicate() -> Self {
        Applied {
            from: String::new(),
            to: String::new(),
            finished: None,
            changed: false,
            duplicate: true,
            step_seconds: 0.0,
            saga_seconds: 0.0,
            messages: Vec::new(),
        }
    }

    /// Records the saga metrics; call after the transaction committed.
    pub fn record_metrics(&self) {
        if self.from != self.to {
            metrics::histogram!("saga_step_duration_seconds", "step" => step_name(&self.from))
                .record(self.step_seconds);
        }
        if let Some(end) = self.finished {
            let outcome = match end {
                SagaEnd::Completed => "shipped",
                SagaEnd::Cancelled => "cancelled",
                SagaEnd::Failed => "failed",
            };
            metrics::counter!("sagas_finished_total", "outcome" => outcome).increment(1);
            metrics::histogram!("saga_duration_seconds", "outcome" => outcome)
                .record(self.saga_seconds);
        }
    }
}

/// The step a status waits on, for the step-duration metric.
fn step_name(status: &str) -> &'static str {
    match status {
        "created" => "reserve",
        "inventory_reserved" => "charge",
        "paid" => "ship",
        "refunding_payment" => "refund",
        "releasing_inventory" => "release",
        _ => "other",
    }
}

/// The saga store and driver.
#[derive(Clone)]
pub struct SagaStore {
    pool: PgPool,
    /// Where batches of new orders and replies are written ([`saga_shared_events::db::batch_pool`]).
    batch_pool: BatchPool,
    outbox: Outbox,
    policy: Policy,
    timing: Timing,
    jaeger_ui_url: Option<String>,
    /// Where `create` hands new orders to the batch writer, once started.
    intake: Option<mpsc::Sender<Intake>>,
    /// Sagas in flight as this process last wrote them.
    cache: Arc<SagaCache<Loaded>>,
}

/// Sagas in flight the cache keeps at most (a few hundred bytes each for orders of a few
/// lines); beyond, they are read. At 1,700 sagas/s about 300 are in flight.
const CACHE_CAPACITY: usize = 20_000;

/// Gauge: new orders waiting for the intake (behind the batch being written).
const INTAKE_WAITING: &str = "orders_waiting_for_intake";

/// An order counted in [`INTAKE_WAITING`]: once queued, the intake uncounts it as it takes it;
/// before, dropping this does (the request gave up: client gone, timeout, shutting down).
struct Waiting(Option<metrics::Gauge>);

impl Waiting {
    fn count() -> Self {
        let gauge = metrics::gauge!(INTAKE_WAITING);
        gauge.increment(1.0);
        Waiting(Some(gauge))
    }

    fn queued(mut self) {
        self.0 = None;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(gauge) = self.0.take() {
            gauge.decrement(1.0);
        }
    }
}

impl SagaStore {
    /// A store over `pool`, writing batches through `batch_pool`.
    pub fn new(
        pool: PgPool,
        batch_pool: BatchPool,
        outbox: Outbox,
        policy: Policy,
        timing: Timing,
        jaeger_ui_url: Option<String>,
    ) -> Self {
        SagaStore {
            pool,
            batch_pool,
            outbox,
            policy,
            timing,
            jaeger_ui_url,
            intake: None,
            cache: Arc::new(SagaCache::new(CACHE_CAPACITY)),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool of the batch statements.
    pub fn batch_pool(&self) -> &BatchPool {
        &self.batch_pool
    }

    /// The outbox, to publish an `Applied`'s messages after commit.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Accepts an order and starts its saga. New orders that arrive together are written in one
    /// transaction (group commit: a few statements for the whole batch); the caller's answer
    /// comes after that commit. With an idempotency key, a repeat with the same body returns the
    /// first order; with another body, `IdempotencyMismatch`.
    pub async fn create(
        &self,
        order: &NewOrder,
        idempotency_key: Option<&str>,
    ) -> Result<Created, StoreError> {
        let fingerprint = serde_json::to_string(order).unwrap_or_default();
        if let Some(key) = idempotency_key
            && let Some(existing) = self.find_by_key(key, &fingerprint).await?
        {
            return Ok(Created::Replayed(existing));
        }
        let request = self.prepare(
            order.clone(),
            idempotency_key.map(str::to_owned),
            fingerprint,
        );
        let Some(intake) = &self.intake else {
            return self
                .create_many(vec![request])
                .await
                .pop()
                .unwrap_or_else(|| Err(StoreError::Conflict("order was not written".into())));
        };
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting::count();
        intake
            .send((request, reply))
            .await
            .map_err(|_| StoreError::Conflict("shutting down".into()))?;
        waiting.queued();
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Conflict("shutting down".into())))
    }

    /// Starts the task that writes new orders in batches; `create` uses it from then on. The
    /// orders queued for it while the batches in flight are written go together in the next one.
    pub fn start_intake(&mut self, max_batch: usize, parallel: usize) {
        let (tx, rx) = mpsc::channel::<Intake>(max_batch * parallel * 4);
        let writer = self.clone();
        tokio::spawn(async move {
            let mut rx = rx;
            saga_shared_events::consumer::for_each_bounded(
                futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
                    .ready_chunks(max_batch.max(1)),
                parallel,
                |batch| {
                    let writer = writer.clone();
                    metrics::gauge!(INTAKE_WAITING).decrement(batch.len() as f64);
                    async move {
                        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                        let results = writer.create_many(requests).await;
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(result);
                        }
                    }
                },
            )
            .await;
        });
        self.intake = Some(tx);
    }

    /// Decides a new saga's first step before its row exists, so the saga is written once. Runs
    /// in the request's span: the saga's trace starts there.
    fn prepare(&self, order: NewOrder, key: Option<String>, fingerprint: String) -> NewSaga {
        let order_id = Uuid::now_v7();
        let span = transition_span(order_id, Event::Start.name(), &tracing::Span::current());
        span.record("saga.state.from", "");
        span.record("saga.state.to", "created");
        let _enter = span.enter();
        let trace = saga_shared_events::propagation::current_context_fields();
        let (state, effects) =
            machine::apply(State::Created { attempt: 0 }, &Event::Start, self.policy);
        let total = order.total_cents();
        let mut messages = Vec::with_capacity(effects.len() + 1);
        let mut deadline = self.timing.deadline_after(0, false);
        for effect in &effects {
            match effect {
                Effect::Send(step) => messages.push(OutgoingMessage::new(&Envelope::new(
                    order_id,
                    None,
                    command(*step, order_id, &order.customer_id, &order.items, total),
                ))),
                Effect::ArmDeadline {
                    attempt,
                    compensating,
                } => deadline = self.timing.deadline_after(*attempt, *compensating),
                _ => {}
            }
        }
        // The event goes after the command: the broker handles a connection's messages in
        // order, and the command is the one the saga waits for.
        messages.push(OutgoingMessage::new(&Envelope::new(
            order_id,
            None,
            Body::OrderCreated(OrderEvent {
                order_id,
                status: state.status().into(),
                cancel_reason: None,
                cancel_detail: None,
                total_cents: total,
            }),
        )));
        NewSaga {
            order_id,
            order,
            key,
            fingerprint,
            state,
            trace,
            deadline,
            messages,
        }
    }

    /// Writes new sagas in one transaction; if that fails, each on its own. One result each.
    async fn create_many(&self, sagas: Vec<NewSaga>) -> Vec<Result<Created, StoreError>> {
        let written = match self.insert_many(&sagas).await {
            // A kept connection that Postgres closed (it restarted): once more, on a connection
            // the pool tests first.
            Err(StoreError::Db(e)) if saga_shared_events::db::is_connection_lost(&e) => {
                tracing::debug!(error = %e, "batch connection lost; writing the orders again");
                match self.insert_many(&sagas).await {
                    // The session broke after the commit: the orders are there already.
                    Err(StoreError::Db(e))
                        if saga_shared_events::db::is_unique_violation(&e, "saga_order_pkey") =>
                    {
                        self.written_before(&sagas).await
                    }
                    other => other,
                }
            }
            other => other,
        };
        match written {
            Ok(written) => self.finish_created(sagas, written).await,
            Err(e) if sagas.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::debug!(error = %e, "order batch failed; writing its orders one by one");
                let mut results = Vec::with_capacity(sagas.len());
                for saga in sagas {
                    let one = vec![saga];
                    results.push(match self.insert_many(&one).await {
                        Ok(written) => self
                            .finish_created(one, written)
                            .await
                            .pop()
                            .unwrap_or_else(|| Err(StoreError::Conflict("not written".into()))),
                        Err(e) => Err(e),
                    });
                }
                results
            }
        }
    }

    /// Inserts the orders, their first history rows and their messages; returns when each order
    /// that was written was created (an order whose idempotency key a concurrent request took
    /// is not written).
    async fn insert_many(
        &self,
        sagas: &[NewSaga],
    ) -> Result<HashMap<Uuid, DateTime<Utc>>, StoreError> {
        let ids: Vec<Uuid> = sagas.iter().map(|s| s.order_id).collect();
        let customers: Vec<&str> = sagas.iter().map(|s| s.order.customer_id.as_str()).collect();
        let items: Vec<String> = sagas.iter().map(|s| to_json(&s.order.items)).collect();
        let totals: Vec<i64> = sagas.iter().map(|s| s.order.total_cents()).collect();
        let states: Vec<String> = sagas.iter().map(|s| to_json(&s.state)).collect();
        let statuses: Vec<&str> = sagas.iter().map(|s| s.state.status()).collect();
        let traces: Vec<String> = sagas.iter().map(|s| to_json(&s.trace)).collect();
        let keys: Vec<Option<&str>> = sagas.iter().map(|s| s.key.as_deref()).collect();
        let fingerprints: Vec<&str> = sagas.iter().map(|s| s.fingerprint.as_str()).collect();
        let deadlines: Vec<f64> = sagas.iter().map(|s| s.deadline.as_secs_f64()).collect();
        let all: Vec<OutgoingMessage> = sagas.iter().flat_map(|s| s.messages.clone()).collect();
        // Without idempotency keys no order can be turned away (each id is new): the statement
        // writes the whole batch with its outbox row or fails, and needs no transaction (two
        // round trips less). A key taken meanwhile is only possible with keys.
        let keyless = sagas.iter().all(|s| s.key.is_none());
        let mut pooled = self.batch_pool.acquire().await?;
        let mut tx: Option<sqlx::Transaction<'_, sqlx::Postgres>> = None;
        let conn: &mut PgConnection = if keyless {
            &mut pooled
        } else {
            tx.insert(sqlx::Connection::begin(&mut *pooled).await?)
        };
        let query = sqlx::query_as(sqlx::AssertSqlSafe(INSERT_SQL.as_str()))
            .bind(&ids)
            .bind(&customers)
            .bind(&items)
            .bind(&totals)
            .bind(&states)
            .bind(&statuses)
            .bind(&traces)
            .bind(&keys)
            .bind(&fingerprints)
            .bind(&deadlines)
            .bind(sagas.len() as i64);
        let written: Vec<(Uuid, DateTime<Utc>)> = self
            .outbox
            .row(&all)
            .bind(query)
            .fetch_all(&mut *conn)
            .await?;
        let written: HashMap<Uuid, DateTime<Utc>> = written.into_iter().collect();
        let messages = if written.len() == sagas.len() {
            all
        } else if keyless {
            return Err(StoreError::Conflict("new orders were not written".into()));
        } else {
            // An idempotency key was taken meanwhile, so the statement wrote no outbox row: write
            // the messages of the orders that were written.
            let messages: Vec<OutgoingMessage> = sagas
                .iter()
                .filter(|s| written.contains_key(&s.order_id))
                .flat_map(|s| s.messages.iter().cloned())
                .collect();
            self.outbox.enqueue(&mut *conn, &messages).await?;
            messages
        };
        if let Some(tx) = tx.take() {
            tx.commit().await?;
        }
        drop(tx);
        pooled.release();
        // Cached before the commands leave: a reply applied (and cached) first would otherwise
        // be overwritten here by this older state.
        self.cache.put(
            sagas
                .iter()
                .filter(|s| written.contains_key(&s.order_id))
                .map(|s| (s.order_id, Some(Entry::aged(s.loaded(), 0.0, 0.0)))),
        );
        self.outbox.publish_committed(messages);
        // The answers to the requests come next, and waking their tasks would push the client's
        // connection task, woken by the hand-over, to the other worker: the commands would wait
        // for its wake-up. Yielding lets this worker write them first.
        tokio::task::yield_now().await;
        Ok(written)
    }

    /// The orders of a batch whose session broke after its commit, as the retry found them: all
    /// were written then, with their outbox row, whose messages leave now instead of after the
    /// relay's grace period (`Nats-Msg-Id` absorbs a copy the relay sent). All but those whose
    /// idempotency key a request in the same batch took: [`SagaStore::finish_created`] answers
    /// them with that request's order.
    async fn written_before(
        &self,
        sagas: &[NewSaga],
    ) -> Result<HashMap<Uuid, DateTime<Utc>>, StoreError> {
        let ids: Vec<Uuid> = sagas.iter().map(|s| s.order_id).collect();
        let mut conn = self.batch_pool.acquire().await?;
        let found: Vec<(Uuid, DateTime<Utc>)> =
            sqlx::query_as("select order_id, created_at from saga_order where order_id = any($1)")
                .bind(&ids)
                .fetch_all(&mut *conn)
                .await?;
        conn.release();
        let written: HashMap<Uuid, DateTime<Utc>> = found.into_iter().collect();
        // The batch's statement wrote every keyless order or none.
        if sagas
            .iter()
            .any(|s| s.key.is_none() && !written.contains_key(&s.order_id))
        {
            return Err(StoreError::Conflict("orders partly written".into()));
        }
        // In the batch's order, as in its outbox row. Not cached: the relay may have sent their
        // commands while the retry waited, and their replies may have moved the sagas on.
        self.outbox.publish_committed(
            sagas
                .iter()
                .filter(|s| written.contains_key(&s.order_id))
                .flat_map(|s| s.messages.clone())
                .collect(),
        );
        Ok(written)
    }

    /// The answers for a committed batch: the new orders, and for an idempotency key a
    /// concurrent request took, that request's order.
    async fn finish_created(
        &self,
        sagas: Vec<NewSaga>,
        written: HashMap<Uuid, DateTime<Utc>>,
    ) -> Vec<Result<Created, StoreError>> {
        let mut results = Vec::with_capacity(sagas.len());
        let mut resumed = Vec::new();
        for s in sagas {
            let Some(&created_at) = written.get(&s.order_id) else {
                let key = s.key.as_deref().unwrap_or_default();
                results.push(match self.find_by_key(key, &s.fingerprint).await {
                    // This very order, committed by an attempt whose answer was lost.
                    Ok(Some(v)) if v.id == s.order_id => {
                        metrics::counter!("sagas_started_total").increment(1);
                        resumed.extend(s.messages);
                        Ok(Created::New(v))
                    }
                    Ok(Some(v)) => Ok(Created::Replayed(v)),
                    Ok(None) => Err(StoreError::Conflict("idempotency key race".into())),
                    Err(e) => Err(e),
                });
                continue;
            };
            metrics::counter!("sagas_started_total").increment(1);
            let total = s.order.total_cents();
            let status = s.state.status().to_owned();
            let mut view = self.view((
                s.order_id,
                s.order.customer_id,
                Json(s.order.items),
                total,
                status.clone(),
                None,
                None,
                created_at,
                created_at,
                Json(s.trace),
            ));
            view.history = vec![Transition {
                from: None,
                to: status,
                event: "order_created".into(),
                at: created_at,
            }];
            results.push(Ok(Created::New(view)));
        }
        // The orders an attempt whose answer was lost committed, in the order of its outbox row:
        // their messages leave now instead of after the relay's grace period. Not cached, as in
        // `written_before`; `Nats-Msg-Id` absorbs a copy the relay sent.
        self.outbox.publish_committed(resumed);
        results
    }

    async fn find_by_key(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<OrderView>, StoreError> {
        let row: Option<(Uuid, Option<String>)> = sqlx::query_as(
            "select order_id, request_fingerprint from saga_order where idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some((_, fp)) if fp.as_deref() != Some(fingerprint) => {
                Err(StoreError::IdempotencyMismatch)
            }
            Some((id, _)) => Ok(Some(self.get(id).await?)),
        }
    }

    /// Feeds `event` to the saga in its own transaction.
    pub async fn apply(&self, order_id: Uuid, event: &Event) -> Result<Applied, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut applied = self.apply_locked(&mut tx, order_id, event, None).await?;
        tx.commit().await?;
        applied.record_metrics();
        self.outbox
            .publish_committed(std::mem::take(&mut applied.messages));
        Ok(applied)
    }

    /// Feeds `event` to the saga inside the caller's transaction: machine, then state, history
    /// and outbox rows; the returned messages are to be published after commit. `causation_id`
    /// names the message that carried the event.
    pub async fn apply_locked(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        event: &Event,
        causation_id: Option<Uuid>,
    ) -> Result<Applied, StoreError> {
        let one = SagaEvent {
            order_id,
            event: event.clone(),
            causation_id,
            parent: tracing::Span::current(),
        };
        let batch = self.apply_many(conn, std::slice::from_ref(&one)).await?;
        let mut applied = batch
            .results
            .into_iter()
            .next()
            .unwrap_or(Err(StoreError::NotFound(order_id)))?;
        applied.messages = batch.outbox;
        Ok(applied)
    }

    /// Feeds events to their sagas with two statements for the whole batch: read every saga, run
    /// the machine in memory (events of one saga in the order given), then write states and
    /// history. Concurrency is optimistic: the write checks each saga's version, and a saga
    /// changed meanwhile (by another replica, the sweeper or an operator) fails the batch with
    /// `Conflict`, to be retried. Locking up front would cost a row lock, and its WAL record, per
    /// saga on every step, for a race that is rare. The messages of every transition go to the
    /// outbox in that same statement; the caller publishes [`AppliedBatch::outbox`] once it
    /// committed. The write is one statement, so `conn` needs no transaction.
    pub async fn apply_many(
        &self,
        conn: &mut PgConnection,
        events: &[SagaEvent],
    ) -> Result<AppliedBatch, StoreError> {
        self.apply_batch(conn, events, false).await
    }

    /// Like [`SagaStore::apply_many`] for events carried by replies (`causation_id` is the
    /// reply's message id), which the write also records in the inbox. A reply recorded before,
    /// or twice in the batch, is not applied again (`Applied::duplicate`); one for no saga is
    /// `NotFound` and is not recorded, so that a replay is not taken for a duplicate.
    pub async fn apply_replies(
        &self,
        conn: &mut PgConnection,
        events: &[SagaEvent],
    ) -> Result<AppliedBatch, StoreError> {
        self.apply_batch(conn, events, true).await
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[SagaEvent],
        replies: bool,
    ) -> Result<AppliedBatch, StoreError> {
        if events.is_empty() {
            return Ok(AppliedBatch::default());
        }
        let mut ids: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if !replies {
            // Written in the caller's transaction, which may yet roll back: read next time.
            self.cache.forget(&ids);
        } else if let Some(cached) = self.cache.get_all(&ids) {
            let sagas = ids
                .iter()
                .zip(cached)
                .map(|(id, e)| (*id, Loaded::from_cache(e)))
                .collect();
            match self
                .run_batch(conn, events, true, sagas, HashSet::new())
                .await
            {
                Err(StoreError::Conflict(_)) => self.cache.conflict(&ids),
                Ok(None) => {}
                Ok(Some(batch)) => return Ok(batch),
                Err(e) => return Err(e),
            }
        }
        let message_ids: Vec<Uuid> = if replies {
            events.iter().filter_map(|e| e.causation_id).collect()
        } else {
            Vec::new()
        };
        let rows: Vec<SagaRow> = sqlx::query_as(
            "select order_id, state, status, version, customer_id, items, total_cents, \
             cancel_reason, cancel_detail, \
             extract(epoch from clock_timestamp() - updated_at)::float8, \
             extract(epoch from clock_timestamp() - created_at)::float8, \
             (select coalesce(array_agg(message_id), '{}') from processed_message \
              where message_id = any($2)) \
             from saga_order where order_id = any($1)",
        )
        .bind(&ids)
        .bind(&message_ids)
        .fetch_all(&mut *conn)
        .await?;
        // Every row carries the same list: the batch's replies already in the inbox.
        let seen: HashSet<Uuid> = rows
            .first()
            .map(|r| r.11.iter().copied().collect())
            .unwrap_or_default();
        let sagas: HashMap<Uuid, Loaded> = rows
            .into_iter()
            .map(|r| {
                let loaded = Loaded {
                    state: r.1.0,
                    status: r.2,
                    version: r.3,
                    customer_id: r.4,
                    items: r.5.0,
                    total_cents: r.6,
                    reason: r.7,
                    detail: r.8,
                    step_seconds: r.9,
                    saga_seconds: r.10,
                    changed: false,
                    deadline: None,
                    from_cache: false,
                };
                (r.0, loaded)
            })
            .collect();
        match self.run_batch(conn, events, replies, sagas, seen).await {
            Ok(Some(batch)) => Ok(batch),
            Ok(None) => Err(StoreError::Conflict("batch not written".into())),
            Err(e) => {
                // A saga changed between this read and the write: what is cached of it may be
                // older still.
                if matches!(e, StoreError::Conflict(_)) {
                    self.cache.forget(&ids);
                }
                Err(e)
            }
        }
    }

    /// Runs the machine for every event on `sagas` and writes the outcome. From the cache
    /// (`seen` empty) only a batch that changes every saga it touches is written, as only the
    /// changed ones are checked against their versions: an event ignored by a stale cached
    /// state would be acknowledged wrongly. Such a batch returns `None`, written nowhere.
    async fn run_batch(
        &self,
        conn: &mut PgConnection,
        events: &[SagaEvent],
        replies: bool,
        mut sagas: HashMap<Uuid, Loaded>,
        mut seen: HashSet<Uuid>,
    ) -> Result<Option<AppliedBatch>, StoreError> {
        let cached = sagas.values().any(|s| s.from_cache);
        let mut history = History::default();
        let mut results = Vec::with_capacity(events.len());
        let mut outbox = Vec::new();
        let mut inbox = Vec::new();
        for e in events {
            let Some(saga) = sagas.get_mut(&e.order_id) else {
                results.push(Err(StoreError::NotFound(e.order_id)));
                continue;
            };
            if replies && let Some(message_id) = e.causation_id {
                // `insert` is false for a reply seen before or earlier in this batch.
                if !seen.insert(message_id) {
                    results.push(Ok(Applied::duplicate()));
                    continue;
                }
                inbox.push(message_id);
            }
            let span = transition_span(e.order_id, e.event.name(), &e.parent);
            let mut applied = span.in_scope(|| self.step(e, saga, &mut history));
            outbox.append(&mut applied.messages);
            results.push(Ok(applied));
        }
        if cached && sagas.values().any(|s| !s.changed) {
            return Ok(None);
        }
        self.write(conn, &sagas, &history, &outbox, &inbox).await?;
        if replies {
            // The write committed on its own: these are the sagas' rows now.
            let written = sagas.into_iter().map(|(id, s)| {
                let entry = (!s.state.is_terminal()).then(|| s.into_cache());
                (id, entry)
            });
            self.cache.put(written);
        }
        Ok(Some(AppliedBatch { results, outbox }))
    }

    /// Runs the machine for one event on a loaded saga (inside the event's transition span).
    fn step(&self, e: &SagaEvent, saga: &mut Loaded, history: &mut History) -> Applied {
        let (next, effects) = machine::apply(saga.state.clone(), &e.event, self.policy);
        let from = saga.status.clone();
        let to = next.status();
        let span = tracing::Span::current();
        span.record("saga.state.from", from.as_str());
        span.record("saga.state.to", to);
        // A failed step or compensation marks the span as an error, with the reason.
        for effect in &effects {
            let failure = match effect {
                Effect::SetReason(r, d) => Some(format!("{}: {d}", r.as_str())),
                Effect::Finish(SagaEnd::Failed) => Some("compensation gave up".to_owned()),
                _ => None,
            };
            if let Some(msg) = failure {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", msg.as_str());
            }
        }
        let mut applied = Applied {
            from: from.clone(),
            to: to.into(),
            finished: None,
            changed: false,
            duplicate: false,
            step_seconds: saga.step_seconds,
            saga_seconds: saga.saga_seconds,
            messages: Vec::new(),
        };
        if next == saga.state && effects.is_empty() {
            applied.to = from;
            return applied;
        }
        let order_id = e.order_id;
        for effect in &effects {
            match effect {
                Effect::Send(step) => {
                    let body = command(
                        *step,
                        order_id,
                        &saga.customer_id,
                        &saga.items,
                        saga.total_cents,
                    );
                    applied.messages.push(OutgoingMessage::new(&Envelope::new(
                        order_id,
                        e.causation_id,
                        body,
                    )));
                }
                Effect::ArmDeadline {
                    attempt,
                    compensating,
                } => {
                    saga.deadline = Some(Some(self.timing.deadline_after(*attempt, *compensating)))
                }
                Effect::ClearDeadline => saga.deadline = Some(None),
                Effect::SetReason(r, d) => {
                    saga.reason = Some(r.as_str().to_owned());
                    saga.detail = Some(d.clone());
                }
                Effect::Finish(end) => applied.finished = Some(*end),
            }
        }
        if from != to {
            history.push(order_id, &from, to, e.event.name());
            tracing::debug!(saga_id = %order_id, from = %from, to, event = e.event.name(), "saga transition");
        }
        if let Some(end) = applied.finished {
            let ev = OrderEvent {
                order_id,
                status: to.into(),
                cancel_reason: saga.reason.as_deref().and_then(CancelReason::parse),
                cancel_detail: saga.detail.clone(),
                total_cents: saga.total_cents,
            };
            let body = match end {
                SagaEnd::Completed => Body::OrderCompleted(ev),
                SagaEnd::Cancelled => Body::OrderCancelled(ev),
                SagaEnd::Failed => Body::OrderFailed(ev),
            };
            applied.messages.push(OutgoingMessage::new(&Envelope::new(
                order_id,
                e.causation_id,
                body,
            )));
            tracing::info!(saga_id = %order_id, status = to, reason = ?saga.reason, "saga ended");
        }
        saga.state = next;
        saga.status = to.to_owned();
        saga.changed = true;
        // A second event of the same saga in this batch follows right after this one.
        saga.step_seconds = 0.0;
        applied.changed = true;
        applied
    }

    /// Writes every changed saga, the history rows, the outbox row and the replies' inbox
    /// entries in one statement, or nothing if a saga changed or a reply was recorded since the
    /// read (`Conflict`). Rows are updated in id order, so concurrent batches cannot deadlock.
    async fn write(
        &self,
        conn: &mut PgConnection,
        sagas: &HashMap<Uuid, Loaded>,
        history: &History,
        outbox: &[OutgoingMessage],
        inbox: &[Uuid],
    ) -> Result<(), StoreError> {
        let mut changed: Vec<(&Uuid, &Loaded)> = sagas.iter().filter(|(_, s)| s.changed).collect();
        changed.sort_unstable_by_key(|(id, _)| **id);
        if changed.is_empty() && outbox.is_empty() && inbox.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = changed.iter().map(|(id, _)| **id).collect();
        let versions: Vec<i64> = changed.iter().map(|(_, s)| s.version).collect();
        let states: Vec<String> = changed
            .iter()
            .map(|(_, s)| serde_json::to_string(&s.state).unwrap_or_default())
            .collect();
        let statuses: Vec<&str> = changed.iter().map(|(_, s)| s.status.as_str()).collect();
        // Deadline: 0 keeps it, 1 sets it to now + ms, 2 clears it.
        let modes: Vec<i16> = changed
            .iter()
            .map(|(_, s)| match s.deadline {
                None => 0,
                Some(Some(_)) => 1,
                Some(None) => 2,
            })
            .collect();
        let millis: Vec<f64> = changed
            .iter()
            .map(|(_, s)| {
                s.deadline
                    .flatten()
                    .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
            })
            .collect();
        let reasons: Vec<Option<&str>> = changed.iter().map(|(_, s)| s.reason.as_deref()).collect();
        let details: Vec<Option<&str>> = changed.iter().map(|(_, s)| s.detail.as_deref()).collect();
        let query = sqlx::query_as(sqlx::AssertSqlSafe(WRITE_SQL.as_str()))
            .bind(&ids)
            .bind(&versions)
            .bind(&states)
            .bind(&statuses)
            .bind(&modes)
            .bind(&millis)
            .bind(&reasons)
            .bind(&details)
            .bind(&history.order_ids)
            .bind(&history.from)
            .bind(&history.to)
            .bind(&history.event);
        let written: Result<(i64,), sqlx::Error> = self
            .outbox
            .row(outbox)
            .bind(query)
            .bind(inbox)
            .fetch_one(&mut *conn)
            .await;
        match written {
            Ok(_) => Ok(()),
            Err(e) if saga_shared_events::db::is_write_conflict(&e) => {
                Err(StoreError::Conflict(e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The order with its history.
    pub async fn get(&self, order_id: Uuid) -> Result<OrderView, StoreError> {
        let row: Option<ViewRow> = sqlx::query_as(VIEW_SELECT_BY_ID)
            .bind(order_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(order_id));
        };
        let history: Vec<(Option<String>, String, String, DateTime<Utc>)> = sqlx::query_as(
            "select from_status, to_status, event, created_at from saga_transition \
             where order_id = $1 order by saga_transition_id",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await?;
        let mut view = self.view(row);
        view.history = history
            .into_iter()
            .map(|(from, to, event, at)| Transition {
                from,
                to,
                event,
                at,
            })
            .collect();
        Ok(view)
    }

    /// A page of orders, newest first, after the cursor `after` (an order id).
    pub async fn list(
        &self,
        status: Option<&str>,
        limit: i64,
        after: Option<Uuid>,
    ) -> Result<Vec<OrderView>, StoreError> {
        // One statement per shape, each with its own index: (status, order_id) or the key.
        let before = after.unwrap_or(Uuid::max());
        let rows: Vec<ViewRow> = match status {
            Some(status) => {
                sqlx::query_as(
                    "select order_id, customer_id, items, total_cents, status, cancel_reason, \
                     cancel_detail, created_at, updated_at, trace_context from saga_order \
                     where status = $1 and order_id < $2 order by order_id desc limit $3",
                )
                .bind(status)
                .bind(before)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(
                    "select order_id, customer_id, items, total_cents, status, cancel_reason, \
                     cancel_detail, created_at, updated_at, trace_context from saga_order \
                     where order_id < $1 order by order_id desc limit $2",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows.into_iter().map(|r| self.view(r)).collect())
    }

    /// Starts compensation if the saga may still be cancelled; `Conflict` otherwise.
    pub async fn cancel(&self, order_id: Uuid) -> Result<Applied, StoreError> {
        self.operator_event(order_id, Event::CancelRequested, |s| {
            (!s.accepts_cancel())
                .then(|| format!("order is {} and can no longer be cancelled", s.status()))
        })
        .await
    }

    /// Resumes a failed saga where it stopped; `Conflict` unless it is `failed`.
    pub async fn retry(&self, order_id: Uuid) -> Result<Applied, StoreError> {
        self.operator_event(order_id, Event::RetryRequested, |s| {
            (!matches!(s, State::Failed { .. }))
                .then(|| format!("order is {}; only failed orders can be retried", s.status()))
        })
        .await
    }

    async fn operator_event(
        &self,
        order_id: Uuid,
        event: Event,
        refuse: impl Fn(&State) -> Option<String>,
    ) -> Result<Applied, StoreError> {
        let mut tx = self.pool.begin().await?;
        let state: Option<Json<State>> =
            sqlx::query_scalar("select state from saga_order where order_id = $1 for update")
                .bind(order_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(Json(state)) = state else {
            return Err(StoreError::NotFound(order_id));
        };
        if let Some(why) = refuse(&state) {
            return Err(StoreError::Conflict(why));
        }
        let mut applied = self.apply_locked(&mut tx, order_id, &event, None).await?;
        tx.commit().await?;
        applied.record_metrics();
        self.outbox
            .publish_committed(std::mem::take(&mut applied.messages));
        Ok(applied)
    }

    /// Feeds `StepTimedOut` to up to `limit` sagas whose deadline has passed, skipping sagas
    /// another replica is handling. Each continues its own trace. Returns how many were handled.
    pub async fn sweep_due(&self, limit: i64) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<(Uuid, Json<BTreeMap<String, String>>)> = sqlx::query_as(
            "select order_id, trace_context from saga_order \
             where deadline_at <= now() order by deadline_at limit $1 for update skip locked",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<SagaEvent> = due
            .iter()
            .map(|(order_id, Json(trace))| {
                let span = tracing::info_span!("saga deadline", saga_id = %order_id);
                saga_shared_events::telemetry::set_parent(
                    &span,
                    saga_shared_events::propagation::context_from_fields(trace),
                );
                SagaEvent {
                    order_id: *order_id,
                    event: Event::StepTimedOut,
                    causation_id: None,
                    parent: span,
                }
            })
            .collect();
        let batch = self.apply_many(&mut tx, &events).await?;
        let messages = batch.outbox;
        let applied: Vec<Applied> = batch.results.into_iter().collect::<Result<_, _>>()?;
        tx.commit().await?;
        for a in &applied {
            a.record_metrics();
        }
        self.outbox.publish_committed(messages);
        Ok(due.len())
    }

    fn view(&self, r: ViewRow) -> OrderView {
        let (
            id,
            customer_id,
            Json(items),
            total_cents,
            status,
            cancel_reason,
            cancel_detail,
            created_at,
            updated_at,
            Json(trace),
        ) = r;
        let trace_id = trace
            .get("traceparent")
            .and_then(|tp| tp.split('-').nth(1))
            .filter(|t| t.len() == 32 && *t != "00000000000000000000000000000000")
            .map(str::to_owned);
        let trace_url = match (&self.jaeger_ui_url, &trace_id) {
            (Some(base), Some(t)) => Some(format!("{}/trace/{t}", base.trim_end_matches('/'))),
            _ => None,
        };
        OrderView {
            id,
            customer_id,
            items,
            total_cents,
            status,
            cancel_reason,
            cancel_detail,
            created_at,
            updated_at,
            history: Vec::new(),
            trace_id,
            trace_url,
        }
    }
}

type ViewRow = (
    Uuid,
    String,
    Json<Vec<Item>>,
    i64,
    String,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    Json<BTreeMap<String, String>>,
);

const VIEW_SELECT_BY_ID: &str = "select order_id, customer_id, items, total_cents, status, \
     cancel_reason, cancel_detail, created_at, updated_at, trace_context \
     from saga_order where order_id = $1";

/// The span of one saga transition; `from`, `to` and the status are recorded once known.
fn transition_span(order_id: Uuid, event: &'static str, parent: &tracing::Span) -> tracing::Span {
    // Created in the parent's scope rather than with an explicit parent: the parent's scope is
    // what routes a span to OpenTelemetry or to ids only (`telemetry::UNTRACED`).
    let span = parent.in_scope(|| {
        tracing::info_span!(
            "saga transition",
            otel.name = tracing::field::Empty,
            saga.id = %order_id,
            order.id = %order_id,
            saga.event = event,
            saga.state.from = tracing::field::Empty,
            saga.state.to = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            saga_id = %order_id,
        )
    });
    saga_shared_events::telemetry::name_span(&span, || format!("saga {event}"));
    span
}

/// The command a step sends, built from the order.
fn command(
    step: Step,
    order_id: Uuid,
    customer_id: &str,
    items: &[Item],
    total_cents: i64,
) -> Body {
    match step {
        Step::Reserve => {
            // One line per product: the same product twice in an order is one reservation.
            let mut lines: BTreeMap<&str, i64> = BTreeMap::new();
            for i in items {
                *lines.entry(i.product_id.as_str()).or_default() += i.quantity;
            }
            Body::ReserveInventory(ReserveInventory {
                order_id,
                lines: lines
                    .into_iter()
                    .map(|(p, q)| Line {
                        product_id: p.to_owned(),
                        quantity: q.min(i32::MAX as i64) as i32,
                    })
                    .collect(),
            })
        }
        Step::Charge => Body::ChargePayment(ChargePayment {
            order_id,
            customer_id: customer_id.to_owned(),
            amount_cents: total_cents,
        }),
        Step::Ship => Body::ShipOrder(ShipOrder {
            order_id,
            customer_id: customer_id.to_owned(),
        }),
        Step::CancelShipment => Body::CancelShipment(OrderRef { order_id }),
        Step::Refund => Body::RefundPayment(OrderRef { order_id }),
        Step::Release => Body::ReleaseInventory(OrderRef { order_id }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_grow_with_attempts_and_compensations_are_capped() {
        let t = Timing {
            step_timeout: Duration::from_secs(5),
        };
        let first = t.deadline_after(0, false);
        assert!(first >= Duration::from_secs(5) && first <= Duration::from_secs(6));
        let third = t.deadline_after(2, false);
        assert!(third >= Duration::from_secs(20) && third <= Duration::from_secs(24));
        assert!(t.deadline_after(30, true) <= Duration::from_secs(72));
    }

    #[test]
    fn a_product_ordered_twice_is_reserved_as_one_line() {
        let items = vec![
            Item {
                product_id: "a".into(),
                quantity: 2,
                unit_price_cents: 1,
            },
            Item {
                product_id: "b".into(),
                quantity: 1,
                unit_price_cents: 1,
            },
            Item {
                product_id: "a".into(),
                quantity: 3,
                unit_price_cents: 1,
            },
        ];
        let Body::ReserveInventory(r) = command(Step::Reserve, Uuid::nil(), "c", &items, 6) else {
            panic!("not a reserve")
        };
        assert_eq!(r.lines.len(), 2);
        assert_eq!(r.lines[0].quantity, 5);
    }
}
