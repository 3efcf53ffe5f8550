//! Reliability: what the agent does with surroundings it did not choose: unsafe or shared pin
//! directories, other namespaces' agents, bad flags, another program on the interface, a
//! flood through a veth. Each test runs the real agent in namespaces.

mod common;

use std::{
    net::{TcpListener, TcpStream},
    process::Command,
};

use common::Link;
use serde_json::Value;

/// `tcpscope run ARGS` in `ns` (with the pre-exec `umask`), expected to fail: its stderr.
fn failed_start(ns: &common::NetNs, args: &[&str]) -> String {
    let out = ns
        .command(env!("CARGO_BIN_EXE_tcpscope"))
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
    common::require_root();
    let link = Link::new();
    let base = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", common::unique("tcpscope-pin-")));
    let _cleanup = common::RemoveOnDrop(base.clone());
    let pins = base.join("agent");
    // umask 000: what a careless service manager may hand over.
    let mut child = link.server.command(env!("CARGO_BIN_EXE_tcpscope"));
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
    common::require_root();
    let link = Link::new();
    let mut first = common::agent::Agent::start(
        &link.server,
        &["--iface", &link.server_if, "--listen", "off"],
    );
    first.wait_for("tracking");
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
        Command::new(env!("CARGO_BIN_EXE_tcpscope"))
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
    use common::agent::Agent;
    common::require_root();
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
    common::require_root();
    let link = Link::new();
    let pins =
        std::path::PathBuf::from(format!("/sys/fs/bpf/{}", common::unique("tcpscope-fail-")));
    let _cleanup = common::RemoveOnDrop(pins.clone());
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
    // Another program holds the interface's XDP hook (a second agent, on other pins).
    let mut other = common::agent::Agent::start(
        &link.server,
        &["--iface", &link.server_if, "--listen", "off"],
    );
    other.wait_for("tracking");
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
fn link_stats(ns: &common::NetNs, iface: &str) -> (u64, u64, u64) {
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
    common::require_root();
    let link = Link::new();
    let mut agent = common::agent::Agent::start(
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
    for mut hping in [flood("9"), flood("10")] {
        let status = hping.wait().expect("hping3");
        assert_eq!(status.code(), Some(124), "hping3 ended early: {status}");
    }
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
