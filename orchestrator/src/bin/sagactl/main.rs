//! `sagactl`: the operator's command line: chaos runs, dead letters and the audit.

mod chaos;
mod dlq;
mod proc_stats;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use saga_orchestrator::audit::{AuditDbs, AuditScope, audit};

/// Where the stack runs.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoints {
    /// Orchestrator base URL.
    #[arg(
        long = "orchestrator-url",
        env = "SAGACTL_ORCHESTRATOR_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub orchestrator: String,
    /// Inventory base URL.
    #[arg(
        long = "inventory-url",
        env = "SAGACTL_INVENTORY_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub inventory: String,
    /// Payment base URL.
    #[arg(
        long = "payment-url",
        env = "SAGACTL_PAYMENT_URL",
        default_value = "http://127.0.0.1:8082",
        global = true
    )]
    pub payment: String,
    /// Shipping base URL.
    #[arg(
        long = "shipping-url",
        env = "SAGACTL_SHIPPING_URL",
        default_value = "http://127.0.0.1:8083",
        global = true
    )]
    pub shipping: String,
    /// NATS URL.
    #[arg(
        long = "nats-url",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// Bearer token for the services' APIs (when they run with AUTH_MODE=jwt).
    #[arg(long, env = "SAGACTL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// Database URLs for the audit.
#[derive(Debug, Clone, clap::Args)]
pub struct Databases {
    /// Orchestrator database.
    #[arg(
        long,
        env = "ORCHESTRATOR_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/saga_orchestrator",
        global = true,
        hide_env_values = true
    )]
    pub orchestrator_db: String,
    /// Inventory database.
    #[arg(
        long,
        env = "INVENTORY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/saga_inventory",
        global = true,
        hide_env_values = true
    )]
    pub inventory_db: String,
    /// Payment database.
    #[arg(
        long,
        env = "PAYMENT_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/saga_payment",
        global = true,
        hide_env_values = true
    )]
    pub payment_db: String,
    /// Shipping database.
    #[arg(
        long,
        env = "SHIPPING_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/saga_shipping",
        global = true,
        hide_env_values = true
    )]
    pub shipping_db: String,
}

impl Databases {
    async fn connect(&self) -> anyhow::Result<AuditDbs> {
        let pool = |url: &str| {
            let url = url.to_owned();
            async move {
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(3))
                    .connect(&url)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot connect to {}",
                            saga_shared_events::config::redact_url(&url)
                        )
                    })
            }
        };
        Ok(AuditDbs {
            orchestrator: pool(&self.orchestrator_db).await?,
            inventory: pool(&self.inventory_db).await?,
            payment: pool(&self.payment_db).await?,
            shipping: pool(&self.shipping_db).await?,
        })
    }
}

#[derive(Parser)]
#[command(name = "sagactl", version, about = "Operate the order saga stack")]
struct Cli {
    #[command(flatten)]
    endpoints: Endpoints,
    #[command(flatten)]
    nats_auth: saga_shared_events::config::NatsAuthArgs,
    #[command(flatten)]
    databases: Databases,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fire orders at a running stack with chosen failure rates, then report and audit.
    Chaos(chaos::ChaosArgs),
    /// Dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Issue a signed JWT for local testing (RS256 or ES256, from a PEM private key).
    Token {
        /// PEM private key (RSA or P-256).
        #[arg(long)]
        key: std::path::PathBuf,
        /// Scopes to grant (repeatable): orders:read, orders:write, orders:admin.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// `sub` claim.
        #[arg(long, default_value = "sagactl")]
        subject: String,
        /// `iss` claim.
        #[arg(long)]
        issuer: Option<String>,
        /// `aud` claim.
        #[arg(long)]
        audience: Option<String>,
        /// `kid` header (to pick a key from a JWKS).
        #[arg(long)]
        kid: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
    /// Check the four databases for violated guarantees; exits 1 on any violation.
    Audit {
        /// Also report sagas still in flight and unpublished outbox rows.
        #[arg(long)]
        settled: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish dead letters to their original subjects.
    Replay {
        /// Dead letter ids (from `dlq list`).
        ids: Vec<u64>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Chaos(args) => {
            let dbs = cli.databases.connect().await.ok();
            let report = chaos::run(&cli.endpoints, &cli.nats_auth, &args, dbs).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                chaos::print_report(&report);
            }
            if !report.is_clean() {
                std::process::exit(1);
            }
        }
        Command::Dlq { command } => {
            let client = saga_shared_events::nats::connect(
                &cli.endpoints.nats_url,
                "sagactl",
                &cli.nats_auth,
                Duration::from_secs(5),
            )
            .await?;
            let js = async_nats::jetstream::new(client);
            match command {
                DlqCommand::List { limit, json } => {
                    let letters = dlq::list(&js, limit).await?;
                    if json {
                        println!("{}", serde_json::to_string(&letters)?);
                    } else if letters.is_empty() {
                        println!("no dead letters");
                    } else {
                        println!(
                            "{:>8}  {:<25}  {:>4}  {:<40}  error",
                            "id", "at", "dlv", "subject"
                        );
                        for d in letters {
                            println!(
                                "{:>8}  {:<25}  {:>4}  {:<40}  {}",
                                d.id, d.at, d.deliveries, d.subject, d.error
                            );
                        }
                    }
                }
                DlqCommand::Replay { ids, all } => {
                    if !all && ids.is_empty() {
                        anyhow::bail!("name dead letter ids or use --all");
                    }
                    let n = dlq::replay(&js, (!all).then_some(ids)).await?;
                    println!("replayed {n} dead letter(s)");
                }
            }
        }
        Command::Token {
            key,
            scopes,
            subject,
            issuer,
            audience,
            kid,
            ttl_secs,
        } => {
            use jsonwebtoken::{Algorithm, EncodingKey, Header};
            let pem =
                std::fs::read(&key).with_context(|| format!("cannot read {}", key.display()))?;
            let (alg, enc) = match EncodingKey::from_rsa_pem(&pem) {
                Ok(k) => (Algorithm::RS256, k),
                Err(_) => (
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(&pem)
                        .context("not an RSA or P-256 private key in PEM form")?,
                ),
            };
            let now = chrono::Utc::now().timestamp();
            let mut claims = serde_json::json!({
                "sub": subject, "scope": scopes.join(" "), "iat": now, "nbf": now, "exp": now + ttl_secs,
            });
            if let Some(iss) = issuer {
                claims["iss"] = iss.into();
            }
            if let Some(aud) = audience {
                claims["aud"] = aud.into();
            }
            let mut header = Header::new(alg);
            header.kid = kid;
            println!("{}", jsonwebtoken::encode(&header, &claims, &enc)?);
        }
        Command::Audit { settled, json } => {
            let dbs = cli.databases.connect().await?;
            let report = audit(
                &dbs,
                &AuditScope {
                    expect_settled: settled,
                    ..Default::default()
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{} sagas: {:?}", report.sagas, report.by_status);
                println!("{} violations", report.violations.len());
                for v in &report.violations {
                    println!("  VIOLATION {v}");
                }
            }
            if !report.is_clean() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
