//! Shipping: ships with probability `SHIPPING_SUCCESS_RATE`; a cancel stops a shipment that has
//! not gone out (and answers `shipped` when it is too late).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use saga_shared_events::auth::{Authorized, Read};
use saga_shared_events::consumer::HandlerError;
use saga_shared_events::contract::{Body, OrderRef, Participant, Refusal};
use saga_shared_events::http::Problem;

use crate::common::{Chaos, Decide, internal, wrong_command};

/// Migrations of the shipping database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/shipping");

/// Shipping's decisions.
pub struct Shipping;

impl Decide for Shipping {
    const PARTICIPANT: Participant = Participant::Shipping;

    async fn decide(
        &self,
        conn: &mut PgConnection,
        command: &Body,
        chaos: &Chaos,
    ) -> Result<Body, HandlerError> {
        let (order_id, customer_id, status, reason) = match command {
            Body::ShipOrder(c) => {
                let rate = chaos.success_rate.unwrap_or(1.0);
                let ok = rate >= 1.0 || rand::random_bool(rate.clamp(0.0, 1.0));
                if ok {
                    (c.order_id, c.customer_id.as_str(), "shipped", None)
                } else {
                    (
                        c.order_id,
                        c.customer_id.as_str(),
                        "failed",
                        Some("carrier could not ship the order"),
                    )
                }
            }
            Body::CancelShipment(c) => (
                c.order_id,
                "",
                "cancelled",
                Some("shipment cancelled before it went out"),
            ),
            other => return Err(wrong_command(Self::PARTICIPANT, other)),
        };
        let claimed = sqlx::query(
            "insert into shipment (order_id, status, customer_id, reason) values ($1, $2, $3, $4) \
             on conflict do nothing",
        )
        .bind(order_id)
        .bind(status)
        .bind(customer_id)
        .bind(reason)
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1;
        let (status, reason): (String, Option<String>) = if claimed {
            metrics::counter!("shipments_total", "result" => status).increment(1);
            (status.to_owned(), reason.map(str::to_owned))
        } else {
            sqlx::query_as("select status, reason from shipment where order_id = $1")
                .bind(order_id)
                .fetch_one(&mut *conn)
                .await?
        };
        Ok(match status.as_str() {
            "shipped" => Body::Shipped(OrderRef { order_id }),
            _ => Body::ShippingFailed(Refusal {
                order_id,
                reason: reason.unwrap_or_else(|| "shipment failed".into()),
            }),
        })
    }
}

/// A shipment as the API shows it.
#[derive(Debug, Serialize)]
pub struct ShipmentView {
    order_id: Uuid,
    /// `shipped`, `failed` or `cancelled`.
    status: String,
    reason: Option<String>,
}

/// `GET /shipments/{order_id}`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/shipments/{order_id}", get(get_shipment))
        .with_state(pool)
}

async fn get_shipment(
    _auth: Authorized<Read>,
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<ShipmentView>, Problem> {
    let not_found = || Problem::not_found(format!("no shipment for order {id:?}"));
    let order_id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("select status, reason from shipment where order_id = $1")
            .bind(order_id)
            .fetch_optional(&pool)
            .await
            .map_err(internal)?;
    let (status, reason) = row.ok_or_else(not_found)?;
    Ok(Json(ShipmentView {
        order_id,
        status,
        reason,
    }))
}
