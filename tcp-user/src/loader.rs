//! Loading the eBPF object and attaching its programs to interfaces.
//!
//! Attach policy:
//! - XDP (ingress): `auto` tries native (driver) mode and falls back to generic (skb) mode,
//!   saying why; `native` and `skb` insist on one mode.
//! - TC (egress, host mode only): TCX where the kernel has it (6.6+), else a netlink `clsact`
//!   filter; the fallback is logged.
//! - Everything attached belongs to the [`Tracker`]: dropping it detaches every program.

use std::{
    ffi::CString,
    fmt,
    path::PathBuf,
    sync::{Mutex, PoisonError, RwLock, RwLockReadGuard},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttach},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use log::{debug, info, warn};
use tcp_common::object::{
    DEFAULT_FLOWS_CAPACITY, DEFAULT_FLOWS6_CAPACITY, DEFAULT_HALF_OPEN_CAPACITY, FLOWS4_MAP,
    FLOWS6_MAP, HALF_OPEN_MAP, PINNED_MAPS, PORT_INDEX_MAP, REAP_PROGRAM, SLOW_PROGRAMS,
    TC_PROGRAM, VIEW_PROGRAM, XDP_PROGRAM,
};

use crate::{
    EBPF_OBJECT,
    error::{Error, error_chain},
    pins::{layout_dir, other_layouts},
};

/// How to load the programs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Host or mirror mode (decides the endpoints' sides).
    pub mode: Mode,
    /// Pin (and reuse) the maps under this bpffs directory; `None`: no pinning.
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the IPv4 established-flow table.
    pub flows_capacity: u32,
    /// Capacity of the IPv6 established-flow table.
    pub flows6_capacity: u32,
    /// Capacity of the half-open table.
    pub half_open_capacity: u32,
    /// Ports of the per-port view (at most [`MAX_WATCHED_PORTS`]).
    pub ports: Vec<u16>,
}

pub use tcp_common::metrics::MAX_WATCHED_PORTS;

/// The largest capacity a table may be given: 2^26 slots (8 GiB of IPv4 table, 12 GiB of
/// half-open table). The kernel allocates a table in full at start.
pub const MAX_CAPACITY: u32 = 1 << 26;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Host,
            pin_dir: None,
            flows_capacity: DEFAULT_FLOWS_CAPACITY,
            flows6_capacity: DEFAULT_FLOWS6_CAPACITY,
            half_open_capacity: DEFAULT_HALF_OPEN_CAPACITY,
            ports: Vec::new(),
        }
    }
}

/// Where the tracker sees traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// XDP on ingress and TC on egress of each interface: the host's own connections.
    #[default]
    Host,
    /// XDP only: both directions arrive on ingress (SPAN port, tap, replayed capture).
    Mirror,
}

/// Requested XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Generic (skb) on software devices (veth, tun/tap, bonds: no bus address; native XDP
    /// adds drops on a veth); elsewhere native if the driver supports it, else generic, logged.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Skb,
}

/// How the XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// In the driver.
    Native,
    /// In the generic (skb) path.
    Generic,
}

impl fmt::Display for XdpAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic (skb)",
        })
    }
}

/// How the TC classifier ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttachMode {
    /// A TCX link (kernel 6.6+).
    Tcx,
    /// A netlink filter on the `clsact` qdisc.
    Netlink,
}

impl fmt::Display for TcAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "TCX",
            Self::Netlink => "netlink (clsact)",
        })
    }
}

/// What is attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Interface name.
    pub iface: String,
    /// Interface index at attach time (a re-created interface of the same name has another).
    pub ifindex: u32,
    /// XDP mode in effect.
    pub xdp: XdpAttachMode,
    /// TC egress attach mode, `None` in mirror mode.
    pub tc: Option<TcAttachMode>,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: XDP ingress ({})", self.iface, self.xdp)?;
        match self.tc {
            Some(tc) => write!(f, ", TC egress ({tc})"),
            None => f.write_str(", no egress hook (mirror mode)"),
        }
    }
}

/// The loaded programs and everything attached. Dropping it detaches all. `Sync`: the
/// reaper thread runs the expiry program while the main loop reads the maps and attaches to
/// interfaces that come (back); an attach holds the object exclusively for its few syscalls.
pub struct Tracker {
    ebpf: RwLock<Ebpf>,
    attached: Mutex<Vec<Attached>>,
}

/// One interface's attachment and the links that make it.
struct Attached {
    info: Attachment,
    xdp: XdpLinkId,
    tc: Option<SchedClassifierLinkId>,
}

