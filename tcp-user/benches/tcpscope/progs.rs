//! The benchmark's own eBPF programs (`tcp-ebpf/src/bin/bench.rs`): the XDP_PASS and
//! TC_ACT_OK floors, the reference tracker, and the live-frames traffic generator.

use std::{ffi::CString, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader, TestRun as _,
    maps::{Array, HashMap, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use tcp_testbed::{Testbed, try_enter_netns};

/// XDP floor program.
const XDP_PASS_PROGRAM: &str = "bench_xdp_pass";
/// TC floor program.
const TC_OK_PROGRAM: &str = "bench_tc_ok";
/// Generator program.
const GENERATOR_PROGRAM: &str = "bench_gen";
/// The reference tracker on XDP.
const REF_XDP_PROGRAM: &str = "bench_ref_xdp";
/// The reference tracker on TC.
const REF_TC_PROGRAM: &str = "bench_ref_tc";
/// The reference tracker's table.
const REF_FLOWS_MAP: &str = "REF_FLOWS";

/// Frames per live-frames batch: the veth NAPI budget, so that each batch is received in
/// full when the generator re-enables bottom halves after it.
const LIVE_BATCH: u32 = 64;

/// The object's path: `TCPSCOPE_BENCH_OBJ`, else where `cargo xtask build` puts it.
fn object_path() -> PathBuf {
    std::env::var_os("TCPSCOPE_BENCH_OBJ").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/tcpscope-bench")
        },
        PathBuf::from,
    )
}

/// The loaded benchmark programs. Dropping it detaches whatever it attached.
pub struct BenchPrograms {
    ebpf: Ebpf,
}

impl BenchPrograms {
    /// Loads the object and all its programs (the reference's table at its default size).
    pub fn load() -> Result<Self> {
        Self::load_with(None)
    }

