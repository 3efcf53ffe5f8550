//! The maps shared with the agent. Names are at most 15 bytes (the kernel truncates).
//!
//! Table choice: plain hashes, not LRU. A record's `bpf_spin_lock` is only allowed in
//! (non-LRU) hash and array maps, and an LRU would let a flood evict live connections; here
//! a full table refuses new records (counted) and the agent's sweeper frees expired ones.
//! Half-open records have their own table, so a spoofed-SYN flood can fill only that one.

use aya_ebpf::{
    Global,
    btf_maps::HashMap,
    macros::{btf_map, map},
    maps::{LruPerCpuHashMap, PerCpuArray},
};
use tcp_common::{
    counters::{HOOKS, HookCounters},
    flow::{FlowEntry, FlowKey},
    metrics::{Metrics, PortStats},
};

/// Default capacity of the established table (the agent may change it at load time).
pub const FLOWS_CAPACITY: usize = 262_144;
/// Default capacity of the half-open table.
pub const HALF_OPEN_CAPACITY: usize = 65_536;

/// Packet counters per hook (key: `Hook` discriminant), one copy per CPU.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<HookCounters> = PerCpuArray::with_max_entries(HOOKS, 0);

/// State-machine events, endpoint gauges, table occupancy and handshake histograms, one copy
/// per CPU: one lookup per segment reaches all of it. Key 0: the packet programs; key 1: the
/// reaper (see `tracker::metrics`).
#[map(name = "METRICS")]
pub static METRICS: PerCpuArray<Metrics> = PerCpuArray::with_max_entries(2, 0);

/// Listening ports the SYN-flood rule watches.
pub const SYN_PORTS_CAPACITY: u32 = 1024;

/// SYNs and completed handshakes per listening port (key: port), one copy per CPU; the least
/// recently used port gives way when full, so a port scan cannot grow it.
#[map(name = "SYN_PORTS")]
pub static SYN_PORTS: LruPerCpuHashMap<u32, PortStats> =
    LruPerCpuHashMap::with_max_entries(SYN_PORTS_CAPACITY, 0);

/// Connections past their handshake (or picked up mid-stream).
#[btf_map]
pub static FLOWS: HashMap<FlowKey, FlowEntry, FLOWS_CAPACITY> = HashMap::new();

/// Connections whose handshake is in progress.
#[btf_map]
pub static HALF_OPEN: HashMap<FlowKey, FlowEntry, HALF_OPEN_CAPACITY> = HashMap::new();

/// 1 in mirror mode (both directions arrive on ingress; sides unknown), set at load time.
#[unsafe(no_mangle)]
pub static MIRROR: Global<u8> = Global::new(0);

/// What the tracker hands from inside a record's lock to the code after it.
#[repr(C)]
pub struct Scratch {
    /// A flow record under construction or being moved (too large for the 512-byte BPF
    /// stack next to the parser's state).
    pub entry: FlowEntry,
    /// Gauge slots of both endpoints before and after the segment.
    pub slots: [u8; 4],
    /// Event bits of the segment.
    pub events: u32,
    /// What to do with the record.
    pub action: u32,
    /// Always zero.
    pub pad: u32,
    /// SYN, SYN-ACK and completion times of the record.
    pub times: [u64; 3],
}

/// One [`Scratch`] per CPU. Results computed under the lock go through it rather than through
/// registers: read back from map memory they are plain unknown scalars to the verifier, so the
/// many paths through the state machine converge after the unlock instead of each being
/// verified again through everything that follows.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The parser's result for the packet being handled, one per CPU: kept off the stack, whose
/// 512 bytes the parser's and the tracker's frames already share.
#[map(name = "PARSED")]
pub static PARSED: PerCpuArray<tcp_common::parse::Parsed> = PerCpuArray::with_max_entries(1, 0);
