//! The maps shared with the agent. Names are at most 15 bytes (the kernel truncates).

use aya_ebpf::{macros::map, maps::PerCpuArray};
use tcp_common::counters::{HOOKS, HookCounters};

/// Packet counters per hook (key: `Hook` discriminant), one copy per CPU.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<HookCounters> = PerCpuArray::with_max_entries(HOOKS, 0);
