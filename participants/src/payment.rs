//! Payment: charges with probability `PAYMENT_SUCCESS_RATE`, refunds once. A decision is stored
//! per order and repeated on redelivery: a re-sent charge never flips and never charges twice.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use saga_shared_events::auth::{Authorized, Read};
use saga_shared_events::consumer::HandlerError;
use saga_shared_events::contract::{Body, ChargePayment, Charged, OrderRef, Participant, Refusal};
use saga_shared_events::http::Problem;

use crate::common::{Chaos, Decide, internal, wrong_command};

/// Migrations of the payment database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payment");

/// Payment's decisions.
pub struct Payment;

impl Decide for Payment {
    const PARTICIPANT: Participant = Participant::Payment;

    async fn decide(
        &self,
        conn: &mut PgConnection,
        command: &Body,
        chaos: &Chaos,
    ) -> Result<Body, HandlerError> {
        match command {
            Body::ChargePayment(c) => charge(conn, c, chaos.success_rate.unwrap_or(1.0)).await,
            Body::RefundPayment(c) => refund(conn, c.order_id).await,
            other => Err(wrong_command(Self::PARTICIPANT, other)),
        }
    }
}

async fn charge(
    conn: &mut PgConnection,
    c: &ChargePayment,
    success_rate: f64,
) -> Result<Body, HandlerError> {
    if c.amount_cents < 0 {
        return Err(HandlerError::Permanent("negative amount".into()));
    }
    let approve = success_rate >= 1.0 || rand::random_bool(success_rate.clamp(0.0, 1.0));
    let (status, reason) = if approve {
        ("charged", None)
    } else {
        ("declined", Some("card declined by issuer"))
    };
    let claimed = sqlx::query(
        "insert into payment (order_id, status, amount_cents, customer_id, reason) \
         values ($1, $2, $3, $4, $5) on conflict do nothing",
    )
    .bind(c.order_id)
    .bind(status)
    .bind(c.amount_cents)
    .bind(&c.customer_id)
    .bind(reason)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        metrics::counter!("payments_total", "result" => status).increment(1);
        return Ok(charge_reply(
            c.order_id,
            status,
            c.amount_cents,
            reason.map(str::to_owned),
        ));
    }
    let (status, amount, reason): (String, i64, Option<String>) =
        sqlx::query_as("select status, amount_cents, reason from payment where order_id = $1")
            .bind(c.order_id)
            .fetch_one(&mut *conn)
            .await?;
    Ok(charge_reply(c.order_id, &status, amount, reason))
}

/// The reply a stored charge decision gives, every time it is asked.
fn charge_reply(order_id: Uuid, status: &str, amount_cents: i64, reason: Option<String>) -> Body {
    match status {
        "charged" | "refunded" => Body::PaymentCharged(Charged {
            order_id,
            amount_cents,
        }),
        _ => Body::PaymentDeclined(Refusal {
            order_id,
            reason: reason.unwrap_or_else(|| "declined".into()),
        }),
    }
}

async fn refund(conn: &mut PgConnection, order_id: Uuid) -> Result<Body, HandlerError> {
    // A refund before any charge voids the order's payment, so the late charge is declined.
    let voided = sqlx::query(
        "insert into payment (order_id, status, amount_cents, customer_id, reason) \
         values ($1, 'voided', 0, '', 'order was cancelled before the charge') on conflict do nothing",
    )
    .bind(order_id)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !voided {
        let refunded = sqlx::query(
            "update payment set status = 'refunded', updated_at = now() \
             where order_id = $1 and status = 'charged'",
        )
        .bind(order_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if refunded == 1 {
            metrics::counter!("payments_total", "result" => "refunded").increment(1);
        }
    }
    Ok(Body::PaymentRefunded(OrderRef { order_id }))
}

/// A payment as the API shows it.
#[derive(Debug, Serialize)]
pub struct PaymentView {
    order_id: Uuid,
    /// `charged`, `declined` or `refunded` (a voided payment shows as `declined`).
    status: String,
    amount_cents: i64,
}

/// `GET /payments/{order_id}`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/payments/{order_id}", get(get_payment))
        .with_state(pool)
}

async fn get_payment(
    _auth: Authorized<Read>,
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<PaymentView>, Problem> {
    let not_found = || Problem::not_found(format!("no payment for order {id:?}"));
    let order_id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let row: Option<(String, i64)> =
        sqlx::query_as("select status, amount_cents from payment where order_id = $1")
            .bind(order_id)
            .fetch_optional(&pool)
            .await
            .map_err(internal)?;
    let (status, amount_cents) = row.ok_or_else(not_found)?;
    let status = if status == "voided" {
        "declined".into()
    } else {
        status
    };
    Ok(Json(PaymentView {
        order_id,
        status,
        amount_cents,
    }))
}
