//! The floor under a saga's latency at 1 in flight: the same chain of durable steps as an order
//! saga (seven Postgres commits, six JetStream hops between four processes, pull consumers,
//! explicit acks, the services' batch connections), with nothing else: no HTTP, no saga logic,
//! no tracing. What a saga takes beyond it is the services' own cost per message.
//!
//! ```sh
//! cargo run --release -p saga-shared-events --example hop_floor -- 2000
//! ```
//!
//! Environment: `DATABASE_URL` (default: the local Unix socket, database `saga_floor`, created if
//! missing, given the services' messaging schema, and emptied on each run; a service's database
//! is refused, as its migrations differ) and `NATS_URL` (default `nats://127.0.0.1:4222`; the run
//! recreates the stream `FLOOR`). Two switches bring the
//! chain closer to the services, one part at a time: `FLOOR_STATEMENT=saga` commits each step the
//! way a participant does (decision, inbox entry and outbox row in one statement, on the
//! services' messaging schema) instead of inserting one row, and `FLOOR_MESSAGES=saga` sends
//! messages of a saga's size with its headers (message id, trace context) instead of 17 bytes.

use std::future::IntoFuture;
use std::task::Context;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::future::BoxFuture;
use saga_shared_events::db::BatchPool;
use saga_shared_events::pull::{Pull, PullOptions};

const PARTICIPANTS: [&str; 3] = ["inventory", "payment", "shipping"];
const STEP: &str = "insert into floor_step (saga, step) values ($1, $2)";
/// The messaging schema every service shares (outbox, inbox, `one_statement_check`).
static MESSAGING: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/messaging");

fn saga_like(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "saga")
}

/// A participant's step: its decision, the inbox entry of the message and the outbox row of the
/// reply, checked and committed in one statement.
fn saga_step_sql() -> String {
    format!(
        "with c as (insert into floor_step (saga, step) values ($1, $2) \
           on conflict do nothing returning 1), \
         i as (insert into processed_message (message_id) select unnest($3::uuid[]) \
           on conflict do nothing returning 1), \
         o as ({}) \
         select one_statement_check((select count(*) from c), 1, \
                                    (select count(*) from i), cardinality($3::uuid[]))",
        saga_shared_events::outbox::OutboxRow::insert_sql(4)
    )
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let database = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        "postgres://postgres@%2Fvar%2Frun%2Fpostgresql:5432/saga_floor".to_owned()
    });
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    match args.get(1).map(String::as_str) {
        Some("participant") => {
            let name = args.get(2).ok_or("participant needs a name")?;
            participant(&database, &nats, name).await
        }
        sagas => {
            let sagas = sagas.map(str::parse).transpose()?.unwrap_or(1000).max(1);
            drive(&database, &nats, sagas).await
        }
    }
}

/// Batch connections as the services have them (`shared-events::db::batch_pool`), on a database
/// with the messaging schema.
async fn connect_db(url: &str, name: &str) -> Result<BatchPool, Error> {
    let options = saga_shared_events::db::options(url, name)?;
    let pool =
        saga_shared_events::db::connect(options, &MESSAGING, 1, Duration::from_secs(10)).await?;
    Ok(saga_shared_events::db::batch_pool(&pool, 1))
}

async fn pull(js: &jetstream::Context, durable: &str) -> Result<Pull, Error> {
    // The same pull as the services' consumers (`shared-events::consumer::run`).
    let options = PullOptions {
        batch: 128,
        expires: Duration::from_secs(30),
        heartbeat: Duration::from_secs(1),
    };
    Ok(Pull::start(js, "FLOOR", durable, options).await?)
}

