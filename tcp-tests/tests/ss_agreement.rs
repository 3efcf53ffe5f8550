//! Tier 3: the in-kernel tracker agrees with the Linux TCP stack. Two namespaces joined by a
//! veth, the agent attached in host mode on the server side, real sockets driving each
//! scenario; at quiescent checkpoints every endpoint's state in the tracker equals what
//! `ss -tan` shows for that socket in its namespace (absent = CLOSED), and the TIME-WAIT
//! counts agree per namespace.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcp_testbed::{Link, NetNs, agent::Agent, set_linger_zero};

const PORT: u16 = 9100;
const CONCURRENT_PER_FAMILY: usize = 110;

/// `(local, peer)` → `ss` state name of the sockets of a namespace.
type States = BTreeMap<(String, String), String>;

/// `(local, peer)` → `ss` state name, for the TCP sockets of a namespace (listeners left out).
fn ss_states(ns: &NetNs) -> BTreeMap<(String, String), String> {
    ns.sh(&["ss", "-Htan"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (state, local, peer) = (*f.first()?, *f.get(3)?, *f.get(4)?);
            (state != "LISTEN").then(|| ((unmap(local), unmap(peer)), state.to_owned()))
        })
        .collect()
}

/// `[::ffff:10.1.2.3]:80` (an IPv4 peer of a dual-stack socket) → `10.1.2.3:80`.
fn unmap(addr: &str) -> String {
    addr.strip_prefix("[::ffff:")
        .map_or_else(|| addr.to_owned(), |rest| rest.replacen(']', "", 1))
}

/// `ss` name of a tracker state name.
fn ss_name(state: &str) -> String {
    match state {
        "established" => "ESTAB".to_owned(),
        "syn_received" => "SYN-RECV".to_owned(),
        other => other.to_uppercase().replace('_', "-"),
    }
}

/// The tracker's view: for each endpoint on `side`, `(endpoint, peer)` → `ss`-style state
/// (endpoints in CLOSED left out, as `ss` shows no socket for them).
fn tracker_states(agent: &Agent, side: &str) -> BTreeMap<(String, String), String> {
    let mut states = BTreeMap::new();
    for flow in agent.flows() {
        let ep = flow["endpoints"].as_array().expect("endpoints");
        for (me, peer) in [(&ep[0], &ep[1]), (&ep[1], &ep[0])] {
            if me["side"] == side && me["state"] != "closed" {
                let key = (
                    me["address"].as_str().expect("address").to_owned(),
                    peer["address"].as_str().expect("address").to_owned(),
                );
                states.insert(key, ss_name(me["state"].as_str().expect("state")));
            }
        }
    }
    states
}

/// Compares both sides once the stack has settled (delayed ACKs, FIN exchanges in flight):
/// polls, bounded, until the tracker and `ss` agree and `ss` has not changed for a while (two
/// sides can agree on a state the stack is about to leave), and requires that they agree by
/// then. Returns (client TIME-WAIT, server TIME-WAIT, sockets compared).
fn checkpoint(what: &str, link: &Link, agent: &Agent) -> (usize, usize, usize) {
    /// How long `ss` must stay the same (and agree) to count as settled.
    const QUIET: Duration = Duration::from_millis(300);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut since: Option<(Instant, States, States)> = None;
    let (server, client) = loop {
        let server = ss_states(&link.server);
        let client = ss_states(&link.client);
        let agree =
            tracker_states(agent, "local") == server && tracker_states(agent, "remote") == client;
        since = match since {
            Some((t, s, c)) if agree && s == server && c == client => Some((t, s, c)),
            _ if agree => Some((Instant::now(), server.clone(), client.clone())),
            _ => None,
        };
        let settled = since.as_ref().is_some_and(|(t, _, _)| t.elapsed() >= QUIET);
        if settled || Instant::now() > deadline {
            break (server, client);
        }
        thread::sleep(Duration::from_millis(50));
    };
    let tracked_server = tracker_states(agent, "local");
    let tracked_client = tracker_states(agent, "remote");
    assert_eq!(
        tracked_server, server,
        "{what}: server namespace (tracker vs ss)"
    );
    assert_eq!(
        tracked_client, client,
        "{what}: client namespace (tracker vs ss)"
    );
    let tw =
        |m: &BTreeMap<(String, String), String>| m.values().filter(|s| *s == "TIME-WAIT").count();
    (tw(&client), tw(&server), client.len() + server.len())
}

