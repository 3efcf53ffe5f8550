//! Benchmark-only eBPF programs (never loaded by the agent): the floors that tcpscope's
//! per-packet cost is measured against, and the traffic generator of the veth benchmark.
//!
//! - `bench_xdp_pass` / `bench_tc_ok`: return XDP_PASS / TC_ACT_OK and touch nothing, so a
//!   test run of them costs exactly what the kernel's harness and hook cost around any program.
//! - `bench_gen`: run with `BPF_PROG_TEST_RUN` in `BPF_F_TEST_XDP_LIVE_FRAMES` mode, where
//!   XDP_TX sends each frame out of the interface named in the context. It cycles the TCP source
//!   port of the template frame over [`GEN_CONFIG`]`[FLOWS]` values starting at
//!   [`GEN_CONFIG`]`[FIRST_PORT]`, so that one test run produces traffic of many flows.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};

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