/// Publish acknowledgements still to come, looked at on each new publish without a waker, as the
/// services' outbox sweeper does: a task awaiting each one, spawned after the publish, would push
/// the NATS connection task that the publish woke to the other worker.
#[derive(Default)]
struct Acks(Vec<BoxFuture<'static, Result<PublishAck, PublishError>>>);

impl Acks {
    fn add(&mut self, ack: PublishAckFuture) {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.0.retain_mut(|a| a.as_mut().poll(&mut cx).is_pending());
        self.0.push(ack.into_future());
    }
}

/// One step: commit a row, then publish the next message and acknowledge the one that caused it
/// (the services' order), leaving the publish acknowledgement to `acks`.
async fn step(
    db: &BatchPool,
    js: &jetstream::Context,
    acks: &mut Acks,
    saga: uuid::Uuid,
    n: i32,
    next: Option<String>,
) -> Result<(), Error> {
    let mut payload = saga.as_bytes().to_vec();
    payload.push(n as u8);
    let realistic = saga_like("FLOOR_MESSAGES");
    if realistic {
        // A command or reply envelope is about 650 bytes of JSON.
        payload.resize(650, b' ');
    }
    let mut conn = db.acquire().await?;
    if saga_like("FLOOR_STATEMENT") {
        let message_id = uuid::Uuid::now_v7();
        let subjects = vec![next.clone().unwrap_or_default()];
        let headers = serde_json::json!([{ "Nats-Msg-Id": message_id.to_string() }]);
        let payloads = vec![payload.clone()];
        let (_,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(saga_step_sql()))
            .bind(saga)
            .bind(n)
            .bind(vec![uuid::Uuid::now_v7()])
            .bind(message_id)
            .bind(subjects)
            .bind(headers)
            .bind(payloads)
            .bind(2.0_f64)
            .fetch_one(&mut *conn)
            .await?;
    } else {
        sqlx::query(STEP)
            .bind(saga)
            .bind(n)
            .execute(&mut *conn)
            .await?;
    }
    conn.release();
    if let Some(subject) = next {
        let ack = if realistic {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
            let trace = format!("00-{}-{:016x}-01", uuid::Uuid::now_v7().simple(), n);
            headers.insert("traceparent", trace.as_str());
            headers.insert("saga-id", saga.to_string().as_str());
            headers.insert("content-type", "application/json");
            js.publish_with_headers(subject, headers, payload.into())
                .await?
        } else {
            js.publish(subject, payload.into()).await?
        };
        acks.add(ack);
    }
    Ok(())
}

async fn participant(database: &str, nats: &str, name: &str) -> Result<(), Error> {
    let db = connect_db(database, name).await?;
    let js = jetstream::new(async_nats::connect(nats).await?);
    let mut acks = Acks::default();
    let mut messages = pull(&js, name).await?;
    // Until the driver stops this process, or the pull ends.
    loop {
        let msg = messages.next().await?;
        let saga = uuid::Uuid::from_slice(msg.payload.get(..16).ok_or("short payload")?)?;
        let n = i32::from(*msg.payload.get(16).ok_or("short payload")?) + 1;
        step(
            &db,
            &js,
            &mut acks,
            saga,
            n,
            Some(format!("floor.reply.{name}")),
        )
        .await?;
        msg.ack().await?;
    }
}

async fn drive(database: &str, nats: &str, sagas: usize) -> Result<(), Error> {
    let db = connect_db(database, "driver").await?;
    let mut conn = db.acquire().await?;
    sqlx::raw_sql(
        "drop table if exists floor_step; \
         create table floor_step (saga uuid, step int, primary key (saga, step)); \
         truncate outbox, processed_message",
    )
    .execute(&mut *conn)
    .await?;
    conn.release();
    let js = jetstream::new(async_nats::connect(nats).await?);
    let mut acks = Acks::default();
    let _ = js.delete_stream("FLOOR").await;
    let stream = js
        .create_stream(stream::Config {
            name: "FLOOR".into(),
            subjects: vec!["floor.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    for (durable, filter) in PARTICIPANTS
        .iter()
        .map(|p| (p.to_string(), format!("floor.cmd.{p}")))
        .chain([("driver".to_string(), "floor.reply.>".to_string())])
    {
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable),
                filter_subject: filter,
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
    }
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for p in PARTICIPANTS {
        children.push(
            tokio::process::Command::new(&exe)
                .args(["participant", p])
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let mut replies = pull(&js, "driver").await?;
    let warm_up = sagas / 10;
    let mut chain = Vec::with_capacity(sagas);
    let mut commits = Vec::with_capacity(sagas * 4);
    for i in 0..warm_up + sagas {
        let saga = uuid::Uuid::now_v7();
        let start = Instant::now();
        let mut n = 0;
        for p in PARTICIPANTS.iter().map(Some).chain([None]) {
            let commit = Instant::now();
            step(
                &db,
                &js,
                &mut acks,
                saga,
                n,
                p.map(|p| format!("floor.cmd.{p}")),
            )
            .await?;
            if i >= warm_up {
                commits.push(commit.elapsed());
            }
            if p.is_some() {
                let reply = tokio::time::timeout(Duration::from_secs(10), replies.next()).await??;
                n = i32::from(*reply.payload.get(16).ok_or("short payload")?) + 1;
                reply.ack().await?;
            }
        }
        if i >= warm_up {
            chain.push(start.elapsed());
        }
    }
    // CPU each process used per chain (warm-up included), from /proc on Linux.
    let cpu_ms = |pid: Option<u32>| -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks * 10.0 / (warm_up + sagas) as f64)
    };
    let per_process: Vec<String> = std::iter::once(("driver", Some(std::process::id())))
        .chain(
            PARTICIPANTS
                .iter()
                .copied()
                .zip(children.iter().map(|c| c.id())),
        )
        .map(|(name, pid)| format!("{name} {:.2}", cpu_ms(pid).unwrap_or(f64::NAN)))
        .collect();
    drop(children);
    let _ = js.delete_stream("FLOOR").await;
    chain.sort();
    commits.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |v: &[Duration], p: f64| ms(v[((v.len() - 1) as f64 * p) as usize]);
    println!(
        "{sagas} chains of 7 commits and 6 JetStream hops: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms; \
         one commit (the driver's) p50 {:.3} ms; CPU ms per chain: {}",
        pct(&chain, 0.5),
        pct(&chain, 0.9),
        pct(&chain, 0.99),
        pct(&commits, 0.5),
        per_process.join(", "),
    );
    Ok(())
}