/// `aya-log-ebpf` level numbers (error = 1 ... trace = 5): eBPF log statements above the
/// agent's own level are skipped in the kernel, costing one load of a read-only global.
fn ebpf_log_level(level: log::LevelFilter) -> u8 {
    match level {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}

impl Tracker {
    /// Loads the embedded object and both programs into the kernel (nothing is attached yet).
    ///
    /// # Errors
    /// When the kernel refuses the object or a program (verifier, privileges), or pinned maps
    /// of an incompatible shape are in the way.
    pub fn load(opts: &LoadOptions) -> Result<Self, Error> {
        let kernel = check_kernel()?;
        let level = ebpf_log_level(log::max_level());
        let mirror = u8::from(opts.mode == Mode::Mirror);
        let lock_by_lookup = u8::from(kernel < KernelVersion::new(6, 2, 0));
        if lock_by_lookup != 0 {
            info!(
                "kernel {kernel}: the expiry walk locks records through a lookup of their key \
                 (its verifier does not track locks taken in map-walk callbacks)"
            );
        }
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AYA_LOG_LEVEL", &level, true)
            .override_global("MIRROR", &mirror, true)
            .override_global("LOCK_BY_LOOKUP", &lock_by_lookup, true)
            .map_max_entries(FLOWS4_MAP, opts.flows_capacity)
            .map_max_entries(FLOWS6_MAP, opts.flows6_capacity)
            .map_max_entries(HALF_OPEN_MAP, opts.half_open_capacity);
        let pins: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(base) => {
                let dir = layout_dir(base);
                std::fs::create_dir_all(&dir).map_err(|source| Error::PinDir {
                    dir: dir.clone(),
                    source,
                })?;
                for other in other_layouts(base) {
                    info!(
                        "{} holds the maps of another layout ({other}), which this build \
                         cannot read: left as they are (remove the directory to free them)",
                        base.join(&other).display()
                    );
                }
                PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(Error::Load)?;
        let [(xdp_slow, _), (tc_slow, _)] = SLOW_PROGRAMS;
        for name in [
            XDP_PROGRAM,
            TC_PROGRAM,
            REAP_PROGRAM,
            VIEW_PROGRAM,
            xdp_slow,
            tc_slow,
        ] {
            let program = ebpf.program_mut(name).ok_or(Error::Missing {
                kind: "program",
                name,
            })?;
            let started = std::time::Instant::now();
            let loaded = match program {
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::Xdp(p) => p.load(),
                _ => {
                    return Err(Error::Missing {
                        kind: "XDP or TC program",
                        name,
                    });
                }
            };
            loaded.map_err(|source| Error::Program { name, source })?;
            debug!("loaded {name} in {:.2} s", started.elapsed().as_secs_f64());
        }
        // The hot paths hand everything but the fast path's segments to their slow path.
        for (program, array) in SLOW_PROGRAMS {
            let fd = ebpf
                .program(program)
                .ok_or(Error::Missing {
                    kind: "program",
                    name: program,
                })?
                .fd()
                .map_err(|source| Error::Program {
                    name: program,
                    source,
                })?
                .try_clone()
                .map_err(|e| Error::Program {
                    name: program,
                    source: aya::programs::ProgramError::IOError(e),
                })?;
            let map = ebpf.map_mut(array).ok_or(Error::Missing {
                kind: "map",
                name: array,
            })?;
            let mut slots = ProgramArray::try_from(map).map_err(|source| Error::Map {
                name: array,
                source,
            })?;
            slots.set(0, &fd, 0).map_err(|source| Error::Map {
                name: array,
                source,
            })?;
        }
        // The per-port view's ports: index + 1 at each (the map is not pinned: every agent
        // sets its own).
        let map = ebpf.map_mut(PORT_INDEX_MAP).ok_or(Error::Missing {
            kind: "map",
            name: PORT_INDEX_MAP,
        })?;
        let mut index: Array<&mut MapData, u8> =
            Array::try_from(map).map_err(|source| Error::Map {
                name: PORT_INDEX_MAP,
                source,
            })?;
        for (i, port) in opts.ports.iter().take(MAX_WATCHED_PORTS).enumerate() {
            index
                .set(u32::from(*port), &((i + 1) as u8), 0)
                .map_err(|source| Error::Map {
                    name: PORT_INDEX_MAP,
                    source,
                })?;
        }
        Ok(Self {
            ebpf: RwLock::new(ebpf),
            attached: Mutex::new(Vec::new()),
        })
    }

    /// The loaded object (maps, programs, test runs), held shared until the guard drops.
    pub fn ebpf(&self) -> RwLockReadGuard<'_, Ebpf> {
        self.ebpf.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The loaded object, mutably (e.g. to take the log ring buffer).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        self.ebpf.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Everything attached now.
    #[must_use]
    pub fn attachments(&self) -> Vec<Attachment> {
        self.attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|a| a.info.clone())
            .collect()
    }

    /// Attaches the programs to `iface` (in the caller's network namespace).
    ///
    /// # Errors
    /// When the interface does not exist or the kernel refuses an attach; a failed attach
    /// leaves nothing attached to the interface.
    pub fn attach(
        &self,
        iface: &str,
        mode: Mode,
        xdp_mode: XdpModeChoice,
    ) -> Result<Attachment, Error> {
        let name = CString::new(iface).map_err(|_| Error::UnknownInterface(iface.to_owned()))?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(Error::UnknownInterface(iface.to_owned()));
        }
        let mut ebpf = self.ebpf.write().unwrap_or_else(PoisonError::into_inner);
        let (xdp, xdp_link) = attach_xdp(&mut ebpf, iface, &name, xdp_mode)?;
        let tc = match mode {
            Mode::Host => match attach_tc(&mut ebpf, iface, &name) {
                Ok(tc) => Some(tc),
                Err(e) => {
                    detach_links(&mut ebpf, iface, xdp_link, None);
                    return Err(e);
                }
            },
            Mode::Mirror => None,
        };
        let info = Attachment {
            iface: iface.to_owned(),
            ifindex,
            xdp,
            tc: tc.as_ref().map(|(mode, _)| *mode),
        };
        self.attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Attached {
                info: info.clone(),
                xdp: xdp_link,
                tc: tc.map(|(_, link)| link),
            });
        Ok(info)
    }

    /// Lets go of the attachment to `iface`, whose device may be gone already (the kernel then
    /// removed the hooks with it): its links are released so that a device of that name can be
    /// attached anew. `None` when nothing is attached under that name.
    pub fn detach(&self, iface: &str) -> Option<Attachment> {
        let gone = {
            let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
            let i = attached.iter().position(|a| a.info.iface == iface)?;
            attached.remove(i)
        };
        let mut ebpf = self.ebpf.write().unwrap_or_else(PoisonError::into_inner);
        detach_links(&mut ebpf, iface, gone.xdp, gone.tc);
        Some(gone.info)
    }
}

