//! Benchmark-only eBPF programs (never loaded by the agent): the floors that tcpscope's
//! per-packet cost is measured against, and the traffic generator of the veth benchmark.
//!
//! - `bench_xdp_pass` / `bench_tc_ok`: return XDP_PASS / TC_ACT_OK and touch nothing, so a
//!   test run of them costs exactly what the kernel's harness and hook cost around any program.
//! - `bench_ref_xdp` / `bench_ref_tc`: the reference, a minimal flow tracker: parse
//!   Ethernet/IPv4/TCP, one hash lookup of a 16-byte key, `bpf_ktime_get_ns`, two atomic adds
//!   (packets, bytes) and the time stored, nothing else. What "as cheap as tracking can get"
//!   costs on the machine at hand, so that tcpscope's hot path is judged as a ratio to it.
//! - `bench_gen`: run with `BPF_PROG_TEST_RUN` in `BPF_F_TEST_XDP_LIVE_FRAMES` mode, where
//!   XDP_TX sends each frame out of the interface named in the context. It cycles the TCP source
//!   port of the template frame over [`GEN_CONFIG`]`[FLOWS]` values starting at
//!   [`GEN_CONFIG`]`[FIRST_PORT]`, so that one test run produces traffic of many flows.
#![no_std]
#![no_main]
// Atomic adds: `AtomicU64::fetch_add` does not exist for the BPF target.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic_xadd, see above")]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

/// Generator settings, written by the benchmark before a run: see [`FLOWS`], [`FIRST_PORT`].
#[map(name = "GEN_CONFIG")]
static GEN_CONFIG: Array<u32> = Array::with_max_entries(2, 0);

/// Index in [`GEN_CONFIG`]: number of source ports (flows) to cycle through.
const FLOWS: u32 = 0;
/// Index in [`GEN_CONFIG`]: the first source port.
const FIRST_PORT: u32 = 1;

/// The flow of the next frame, per CPU: the generator runs on one CPU, so a per-CPU counter
/// needs no atomics.
#[map(name = "GEN_NEXT")]
static GEN_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Offset of the TCP header in the template frame (untagged Ethernet, IPv4 without options).
const TCP_OFFSET: usize = 14 + 20;
/// Offset of the TCP checksum within the TCP header.
const TCP_CHECKSUM: usize = 16;

/// The XDP floor.
#[xdp]
pub fn bench_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The TC floor.
#[classifier]
pub fn bench_tc_ok(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// The reference tracker's key: a 16-byte IPv4 5-tuple, padding zeroed.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefKey {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    pad: [u8; 3],
}

/// The reference tracker's record (64 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefValue {
    packets: u64,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
    pad: [u64; 4],
}

/// The reference tracker's table.
#[map(name = "REF_FLOWS")]
static REF_FLOWS: HashMap<RefKey, RefValue> = HashMap::with_max_entries(1 << 16, 0);

/// `T` at `start + off` if it lies before `end`.
#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*const T> {
    (start + off + size_of::<T>() <= end).then_some((start + off) as *const T)
}

/// The reference's parse: Ethernet, IPv4 (any IHL), TCP ports; the key and the IP length.
#[inline(always)]
fn ref_parse(start: usize, end: usize) -> Option<(RefKey, u64)> {
    // SAFETY: every pointer comes from `ptr_at`, inside the packet; header words are read as
    // the kernel allows on packet data.
    unsafe {
        if *ptr_at::<u16>(start, end, 12)? != 0x0008 {
            return None; // 0x0800 in network order
        }
        let vihl = *ptr_at::<u8>(start, end, 14)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < 20 || *ptr_at::<u8>(start, end, 14 + 9)? != 6 {
            return None;
        }
        let len = u64::from(u16::from_be(*ptr_at::<u16>(start, end, 14 + 2)?));
        let ports = *ptr_at::<[u16; 2]>(start, end, 14 + (ihl & 0x3c))?;
        let key = RefKey {
            saddr: *ptr_at::<u32>(start, end, 14 + 12)?,
            daddr: *ptr_at::<u32>(start, end, 14 + 16)?,
            sport: ports[0],
            dport: ports[1],
            proto: 6,
            pad: [0; 3],
        };
        Some((key, len))
    }
}

/// The reference's tracking: one lookup, the clock, two atomic adds (inserts on a miss).
#[inline(always)]
fn ref_track(start: usize, end: usize) {
    let Some((key, len)) = ref_parse(start, end) else {
        return;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match REF_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a live element of the table (RCU); the adds are atomic, the time a plain store.
        Some(v) => unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).packets, 1);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).bytes, len);
            (*v).last_ns = now;
        },
        None => {
            let v = RefValue {
                packets: 1,
                bytes: len,
                first_ns: now,
                last_ns: now,
                pad: [0; 4],
            };
            let _ = REF_FLOWS.insert(&key, &v, 0);
        }
    }
}

/// The reference on XDP.
#[xdp]
pub fn bench_ref_xdp(ctx: XdpContext) -> u32 {
    ref_track(ctx.data(), ctx.data_end());
    xdp_action::XDP_PASS
}

/// The reference on TC (the skb's linear part, as the agent reads it).
#[classifier]
pub fn bench_ref_tc(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the program's context pointer.
    let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    ref_track(start, end);
    TC_ACT_OK
}

/// One's-complement sum folded to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The traffic generator: next source port, checksum patched, frame sent back out (XDP_TX).
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (Some(flows), Some(first)) = (GEN_CONFIG.get(FLOWS), GEN_CONFIG.get(FIRST_PORT)) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(next) = GEN_NEXT.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP_OFFSET + TCP_CHECKSUM + 2 > end {
        return xdp_action::XDP_ABORTED;
    }
    let port_at = (start + TCP_OFFSET) as *mut u16;
    let checksum_at = (start + TCP_OFFSET + TCP_CHECKSUM) as *mut u16;
    // SAFETY: `next` is this CPU's slot of a per-CPU array, written by nothing else while the
    // program runs; both packet pointers lie inside the frame (checked above) and are accessed
    // unaligned.
    unsafe {
        let index = *next;
        *next = if index + 1 >= *flows { 0 } else { index + 1 };
        let port = (*first as u16).wrapping_add(index as u16).to_be();
        let old = port_at.read_unaligned();
        // RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'). One's-complement sums do not depend on
        // byte order, so the network-order words are used as they are.
        let sum = u32::from(!checksum_at.read_unaligned()) + u32::from(!old) + u32::from(port);
        checksum_at.write_unaligned(!fold(sum));
        port_at.write_unaligned(port);
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Nothing here can panic (no unwrap, no indexing); the verifier would reject a reachable
    // endless loop.
    loop {}
}
