//! System plumbing: commands, network namespaces and the veth test bed, procfs readers, and the
//! one map syscall aya does not wrap (batch update).
//!
//! Every resource created here has a guard that removes it on drop, so a failing or panicking
//! benchmark leaves nothing behind; names carry the process id, so that a second benchmark (or
//! the test suite) on the same machine never collides, and [`remove_stale`] clears what a
//! killed run left.

use std::{
    fs::{self, File},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

/// Prefix of every namespace, interface and pin directory the benchmark creates.
pub const PREFIX: &str = "tsb";

/// A name unique to this process and call: `<PREFIX><tag><pid>x<n>`, at most 15 bytes (an
/// interface name) for a one-letter tag.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{tag}{}x{n}", std::process::id())
}

/// Runs a command; its stdout if it exits 0, else an error carrying its stderr.
pub fn sh(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("starting {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes the namespaces and pin directories of earlier benchmark processes that no longer
/// exist (killed before their guards ran).
pub fn remove_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let digits: String = rest
            .trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == '-')
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = sh(&["ip", "netns", "del", &name]);
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A network namespace (`ip netns add`), deleted on drop with everything in it: interfaces,
/// routes, iptables/nft rules, conntrack entries.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let ns = Self { name: unique(tag) };
        sh(&["ip", "netns", "add", &ns.name])?;
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file (what `nsenter --net=` and `setns` take).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `argv` inside the namespace (through `ip netns exec`: for tools that do not touch
    /// bpffs, which `ip netns exec` hides).
    pub fn sh(&self, argv: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(argv);
        sh(&all)
    }

    /// Moves the calling thread into the namespace until the guard is dropped. Only this
    /// thread moves: sockets it opens meanwhile, and what it reads under `/proc/thread-self/net`,
    /// belong to the namespace.
    pub fn enter(&self) -> Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        set_netns(&self.path())?;
        Ok(NetnsGuard {
            original: original.into(),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn set_netns(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `f` is an open namespace file; setns changes only this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The calling thread is in another namespace while this lives; dropping it moves it back.
pub struct NetnsGuard {
    original: OwnedFd,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: `original` is the namespace file this thread came from.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        // Staying in the wrong namespace would silently falsify everything after: stop.
        assert_eq!(
            rc,
            0,
            "returning to the original network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Two namespaces joined by a veth pair, set up as the live-traffic benchmark needs it:
/// `tx` 10.99.0.1 sends, `rx` 10.99.0.2 receives. GRO is on at both ends: a veth takes frames
/// redirected to it (XDP_TX of the generator) only when its peer has NAPI, which either an XDP
/// program or GRO gives; with GRO on in every case the cases stay comparable. The receiver
/// answers the generator's segments with RSTs; a blackhole route for the sender's address makes
/// their route lookup fail, so no traffic flows back in any case.
pub struct Testbed {
    /// Receiving side (the agent, XDP programs, conntrack rules live here).
    pub rx: Netns,
    /// Sending side (the generator runs here).
    pub tx: Netns,
    /// Interface in `tx`.
    pub tx_if: String,
    /// Interface in `rx`.
    pub rx_if: String,
}

impl Testbed {
    /// Sender's MAC address.
    pub const TX_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x01];
    /// Receiver's MAC address.
    pub const RX_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x02];
    /// Sender's address.
    pub const TX_ADDR: [u8; 4] = [10, 99, 0, 1];
    /// Receiver's address.
    pub const RX_ADDR: [u8; 4] = [10, 99, 0, 2];

    /// Creates both namespaces and the veth pair.
    pub fn new() -> Result<Self> {
        let bed = Self {
            tx: Netns::new("t")?,
            rx: Netns::new("r")?,
            tx_if: unique("a"),
            rx_if: unique("b"),
        };
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (tx_mac, rx_mac) = (mac(Self::TX_MAC), mac(Self::RX_MAC));
        sh(&[
            "ip",
            "link",
            "add",
            &bed.tx_if,
            "address",
            &tx_mac,
            "netns",
            bed.tx.name(),
            "type",
            "veth",
            "peer",
            "name",
            &bed.rx_if,
            "address",
            &rx_mac,
            "netns",
            bed.rx.name(),
        ])?;
        for (ns, iface, addr) in [
            (&bed.tx, &bed.tx_if, "10.99.0.1/24"),
            (&bed.rx, &bed.rx_if, "10.99.0.2/24"),
        ] {
            sh(&["ip", "-n", ns.name(), "addr", "add", addr, "dev", iface])?;
            sh(&["ip", "-n", ns.name(), "link", "set", iface, "up"])?;
            ns.sh(&["ethtool", "-K", iface, "gro", "on"])?;
        }
        sh(&[
            "ip",
            "-n",
            bed.rx.name(),
            "route",
            "add",
            "blackhole",
            "10.99.0.1/32",
        ])?;
        Ok(bed)
    }
}

/// One counter, `Group.Name` (e.g. `Tcp.InSegs`), of `/proc/thread-self/net/<file>` (`snmp`,
/// `netstat`: header and value lines in pairs), in the calling thread's namespace.
pub fn net_counter(file: &str, key: &str) -> Result<u64> {
    let path = format!("/proc/thread-self/net/{file}");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (group, name) = key.split_once('.').context("key is Group.Name")?;
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if names.split_whitespace().next() != Some(&format!("{group}:")) {
            continue;
        }
        if let Some((_, v)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return v.parse().with_context(|| format!("{key} in {path}"));
        }
    }
    bail!("no {key} in {path}")
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

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6): `count` keys and values, packed, into map `fd`.
pub fn update_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<()> {
    // SAFETY: the callers pack `count` keys and values of the map's own types.
    unsafe { tcp_user::batch::update(fd, keys, values, count) }.map_err(|(stored, e)| {
        anyhow::anyhow!("BPF_MAP_UPDATE_BATCH stored {stored} of {count}: {e}")
    })
}

/// A bpffs directory for one agent's pins, removed on drop (the pinned maps go with it).
pub struct PinDir(PathBuf);

impl PinDir {
    /// A fresh directory path under /sys/fs/bpf (the agent creates it).
    pub fn new() -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(unique("p")))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
