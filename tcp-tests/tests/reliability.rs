//! Reliability: what the agent does with surroundings it did not choose: unsafe or shared pin
//! directories, other namespaces' agents, bad flags, another program on the interface, a
//! flood through a veth. Each test runs the real agent in namespaces.

use std::{
    net::{TcpListener, TcpStream},
    process::Command,
};

use serde_json::Value;
use tcp_testbed::Link;

/// The agent on the server's side of `link` with `--iface` and `extra`, once it tracks.
fn tracking_agent(link: &Link, extra: &[&str]) -> tcp_testbed::agent::Agent {
    let mut args = vec!["--iface", link.server_if.as_str()];
    args.extend_from_slice(extra);
    let mut agent = tcp_testbed::agent::Agent::start(&link.server, &args);
    agent.wait_for("tracking");
    agent
}

/// `tcpscope run ARGS` in `ns` (with the pre-exec `umask`), expected to fail: its stderr.
fn failed_start(ns: &tcp_testbed::NetNs, args: &[&str]) -> String {
    let out = ns
        .command(tcp_testbed::agent::agent_binary())
        .arg("run")
        .args(args)
        .output()
        .expect("run tcpscope");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tcpscope run {args:?} started: {stderr}"
    );
    stderr
}

/// The pin directories an agent creates are 0700 whatever the umask; one owned by another
/// user, or writable by others, is refused with the reason, and the agent starts nothing.
#[test]
fn pin_directories_are_private_and_unsafe_ones_refused() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    tcp_testbed::require_root();
    let link = Link::new();
    let base = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        tcp_testbed::unique("tcpscope-pin-")
    ));
    let _cleanup = tcp_testbed::RemoveOnDrop(base.clone());
    let pins = base.join("agent");
    // umask 000: what a careless service manager may hand over.
    let mut child = link.server.command(tcp_testbed::agent::agent_binary());
    child
        .args([
            "run",
            "--listen",
            "off",
            "--iface",
            &link.server_if,
            "--pin-dir",
        ])
        .arg(&pins)
        .stderr(std::process::Stdio::piped());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        child.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut agent = child.spawn().expect("start tcpscope");
    let mut log = std::io::BufReader::new(agent.stderr.take().expect("piped"));
    let mut line = String::new();
    while !line.contains("tracking") {
        line.clear();
        use std::io::BufRead as _;
        assert!(log.read_line(&mut line).expect("log") > 0, "agent exited");
    }
    for dir in [
        base.clone(),
        pins.clone(),
        pins.join(format!("v{}", tcp_common::LAYOUT_VERSION)),
    ] {
        let mode = std::fs::metadata(&dir)
            .expect("pin dir")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o700, "{}: mode {mode:o}", dir.display());
    }
    let _ = agent.kill();
    let _ = agent.wait();
    std::fs::remove_dir_all(&base).expect("remove pins");

    // Writable by others: refused, nothing created under it.
    std::fs::create_dir(&base).expect("mkdir");
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let args = [
        "--listen",
        "off",
        "--iface",
        &link.server_if,
        "--pin-dir",
        pins.to_str().expect("path"),
    ];
    let err = failed_start(&link.server, &args);
    assert!(
        err.contains("refusing the pin directory") && err.contains("writable by group or others"),
        "{err}"
    );
    assert!(!pins.exists(), "pins created under an unsafe directory");
    // Owned by another user (nobody): refused.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::chown(&base, Some(65534), Some(65534)).expect("chown");
    let err = failed_start(&link.server, &args);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert!(
        !pins.exists(),
        "pins created under another user's directory"
    );
}

/// One agent per pin directory: a second one exits with one line naming the first; `flows`
/// and `stats` say when no agent holds the directory (the first was killed).
#[test]
fn a_pin_directory_is_held_by_one_agent() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut first = tracking_agent(&link, &["--listen", "off"]);
    let pin_dir = first.pin_dir.to_str().expect("path").to_owned();
    let err = failed_start(
        &link.server,
        &[
            "--listen",
            "off",
            "--iface",
            &link.server_if,
            "--pin-dir",
            &pin_dir,
        ],
    );
    let line = err
        .lines()
        .find(|l| l.contains("held by another"))
        .unwrap_or_default();
    assert!(line.contains("tcpscope agent (pid "), "{err}");
    let stats = |dir: &str| {
        Command::new(tcp_testbed::agent::agent_binary())
            .args(["stats", "--pin-dir", dir])
            .output()
            .expect("stats")
    };
    let live = stats(&pin_dir);
    assert!(live.status.success());
    assert!(!String::from_utf8_lossy(&live.stderr).contains("no agent holds"));
    first.sigkill();
    let stale = stats(&pin_dir);
    assert!(stale.status.success(), "the pins stay readable");
    let warning = String::from_utf8_lossy(&stale.stderr);
    assert!(warning.contains("no agent holds"), "{warning}");
}

