//! The agent's read side: what the loaded programs have recorded (packet counters, metrics,
//! tables, per-port tallies) and the runs of the never-attached programs that walk the tables
//! (expiry, the view). Loading and attaching are in `loader.rs`; this module only reads
//! the object and runs its programs through `BPF_PROG_TEST_RUN`.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf, TestRun as _,
    maps::{Array, MapData, PerCpuHashMap},
    programs::{TestRunOptions, Xdp},
};
use tcp_common::{
    event_counters::event_slots,
    flow::{EstablishedEntry, FlowKey, FlowKey4, HalfOpenEntry},
    metrics::{Metrics, PortStats, WalkView, table},
    object::{LISTED_MAP, REAP_PROGRAM, SYN_PORTS_MAP, TABLE_MAPS, VIEW_PROGRAM, WALK_VIEW_MAP},
    reap::{LISTED_SLOTS, ReapRequest},
    track::Timeouts,
};

use crate::{batch, counters, error::Error, exposition::TableStats, loader::Tracker};

/// A table is sparse, and its records visited by their listed keys rather than by a walk of
/// every bucket, when it holds at most one record per this many slots: a walk costs about
/// 16 ns a bucket (twice a second: expiry and view), a listing about 2 ns a bucket and a few
/// hundred ns a record.
pub const SPARSE_SLOTS_PER_RECORD: u64 = 16;

/// The reaper walk's view, through a descriptor of its own.
pub struct WalkViewHandle(Array<MapData, WalkView>);

impl WalkViewHandle {
    /// Zeroes it, before a walk.
    ///
    /// # Errors
    /// When the kernel refuses the write.
    pub fn clear(&mut self) -> Result<(), Error> {
        self.0
            .set(0, &WalkView::ZERO, 0)
            .map_err(|source| Error::Map {
                name: WALK_VIEW_MAP,
                source,
            })
    }

    /// What the walk found.
    ///
    /// # Errors
    /// When the kernel refuses the read.
    pub fn read(&self) -> Result<WalkView, Error> {
        self.0.get(&0, 0).map_err(|source| Error::Map {
            name: WALK_VIEW_MAP,
            source,
        })
    }
}

/// The sparse tables among `tables` (bits as in [`ReapRequest::tables`]), whose records are
/// better visited by their listed keys than by a walk: their last walk visited (`held`;
/// `u64::MAX`: unknown) at most one record per [`SPARSE_SLOTS_PER_RECORD`] of their
/// `capacities`, and at most [`LISTED_SLOTS`] records.
#[must_use]
pub fn sparse_tables(
    tables: u64,
    held: &[u64; table::COUNT],
    capacities: &[u32; table::COUNT],
) -> u64 {
    (0..table::COUNT)
        .filter(|&t| {
            tables & (1 << t) != 0
                && held[t] <= u64::from(LISTED_SLOTS)
                && held[t].saturating_mul(SPARSE_SLOTS_PER_RECORD) <= u64::from(capacities[t])
        })
        .fold(0, |mask, t| mask | 1 << t)
}

/// The data of hash map `name` of `ebpf`.
fn hash_map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData, Error> {
    match ebpf.map(name) {
        Some(aya::maps::Map::HashMap(data)) => Ok(data),
        Some(_) => Err(Error::Missing {
            kind: "hash map",
            name,
        }),
        None => Err(Error::Missing { kind: "map", name }),
    }
}

