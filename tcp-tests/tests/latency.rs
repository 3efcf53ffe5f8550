//! Handshake latency: real connections cross a relay that delays every frame by D ms each way
//! (these kernels have no netem qdisc, so a middle namespace forwards frames between two veths
//! over AF_PACKET sockets after D ms). The agent on the client's interface must put
//! SYN→SYN-ACK at ≈ 2·D, agree on average with tshark's `tcp.analysis.initial_rtt` on a
//! capture of the same interface within 100 µs, and measure from the *first* SYN when
//! the first one is lost. Then the public latency captures, replayed with their original
//! timing in mirror mode, must agree with their truth.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcp_testbed::{
    Link, NetNs,
    agent::Agent,
    metrics::{sample, scrape},
    sh, unique,
};

const DELAY: Duration = Duration::from_millis(25);
/// How far tcpscope's handshake times may be from tshark's on the same interface (4 µs
/// measured here: the hooks and the packet tap are a few function calls apart).
const TSHARK_TOLERANCE: f64 = 100e-6;
const PORT: u16 = 9300;

/// A histogram of the exposition: cumulative counts by upper bound, sum and count.
struct Hist {
    cumulative: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

fn hist(samples: &BTreeMap<String, f64>, phase: &str) -> Hist {
    let prefix = format!("tcpscope_handshake_duration_seconds_bucket{{phase=\"{phase}\",le=\"");
    let mut cumulative: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        })
        .collect();
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(cumulative.len() > 20, "buckets of {phase}");
    Hist {
        cumulative,
        sum: sample(
            samples,
            &format!("tcpscope_handshake_duration_seconds_sum{{phase=\"{phase}\"}}"),
        ),
        count: sample(
            samples,
            &format!("tcpscope_handshake_duration_seconds_count{{phase=\"{phase}\"}}"),
        ),
    }
}

impl Hist {
    /// Observations in the buckets entirely below `x`.
    fn below(&self, x: f64) -> f64 {
        self.cumulative
            .iter()
            .rev()
            .find(|(le, _)| *le < x)
            .map_or(0.0, |(_, c)| *c)
    }

    /// Observations in the bucket that contains `x`.
    fn in_bucket_of(&self, x: f64) -> f64 {
        let i = self
            .cumulative
            .iter()
            .position(|(le, _)| *le >= x)
            .expect("a bucket");
        let below = if i == 0 {
            0.0
        } else {
            self.cumulative[i - 1].1
        };
        self.cumulative[i].1 - below
    }
}

/// An AF_PACKET socket bound to `iface` (all protocols), with a short receive timeout.
fn packet_socket(iface: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface).expect("name");
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {iface}");
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind {iface}: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid option value of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    fd
}

/// Whether an Ethernet frame is an IPv4 TCP SYN without ACK.
fn is_syn(frame: &[u8]) -> bool {
    if frame.len() < 34 + 14 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return false;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame
        .get(14 + ihl + 13)
        .is_some_and(|flags| flags & 0x12 == 0x02)
}