/// Without `--pin-dir`, agents in two network namespaces keep separate tables: each reports
/// its own connections only, and the same 4-tuple in both stays two records.
#[test]
fn default_pin_directories_are_per_network_namespace() {
    use tcp_testbed::agent::Agent;
    tcp_testbed::require_root();
    let (a, b) = (Link::new(), Link::new());
    let mut agents = Vec::new();
    for link in [&a, &b] {
        let mut agent = Agent::start_default_pins(
            &link.server,
            &["--iface", &link.server_if, "--listen", "off"],
        );
        agent.wait_for("tracking");
        agents.push(agent);
    }
    assert_ne!(agents[0].pin_dir, agents[1].pin_dir);
    // Five connections in A, seven in B, on the same port, between the same addresses (both
    // links use the same subnet).
    let mut held = Vec::new();
    for (link, n) in [(&a, 5), (&b, 7)] {
        let addr = format!("{}:9401", link.server_v4());
        let listener = link
            .server
            .enter(move || TcpListener::bind(addr).expect("bind"));
        let to: std::net::SocketAddr = format!("{}:9401", link.server_v4()).parse().expect("addr");
        let clients = link.client.enter(move || {
            (0..n)
                .map(|_| TcpStream::connect(to).expect("connect"))
                .collect::<Vec<_>>()
        });
        let servers: Vec<_> = (0..n)
            .map(|_| listener.accept().expect("accept").0)
            .collect();
        held.push((listener, clients, servers));
    }
    let established = |agent: &Agent| {
        agent
            .flows()
            .iter()
            .filter(|f| {
                f["endpoints"]
                    .as_array()
                    .expect("endpoints")
                    .iter()
                    .all(|e| e["state"] == "established")
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (established(&agents[0]), established(&agents[1])) != (5, 7) {
        assert!(
            std::time::Instant::now() < deadline,
            "agents report {} and {}, not 5 and 7",
            established(&agents[0]),
            established(&agents[1])
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(held);
}

/// Bad flag values name the flag and the valid range; failed starts leave no pins behind,
/// including one that fails after loading (the interface already has an XDP program).
#[test]
fn failed_starts_say_why_and_leave_no_pins() {
    tcp_testbed::require_root();
    let link = Link::new();
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        tcp_testbed::unique("tcpscope-fail-")
    ));
    let _cleanup = tcp_testbed::RemoveOnDrop(pins.clone());
    let pin_arg = pins.to_str().expect("path").to_owned();
    let base = ["--listen", "off", "--pin-dir", &pin_arg];
    for (flag, value, want) in [
        ("--flows-capacity", "0", "--flows-capacity"),
        ("--half-open-capacity", "4294967295", "--half-open-capacity"),
        ("--flows6-capacity", "-1", "--flows6-capacity"),
    ] {
        let mut args = base.to_vec();
        let flag_value = format!("{flag}={value}");
        args.extend(["--iface", &link.server_if, &flag_value]);
        let err = failed_start(&link.server, &args);
        assert!(
            err.contains(want) && err.contains("1 to 67108864"),
            "{flag} {value}: {err}"
        );
        assert!(!pins.exists(), "{flag} {value}: pins left behind");
    }
    let mut args = base.to_vec();
    args.extend(["--iface", &link.server_if, "--iface", &link.server_if]);
    let err = failed_start(&link.server, &args);
    assert!(err.contains("given twice"), "{err}");
    // The metrics port taken: the start fails after the maps are loaded and pinned.
    let taken = link
        .server
        .enter(|| TcpListener::bind("127.0.0.1:9978").expect("bind"));
    let args = [
        "--pin-dir",
        pin_arg.as_str(),
        "--listen",
        "127.0.0.1:9978",
        "--iface",
        &link.server_if,
    ];
    let err = failed_start(&link.server, &args);
    assert!(err.contains("cannot listen on 127.0.0.1:9978"), "{err}");
    assert!(
        !pins.exists(),
        "a start that failed at its listener left its pins"
    );
    drop(taken);
    // Another program holds the interface's XDP hook (a second agent, on other pins).
    let other = tracking_agent(&link, &["--listen", "off"]);
    let mut args = base.to_vec();
    args.extend(["--iface", &link.server_if]);
    let err = failed_start(&link.server, &args);
    assert!(err.contains("another XDP program"), "{err}");
    assert!(
        !pins.exists(),
        "a start that failed at attach left its pins"
    );
    // The first agent is untouched: its program still attached, its pins readable, and it
    // stops cleanly.
    let shown = link
        .server
        .sh(&["ip", "link", "show", "dev", &link.server_if]);
    assert!(shown.contains("xdp"), "{shown}");
    let _ = other.flows();
    other.stop();
}

/// `(tx_dropped, rx_dropped, rx_packets)` of `iface` in `ns`.
fn link_stats(ns: &tcp_testbed::NetNs, iface: &str) -> (u64, u64, u64) {
    let json: Value =
        serde_json::from_str(&ns.sh(&["ip", "-j", "-s", "link", "show", "dev", iface]))
            .expect("ip -j");
    let s = &json[0]["stats64"];
    let n = |v: &Value| v.as_u64().expect("counter");
    (
        n(&s["tx"]["dropped"]),
        n(&s["rx"]["dropped"]),
        n(&s["rx"]["packets"]),
    )
}

/// `--xdp-mode auto` attaches generic XDP on a veth (native XDP there moves the receive path
/// onto a 256-frame ring that drops under bursts), and a SYN flood through the veth then
/// loses no frame on either end.
#[test]
fn auto_mode_on_a_veth_adds_no_drops_under_a_flood() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut agent = tcp_testbed::agent::Agent::start(
        &link.server,
        &["--iface", &link.server_if, "--listen", "off"],
    );
    let attached = agent.wait_for("attached ");
    assert!(
        attached.contains("XDP ingress (generic (skb))"),
        "{attached}"
    );
    let (client_tx_drops, _, _) = link_stats(&link.client, &link.client_if);
    let (_, server_rx_drops, server_rx) = link_stats(&link.server, &link.server_if);
    // Bounded in time: 4 s of SYNs from two hping3 processes as fast as they send, to two
    // closed ports (each SYN a new 4-tuple: hping3 moves its source port on; the server's
    // answers are RSTs back to the client). Native XDP on the veth dropped ~0.2% of such a
    // flood on the development machine.
    let flood = |port: &'static str| {
        let mut c = link.client.command("timeout");
        c.args([
            "4",
            "hping3",
            "-q",
            "-S",
            "-p",
            port,
            "--flood",
            &link.server_v4(),
        ]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("hping3")
    };
    // (Its exit status on the timeout's signal differs between coreutils and busybox.)
    let started = std::time::Instant::now();
    for mut hping in [flood("9"), flood("10")] {
        let _ = hping.wait().expect("hping3");
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "hping3 ended early"
    );
    let (client_tx_drops_after, _, _) = link_stats(&link.client, &link.client_if);
    let (_, server_rx_drops_after, server_rx_after) = link_stats(&link.server, &link.server_if);
    let received = server_rx_after - server_rx;
    assert!(
        received > 20_000,
        "the flood was too thin to tell: {received} frames"
    );
    assert_eq!(
        client_tx_drops_after - client_tx_drops,
        0,
        "frames dropped by the client's veth ({received} received)"
    );
    assert_eq!(
        server_rx_drops_after - server_rx_drops,
        0,
        "frames dropped by the server's veth ({received} received)"
    );
    agent.stop();
}

/// `(local, peer)` addresses of the server namespace's ESTABLISHED sockets on `port`, as `ss`
/// shows them.
fn ss_established(
    ns: &tcp_testbed::NetNs,
    port: u16,
) -> std::collections::BTreeSet<(String, String)> {
    ns.sh(&[
        "ss",
        "-Htn",
        "state",
        "established",
        &format!("sport = :{port}"),
    ])
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer
        Some(((*f.get(2)?).to_owned(), (*f.get(3)?).to_owned()))
    })
    .collect()
}