impl Tracker {
    /// Packet counters summed over CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn counters(&self) -> Result<counters::Totals, Error> {
        counters::read(&self.ebpf())
    }

    /// The tracker's metrics summed over CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn metrics(&self) -> Result<Metrics, Error> {
        counters::read_metrics(&self.ebpf())
    }

    /// Occupancy and pressure of both flow tables, from the summed metrics.
    ///
    /// # Errors
    /// When a table's description cannot be read.
    pub fn tables(&self, metrics: &Metrics) -> Result<Vec<TableStats>, Error> {
        let capacities = self.capacities()?;
        let established = |family, t: usize, ipv6| -> Result<TableStats, Error> {
            Ok(TableStats {
                name: "established",
                family,
                held: metrics.held(t),
                capacity: capacities[t],
                insert_failures: metrics.events.slots[event_slots::flows_insert_failed(ipv6)],
                evictions: metrics.evictions[t],
            })
        };
        Ok(vec![
            established("ipv4", table::ESTABLISHED_V4, false)?,
            established("ipv6", table::ESTABLISHED_V6, true)?,
            TableStats {
                name: "half_open",
                family: "all",
                held: metrics.held(table::HALF_OPEN),
                capacity: capacities[table::HALF_OPEN],
                insert_failures: metrics.events.slots[event_slots::HALF_OPEN_INSERT_FAILED],
                evictions: metrics.evictions[table::HALF_OPEN],
            },
        ])
    }

    /// SYNs and completed handshakes per listening port, summed over CPUs (cumulative).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn port_stats(&self) -> Result<Vec<(u16, PortStats)>, Error> {
        let name = SYN_PORTS_MAP;
        let ebpf = self.ebpf();
        let map = ebpf.map(name).ok_or(Error::Missing { kind: "map", name })?;
        let ports: PerCpuHashMap<&MapData, u32, PortStats> =
            PerCpuHashMap::try_from(map).map_err(|source| Error::Map { name, source })?;
        let mut out = Vec::new();
        for entry in ports.iter() {
            let (port, per_cpu) = match entry {
                Ok(e) => e,
                // Evicted between the key walk and the lookup.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => return Err(Error::Map { name, source }),
            };
            let mut total = PortStats::default();
            for cpu in per_cpu.iter() {
                total.syn = total.syn.wrapping_add(cpu.syn);
                total.completed = total.completed.wrapping_add(cpu.completed);
                total.unanswered = total.unanswered.wrapping_add(cpu.unanswered);
                total.overflows = total.overflows.wrapping_add(cpu.overflows);
            }
            out.push((port as u16, total));
        }
        Ok(out)
    }

    /// A handle of its own on the reaper walk's view (see
    /// [`WalkView`]), for the thread that runs the walks.
    ///
    /// # Errors
    /// When the map is missing or its descriptor cannot be duplicated.
    pub fn walk_view(&self) -> Result<WalkViewHandle, Error> {
        let err = |source| Error::Map {
            name: WALK_VIEW_MAP,
            source,
        };
        let ebpf = self.ebpf();
        let map = ebpf.map(WALK_VIEW_MAP).ok_or(Error::Missing {
            kind: "map",
            name: WALK_VIEW_MAP,
        })?;
        let aya::maps::Map::Array(data) = map else {
            return Err(Error::Missing {
                kind: "array map",
                name: WALK_VIEW_MAP,
            });
        };
        let fd = std::os::fd::AsFd::as_fd(data.fd())
            .try_clone_to_owned()
            .map_err(|e| err(aya::maps::MapError::IoError(e)))?;
        let data = MapData::from_fd(fd).map_err(err)?;
        let array = Array::try_from(aya::maps::Map::Array(data)).map_err(err)?;
        Ok(WalkViewHandle(array))
    }

    /// Runs the view program: walks the tables `request` walks into the (zeroed) walk view, by
    /// the keys it lists for the tables it lists (see [`ReapRequest::listed`]); its timeouts
    /// are not used.
    ///
    /// # Errors
    /// When the kernel refuses the test run.
    pub fn view_as(&self, request: &ReapRequest) -> Result<(), Error> {
        let ebpf = self.ebpf();
        let program: &Xdp = ebpf
            .program(VIEW_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(Error::Missing {
                kind: "program",
                name: VIEW_PROGRAM,
            })?;
        let packet = request.to_bytes();
        let opts = TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::default()
        };
        program.test_run(opts).map_err(|source| Error::Program {
            name: VIEW_PROGRAM,
            source,
        })?;
        Ok(())
    }

    /// Capacity of each table (index as in [`table`]).
    ///
    /// # Errors
    /// When a table's description cannot be read.
    pub fn capacities(&self) -> Result<[u32; table::COUNT], Error> {
        let ebpf = self.ebpf();
        let mut out = [0; table::COUNT];
        for (t, name) in TABLE_MAPS.iter().enumerate() {
            out[t] = hash_map(&ebpf, name)?
                .info()
                .map_err(|source| Error::Map { name, source })?
                .max_entries();
        }
        Ok(out)
    }

    /// Lists into the LISTED array the keys of the tables of `candidates` (bits as in
    /// [`ReapRequest::tables`], see [`sparse_tables`]), and marks in `request` those whose keys
    /// fit in the array as visited by key (see [`ReapRequest::listed`]); the others are walked.
    ///
    /// # Errors
    /// When the kernel refuses a read or the array's update (the request then lists nothing).
    pub fn list_keys(&self, request: &mut ReapRequest, candidates: u64) -> Result<(), Error> {
        const SLOT: usize = size_of::<FlowKey>();
        request.listed = 0;
        let ebpf = self.ebpf();
        let mut listed: Vec<u8> = Vec::new();
        let mut keys: Vec<u8> = Vec::new();
        for (t, name) in TABLE_MAPS.iter().enumerate() {
            let room = LISTED_SLOTS as usize - listed.len() / SLOT;
            if candidates & (1 << t) == 0 || room == 0 {
                continue;
            }
            let (key_size, value_size) = if t == table::ESTABLISHED_V4 {
                (size_of::<FlowKey4>(), size_of::<EstablishedEntry>())
            } else if t == table::ESTABLISHED_V6 {
                (size_of::<FlowKey>(), size_of::<EstablishedEntry>())
            } else {
                (size_of::<FlowKey>(), size_of::<HalfOpenEntry>())
            };
            let map = hash_map(&ebpf, name)?;
            keys.clear();
            // SAFETY: the sizes are this table's key and value types (the loader checked the
            // object's maps against them through BTF at load).
            let all =
                unsafe { batch::keys(map.fd().as_fd(), key_size, value_size, room, &mut keys) }
                    .map_err(|e| Error::Map {
                        name,
                        source: aya::maps::MapError::IoError(e),
                    })?;
            if !all {
                continue;
            }
            request.listed |= 1 << t;
            request.listed_from[t] = (listed.len() / SLOT) as u64;
            request.listed_len[t] = (keys.len() / key_size) as u64;
            for key in keys.chunks_exact(key_size) {
                let at = listed.len();
                listed.resize(at + SLOT, 0);
                listed[at..at + key_size].copy_from_slice(key);
            }
        }
        let n = listed.len() / SLOT;
        if n == 0 {
            return Ok(());
        }
        let name = LISTED_MAP;
        let map = ebpf.map(name).ok_or(Error::Missing { kind: "map", name })?;
        let aya::maps::Map::Array(array) = map else {
            return Err(Error::Missing {
                kind: "array map",
                name,
            });
        };
        let indices: Vec<u8> = (0..n as u32).flat_map(u32::to_ne_bytes).collect();
        // SAFETY: `indices` holds `n` u32 keys and `listed` `n` values of the array's value
        // size (a wide flow key).
        unsafe { batch::update(array.fd().as_fd(), &indices, &listed, n) }.map_err(|(_, e)| {
            request.listed = 0;
            Error::Map {
                name,
                source: aya::maps::MapError::IoError(e),
            }
        })
    }

    /// Removes every record past its timeout, in the kernel (see the reaper program); returns
    /// what it visited and removed per table.
    ///
    /// # Errors
    /// When the kernel refuses the test run.
    pub fn reap(&self, timeouts: &Timeouts) -> Result<ReapRequest, Error> {
        self.reap_with(timeouts, ReapRequest::ALL_TABLES, false)
    }

    /// [`Self::reap`] over the tables of `tables` only (bits as in [`ReapRequest::tables`];
    /// the others are answered with nothing visited), removing the records in the DOOMED maps
    /// that are unchanged since they were put there when `reconcile` (see `reconcile.rs`).
    ///
    /// # Errors
    /// When the kernel refuses the test run.
    pub fn reap_with(
        &self,
        timeouts: &Timeouts,
        tables: u64,
        reconcile: bool,
    ) -> Result<ReapRequest, Error> {
        self.reap_as(&ReapRequest {
            timeouts: timeouts.to_array(),
            tables,
            reconcile: u64::from(reconcile),
            ..ReapRequest::default()
        })
    }

    /// Runs the reaper program on `request` (see [`ReapRequest`]) and returns its answer.
    ///
    /// # Errors
    /// When the kernel refuses the test run.
    pub fn reap_as(&self, request: &ReapRequest) -> Result<ReapRequest, Error> {
        let ebpf = self.ebpf();
        let program: &Xdp = ebpf
            .program(REAP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(Error::Missing {
                kind: "program",
                name: REAP_PROGRAM,
            })?;
        let request = request.to_bytes();
        let mut answer = [0u8; size_of::<ReapRequest>()];
        let opts = TestRunOptions {
            data_in: Some(&request),
            data_out: Some(&mut answer),
            ..TestRunOptions::default()
        };
        program.test_run(opts).map_err(|source| Error::Program {
            name: REAP_PROGRAM,
            source,
        })?;
        ReapRequest::from_bytes(&answer).ok_or(Error::Missing {
            kind: "reaper answer",
            name: REAP_PROGRAM,
        })
    }
}