/// Detaches two links of one interface; failures (the device is gone, and the hooks with it)
/// are logged at debug level only.
fn detach_links(ebpf: &mut Ebpf, iface: &str, xdp: XdpLinkId, tc: Option<SchedClassifierLinkId>) {
    if let Some(program) = ebpf
        .program_mut(XDP_PROGRAM)
        .and_then(|p| <&mut Xdp>::try_from(p).ok())
        && let Err(e) = program.detach(xdp)
    {
        debug!("{iface}: detaching XDP: {}", error_chain(&e));
    }
    if let Some(tc) = tc
        && let Some(program) = ebpf
            .program_mut(TC_PROGRAM)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        && let Err(e) = program.detach(tc)
    {
        debug!("{iface}: detaching TC: {}", error_chain(&e));
    }
}

/// Attaches the XDP program to `iface` in the mode `choice` leads to.
fn attach_xdp(
    ebpf: &mut Ebpf,
    iface: &str,
    name: &CString,
    choice: XdpModeChoice,
) -> Result<(XdpAttachMode, XdpLinkId), Error> {
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Missing {
            kind: "program",
            name: XDP_PROGRAM,
        })?;
    let attach_err = |mode: XdpAttachMode, source| Error::Attach {
        iface: iface.to_owned(),
        hook: format!("XDP ({mode})"),
        native_xdp: mode == XdpAttachMode::Native,
        source,
    };
    let choice = match choice {
        XdpModeChoice::Auto => match crate::iface::driver(iface) {
            Ok(d) if d.is_virtual() => {
                info!(
                    "{iface}: a software device ({}): generic (skb) XDP, which adds no drops \
                     there (--xdp-mode native to override)",
                    d.name
                );
                XdpModeChoice::Skb
            }
            _ => XdpModeChoice::Auto,
        },
        other => other,
    };
    match choice {
        XdpModeChoice::Native => program
            .attach(name.as_c_str(), XdpMode::Driver)
            .map(|id| (XdpAttachMode::Native, id))
            .map_err(|e| attach_err(XdpAttachMode::Native, e)),
        XdpModeChoice::Skb => program
            .attach(name.as_c_str(), XdpMode::Skb)
            .map(|id| (XdpAttachMode::Generic, id))
            .map_err(|e| attach_err(XdpAttachMode::Generic, e)),
        XdpModeChoice::Auto => match program.attach(name.as_c_str(), XdpMode::Driver) {
            Ok(id) => Ok((XdpAttachMode::Native, id)),
            Err(native) => {
                warn!(
                    "{iface}: native XDP refused ({}), falling back to generic (skb) mode",
                    error_chain(&native)
                );
                program
                    .attach(name.as_c_str(), XdpMode::Skb)
                    .map(|id| (XdpAttachMode::Generic, id))
                    .map_err(|e| attach_err(XdpAttachMode::Generic, e))
            }
        },
    }
}

