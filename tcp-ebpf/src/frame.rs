//! Bounds-checked packet accessors: the only place that turns packet offsets into pointers.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    programs::{TcContext, XdpContext},
};
use tcp_common::parse::Frame;

/// Largest offset a header may start at. The parser's offsets are sums of bounded terms
/// (VLAN tags, IHL, IPv6 extension headers); this explicit cap keeps them provably bounded
/// for the verifier, whatever shape the compiler gives the arithmetic.
const MAX_OFFSET: usize = 0x3fff;

/// `offset & MAX_OFFSET`, as an instruction the compiler cannot drop. Called on an offset
/// already checked against `MAX_OFFSET` (so it changes nothing), it gives the verifier the
/// bound on the very register added to the packet pointer. The compiler may otherwise check
/// one copy of the offset and add another (reloaded from the stack), and older verifiers
/// (6.1) do not carry the bound from one copy to the other.
#[inline(always)]
fn bounded(offset: usize) -> usize {
    let mut v = offset;
    // SAFETY: a register-only AND; no memory, stack or flags involved.
    unsafe {
        core::arch::asm!("{0} &= 0x3fff", inout(reg) v, options(pure, nomem, nostack));
    }
    v
}

const _: () = assert!(MAX_OFFSET == 0x3fff);

/// Direct read of `T` at `start + offset` when it lies before `end`.
#[inline(always)]
fn read_direct<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    if offset > MAX_OFFSET {
        return None;
    }
    let at = start + bounded(offset);
    if at + size_of::<T>() > end {
        return None;
    }
    // SAFETY: [at, at + size_of::<T>()) lies inside the packet (checked just above, and the
    // verifier checks it again); `read_unaligned` needs no alignment and header types accept
    // any bit pattern.
    Some(unsafe { (at as *const T).read_unaligned() })
}

/// One 4-byte load at `start + offset` when it lies before `end`, as the bytes' native-order
/// `u32`. The load is written in assembly: header words sit at any offset, and a Rust read of
/// an unaligned word is compiled for BPF into four byte loads and the shifts to join them,
/// while the kernel allows the one-instruction load on packet data wherever the CPU handles
/// misaligned access (x86-64, arm64).
#[inline(always)]
fn word_direct(start: usize, end: usize, offset: usize) -> Option<u32> {
    if offset > MAX_OFFSET {
        return None;
    }
    let at = start + bounded(offset);
    if at + 4 > end {
        return None;
    }
    let v: u64;
    // SAFETY: [at, at + 4) lies inside the packet (checked just above; the verifier checks it
    // again); a register load, no other memory or stack touched.
    unsafe {
        core::arch::asm!("{0} = *(u32 *)({1} + 0)", out(reg) v, in(reg) at, options(pure, readonly, nostack));
    }
    Some(v as u32)
}

/// [`word_direct`] for 2 bytes.
#[inline(always)]
fn half_direct(start: usize, end: usize, offset: usize) -> Option<u16> {
    if offset > MAX_OFFSET {
        return None;
    }
    let at = start + bounded(offset);
    if at + 2 > end {
        return None;
    }
    let v: u64;
    // SAFETY: as in `word_direct`, for 2 bytes.
    unsafe {
        core::arch::asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) at, options(pure, readonly, nostack));
    }
    Some(v as u16)
}

/// An XDP frame: linear, read in place.
pub struct XdpFrame<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpFrame<'a> {
    #[inline(always)]
    pub const fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }
}

impl XdpFrame<'_> {
    /// `(data, data_end)`, read with volatile loads: the parser runs as a BPF-to-BPF call, and
    /// plain loads let LLVM hoist them into the caller and pass packet pointers in a form the
    /// verifier rejects ("pointer arithmetic on pkt_end prohibited").
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        let md = self.ctx.ctx;
        // SAFETY: `md` is the program's context pointer, valid for the whole run.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*md).data) as usize,
                core::ptr::read_volatile(&raw const (*md).data_end) as usize,
            )
        }
    }
}

impl Frame for XdpFrame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let (data, end) = self.bounds();
        read_direct(data, end, offset)
    }

    #[inline(always)]
    fn word_at(&self, offset: usize) -> Option<u32> {
        let (data, end) = self.bounds();
        word_direct(data, end, offset)
    }

    #[inline(always)]
    fn half_at(&self, offset: usize) -> Option<u16> {
        let (data, end) = self.bounds();
        half_direct(data, end, offset)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        let (data, end) = self.bounds();
        end - data
    }
}

/// A TC skb: read in place from its linear part; headers that lie in paged fragments are
/// copied with `bpf_skb_load_bytes`, which never modifies (or un-clones) the skb, unlike
/// `bpf_skb_pull_data`.
pub struct SkbFrame<'a> {
    ctx: &'a TcContext,
}

impl<'a> SkbFrame<'a> {
    #[inline(always)]
    pub const fn new(ctx: &'a TcContext) -> Self {
        Self { ctx }
    }
}

impl SkbFrame<'_> {
    /// `(data, data_end)` through volatile loads, for the reason given at [`XdpFrame`].
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        let skb = self.ctx.as_ptr().cast::<__sk_buff>();
        // SAFETY: `skb` is the program's context pointer, valid for the whole run.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*skb).data) as usize,
                core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
            )
        }
    }
}

impl Frame for SkbFrame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let (data, end) = self.bounds();
        if let Some(v) = read_direct(data, end, offset) {
            return Some(v);
        }
        if offset > MAX_OFFSET {
            return None;
        }
        self.ctx.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn word_at(&self, offset: usize) -> Option<u32> {
        let (data, end) = self.bounds();
        word_direct(data, end, offset)
            .or_else(|| self.load::<[u8; 4]>(offset).map(u32::from_ne_bytes))
    }

    #[inline(always)]
    fn half_at(&self, offset: usize) -> Option<u16> {
        let (data, end) = self.bounds();
        half_direct(data, end, offset)
            .or_else(|| self.load::<[u8; 2]>(offset).map(u16::from_ne_bytes))
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.len() as usize
    }
}
