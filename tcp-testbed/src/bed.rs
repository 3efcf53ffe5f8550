//! The benchmark's veth test bed, its agents, and the removal of what a killed benchmark left.
//!
//! Every name here starts with [`PREFIX`] and carries the process id ([`unique`]), so that a
//! second benchmark (or the test suite) on the same machine never collides, and
//! [`remove_stale`] clears what a killed run left.

use std::{fs, path::Path};

use anyhow::Result;

use crate::{
    agent::Agent,
    cmd::{try_run, try_sh, unique},
    link::{End, add_veth},
    netns::NetNs,
};

/// Prefix of every namespace, interface and pin directory the benchmark creates.
pub const PREFIX: &str = "tsb";

/// [`unique`] under [`PREFIX`]: at most 15 bytes (an interface name) for a one-letter tag.
fn bench_name(tag: &str) -> String {
    unique(&format!("{PREFIX}{tag}"))
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
            let _ = try_run(&["ip", "netns", "del", &name]);
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = fs::remove_dir_all(entry.path());
        }
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
    pub rx: NetNs,
    /// Sending side (the generator runs here).
    pub tx: NetNs,
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
            tx: NetNs::try_new(&format!("{PREFIX}t"))?,
            rx: NetNs::try_new(&format!("{PREFIX}r"))?,
            tx_if: bench_name("a"),
            rx_if: bench_name("b"),
        };
        add_veth(
            &End {
                ns: &bed.tx,
                iface: &bed.tx_if,
                mac: Some(Self::TX_MAC),
            },
            &End {
                ns: &bed.rx,
                iface: &bed.rx_if,
                mac: Some(Self::RX_MAC),
            },
        )?;
        for (ns, iface, addr) in [
            (&bed.tx, &bed.tx_if, "10.99.0.1/24"),
            (&bed.rx, &bed.rx_if, "10.99.0.2/24"),
        ] {
            try_sh(&["ip", "-n", &ns.name, "addr", "add", addr, "dev", iface])?;
            try_sh(&["ip", "-n", &ns.name, "link", "set", iface, "up"])?;
            ns.try_sh(&["ethtool", "-K", iface, "gro", "on"])?;
        }
        try_sh(&[
            "ip",
            "-n",
            &bed.rx.name,
            "route",
            "add",
            "blackhole",
            "10.99.0.1/32",
        ])?;
        Ok(bed)
    }

    /// Starts `tcpscope run --iface <rx_if> --pin-dir <fresh dir> <args>` in `rx` and waits
    /// until it tracks; the agent is killed and its pins removed on drop.
    pub fn start_agent(&self, args: &[&str]) -> Result<Agent> {
        let pin_dir = Path::new("/sys/fs/bpf").join(bench_name("p"));
        let mut all = vec!["--iface", &self.rx_if];
        all.extend_from_slice(args);
        let mut agent = Agent::try_spawn(&self.rx, Some(pin_dir), &all)?;
        agent.try_wait_for("tracking;")?;
        Ok(agent)
    }
}