    /// Loads the object and all its programs, the reference's table sized `reference_capacity`
    /// when given (the per-packet item gives it tcpscope's capacity, so that both insert new
    /// flows into tables of the same size).
    pub fn load_with(reference_capacity: Option<u32>) -> Result<Self> {
        let path = object_path();
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading the benchmark eBPF object {} (built by `cargo xtask build`)",
                path.display()
            )
        })?;
        let mut loader = EbpfLoader::new();
        if let Some(capacity) = reference_capacity {
            loader.map_max_entries(REF_FLOWS_MAP, capacity);
        }
        let mut ebpf = loader
            .load(&bytes)
            .context("loading the benchmark object")?;
        for name in [XDP_PASS_PROGRAM, GENERATOR_PROGRAM, REF_XDP_PROGRAM] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        for name in [TC_OK_PROGRAM, REF_TC_PROGRAM] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Self { ebpf })
    }

    /// Records in the reference tracker's table.
    pub fn reference_flows(&self) -> Result<usize> {
        let map = self.ebpf.map(REF_FLOWS_MAP).context(REF_FLOWS_MAP)?;
        let table = HashMap::<_, [u8; 16], [u8; 64]>::try_from(map)?;
        Ok(table.keys().count())
    }

    /// The XDP_PASS floor.
    pub fn xdp_pass(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(XDP_PASS_PROGRAM)
            .context(XDP_PASS_PROGRAM)?
            .try_into()?)
    }

    /// The reference tracker on XDP (see `tcp-ebpf/src/bin/bench.rs`).
    pub fn ref_xdp(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(REF_XDP_PROGRAM)
            .context(REF_XDP_PROGRAM)?
            .try_into()?)
    }

    /// The reference tracker on TC.
    pub fn ref_tc(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(REF_TC_PROGRAM)
            .context(REF_TC_PROGRAM)?
            .try_into()?)
    }

    /// The TC_ACT_OK floor.
    pub fn tc_ok(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(TC_OK_PROGRAM)
            .context(TC_OK_PROGRAM)?
            .try_into()?)
    }

    /// Attaches the XDP_PASS floor to `iface` in native mode (the caller's thread must be in
    /// the interface's namespace); it stays attached until `self` is dropped.
    pub fn attach_xdp_pass(&mut self, iface: &str) -> Result<()> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PASS_PROGRAM)
            .context(XDP_PASS_PROGRAM)?
            .try_into()?;
        p.attach(CString::new(iface)?.as_c_str(), XdpMode::Driver)
            .with_context(|| format!("attaching XDP_PASS to {iface}"))?;
        Ok(())
    }

    /// Makes the generator cycle the TCP source port over `flows` values from `first_port`,
    /// starting with `first_port` on every CPU.
    pub fn configure_generator(&mut self, flows: u32, first_port: u16) -> Result<()> {
        let mut config: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("GEN_CONFIG").context("GEN_CONFIG")?)?;
        config.set(0, &flows, 0)?;
        config.set(1, &u32::from(first_port), 0)?;
        let mut next: PerCpuArray<_, u32> =
            PerCpuArray::try_from(self.ebpf.map_mut("GEN_NEXT").context("GEN_NEXT")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
        next.set(0, PerCpuValues::try_from(vec![0u32; cpus])?, 0)?;
        Ok(())
    }

    /// Runs `f` with the generator sending `template` out of the test bed's sending
    /// interface, on a thread inside the sending namespace pinned to the last CPU: the
    /// generator and the receive path it drives then share that one CPU, so a packet's cost is
    /// the time that CPU spends on it, whatever else runs on the others.
    pub fn with_generator<T: Send>(
        &self,
        bed: &Testbed,
        template: &[u8],
        f: impl FnOnce(&Generator<'_>) -> Result<T> + Send,
    ) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                try_enter_netns(&bed.tx.path())?;
                pin_to_last_cpu()?;
                f(&self.generator(&bed.tx_if, template)?)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
        })
    }

    /// The generator, ready to send from `iface` (which must exist in the calling thread's
    /// namespace, as the kernel resolves it there).
    fn generator<'a>(&'a self, iface: &str, template: &'a [u8]) -> Result<Generator<'a>> {
        let name = CString::new(iface)?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface} in this namespace");
        }
        let program: &Xdp = self
            .ebpf
            .program(GENERATOR_PROGRAM)
            .context(GENERATOR_PROGRAM)?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. In live-frames mode XDP_TX leaves through ingress_ifindex.
        let md = [0, template.len() as u32, 0, ifindex, 0, 0];
        let mut ctx = [0u8; 24];
        for (chunk, v) in ctx.as_chunks_mut::<4>().0.iter_mut().zip(md) {
            *chunk = v.to_ne_bytes();
        }
        Ok(Generator {
            program,
            template,
            ctx,
        })
    }
}

/// The generator bound to an interface and a template frame.
pub struct Generator<'a> {
    program: &'a Xdp,
    template: &'a [u8],
    ctx: [u8; 24],
}

impl Generator<'_> {
    /// Sends `frames` frames; returns the kernel-measured time of the sending loop, which
    /// includes the receiver's whole path: the receiving veth's NAPI poll runs in the
    /// softirq the generator triggers when it re-enables bottom halves after each batch,
    /// on the same CPU. The kernel's timer stops while the generator yields the CPU between
    /// batches, so other work on that CPU is not counted.
    pub fn send(&self, frames: u32) -> Result<Duration> {
        let result = self
            .program
            .test_run(TestRunOptions {
                data_in: Some(self.template),
                ctx_in: Some(&self.ctx),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(LIVE_BATCH),
                ..TestRunOptions::default()
            })
            .context("live-frames test run of the generator")?;
        // The kernel reports the mean per frame (integer ns).
        Ok(result.duration * frames)
    }
}

/// Pins the calling thread to the last CPU.
fn pin_to_last_cpu() -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let last = usize::try_from(online.max(1) - 1)?;
    // SAFETY: `set` is a plain bitmask, zeroed, then one CPU set through the libc macro;
    // sched_setaffinity(0, ...) applies to the calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(last, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc != 0 {
        bail!("pinning the generator: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
