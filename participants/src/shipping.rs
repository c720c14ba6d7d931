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

use saga_shared_events::outbox::OutgoingMessage;

use crate::common::{
    AtOnce, Chaos, Decide, answers, chance, claim_at_once_sql, internal, with_earlier,
    wrong_command,
};

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
        let mut plan = ShipPlan::with_capacity(commands.len());
        for (i, command) in commands.iter().enumerate() {
            if plan.draw(command, rate) {
                idx.push(i);
            } else {
                out[i] = Some(Err(wrong_command(Self::PARTICIPANT, command)));
            }
        }
        if !idx.is_empty() {
            // A cancel that comes first stops the shipment; one that comes late gets the stored
            // `shipped`.
            let claimed: Vec<Decision> = plan
                .bind(sqlx::query_as(CLAIM_SQL))
                .fetch_all(&mut *conn)
                .await?;
            for (_, status, _) in &claimed {
                metrics::counter!("shipments_total", "result" => status.clone()).increment(1);
            }
            let mut decided = with_earlier(
                conn,
                &plan.ids,
                claimed,
                |d| d.0,
                "select order_id, status, reason from shipment where order_id = any($1)",
            )
            .await?;
            for (&i, order_id) in idx.iter().zip(&plan.ids) {
                out[i] = Some(match decided.remove(order_id) {
                    Some((order_id, status, reason)) => Ok(reply(order_id, &status, reason)),
                    None => Err(HandlerError::Transient("shipping decision vanished".into())),
                });
            }
        }
        Ok(answers(out))
    }

    /// Every ship and cancel is a claim: on first delivery its reply is the decision drawn here.
    async fn decide_at_once(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        chaos: &Chaos,
        at_once: &AtOnce<'_>,
    ) -> Option<Result<Vec<OutgoingMessage>, sqlx::Error>> {
        let rate = chaos.success_rate.unwrap_or(1.0);
        let mut plan = ShipPlan::with_capacity(commands.len());
        for command in commands {
            if !plan.draw(command, rate) {
                return None;
            }
        }
        let replies = (plan.ids.iter().zip(&plan.statuses).zip(&plan.reasons))
            .map(|((id, status), reason)| reply(*id, status, reason.map(str::to_owned)))
            .collect();
        let query = sqlx::query_as(sqlx::AssertSqlSafe(SHIP_AT_ONCE_SQL.as_str()));
        let (query, statuses) = (plan.bind(query), &plan.statuses);
        Some(
            at_once
                .write(conn, query, replies, "shipments_total", statuses)
                .await,
        )
    }
}

/// The decisions drawn for a batch of commands, as the columns of their rows.
struct ShipPlan<'a> {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    customers: Vec<&'a str>,
    reasons: Vec<Option<&'static str>>,
}

impl<'a> ShipPlan<'a> {
    fn with_capacity(n: usize) -> Self {
        ShipPlan {
            ids: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            customers: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n),
        }
    }

    /// Adds the decision for `command`: a shipment with probability `rate`, or a cancellation;
    /// false for a command that is not shipping's.
    fn draw(&mut self, command: &'a Body, rate: f64) -> bool {
        let (order_id, customer_id, status, reason) = match command {
            Body::ShipOrder(c) => {
                if chance(rate) {
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
            _ => return false,
        };
        self.ids.push(order_id);
        self.statuses.push(status);
        self.customers.push(customer_id);
        self.reasons.push(reason);
        true
    }

    /// Binds the four columns of [`CLAIM_SQL`], as `$1` to `$4`.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.statuses)
            .bind(&self.customers)
            .bind(&self.reasons)
    }
}

/// Claims the decision of every order not decided before.
const CLAIM_SQL: &str = "insert into shipment (order_id, status, customer_id, reason) \
     select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) \
     on conflict do nothing returning order_id, status, reason";

/// The claims, inbox entries and outbox row of a batch of first commands, in one statement.
static SHIP_AT_ONCE_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| claim_at_once_sql(CLAIM_SQL, 4));

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
