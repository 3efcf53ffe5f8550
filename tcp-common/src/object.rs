//! What the eBPF object and the agent must agree on by name: its programs and maps, and the
//! tables' default capacities (the agent may set others at load time).
//!
//! The eBPF side names a map in its `#[map(name = "...")]` attribute, which takes only a
//! literal (a `#[btf_map]` is named after its static): those literals are the only other
//! place these names are written, and the agent refuses to start when a name it looks up
//! is missing from the object.

use crate::metrics::table;

/// The XDP program (ingress).
pub const XDP_PROGRAM: &str = "tcpscope_xdp";
/// The TC classifier (egress).
pub const TC_PROGRAM: &str = "tcpscope_tc";
/// The expiry program (never attached; run through `BPF_PROG_TEST_RUN`).
pub const REAP_PROGRAM: &str = "tcpscope_reap";
/// The walk's view (never attached: run through `BPF_PROG_TEST_RUN` after each expiry walk).
pub const VIEW_PROGRAM: &str = "tcpscope_view";
/// The slow path of each hook (never attached: reached by tail call through the program
/// array named next to it).
pub const SLOW_PROGRAMS: [(&str, &str); 2] = [
    ("tcpscope_xdp_slow", "SLOW_XDP"),
    ("tcpscope_tc_slow", "SLOW_TC"),
];

/// Packet counters per hook, one copy per CPU.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Everything the tracker accounts for, one copy per CPU and writer.
pub const METRICS_MAP: &str = "METRICS";
/// Per-port SYN tallies for the SYN-flood rule.
pub const SYN_PORTS_MAP: &str = "SYN_PORTS";
/// IPv4 established-flow table.
pub const FLOWS4_MAP: &str = "FLOWS4";
/// IPv6 established-flow table.
pub const FLOWS6_MAP: &str = "FLOWS6";
/// Half-open flow table.
pub const HALF_OPEN_MAP: &str = "HALF_OPEN";
/// The flow tables, index as in [`table`].
pub const TABLE_MAPS: [&str; table::COUNT] = [FLOWS4_MAP, FLOWS6_MAP, HALF_OPEN_MAP];
/// Keys of sparse tables listed for a walk (see [`crate::reap::ReapRequest::listed`]).
pub const LISTED_MAP: &str = "LISTED";
/// Map of the per-port view's ports.
pub const PORT_INDEX_MAP: &str = "PORT_INDEX";
/// Map of the reaper walk's view.
pub const WALK_VIEW_MAP: &str = "WALK_VIEW";
/// IPv4 established records reconciliation found stale.
pub const DOOMED4_MAP: &str = "DOOMED4";
/// IPv6 established records reconciliation found stale.
pub const DOOMED6_MAP: &str = "DOOMED6";
/// The ring buffer of state changes (`tcpscope events`).
pub const EVENTS_MAP: &str = "EVENTS";
/// One `u32`: the pid of the `tcpscope events` process reading [`EVENTS_MAP`], 0 for none; the
/// programs write the ring buffer only while it is not 0.
pub const EVENTS_READER_MAP: &str = "EVENTS_READER";
/// Maps pinned so that an agent restart keeps every tracked flow and counter, and so that
/// `tcpscope events` reaches the running agent's event stream.
pub const PINNED_MAPS: [&str; 8] = [
    FLOWS4_MAP,
    FLOWS6_MAP,
    HALF_OPEN_MAP,
    COUNTERS_MAP,
    METRICS_MAP,
    SYN_PORTS_MAP,
    EVENTS_MAP,
    EVENTS_READER_MAP,
];

/// Default capacity of the IPv4 established table.
pub const DEFAULT_FLOWS_CAPACITY: u32 = 262_144;
/// Default capacity of the IPv6 established table.
pub const DEFAULT_FLOWS6_CAPACITY: u32 = 131_072;
/// Default capacity of the half-open table.
pub const DEFAULT_HALF_OPEN_CAPACITY: u32 = 65_536;
/// Capacity of each DOOMED map: the stale records one reconciliation pass may remove.
pub const DOOMED_CAPACITY: u32 = 8192;

/// Keys of the METRICS map: one copy per writer, so that no two writers ever add to the same
/// counter of a CPU (a packet program may interrupt the reaper on its CPU).
pub mod writer {
    /// The packet programs' copy.
    pub const PACKETS: u32 = 0;
    /// The reaper's copy (also written by the agent's reconciliation, on the reaper's thread).
    pub const REAPER: u32 = 1;
    /// Copies.
    pub const COUNT: u32 = 2;
}
