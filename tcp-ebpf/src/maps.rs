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
    maps::PerCpuArray,
};
use tcp_common::{
    counters::{EventCounters, HOOKS, HookCounters},
    flow::{FlowEntry, FlowKey},
};

/// Default capacity of the established table (the agent may change it at load time).
pub const FLOWS_CAPACITY: usize = 262_144;
/// Default capacity of the half-open table.
pub const HALF_OPEN_CAPACITY: usize = 65_536;

/// Packet counters per hook (key: `Hook` discriminant), one copy per CPU.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<HookCounters> = PerCpuArray::with_max_entries(HOOKS, 0);

/// State-machine events and table pressure (key 0), one copy per CPU.
#[map(name = "EVENTS")]
pub static EVENTS: PerCpuArray<EventCounters> = PerCpuArray::with_max_entries(1, 0);

/// Connections past their handshake (or picked up mid-stream).
#[btf_map]
pub static FLOWS: HashMap<FlowKey, FlowEntry, FLOWS_CAPACITY> = HashMap::new();

/// Connections whose handshake is in progress.
#[btf_map]
pub static HALF_OPEN: HashMap<FlowKey, FlowEntry, HALF_OPEN_CAPACITY> = HashMap::new();

/// 1 in mirror mode (both directions arrive on ingress; sides unknown), set at load time.
#[unsafe(no_mangle)]
pub static MIRROR: Global<u8> = Global::new(0);

/// Room for a flow record under construction (too large for the 512-byte BPF stack next to
/// the parser's state), one per CPU.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<FlowEntry> = PerCpuArray::with_max_entries(1, 0);

/// The parser's result for the packet being handled, one per CPU: kept off the stack, whose
/// 512 bytes the parser's and the tracker's frames already share.
#[map(name = "PARSED")]
pub static PARSED: PerCpuArray<tcp_common::parse::Parsed> = PerCpuArray::with_max_entries(1, 0);
