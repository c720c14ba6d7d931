//! Settings every service shares, parsed from environment variables and flags (clap), so a bad
//! value stops the service at start-up with a message naming the variable.

use std::net::SocketAddr;

use crate::auth::AuthArgs;
use crate::telemetry::LogFormat;

/// Connection and logging settings common to every service.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Postgres URL of this service's own database (created when missing).
    /// Default: postgres://postgres@127.0.0.1:5432/saga_<service>.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Address the HTTP API listens on.
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Maximum Postgres connections in this process's pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
    /// Messages this process handles at once.
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub consumer_concurrency: u32,
    /// Deliveries of a message that keeps failing before it is dead-lettered.
    #[arg(long, env = "CONSUMER_MAX_DELIVER", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub consumer_max_deliver: u32,
    /// Messages that were ready together and are handled in one transaction (group commit);
    /// 1 turns batching off. Equal to the concurrency by default: one batch in flight, as large as
    /// what arrived while the previous one committed, measured cheaper than several smaller ones.
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub consumer_batch: u32,
    /// Copies of each JetStream stream (3 on a three-node cluster).
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=5))]
    pub stream_replicas: u32,
    /// Publish outgoing messages right after commit (the outbox relay stays the safety net).
    /// `false` leaves every message to the relay.
    #[arg(long, env = "OUTBOX_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub outbox_fast_path: bool,
    /// Requests served at once; beyond that the service sheds load with `503` and `Retry-After`.
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub http_max_in_flight: u32,
    /// A request taking longer than this is answered `503`.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub http_request_timeout_ms: u64,
    /// REST authentication.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
}

/// How to authenticate to NATS (at most one of user/password, token, nkey seed, creds file) and
/// TLS options. Secret values are never logged.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuthArgs {
    /// NATS user name (with `NATS_PASSWORD`).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS `.creds` file (JWT + nkey).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// NATS nkey seed (`SU…`).
    #[arg(long, env = "NATS_NKEY_SEED", hide_env_values = true)]
    pub nats_nkey_seed: Option<String>,
    /// CA certificate (PEM) to verify the server; turns TLS on.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with `NATS_TLS_KEY`.
    #[arg(long, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,
}

impl NatsAuthArgs {
    /// Checks the combination: one credential kind at most; user and password together; cert
    /// and key together.
    pub fn validate(&self) -> Result<(), String> {
        let kinds = [
            self.nats_user.is_some() || self.nats_password.is_some(),
            self.nats_token.is_some(),
            self.nats_creds.is_some(),
            self.nats_nkey_seed.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(
                "set only one of NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS, NATS_NKEY_SEED"
                    .into(),
            );
        }
        if self.nats_user.is_some() != self.nats_password.is_some() {
            return Err("NATS_USER and NATS_PASSWORD go together".into());
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err("NATS_TLS_CERT and NATS_TLS_KEY go together".into());
        }
        Ok(())
    }
}

impl CommonArgs {
    /// The settings as a log line, secrets redacted.
    pub fn describe(&self, service: &str) -> String {
        let a = &self.nats_auth;
        let set = |v: &Option<String>| if v.is_some() { "set" } else { "unset" };
        format!(
            "nats_url={} database_url={} http_addr={:?} db_pool_size={} consumer_concurrency={} \
             consumer_batch={} stream_replicas={} outbox_fast_path={} http_max_in_flight={} \
             http_request_timeout_ms={} auth_mode={:?} nats_user={:?} nats_password={} \
             nats_token={} nats_nkey_seed={} nats_creds={:?} nats_tls_ca={:?}",
            redact_url(&self.nats_url),
            redact_url(&self.database_url_or_default(service)),
            self.http_addr,
            self.db_pool_size,
            self.consumer_concurrency,
            self.consumer_batch,
            self.stream_replicas,
            self.outbox_fast_path,
            self.http_max_in_flight,
            self.http_request_timeout_ms,
            self.auth.auth_mode,
            a.nats_user,
            set(&a.nats_password),
            set(&a.nats_token),
            set(&a.nats_nkey_seed),
            a.nats_creds,
            a.nats_tls_ca,
        )
    }

    /// The database URL, or this service's default.
    pub fn database_url_or_default(&self, service: &str) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("postgres://postgres@127.0.0.1:5432/saga_{service}"))
    }

    /// The listen address, or this service's default.
    pub fn http_addr_or(&self, default_port: u16) -> SocketAddr {
        self.http_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }
}

/// Parses a probability in `0.0..=1.0` (for `*_RATE` variables).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number; expected 0.0 to 1.0"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range; expected 0.0 to 1.0"))
    }
}

/// Redacts the password of a URL for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            if creds.contains(':') {
                format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
            } else {
                url.to_string()
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        assert_eq!(parse_rate("0.9"), Ok(0.9));
        assert!(parse_rate("1.5").unwrap_err().contains("out of range"));
        assert!(parse_rate("abc").is_err());
        assert!(parse_rate("NaN").is_err());
    }

    #[test]
    fn the_settings_dump_never_shows_secrets() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: CommonArgs,
        }
        let t = T::parse_from([
            "t",
            "--database-url",
            "postgres://u:hunter2@db/x",
            "--nats-user",
            "svc",
            "--nats-password",
            "s3cret",
        ]);
        let line = t.c.describe("x");
        assert!(
            !line.contains("hunter2") && !line.contains("s3cret"),
            "{line}"
        );
        assert!(line.contains("nats_password=set"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
