//! Types and pure logic shared by the tcpscope eBPF programs and the agent.
//!
//! Everything here is `no_std`, allocation-free and free of BPF helpers, so the very same code
//! runs in the kernel (built for `bpfel-unknown-none`), in host unit tests and in the agent's
//! offline modes. The clock, the packet bytes and the maps all come from the caller.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod counters;
pub mod event_counters;
pub mod flow;
#[cfg(any(test, feature = "user"))]
pub mod frames;
pub mod gauges;
pub mod histogram;
pub mod metrics;
pub mod object;
pub mod parse;
pub mod reap;
pub mod state;
pub mod track;
pub mod transition;

/// Layout version of everything the agent reads from the kernel (map keys and values).
/// Bumped whenever a shared `#[repr(C)]` type changes, so that an agent never misreads
/// maps created by another build.
pub const LAYOUT_VERSION: u32 = 5;