/// Opens `n` connections to each address; returns (client sockets, server sockets), paired.
fn open(
    link: &Link,
    listener: &TcpListener,
    addrs: &[SocketAddr],
    n: usize,
) -> Vec<(TcpStream, TcpStream)> {
    let addrs = addrs.to_vec();
    let total = addrs.len() * n;
    // Accept while the client connects: the listen backlog is smaller than the batch.
    let acceptor = listener.try_clone().expect("listener clone");
    let accepting = thread::spawn(move || -> Vec<TcpStream> {
        (0..total)
            .map(|_| acceptor.accept().expect("accept").0)
            .collect()
    });
    let clients = link.client.enter(move || {
        let mut v = Vec::new();
        for addr in &addrs {
            for _ in 0..n {
                v.push(TcpStream::connect_timeout(addr, Duration::from_secs(5)).expect("connect"));
            }
        }
        v
    });
    let mut servers = accepting.join().expect("acceptor");
    clients
        .into_iter()
        .map(|c| {
            let at = servers
                .iter()
                .position(|s| {
                    s.peer_addr().ok().map(|a| unmap(&a.to_string()))
                        == c.local_addr().ok().map(|a| a.to_string())
                })
                .expect("server side of a client socket");
            (c, servers.swap_remove(at))
        })
        .collect()
}

/// Reads until EOF.
fn drain(s: &mut TcpStream) {
    let mut buf = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.read_to_end(&mut buf).expect("read to EOF");
}

#[test]
fn tracker_states_equal_the_kernel_sockets() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut agent = Agent::start(
        &link.server,
        &["--iface", &link.server_if, "--time-wait-secs", "60"],
    );
    agent.wait_for("attached ");
    let listener = link
        .server
        .enter(|| TcpListener::bind(("::", PORT)).expect("dual-stack listener"));
    let (v4, v6) = link.server_addrs(PORT);

    // Many concurrent connections, both families.
    let mut conns = open(&link, &listener, &[v4, v6], CONCURRENT_PER_FAMILY);
    assert_eq!(conns.len(), 2 * CONCURRENT_PER_FAMILY);
    for (c, s) in &mut conns {
        c.write_all(b"request").expect("send");
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).expect("recv");
        s.write_all(b"response").expect("answer");
        // Read it: closing a socket with unread data sends RST instead of FIN.
        let mut buf = [0u8; 8];
        c.read_exact(&mut buf).expect("response");
    }
    let (_, _, sockets) = checkpoint("established", &link, &agent);
    assert_eq!(
        sockets,
        2 * conns.len(),
        "every connection seen from both namespaces"
    );

    // Client closes first (clients of even index), server closes first (odd).
    let (client_first, server_first): (Vec<_>, Vec<_>) =
        conns.drain(..).enumerate().partition(|(i, _)| i % 2 == 0);
    let mut half_closed = Vec::new();
    for (_, (c, mut s)) in client_first {
        drop(c);
        drain(&mut s);
        half_closed.push(s);
    }
    // Closers in FIN-WAIT-2, peers in CLOSE-WAIT (the server has not closed yet).
    checkpoint("client closed first, server still open", &link, &agent);
    drop(half_closed);
    for (_, (mut c, s)) in server_first {
        drop(s);
        drain(&mut c);
        drop(c);
    }
    let (tw_client, tw_server, _) = checkpoint("all closed", &link, &agent);
    assert_eq!(
        (tw_client, tw_server),
        (CONCURRENT_PER_FAMILY, CONCURRENT_PER_FAMILY)
    );

    // Half-close with data flowing from the CLOSE-WAIT side.
    let mut pair = open(&link, &listener, &[v4, v6], 1);
    for (c, _) in &pair {
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    checkpoint("half-closed", &link, &agent);
    for (c, s) in &mut pair {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).expect("EOF"), 0);
        s.write_all(&vec![9u8; 50_000])
            .expect("data after the peer's FIN");
        let mut got = vec![0u8; 50_000];
        c.read_exact(&mut got)
            .expect("data on the half-closed side");
    }
    checkpoint("data after half-close", &link, &agent);
    for (c, s) in pair {
        drop(s);
        let mut c = c;
        drain(&mut c);
    }
    checkpoint("half-close finished", &link, &agent);

    // RST abort (SO_LINGER 0) from either side.
    let pair = open(&link, &listener, &[v4, v6], 2);
    for (i, (c, s)) in pair.into_iter().enumerate() {
        if i % 2 == 0 {
            set_linger_zero(&c);
            drop(c);
            thread::sleep(Duration::from_millis(50));
            drop(s);
        } else {
            set_linger_zero(&s);
            drop(s);
            thread::sleep(Duration::from_millis(50));
            drop(c);
        }
    }
    checkpoint("reset", &link, &agent);

    // Refused connections.
    link.client.enter(move || {
        for mut addr in [v4, v6] {
            addr.set_port(PORT + 1);
            let err =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect_err("refused");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    });
    checkpoint("refused", &link, &agent);

    // TIME-WAIT reuse: the server closes first (server TIME-WAIT), then the client connects
    // again from the same port; Linux accepts the SYN on the TIME-WAIT 4-tuple.
    let mut pair = open(&link, &listener, &[v4], 1);
    let (c, s) = pair.remove(0);
    let client_addr = c.local_addr().expect("local");
    drop(s);
    let mut c = c;
    drain(&mut c);
    drop(c);
    checkpoint("before reuse", &link, &agent);
    let reused = link.client.enter(move || {
        let sock = socket_bound_to(client_addr);
        connect(sock, v4)
    });
    let server_side = listener.accept().expect("accept on reused tuple").0;
    checkpoint("reused", &link, &agent);
    drop((reused, server_side));
    drop(listener);
    let summary = agent.stop();
    assert_eq!(summary["xdp_ingress"]["malformed"], 0);
}

