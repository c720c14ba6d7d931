//! Inventory: holds stock for every line of an order, or for none, and gives it back once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use saga_shared_events::auth::{Admin, Authorized, Read};
use saga_shared_events::consumer::HandlerError;
use saga_shared_events::contract::{Body, Line, OrderRef, Participant, Refusal, ReserveInventory};
use saga_shared_events::http::{ApiJson, FieldError, Problem};
use saga_shared_events::outbox::OutgoingMessage;

use crate::common::{
    AtOnce, Chaos, Decide, answers, at_once_sql, check_path_id, internal, wrong_command,
};

/// Migrations of the inventory database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/inventory");

/// Inventory's decisions.
#[derive(Default)]
pub struct Inventory {
    /// Stock of products as this process's last one-statement write left it. A batch whose
    /// products are all here, and whose reservations all succeed on it, skips the stock read:
    /// its write takes each product only if the stock is still this (else it aborts and the batch
    /// goes the locking way), so a stale value costs a retry, never a wrong answer. A refusal is
    /// never decided on it: a batch with one goes back to reading the stock.
    stock: std::sync::Mutex<HashMap<String, i64>>,
}

impl Inventory {
    /// The cached stock of every one of `products`, if all are cached.
    fn cached_stock(&self, products: &[&str]) -> Option<BTreeMap<String, i64>> {
        let stock = self.stock.lock().ok()?;
        products
            .iter()
            .map(|p| stock.get(*p).map(|n| ((*p).to_owned(), *n)))
            .collect()
    }

    /// Records stock as committed (`Some`), or forgets all of it (`None`: changed elsewhere).
    fn remember_stock(&self, committed: Option<BTreeMap<String, i64>>) {
        if let Ok(mut stock) = self.stock.lock() {
            match committed {
                Some(committed) => stock.extend(committed),
                None => stock.clear(),
            }
        }
    }

    /// Forgets the stock of `products`.
    fn forget_stock(&self, products: &[&str]) {
        if let Ok(mut stock) = self.stock.lock() {
            for p in products {
                stock.remove(*p);
            }
        }
    }
}

impl Decide for Inventory {
    const PARTICIPANT: Participant = Participant::Inventory;

