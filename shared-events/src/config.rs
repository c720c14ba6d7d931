//! Settings every service shares, parsed from environment variables and flags (clap), so a bad
//! value stops the service at start-up with a message naming the variable.

use std::net::SocketAddr;

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
    /// Messages that were ready together and are handled in one transaction (group commit);
    /// 1 turns batching off.
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 16,
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
}

impl CommonArgs {
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
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