/// The tracker's local ESTABLISHED endpoints on `port`, as `ss_established` has them.
fn tracked_established(
    agent: &tcp_testbed::agent::Agent,
    port: u16,
) -> std::collections::BTreeSet<(String, String)> {
    let port_arg = port.to_string();
    let flows = agent.json(&[
        "flows",
        "-o",
        "json",
        "--state",
        "established",
        "--side",
        "local",
        "--port",
        &port_arg,
    ]);
    let mut out = std::collections::BTreeSet::new();
    for flow in flows.as_array().expect("flows") {
        let ep = flow["endpoints"].as_array().expect("endpoints");
        for (me, peer) in [(&ep[0], &ep[1]), (&ep[1], &ep[0])] {
            let addr = |v: &Value| v["address"].as_str().expect("address").to_owned();
            if me["side"] == "local" && me["state"] == "established" {
                out.insert((addr(me), addr(peer)));
            }
        }
    }
    out
}

/// Polls (bounded) until at least 99% of the connections `ss` shows ESTABLISHED on the
/// server are tracked ESTABLISHED; returns (tracked, ss) at that point.
fn tracked_share(
    link: &Link,
    agent: &tcp_testbed::agent::Agent,
    port: u16,
    what: &str,
) -> (usize, usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let linux = ss_established(&link.server, port);
        let tracked = tracked_established(agent, port);
        let both = linux.intersection(&tracked).count();
        if both * 100 >= linux.len() * 99 {
            return (both, linux.len());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {both} of the {} connections ss shows ESTABLISHED are tracked",
            linux.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Child processes killed on drop.
struct KillOnDrop(Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Raises a stop flag on drop.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A spoofed-source SYN flood (sources in 198.18.0.0/15, which the test owns; the server's
/// namespace has no route back to them) fills the half-open table, while a real client opens a
/// connection every 50 ms (request and answer, then held): at least 99% of the connections
/// `ss` shows ESTABLISHED are tracked ESTABLISHED during and after the flood, with a 4096-slot
/// half-open table and with the default one; the flood is flagged; every SYN the hook saw is
/// in `syn_total`.
#[test]
fn a_syn_flood_does_not_blind_the_tracker() {
    use std::{
        io::{Read as _, Write as _},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread,
        time::Duration,
    };
    tcp_testbed::require_root();
    for capacity in ["4096", "65536"] {
        const PORT: u16 = 9402;
        let link = Link::new();
        let mut agent = tcp_testbed::agent::Agent::start(
            &link.server,
            &["--iface", &link.server_if, "--half-open-capacity", capacity],
        );
        agent.wait_for("tracking");
        let listener = link.server.enter({
            let addr = format!("{}:{PORT}", link.server_v4());
            move || TcpListener::bind(addr).expect("bind")
        });
        let stop = Arc::new(AtomicBool::new(false));
        // Stops the server and client threads (and so closes their sockets) on a failure too.
        let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
        // The server answers each request and keeps the connection.
        listener.set_nonblocking(true).expect("nonblocking");
        let server = thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    let mut buf = [0u8; 5];
                    if s.read_exact(&mut buf).is_ok() && s.write_all(b"hello").is_ok() {
                        held.push(s);
                    }
                }
                held
            }
        });
        let to: std::net::SocketAddr = format!("{}:{PORT}", link.server_v4())
            .parse()
            .expect("addr");
        let client = link.client.spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                        c.set_read_timeout(Some(Duration::from_secs(5)))
                            .expect("timeout");
                        let mut buf = [0u8; 5];
                        if c.write_all(b"hello").is_ok() && c.read_exact(&mut buf).is_ok() {
                            held.push(c);
                        }
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                held
            }
        });
        thread::sleep(Duration::from_millis(500));
        // Two flooders from two spoofed sources (hping3 moves the source port on:
        // every SYN a new 4-tuple until the ports wrap).
        // Killed (with the SIGKILL of Child::kill) once the flood's checks are done, or when
        // the test fails: bounded in time by the test itself (under a slow, emulated CPU the
        // checks take longer than a fixed flood time would allow).
        let flood = |source: &'static str| {
            let mut c = link.client.command("hping3");
            c.args([
                "-q",
                "-S",
                "-p",
                &PORT.to_string(),
                "-a",
                source,
                "--flood",
                &link.server_v4(),
            ]);
            c.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("hping3")
        };
        let flood_started = std::time::Instant::now();
        let mut floods = KillOnDrop(vec![flood("198.18.7.7"), flood("198.19.9.9")]);
        // During the flood: the flag rises, and the real connections are tracked.
        thread::sleep(Duration::from_secs(3));
        let during = tracked_share(
            &link,
            &agent,
            PORT,
            &format!("capacity {capacity}, during the flood"),
        );
        let samples = tcp_testbed::metrics::scrape(&link.server);
        let flagged = tcp_testbed::metrics::sample(
            &samples,
            &format!("tcpscope_syn_flood_active{{port=\"{PORT}\"}}"),
        );
        // The flood did fill the half-open table: real handshakes found no slot either.
        let refused = tcp_testbed::metrics::sum(
            &samples,
            "tcpscope_flow_table_insert_failures_total",
            &["table=\"half_open\""],
        );
        assert!(
            refused > 0.0,
            "capacity {capacity}: the half-open table never filled"
        );
        // Both flooders were still at it (their exit status on the timeout's signal differs
        // between coreutils and busybox, so it says nothing).
        for f in &mut floods.0 {
            assert!(
                f.try_wait().expect("hping3").is_none(),
                "hping3 ended early"
            );
        }
        // At least 6 s of flood, then it ends.
        thread::sleep(Duration::from_secs(6).saturating_sub(flood_started.elapsed()));
        drop(floods);
        thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let clients = client.join().expect("client thread");
        let after = tracked_share(
            &link,
            &agent,
            PORT,
            &format!("capacity {capacity}, after the flood"),
        );
        eprintln!(
            "capacity {capacity}: during the flood {during:?} tracked of ss, after {after:?}; \
             {} connections made",
            clients.len()
        );
        assert!(
            during.1 >= 20,
            "too few real connections during the flood: {during:?}"
        );
        assert_eq!(
            flagged, 1.0,
            "capacity {capacity}: the flood was not flagged"
        );
        // Every SYN the hook saw is counted, stored or not.
        let counted = agent.json(&["stats", "--format", "json"])["counters"]["syn"]
            .as_u64()
            .expect("syn");
        drop(clients);
        let servers = server.join().expect("server thread");
        let summary = agent.stop();
        let seen = summary["xdp_ingress"]["syn"];
        assert_eq!(
            counted, seen,
            "capacity {capacity}: syn_total against the SYNs the hook saw"
        );
        drop(servers);
    }
}

