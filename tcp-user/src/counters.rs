//! Reading the per-CPU counters: packets per hook, and the tracker's metrics.

use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
};
use tcp_common::{
    counters::{Hook, HookCounters},
    metrics::Metrics,
};

use crate::error::Error;

pub use tcp_common::object::{COUNTERS_MAP, METRICS_MAP};

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

/// Sums the per-CPU metrics of a loaded object.
///
/// # Errors
/// When the map is missing or the kernel refuses the read.
pub fn read_metrics(ebpf: &Ebpf) -> Result<Metrics, Error> {
    let map = ebpf.map(METRICS_MAP).ok_or(Error::Missing {
        kind: "map",
        name: METRICS_MAP,
    })?;
    sum_metrics(map)
}

/// Sums every writer's copy (packet programs, reaper) over every CPU.
fn sum_metrics(map: &Map) -> Result<Metrics, Error> {
    let mut total = Metrics::default();
    for writer in 0..tcp_common::object::writer::COUNT {
        total.accumulate(&sum_per_cpu(map, METRICS_MAP, writer, Metrics::accumulate)?);
    }
    Ok(total)
}

/// Sums a per-CPU array of `V` at key `index`.
fn sum_per_cpu<V: aya::Pod + Default + Copy>(
    map: &Map,
    name: &'static str,
    index: u32,
    add: impl Fn(&mut V, &V),
) -> Result<V, Error> {
    let array =
        PerCpuArray::<&MapData, V>::try_from(map).map_err(|source| Error::Map { name, source })?;
    let per_cpu = array
        .get(&index, 0)
        .map_err(|source| Error::Map { name, source })?;
    let mut total = V::default();
    for cpu in per_cpu.iter() {
        add(&mut total, cpu);
    }
    Ok(total)
}

/// Reads the pinned packet counters and metrics of a running (or stopped) agent.
///
/// # Errors
/// When they are not pinned under `base` or cannot be read.
pub fn read_pinned(base: &std::path::Path) -> Result<(Totals, Metrics), Error> {
    let open = |name: &'static str| -> Result<Map, Error> {
        let path = crate::pins::layout_dir(base).join(name);
        if !path.exists() {
            return Err(Error::NotPinned {
                path,
                found: String::new(),
            });
        }
        let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        Ok(Map::PerCpuArray(data))
    };
    let counters = open(COUNTERS_MAP)?;
    let mut totals = Totals {
        hooks: [HookCounters::ZERO; 2],
    };
    for hook in Hook::ALL {
        totals.hooks[hook as usize] = sum_per_cpu(
            &counters,
            COUNTERS_MAP,
            hook as u32,
            HookCounters::accumulate,
        )?;
    }
    let metrics = sum_metrics(&open(METRICS_MAP)?)?;
    Ok((totals, metrics))
}
