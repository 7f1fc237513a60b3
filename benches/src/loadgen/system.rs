//! The operating system's side of a run: the open-file limit, a process's resident memory
//! read from `/proc`, and the loopback source addresses connections are spread over.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use super::LoadgenError;

/// Descriptors a process needs besides its connections (files, listeners, the database).
pub const FD_MARGIN: u64 = 1024;

/// An open-file limit: the soft limit in force and the hard ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimit {
    /// The limit in force.
    pub soft: u64,
    /// The most the soft limit may be raised to without privilege.
    pub hard: u64,
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to the hard limit, and the hard limit to
/// `needed` when it is lower and the process is privileged to. Children started afterwards
/// inherit the result. Fails with [`LoadgenError::FileLimit`] when the soft limit stays below
/// `needed`.
pub fn raise_file_limit(needed: u64) -> Result<FileLimit, LoadgenError> {
    let sys = |call| move |source| LoadgenError::Sys { call, source };
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("getrlimit(RLIMIT_NOFILE)"))?;
    if hard < needed {
        // Only a privileged process may raise its hard limit; failing here is not an error yet.
        if setrlimit(Resource::RLIMIT_NOFILE, needed, needed).is_ok() {
            tracing::info!(needed, previous_hard = hard, "raised the hard open-file limit");
        }
    }
    let (soft_now, hard_now) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("getrlimit(RLIMIT_NOFILE)"))?;
    if soft_now < hard_now {
        setrlimit(Resource::RLIMIT_NOFILE, hard_now, hard_now).map_err(sys("setrlimit(RLIMIT_NOFILE)"))?;
    }
    let (soft_now, hard_now) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("getrlimit(RLIMIT_NOFILE)"))?;
    tracing::debug!(soft, hard, soft_now, hard_now, "open-file limit");
    if soft_now < needed {
        return Err(LoadgenError::FileLimit { whose: "the load generator's", needed, limit: soft_now });
    }
    Ok(FileLimit { soft: soft_now, hard: hard_now })
}

/// The open-file limit of process `pid`, from `/proc/<pid>/limits`.
pub fn file_limit_of(pid: u32) -> Result<FileLimit, LoadgenError> {
    let path = PathBuf::from(format!("/proc/{pid}/limits"));
    let text = std::fs::read_to_string(&path).map_err(LoadgenError::io("read", &path))?;
    let missing = || LoadgenError::Proc { what: "Max open files", path: path.clone() };
    let line = text.lines().find(|l| l.starts_with("Max open files")).ok_or_else(missing)?;
    let mut numbers = line["Max open files".len()..].split_whitespace().map(|field| match field {
        "unlimited" => Some(u64::MAX),
        other => other.parse::<u64>().ok(),
    });
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(soft), Some(hard)) => Ok(FileLimit { soft, hard }),
        _ => Err(missing()),
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now, bytes.
    pub rss: u64,
    /// `VmHWM`: the most resident so far, bytes.
    pub peak: u64,
}

/// The resident memory of process `pid`. Fails when the process is gone.
pub fn memory_of(pid: u32) -> Result<Memory, LoadgenError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = std::fs::read_to_string(&path).map_err(LoadgenError::io("read", &path))?;
    let field = |name: &'static str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or(LoadgenError::Proc { what: name, path: path.clone() })
    };
    Ok(Memory { rss: field("VmRSS:")?, peak: field("VmHWM:")? })
}

/// The unit of the times in `/proc/<pid>/stat`: the kernel reports them in USER_HZ ticks,
/// 100 a second on every Linux architecture the load generator runs on.
const USER_HZ: f64 = 100.0;

/// What `/proc/<pid>/stat` says of a process: its parent, and its CPU time (user and
/// system), its own and that of the children it has waited for.
struct Stat {
    ppid: u32,
    own: Duration,
    reaped: Duration,
}

