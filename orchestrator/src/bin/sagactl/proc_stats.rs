//! CPU time and memory of the stack's processes, read from /proc (when they run locally).

use std::collections::BTreeMap;

const WATCHED: [&str; 6] = [
    "orchestrator",
    "inventory",
    "payment",
    "shipping",
    "postgres",
    "nats-server",
];

/// Clock ticks per second of /proc times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds per process kind, summed over its processes. Postgres includes the reaped
/// children of the postmaster, so backends that exit during a run still count.
pub fn snapshot() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (comm, stat) in processes() {
        let Some(kind) = WATCHED.iter().find(|w| comm == **w) else {
            continue;
        };
        // Fields after the ")" of comm: state is index 0, utime 11, stime 12, cutime 13, cstime 14.
        let fields: Vec<&str> = stat.split_whitespace().collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let mut ticks = num(11) + num(12);
        if *kind == "postgres" {
            ticks += num(13) + num(14);
        }
        *out.entry(kind.to_string()).or_default() += ticks / TICKS;
    }
    out
}

/// CPU seconds spent between two snapshots.
pub fn diff(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, a)| {
            (
                k.clone(),
                (a - before.get(k).copied().unwrap_or(0.0)).max(0.0),
            )
        })
        .collect()
}

/// Resident memory per process kind, in MB.
pub fn rss_mb() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if !WATCHED.contains(&comm) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(comm.to_string()).or_default() += kb / 1024.0;
    }
    out
}

/// `(comm, stat fields after comm)` of every process.
fn processes() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        out.push((comm, stat[close + 1..].to_string()));
    }
    out
}
