//! The saga driver: loads a saga under its row lock, feeds the pure machine one event, and writes
//! the new state, its history row and its outgoing messages (outbox) in the caller's transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use saga_shared_events::outbox::{Outbox, OutgoingMessage};
use saga_shared_events::{
    Body, CancelReason, ChargePayment, Envelope, Line, OrderEvent, OrderRef, ReserveInventory,
    ShipOrder,
};

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
    Json<State>,
    String,
    i64,
    String,
    Json<Vec<Item>>,
    i64,
    f64,
    f64,
);

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
    /// Seconds since the saga's previous change (the step's duration when the status moved).
    pub step_seconds: f64,
    /// Seconds since the saga was created.
    pub saga_seconds: f64,
    /// Messages written to the outbox, to publish once the transaction committed.
    pub messages: Vec<OutgoingMessage>,
}

impl Applied {
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
    outbox: Outbox,
    policy: Policy,
    timing: Timing,
    jaeger_ui_url: Option<String>,
}

impl SagaStore {
    /// A store over `pool`.
    pub fn new(
        pool: PgPool,
        outbox: Outbox,
        policy: Policy,
        timing: Timing,
        jaeger_ui_url: Option<String>,
    ) -> Self {
        SagaStore {
            pool,
            outbox,
            policy,
            timing,
            jaeger_ui_url,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The outbox, to publish an `Applied`'s messages after commit.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Accepts an order and starts its saga in one transaction. With an idempotency key, a repeat
    /// with the same body returns the first order; with another body, `IdempotencyMismatch`.
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
        let order_id = Uuid::now_v7();
        let span = transition_span(order_id, Event::Start.name());
        span.record("saga.state.from", "");
        span.record("saga.state.to", "created");
        let _enter = span.enter();
        let trace = saga_shared_events::propagation::current_context_fields();
        // The first step is decided before the row exists, so the saga is written once.
        let (state, effects) =
            machine::apply(State::Created { attempt: 0 }, &Event::Start, self.policy);
        let total = order.total_cents();
        let mut messages = vec![OutgoingMessage::new(&Envelope::new(
            order_id,
            None,
            Body::OrderCreated(OrderEvent {
                order_id,
                status: state.status().into(),
                cancel_reason: None,
                cancel_detail: None,
                total_cents: total,
            }),
        ))];
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
        drop(_enter);
        let mut tx = self.pool.begin().await?;
        let inserted: Option<(DateTime<Utc>,)> = sqlx::query_as(
            "insert into saga_order (order_id, customer_id, items, total_cents, state, status, \
             trace_context, idempotency_key, request_fingerprint, deadline_at) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10)) \
             on conflict (idempotency_key) do nothing returning created_at",
        )
        .bind(order_id)
        .bind(&order.customer_id)
        .bind(Json(&order.items))
        .bind(total)
        .bind(Json(&state))
        .bind(state.status())
        .bind(Json(&trace))
        .bind(idempotency_key)
        .bind(&fingerprint)
        .bind(deadline.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((created_at,)) = inserted else {
            // A concurrent request with the same key won the race.
            tx.rollback().await?;
            let key = idempotency_key.unwrap_or_default();
            return match self.find_by_key(key, &fingerprint).await? {
                Some(v) => Ok(Created::Replayed(v)),
                None => Err(StoreError::Conflict("idempotency key race".into())),
            };
        };
        insert_transition(&mut tx, order_id, None, state.status(), "order_created").await?;
        self.outbox.enqueue(&mut tx, &messages).await?;
        tx.commit().await?;
        self.outbox.publish_committed(messages);
        metrics::counter!("sagas_started_total").increment(1);
        let mut view = self.view((
            order_id,
            order.customer_id.clone(),
            Json(order.items.clone()),
            total,
            state.status().to_owned(),
            None,
            None,
            created_at,
            created_at,
            Json(trace),
        ));
        view.history = vec![Transition {
            from: None,
            to: state.status().to_owned(),
            event: "order_created".into(),
            at: created_at,
        }];
        Ok(Created::New(view))
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

    /// Feeds `event` to the saga inside the caller's transaction: row lock, machine, then state,
    /// history and outbox rows. `causation_id` names the message that carried the event.
    pub async fn apply_locked(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        event: &Event,
        causation_id: Option<Uuid>,
    ) -> Result<Applied, StoreError> {
        use tracing::Instrument;
        self.transition(conn, order_id, event, causation_id)
            .instrument(transition_span(order_id, event.name()))
            .await
    }

    async fn transition(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        event: &Event,
        causation_id: Option<Uuid>,
    ) -> Result<Applied, StoreError> {
        let row: Option<SagaRow> = sqlx::query_as(
            "select state, status, version, customer_id, items, total_cents, \
             extract(epoch from clock_timestamp() - updated_at)::float8, \
             extract(epoch from clock_timestamp() - created_at)::float8 \
             from saga_order where order_id = $1 for update",
        )
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((
            Json(state),
            from,
            version,
            customer_id,
            Json(items),
            total_cents,
            step_seconds,
            saga_seconds,
        )) = row
        else {
            return Err(StoreError::NotFound(order_id));
        };
        let (next, effects) = machine::apply(state.clone(), event, self.policy);
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
        if next == state && effects.is_empty() {
            return Ok(Applied {
                from: from.clone(),
                to: from,
                finished: None,
                changed: false,
                step_seconds,
                saga_seconds,
                messages: Vec::new(),
            });
        }

        let mut messages = Vec::new();
        let mut deadline: Option<Option<Duration>> = None;
        let mut reason: Option<(CancelReason, String)> = None;
        let mut finished = None;
        for effect in &effects {
            match effect {
                Effect::Send(step) => {
                    let body = command(*step, order_id, &customer_id, &items, total_cents);
                    messages.push(OutgoingMessage::new(&Envelope::new(
                        order_id,
                        causation_id,
                        body,
                    )));
                }
                Effect::ArmDeadline {
                    attempt,
                    compensating,
                } => deadline = Some(Some(self.timing.deadline_after(*attempt, *compensating))),
                Effect::ClearDeadline => deadline = Some(None),
                Effect::SetReason(r, d) => reason = Some((*r, d.clone())),
                Effect::Finish(end) => finished = Some(*end),
            }
        }
        let deadline_ms: Option<i64> = deadline.flatten().map(|d| d.as_millis() as i64);
        // State, version, deadline, reason and the history row in one round trip; the stored
        // reason comes back for the terminal order event.
        let updated: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "with u as (update saga_order set state = $3, status = $4, version = version + 1, \
               deadline_at = case when $5 then now() + make_interval(secs => $6::float8 / 1000) \
                                  when $7 then null else deadline_at end, \
               cancel_reason = coalesce($8, cancel_reason), \
               cancel_detail = coalesce($9, cancel_detail), updated_at = now() \
               where order_id = $1 and version = $2 returning order_id, cancel_reason, cancel_detail), \
             t as (insert into saga_transition (order_id, from_status, to_status, event) \
               select order_id, $10, $4, $11 from u where $10 <> $4) \
             select cancel_reason, cancel_detail from u",
        )
        .bind(order_id)
        .bind(version)
        .bind(Json(&next))
        .bind(to)
        .bind(deadline_ms.is_some())
        .bind(deadline_ms.unwrap_or(0) as f64)
        .bind(matches!(deadline, Some(None)))
        .bind(reason.as_ref().map(|(r, _)| r.as_str()))
        .bind(reason.as_ref().map(|(_, d)| d.as_str()))
        .bind(from.as_str())
        .bind(event.name())
        .fetch_optional(&mut *conn)
        .await?;
        let Some((stored_reason, stored_detail)) = updated else {
            return Err(StoreError::Conflict(format!(
                "saga {order_id} changed concurrently"
            )));
        };
        if from != to {
            tracing::debug!(saga_id = %order_id, from = %from, to, event = event.name(), "saga transition");
        }
        if let Some(end) = finished {
            let ev = OrderEvent {
                order_id,
                status: to.into(),
                cancel_reason: stored_reason.as_deref().and_then(CancelReason::parse),
                cancel_detail: stored_detail,
                total_cents,
            };
            let body = match end {
                SagaEnd::Completed => Body::OrderCompleted(ev),
                SagaEnd::Cancelled => Body::OrderCancelled(ev),
                SagaEnd::Failed => Body::OrderFailed(ev),
            };
            messages.push(OutgoingMessage::new(&Envelope::new(
                order_id,
                causation_id,
                body,
            )));
            tracing::info!(saga_id = %order_id, status = to, reason = ?stored_reason, "saga ended");
        }
        self.outbox.enqueue(conn, &messages).await?;
        Ok(Applied {
            from,
            to: to.into(),
            finished,
            changed: true,
            step_seconds,
            saga_seconds,
            messages,
        })
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
        let rows: Vec<ViewRow> = sqlx::query_as(
            "select order_id, customer_id, items, total_cents, status, cancel_reason, cancel_detail, \
             created_at, updated_at, trace_context from saga_order \
             where ($1::text is null or status = $1) and ($2::uuid is null or order_id < $2) \
             order by order_id desc limit $3",
        )
        .bind(status)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
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
        let mut applied = Vec::with_capacity(due.len());
        for (order_id, Json(trace)) in &due {
            use tracing::Instrument;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let span = tracing::info_span!("saga deadline", saga_id = %order_id);
            let _ = span.set_parent(saga_shared_events::propagation::context_from_fields(trace));
            applied.push(
                self.apply_locked(&mut tx, *order_id, &Event::StepTimedOut, None)
                    .instrument(span)
                    .await?,
            );
        }
        tx.commit().await?;
        for a in applied {
            a.record_metrics();
            self.outbox.publish_committed(a.messages);
        }
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
fn transition_span(order_id: Uuid, event: &'static str) -> tracing::Span {
    tracing::info_span!(
        "saga transition",
        otel.name = %format!("saga {event}"),
        saga.id = %order_id,
        order.id = %order_id,
        saga.event = event,
        saga.state.from = tracing::field::Empty,
        saga.state.to = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        saga_id = %order_id,
    )
}

async fn insert_transition(
    conn: &mut PgConnection,
    order_id: Uuid,
    from: Option<&str>,
    to: &str,
    event: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into saga_transition (order_id, from_status, to_status, event) values ($1, $2, $3, $4)",
    )
    .bind(order_id)
    .bind(from)
    .bind(to)
    .bind(event)
    .execute(conn)
    .await?;
    Ok(())
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
