//! Inventory: holds stock for every line of an order, or for none, and gives it back once.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use saga_shared_events::auth::{Admin, Authorized, Read};
use saga_shared_events::consumer::HandlerError;
use saga_shared_events::contract::{Body, Line, OrderRef, Participant, Refusal};
use saga_shared_events::http::{ApiJson, FieldError, Problem};

use crate::common::{Chaos, Decide, check_path_id, internal, wrong_command};

/// Migrations of the inventory database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/inventory");

/// Inventory's decisions.
pub struct Inventory;

impl Decide for Inventory {
    const PARTICIPANT: Participant = Participant::Inventory;
    const BATCHES: bool = false;

    async fn decide(
        &self,
        conn: &mut PgConnection,
        command: &Body,
        _chaos: &Chaos,
    ) -> Result<Body, HandlerError> {
        match command {
            Body::ReserveInventory(c) => reserve(conn, c.order_id, &c.lines).await,
            Body::ReleaseInventory(c) => release(conn, c.order_id).await,
            other => Err(wrong_command(Self::PARTICIPANT, other)),
        }
    }
}

async fn reserve(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[Line],
) -> Result<Body, HandlerError> {
    if lines.is_empty() || lines.iter().any(|l| l.quantity <= 0) {
        return Err(HandlerError::Permanent(
            "reservation lines must be positive".into(),
        ));
    }
    // Claim the decision first: a concurrent duplicate waits here, then reads our decision.
    let claimed = sqlx::query(
        "insert into reservation (order_id, status, lines) values ($1, 'reserved', $2) \
         on conflict do nothing",
    )
    .bind(order_id)
    .bind(SqlJson(lines))
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !claimed {
        let (status, reason): (String, Option<String>) =
            sqlx::query_as("select status, reason from reservation where order_id = $1")
                .bind(order_id)
                .fetch_one(&mut *conn)
                .await?;
        return Ok(match status.as_str() {
            "reserved" => Body::InventoryReserved(OrderRef { order_id }),
            "released" => Body::InventoryRejected(Refusal {
                order_id,
                reason: reason
                    .unwrap_or_else(|| "order was cancelled before the reservation".into()),
            }),
            _ => Body::InventoryRejected(Refusal {
                order_id,
                reason: reason.unwrap_or_default(),
            }),
        });
    }
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for l in lines {
        *wanted.entry(l.product_id.as_str()).or_default() += i64::from(l.quantity);
    }
    let ids: Vec<&str> = wanted.keys().copied().collect();
    // Locks in product order, so concurrent reservations never deadlock.
    let stock: Vec<(String, i64)> = sqlx::query_as(
        "select product_id, available from product where product_id = any($1) \
         order by product_id for update",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let stock: BTreeMap<String, i64> = stock.into_iter().collect();
    let mut problems = Vec::new();
    for (product, qty) in &wanted {
        match stock.get(*product) {
            None => problems.push(format!("unknown product {product}")),
            Some(avail) if avail < qty => problems.push(format!(
                "insufficient stock for {product}: {qty} wanted, {avail} available"
            )),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        let reason = problems.join("; ");
        sqlx::query("update reservation set status = 'rejected', reason = $2, updated_at = now() where order_id = $1")
            .bind(order_id)
            .bind(&reason)
            .execute(&mut *conn)
            .await?;
        metrics::counter!("inventory_reservations_total", "result" => "rejected").increment(1);
        return Ok(Body::InventoryRejected(Refusal { order_id, reason }));
    }
    let qtys: Vec<i64> = wanted.values().copied().collect();
    sqlx::query(
        "update product p set available = p.available - t.q, reserved = p.reserved + t.q, \
         updated_at = now() from unnest($1::text[], $2::int8[]) as t(id, q) where p.product_id = t.id",
    )
    .bind(&ids)
    .bind(&qtys)
    .execute(&mut *conn)
    .await?;
    metrics::counter!("inventory_reservations_total", "result" => "reserved").increment(1);
    Ok(Body::InventoryReserved(OrderRef { order_id }))
}

async fn release(conn: &mut PgConnection, order_id: Uuid) -> Result<Body, HandlerError> {
    // A release before any reservation leaves a tombstone, so the late reservation is refused.
    let tombstone = sqlx::query(
        "insert into reservation (order_id, status, lines, reason) \
         values ($1, 'released', '[]', 'order was cancelled before the reservation') \
         on conflict do nothing",
    )
    .bind(order_id)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !tombstone {
        let (status, SqlJson(lines)): (String, SqlJson<Vec<Line>>) =
            sqlx::query_as("select status, lines from reservation where order_id = $1 for update")
                .bind(order_id)
                .fetch_one(&mut *conn)
                .await?;
        if status == "reserved" {
            let mut back: BTreeMap<&str, i64> = BTreeMap::new();
            for l in &lines {
                *back.entry(l.product_id.as_str()).or_default() += i64::from(l.quantity);
            }
            let ids: Vec<&str> = back.keys().copied().collect();
            let qtys: Vec<i64> = back.values().copied().collect();
            sqlx::query(
                "update product p set available = p.available + t.q, reserved = p.reserved - t.q, \
                 updated_at = now() from unnest($1::text[], $2::int8[]) as t(id, q) \
                 where p.product_id = t.id",
            )
            .bind(&ids)
            .bind(&qtys)
            .execute(&mut *conn)
            .await?;
            sqlx::query("update reservation set status = 'released', updated_at = now() where order_id = $1")
                .bind(order_id)
                .execute(&mut *conn)
                .await?;
            metrics::counter!("inventory_reservations_total", "result" => "released").increment(1);
        }
    }
    Ok(Body::InventoryReleased(OrderRef { order_id }))
}

/// A product's stock.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Product {
    /// Id.
    pub product_id: String,
    /// Units free to reserve.
    pub available: i64,
    /// Units held by reservations.
    pub reserved: i64,
}

/// Body of `PUT /products/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    available: i64,
}

/// `GET/PUT /products/{id}`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/products/{id}", get(get_product).put(put_product))
        .with_state(pool)
}

async fn get_product(
    _auth: Authorized<Read>,
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<Product>, Problem> {
    check_path_id(&id)?;
    let row: Option<(String, i64, i64)> =
        sqlx::query_as("select product_id, available, reserved from product where product_id = $1")
            .bind(&id)
            .fetch_optional(&pool)
            .await
            .map_err(internal)?;
    match row {
        Some((product_id, available, reserved)) => Ok(Json(Product {
            product_id,
            available,
            reserved,
        })),
        None => Err(Problem::not_found(format!("product {id:?} not found"))),
    }
}

async fn put_product(
    _auth: Authorized<Admin>,
    State(pool): State<PgPool>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetStock>,
) -> Result<Json<Product>, Problem> {
    if !(1..=64).contains(&id.chars().count()) {
        return Err(Problem::invalid(vec![FieldError::new(
            "product_id",
            "must be 1 to 64 characters",
        )]));
    }
    if !(0..=1_000_000_000).contains(&body.available) {
        return Err(Problem::invalid(vec![FieldError::new(
            "available",
            "must be 0 to 1000000000",
        )]));
    }
    let (product_id, available, reserved): (String, i64, i64) = sqlx::query_as(
        "insert into product (product_id, available) values ($1, $2) \
         on conflict (product_id) do update set available = excluded.available, updated_at = now() \
         returning product_id, available, reserved",
    )
    .bind(&id)
    .bind(body.available)
    .fetch_one(&pool)
    .await
    .map_err(internal)?;
    Ok(Json(Product {
        product_id,
        available,
        reserved,
    }))
}
