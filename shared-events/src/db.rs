//! Postgres connection: creates the service's database when missing, then applies its migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Failures while preparing the database at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `DATABASE_URL` is not a Postgres URL.
    #[error("DATABASE_URL is invalid: {0}")]
    InvalidUrl(sqlx::Error),
    /// `DATABASE_URL` names no database.
    #[error("DATABASE_URL names no database")]
    NoDatabase,
    /// The server could not be reached in time.
    #[error("cannot connect to Postgres: {0}")]
    Connect(sqlx::Error),
    /// The database could not be created.
    #[error("cannot create database {name}: {source}")]
    Create {
        /// The database.
        name: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Parses `url` into connect options (so secrets are never formatted back into strings).
/// `sslmode` is honoured as given; without one, a loopback server is reached without TLS (it
/// protects nothing there and costs CPU on both ends) and any other host with `prefer`.
pub fn options(url: &str, application_name: &str) -> Result<PgConnectOptions, DbError> {
    let mut opts = PgConnectOptions::from_str(url).map_err(DbError::InvalidUrl)?;
    let loopback = matches!(opts.get_host(), "localhost" | "127.0.0.1" | "::1")
        || opts.get_host().starts_with('/');
    if loopback && !url.contains("sslmode=") {
        opts = opts.ssl_mode(sqlx::postgres::PgSslMode::Disable);
    }
    Ok(opts
        .application_name(application_name)
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// Connects a pool of `max_connections`, creating the database if it does not exist and running
/// `migrator`. Retries the first connection for up to `wait` so a service may start before
/// Postgres.
pub async fn connect(
    opts: PgConnectOptions,
    migrator: &Migrator,
    max_connections: u32,
    wait: Duration,
) -> Result<PgPool, DbError> {
    let name = opts.get_database().ok_or(DbError::NoDatabase)?.to_owned();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match try_connect(&opts, max_connections).await {
            Ok(pool) => {
                migrator.run(&pool).await?;
                return Ok(pool);
            }
            Err(e) if is_missing_database(&e) => create_database(&opts, &name).await?,
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(DbError::Connect(e)),
            Err(e) => {
                tracing::warn!(error = %e, "Postgres not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn try_connect(opts: &PgConnectOptions, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.clone())
        .await
}

/// Planner settings for connections that only run the hot path's batch statements: key lookups
/// and set-based writes by primary key, thousands of times a second. Without them Postgres plans
/// such a statement anew on every execution: its array parameters make the generic plan look
/// costlier than a custom one (at one message per batch the orchestrator's read and write spent
/// 0.3 ms planning against 0.2 ms executing). A generic plan is made once per connection, and
/// with sequential scans off it uses the indexes even when it is made on a still empty table
/// (with them on, a plan made then would scan the whole table once it has grown).
pub const PINNED_PLANS: [(&str, &str); 2] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
];

/// A pool beside `pool`, to the same database, for the hot path's batch statements only
/// ([`PINNED_PLANS`]). Its few connections are opened in the background and kept, so no batch
/// waits for a new backend to start. They are not pinged before use: the ping is a round trip to
/// Postgres on every batch's critical path, and a connection that broke meanwhile fails its
/// statement, whose messages are retried, and is replaced.
pub fn batch_pool(pool: &PgPool, max_connections: u32) -> PgPool {
    let options = (*pool.connect_options()).clone().options(PINNED_PLANS);
    let max_connections = max_connections.max(1);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(max_connections)
        .idle_timeout(None)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options)
}

/// Whether `e` is `one_statement_check` refusing a batch written in one statement (SQLSTATE
/// 40001, serialization_failure): nothing of the batch was written, and it can be tried again.
/// See `migrations/messaging/0009_one_statement_writes.sql`.
pub fn is_write_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40001"))
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

async fn create_database(opts: &PgConnectOptions, name: &str) -> Result<(), DbError> {
    let admin = opts.clone().database("postgres");
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .map_err(DbError::Connect)?;
    let sql = format!("create database \"{}\"", name.replace('"', "\"\""));
    match sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
    {
        Ok(_) => {
            tracing::info!(database = name, "created database");
            Ok(())
        }
        // Another replica won the race: fine.
        Err(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("42P04") | Some("23505")) =>
        {
            Ok(())
        }
        Err(source) => Err(DbError::Create {
            name: name.to_owned(),
            source,
        }),
    }
}