    /// Reservation rows first (claims, tombstones, locks, in order-id order), then every product
    /// the batch touches, locked in product order in one statement so concurrent batches never
    /// deadlock; stock is checked in memory and written back with one statement.
    async fn decide(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        _chaos: &Chaos,
    ) -> Result<Vec<Result<Body, HandlerError>>, HandlerError> {
        let mut out: Vec<Option<Result<Body, HandlerError>>> =
            commands.iter().map(|_| None).collect();
        let mut reserves: Vec<(usize, Uuid, &[Line])> = Vec::new();
        let mut releases: Vec<(usize, Uuid)> = Vec::new();
        for (i, c) in commands.iter().enumerate() {
            match c {
                Body::ReserveInventory(c) => {
                    if c.lines.is_empty() || c.lines.iter().any(|l| l.quantity <= 0) {
                        out[i] = Some(Err(HandlerError::Permanent(
                            "reservation lines must be positive".into(),
                        )));
                    } else {
                        reserves.push((i, c.order_id, &c.lines));
                    }
                }
                Body::ReleaseInventory(c) => releases.push((i, c.order_id)),
                other => out[i] = Some(Err(wrong_command(Self::PARTICIPANT, other))),
            }
        }
        let claimed = claim_reservations(conn, &reserves, &mut out).await?;
        let to_release = claim_releases(conn, &releases, &mut out).await?;

        let mut touched: BTreeSet<&str> = BTreeSet::new();
        for (_, _, wanted) in &claimed {
            touched.extend(wanted.keys().copied());
        }
        for (_, _, lines) in &to_release {
            touched.extend(lines.iter().map(|l| l.product_id.as_str()));
        }
        let ids: Vec<&str> = touched.into_iter().collect();
        // This path moves their stock in a transaction committed later: read it next time.
        self.forget_stock(&ids);
        let mut stock: BTreeMap<String, i64> = if ids.is_empty() {
            BTreeMap::new()
        } else {
            sqlx::query_as::<_, (String, i64)>(
                "select product_id, available from product where product_id = any($1) \
                 order by product_id for update",
            )
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
        };
        // Net change per product: (available, reserved).
        let mut delta: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let mut settled: Vec<(Uuid, &str, Option<String>)> = Vec::new();
        for (i, order_id, lines) in &to_release {
            for l in lines {
                let q = i64::from(l.quantity);
                if let Some(avail) = stock.get_mut(&l.product_id) {
                    *avail += q;
                    let d = delta.entry(l.product_id.clone()).or_default();
                    d.0 += q;
                    d.1 -= q;
                }
            }
            settled.push((*order_id, "released", None));
            metrics::counter!("inventory_reservations_total", "result" => "released").increment(1);
            out[*i] = Some(Ok(Body::InventoryReleased(OrderRef {
                order_id: *order_id,
            })));
        }
        for (i, order_id, wanted) in &claimed {
            if let Err(reason) = take(&mut stock, wanted) {
                settled.push((*order_id, "rejected", Some(reason.clone())));
                metrics::counter!("inventory_reservations_total", "result" => "rejected")
                    .increment(1);
                out[*i] = Some(Ok(Body::InventoryRejected(Refusal {
                    order_id: *order_id,
                    reason,
                })));
            } else {
                for (product, qty) in wanted {
                    let d = delta.entry((*product).to_owned()).or_default();
                    d.0 -= qty;
                    d.1 += qty;
                }
                metrics::counter!("inventory_reservations_total", "result" => "reserved")
                    .increment(1);
                out[*i] = Some(Ok(Body::InventoryReserved(OrderRef {
                    order_id: *order_id,
                })));
            }
        }
        delta.retain(|_, d| *d != (0, 0));
        if !delta.is_empty() {
            let products: Vec<&str> = delta.keys().map(String::as_str).collect();
            let available: Vec<i64> = delta.values().map(|d| d.0).collect();
            let reserved: Vec<i64> = delta.values().map(|d| d.1).collect();
            sqlx::query(
                "update product p set available = p.available + t.a, reserved = p.reserved + t.r, \
                 updated_at = now() from unnest($1::text[], $2::int8[], $3::int8[]) as t(id, a, r) \
                 where p.product_id = t.id",
            )
            .bind(&products)
            .bind(&available)
            .bind(&reserved)
            .execute(&mut *conn)
            .await?;
        }
        if !settled.is_empty() {
            let orders: Vec<Uuid> = settled.iter().map(|s| s.0).collect();
            let statuses: Vec<&str> = settled.iter().map(|s| s.1).collect();
            let reasons: Vec<Option<&str>> = settled.iter().map(|s| s.2.as_deref()).collect();
            sqlx::query(
                "update reservation r set status = t.status, reason = coalesce(t.reason, r.reason), \
                 updated_at = now() from unnest($1::uuid[], $2::text[], $3::text[]) as t(id, status, reason) \
                 where r.order_id = t.id",
            )
            .bind(&orders)
            .bind(&statuses)
            .bind(&reasons)
            .execute(&mut *conn)
            .await?;
        }
        Ok(answers(out))
    }