fn stat_of(pid: u32) -> Result<Stat, LoadgenError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(LoadgenError::io("read", &path))?;
    let missing = || LoadgenError::Proc { what: "ppid, utime and stime", path: path.clone() };
    // The command name (field 2) may hold spaces and parentheses; the fields after its last
    // `)` start at field 3, so ppid (4) is the 2nd of them, utime (14) and stime (15) the 12th
    // and 13th, cutime (16) and cstime (17) the 14th and 15th.
    let rest = text.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(missing)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |at: usize| fields.get(at).and_then(|f| f.parse::<u64>().ok());
    let ticks = |ticks: u64| Duration::from_secs_f64(ticks as f64 / USER_HZ);
    match (number(1), number(11), number(12), number(13), number(14)) {
        (Some(ppid), Some(user), Some(system), Some(c_user), Some(c_system)) => Ok(Stat {
            ppid: u32::try_from(ppid).map_err(|_| missing())?,
            own: ticks(user + system),
            reaped: ticks(c_user + c_system),
        }),
        _ => Err(missing()),
    }
}

/// CPU time (user and system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_of(pid: u32) -> Result<Duration, LoadgenError> {
    stat_of(pid).map(|stat| stat.own)
}

/// CPU time process `pid`, its children alive now and those it has reaped have used so far:
/// what a server that works in processes it forks (Postgres) has used. Reads every process's
/// `/proc/<pid>/stat` (a few hundred files).
pub fn cpu_of_tree(pid: u32) -> Result<Duration, LoadgenError> {
    let root = stat_of(pid)?;
    let mut total = root.own + root.reaped;
    let entries = std::fs::read_dir("/proc").map_err(LoadgenError::io("read", "/proc"))?;
    for entry in entries.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        // A process that exits meanwhile is skipped; its parent counts it once it is reaped.
        match stat_of(child) {
            Ok(stat) if stat.ppid == pid => total += stat.own + stat.reaped,
            _ => {}
        }
    }
    Ok(total)
}

/// CPU time a server child and the load generator itself used during one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseCpu {
    /// The phase.
    pub phase: &'static str,
    /// Its wall-clock length.
    pub wall: Duration,
    /// CPU time of the server (the host, or the echo server in the baseline).
    pub server: Duration,
    /// CPU time of the store's own server (Postgres and its processes), when it is measured:
    /// SQLite's work is the host's own.
    pub store: Option<Duration>,
    /// CPU time of the load generator.
    pub loadgen: Duration,
}

/// Splits the CPU time of a server child, of the store's server when there is one to
/// measure, and of this process into phases. A process that cannot be read counts as having
/// used nothing.
#[derive(Debug)]
pub struct CpuMeter {
    server: u32,
    store: Option<u32>,
    at: std::time::Instant,
    server_cpu: Duration,
    store_cpu: Duration,
    own_cpu: Duration,
}

impl CpuMeter {
    /// Starts measuring the server `pid`, the store server `store` (with its children) when
    /// given, and this process now.
    pub fn start(server: u32, store: Option<u32>) -> CpuMeter {
        CpuMeter {
            server,
            store,
            at: std::time::Instant::now(),
            server_cpu: cpu_of(server).unwrap_or_default(),
            store_cpu: store.and_then(|pid| cpu_of_tree(pid).ok()).unwrap_or_default(),
            own_cpu: cpu_of(std::process::id()).unwrap_or_default(),
        }
    }

    /// What was used since the previous lap (or the start), attributed to `phase`.
    pub fn lap(&mut self, phase: &'static str) -> PhaseCpu {
        let server_cpu = cpu_of(self.server).unwrap_or(self.server_cpu);
        let store_cpu = self.store.and_then(|pid| cpu_of_tree(pid).ok()).unwrap_or(self.store_cpu);
        let own_cpu = cpu_of(std::process::id()).unwrap_or(self.own_cpu);
        let lap = PhaseCpu {
            phase,
            wall: self.at.elapsed(),
            server: server_cpu.saturating_sub(self.server_cpu),
            store: self.store.map(|_| store_cpu.saturating_sub(self.store_cpu)),
            loadgen: own_cpu.saturating_sub(self.own_cpu),
        };
        (self.at, self.server_cpu, self.store_cpu, self.own_cpu) =
            (std::time::Instant::now(), server_cpu, store_cpu, own_cpu);
        lap
    }
}

/// CPU time per [`QUIET_WINDOW`] below which a server counts as idle: a tenth of a core, above
/// what 10,000 idle agents' heartbeats cost a host.
pub const QUIET_CPU: Duration = Duration::from_millis(10);

/// How often [`quiet`] samples the server's CPU time.
pub const QUIET_WINDOW: Duration = Duration::from_millis(100);

