//! The tcpscope agent as a library: loading and attaching the eBPF programs and reading their
//! maps. The `tcpscope` binary (src/bin/tcpscope/) is a thin CLI over it; integration tests use it
//! directly.

#![allow(
    clippy::result_large_err,
    reason = "aya's load and attach errors are large; they occur once, on the cold path"
)]

pub mod batch;
pub mod bpffs;
pub mod capture;
pub mod collector;
pub mod counters;
pub mod error;
pub mod events;
pub mod exposition;
pub mod flood;
pub mod flows;
pub mod http;
pub mod iface;
pub mod links;
pub mod loader;
pub mod pins;
pub mod reaper;
pub mod reconcile;
pub mod replay;
pub mod report;
pub mod selfstats;
pub mod sockets;
pub mod webconfig;

/// The eBPF object built by xtask (release, with BTF), embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TCPSCOPE_EBPF_OBJ"));
