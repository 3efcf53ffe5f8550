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

/// Names the prerequisites a run may go without (comma-separated: `pcaps`, `cpus`); set by
/// whoever runs the suite, reported by `cargo xtask test`.
pub const ALLOW_SKIP: &str = "TCPSCOPE_ALLOW_SKIP";

/// `Ok(())` when the prerequisite `name` is met (`missing` is `None`). When it is not, the test
/// fails, unless [`ALLOW_SKIP`] names it: then it prints SKIPPED and the caller returns.
fn prerequisite(name: &str, missing: Option<String>) -> Result<(), ()> {
    let Some(why) = missing else { return Ok(()) };
    let allowed = std::env::var(ALLOW_SKIP).unwrap_or_default();
    assert!(
        allowed.split(',').any(|a| a.trim() == name),
        "{why}; set {ALLOW_SKIP}={name} to skip the tests that need it"
    );
    eprintln!("SKIPPED ({ALLOW_SKIP}={name}): {why}");
    Err(())
}

/// The public captures and their truth, beside the repository (`../shared/pcaps`); `None`
/// only when they are absent and skipping was asked for.
pub fn pcaps_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/pcaps");
    let present = dir.join("truth").is_dir() && dir.join("captures").is_dir();
    let missing = (!present).then(|| format!("the public captures are not at {}", dir.display()));
    prerequisite("pcaps", missing).ok().map(|()| dir)
}