    /// A batch of reserves only: stock is read without a lock, each first reservation decided
    /// in memory, and the statement writes the products only if their stock is still what was
    /// read (else nothing, and the batch goes the locking way).
    async fn decide_at_once(
        &self,
        conn: &mut PgConnection,
        commands: &[&Body],
        _chaos: &Chaos,
        at_once: &AtOnce<'_>,
    ) -> Option<Result<Vec<OutgoingMessage>, sqlx::Error>> {
        let reserves: Vec<&ReserveInventory> = commands
            .iter()
            .map(|c| match c {
                Body::ReserveInventory(r)
                    if !r.lines.is_empty() && r.lines.iter().all(|l| l.quantity > 0) =>
                {
                    Some(r)
                }
                _ => None,
            })
            .collect::<Option<_>>()?;
        let wants: Vec<BTreeMap<&str, i64>> = reserves.iter().map(|r| wanted(&r.lines)).collect();
        let products: BTreeSet<&str> = wants.iter().flat_map(|w| w.keys().copied()).collect();
        let products: Vec<&str> = products.into_iter().collect();
        let cached = self
            .cached_stock(&products)
            .map(|was| (decide_reserves(&reserves, &wants, &was), was))
            .filter(|(d, _)| d.refused == 0);
        let (decided, was) = match cached {
            Some(decided) => decided,
            None => {
                let read: Result<Vec<(String, i64)>, sqlx::Error> = sqlx::query_as(
                    "select product_id, available from product where product_id = any($1)",
                )
                .bind(&products)
                .fetch_all(&mut *conn)
                .await;
                let was: BTreeMap<String, i64> = match read {
                    Ok(rows) => rows.into_iter().collect(),
                    Err(e) => return Some(Err(e)),
                };
                (decide_reserves(&reserves, &wants, &was), was)
            }
        };
        let Reserves {
            replies,
            ids,
            statuses,
            lines,
            reasons,
            stock,
            ..
        } = decided;
        let (mut taken, mut taken_n, mut taken_was) = (vec![], vec![], vec![]);
        for (product, before) in &was {
            let after = stock.get(product).copied().unwrap_or(*before);
            if after != *before {
                taken.push(product.as_str());
                taken_n.push(before - after);
                taken_was.push(*before);
            }
        }
        let query = sqlx::query_as(sqlx::AssertSqlSafe(RESERVE_AT_ONCE_SQL.as_str()))
            .bind(&ids)
            .bind(&statuses)
            .bind(&lines)
            .bind(&reasons)
            .bind(&taken)
            .bind(&taken_n)
            .bind(&taken_was);
        let written = at_once
            .write(
                conn,
                query,
                replies,
                "inventory_reservations_total",
                &statuses,
            )
            .await;
        // The statement committed on its own: the stock is now what was computed.
        self.remember_stock(written.is_ok().then_some(stock));
        Some(written)
    }
}

/// First reservations decided in memory on `was`, in order, as the write's columns.
struct Reserves {
    replies: Vec<Body>,
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    lines: Vec<String>,
    reasons: Vec<Option<String>>,
    /// The stock once they are all taken.
    stock: BTreeMap<String, i64>,
    refused: usize,
}

fn decide_reserves(
    reserves: &[&ReserveInventory],
    wants: &[BTreeMap<&str, i64>],
    was: &BTreeMap<String, i64>,
) -> Reserves {
    let mut d = Reserves {
        replies: Vec::with_capacity(reserves.len()),
        ids: Vec::with_capacity(reserves.len()),
        statuses: Vec::with_capacity(reserves.len()),
        lines: Vec::with_capacity(reserves.len()),
        reasons: Vec::with_capacity(reserves.len()),
        stock: was.clone(),
        refused: 0,
    };
    for (r, wanted) in reserves.iter().zip(wants) {
        let (status, reason) = match take(&mut d.stock, wanted) {
            Ok(()) => {
                d.replies.push(Body::InventoryReserved(OrderRef {
                    order_id: r.order_id,
                }));
                ("reserved", None)
            }
            Err(reason) => {
                d.refused += 1;
                d.replies.push(Body::InventoryRejected(Refusal {
                    order_id: r.order_id,
                    reason: reason.clone(),
                }));
                ("rejected", Some(reason))
            }
        };
        d.ids.push(r.order_id);
        d.statuses.push(status);
        d.lines
            .push(serde_json::to_string(&r.lines).unwrap_or_else(|_| "[]".into()));
        d.reasons.push(reason);
    }
    d
}

/// Units wanted per product of an order's lines.
fn wanted(lines: &[Line]) -> BTreeMap<&str, i64> {
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for l in lines {
        *wanted.entry(l.product_id.as_str()).or_default() += i64::from(l.quantity);
    }
    wanted
}