/// Forwards frames between two interfaces of its namespace, each after `delay`.
struct Relay {
    stop: Arc<AtomicBool>,
    /// Drop the next SYN (then clear).
    drop_next_syn: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Relay {
    fn start(ns: &NetNs, a: &str, b: &str, delay: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let drop_next_syn = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(a, b), (b, a)] {
            let (from, to) = (from.to_owned(), to.to_owned());
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (stop_rx, drop_syn) = (Arc::clone(&stop), Arc::clone(&drop_next_syn));
            threads.push(ns.spawn(move || {
                let sock = packet_socket(&from);
                let mut buf = vec![0u8; 65_536];
                while !stop_rx.load(Ordering::Relaxed) {
                    // SAFETY: zeroed sockaddr_ll is valid; the kernel fills it.
                    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = size_of::<libc::sockaddr_ll>() as u32;
                    // SAFETY: valid buffer and address out-parameters.
                    let n = unsafe {
                        libc::recvfrom(
                            sock.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&raw mut addr).cast(),
                            &raw mut len,
                        )
                    };
                    if n <= 0 || addr.sll_pkttype == libc::PACKET_OUTGOING {
                        continue;
                    }
                    let frame = buf[..n as usize].to_vec();
                    if is_syn(&frame) && drop_syn.swap(false, Ordering::Relaxed) {
                        continue;
                    }
                    let _ = tx.send((Instant::now() + delay, frame));
                }
            }));
            let stop_tx = Arc::clone(&stop);
            threads.push(ns.spawn(move || {
                let sock = packet_socket(&to);
                while !stop_tx.load(Ordering::Relaxed) {
                    let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    // SAFETY: valid buffer; the socket is bound to `to`.
                    unsafe {
                        libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0);
                    }
                }
            }));
        }
        Self {
            stop,
            drop_next_syn,
            threads,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// client ns —veth— relay ns —veth— server ns, one IPv4 subnet, frames delayed in the middle.
struct Path3 {
    client: NetNs,
    relay_ns: NetNs,
    server: NetNs,
    client_if: String,
    /// The relay's two interfaces.
    relay_ifs: (String, String),
    server_addr: String,
}

impl Path3 {
    fn new() -> Self {
        let (client, relay_ns, server) = (NetNs::new("tlc"), NetNs::new("tlm"), NetNs::new("tls"));
        let (c0, m0, m1, s0) = (unique("lc"), unique("lm"), unique("ln"), unique("ls"));
        for (a, an, b, bn) in [
            (&c0, &client, &m0, &relay_ns),
            (&m1, &relay_ns, &s0, &server),
        ] {
            sh(&[
                "ip", "link", "add", a, "netns", &an.name, "type", "veth", "peer", "name", b,
                "netns", &bn.name,
            ]);
        }
        let net = (std::process::id() % 200 + 20) as u8;
        for (ns, iface, addr) in [
            (&client, &c0, Some(1)),
            (&relay_ns, &m0, None),
            (&relay_ns, &m1, None),
            (&server, &s0, Some(2)),
        ] {
            ns.sh(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            // Whole frames with computed checksums: the relay copies bytes, nothing else.
            ns.sh(&[
                "ethtool", "-K", iface, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ]);
            if let Some(host) = addr {
                ns.sh(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{net}.1.{host}/24"),
                    "dev",
                    iface,
                ]);
            }
            ns.sh(&["ip", "link", "set", iface, "up"]);
        }
        Self {
            client,
            relay_ns,
            server,
            client_if: c0,
            relay_ifs: (m0, m1),
            server_addr: format!("10.{net}.1.2:{PORT}"),
        }
    }
}

/// A tshark capture on an interface of a namespace, stopped on drop.
///
/// When is it really capturing, and when has it written every frame sent so far? Rather than
/// guess with sleeps, the test sends marker frames (ethertype 0x88b5, "local experimental",
/// from source MAC 02:00:00:00:00:NN) out of the interface and waits until tshark prints them:
/// frames leave an interface in order, so once a marker is printed, every frame sent before it
/// has been captured.
struct Capture {
    child: std::process::Child,
    file: PathBuf,
    ns: String,
    iface: String,
    lines: mpsc::Receiver<String>,
    markers: u8,
}

impl Capture {
    fn start(ns: &NetNs, iface: &str) -> Self {
        let file = std::env::temp_dir().join(format!("{}.pcapng", unique("tcpscope-lat-")));
        // -P: a summary line per packet while writing the file; -l: flushed per packet.
        let mut child = ns
            .command("tshark")
            .args(["-i", iface, "-l", "-P", "-w"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tshark (Debian package tshark)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut capture = Self {
            child,
            file,
            ns: ns.name.clone(),
            iface: iface.to_owned(),
            lines,
            markers: 0,
        };
        capture.mark();
        capture
    }

    /// Sends a marker (again every 100 ms: tshark may not read yet) until tshark prints it.
    fn mark(&mut self) {
        self.markers += 1;
        let mac = [2, 0, 0, 0, 0, self.markers];
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.resize(60, 0);
        let needle = format!("02:00:00:00:00:{:02x}", self.markers);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (path, iface, f) = (
                format!("/run/netns/{}", self.ns),
                self.iface.clone(),
                frame.clone(),
            );
            thread::spawn(move || {
                tcp_testbed::enter_netns(&path);
                tcp_testbed::send_raw_frames(&iface, &[f]);
            })
            .join()
            .expect("sending a marker");
            let until = Instant::now() + Duration::from_millis(100);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match self.lines.recv_timeout(left) {
                    Ok(line) if line.contains(&needle) => return,
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => panic!("tshark exited"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "tshark never captured marker {needle}"
            );
        }
    }

    /// Stops the capture once it holds every frame sent so far (tshark flushes the file on
    /// SIGINT) and returns the file.
    fn stop(mut self) -> PathBuf {
        self.mark();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        // The caller owns the file now.
        std::mem::take(&mut self.file)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.file.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// tshark's initial RTT of each stream of a capture, seconds.
fn tshark_initial_rtts(file: &Path) -> Vec<f64> {
    let out = sh(&[
        "tshark",
        "-r",
        file.to_str().expect("path"),
        "-Y",
        "tcp.analysis.initial_rtt",
        "-T",
        "fields",
        "-e",
        "tcp.stream",
        "-e",
        "tcp.analysis.initial_rtt",
    ]);
    let mut by_stream = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        if let (Some(s), Some(v)) = (f.next(), f.next()) {
            by_stream
                .entry(s.to_owned())
                .or_insert_with(|| v.parse::<f64>().expect("rtt"));
        }
    }
    by_stream.into_values().collect()
}

/// Per stream of a capture with a complete handshake, from tshark's frames: first SYN →
/// first SYN-ACK, that SYN-ACK → the client's first ACK after it, and first SYN → that ACK
/// (seconds).
fn tshark_phases(file: &Path) -> Vec<[f64; 3]> {
    let out = sh(&[
        "tshark",
        "-r",
        file.to_str().expect("path"),
        "-Y",
        "tcp",
        "-T",
        "fields",
        "-e",
        "tcp.stream",
        "-e",
        "frame.time_epoch",
        "-e",
        "tcp.flags.syn",
        "-e",
        "tcp.flags.ack",
    ]);
    // stream → (first SYN, first SYN-ACK, first ACK after the SYN-ACK)
    let mut by_stream: BTreeMap<String, [Option<f64>; 3]> = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [stream, t, syn, ack] = f[..] else {
            continue;
        };
        let t: f64 = t.parse().expect("frame time");
        let (syn, ack) = (syn == "1" || syn == "True", ack == "1" || ack == "True");
        let e = by_stream.entry(stream.to_owned()).or_default();
        match (syn, ack) {
            (true, false) if e[0].is_none() => e[0] = Some(t),
            (true, true) if e[1].is_none() => e[1] = Some(t),
            (false, true) if e[1].is_some() && e[2].is_none() => e[2] = Some(t),
            _ => {}
        }
    }
    by_stream
        .into_values()
        .filter_map(|[syn, synack, ack]| {
            let (syn, synack, ack) = (syn?, synack?, ack?);
            Some([synack - syn, ack - synack, ack - syn])
        })
        .collect()
}

fn connect_n(path: &Path3, n: usize) {
    let addr = path.server_addr.clone();
    path.client.enter(move || {
        for _ in 0..n {
            let mut c = TcpStream::connect(&addr).expect("connect through the relay");
            c.write_all(b"x").expect("write");
        }
    });
}

#[test]
fn handshake_latency_through_a_delaying_relay_matches_tshark() {
    tcp_testbed::require_root();
    let path = Path3::new();
    let (m0, m1) = path.relay_ifs.clone();
    let relay = Relay::start(&path.relay_ns, &m0, &m1, DELAY);
    let addr = path.server_addr.clone();
    let listener = path
        .server
        .enter(move || TcpListener::bind(&addr).expect("listener"));
    let _server = path.server.spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let mut agent = Agent::start(&path.client, &["--iface", &path.client_if]);
    agent.wait_for("tracking;");
    let capture = Capture::start(&path.client, &path.client_if);

    const N: usize = 20;
    connect_n(&path, N);
    let file = capture.stop();
    let m = scrape(&path.client);
    let two_d = 2.0 * DELAY.as_secs_f64();
    let syn_synack = hist(&m, "syn_to_synack");
    let synack_ack = hist(&m, "synack_to_ack");
    let syn_ack = hist(&m, "syn_to_ack");
    for h in [&syn_synack, &synack_ack, &syn_ack] {
        assert_eq!(h.count, N as f64, "one observation per handshake");
    }
    assert_eq!(sample(&m, "tcpscope_handshakes_completed_total"), N as f64);
    // The phase that crosses the relay twice lands in the bucket of 2·D, and no lower.
    assert_eq!(
        syn_synack.in_bucket_of(two_d),
        N as f64,
        "SYN→SYN-ACK ≈ 2·D"
    );
    assert_eq!(syn_synack.below(two_d), 0.0, "nothing faster than 2·D");
    // tshark on the same interface: same handshakes, same times. Both read the same frames at
    // two points of the same path (tshark where the packet socket taps them, tcpscope in the
    // hooks: XDP before the tap on receive, TC before it on transmit), microseconds apart.
    let rtts = tshark_initial_rtts(&file);
    let phases = tshark_phases(&file);
    let _ = std::fs::remove_file(&file);
    assert_eq!(rtts.len(), N, "tshark streams with an initial RTT");
    assert_eq!(phases.len(), N, "tshark streams with a complete handshake");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let tshark_rtt = mean(&rtts);
    let phase_means: Vec<f64> = (0..3)
        .map(|i| mean(&phases.iter().map(|p| p[i]).collect::<Vec<_>>()))
        .collect();
    for (name, h, theirs) in [
        (
            "syn_to_ack vs tcp.analysis.initial_rtt",
            &syn_ack,
            tshark_rtt,
        ),
        ("syn_to_synack", &syn_synack, phase_means[0]),
        ("synack_to_ack", &synack_ack, phase_means[1]),
        ("syn_to_ack", &syn_ack, phase_means[2]),
    ] {
        let ours = h.sum / h.count;
        eprintln!(
            "{name}: mean {ours:.6} s, tshark {theirs:.6} s, difference {:.1} us (tolerance {:.0} us)",
            (ours - theirs).abs() * 1e6,
            TSHARK_TOLERANCE * 1e6
        );
        assert!(
            (ours - theirs).abs() <= TSHARK_TOLERANCE,
            "{name}: mean {ours} s vs tshark {theirs} s"
        );
    }

    // The first SYN is lost: the handshake is timed from it, through the retransmission, and
    // the repeat is not a new handshake.
    let capture = Capture::start(&path.client, &path.client_if);
    relay.drop_next_syn.store(true, Ordering::Relaxed);
    connect_n(&path, 1);
    let file = capture.stop();
    let phases = tshark_phases(&file);
    let rtts = tshark_initial_rtts(&file);
    let _ = std::fs::remove_file(&file);
    assert_eq!((phases.len(), rtts.len()), (1, 1), "one handshake captured");
    let after = scrape(&path.client);
    let d = |k: &str| sample(&after, k) - sample(&m, k);
    assert_eq!(d("tcpscope_syn_retransmits_total"), 1.0);
    assert_eq!(d("tcpscope_syn_total"), 2.0, "SYN and its retransmission");
    assert_eq!(d("tcpscope_handshakes_completed_total"), 1.0);
    let late = hist(&after, "syn_to_ack");
    assert_eq!(late.count - syn_ack.count, 1.0);
    let took = late.sum - syn_ack.sum;
    // tshark's initial_rtt restarts at the retransmitted SYN; tcpscope's time runs from the
    // first one, as tshark's frames show it.
    eprintln!(
        "lost first SYN: {took:.6} s from the first SYN (tshark {:.6} s; from the last SYN {:.6} s)",
        phases[0][2], rtts[0]
    );
    assert!(
        (took - phases[0][2]).abs() <= TSHARK_TOLERANCE,
        "from the first SYN: {took} s, tshark {} s",
        phases[0][2]
    );
    assert!(
        took > rtts[0] + 0.5,
        "timed from the retransmission: {took} s"
    );
    drop(relay);
}

/// Replays one capture with its original timing in mirror mode; checks every phase's
/// histogram against the truth's per-connection values.
fn replay_and_compare(dir: &Path, name: &str) {
    let truth: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("truth").join(format!("{name}.json"))).expect("truth"),
    )
    .expect("JSON");
    let capture = dir
        .join("captures")
        .join(truth["file"].as_str().expect("file"));
    let link = Link::new();
    for (ns, iface) in [
        (&link.client, &link.client_if),
        (&link.server, &link.server_if),
    ] {
        ns.sh(&["ip", "link", "set", iface, "mtu", "65000"]);
    }
    let mut agent = Agent::start(
        &link.server,
        &[
            "--iface",
            &link.server_if,
            "--mode",
            "mirror",
            "--xdp-mode",
            "skb",
        ],
    );
    agent.wait_for("tracking;");
    // Original timing: no rate option.
    link.client.sh(&[
        "tcpreplay",
        "--intf1",
        &link.client_if,
        capture.to_str().expect("path"),
    ]);
    let want = truth["summary"]["handshakes_complete"]
        .as_f64()
        .expect("handshakes");
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&link.server);
        if sample(&m, "tcpscope_handshakes_completed_total") >= want || Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let conns: Vec<&Value> = truth["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| c["handshake_complete"].as_bool() == Some(true))
        .collect();
    assert_eq!(conns.len() as f64, want);
    for (phase, field) in [
        ("syn_to_synack", "syn_to_synack_s"),
        ("synack_to_ack", "synack_to_ack_s"),
        ("syn_to_ack", "irtt_s"),
    ] {
        let h = hist(&m, phase);
        let truth: Vec<f64> = conns
            .iter()
            .map(|c| c[field].as_f64().expect("truth value"))
            .collect();
        assert_eq!(h.count, truth.len() as f64, "{name} {phase}: count");
        // tcpreplay's own timing error: ~100 µs on average here, single frames later by up
        // to a millisecond on a loaded VM (nanosleep wake-ups).
        let mean = truth.iter().sum::<f64>() / truth.len() as f64;
        let ours = h.sum / h.count;
        assert!(
            (ours - mean).abs() <= (0.02 * mean).max(300e-6),
            "{name} {phase}: mean {ours} s vs truth {mean} s"
        );
        // Every bucket holds the truth's values, give or take those within one frame's
        // timing error of its bound.
        let tol = |v: f64| (0.05 * v).max(1e-3);
        for (le, cumulative) in &h.cumulative {
            let surely = truth.iter().filter(|v| **v + tol(**v) <= *le).count() as f64;
            let maybe = truth.iter().filter(|v| **v - tol(**v) <= *le).count() as f64;
            assert!(
                (surely..=maybe).contains(cumulative),
                "{name} {phase}: {cumulative} observations <= {le} s, truth says {surely}..={maybe}"
            );
        }
        eprintln!(
            "{name} {phase}: {} handshakes, mean {:.6} s (truth {:.6} s)",
            h.count, ours, mean
        );
    }
}

#[test]
fn latency_captures_replayed_with_original_timing_match_their_truth() {
    tcp_testbed::require_root();
    let Some(dir) = tcp_testbed::pcaps_dir() else {
        return;
    };
    // One at a time: concurrent replays on two cores make tcpreplay's timing worse, and
    // zeek__http-methods alone spans 63 s anyway.
    for name in ["ppa__latency1", "ppa__latency2", "zeek__http-methods"] {
        replay_and_compare(&dir, name);
    }
}
