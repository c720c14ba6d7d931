//! A TCP proxy in front of the real Postgres that, once armed, lets one chosen statement commit
//! and then closes the client's connection before the client hears back: the failure between a
//! commit and its answer that a crash of the network or of Postgres causes.
//!
//! It reads the wire protocol (v3, without TLS: the URL it hands out says `sslmode=disable`)
//! only to find the statement: a `Parse` whose text contains the marker names a prepared
//! statement, a `Bind` of that statement marks the connection, and the connection is closed
//! instead of passing on the first `ReadyForQuery` outside a transaction that follows, which
//! Postgres sends after the commit (the statement's own, or the transaction's `COMMIT`).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The proxy; it stops when dropped.
pub struct CommitCutter {
    port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Where the real server listens.
#[derive(Clone)]
enum Upstream {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl CommitCutter {
    /// A proxy to the server of `url`, cutting after a statement whose text contains `marker`.
    pub async fn start(url: &str, marker: &'static str) -> Self {
        let opts = PgConnectOptions::from_str(url).unwrap();
        let upstream = match opts.get_socket() {
            Some(dir) => Upstream::Unix(dir.join(format!(".s.PGSQL.{}", opts.get_port()))),
            None => Upstream::Tcp(format!("{}:{}", opts.get_host(), opts.get_port())),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, armed, cuts) = (upstream.clone(), a.clone(), c.clone());
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    match upstream {
                        Upstream::Tcp(addr) => {
                            if let Ok(server) = TcpStream::connect(addr).await {
                                let _ = server.set_nodelay(true);
                                relay(client, server, marker, armed, cuts).await;
                            }
                        }
                        Upstream::Unix(path) => {
                            if let Ok(server) = tokio::net::UnixStream::connect(path).await {
                                relay(client, server, marker, armed, cuts).await;
                            }
                        }
                    }
                });
            }
        });
        CommitCutter {
            port,
            armed,
            cuts,
            task,
        }
    }

    /// `db_url` (a database on the proxied server) reached through the proxy.
    pub fn url(&self, db_url: &str) -> String {
        let opts = PgConnectOptions::from_str(db_url).unwrap();
        let database = opts.get_database().unwrap_or("postgres");
        format!(
            "postgres://{}@127.0.0.1:{}/{database}?sslmode=disable",
            opts.get_username(),
            self.port
        )
    }

    /// Cuts the next execution of the statement bound from now on (once).
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Send + 'static>(
    client: TcpStream,
    server: S,
    marker: &'static str,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    // Set by the client side when the marked statement is bound; read by the server side.
    let marked = Arc::new(AtomicBool::new(false));
    let m = marked.clone();
    let armed_up = armed.clone();
    let upward = tokio::spawn(async move {
        let mut statements: Vec<Vec<u8>> = Vec::new();
        let mut started = false;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            // Whole messages only: the startup message has no type byte.
            loop {
                let (head, len_at) = if started { (1, 1) } else { (0, 0) };
                if buf.len() < len_at + 4 {
                    break;
                }
                let len = u32::from_be_bytes(buf[len_at..len_at + 4].try_into().unwrap()) as usize;
                if buf.len() < head + len {
                    break;
                }
                let msg: Vec<u8> = buf.drain(..head + len).collect();
                if started {
                    inspect_client(&msg, marker, &mut statements, &m, &armed_up);
                }
                started = true;
                if server_tx.write_all(&msg).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut buf = Vec::new();
    // While armed, the messages since the last ReadyForQuery: forwarded at one inside a
    // transaction (the client must see its statement's answer to send COMMIT), dropped with the
    // connection at the first one outside (status `I`: committed).
    let mut pending = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    'read: loop {
        let n = match server_rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let msg: Vec<u8> = buf.drain(..1 + len).collect();
            let ready = msg[0] == b'Z';
            let idle = ready && msg.get(5) == Some(&b'I');
            if marked.load(Ordering::SeqCst) && armed.load(Ordering::SeqCst) {
                pending.extend_from_slice(&msg);
                if idle && armed.swap(false, Ordering::SeqCst) {
                    cuts.fetch_add(1, Ordering::SeqCst);
                    break 'read;
                }
                if ready {
                    if client_tx.write_all(&pending).await.is_err() {
                        break 'read;
                    }
                    pending.clear();
                }
                continue;
            }
            if idle {
                marked.store(false, Ordering::SeqCst);
            }
            if client_tx.write_all(&msg).await.is_err() {
                break 'read;
            }
        }
    }
    upward.abort();
}

/// Remembers the statements whose text has `marker` and marks the connection when one is bound
/// while armed (an execution bound before `arm`, perhaps waiting on a lock, is not cut).
fn inspect_client(
    msg: &[u8],
    marker: &str,
    statements: &mut Vec<Vec<u8>>,
    marked: &AtomicBool,
    armed: &AtomicBool,
) {
    let body = &msg[5..];
    let cstr = |at: usize| -> (&[u8], usize) {
        let end = body[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(body.len(), |p| at + p);
        (&body[at..end], end + 1)
    };
    match msg[0] {
        b'P' => {
            let (name, next) = cstr(0);
            let (query, _) = cstr(next);
            if String::from_utf8_lossy(query).contains(marker) {
                statements.push(name.to_vec());
            } else {
                statements.retain(|s| s != name);
            }
        }
        b'B' => {
            let (_portal, next) = cstr(0);
            let (statement, _) = cstr(next);
            if armed.load(Ordering::SeqCst) && statements.iter().any(|s| s == statement) {
                marked.store(true, Ordering::SeqCst);
            }
        }
        _ => {}
    }
}