/// Attaches the TC program to `iface`'s egress: a TCX link where the kernel has them (6.6+),
/// else a netlink filter on a clsact qdisc. A netlink filter outlives its agent when that
/// agent is killed (SIGKILL): filters of our program's name found on the interface are
/// removed first, so that the egress hook never runs twice.
fn attach_tc(
    ebpf: &mut Ebpf,
    iface: &str,
    name: &CString,
) -> Result<(TcAttachMode, SchedClassifierLinkId), Error> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Missing {
            kind: "program",
            name: TC_PROGRAM,
        })?;
    let tcx = TcAttach::Tcx {
        attach_type: TcAttachType::Egress,
        order: LinkOrder::default(),
    };
    match program.attach(name.as_c_str(), tcx) {
        Ok(id) => return Ok((TcAttachMode::Tcx, id)),
        Err(e) => info!(
            "{iface}: TCX attach unavailable ({}), using a netlink clsact filter",
            error_chain(&e)
        ),
    }
    // An existing clsact qdisc (ours from an earlier run, or someone else's) is fine.
    if let Err(e) = tc::qdisc_add_clsact(name.as_c_str()) {
        let exists = matches!(&e, tc::TcError::NetlinkError(n)
            if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            warn!(
                "{iface}: adding the clsact qdisc failed: {}",
                error_chain(&e)
            );
        }
    }
    match tc::qdisc_detach_program(name.as_c_str(), TcAttachType::Egress.into(), TC_PROGRAM) {
        Ok(()) => info!(
            "{iface}: removed the TC egress filter an earlier agent left (killed before it \
             could detach)"
        ),
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(
            "{iface}: looking for TC egress filters an earlier agent left: {}",
            error_chain(&e)
        ),
    }
    let netlink = TcAttach::Netlink {
        parent: TcAttachType::Egress.into(),
        options: NlOptions::default(),
    };
    program
        .attach(name.as_c_str(), netlink)
        .map(|id| (TcAttachMode::Netlink, id))
        .map_err(|source| Error::Attach {
            iface: iface.to_owned(),
            hook: "TC egress (netlink)".to_owned(),
            native_xdp: false,
            source,
        })
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Tracker>();
};

/// The oldest kernel the test suite passes on (`cargo xtask vm`: Debian 12's 6.1).
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(6, 1, 0);

/// The running kernel's version, or why the tracker cannot run on it.
///
/// # Errors
/// [`Error::KernelTooOld`] below [`MIN_KERNEL`], naming what is missing.
pub fn check_kernel() -> Result<KernelVersion, Error> {
    // An unreadable version (unusual `uname -r`) is no reason to refuse: loading will tell.
    // It counts as the oldest supported one, whose fallbacks work on every kernel.
    let Ok(found) = KernelVersion::current() else {
        return Ok(MIN_KERNEL);
    };
    supported(found).map(|()| found)
}

/// Whether the tracker supports kernel `found`.
///
/// # Errors
/// [`Error::KernelTooOld`] below [`MIN_KERNEL`].
pub fn supported(found: KernelVersion) -> Result<(), Error> {
    if found >= MIN_KERNEL {
        return Ok(());
    }
    let missing = if found < KernelVersion::new(5, 13, 0) {
        "bpf_for_each_map_elem, 5.13, walks the flow tables for expiry"
    } else {
        "the programs are verified on 6.1 and newer only; older verifiers are untested"
    };
    Err(Error::KernelTooOld {
        found: found.to_string(),
        minimum: MIN_KERNEL.to_string(),
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_older_than_the_tested_floor_are_refused_with_what_they_lack() {
        assert!(supported(KernelVersion::new(6, 1, 0)).is_ok());
        assert!(supported(KernelVersion::new(6, 18, 44)).is_ok());
        let old = supported(KernelVersion::new(5, 10, 0)).expect_err("5.10 is refused");
        assert_eq!(
            old.to_string(),
            "Linux 5.10.0 is too old: tcpscope needs 6.1.0 or newer \
             (bpf_for_each_map_elem, 5.13, walks the flow tables for expiry)"
        );
        let untested = supported(KernelVersion::new(5, 15, 0)).expect_err("5.15 is refused");
        assert!(untested.to_string().contains("untested"), "{untested}");
    }
}
