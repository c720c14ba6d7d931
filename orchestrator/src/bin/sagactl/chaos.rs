//! `sagactl chaos`: a closed-loop load run against a live stack that learns each order's end from
//! the `orders.>` events that end sagas, then reports outcomes, throughput, latency, CPU and the
//! audit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

use saga_orchestrator::audit::{AuditDbs, AuditReport, AuditScope, audit};
use saga_shared_events::contract::{Body, Envelope, ORDER_ENDING_SUBJECTS};

use crate::{Endpoints, proc_stats};

/// Options of a chaos run.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Orders to create.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub orders: u64,
    /// Orders in flight at once (closed loop).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// Payment success rate for the run (0.0 to 1.0).
    #[arg(long, value_parser = saga_shared_events::config::parse_rate)]
    pub payment_success_rate: f64,
    /// Shipping success rate for the run (default: leave as configured).
    #[arg(long, value_parser = saga_shared_events::config::parse_rate)]
    pub shipping_success_rate: Option<f64>,
    /// Distinct products to order from.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub products: u64,
    /// Seed of the order generator (random when absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Give up on an order that has not ended after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub order_timeout_secs: u64,
}

#[derive(Debug, Clone)]
struct Ending {
    status: String,
    reason: Option<String>,
    /// When the event reached this process: an order's latency ends here, not when its worker
    /// task gets to run.
    at: Instant,
}

#[derive(Default)]
struct Waiters {
    waiting: HashMap<Uuid, oneshot::Sender<Ending>>,
    early: HashMap<Uuid, Ending>,
}

struct Done {
    latency: Duration,
    finished_at: Instant,
    ending: Option<Ending>,
}

/// The machine-readable result.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    orders: u64,
    concurrency: u64,
    seed: u64,
    outcomes: BTreeMap<String, u64>,
    cancel_reasons: BTreeMap<String, u64>,
    http_errors: u64,
    timed_out: u64,
    payment_success_rate_configured: f64,
    payment_success_rate_observed: Option<f64>,
    throughput_sagas_per_sec: f64,
    wall_seconds: f64,
    latency_ms: BTreeMap<&'static str, f64>,
    cpu_seconds: BTreeMap<String, f64>,
    cpu_ms_per_saga: BTreeMap<String, f64>,
    memory_mb: BTreeMap<String, f64>,
    postgres_write_transactions_per_saga: Option<f64>,
    postgres_wal_bytes_per_saga: Option<f64>,
    nats_messages_per_saga: Option<f64>,
    audit: Option<AuditReport>,
    violations: Vec<String>,
}

