//! SHAPE=inline-rust: the same "participants inside the service process" saga as the
//! SHAPE=inline part of ../service.mjs, served by the Restate Rust SDK instead of the Node SDK.
//!
//!   orders    (Virtual Object, key = orderId)   run(order) -> {orderId,status,reason}, status (shared)
//!     the whole saga is ONE invocation; each participant step is a durable side effect
//!     ctx.run("reserve"|"charge"|"ship"|"release"|"refund") calling plain in-process code.
//!   stockview (Service)  get({productId}) / seed({productId, stock}) / participants()
//!     plain reads/writes of the in-process participant state, for the driver's checks.
//!
//! Participant state lives in this process's memory (one Mutex-protected struct below): it is NOT
//! durable across a service restart (the journal of each saga is). Each participant op is
//! idempotent on (op, orderId[, productId]) because ctx.run is at-least-once.
use restate_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

// ---------------- configuration (same env vars / defaults as service.mjs) ----------------
fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}
static PAYMENT_SUCCESS_RATE: LazyLock<f64> = LazyLock::new(|| env_f64("PAYMENT_SUCCESS_RATE", 0.9));
static SHIPPING_SUCCESS_RATE: LazyLock<f64> =
    LazyLock::new(|| env_f64("SHIPPING_SUCCESS_RATE", 1.0));

// ---------------- JSON shapes (identical to the Node inline shape) ----------------
#[allow(non_snake_case)]
#[derive(Serialize, Deserialize, Clone)]
struct Item {
    productId: String,
    qty: Value, // validated like Number.isInteger(qty) && qty > 0 in reserve
}
#[allow(non_snake_case)]
#[derive(Serialize, Deserialize, Clone)]
struct Order {
    items: Vec<Item>,
    amountCents: Value,
}
#[allow(non_snake_case)]
#[derive(Serialize)]
struct RunOut {
    orderId: String,
    status: &'static str,
    reason: Option<&'static str>, // null when shipped
}
#[allow(non_snake_case)]
#[derive(Serialize)]
struct StatusOut {
    orderId: String,
    status: Option<String>,
}
// journaled ctx.run results: same JSON as the Node participants return
#[derive(Serialize, Deserialize, Clone, Copy)]
struct ReserveRes {
    ok: bool,
    stock: i64,
}
#[derive(Serialize, Deserialize, Clone, Copy)]
struct ReleaseRes {
    stock: i64,
}
#[derive(Serialize, Deserialize, Clone, Copy)]
struct OkRes {
    ok: bool,
}
#[allow(non_snake_case)]
#[derive(Deserialize)]
struct GetReq {
    productId: String,
}
#[allow(non_snake_case)]
#[derive(Deserialize)]
struct SeedReq {
    productId: String,
    stock: Value,
}
#[derive(Serialize)]
struct SeedOut {
    stock: Value,
}
#[derive(Serialize, Clone, Copy, Default)]
struct Row {
    initial: i64,
    stock: i64,
    reserved: i64,
    released: i64,
}
#[derive(Serialize)]
struct RowOut {
    product: String,
    #[serde(flatten)]
    row: Row,
}
#[derive(Serialize, Default)]
struct PaymentCounts {
    charged: u64,
    declined: u64,
    refunded: u64,
}
#[derive(Serialize)]
struct ParticipantsOut {
    payments: PaymentCounts,
    shipments: usize,
}

/// JS Number.isInteger(x) for a JSON number (3 and 3.0 both count), as i64.
fn int_of(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

// ---------------- in-process participants ----------------
#[derive(Clone, Copy, PartialEq)]
enum PayStatus {
    Charged,
    Declined,
    Refunded,
}
#[allow(dead_code)]
struct Payment {
    amount_cents: Value,
    status: PayStatus,
}
#[allow(dead_code)]
struct Shipment {
    items: usize,
}
#[derive(Default)]
struct Mem {
    stock: HashMap<String, Row>,          // productId -> counters
    payments: HashMap<String, Payment>,   // orderId -> charge record
    shipments: HashMap<String, Shipment>, // orderId -> shipment record
    // applied ops (the Node `once` map, key "op/orderId[/productId]" -> result)
    applied_reserve: HashMap<String, ReserveRes>,
    applied_release: HashMap<String, ReleaseRes>,
    applied_ok: HashMap<String, OkRes>, // charge/..., refund/..., ship/...
}
impl Mem {
    fn row(&mut self, product_id: &str) -> &mut Row {
        if !self.stock.contains_key(product_id) {
            self.stock.insert(product_id.to_owned(), Row::default());
        }
        self.stock.get_mut(product_id).unwrap()
    }
}
static MEM: LazyLock<Mutex<Mem>> = LazyLock::new(|| Mutex::new(Mem::default()));
fn mem() -> std::sync::MutexGuard<'static, Mem> {
    MEM.lock().unwrap_or_else(|e| e.into_inner())
}

mod participants {
    use super::*;

