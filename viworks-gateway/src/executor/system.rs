//! The machine's health from sysinfo: CPU, memory, disks, load, uptime, network.
//!
//! [`SystemProbe`] keeps sysinfo's state between calls, because CPU use is only defined as
//! the difference between two refreshes. Every call reads `/proc` and blocks: run it on a
//! blocking thread.

use serde::Serialize;
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

/// One filesystem.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskUsage {
    /// Where it is mounted.
    pub mount: String,
    /// Its size in bytes.
    pub total_bytes: u64,
    /// Bytes free for unprivileged users.
    pub available_bytes: u64,
}

/// One network interface's counters since boot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetworkUsage {
    /// The interface name.
    pub interface: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The machine's state at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    /// CPU use across all cores since the previous snapshot, 0–100.
    pub cpu_percent: f64,
    /// Logical cores.
    pub cpu_count: usize,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Memory in bytes.
    pub memory_total_bytes: u64,
    /// Memory in use in bytes.
    pub memory_used_bytes: u64,
    /// Swap in bytes.
    pub swap_total_bytes: u64,
    /// Swap in use in bytes.
    pub swap_used_bytes: u64,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Mounted filesystems.
    pub disks: Vec<DiskUsage>,
    /// Network interfaces.
    pub networks: Vec<NetworkUsage>,
}

/// A long-lived probe: keeping it between calls is what lets CPU use be measured as the
/// difference between two refreshes.
#[derive(Debug)]
pub struct SystemProbe {
    system: System,
    disks: Disks,
    networks: Networks,
}

impl Default for SystemProbe {
    fn default() -> SystemProbe {
        SystemProbe::new()
    }
}

impl SystemProbe {
    /// A probe; the first snapshot's CPU figure covers the time since creation.
    ///
    /// Cost: one read of the CPU counters; disks and interfaces are listed on first use.
    pub fn new() -> SystemProbe {
        // This refresh is the baseline the first snapshot's CPU figure is measured against.
        let system =
            System::new_with_specifics(RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_cpu_usage()));
        SystemProbe { system, disks: Disks::new(), networks: Networks::new() }
    }

    /// Refreshes and reads the machine's state. Blocks on `/proc` and `statvfs` for a few
    /// milliseconds (longer when a network filesystem is slow to answer).
    pub fn snapshot(&mut self) -> Snapshot {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory_specifics(MemoryRefreshKind::everything());
        self.disks.refresh(true);
        self.networks.refresh(true);

        let load = System::load_average();
        let cpu_percent = f64::from(self.system.global_cpu_usage());
        let mut disks: Vec<DiskUsage> = self
            .disks
            .list()
            .iter()
            // Pseudo filesystems (proc, sysfs, cgroup and the like) report a size of zero.
            .filter(|disk| disk.total_space() > 0)
            .map(|disk| DiskUsage {
                mount: disk.mount_point().to_string_lossy().into_owned(),
                total_bytes: disk.total_space(),
                available_bytes: disk.available_space(),
            })
            .collect();
        disks.sort_by(|a, b| a.mount.cmp(&b.mount));
        let mut networks: Vec<NetworkUsage> = self
            .networks
            .list()
            .iter()
            .map(|(name, data)| NetworkUsage {
                interface: name.clone(),
                rx_bytes: data.total_received(),
                tx_bytes: data.total_transmitted(),
            })
            .collect();
        networks.sort_by(|a, b| a.interface.cmp(&b.interface));

        Snapshot {
            cpu_percent: if cpu_percent.is_finite() { cpu_percent.clamp(0.0, 100.0) } else { 0.0 },
            cpu_count: self.system.cpus().len(),
            load: [load.one, load.five, load.fifteen],
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            swap_total_bytes: self.system.total_swap(),
            swap_used_bytes: self.system.used_swap(),
            uptime_secs: System::uptime(),
            disks,
            networks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reports_this_machine() {
        let mut probe = SystemProbe::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let snapshot = probe.snapshot();
        assert!(snapshot.cpu_count > 0);
        assert!((0.0..=100.0).contains(&snapshot.cpu_percent), "{}", snapshot.cpu_percent);
        assert!(snapshot.memory_total_bytes > 0);
        assert!(snapshot.memory_used_bytes <= snapshot.memory_total_bytes);
        assert!(snapshot.swap_used_bytes <= snapshot.swap_total_bytes);
        assert!(snapshot.uptime_secs > 0);
        assert!(snapshot.load.iter().all(|load| load.is_finite() && *load >= 0.0));
        assert!(snapshot.disks.iter().all(|disk| disk.total_bytes > 0), "pseudo filesystems are skipped");
        assert!(snapshot.disks.iter().all(|disk| disk.available_bytes <= disk.total_bytes));
    }

    #[test]
    fn a_probe_can_be_read_again() {
        let mut probe = SystemProbe::default();
        let first = probe.snapshot();
        let second = probe.snapshot();
        assert_eq!(first.cpu_count, second.cpu_count);
        assert_eq!(first.memory_total_bytes, second.memory_total_bytes);
        assert!(second.uptime_secs >= first.uptime_secs);
    }
}
