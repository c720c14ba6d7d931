//! The audit: cross-checks the four databases and reports every violation of the saga's
//! guarantees. Used by `sagactl audit`, `sagactl chaos` and the fault tests.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use saga_shared_events::contract::Line;

/// Connections to the four service databases.
#[derive(Clone)]
pub struct AuditDbs {
    /// `saga_orchestrator`.
    pub orchestrator: PgPool,
    /// `saga_inventory`.
    pub inventory: PgPool,
    /// `saga_payment`.
    pub payment: PgPool,
    /// `saga_shipping`.
    pub shipping: PgPool,
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct AuditScope {
    /// Only these orders (all when `None`); effects of other orders are then not checked.
    pub orders: Option<Vec<Uuid>>,
    /// Every saga should have ended (the run is over): anything in flight is a violation, and so
    /// is an unpublished outbox row.
    pub expect_settled: bool,
    /// Stock each product had before the run: `available + held` must still equal it.
    pub initial_stock: BTreeMap<String, i64>,
}

/// The audit's findings.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditReport {
    /// Sagas checked.
    pub sagas: usize,
    /// Sagas per status.
    pub by_status: BTreeMap<String, usize>,
    /// Every violation, in words.
    pub violations: Vec<String>,
}

impl AuditReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

type SagaRow = (Uuid, String, i64);