/// Runs the experiment; returns the report (violations make the caller exit non-zero).
pub async fn run(
    ep: &Endpoints,
    nats_auth: &saga_shared_events::config::NatsAuthArgs,
    args: &ChaosArgs,
    dbs: Option<AuditDbs>,
) -> anyhow::Result<ChaosReport> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &ep.token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("SAGACTL_TOKEN is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.concurrency as usize)
        .build()?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let run_id = &Uuid::new_v4().simple().to_string()[..8];
    let products: Vec<String> = (0..args.products)
        .map(|i| format!("chaos-{run_id}-{i}"))
        .collect();
    // Ample stock: the experiment is about payments and shipping, not sell-outs.
    let initial = (args.orders * 9 / args.products + 10) as i64;
    for p in &products {
        let r = http
            .put(format!("{}/products/{p}", ep.inventory))
            .json(&json!({ "available": initial }))
            .send()
            .await
            .with_context(|| format!("cannot reach inventory at {}", ep.inventory))?;
        if !r.status().is_success() {
            bail!(
                "setting stock failed: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
    }
    let bodies = generate(args.orders as usize, &products, seed);

    let saved_payment = get_chaos(&http, &ep.payment).await?;
    let saved_shipping = get_chaos(&http, &ep.shipping).await?;
    let mut payment = saved_payment.clone();
    payment["success_rate"] = json!(args.payment_success_rate);
    put_chaos(&http, &ep.payment, &payment).await?;
    if let Some(rate) = args.shipping_success_rate {
        let mut shipping = saved_shipping.clone();
        shipping["success_rate"] = json!(rate);
        put_chaos(&http, &ep.shipping, &shipping).await?;
    }
    let workload = Workload {
        bodies,
        seed,
        products,
        initial,
    };
    let outcome = drive(ep, nats_auth, args, &http, workload, dbs).await;
    // Restore the previous settings whatever happened.
    let restored = (
        put_chaos(&http, &ep.payment, &saved_payment).await,
        put_chaos(&http, &ep.shipping, &saved_shipping).await,
    );
    let report = outcome?;
    restored.0?;
    restored.1?;
    Ok(report)
}

/// What one run sends: the order bodies (from `seed`), over `products` stocked at `initial`.
struct Workload {
    bodies: Vec<Value>,
    seed: u64,
    products: Vec<String>,
    initial: i64,
}

async fn drive(
    ep: &Endpoints,
    nats_auth: &saga_shared_events::config::NatsAuthArgs,
    args: &ChaosArgs,
    http: &reqwest::Client,
    workload: Workload,
    dbs: Option<AuditDbs>,
) -> anyhow::Result<ChaosReport> {
    let Workload {
        bodies,
        seed,
        products,
        initial,
    } = workload;
    let nats = saga_shared_events::nats::connect(
        &ep.nats_url,
        "sagactl",
        nats_auth,
        Duration::from_secs(5),
    )
    .await?;
    let js = async_nats::jetstream::new(nats.clone());
    let waiters = Arc::new(Mutex::new(Waiters::default()));
    // Only the events that end a saga: the created events would cost the broker a delivery
    // and this process a wake-up and a decode per order, on the same cores as the stack.
    let mut subs = Vec::with_capacity(ORDER_ENDING_SUBJECTS.len());
    for subject in ORDER_ENDING_SUBJECTS {
        subs.push(nats.subscribe(subject).await?);
    }
    let mut sub = futures_util::stream::select_all(subs);
    let w = waiters.clone();
    let listener = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let at = Instant::now();
            let Ok(env) = Envelope::decode(&msg.payload) else {
                continue;
            };
            let ending = match &env.body {
                Body::OrderCompleted(e) | Body::OrderCancelled(e) | Body::OrderFailed(e) => {
                    Ending {
                        status: e.status.clone(),
                        reason: e.cancel_reason.map(|r| r.as_str().to_owned()),
                        at,
                    }
                }
                _ => continue,
            };
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            match w.waiting.remove(&env.saga_id) {
                Some(tx) => {
                    let _ = tx.send(ending);
                }
                None => {
                    w.early.insert(env.saga_id, ending);
                }
            }
        }
    });
    nats.flush().await?;

    let before = proc_stats::snapshot();
    let pg_before = match &dbs {
        Some(d) => Some(server_counters(d).await?),
        None => None,
    };
    let msgs_before = stream_messages(&js).await.ok();

    let total = bodies.len();
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let counts = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let order_timeout = Duration::from_secs(args.order_timeout_secs);
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.min(total as u64) {
        let (http, bodies, next, waiters, bar, counts) = (
            http.clone(),
            bodies.clone(),
            next.clone(),
            waiters.clone(),
            bar.clone(),
            counts.clone(),
        );
        let url = format!("{}/orders", ep.orchestrator);
        workers.push(tokio::spawn(async move {
            let mut done: Vec<(Option<Uuid>, Done)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies.len() {
                    return done;
                }
                let t0 = Instant::now();
                let id = match http.post(&url).json(&bodies[i]).send().await {
                    Ok(r) if r.status().as_u16() == 202 => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["id"].as_str().and_then(|s| s.parse::<Uuid>().ok())),
                    _ => None,
                };
                let ending = match id {
                    None => None,
                    Some(id) => {
                        let rx = {
                            let mut w = waiters.lock().unwrap_or_else(|e| e.into_inner());
                            match w.early.remove(&id) {
                                Some(e) => Ok(e),
                                None => {
                                    let (tx, rx) = oneshot::channel();
                                    w.waiting.insert(id, tx);
                                    Err(rx)
                                }
                            }
                        };
                        match rx {
                            Ok(e) => Some(e),
                            Err(rx) => tokio::time::timeout(order_timeout, rx)
                                .await
                                .ok()
                                .and_then(Result::ok),
                        }
                    }
                };
                let label = match (&id, &ending) {
                    (None, _) => "http_error".to_owned(),
                    (_, None) => "timed_out".to_owned(),
                    (_, Some(e)) => e.status.clone(),
                };
                {
                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                    *c.entry(label).or_default() += 1;
                    bar.set_message(
                        c.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
                bar.inc(1);
                let finished_at = ending.as_ref().map_or_else(Instant::now, |e| e.at);
                done.push((
                    id,
                    Done {
                        latency: finished_at.saturating_duration_since(t0),
                        finished_at,
                        ending,
                    },
                ));
            }
        }));
    }
    let mut results = Vec::with_capacity(total);
    for w in workers {
        results.extend(w.await?);
    }
    let wall = started.elapsed();
    bar.finish_and_clear();
    listener.abort();
    let after = proc_stats::snapshot();

    // Outcomes.
    let mut outcomes = BTreeMap::new();
    let mut reasons = BTreeMap::new();
    let (mut http_errors, mut timed_out) = (0, 0);
    let mut latencies: Vec<Duration> = Vec::new();
    let mut finish_times: Vec<Instant> = Vec::new();
    let mut ids = Vec::new();
    for (id, d) in &results {
        match (id, &d.ending) {
            (None, _) => http_errors += 1,
            (Some(_), None) => timed_out += 1,
            (Some(id), Some(e)) => {
                ids.push(*id);
                *outcomes.entry(e.status.clone()).or_insert(0u64) += 1;
                if let Some(r) = &e.reason {
                    *reasons.entry(r.clone()).or_insert(0u64) += 1;
                }
                latencies.push(d.latency);
                finish_times.push(d.finished_at);
            }
        }
    }
    latencies.sort();
    finish_times.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    let latency_ms = BTreeMap::from([
        ("p50", pct(0.50)),
        ("p90", pct(0.90)),
        ("p99", pct(0.99)),
        (
            "max",
            latencies
                .last()
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
        ),
    ]);
    // Throughput after a 5 % warm-up.
    let warm = finish_times.len() / 20;
    let throughput = match (finish_times.get(warm), finish_times.last()) {
        (Some(a), Some(b)) if b > a => {
            (finish_times.len() - warm - 1) as f64 / (*b - *a).as_secs_f64()
        }
        _ => finish_times.len() as f64 / wall.as_secs_f64().max(1e-9),
    };
    // Orders that reached payment: everything but inventory rejections.
    let declined = reasons.get("payment_declined").copied().unwrap_or(0);
    let reached_payment =
        ids.len() as u64 - reasons.get("inventory_rejected").copied().unwrap_or(0);
    let observed = (reached_payment > 0).then(|| 1.0 - declined as f64 / reached_payment as f64);

    let n = ids.len().max(1) as f64;
    let cpu = proc_stats::diff(&before, &after);
    let cpu_ms_per_saga = cpu
        .iter()
        .map(|(k, s)| (k.clone(), s * 1000.0 / n))
        .collect();
    let memory_mb = proc_stats::memory_mb();

    let mut violations = Vec::new();
    if http_errors > 0 {
        violations.push(format!("{http_errors} orders were not accepted"));
    }
    if timed_out > 0 {
        violations.push(format!(
            "{timed_out} orders did not end within {order_timeout:?}"
        ));
    }
    let (audit_report, pg_per_saga, msgs) = match dbs {
        Some(d) => {
            wait_outboxes_empty(&d).await;
            let pg_after = server_counters(&d).await?;
            let scope = AuditScope {
                orders: Some(ids.clone()),
                expect_settled: true,
                initial_stock: products.iter().map(|p| (p.clone(), initial)).collect(),
            };
            let report = audit(&d, &scope).await?;
            violations.extend(report.violations.iter().cloned());
            let msgs_after = stream_messages(&js).await.ok();
            (
                Some(report),
                pg_before.map(|b| ((pg_after.0 - b.0) as f64 / n, (pg_after.1 - b.1) as f64 / n)),
                msgs_before.zip(msgs_after).map(|(b, a)| (a - b) as f64 / n),
            )
        }
        None => {
            // Without database access, check stock conservation over HTTP.
            for p in products {
                let v: Value = http
                    .get(format!("{}/products/{p}", ep.inventory))
                    .send()
                    .await?
                    .json()
                    .await?;
                let sum =
                    v["available"].as_i64().unwrap_or(0) + v["reserved"].as_i64().unwrap_or(0);
                if sum != initial {
                    violations.push(format!(
                        "product {p}: stock not conserved ({sum} != {initial})"
                    ));
                }
            }
            (None, None, None)
        }
    };
    Ok(ChaosReport {
        orders: total as u64,
        concurrency: args.concurrency,
        seed,
        outcomes,
        cancel_reasons: reasons,
        http_errors,
        timed_out,
        payment_success_rate_configured: args.payment_success_rate,
        payment_success_rate_observed: observed,
        throughput_sagas_per_sec: throughput,
        wall_seconds: wall.as_secs_f64(),
        latency_ms,
        cpu_seconds: cpu,
        cpu_ms_per_saga,
        memory_mb,
        postgres_write_transactions_per_saga: pg_per_saga.map(|p| p.0),
        postgres_wal_bytes_per_saga: pg_per_saga.map(|p| p.1),
        nats_messages_per_saga: msgs,
        audit: audit_report,
        violations,
    })
}

