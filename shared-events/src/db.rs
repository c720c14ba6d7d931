//! Postgres connection: creates the service's database when missing, then applies its migrations.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
                warn_without_vacuum(&pool).await;
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

/// Tables that delete rows all the time: the outbox (every published row) and the inbox (its
/// hourly prune). Without vacuum their dead rows pile up and every statement on them slows down.
pub const CHURNING_TABLES: [&str; 2] = ["outbox", "processed_message"];

/// What keeps autovacuum away from [`CHURNING_TABLES`] in the connected database: the server's
/// `autovacuum` setting, or a table's own `autovacuum_enabled`. Empty when nothing does.
pub async fn vacuum_gaps(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    // Postgres reads its own boolean spellings (`off`, `0`, `f`, ...) of the setting and options.
    let (server_on, disabled): (bool, Vec<String>) = sqlx::query_as(
        "select current_setting('autovacuum')::bool, \
                array(select c.relname::text \
                      from pg_class c, pg_options_to_table(c.reloptions) o \
                      where c.relname = any($1) \
                        and c.relnamespace = current_schema()::text::regnamespace \
                        and o.option_name = 'autovacuum_enabled' and not o.option_value::bool \
                      order by c.relname)",
    )
    .bind(&CHURNING_TABLES[..])
    .fetch_one(&mut *conn)
    .await?;
    let server = (!server_on).then(|| "autovacuum is off on this Postgres server".to_owned());
    Ok(server
        .into_iter()
        .chain(
            disabled
                .into_iter()
                .map(|table| format!("autovacuum is disabled on table {table}")),
        )
        .collect())
}