/// Runs every check.
pub async fn audit(dbs: &AuditDbs, scope: &AuditScope) -> Result<AuditReport, sqlx::Error> {
    let sagas: Vec<SagaRow> = match &scope.orders {
        Some(ids) => {
            sqlx::query_as(
                "select order_id, status, total_cents from saga_order where order_id = any($1)",
            )
            .bind(ids)
            .fetch_all(&dbs.orchestrator)
            .await?
        }
        None => {
            sqlx::query_as("select order_id, status, total_cents from saga_order")
                .fetch_all(&dbs.orchestrator)
                .await?
        }
    };
    let ids: Vec<Uuid> = sagas.iter().map(|s| s.0).collect();
    let filter = scope.orders.is_some();
    let reservations: HashMap<Uuid, (String, Json<Vec<Line>>)> = fetch_map(
        &dbs.inventory,
        "select order_id, status, lines from reservation where not $2 or order_id = any($1)",
        &ids,
        filter,
    )
    .await?;
    let payments: HashMap<Uuid, (String, i64)> = fetch_map(
        &dbs.payment,
        "select order_id, status, amount_cents from payment where not $2 or order_id = any($1)",
        &ids,
        filter,
    )
    .await?;
    let shipments: HashMap<Uuid, (String,)> = fetch_map(
        &dbs.shipping,
        "select order_id, status from shipment where not $2 or order_id = any($1)",
        &ids,
        filter,
    )
    .await?;

    let mut report = AuditReport {
        sagas: sagas.len(),
        ..Default::default()
    };
    let v = &mut report.violations;
    if let Some(wanted) = &scope.orders
        && wanted.len() != sagas.len()
    {
        v.push(format!(
            "{} of {} orders are unknown to the orchestrator",
            wanted.len() - sagas.len(),
            wanted.len()
        ));
    }
    let known: HashMap<Uuid, &SagaRow> = sagas.iter().map(|s| (s.0, s)).collect();
    for (id, status, total) in &sagas {
        *report.by_status.entry(status.clone()).or_default() += 1;
        let reservation = reservations.get(id).map(|r| r.0.as_str());
        let payment = payments.get(id);
        let shipment = shipments.get(id).map(|s| s.0.as_str());
        match status.as_str() {
            "shipped" => {
                if reservation != Some("reserved") {
                    v.push(format!(
                        "order {id} shipped but its reservation is {reservation:?}"
                    ));
                }
                match payment {
                    Some((s, amount)) if s == "charged" => {
                        if amount != total {
                            v.push(format!(
                                "order {id} charged {amount} cents, its total is {total}"
                            ));
                        }
                    }
                    other => v.push(format!(
                        "order {id} shipped without exactly one unrefunded charge ({other:?})"
                    )),
                }
                if shipment != Some("shipped") {
                    v.push(format!(
                        "order {id} shipped but its shipment is {shipment:?}"
                    ));
                }
            }
            "cancelled" => {
                if reservation == Some("reserved") {
                    v.push(format!(
                        "order {id} cancelled with its reservation still held"
                    ));
                }
                if matches!(payment, Some((s, _)) if s == "charged") {
                    v.push(format!("order {id} cancelled with an unrefunded charge"));
                }
                if shipment == Some("shipped") {
                    v.push(format!("order {id} cancelled but shipped"));
                }
            }
            // Failed sagas await an operator; their effects are whatever the stuck step left.
            "failed" => {}
            other if scope.expect_settled => v.push(format!("order {id} is still {other}")),
            _ => {}
        }
    }
    if !filter {
        for (id, (s, _)) in &reservations {
            if s == "reserved" && !known.contains_key(id) {
                v.push(format!("reservation held for unknown order {id}"));
            }
        }
        for (id, (s, _)) in &payments {
            if s == "charged" && !known.contains_key(id) {
                v.push(format!("charge for unknown order {id}"));
            }
        }
    }

    // The per-product counter must equal what the held reservations say.
    let products: Vec<(String, i64, i64)> =
        sqlx::query_as("select product_id, available, reserved from product")
            .fetch_all(&dbs.inventory)
            .await?;
    let held: Vec<(String, i64)> = sqlx::query_as(
        "select l->>'product_id', sum((l->>'quantity')::bigint)::bigint from reservation r, \
         jsonb_array_elements(r.lines) l where r.status = 'reserved' group by 1",
    )
    .fetch_all(&dbs.inventory)
    .await?;
    let held: HashMap<String, i64> = held.into_iter().collect();
    for (product, available, reserved) in &products {
        let expected = held.get(product).copied().unwrap_or(0);
        if *reserved != expected {
            v.push(format!(
                "product {product}: counter says {reserved} held, reservations say {expected}"
            ));
        }
        if let Some(initial) = scope.initial_stock.get(product)
            && available + reserved != *initial
        {
            v.push(format!(
                "product {product}: stock not conserved: {available} available + {reserved} held != {initial} initial"
            ));
        }
    }

    if scope.expect_settled {
        for (name, pool) in [
            ("orchestrator", &dbs.orchestrator),
            ("inventory", &dbs.inventory),
            ("payment", &dbs.payment),
            ("shipping", &dbs.shipping),
        ] {
            let pending = saga_shared_events::outbox::pending(pool).await?;
            if pending > 0 {
                v.push(format!("{pending} unpublished outbox rows in {name}"));
            }
        }
    }
    Ok(report)
}

async fn fetch_map<T>(
    pool: &PgPool,
    sql: &'static str,
    ids: &[Uuid],
    filter: bool,
) -> Result<HashMap<Uuid, T>, sqlx::Error>
where
    T: TupleTail,
{
    let rows: Vec<sqlx::postgres::PgRow> = sqlx::query(sql)
        .bind(ids)
        .bind(filter)
        .fetch_all(pool)
        .await?;
    let mut map = HashMap::with_capacity(rows.len());
    for row in rows {
        use sqlx::Row;
        let id: Uuid = row.try_get(0)?;
        map.insert(id, T::from_tail(&row)?);
    }
    Ok(map)
}

/// Decodes the columns after the leading `order_id`.
pub trait TupleTail: Sized {
    /// From columns 1.. of `row`.
    fn from_tail(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error>;
}

impl TupleTail for (String,) {
    fn from_tail(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok((row.try_get(1)?,))
    }
}

impl TupleTail for (String, i64) {
    fn from_tail(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok((row.try_get(1)?, row.try_get(2)?))
    }
}

impl TupleTail for (String, Json<Vec<Line>>) {
    fn from_tail(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok((row.try_get(1)?, row.try_get(2)?))
    }
}