impl ChaosReport {
    /// True when the run found no violation.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Prints the human summary.
pub fn print_report(r: &ChaosReport) {
    println!(
        "orders {}  concurrency {}  seed {}",
        r.orders, r.concurrency, r.seed
    );
    println!("outcomes:");
    for (k, v) in &r.outcomes {
        println!("  {k:<12} {v}");
    }
    for (k, v) in &r.cancel_reasons {
        println!("    cancel_reason {k:<20} {v}");
    }
    if r.http_errors + r.timed_out > 0 {
        println!(
            "  not accepted {}  not ended {}",
            r.http_errors, r.timed_out
        );
    }
    println!(
        "payment success rate: configured {:.3}, observed {}",
        r.payment_success_rate_configured,
        r.payment_success_rate_observed
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| "n/a".into())
    );
    println!(
        "throughput: {:.1} sagas/s (after 5% warm-up; wall {:.2} s)",
        r.throughput_sagas_per_sec, r.wall_seconds
    );
    println!(
        "latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        r.latency_ms["p50"], r.latency_ms["p90"], r.latency_ms["p99"], r.latency_ms["max"]
    );
    if !r.cpu_seconds.is_empty() {
        println!("cpu (seconds, ms per saga) and memory (PSS MB):");
        for (k, v) in &r.cpu_seconds {
            println!(
                "  {k:<13} {v:>8.2} s  {:>6.3} ms/saga  {:>7.1} MB",
                r.cpu_ms_per_saga[k],
                r.memory_mb.get(k).copied().unwrap_or(0.0)
            );
        }
    }
    if let Some(x) = r.postgres_write_transactions_per_saga {
        println!("postgres write transactions per saga: {x:.2}");
    }
    if let Some(x) = r.postgres_wal_bytes_per_saga {
        println!("postgres WAL per saga: {:.1} kB", x / 1000.0);
    }
    if let Some(x) = r.nats_messages_per_saga {
        println!("nats stream messages per saga: {x:.1}");
    }
    match &r.audit {
        Some(a) => println!(
            "audit: {} sagas checked, {} violations",
            a.sagas,
            r.violations.len()
        ),
        None => println!(
            "audit: databases unreachable; stock checked over HTTP; {} violations",
            r.violations.len()
        ),
    }
    for v in r.violations.iter().take(50) {
        println!("  VIOLATION {v}");
    }
}

