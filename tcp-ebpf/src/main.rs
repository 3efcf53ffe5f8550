//! tcpscope eBPF programs: entry points only.
//!
//! Both hooks are thin wrappers that hand the packet to [`observe::hot`] (and, by tail call,
//! their slow path to [`observe::slow`]) and then pass it on unchanged: the tracker observes,
//! it never drops or modifies traffic.
#![no_std]
#![no_main]
// `asm!` on BPF: see `frame::bounded`.
#![feature(asm_experimental_arch)]

mod fast;
mod frame;
mod maps;
mod observe;
mod reaper;
mod tracker;
mod transitions;
mod view;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tcp_common::counters::Hook;

use crate::{
    frame::{SkbFrame, XdpFrame},
    maps::{SLOW_TC, SLOW_XDP},
};

/// Ingress: every frame the interface receives, before the stack allocates an skb.
#[xdp]
pub fn tcpscope_xdp(ctx: XdpContext) -> u32 {
    observe::hot(&ctx, &XdpFrame::new(&ctx), Hook::XdpIngress, &SLOW_XDP);
    xdp_action::XDP_PASS
}

/// The ingress slow path, reached by tail call from [`tcpscope_xdp`] (never attached).
#[xdp]
pub fn tcpscope_xdp_slow(ctx: XdpContext) -> u32 {
    observe::slow(&ctx, &XdpFrame::new(&ctx), Hook::XdpIngress);
    xdp_action::XDP_PASS
}

/// Egress: every packet the interface transmits (XDP has no egress hook).
#[classifier]
pub fn tcpscope_tc(ctx: TcContext) -> i32 {
    observe::hot(&ctx, &SkbFrame::new(&ctx), Hook::TcEgress, &SLOW_TC);
    TC_ACT_OK
}

/// The egress slow path, reached by tail call from [`tcpscope_tc`] (never attached).
#[classifier]
pub fn tcpscope_tc_slow(ctx: TcContext) -> i32 {
    observe::slow(&ctx, &SkbFrame::new(&ctx), Hook::TcEgress);
    TC_ACT_OK
}

/// Expiry: never attached; the agent runs it through `BPF_PROG_TEST_RUN` with the timeouts as
/// the packet (see [`reaper`]).
#[xdp]
pub fn tcpscope_reap(ctx: XdpContext) -> u32 {
    reaper::reap(&ctx)
}

/// The walk's view: never attached; the agent runs it through `BPF_PROG_TEST_RUN` after each
/// expiry walk (see [`view`]).
#[xdp]
pub fn tcpscope_view(ctx: XdpContext) -> u32 {
    view::walk(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No code path reaches a panic (no unwrap, no unchecked indexing); the verifier would
    // reject an endless loop that were reachable.
    loop {}
}
