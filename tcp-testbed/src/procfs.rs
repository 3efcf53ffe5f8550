//! What the kernel reports under /proc: TCP counters of a namespace, an interface's received
//! packets, a process's CPU time.

use std::{collections::HashMap, fs};

use anyhow::{Context as _, Result};

/// `Tcp:`/`TcpExt:` counters (any group of /proc/net/snmp and /proc/net/netstat) by
/// `Group.Name`.
#[derive(Clone, Debug)]
pub struct TcpCounters(HashMap<String, u64>);

impl TcpCounters {
    /// Parses the header/value line pairs of /proc/net/snmp and /proc/net/netstat. Negative
    /// values (`Tcp.MaxConn` is -1) are kept as their two's complement.
    pub fn parse(text: &str) -> Self {
        let lines: Vec<&str> = text.lines().collect();
        let mut out = HashMap::new();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let mut n = names.split_whitespace();
            let mut v = values.split_whitespace();
            let (Some(group), Some(_)) = (n.next(), v.next()) else {
                continue;
            };
            let group = group.trim_end_matches(':');
            for (name, value) in n.zip(v) {
                if let Ok(value) = value.parse::<i64>() {
                    out.insert(format!("{group}.{name}"), value as u64);
                }
            }
        }
        Self(out)
    }

    /// Counter `key` (`Group.Name`), if there is one.
    pub fn try_get(&self, key: &str) -> Option<u64> {
        self.0.get(key).copied()
    }

    /// Counter `key` (`Group.Name`); panics if there is none.
    pub fn get(&self, key: &str) -> u64 {
        self.try_get(key)
            .unwrap_or_else(|| panic!("no counter {key}"))
    }

    /// `self - earlier` for one counter.
    pub fn delta(&self, earlier: &Self, key: &str) -> u64 {
        self.get(key) - earlier.get(key)
    }
}

/// One counter, `Group.Name` (e.g. `Tcp.InSegs`), of `/proc/thread-self/net/<file>` (`snmp`,
/// `netstat`), in the calling thread's namespace.
pub fn net_counter(file: &str, key: &str) -> Result<u64> {
    let path = format!("/proc/thread-self/net/{file}");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    TcpCounters::parse(&text)
        .try_get(key)
        .with_context(|| format!("no {key} in {path}"))
}

/// Packets received by `iface` (from `/proc/thread-self/net/dev`, in the calling thread's
/// namespace; frames handled by XDP count too).
pub fn rx_packets(iface: &str) -> Result<u64> {
    let text = fs::read_to_string("/proc/thread-self/net/dev").context("reading net/dev")?;
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == iface).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
        })
        .with_context(|| format!("no rx_packets of {iface} in net/dev"))
}

/// User plus system CPU time of process `pid`, all its threads, in clock ticks
/// (`utime` + `stime` of `/proc/<pid>/stat`).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).context("reading stat")?;
    // The command name may contain spaces and parentheses: fields count from the last ')'.
    let rest = text.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`USER_HZ`).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Nanoseconds on CPU of every live thread of `pid` (first field of each thread's
/// `schedstat`): the same quantity as [`cpu_ticks`], at nanosecond resolution.
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).context("reading task list")? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        if let Ok(text) = fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .context("schedstat format")?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::TcpCounters;

    #[test]
    fn parses_header_value_pairs_by_group() {
        let text = "Tcp: RtoAlgorithm MaxConn InSegs\nTcp: 1 -1 42\n\
                    TcpExt: SyncookiesSent TCPKeepAlive\nTcpExt: 0 7\n";
        let c = TcpCounters::parse(text);
        assert_eq!(c.get("Tcp.InSegs"), 42);
        assert_eq!(c.get("TcpExt.TCPKeepAlive"), 7);
        assert_eq!(c.try_get("Tcp.MaxConn"), Some(u64::MAX));
        assert_eq!(c.try_get("Udp.InDatagrams"), None);
    }
}
