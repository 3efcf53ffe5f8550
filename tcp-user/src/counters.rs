//! Reading the per-CPU packet counters.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use tcp_common::counters::{Hook, HookCounters};

use crate::error::Error;

/// Name of the counters map in the eBPF object.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Counters of both hooks, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    /// Indexed by `Hook as usize`.
    pub hooks: [HookCounters; 2],
}

impl Totals {
    /// Counters of one hook.
    #[must_use]
    pub const fn hook(&self, hook: Hook) -> &HookCounters {
        &self.hooks[hook as usize]
    }
}

/// Sums the per-CPU counters map of a loaded object.
///
/// # Errors
/// When the map is missing or the kernel refuses the read.
pub fn read(ebpf: &Ebpf) -> Result<Totals, Error> {
    let map = ebpf.map(COUNTERS_MAP).ok_or(Error::Missing {
        kind: "map",
        name: COUNTERS_MAP,
    })?;
    let array =
        PerCpuArray::<&MapData, HookCounters>::try_from(map).map_err(|source| Error::Map {
            name: COUNTERS_MAP,
            source,
        })?;
    let mut totals = Totals {
        hooks: [HookCounters::ZERO; 2],
    };
    for hook in Hook::ALL {
        let per_cpu = array.get(&(hook as u32), 0).map_err(|source| Error::Map {
            name: COUNTERS_MAP,
            source,
        })?;
        for cpu in per_cpu.iter() {
            totals.hooks[hook as usize].accumulate(cpu);
        }
    }
    Ok(totals)
}