/// A `/metrics` scrape over a TCP connection from `from` (port chosen by the kernel) to
/// `to`: whether a 200 came back within `within`.
fn scrape_from(
    from: std::net::IpAddr,
    to: std::net::SocketAddr,
    within: std::time::Duration,
) -> bool {
    use std::{
        io::{Read as _, Write as _},
        os::fd::FromRawFd as _,
    };
    let (std::net::IpAddr::V4(src), std::net::SocketAddr::V4(dst)) = (from, to) else {
        panic!("IPv4 only");
    };
    let started = std::time::Instant::now();
    // SAFETY: a socket this function owns (handed to TcpStream, which closes it); the
    // addresses passed are live, correctly sized sockaddr_in values.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let sa = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sa(src, 0);
        assert_eq!(
            libc::bind(fd, (&raw const local).cast(), len),
            0,
            "bind {src}"
        );
        let remote = sa(*dst.ip(), dst.port());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return false;
        }
        stream
    };
    let mut s = stream;
    let left = within
        .saturating_sub(started.elapsed())
        .max(std::time::Duration::from_millis(1));
    s.set_read_timeout(Some(left)).expect("timeout");
    if write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    raw.starts_with(b"HTTP/1.1 200") && started.elapsed() <= within
}

/// 200 idle sockets (connects tried) and a reconnecting loop from one address hold no scrape up: scrapes from
/// another address and from loopback succeed (99% or more, each within 1 s) meanwhile.
#[test]
fn scrapes_survive_idle_and_reconnecting_clients() {
    use std::{
        io::Write as _,
        net::{IpAddr, SocketAddr},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread,
        time::Duration,
    };
    tcp_testbed::require_root();
    let link = Link::new();
    let other: IpAddr = format!("10.{}.0.3", link.net).parse().expect("addr");
    link.client.sh(&[
        "ip",
        "addr",
        "add",
        &format!("{other}/24"),
        "dev",
        &link.client_if,
    ]);
    let agent = tracking_agent(&link, &[]);
    let metrics: SocketAddr = format!("{}:9977", link.server_v4()).parse().expect("addr");
    let loopback: SocketAddr = "127.0.0.1:9977".parse().expect("addr");
    let idle: Vec<TcpStream> = link.client.enter(move || {
        (0..200)
            .filter_map(|_| TcpStream::connect_timeout(&metrics, Duration::from_secs(1)).ok())
            .collect()
    });
    assert!(
        idle.len() >= 190,
        "the abuser got only {} sockets",
        idle.len()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reconnecting = link.client.spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect_timeout(&metrics, Duration::from_secs(1)) {
                    let _ = s.write_all(b"GET /metr");
                    n += 1;
                }
                thread::sleep(Duration::from_millis(2));
            }
            n
        }
    });
    let within = Duration::from_secs(1);
    let mut ok = 0;
    let mut tries = 0;
    for _ in 0..50 {
        let from_other = link
            .client
            .enter(move || scrape_from(other, metrics, within));
        let from_loopback = link
            .server
            .enter(move || scrape_from("127.0.0.1".parse().expect("lo"), loopback, within));
        ok += usize::from(from_other) + usize::from(from_loopback);
        tries += 2;
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let reconnects = reconnecting.join().expect("reconnecting client");
    eprintln!(
        "{ok} of {tries} scrapes within 1 s beside 200 idle sockets and {reconnects} reconnects"
    );
    assert!(
        reconnects > 100,
        "the reconnecting client barely ran: {reconnects}"
    );
    assert!(
        ok * 100 >= tries * 99,
        "{ok} of {tries} scrapes succeeded within 1 s"
    );
    drop(idle);
    agent.stop();
}