/// Whether the machine has two CPUs (false only when skipping was asked for).
pub fn two_cpus() -> bool {
    let n = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let missing = (n < 2).then(|| format!("this test needs two CPUs, the machine has {n}"));
    prerequisite("cpus", missing).is_ok()
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

/// The JSON that `tcpscope ARGS` prints; panics unless it succeeds.
pub fn tcpscope_json<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpscope"))
        .args(args)
        .output()
        .expect("run tcpscope");
    assert!(
        out.status.success(),
        "tcpscope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("tcpscope {args:?}: {e}"))
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

/// Applies an nft ruleset in `ns`.
pub fn nft(ns: &NetNs, rules: &str) {
    use std::io::Write as _;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("nft rules");
    assert!(child.wait().expect("nft").success(), "nft -f: {rules}");
}

/// Whether a flow of `tcpscope flows --json` has an endpoint on `port`.
pub fn on_port(flow: &serde_json::Value, port: u16) -> bool {
    let suffix = format!(":{port}");
    flow["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .any(|e| e["address"].as_str().is_some_and(|a| a.ends_with(&suffix)))
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
        let link = Self {
            client,
            server,
            client_if,
            server_if,
            net,
        };
        link.wire();
        link
    }

    /// Creates the veth pair with its addresses, up (again, after a test deleted it).
    pub fn wire(&self) {
        let Self {
            client,
            server,
            client_if,
            server_if,
            net,
        } = self;
        sh(&[
            "ip",
            "link",
            "add",
            client_if,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            server_if,
            "netns",
            &server.name,
        ]);
        for (ns, iface, host) in [(&client, client_if, 1), (&server, server_if, 2)] {
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

/// A directory removed (with its contents) on drop.
pub struct RemoveOnDrop(pub std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A capture written by tcpdump running in a namespace; stopped and its file removed on drop.
pub struct Tcpdump {
    child: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
    pub file: std::path::PathBuf,
}

impl Tcpdump {
    /// Starts `tcpdump -w FILE ARGS` in `ns` and waits until it listens. Every packet is kept
    /// whole (snaplen 9000) and written as it comes (`--immediate-mode`), with a 64 MiB ring:
    /// with the default snaplen of 256 KiB a slot per packet leaves the ring a handful of
    /// slots, and the `any` device then drops most of a burst.
    pub fn start(ns: &NetNs, args: &[&str]) -> Self {
        use std::io::BufRead as _;
        let file = std::env::temp_dir().join(format!("{}.pcap", unique("tcpscope-cap-")));
        let mut child = ns
            .command("tcpdump")
            // -Z root: Debian's tcpdump otherwise drops to its own user before writing.
            .args([
                "-n",
                "-s",
                "9000",
                "-B",
                "65536",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
            ])
            .arg("-w")
            .arg(&file)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        // tcpdump says "listening on IFACE" once its socket is bound (it exits if it cannot).
        while !line.contains("listening on") {
            line.clear();
            let n = stderr.read_line(&mut line).expect("tcpdump's stderr");
            assert!(n > 0, "tcpdump {args:?} exited before listening");
        }
        Self {
            child,
            stderr,
            file,
        }
    }

    /// Stops the capture (SIGINT: tcpdump flushes and exits); the file stays until drop.
    /// Panics if the kernel dropped any packet of it (a capture with holes would make any
    /// comparison with it meaningless).
    pub fn stop(&mut self) {
        use std::io::Read as _;
        // SAFETY: a signal to a child this guard owns and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("tcpdump");
        let mut summary = String::new();
        let _ = self.stderr.read_to_string(&mut summary);
        assert!(status.success(), "tcpdump: {status}: {summary}");
        assert!(
            summary
                .lines()
                .any(|l| l.trim() == "0 packets dropped by kernel"),
            "the capture lost packets: {summary}"
        );
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
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

pub mod metrics {
    //! Talking to the exporter and to a real Prometheus server over HTTP/1.1.

    use std::{
        collections::BTreeMap,
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Duration,
    };

    /// Where the test agents serve their metrics (inside their namespace).
    pub const AGENT: &str = "127.0.0.1:9977";

    /// The text of `/metrics` of the agent in `ns`.
    pub fn scrape_text(ns: &super::NetNs) -> String {
        let (status, body) = ns.enter(|| http_get(AGENT, "/metrics"));
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The samples of `/metrics` of the agent in `ns`.
    pub fn scrape(ns: &super::NetNs) -> BTreeMap<String, f64> {
        parse(&scrape_text(ns))
    }

    /// `GET path` on `addr` (from the caller's namespace): status code and body.
    pub fn http_get(addr: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (status, body.to_owned())
    }

    /// Samples of a text exposition: `name{labels}` (labels sorted, as exposed) → value.
    pub fn parse(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// The sample `name{labels}` of an exposition, 0 if absent.
    pub fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
        samples.get(key).copied().unwrap_or(0.0)
    }

    /// Sum of the samples of `name` whose labels include every `k="v"` of `having`.
    pub fn sum(samples: &BTreeMap<String, f64>, name: &str, having: &[&str]) -> f64 {
        samples
            .iter()
            .filter(|(k, _)| {
                let (n, labels) = k.split_once('{').unwrap_or((k, ""));
                n == name && having.iter().all(|h| labels.contains(h))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Percent-encodes a query-string value.
    pub fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
}

pub mod prometheus {
    //! A real Prometheus server, started in a test namespace with a temporary config.

    use std::{
        path::PathBuf,
        process::{Child, Stdio},
        thread,
        time::{Duration, Instant},
    };

    use serde_json::Value;

    use super::{NetNs, metrics::http_get, unique};

    pub struct Prometheus {
        child: Child,
        dir: PathBuf,
        /// `127.0.0.1:port` inside the namespace.
        pub addr: String,
        ns_path: String,
    }

    impl Prometheus {
        /// Starts Prometheus in `ns`, scraping `target` (`host:port`) every second, and waits
        /// (bounded) until it is ready.
        pub fn start(ns: &NetNs, target: &str) -> Self {
            let dir = std::env::temp_dir().join(unique("tcpscope-prom-"));
            std::fs::create_dir_all(&dir).expect("prometheus dir");
            let config = dir.join("prometheus.yml");
            std::fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                     scrape_configs:\n  - job_name: tcpscope\n    static_configs:\n      \
                     - targets: ['{target}']\n"
                ),
            )
            .expect("prometheus config");
            let addr = "127.0.0.1:19090".to_owned();
            let child = ns
                .command("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("log")).expect("log file"))
                .spawn()
                .expect("starting prometheus (Debian package prometheus)");
            let p = Self {
                child,
                dir,
                addr,
                ns_path: format!("/run/netns/{}", ns.name),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while p.get("/-/ready").0 != 200 {
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready in 30 s: {}",
                    std::fs::read_to_string(p.dir.join("log")).unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(200));
            }
            p
        }

        fn get(&self, path: &str) -> (u16, String) {
            let (ns, addr, path) = (self.ns_path.clone(), self.addr.clone(), path.to_owned());
            thread::spawn(move || {
                super::enter_netns(&ns);
                match std::net::TcpStream::connect(&addr) {
                    Ok(_) => http_get(&addr, &path),
                    Err(_) => (0, String::new()),
                }
            })
            .join()
            .expect("prometheus client thread")
        }

        /// An instant query: each series' labels (JSON object) and value.
        pub fn query(&self, q: &str) -> Vec<(Value, f64)> {
            let (status, body) = self.get(&format!(
                "/api/v1/query?query={}",
                super::metrics::encode(q)
            ));
            assert_eq!(status, 200, "query {q}: {body}");
            let v: Value = serde_json::from_str(&body).expect("JSON");
            v["data"]["result"]
                .as_array()
                .expect("vector result")
                .iter()
                .map(|s| {
                    let value = s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse().ok())
                        .expect("sample value");
                    (s["metric"].clone(), value)
                })
                .collect()
        }

        /// The single value of a query that yields one series (None: no series).
        pub fn scalar(&self, q: &str) -> Option<f64> {
            let r = self.query(q);
            assert!(r.len() <= 1, "{q} gives {} series", r.len());
            r.first().map(|(_, v)| *v)
        }

        /// Polls `q` (bounded) until `ok` holds for its single value; returns the value.
        pub fn wait_for(&self, q: &str, ok: impl Fn(f64) -> bool, within: Duration) -> f64 {
            let deadline = Instant::now() + within;
            loop {
                let v = self.scalar(q);
                if let Some(v) = v
                    && ok(v)
                {
                    return v;
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus: {q} = {v:?}, never as expected within {within:?}"
                );
                thread::sleep(Duration::from_millis(250));
            }
        }
    }

    impl Drop for Prometheus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
