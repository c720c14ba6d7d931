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

/// CPU seconds of every watched process, by pid: `(kind, seconds)`.
pub type Snapshot = BTreeMap<u32, (&'static str, f64)>;

/// The load generator: this process only, as other `sagactl` processes are not this run's.
const OWN: &str = "sagactl";

/// CPU seconds of every watched process, and of this one (the load generator shares the
/// machine). Postgres includes the reaped children of the postmaster, so backends that exit
/// during a run still count.
pub fn snapshot() -> Snapshot {
    let mut out = Snapshot::new();
    for (pid, comm, stat) in processes() {
        let Some(kind) = kind(pid, &comm) else {
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
        if kind == "postgres" {
            ticks += num(13) + num(14);
        }
        out.insert(pid, (kind, ticks / TICKS));
    }
    out
}

/// CPU seconds spent between two snapshots, per process kind. Compared per pid: a process of
/// an earlier stack still exiting when the run began (its CPU time is not the run's) is reaped
/// without lowering the sum, and one started during the run counts all of its time.
pub fn diff(before: &Snapshot, after: &Snapshot) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (pid, (kind, secs)) in after {
        let earlier = before.get(pid).map(|(_, s)| *s).unwrap_or(0.0);
        *out.entry(kind.to_string()).or_default() += (secs - earlier).max(0.0);
    }
    out
}

/// Memory per process kind, in MB: the proportional set size (PSS), in which a page shared by
/// several processes counts a share in each, so the sum over Postgres' processes counts its
/// shared buffers once (their resident sizes summed count them in every backend). Where PSS
/// cannot be read (another user's process), the resident size stands in.
pub fn memory_mb() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (pid, comm, _) in processes() {
        let Some(kind) = kind(pid, &comm) else {
            continue;
        };
        let path = std::path::Path::new("/proc").join(pid.to_string());
        let pss = std::fs::read_to_string(path.join("smaps_rollup"))
            .ok()
            .and_then(|t| kb_field(&t, "Pss:"));
        let kb = pss.or_else(|| {
            std::fs::read_to_string(path.join("status"))
                .ok()
                .and_then(|t| kb_field(&t, "VmRSS:"))
        });
        *out.entry(kind.to_string()).or_default() += kb.unwrap_or(0.0) / 1024.0;
    }
    out
}

/// What a process counts as: this one is the load generator, the others by their name.
fn kind(pid: u32, comm: &str) -> Option<&'static str> {
    if pid == std::process::id() {
        return Some(OWN);
    }
    WATCHED.iter().find(|w| comm == **w).copied()
}

/// The kB value of the line starting with `name` in a /proc file.
fn kb_field(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// `(pid, comm, stat fields after comm)` of every process.
fn processes() -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        out.push((pid, comm, stat[close + 1..].to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_fields_are_read_by_name() {
        let rollup = "560e97b90000-7ffddfa43000 ---p 00000000 00:00 0  [rollup]\n\
                      Rss:                1768 kB\n\
                      Pss:                 324 kB\n\
                      Pss_Dirty:           116 kB\n";
        assert_eq!(kb_field(rollup, "Pss:"), Some(324.0));
        assert_eq!(kb_field(rollup, "Rss:"), Some(1768.0));
        assert_eq!(
            kb_field("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048.0)
        );
        assert_eq!(kb_field(rollup, "VmRSS:"), None);
    }

    #[test]
    fn the_load_generator_counts_itself_whatever_its_name() {
        let own = snapshot().remove(&std::process::id());
        assert_eq!(own.map(|(kind, _)| kind), Some(OWN));
        assert!(memory_mb().get(OWN).is_some_and(|mb| *mb > 0.0));
    }

    #[test]
    fn a_process_reaped_during_the_run_does_not_lower_the_sum() {
        let before = Snapshot::from([
            (10, ("orchestrator", 50.0)), // an earlier stack's process, still exiting
            (20, ("orchestrator", 1.0)),
            (30, ("postgres", 4.0)),
        ]);
        let after = Snapshot::from([
            (20, ("orchestrator", 3.5)),
            (30, ("postgres", 6.0)),
            (40, ("postgres", 0.5)), // started during the run
        ]);
        let cpu = diff(&before, &after);
        assert_eq!(cpu["orchestrator"], 2.5);
        assert_eq!(cpu["postgres"], 2.5);
    }
}