/// Opens `n` IPv4 connections to `port` on the server, one after another, each with a request
/// and its answer (so that both sides have sent), and returns them held.
fn held_connections(
    link: &Link,
    port: u16,
    n: usize,
) -> (TcpListener, Vec<(TcpStream, TcpStream)>) {
    let listener = link.server.enter({
        let addr = format!("{}:{port}", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let conns = connect(link, &listener, n, true);
    (listener, conns)
}

/// Opens `n` IPv4 connections to `listener` on the server, one after another, and returns
/// them held; with `exchange`, each with a request and its answer.
fn connect(
    link: &Link,
    listener: &TcpListener,
    n: usize,
    exchange: bool,
) -> Vec<(TcpStream, TcpStream)> {
    use std::io::{Read as _, Write as _};
    let to = listener.local_addr().expect("listening address");
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut c = link
            .client
            .enter(move || TcpStream::connect(to).expect("connect"));
        let (mut s, _) = listener.accept().expect("accept");
        if exchange {
            let mut buf = [0u8; 4];
            c.write_all(b"ping").expect("request");
            s.read_exact(&mut buf).expect("request");
            s.write_all(b"pong").expect("answer");
            c.read_exact(&mut buf).expect("answer");
        }
        conns.push((c, s));
    }
    conns
}

/// The sum of the agent's `/metrics` series `name` that carry every label of `having`
/// (`label="value"`, any order).
fn metric(link: &Link, name: &str, having: &[&str]) -> f64 {
    tcp_testbed::metrics::sum(&tcp_testbed::metrics::scrape(&link.server), name, having)
}

/// A full established table refuses new records, counts them, and never evicts a live flow:
/// with room for 8, of 12 connections the first 8 stay tracked, the gauges count 8, and the
/// refusals are counted.
#[test]
fn a_full_table_refuses_counts_and_never_evicts() {
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = tracking_agent(&link, &["--flows-capacity", "8"]);
    let (_first_listener, first) = held_connections(&link, 9410, 8);
    let first_addrs: std::collections::BTreeSet<(String, String)> = first
        .iter()
        .map(|(_, s)| {
            (
                s.local_addr().expect("addr").to_string(),
                s.peer_addr().expect("addr").to_string(),
            )
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tracked_established(&agent, 9410) != first_addrs {
        assert!(
            std::time::Instant::now() < deadline,
            "the first 8 were never all tracked"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_more_listener, more) = held_connections(&link, 9411, 4);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        tracked_established(&agent, 9410),
        first_addrs,
        "a live flow was evicted"
    );
    assert!(
        tracked_established(&agent, 9411).is_empty(),
        "a full table took more"
    );
    let held = metric(
        &link,
        "tcpscope_flows",
        &[r#"family="ipv4""#, r#"table="established""#],
    );
    assert_eq!(held, 8.0);
    let refused = metric(
        &link,
        "tcpscope_flow_table_insert_failures_total",
        &[r#"family="ipv4""#, r#"table="established""#],
    );
    assert!(
        refused >= 4.0,
        "{refused} refusals counted for 4 connections"
    );
    let gauge = metric(
        &link,
        "tcpscope_endpoints",
        &[
            r#"role="server""#,
            r#"side="local""#,
            r#"state="established""#,
        ],
    );
    assert_eq!(gauge, 8.0, "the gauges count what the table holds");
    drop((first, more));
}

/// Expiry paths besides TIME-WAIT: an idle established connection given up after
/// `--established-secs` (counted as an eviction: Linux still has it), and a handshake whose
/// SYN is never answered, failed after `--half-open-secs`; the gauges go back to zero.
#[test]
fn idle_records_expire_with_their_counters_and_gauges() {
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = tracking_agent(&link, &["--established-secs", "2", "--half-open-secs", "2"]);
    let (_listener, conns) = held_connections(&link, 9412, 1);
    let established = (
        "tcpscope_endpoints",
        &[
            r#"role="server""#,
            r#"side="local""#,
            r#"state="established""#,
        ][..],
    );
    assert_eq!(metric(&link, established.0, established.1), 1.0);
    // Idle: given up within a reaper walk or two of the timeout, while ss still has it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while metric(&link, established.0, established.1) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle record never expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        ss_established(&link.server, 9412).len(),
        1,
        "Linux keeps it"
    );
    let evicted = metric(
        &link,
        "tcpscope_flow_table_evictions_total",
        &[r#"family="ipv4""#, r#"table="established""#],
    );
    assert_eq!(evicted, 1.0);
    // A SYN dropped by the server's firewall (after XDP has seen it): never answered.
    let before =
        agent.json(&["stats", "--format", "json"])["counters"]["handshakes_failed_timeout"]
            .as_u64()
            .expect("counter");
    tcp_testbed::nft(
        &link.server,
        "table inet tcpscope_rel {\n chain input {\n type filter hook input priority 0;\n \
         tcp dport 9413 drop\n }\n}\n",
    );
    let to: std::net::SocketAddr = format!("{}:9413", link.server_v4()).parse().expect("addr");
    // 1.5 s: the first SYN and one retransmission, then the record idles out.
    let refused = link
        .client
        .enter(move || TcpStream::connect_timeout(&to, std::time::Duration::from_millis(1500)));
    assert!(refused.is_err());
    let half_open = ("tcpscope_flows", &[r#"table="half_open""#][..]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    loop {
        let failed =
            agent.json(&["stats", "--format", "json"])["counters"]["handshakes_failed_timeout"]
                .as_u64()
                .expect("counter");
        if failed == before + 1 && metric(&link, half_open.0, half_open.1) == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the unanswered handshake never failed: {failed} (was {before})"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let syn_sent = metric(
        &link,
        "tcpscope_endpoints",
        &[r#"role="client""#, r#"state="syn_sent""#],
    );
    assert_eq!(syn_sent, 0.0);
    drop(conns);
}

/// Pins survive a restart: a new agent on the same pins shows the connections the first one
/// tracked at once, before they send again; a directory of another layout beside them is
/// reported and left alone.
#[test]
fn pins_survive_a_restart_and_other_layouts_are_left_alone() {
    use tcp_testbed::agent::Agent;
    tcp_testbed::require_root();
    let link = Link::new();
    let mut first = tracking_agent(&link, &["--listen", "off"]);
    let (_listener, conns) = held_connections(&link, 9414, 3);
    let tracked = tracked_established(&first, 9414);
    assert_eq!(tracked.len(), 3);
    let pins = first.pin_dir.clone();
    first.keep_pins = true;
    first.stop();
    let other = pins.join("v1");
    std::fs::create_dir(&other).expect("another layout's directory");
    let mut second = Agent::start_on_pins(
        &link.server,
        &pins,
        &["--iface", &link.server_if, "--listen", "off"],
    );
    let noted = second.wait_for("another layout");
    assert!(noted.contains("v1"), "{noted}");
    second.wait_for("tracking");
    assert_eq!(
        tracked_established(&second, 9414),
        tracked,
        "the restart lost flows"
    );
    assert!(other.is_dir(), "the other layout's directory was touched");
    drop(conns);
}

/// `/healthz` of the agent in `ns`: status and body.
fn health(ns: &tcp_testbed::NetNs) -> (u16, String) {
    ns.enter(|| tcp_testbed::metrics::http_get(tcp_testbed::metrics::AGENT, "/healthz"))
}

/// Interfaces come and go: when the tracked interface is deleted the agent says so and
/// `/healthz` answers 503 naming it; when an interface of that name comes back (another
/// index) the agent attaches to it and tracks its connections. With `--allow-missing-iface`
/// it starts before the interface exists and attaches when it appears; without, it refuses.
#[test]
fn interfaces_that_go_and_come_back_are_attached_again() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut agent = tracking_agent(&link, &[]);
    let (code, body) = health(&link.server);
    assert_eq!(code, 200, "{body}");
    let (_l1, first) = held_connections(&link, 9415, 2);
    assert_eq!(tracked_established(&agent, 9415).len(), 2);
    drop(first);
    let egress = || {
        tcp_testbed::metrics::sum(
            &tcp_testbed::metrics::scrape(&link.server),
            "tcpscope_packets_total",
            &["hook=\"tc_egress\""],
        )
    };
    let egress_before = egress();

    link.server.sh(&["ip", "link", "del", &link.server_if]);
    let gone = agent.wait_for("is gone");
    assert!(gone.contains(&link.server_if), "{gone}");
    let (code, body) = health(&link.server);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&link.server_if), "{body}");

    link.wire();
    let back = agent.wait_for("the interface is here");
    assert!(back.contains(&link.server_if), "{back}");
    let (code, body) = health(&link.server);
    assert_eq!(code, 200, "{body}");
    let (_l2, second) = held_connections(&link, 9416, 3);
    assert_eq!(
        tracked_established(&agent, 9416).len(),
        3,
        "connections over the re-created interface"
    );
    drop(second);
    // The egress hook follows too.
    assert!(
        egress() > egress_before,
        "no egress packet counted after the re-attach"
    );

    // An interface that does not exist yet.
    let ns = tcp_testbed::NetNs::new("tsw");
    let name = tcp_testbed::unique("dw");
    let err = failed_start(&ns, &["--iface", &name, "--listen", "off"]);
    assert!(err.contains("--allow-missing-iface"), "{err}");
    let mut waiting =
        tcp_testbed::agent::Agent::start(&ns, &["--iface", &name, "--allow-missing-iface"]);
    waiting.wait_for("tracking");
    let (code, body) = health(&ns);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&name), "{body}");
    let peer = format!("{name}p");
    ns.sh(&[
        "ip", "link", "add", &name, "type", "veth", "peer", "name", &peer,
    ]);
    waiting.wait_for("the interface is here");
    let (code, body) = health(&ns);
    assert_eq!(code, 200, "{body}");
}

/// A SIGKILLed agent cannot detach. Its XDP and TCX links die with it; a netlink TC filter
/// (kernels before 6.6) outlives it, and the next start removes it before attaching its own,
/// so that the egress hook never runs twice: after the restart the interface holds at most
/// one filter of ours, and each segment the server sends is counted once.
#[test]
fn a_killed_agent_leaves_no_second_egress_hook() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut first = tracking_agent(&link, &[]);
    let pins = first.pin_dir.clone();
    first.keep_pins = true;
    first.sigkill();
    let filters = || {
        link.server
            .sh(&["tc", "filter", "show", "dev", &link.server_if, "egress"])
            .lines()
            .filter(|l| l.contains("tcpscope_tc"))
            .count()
    };
    let left = filters();
    let mut second = tcp_testbed::agent::Agent::start_on_pins(
        &link.server,
        &pins,
        &["--iface", &link.server_if],
    );
    let attached = second.wait_for("attached");
    second.wait_for("tracking");
    if left > 0 {
        assert!(
            second
                .log()
                .iter()
                .any(|l| l.contains("removed the TC egress filter")),
            "{left} filter(s) left by the killed agent, and no word of removing them"
        );
    }
    assert!(
        filters() <= 1,
        "{} egress filters of ours after the restart ({attached})",
        filters()
    );
    let tx = || -> u64 {
        let path = format!("/sys/class/net/{}/statistics/tx_packets", link.server_if);
        link.server
            .sh(&["cat", &path])
            .trim()
            .parse()
            .expect("tx_packets")
    };
    let egress = || -> u64 {
        tcp_testbed::metrics::sum(
            &tcp_testbed::metrics::scrape(&link.server),
            "tcpscope_packets_total",
            &["hook=\"tc_egress\""],
        ) as u64
    };
    let (sent_before, counted_before) = (tx(), egress());
    let (_l, conns) = held_connections(&link, 9417, 2);
    drop(conns);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (sent, counted) = (tx() - sent_before, egress() - counted_before);
    assert!(sent > 0);
    assert_eq!(
        counted, sent,
        "segments the server sent vs segments the egress hook counted"
    );
}

/// A FIN whose ACK never comes: with `--closing-secs 2`, a record with an endpoint in
/// FIN-WAIT-1 that sees no segment for 2 s is removed, counted as an eviction, and leaves the
/// gauges, while Linux (retransmitting its FIN) still has it. A LAST-ACK endpoint's peer is
/// taken to TIME-WAIT when the FIN leaves (the observer cannot see it is lost): that record
/// ends when both the TIME-WAIT time (`--time-wait-secs 2` here) and the closing idle time
/// have passed. The client never receives the server's FINs, and the server's retransmissions
/// are dropped before the egress hook, so that the tracker sees each FIN once, then silence.
#[test]
fn connections_awaiting_a_fins_ack_expire_after_closing_secs() {
    use std::{
        io::Read as _,
        net::Shutdown,
        time::{Duration, Instant},
    };
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = tracking_agent(&link, &["--closing-secs", "2", "--time-wait-secs", "2"]);
    let (_listener, mut conns) = held_connections(&link, 9419, 2);
    // The second connection's client closes first: the server goes to CLOSE-WAIT.
    conns[1].0.shutdown(Shutdown::Write).expect("client FIN");
    let mut eof = [0u8; 1];
    assert_eq!(conns[1].1.read(&mut eof).expect("server reads the FIN"), 0);
    tcp_testbed::nft(
        &link.client,
        "table inet tcpscope_fin {\n chain input {\n type filter hook input priority 0;\n \
         tcp sport 9419 drop\n }\n}\n",
    );
    tcp_testbed::nft(
        &link.server,
        "table inet tcpscope_fin {\n chain output {\n type filter hook output priority 0;\n \
         tcp sport 9419 tcp flags & fin == fin limit rate over 1/hour burst 2 packets drop\n }\n}\n",
    );
    let local = |state: &str| {
        metric(
            &link,
            "tcpscope_endpoints",
            &[r#"side="local""#, &format!(r#"state="{state}""#)],
        )
    };
    let evictions = || {
        metric(
            &link,
            "tcpscope_flow_table_evictions_total",
            &[r#"family="ipv4""#, r#"table="established""#],
        )
    };
    let evicted_before = evictions();
    // Both servers close: FIN-WAIT-1 and LAST-ACK, for good.
    for (_, s) in &conns {
        s.shutdown(Shutdown::Write).expect("server FIN");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let remote_time_wait = || {
        metric(
            &link,
            "tcpscope_endpoints",
            &[r#"side="remote""#, r#"state="time_wait""#],
        )
    };
    while local("fin_wait_1") != 1.0 || local("last_ack") != 1.0 || remote_time_wait() != 1.0 {
        assert!(
            Instant::now() < deadline,
            "never tracked: fin_wait_1 {}, last_ack {}",
            local("fin_wait_1"),
            local("last_ack")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let fins = Instant::now();
    let deadline = fins + Duration::from_secs(8);
    while local("fin_wait_1") != 0.0 || local("last_ack") != 0.0 || remote_time_wait() != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the closing records never expired: {:#}\n{}",
            Value::Array(agent.flows()),
            link.server.sh(&["nft", "list", "ruleset"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fins.elapsed() >= Duration::from_millis(1500),
        "expired {:?} after the FINs, before --closing-secs",
        fins.elapsed()
    );
    assert_eq!(evictions() - evicted_before, 2.0);
    let ss = link.server.sh(&["ss", "-Htn", "sport = :9419"]);
    assert!(
        ss.contains("FIN-WAIT-1") && ss.contains("LAST-ACK"),
        "Linux still waits for the ACKs: {ss}"
    );
    drop(conns);
}

/// The tracker's local endpoints on `port` in `state` (`flows --state` spelling), counted.
fn tracked_local(agent: &tcp_testbed::agent::Agent, port: u16, state: &str) -> usize {
    let port_arg = port.to_string();
    agent
        .json(&[
            "flows", "-o", "json", "--state", state, "--side", "local", "--port", &port_arg,
        ])
        .as_array()
        .expect("flows")
        .len()
}

/// Sockets on local port `port` in the server namespace in `state` (`ss` spelling).
fn ss_count(link: &Link, port: u16, state: &str) -> usize {
    link.server
        .sh(&["ss", "-Htn", "state", state, &format!("sport = :{port}")])
        .lines()
        .count()
}

/// Restarts tell the truth (host mode): connections open before the first start are picked
/// up at once; after a restart on the same pins, the connections closed while no agent ran
/// are gone (or in TIME-WAIT, as in `ss`), and those opened meanwhile are there: the tracker
/// shows what `ss` shows within a few seconds, and says what it reconciled.
#[test]
fn a_restarted_agent_shows_what_ss_shows() {
    use std::time::{Duration, Instant};
    tcp_testbed::require_root();
    let link = Link::new();
    let port = 9420;
    let listener = link.server.enter({
        let addr = format!("{}:{port}", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let open = |n: usize| connect(&link, &listener, n, false);
    // Polls (bounded) until the tracker's local ESTABLISHED and TIME-WAIT endpoints on the
    // port equal `ss`'s.
    let agrees = |agent: &tcp_testbed::agent::Agent, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (est, ss_est) = (
                tracked_established(agent, port),
                ss_established(&link.server, port),
            );
            let (tw, ss_tw) = (
                tracked_local(agent, port, "time-wait"),
                ss_count(&link, port, "time-wait"),
            );
            if est == ss_est && tw == ss_tw {
                return ss_est.len();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: tracked {} established and {tw} TIME-WAIT, ss {} and {ss_tw}",
                est.len(),
                ss_est.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let reconciled = |action: &str| {
        metric(
            &link,
            "tcpscope_reconciled_total",
            &[&format!(r#"action="{action}""#)],
        )
    };
    let mut conns = open(5);
    let mut first = tracking_agent(&link, &[]);
    assert_eq!(agrees(&first, "connections older than the agent"), 5);
    assert_eq!(reconciled("picked_up"), 5.0);
    conns.extend(open(45));
    assert_eq!(agrees(&first, "50 connections"), 50);
    let pins = first.pin_dir.clone();
    first.keep_pins = true;
    first.stop();
    // Meanwhile: 15 closed by the client first (the server's socket ends in LAST-ACK, then
    // is gone), 10 by the server first (TIME-WAIT on the server), 10 new.
    let closed_by_client: Vec<_> = conns.drain(..15).collect();
    for (c, s) in closed_by_client {
        drop(c);
        let mut s = s;
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut s, &mut buf);
        drop(s);
    }
    let closed_by_server: Vec<_> = conns.drain(..10).collect();
    for (c, s) in closed_by_server {
        drop(s);
        let mut c = c;
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut c, &mut buf);
        drop(c);
    }
    conns.extend(open(10));
    let mut second = tcp_testbed::agent::Agent::start_on_pins(
        &link.server,
        &pins,
        &["--iface", &link.server_if],
    );
    second.wait_for("tracking");
    assert_eq!(agrees(&second, "after the restart"), 35);
    assert_eq!(ss_count(&link, port, "time-wait"), 10);
    // The gauges follow what reconciliation removed and added.
    for (state, n) in [("established", 35.0), ("time_wait", 10.0)] {
        let gauge = metric(
            &link,
            "tcpscope_endpoints",
            &[r#"side="local""#, &format!(r#"state="{state}""#)],
        );
        assert_eq!(gauge, n, "local {state} endpoints gauge");
    }
    // Removed: the 15 gone and the 10 now in TIME-WAIT; picked up: the 5 of the first start,
    // the 10 opened meanwhile and the 10 TIME-WAIT ones in their new state (the counters live
    // in the pins, across the restart).
    assert_eq!(reconciled("removed"), 25.0);
    assert_eq!(reconciled("picked_up"), 25.0);
    drop(conns);
}

/// Mirror mode has no socket table to ask: after a restart, the established records no
/// segment touched since are removed `--stale-after-restart-secs` after the start (counted);
/// a connection that sent meanwhile stays. (Half-open records end on their own timeout.)
#[test]
fn mirror_mode_ages_out_records_untouched_since_a_restart() {
    use std::{
        io::Write as _,
        time::{Duration, Instant},
    };
    tcp_testbed::require_root();
    let link = Link::new();
    let port = 9421;
    let on_port = |agent: &tcp_testbed::agent::Agent| {
        agent
            .flows()
            .iter()
            .filter(|f| tcp_testbed::agent::on_port(f, port))
            .count()
    };
    // Opened before the agent, so that it picks them up from their data (this veth brings it
    // one direction only: a handshake seen here would stay half-open).
    let (_listener, mut conns) = held_connections(&link, port, 3);
    let mut first = tracking_agent(&link, &["--mode", "mirror"]);
    for (c, _) in &mut conns {
        c.write_all(b"data").expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while on_port(&first) != 3 {
        assert!(
            Instant::now() < deadline,
            "mirror mode never tracked 3 flows"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pins = first.pin_dir.clone();
    first.keep_pins = true;
    first.stop();
    // Two connections end while no agent runs.
    conns.truncate(1);
    let mut second = tcp_testbed::agent::Agent::start_on_pins(
        &link.server,
        &pins,
        &[
            "--iface",
            &link.server_if,
            "--mode",
            "mirror",
            "--stale-after-restart-secs",
            "3",
        ],
    );
    second.wait_for("tracking");
    assert_eq!(on_port(&second), 3, "the pins kept the records");
    // The live one sends, after the agent's first walk (which dates what the first agent
    // left: a segment before it is taken for one of those).
    std::thread::sleep(Duration::from_millis(1500));
    conns[0].0.write_all(b"still here").expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_port(&second) != 1 {
        assert!(
            Instant::now() < deadline,
            "{} records on the port, 1 expected: {:#}",
            on_port(&second),
            Value::Array(second.flows())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let removed = metric(&link, "tcpscope_reconciled_total", &[r#"action="removed""#]);
    assert_eq!(removed, 2.0);
    drop(conns);
}