/// Takes every line of a reservation from `stock`, or none of them: the reason when a product
/// is unknown or short.
fn take(stock: &mut BTreeMap<String, i64>, wanted: &BTreeMap<&str, i64>) -> Result<(), String> {
    let mut problems = Vec::new();
    for (product, qty) in wanted {
        match stock.get(*product) {
            None => problems.push(format!("unknown product {product}")),
            Some(avail) if avail < qty => problems.push(format!(
                "insufficient stock for {product}: {qty} wanted, {avail} available"
            )),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    for (product, qty) in wanted {
        if let Some(avail) = stock.get_mut(*product) {
            *avail -= qty;
        }
    }
    Ok(())
}

/// The reservations of a batch of first reserves, their stock taken from what was read, and the
/// product updates, each meant only for the stock it was computed from: in one statement.
static RESERVE_AT_ONCE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    at_once_sql(
        "c as (insert into reservation (order_id, status, lines, reason) \
           select id, status, lines::jsonb, reason \
           from unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) as t(id, status, lines, reason) \
           on conflict do nothing returning 1), \
         p as (update product p set available = p.available - t.n, reserved = p.reserved + t.n, \
           updated_at = now() from unnest($5::text[], $6::int8[], $7::int8[]) as t(id, n, was) \
           where p.product_id = t.id and p.available = t.was returning 1)",
        "(select count(*) from c) + (select count(*) from p)",
        "cardinality($1::uuid[]) + cardinality($5::text[])",
        7,
    )
});

/// A reservation this batch claimed: index, order and units wanted per product.
type Claimed<'a> = (usize, Uuid, BTreeMap<&'a str, i64>);

/// Claims the decision of every reservation not decided before (a concurrent duplicate waits,
/// then reads ours); answers the others from what is stored. Returns the claimed ones.
async fn claim_reservations<'a>(
    conn: &mut PgConnection,
    reserves: &[(usize, Uuid, &'a [Line])],
    out: &mut [Option<Result<Body, HandlerError>>],
) -> Result<Vec<Claimed<'a>>, HandlerError> {
    if reserves.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = reserves.iter().map(|r| r.1).collect();
    let lines: Vec<String> = reserves
        .iter()
        .map(|r| serde_json::to_string(r.2).unwrap_or_else(|_| "[]".into()))
        .collect();
    let new: HashSet<Uuid> = sqlx::query_scalar::<_, Uuid>(
        "insert into reservation (order_id, status, lines) \
         select id, 'reserved', lines::jsonb from unnest($1::uuid[], $2::text[]) as t(id, lines) \
         on conflict do nothing returning order_id",
    )
    .bind(&ids)
    .bind(&lines)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let earlier: Vec<Uuid> = ids.iter().copied().filter(|id| !new.contains(id)).collect();
    let mut stored: HashMap<Uuid, (String, Option<String>)> = HashMap::new();
    if !earlier.is_empty() {
        let rows: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
            "select order_id, status, reason from reservation where order_id = any($1)",
        )
        .bind(&earlier)
        .fetch_all(&mut *conn)
        .await?;
        stored.extend(rows.into_iter().map(|(id, s, r)| (id, (s, r))));
    }
    let mut claimed = Vec::new();
    for &(i, order_id, lines) in reserves {
        if new.contains(&order_id) {
            claimed.push((i, order_id, wanted(lines)));
            continue;
        }
        out[i] = Some(match stored.remove(&order_id) {
            Some((status, _)) if status == "reserved" => {
                Ok(Body::InventoryReserved(OrderRef { order_id }))
            }
            Some((status, reason)) => Ok(Body::InventoryRejected(Refusal {
                order_id,
                reason: reason.unwrap_or_else(|| {
                    if status == "released" {
                        "order was cancelled before the reservation".into()
                    } else {
                        String::new()
                    }
                }),
            })),
            None => Err(HandlerError::Transient("reservation vanished".into())),
        });
    }
    Ok(claimed)
}