    pub fn reserve(order_id: &str, product_id: &str, qty: &Value) -> ReserveRes {
        let key = format!("reserve/{order_id}/{product_id}");
        let mut m = mem();
        if let Some(r) = m.applied_reserve.get(&key) {
            return *r;
        }
        let row = m.row(product_id);
        let r = match int_of(qty) {
            Some(q) if q > 0 && row.stock >= q => {
                row.stock -= q;
                row.reserved += q;
                ReserveRes {
                    ok: true,
                    stock: row.stock,
                }
            }
            _ => ReserveRes {
                ok: false,
                stock: row.stock,
            },
        };
        m.applied_reserve.insert(key, r);
        r
    }

    pub fn release(order_id: &str, product_id: &str, qty: &Value) -> ReleaseRes {
        let key = format!("release/{order_id}/{product_id}");
        let mut m = mem();
        if let Some(r) = m.applied_release.get(&key) {
            return *r;
        }
        // only reached for lines whose reserve succeeded, so qty is a positive integer
        let q = int_of(qty).unwrap_or(0);
        let row = m.row(product_id);
        row.stock += q;
        row.released += q;
        let r = ReleaseRes { stock: row.stock };
        m.applied_release.insert(key, r);
        r
    }

    // rand is fine here: the decision is the journaled result of ctx.run("charge"),
    // and the applied map returns the same decision if the action is re-run.
    pub fn charge(order_id: &str, amount_cents: &Value) -> OkRes {
        let key = format!("charge/{order_id}");
        let mut m = mem();
        if let Some(r) = m.applied_ok.get(&key) {
            return *r;
        }
        let ok = rand::random::<f64>() < *PAYMENT_SUCCESS_RATE;
        let status = if ok {
            PayStatus::Charged
        } else {
            PayStatus::Declined
        };
        m.payments.insert(
            order_id.to_owned(),
            Payment {
                amount_cents: amount_cents.clone(),
                status,
            },
        );
        let r = OkRes { ok };
        m.applied_ok.insert(key, r);
        r
    }

    pub fn refund(order_id: &str) -> OkRes {
        let key = format!("refund/{order_id}");
        let mut m = mem();
        if let Some(r) = m.applied_ok.get(&key) {
            return *r;
        }
        if let Some(c) = m.payments.get_mut(order_id) {
            if c.status == PayStatus::Charged {
                c.status = PayStatus::Refunded;
            }
        }
        let r = OkRes { ok: true };
        m.applied_ok.insert(key, r);
        r
    }

    pub fn ship(order_id: &str, items: usize) -> OkRes {
        let key = format!("ship/{order_id}");
        let mut m = mem();
        if let Some(r) = m.applied_ok.get(&key) {
            return *r;
        }
        let rate = *SHIPPING_SUCCESS_RATE;
        let ok = if rate >= 1.0 {
            true
        } else {
            rand::random::<f64>() < rate
        };
        if ok {
            m.shipments.insert(order_id.to_owned(), Shipment { items });
        }
        let r = OkRes { ok };
        m.applied_ok.insert(key, r);
        r
    }
}

// ---------------- orders: the saga orchestrator (inline shape) ----------------
#[restate_sdk::object]
#[name = "orders"]
trait Orders {
    /// {items:[{productId, qty}], amountCents} -> {orderId, status, reason}
    async fn run(order: Json<Order>) -> HandlerResult<Json<RunOut>>;
    #[shared]
    async fn status() -> HandlerResult<Json<StatusOut>>;
}

struct OrdersImpl;

async fn release_all(
    ctx: &ObjectContext<'_>,
    order_id: &str,
    reserved: &[Item],
) -> Result<(), TerminalError> {
    for it in reserved {
        let (oid, pid, qty) = (order_id.to_owned(), it.productId.clone(), it.qty.clone());
        ctx.run(|| async move { Ok(Json(participants::release(&oid, &pid, &qty))) })
            .name("release")
            .await?;
    }
    Ok(())
}

fn finish(
    ctx: &ObjectContext<'_>,
    order_id: String,
    status: &'static str,
    reason: Option<&'static str>,
) -> HandlerResult<Json<RunOut>> {
    ctx.set("status", status.to_owned());
    Ok(Json(RunOut {
        orderId: order_id,
        status,
        reason,
    }))
}