fn generate(n: usize, products: &[String], seed: u64) -> Vec<Value> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let lines = rng.random_range(1..=3);
            let items: Vec<Value> = (0..lines)
                .map(|_| {
                    json!({
                        "product_id": products[rng.random_range(0..products.len())],
                        "quantity": rng.random_range(1..=3),
                        "unit_price_cents": rng.random_range(100..=10_000),
                    })
                })
                .collect();
            json!({ "customer_id": format!("customer-{}", i % 1000), "items": items })
        })
        .collect()
}

async fn get_chaos(http: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let r = http
        .get(format!("{base}/chaos"))
        .send()
        .await
        .with_context(|| format!("cannot reach {base}/chaos"))?;
    if !r.status().is_success() {
        bail!("GET {base}/chaos: {}", r.status());
    }
    Ok(r.json().await?)
}

async fn put_chaos(http: &reqwest::Client, base: &str, v: &Value) -> anyhow::Result<()> {
    let r = http.put(format!("{base}/chaos")).json(v).send().await?;
    if !r.status().is_success() {
        bail!(
            "PUT {base}/chaos: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Write transactions (transaction ids assigned) and bytes of WAL so far, summed over the
/// Postgres servers that hold the four databases. Both are read live; the commit counters of
/// `pg_stat_database` are not: backends report them up to ten seconds late, which undercounted a
/// run by a quarter. Reads, which assign no id and flush no WAL, are not counted.
async fn server_counters(d: &AuditDbs) -> anyhow::Result<(i64, i64)> {
    let mut servers = std::collections::HashSet::new();
    let mut totals = (0, 0);
    for pool in [&d.orchestrator, &d.inventory, &d.payment, &d.shipping] {
        let o = pool.connect_options();
        if !servers.insert((o.get_host().to_owned(), o.get_port())) {
            continue;
        }
        let (xids, wal): (i64, i64) = sqlx::query_as(
            "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
        )
        .fetch_one(pool)
        .await?;
        totals.0 += xids;
        totals.1 += wal;
    }
    Ok(totals)
}

async fn stream_messages(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    let mut total = 0;
    for name in ["SAGA_CMD", "SAGA_REPLY", "ORDERS"] {
        let mut s = js.get_stream(name).await?;
        total += s.info().await?.state.last_sequence;
    }
    Ok(total)
}

async fn wait_outboxes_empty(d: &AuditDbs) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let mut pending = 0;
        for pool in [&d.orchestrator, &d.inventory, &d.payment, &d.shipping] {
            pending += saga_shared_events::outbox::pending(pool).await.unwrap_or(1);
        }
        if pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
