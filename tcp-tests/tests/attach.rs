//! Tier 3: the `tcpscope` binary attached to a veth in a test namespace, with real TCP between
//! two namespaces. What the hooks count must equal what the kernel's own TCP counters report
//! for the same traffic, per direction; on SIGTERM everything is detached.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use tcp_common::counters::{Counter, Hook};
use tcp_testbed::{Link, NetNs, agent::Agent};

const PORT: u16 = 8080;
const CLOSED_PORT: u16 = 8081;
const CONNECTIONS_PER_FAMILY: usize = 20;
const REQUEST_BYTES: usize = 20_000;

/// Serves `count` connections: reads each request to its end, answers, closes.
fn serve(listener: TcpListener, count: usize) {
    for _ in 0..count {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read request");
        assert_eq!(buf.len(), REQUEST_BYTES);
        s.write_all(b"done").expect("answer");
    }
}

/// One client connection: request, half-close, read the answer to EOF.
fn request(addr: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.write_all(&vec![7u8; REQUEST_BYTES]).expect("send");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("answer");
    assert_eq!(answer, b"done");
}

/// Waits (bounded) until something listens on `port` in `ns`.
fn wait_listening(ns: &NetNs, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns.sh(&["ss", "-Htln"]).contains(&format!(":{port}")) {
        assert!(
            Instant::now() < deadline,
            "listener on {port} never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn xdp_attached(ns: &NetNs, iface: &str) -> bool {
    ns.sh(&["ip", "link", "show", "dev", iface])
        .contains("prog/xdp")
}

#[test]
fn hooks_count_exactly_what_the_kernel_tcp_stack_counts() {
    tcp_testbed::require_root();
    let link = Link::new();
    // Native XDP asked for (auto picks generic on a veth): the driver's path.
    let mut agent = Agent::start(
        &link.server,
        &["--iface", &link.server_if, "--xdp-mode", "native"],
    );
    let attached = agent.wait_for("attached ");
    assert!(attached.contains("XDP ingress (native)"), "{attached}");
    // TCX where the kernel has it (6.6), a netlink clsact filter before.
    let tcx = aya::util::KernelVersion::current().expect("kernel version")
        >= aya::util::KernelVersion::new(6, 6, 0);
    let egress = if tcx {
        "TC egress (TCX)"
    } else {
        "TC egress (netlink (clsact))"
    };
    assert!(attached.contains(egress), "{attached}");
    assert!(
        xdp_attached(&link.server, &link.server_if),
        "ip link shows no XDP program"
    );

    let total = 2 * CONNECTIONS_PER_FAMILY;
    let server = link.server.spawn(move || {
        let listener = TcpListener::bind(("::", PORT)).expect("dual-stack listener");
        serve(listener, total);
    });
    let (v4, v6) = link.server_addrs(PORT);
    wait_listening(&link.server, PORT);
    let client_before = link.client.tcp_counters();
    let server_before = link.server.tcp_counters();
    link.client.enter(move || {
        for _ in 0..CONNECTIONS_PER_FAMILY {
            request(v4);
            request(v6);
        }
        for addr in [v4, v6] {
            let mut refused = addr;
            refused.set_port(CLOSED_PORT);
            let err = TcpStream::connect_timeout(&refused, Duration::from_secs(5))
                .expect_err("closed port");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    });
    server.join().expect("server");
    // The last FIN/ACK exchanges and delayed ACKs may still be in flight: poll (bounded) until
    // the hooks have counted as many segments as both stacks, and compare exactly below.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (client, srv) = loop {
        let client = link.client.tcp_counters();
        let srv = link.server.tcp_counters();
        let (hooks, _) = tcp_user::counters::read_pinned(&agent.pin_dir).expect("pinned counters");
        let seen = |h: Hook| hooks.hook(h).get(Counter::Tcp);
        let settled = seen(Hook::XdpIngress) == srv.delta(&server_before, "Tcp.InSegs")
            && seen(Hook::XdpIngress) == client.delta(&client_before, "Tcp.OutSegs")
            && seen(Hook::TcEgress) == srv.delta(&server_before, "Tcp.OutSegs")
            && seen(Hook::TcEgress) == client.delta(&client_before, "Tcp.InSegs");
        if settled || Instant::now() > deadline {
            break (client, srv);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let summary = agent.stop();
    assert!(
        !xdp_attached(&link.server, &link.server_if),
        "XDP still attached after SIGTERM"
    );

    let xdp = &summary["xdp_ingress"];
    let tc = &summary["tc_egress"];
    let d = |after: &tcp_testbed::TcpCounters, before: &tcp_testbed::TcpCounters, k: &str| {
        after.delta(before, k)
    };
    // Ingress of the server = what the client sent = what the server's TCP received.
    assert_eq!(
        xdp["tcp"],
        d(&srv, &server_before, "Tcp.InSegs"),
        "XDP vs server InSegs"
    );
    assert_eq!(
        xdp["tcp"],
        d(&client, &client_before, "Tcp.OutSegs"),
        "XDP vs client OutSegs"
    );
    // Egress of the server = what the server sent = what the client's TCP received.
    assert_eq!(
        tc["tcp"],
        d(&srv, &server_before, "Tcp.OutSegs"),
        "TC vs server OutSegs"
    );
    assert_eq!(
        tc["tcp"],
        d(&client, &client_before, "Tcp.InSegs"),
        "TC vs client InSegs"
    );
    // Every connect() sends one SYN, plus retransmissions.
    let syns = d(&client, &client_before, "Tcp.ActiveOpens")
        + d(&client, &client_before, "TcpExt.TCPSynRetrans");
    assert_eq!(
        xdp["syn"], syns,
        "XDP SYNs vs client ActiveOpens + SYN retransmissions"
    );
    // Every accepted connection got one SYN-ACK, plus retransmissions.
    let synacks = d(&srv, &server_before, "Tcp.PassiveOpens")
        + d(&srv, &server_before, "TcpExt.TCPSynRetrans");
    assert_eq!(
        tc["syn_ack"], synacks,
        "TC SYN-ACKs vs server PassiveOpens + retransmissions"
    );
    assert_eq!(
        tc["rst"],
        d(&srv, &server_before, "Tcp.OutRsts"),
        "TC RSTs vs server OutRsts"
    );
    // Both families crossed both hooks; every connection closed with FINs both ways.
    for (hook, c) in [("xdp", xdp), ("tc", tc)] {
        assert!(
            c["tcp_v4"] > 0 && c["tcp_v6"] > 0,
            "{hook} saw both families: {c:?}"
        );
        assert!(
            c["fin"] >= total as u64,
            "{hook} saw a FIN per connection: {c:?}"
        );
        assert_eq!(
            c["malformed"] + c["truncated"] + c["unsupported"],
            0,
            "{hook}: {c:?}"
        );
    }
    assert_eq!(
        xdp["syn"],
        total as u64 + 2,
        "one SYN per connection and per refused attempt"
    );
    assert_eq!(tc["rst"], 2, "one RST per refused attempt");

    // Traffic still flows after detach.
    let again = link.server.spawn(move || {
        let listener = TcpListener::bind(("::", PORT)).expect("listener again");
        serve(listener, 1);
    });
    wait_listening(&link.server, PORT);
    link.client.enter(move || request(v4));
    again.join().expect("server again");
}

#[test]
fn mirror_mode_attaches_xdp_only_and_skb_mode_is_generic() {
    tcp_testbed::require_root();
    let link = Link::new();
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
    let attached = agent.wait_for("attached ");
    assert!(
        attached.contains("XDP ingress (generic (skb))"),
        "{attached}"
    );
    assert!(attached.contains("no egress hook"), "{attached}");
    let summary = agent.stop();
    assert_eq!(
        summary["tc_egress"]["packets"], 0,
        "no egress hook in mirror mode"
    );
}

#[test]
fn unknown_interface_is_a_one_line_error() {
    tcp_testbed::require_root();
    let ns = NetNs::new("tsu");
    let out = ns
        .command(tcp_testbed::agent::agent_binary())
        .args([
            "run",
            "--pin-dir",
            "/sys/fs/bpf/tcpscope-test-unused",
            "--iface",
            "nosuch0",
        ])
        .output()
        .expect("run tcpscope");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("nosuch0"), "{stderr}");
}

#[test]
fn ebpf_log_lines_reach_the_agent_log_at_debug_level() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut agent = Agent::start(
        &link.server,
        &["--iface", &link.server_if, "--log-level", "debug"],
    );
    agent.wait_for("attached ");
    let mut frame =
        tcp_common::frames::FrameSpec::tcp_v4([10, 9, 9, 1], [10, 9, 9, 2], (1, 2), 0x02).build();
    frame[14] = 0x44; // IHL 4: malformed
    let iface = link.client_if.clone();
    link.client
        .enter(move || tcp_testbed::send_raw_frames(&iface, &[frame]));
    let line = agent.wait_for("malformed frame");
    assert!(line.contains("xdp_ingress"), "{line}");
    let summary = agent.stop();
    assert_eq!(summary["xdp_ingress"]["malformed"], 1);
}