impl Orders for OrdersImpl {
    async fn run(
        &self,
        ctx: ObjectContext<'_>,
        Json(order): Json<Order>,
    ) -> HandlerResult<Json<RunOut>> {
        let order_id = ctx.key().to_owned();
        ctx.set("order", Json(order.clone()));

        // (a) reserve inventory, line by line (one journaled side effect per line, like objects)
        let mut reserved: Vec<Item> = Vec::with_capacity(order.items.len());
        for it in &order.items {
            let (oid, pid, qty) = (order_id.clone(), it.productId.clone(), it.qty.clone());
            let Json(r) = ctx
                .run(|| async move { Ok(Json(participants::reserve(&oid, &pid, &qty))) })
                .name("reserve")
                .await?;
            if !r.ok {
                release_all(&ctx, &order_id, &reserved).await?;
                return finish(&ctx, order_id, "cancelled", Some("out_of_stock"));
            }
            reserved.push(it.clone());
        }

        // (b) charge payment
        let (oid, amount) = (order_id.clone(), order.amountCents.clone());
        let Json(p) = ctx
            .run(|| async move { Ok(Json(participants::charge(&oid, &amount))) })
            .name("charge")
            .await?;
        if !p.ok {
            release_all(&ctx, &order_id, &reserved).await?;
            return finish(&ctx, order_id, "cancelled", Some("payment_declined"));
        }

        // (c) ship
        let (oid, n_items) = (order_id.clone(), order.items.len());
        let Json(s) = ctx
            .run(|| async move { Ok(Json(participants::ship(&oid, n_items))) })
            .name("ship")
            .await?;
        if !s.ok {
            let oid = order_id.clone();
            ctx.run(|| async move { Ok(Json(participants::refund(&oid))) })
                .name("refund")
                .await?;
            release_all(&ctx, &order_id, &reserved).await?;
            return finish(&ctx, order_id, "cancelled", Some("shipping_failed"));
        }
        finish(&ctx, order_id, "shipped", None)
    }

    async fn status(&self, ctx: SharedObjectContext<'_>) -> HandlerResult<Json<StatusOut>> {
        let status = ctx.get::<String>("status").await?;
        Ok(Json(StatusOut {
            orderId: ctx.key().to_owned(),
            status,
        }))
    }
}

// ---------------- stockview: plain reads/writes of the in-process state (driver only) ----------------
#[restate_sdk::service]
#[name = "stockview"]
trait StockView {
    /// {productId} -> {product, initial, stock, reserved, released}
    async fn get(req: Json<GetReq>) -> HandlerResult<Json<RowOut>>;
    /// {productId, stock} -> resets stock and counters (idempotent)
    async fn seed(req: Json<SeedReq>) -> HandlerResult<Json<SeedOut>>;
    /// -> {payments: {charged, declined, refunded}, shipments}   (body optional, like the Node handler)
    async fn participants(_req: Option<Json<Value>>) -> HandlerResult<Json<ParticipantsOut>>;
}

struct StockViewImpl;

impl StockView for StockViewImpl {
    async fn get(&self, _ctx: Context<'_>, Json(req): Json<GetReq>) -> HandlerResult<Json<RowOut>> {
        let row = *mem().row(&req.productId);
        Ok(Json(RowOut {
            product: req.productId,
            row,
        }))
    }

    async fn seed(
        &self,
        _ctx: Context<'_>,
        Json(req): Json<SeedReq>,
    ) -> HandlerResult<Json<SeedOut>> {
        let Some(s) = int_of(&req.stock) else {
            return Err(TerminalError::new("stock must be an integer").into());
        };
        mem().stock.insert(
            req.productId,
            Row {
                initial: s,
                stock: s,
                reserved: 0,
                released: 0,
            },
        );
        Ok(Json(SeedOut { stock: req.stock }))
    }

    async fn participants(
        &self,
        _ctx: Context<'_>,
        _req: Option<Json<Value>>,
    ) -> HandlerResult<Json<ParticipantsOut>> {
        let m = mem();
        let mut payments = PaymentCounts::default();
        for c in m.payments.values() {
            match c.status {
                PayStatus::Charged => payments.charged += 1,
                PayStatus::Declined => payments.declined += 1,
                PayStatus::Refunded => payments.refunded += 1,
            }
        }
        Ok(Json(ParticipantsOut {
            payments,
            shipments: m.shipments.len(),
        }))
    }
}

#[tokio::main]
async fn main() {
    // SDK log level like the Node SDK's RESTATE_LOGGING (default WARN)
    let level = match std::env::var("RESTATE_LOGGING")
        .unwrap_or_default()
        .to_ascii_uppercase()
        .as_str()
    {
        "TRACE" => tracing_subscriber::filter::LevelFilter::TRACE,
        "DEBUG" => tracing_subscriber::filter::LevelFilter::DEBUG,
        "INFO" => tracing_subscriber::filter::LevelFilter::INFO,
        "ERROR" => tracing_subscriber::filter::LevelFilter::ERROR,
        "OFF" => tracing_subscriber::filter::LevelFilter::OFF,
        _ => tracing_subscriber::filter::LevelFilter::WARN,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .init();

    let host = std::env::var("SERVICE_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port: u16 = std::env::var("SERVICE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(19080);
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .expect("SERVICE_HOST:SERVICE_PORT");
    println!(
        "restate service endpoint listening on {addr} (shape inline-rust, restate-sdk rust, payment success rate {}, shipping {})",
        *PAYMENT_SUCCESS_RATE, *SHIPPING_SUCCESS_RATE
    );
    HttpServer::new(
        Endpoint::builder()
            .bind(OrdersImpl.serve())
            .bind(StockViewImpl.serve())
            .build(),
    )
    .listen_and_serve(addr)
    .await;
}
