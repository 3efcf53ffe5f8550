//! Helpers for the root integration tests: network namespaces, veth pairs, running code and
//! commands inside a namespace, the kernel's own TCP counters.
//!
//! Every resource has a guard that removes it on drop, so a failing test cleans up too.
//! Helpers panic with a clear message instead of returning errors.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod agent;

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

/// Panics unless running as root (xtask runs these tests as root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "root integration tests need root: run them through `cargo xtask test`"
    );
}

/// A name unique to this process and call, short enough for an interface name (15 bytes).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command, panicking unless it exits 0; returns its stdout.
pub fn sh(argv: &[&str]) -> String {
    let out = run(argv);
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output, whatever the exit status.
pub fn run(argv: &[&str]) -> Output {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("starting {argv:?}: {e}"))
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `argv` inside the namespace; panics unless it exits 0.
    pub fn sh(&self, argv: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(argv);
        sh(&all)
    }

    /// A command that runs `program` in this network namespace only. Unlike `ip netns exec`,
    /// the mount namespace stays the caller's, so bpffs at /sys/fs/bpf (the agent's pins)
    /// stays visible.
    pub fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt as _;
        let path = std::ffi::CString::new(format!("/run/netns/{}", self.name)).expect("path");
        let mut c = Command::new(program);
        // SAFETY: the closure only calls async-signal-safe functions (open, setns, close).
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::setns(fd, libc::CLONE_NEWNET);
                libc::close(fd);
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Runs `f` on a thread that has entered the namespace, and returns its result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    /// The namespace's TCP counters (Tcp: from /proc/net/snmp, TcpExt: from /proc/net/netstat).
    pub fn tcp_counters(&self) -> TcpCounters {
        let snmp = self.sh(&["cat", "/proc/net/snmp"]);
        let netstat = self.sh(&["cat", "/proc/net/netstat"]);
        TcpCounters(parse_proc_counters(&(snmp + &netstat)))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: `f` is an open namespace file; setns only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// `Tcp:`/`TcpExt:` counters by `Group.Name`.
#[derive(Clone, Debug)]
pub struct TcpCounters(HashMap<String, u64>);

impl TcpCounters {
    pub fn get(&self, key: &str) -> u64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("no counter {key}"))
    }

    /// `self - earlier` for one counter.
    pub fn delta(&self, earlier: &Self, key: &str) -> u64 {
        self.get(key) - earlier.get(key)
    }
}

/// Parses the header/value line pairs of /proc/net/snmp and /proc/net/netstat.
fn parse_proc_counters(text: &str) -> HashMap<String, u64> {
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
    out
}

/// Two namespaces joined by a veth pair, with IPv4 and IPv6 addresses, offloads off (so
/// that one packet on the wire is one segment for the kernel's counters too).
pub struct Link {
    pub client: NetNs,
    pub server: NetNs,
    pub client_if: String,
    pub server_if: String,
    /// Last octet / group, so several links can coexist: 10.<net>.0.1 and fd00:<net>::1.
    pub net: u8,
}

impl Link {
    pub const CLIENT_V4: &'static str = "1";
    pub fn new() -> Self {
        let client = NetNs::new("tsc");
        let server = NetNs::new("tss");
        let client_if = unique("vc");
        let server_if = unique("vs");
        let net = (std::process::id() % 200 + 20) as u8;
        sh(&[
            "ip",
            "link",
            "add",
            &client_if,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            &server_if,
            "netns",
            &server.name,
        ]);
        for (ns, iface, host) in [(&client, &client_if, 1), (&server, &server_if, 2)] {
            ns.sh(&[
                "ip",
                "addr",
                "add",
                &format!("10.{net}.0.{host}/24"),
                "dev",
                iface,
            ]);
            ns.sh(&[
                "ip",
                "addr",
                "add",
                &format!("fd00:{net}::{host}/64"),
                "dev",
                iface,
                "nodad",
            ]);
            ns.sh(&[
                "ethtool", "-K", iface, "tso", "off", "gso", "off", "gro", "off",
            ]);
            ns.sh(&["ip", "link", "set", iface, "up"]);
        }
        Self {
            client,
            server,
            client_if,
            server_if,
            net,
        }
    }

    pub fn client_v4(&self) -> String {
        format!("10.{}.0.1", self.net)
    }
    pub fn server_v4(&self) -> String {
        format!("10.{}.0.2", self.net)
    }
    pub fn server_v6(&self) -> String {
        format!("fd00:{}::2", self.net)
    }

    /// The server's IPv4 and IPv6 socket addresses on `port`.
    pub fn server_addrs(&self, port: u16) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let v4 = format!("{}:{port}", self.server_v4())
            .parse()
            .expect("IPv4 address");
        let v6 = format!("[{}]:{port}", self.server_v6())
            .parse()
            .expect("IPv6 address");
        (v4, v6)
    }
}

/// Sends raw Ethernet frames out of `iface` (from inside the caller's namespace) through an
/// AF_PACKET socket.
pub fn send_raw_frames(iface: &str, frames: &[Vec<u8>]) {
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: plain socket/bind/sendto calls on a socket this function owns and closes;
    // every pointer passed points to a live, correctly sized value.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert_ne!(ifindex, 0, "no interface {iface}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        for frame in frames {
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                sent,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
    }
}