/// Leaves a tombstone for each release that comes before its reservation (so the late
/// reservation is refused, never leaked) and locks the others; returns the held reservations
/// to give back. Releases with nothing to give back are answered here.
async fn claim_releases(
    conn: &mut PgConnection,
    releases: &[(usize, Uuid)],
    out: &mut [Option<Result<Body, HandlerError>>],
) -> Result<Vec<(usize, Uuid, Vec<Line>)>, HandlerError> {
    if releases.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = releases.iter().map(|r| r.1).collect();
    let tombstones: HashSet<Uuid> = sqlx::query_scalar::<_, Uuid>(
        "insert into reservation (order_id, status, lines, reason) \
         select id, 'released', '[]', 'order was cancelled before the reservation' \
         from unnest($1::uuid[]) as id on conflict do nothing returning order_id",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let held: Vec<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| !tombstones.contains(id))
        .collect();
    let mut reserved: HashMap<Uuid, Vec<Line>> = HashMap::new();
    if !held.is_empty() {
        let rows: Vec<(Uuid, SqlJson<Vec<Line>>)> = sqlx::query_as(
            "select order_id, lines from reservation where order_id = any($1) \
             and status = 'reserved' order by order_id for update",
        )
        .bind(&held)
        .fetch_all(&mut *conn)
        .await?;
        reserved.extend(rows.into_iter().map(|(id, SqlJson(lines))| (id, lines)));
    }
    let mut to_release = Vec::new();
    for &(i, order_id) in releases {
        match reserved.remove(&order_id) {
            Some(lines) => to_release.push((i, order_id, lines)),
            None => out[i] = Some(Ok(Body::InventoryReleased(OrderRef { order_id }))),
        }
    }
    Ok(to_release)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(product: &str, quantity: i32) -> Line {
        Line {
            product_id: product.into(),
            quantity,
        }
    }

    #[test]
    fn a_reservation_takes_all_of_its_lines_or_none() {
        let mut stock = BTreeMap::from([("a".to_owned(), 5), ("b".to_owned(), 1)]);
        let lines = [line("a", 2), line("b", 1), line("a", 1)];
        assert_eq!(take(&mut stock, &wanted(&lines)), Ok(()));
        assert_eq!(
            stock,
            BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 0)])
        );

        let short = [line("a", 1), line("b", 1), line("c", 1)];
        let reason = take(&mut stock, &wanted(&short)).unwrap_err();
        assert_eq!(
            reason,
            "insufficient stock for b: 1 wanted, 0 available; unknown product c"
        );
        assert_eq!(
            stock["a"], 2,
            "nothing taken from a reservation that was refused"
        );
    }

    #[test]
    fn a_batch_is_decided_in_order_on_one_stock_and_counts_its_refusals() {
        let reserve = |lines: Vec<Line>| ReserveInventory {
            order_id: Uuid::now_v7(),
            lines,
        };
        let batch = [
            reserve(vec![line("a", 3)]),
            reserve(vec![line("a", 3)]),
            reserve(vec![line("a", 2), line("b", 1)]),
        ];
        let reserves: Vec<&ReserveInventory> = batch.iter().collect();
        let wants: Vec<BTreeMap<&str, i64>> = batch.iter().map(|r| wanted(&r.lines)).collect();
        let was = BTreeMap::from([("a".to_owned(), 5), ("b".to_owned(), 1)]);
        let d = decide_reserves(&reserves, &wants, &was);
        // The second finds only 2 left: refused; the third still fits after it.
        assert_eq!(d.statuses, ["reserved", "rejected", "reserved"]);
        assert_eq!(d.refused, 1);
        assert_eq!(d.ids, batch.iter().map(|r| r.order_id).collect::<Vec<_>>());
        assert_eq!(d.reasons[0], None);
        assert!(
            d.reasons[1]
                .as_deref()
                .unwrap()
                .contains("insufficient stock for a")
        );
        assert_eq!(
            d.stock,
            BTreeMap::from([("a".to_owned(), 0), ("b".to_owned(), 0)])
        );
        assert!(matches!(d.replies[1], Body::InventoryRejected(_)));
        assert_eq!(was["a"], 5, "the stock read is left as it was");
    }
}