/// Waits, at most `limit`, until the server `pid` (and the store server `store`, with its
/// children) used less than [`QUIET_CPU`] in a [`QUIET_WINDOW`]: what a phase left behind (a
/// broadcast's state and audit writes, say) is done before the next phase is measured.
/// Returns how long it waited, or `None` if the server was still busy at `limit`.
pub async fn quiet(pid: u32, store: Option<u32>, limit: Duration) -> Option<Duration> {
    let used = || cpu_of(pid).unwrap_or_default() + store.and_then(|s| cpu_of_tree(s).ok()).unwrap_or_default();
    let started = std::time::Instant::now();
    let mut before = used();
    while started.elapsed() < limit {
        tokio::time::sleep(QUIET_WINDOW).await;
        let now = used();
        if now.saturating_sub(before) < QUIET_CPU {
            return Some(started.elapsed());
        }
        before = now;
    }
    None
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`, as printed there; empty when
/// unreadable. Other work on the machine competes with the host for its cores.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The loopback address connection `index` is made from: `per_source` connections from
/// 127.0.0.2, the next `per_source` from 127.0.0.3, and so on, so that no source address
/// runs out of ephemeral ports.
pub fn source_addr(index: usize, per_source: usize) -> IpAddr {
    let n = 2 + (index / per_source.max(1)) as u32;
    let [_, b, c, d] = n.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, b, c, d))
}

/// `N` distinct free TCP ports on 127.0.0.1, for a child process to listen on. Each is held
/// until all are found, so the kernel cannot hand out one of them twice. Another process may
/// take one before the child binds it; the child then fails to bind and says so.
pub fn free_ports<const N: usize>() -> Result<[u16; N], LoadgenError> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(LoadgenError::io("bind", "127.0.0.1:0"))?;
        *port = listener.local_addr().map_err(LoadgenError::io("read the address of", "127.0.0.1:0"))?.port();
        held.push(listener);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_found_together_are_distinct() {
        for _ in 0..50 {
            let ports = free_ports::<8>().expect("free ports");
            let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
            assert_eq!(distinct.len(), 8, "{ports:?}");
        }
    }

    #[test]
    fn sources_start_at_127_0_0_2_and_change_every_per_source_connections() {
        assert_eq!(source_addr(0, 1000), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_addr(999, 1000), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_addr(1000, 1000), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(source_addr(254 * 1000, 1000), IpAddr::V4(Ipv4Addr::new(127, 0, 1, 0)));
    }

    #[test]
    fn own_memory_and_limits_are_readable() {
        let pid = std::process::id();
        let memory = memory_of(pid).expect("own status");
        assert!(memory.rss > 0 && memory.peak >= memory.rss);
        let limit = file_limit_of(pid).expect("own limits");
        assert!(limit.soft > 0 && limit.hard >= limit.soft);
        let before = cpu_of(pid).expect("own stat");
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_of(pid).expect("own stat") > before, "50 ms of spinning shows as CPU time");
    }

    #[tokio::test]
    async fn a_sleeping_process_is_quiet_and_a_spinning_one_is_not() {
        let mut sleeper = std::process::Command::new("sleep").arg("10").spawn().expect("sleep runs");
        let mut spinner =
            std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh runs");
        let waited = quiet(sleeper.id(), None, Duration::from_secs(5)).await;
        assert!(waited.is_some_and(|w| w < Duration::from_secs(5)), "{waited:?}");
        assert_eq!(quiet(spinner.id(), None, Duration::from_millis(500)).await, None);
        for child in [&mut sleeper, &mut spinner] {
            child.kill().expect("kill");
            child.wait().expect("reaped");
        }
    }

    #[test]
    fn a_process_tree_counts_its_children_alive_and_reaped() {
        let pid = std::process::id();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 100000000 ]; do i=$((i+1)); done"])
            .spawn()
            .expect("sh runs");
        let started = std::time::Instant::now();
        while cpu_of(child.id()).unwrap_or_default() < Duration::from_millis(30) {
            assert!(started.elapsed() < Duration::from_secs(10), "the child spins");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (own, spun) = (cpu_of(pid).expect("own stat"), cpu_of(child.id()).expect("child"));
        assert!(cpu_of_tree(pid).expect("own tree") >= own + spun, "a live child is counted");
        child.kill().expect("kill");
        child.wait().expect("reaped");
        assert!(cpu_of_tree(pid).expect("own tree") >= own + spun, "a reaped child is counted");
    }
}