/// A TCP socket bound (with SO_REUSEADDR) to `addr`, not connected yet.
fn socket_bound_to(addr: SocketAddr) -> i32 {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket calls on a socket this function owns; pointers are to live values.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let one: i32 = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        fd
    }
}

/// Connects a bound socket; returns it as a stream.
fn connect(fd: i32, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(a) = to else {
        panic!("IPv4 only")
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `fd` is a socket this test owns; `sin` is a live sockaddr_in.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is an open, connected socket whose ownership moves to the stream.
    unsafe { TcpStream::from_raw_fd(fd) }
}

/// Sends `bytes` on `stream` while receiving as many, both on threads pinned to `cpu`;
/// returns the stream when both are done.
fn stream_both_ways(
    mut stream: TcpStream,
    cpu: usize,
    bytes: usize,
) -> thread::JoinHandle<TcpStream> {
    thread::spawn(move || {
        pin_to_cpu(cpu);
        let mut reader = stream.try_clone().expect("clone");
        let recv = thread::spawn(move || {
            pin_to_cpu(cpu);
            let mut got = vec![0u8; bytes];
            reader.read_exact(&mut got).expect("receive");
        });
        stream.write_all(&vec![7u8; bytes]).expect("send");
        recv.join().expect("receiver");
        stream
    })
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: `set` is a properly initialized cpu_set_t; 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn both_directions_on_two_cpus_at_once_lose_no_state() {
    tcp_testbed::require_root();
    if !tcp_testbed::two_cpus() {
        return;
    }
    const CONNECTIONS: usize = 64;
    const BYTES: usize = 256 * 1024;
    let link = Link::new();
    let mut agent = Agent::start(&link.server, &["--iface", &link.server_if]);
    agent.wait_for("attached ");
    let listener = link
        .server
        .enter(|| TcpListener::bind(("::", PORT)).expect("listener"));
    let (v4, v6) = link.server_addrs(PORT);
    let conns = open(&link, &listener, &[v4, v6], CONNECTIONS / 2);
    // Every connection streams both ways at once: the client's segments are handled by XDP
    // on CPU 0 (veth runs the receive path on the sender's CPU), the server's by TC on CPU 1,
    // so the two directions of each flow update its record concurrently.
    let workers: Vec<_> = conns
        .into_iter()
        .map(|(c, s)| (stream_both_ways(c, 0, BYTES), stream_both_ways(s, 1, BYTES)))
        .collect();
    let conns: Vec<(TcpStream, TcpStream)> = workers
        .into_iter()
        .map(|(c, s)| (c.join().expect("client"), s.join().expect("server")))
        .collect();
    checkpoint("after concurrent streaming", &link, &agent);
    for (c, mut s) in conns {
        drop(c);
        drain(&mut s);
    }
    let (tw_client, _, _) = checkpoint("closed after concurrent streaming", &link, &agent);
    assert_eq!(tw_client, CONNECTIONS);
    let counters = stats_counters(&agent);
    assert_eq!(counters["handshakes_completed"], CONNECTIONS as u64);
    assert_eq!(counters["closed_by_fin"], CONNECTIONS as u64);
    assert_eq!(counters["invalid_rst"], 0);
    assert_eq!(counters["invalid_fin"], 0);
    drop(listener);
}

/// The fast path (data and ACKs of ESTABLISHED connections, no lock) runs on one CPU while the
/// slow path handles FINs and RSTs of the same connections on the other: the server streams
/// to each client from CPU 1 (its data through TC egress, the clients' ACKs through XDP, both
/// on CPU 1, where veth delivers them), and each client, on CPU 0, closes in the middle of
/// the stream, half of them with a FIN (then reading on to the server's), half with a RST.
/// Nothing may be lost or mistaken: every connection ends as `ss` says, every client's FIN
/// and RST is accepted (a sequence field the fast path left stale would make one look out of
/// window), and the closes are counted by kind.
#[test]
fn fins_and_rsts_race_the_fast_path_on_the_other_cpu() {
    tcp_testbed::require_root();
    if !tcp_testbed::two_cpus() {
        return;
    }
    const CONNECTIONS: usize = 48;
    /// What the server sends at most; the clients close after `BEFORE_CLOSE`.
    const STREAM: usize = 2 << 20;
    const BEFORE_CLOSE: usize = 128 * 1024;
    let link = Link::new();
    let mut agent = Agent::start(&link.server, &["--iface", &link.server_if]);
    agent.wait_for("attached ");
    let listener = link
        .server
        .enter(|| TcpListener::bind(("::", PORT)).expect("listener"));
    let (v4, v6) = link.server_addrs(PORT);
    let before = stats_counters(&agent);
    let server_tcp_before = link.server.tcp_counters();
    let conns = open(&link, &listener, &[v4, v6], CONNECTIONS / 2);
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (mut c, mut s))| {
            let rst = i % 2 == 1;
            let server = thread::spawn(move || {
                pin_to_cpu(1);
                let chunk = vec![5u8; 16 * 1024];
                let mut sent = 0;
                // Until the client's RST cuts the connection, or all of it for a FIN.
                while sent < STREAM && s.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                }
                // Close only after the client's FIN (or RST): a FIN queued behind unsent data
                // while the client's arrives makes Linux count a simultaneous close that the
                // segments do not show (README, The state machine).
                let mut byte = [0u8; 1];
                while matches!(s.read(&mut byte), Ok(n) if n > 0) {}
            });
            let client = thread::spawn(move || {
                pin_to_cpu(0);
                let mut got = vec![0u8; BEFORE_CLOSE];
                c.read_exact(&mut got).expect("the start of the stream");
                if rst {
                    set_linger_zero(&c);
                    drop(c);
                } else {
                    c.shutdown(Shutdown::Write).expect("client FIN");
                    drain(&mut c);
                }
            });
            (server, client)
        })
        .collect();
    for (server, client) in workers {
        client.join().expect("client");
        server.join().expect("server");
    }
    // The scenario's end, as the stack has it: the servers' sockets gone, the FIN closers' in
    // TIME-WAIT. Not always all of them: a client's ACK that the two CPUs reordered may reach
    // its server after the last one, when the socket is gone, and the server's RST ends the
    // client's TIME-WAIT (RFC 1337; Linux's default). The tracker sees that RST as well.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (client, server) = (ss_states(&link.client), ss_states(&link.server));
        if server.is_empty() && client.values().all(|s| s == "TIME-WAIT") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closes never completed: client {client:?}, server {server:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (tw_client, tw_server, compared) = checkpoint(
        "FINs and RSTs during the other direction's stream",
        &link,
        &agent,
    );
    assert_eq!((tw_client, tw_server), (compared, 0));
    assert!(
        (1..=CONNECTIONS / 2).contains(&tw_client),
        "{tw_client} FIN closers in TIME-WAIT"
    );
    let after = stats_counters(&agent);
    let d = |k: &str| after[k].as_u64().expect(k) - before[k].as_u64().expect(k);
    assert_eq!(d("closed_by_fin"), (CONNECTIONS / 2) as u64);
    assert_eq!(d("closed_by_rst"), (CONNECTIONS / 2) as u64);
    // RSTs taken as out of window, or as in the window but not at the expected number, can
    // only be the server stack's answers to segments that reach it after its socket is gone
    // (a client's ACK the two CPUs reordered): such a RST carries the stale ACK's number,
    // behind the client's latest, and possibly behind its window by then (under emulation,
    // where the generic XDP path reorders more, it is). None of the clients' RSTs may be: a
    // client RST not taken would leave its connection open against `ss` (the checkpoint) and
    // missing from `closed_by_rst`.
    let server_rsts = link
        .server
        .tcp_counters()
        .delta(&server_tcp_before, "Tcp.OutRsts");
    let not_taken = d("invalid_rst") + d("invalid_rst_in_window");
    eprintln!(
        "{} RSTs out of window, {} in it but not exact; {server_rsts} sent by the server's stack",
        d("invalid_rst"),
        d("invalid_rst_in_window")
    );
    assert!(
        not_taken <= server_rsts,
        "{not_taken} RSTs not taken, the server sent only {server_rsts}"
    );
    assert_eq!(d("invalid_fin"), 0, "a FIN taken as out of window");
    assert_eq!(d("handshakes_completed"), CONNECTIONS as u64);
    drop(listener);
}

/// The tallies of `tcpscope stats --format json` on the agent's pins.
fn stats_counters(agent: &Agent) -> Value {
    agent.json(&["stats", "--format", "json"])["counters"].clone()
}
