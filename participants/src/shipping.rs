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

use crate::common::{Chaos, Decide, answers, internal, with_earlier, wrong_command};

/// Migrations of the shipping database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/shipping");

/// Shipping's decisions.
pub struct Shipping;

impl Decide for Shipping {
    const PARTICIPANT: Participant = Participant::Shipping;

    /// One claim statement for every command of the batch, one read of earlier decisions when
    /// there are any.
    async fn decide(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        chaos: &Chaos,
    ) -> Result<Vec<Result<Body, HandlerError>>, HandlerError> {
        let rate = chaos.success_rate.unwrap_or(1.0);
        let mut out: Vec<Option<Result<Body, HandlerError>>> =
            commands.iter().map(|_| None).collect();
        let mut idx = Vec::with_capacity(commands.len());
        let mut ids = Vec::with_capacity(commands.len());
        let mut statuses = Vec::with_capacity(commands.len());
        let mut customers = Vec::with_capacity(commands.len());
        let mut reasons = Vec::with_capacity(commands.len());
        for (i, command) in commands.iter().enumerate() {
            let (order_id, customer_id, status, reason) = match command {
                Body::ShipOrder(c) => {
                    if rate >= 1.0 || rand::random_bool(rate.clamp(0.0, 1.0)) {
                        (c.order_id, c.customer_id.as_str(), "shipped", None)
                    } else {
                        let reason = Some("carrier could not ship the order");
                        (c.order_id, c.customer_id.as_str(), "failed", reason)
                    }
                }
                Body::CancelShipment(c) => (
                    c.order_id,
                    "",
                    "cancelled",
                    Some("shipment cancelled before it went out"),
                ),
                other => {
                    out[i] = Some(Err(wrong_command(Self::PARTICIPANT, other)));
                    continue;
                }
            };
            idx.push(i);
            ids.push(order_id);
            statuses.push(status);
            customers.push(customer_id);
            reasons.push(reason);
        }
        if !ids.is_empty() {
            // A cancel that comes first stops the shipment; one that comes late gets the stored
            // `shipped`.
            let claimed: Vec<Decision> = sqlx::query_as(
                "insert into shipment (order_id, status, customer_id, reason) \
                 select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) \
                 on conflict do nothing returning order_id, status, reason",
            )
            .bind(&ids)
            .bind(&statuses)
            .bind(&customers)
            .bind(&reasons)
            .fetch_all(&mut *conn)
            .await?;
            for (_, status, _) in &claimed {
                metrics::counter!("shipments_total", "result" => status.clone()).increment(1);
            }
            let mut decided = with_earlier(
                conn,
                &ids,
                claimed,
                |d| d.0,
                "select order_id, status, reason from shipment where order_id = any($1)",
            )
            .await?;
            for (&i, order_id) in idx.iter().zip(&ids) {
                out[i] = Some(match decided.remove(order_id) {
                    Some((order_id, status, reason)) => Ok(reply(order_id, &status, reason)),
                    None => Err(HandlerError::Transient("shipping decision vanished".into())),
                });
            }
        }
        Ok(answers(out))
    }
}

type Decision = (Uuid, String, Option<String>);

/// The reply a stored decision gives, every time it is asked.
fn reply(order_id: Uuid, status: &str, reason: Option<String>) -> Body {
    match status {
        "shipped" => Body::Shipped(OrderRef { order_id }),
        _ => Body::ShippingFailed(Refusal {
            order_id,
            reason: reason.unwrap_or_else(|| "shipment failed".into()),
        }),
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