/// Logs each of [`vacuum_gaps`]; a service runs without vacuum, but slows down over days.
async fn warn_without_vacuum(pool: &PgPool) {
    let gaps = match pool.acquire().await {
        Ok(mut conn) => vacuum_gaps(&mut conn).await,
        Err(e) => Err(e),
    };
    match gaps {
        Ok(gaps) => {
            for gap in gaps {
                tracing::warn!(
                    "{gap}: the outbox and the inbox delete rows constantly and bloat without \
                     vacuum; turn autovacuum on, or VACUUM them regularly"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the autovacuum settings"),
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

/// Connections to the database of `pool` for batch statements only (the hot path's, and the outbox
/// clean-up's delete), planned once ([`PINNED_PLANS`]), at most `max_connections` at once. They are
/// opened in the background and kept, so no batch waits for a new backend, and they are not tested
/// between batches that follow each other: sqlx's pool pings a connection as it returns, a Postgres
/// round trip on every batch for both processes. A connection goes back only when its batch ended
/// well ([`BatchConnection::release`]); after an error or a cancelled batch it is closed, and the
/// next connection handed out is pinged first (Postgres may have restarted: the kept ones would all
/// fail). So is one that sat idle for a while. Opening a connection is retried until the acquire
/// timeout, as sqlx's pool does.
#[derive(Clone)]
pub struct BatchPool(Arc<BatchShared>);

struct BatchShared {
    options: PgConnectOptions,
    /// Kept connections, with when each came back.
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    /// A batch failed since the last successful ping: test before use.
    suspect: AtomicBool,
    permits: Arc<Semaphore>,
    /// Connections kept at most (the warm-up may race batches that open their own).
    max: usize,
}

/// How long a batch waits for a connection before it fails (and its messages are retried).
const BATCH_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection idle for longer is pinged before use; under load they come back every few
/// milliseconds and are never pinged.
const BATCH_IDLE_PING_AFTER: Duration = Duration::from_millis(250);

/// A connection of a [`BatchPool`]. Dropping it closes it; [`BatchConnection::release`] gives it
/// back.
pub struct BatchConnection {
    conn: Option<PgConnection>,
    shared: Arc<BatchShared>,
    _permit: OwnedSemaphorePermit,
}

/// The batch pool beside `pool`; see [`BatchPool`]. Must be called inside a Tokio runtime.
pub fn batch_pool(pool: &PgPool, max_connections: u32) -> BatchPool {
    batch_pool_with((*pool.connect_options()).clone(), max_connections)
}

/// A [`BatchPool`] whose connections use `options` (plus [`PINNED_PLANS`]). Must be called
/// inside a Tokio runtime.
pub fn batch_pool_with(options: PgConnectOptions, max_connections: u32) -> BatchPool {
    let max_connections = max_connections.max(1);
    let shared = Arc::new(BatchShared {
        options: options.options(PINNED_PLANS),
        idle: Mutex::new(Vec::with_capacity(max_connections as usize)),
        suspect: AtomicBool::new(false),
        permits: Arc::new(Semaphore::new(max_connections as usize)),
        max: max_connections as usize,
    });
    let warm = shared.clone();
    tokio::spawn(async move {
        for _ in 0..max_connections {
            match PgConnection::connect_with(&warm.options).await {
                Ok(conn) => warm.put(conn),
                Err(e) => {
                    tracing::debug!(error = %e, "batch connection not opened ahead; opened on use");
                    break;
                }
            }
        }
    });
    BatchPool(shared)
}

impl BatchShared {
    fn put(&self, conn: PgConnection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max
        {
            idle.push((conn, Instant::now()));
        }
    }

    fn take(&self) -> Option<(PgConnection, Instant)> {
        self.idle.lock().ok()?.pop()
    }

    /// A new connection, retried until `deadline` while Postgres cannot be reached.
    async fn connect(&self, deadline: Instant) -> Result<PgConnection, sqlx::Error> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let attempt = PgConnection::connect_with(&self.options);
            let Ok(result) = tokio::time::timeout_at(deadline.into(), attempt).await else {
                return Err(sqlx::Error::PoolTimedOut);
            };
            match result {
                Ok(conn) => return Ok(conn),
                // A wrong password or a missing database does not pass with time.
                Err(e) if !is_connection_lost(&e) => return Err(e),
                Err(e) if Instant::now() + backoff >= deadline => {
                    tracing::debug!(error = %e, "batch connection not opened in time");
                    return Err(sqlx::Error::PoolTimedOut);
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

impl BatchPool {
    /// A connection: a kept one, or a new one when none is free.
    pub async fn acquire(&self) -> Result<BatchConnection, sqlx::Error> {
        let deadline = Instant::now() + BATCH_ACQUIRE_TIMEOUT;
        let permit =
            tokio::time::timeout_at(deadline.into(), self.0.permits.clone().acquire_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
        let conn = loop {
            let Some((mut conn, since)) = self.0.take() else {
                break self.0.connect(deadline).await?;
            };
            let suspect = self.0.suspect.swap(false, Ordering::Relaxed);
            if !suspect && since.elapsed() < BATCH_IDLE_PING_AFTER {
                break conn;
            }
            match tokio::time::timeout_at(deadline.into(), conn.ping()).await {
                Ok(Ok(())) => break conn,
                // The others may be broken too: test the next one as well.
                Ok(Err(_)) => self.0.suspect.store(true, Ordering::Relaxed),
                Err(_) => {
                    self.0.suspect.store(true, Ordering::Relaxed);
                    return Err(sqlx::Error::PoolTimedOut);
                }
            }
        };
        Ok(BatchConnection {
            conn: Some(conn),
            shared: self.0.clone(),
            _permit: permit,
        })
    }
}

impl BatchConnection {
    /// Gives the connection back for the next batch, untested: its batch ended well.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.shared.put(conn);
        }
    }
}

impl std::ops::Deref for BatchConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("a batch connection is only taken out when it is consumed"),
        }
    }
}

impl std::ops::DerefMut for BatchConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("a batch connection is only taken out when it is consumed"),
        }
    }
}

impl Drop for BatchConnection {
    fn drop(&mut self) {
        // Not released: its batch failed or was cancelled, so its state is unknown. Close it
        // politely when a runtime is there to do so; otherwise the socket just closes.
        let Some(conn) = self.conn.take() else {
            return;
        };
        self.shared.suspect.store(true, Ordering::Relaxed);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = conn.close().await;
            });
        }
    }
}

/// Whether `e` says the session failed rather than the statement: the connection broke, or
/// Postgres ended or refused the session (SQLSTATE classes 08 and 57P: shutdown, restart,
/// `pg_terminate_backend`, still starting up).
pub fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// Whether `e` is `one_statement_check` refusing a batch written in one statement (SQLSTATE
/// 40001, serialization_failure): nothing of the batch was written, and it can be tried again.
/// See `migrations/messaging/0009_one_statement_writes.sql`.
pub fn is_write_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40001"))
}

/// Whether `e` is a unique violation (SQLSTATE 23505) on the constraint or index `name`.
pub fn is_unique_violation(e: &sqlx::Error, name: &str) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505") && db.constraint() == Some(name))
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
