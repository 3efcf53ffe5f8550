//! `tcpscope events`: the running agent's state changes, read from its pinned ring buffer.
//!
//! - **One reader**: a ring buffer has one consumer. A reader takes an exclusive `flock` on
//!   the layout directory of the pins (the agent locks the directory above it), which the
//!   kernel drops however the reader exits; a second reader is refused, naming the first.
//! - **The programs write only while a reader is attached**: the reader writes its pid into
//!   the pinned `EVENTS_READER` array and clears it on exit. One that dies without clearing it
//!   (SIGKILL) is noticed by the agent, which checks once a second that someone still holds
//!   the readers' lock and clears the flag otherwise. It asks the lock itself (a non-blocking
//!   `flock`, released at once), not `/proc/locks`: a reader in another PID namespace (the
//!   node's shell, the agent in a pod) is invisible there. A reader starting during that probe
//!   retries its own `flock` for a moment rather than failing.
//! - **Losses**: a record that finds the ring full is dropped and counted by the programs
//!   (`tcpscope_events_lost_total`); the reader reads that count and reports what it missed.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, RingBuf};
use serde::Serialize;
use tcp_common::{
    event_counters::event_slots,
    flow::FlowKey,
    object::{EVENTS_MAP, EVENTS_READER_MAP},
    parse::tcp_flags,
    state::TcpState,
    transition::{EndpointChange, Transition, cause},
};

use crate::{
    error::Error,
    pins::{holder_description, layout_dir},
    report::endpoint_string,
};

/// An attached reader: the ring buffer, the flag that holds its pid, and its lock.
pub struct Reader {
    ring: RingBuf<MapData>,
    flag: Array<MapData, u32>,
    _lock: File,
    pid: u32,
}

impl Reader {
    /// Attaches to the event stream pinned under `base` (an agent's `--pin-dir`): takes the
    /// reader lock, drops what an earlier reader left unread, and raises the flag.
    ///
    /// # Errors
    /// [`Error::NotPinned`] when the pins hold no event stream (no agent, or one of a build
    /// without it), [`Error::EventsBusy`] when another reader is attached.
    pub fn attach(base: &Path) -> Result<Self, Error> {
        let dir = layout_dir(base);
        let open = |name: &'static str| -> Result<MapData, Error> {
            let path = dir.join(name);
            if !path.exists() {
                return Err(Error::NotPinned {
                    path,
                    found: String::new(),
                });
            }
            MapData::from_pin(&path).map_err(|source| Error::Map { name, source })
        };
        let ring = open(EVENTS_MAP)?;
        let flag = open(EVENTS_READER_MAP)?;
        let lock = File::open(&dir).map_err(|source| Error::PinDir {
            dir: dir.clone(),
            source,
        })?;
        // The agent's probe holds the lock for a moment (see the module's text): a few tries.
        let mut tries = 0;
        loop {
            match try_lock(&lock) {
                Ok(true) => break,
                Ok(false) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(false) => {
                    return Err(Error::EventsBusy {
                        holder: holder_description(&dir),
                    });
                }
                Err(source) => return Err(Error::PinDir { dir, source }),
            }
        }
        let mut ring = RingBuf::try_from(Map::RingBuf(ring)).map_err(|source| Error::Map {
            name: EVENTS_MAP,
            source,
        })?;
        // What an earlier reader left unread belongs to its time, not to this one.
        while ring.next().is_some() {}
        let flag = Array::try_from(Map::Array(flag)).map_err(|source| Error::Map {
            name: EVENTS_READER_MAP,
            source,
        })?;
        let mut reader = Self {
            ring,
            flag,
            _lock: lock,
            pid: std::process::id(),
        };
        reader.raise()?;
        Ok(reader)
    }

    /// Sets the flag to this reader's pid unless it holds it already; `true` when it had to
    /// (the agent cleared it in a race with an earlier reader's death).
    ///
    /// # Errors
    /// When the kernel refuses the map access.
    pub fn raise(&mut self) -> Result<bool, Error> {
        let err = |source| Error::Map {
            name: EVENTS_READER_MAP,
            source,
        };
        if self.flag.get(&0, 0).map_err(err)? == self.pid {
            return Ok(false);
        }
        self.flag.set(0, &self.pid, 0).map_err(err)?;
        Ok(true)
    }

    /// The next record, if the ring holds one.
    pub fn next_record(&mut self) -> Option<Transition> {
        let item = self.ring.next()?;
        (item.len() >= size_of::<Transition>()).then(|| {
            // SAFETY: the programs write whole `Transition` records (checked length); read
            // unaligned, as the ring gives no alignment guarantee to this type.
            unsafe { item.as_ptr().cast::<Transition>().read_unaligned() }
        })
    }
}

impl Drop for Reader {
    /// Lowers the flag if it still holds this reader's pid.
    fn drop(&mut self) {
        if self.flag.get(&0, 0).is_ok_and(|pid| pid == self.pid) {
            let _ = self.flag.set(0, &0, 0);
        }
    }
}

impl AsRawFd for Reader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for Reader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// The agent's watch over the flag: once a second, when it names a process that no longer
/// holds the reader lock of the pins (killed before it could clear the flag), the flag is
/// cleared, so that the programs stop writing records nobody reads.
pub struct ReaderWatch {
    flag: Array<MapData, u32>,
    dir: PathBuf,
}

impl ReaderWatch {
    /// Opens the flag pinned under `base`.
    ///
    /// # Errors
    /// When it is not pinned there or cannot be opened.
    pub fn open(base: &Path) -> Result<Self, Error> {
        let dir = layout_dir(base);
        let path = dir.join(EVENTS_READER_MAP);
        let data = MapData::from_pin(&path).map_err(|source| Error::Map {
            name: EVENTS_READER_MAP,
            source,
        })?;
        let flag = Array::try_from(Map::Array(data)).map_err(|source| Error::Map {
            name: EVENTS_READER_MAP,
            source,
        })?;
        Ok(Self { flag, dir })
    }

    /// Clears the flag when its reader is gone; returns that reader's pid.
    ///
    /// # Errors
    /// When the flag cannot be read or written.
    pub fn check(&mut self) -> Result<Option<u32>, Error> {
        let err = |source| Error::Map {
            name: EVENTS_READER_MAP,
            source,
        };
        let pid = self.flag.get(&0, 0).map_err(err)?;
        if pid == 0 {
            return Ok(None);
        }
        // Held by a reader (whatever its PID namespace): nothing to do. Free: the lock is
        // released again when `probe` drops, at once.
        let probe = File::open(&self.dir).map_err(|source| Error::PinDir {
            dir: self.dir.clone(),
            source,
        })?;
        if !try_lock(&probe).map_err(|source| Error::PinDir {
            dir: self.dir.clone(),
            source,
        })? {
            return Ok(None);
        }
        drop(probe);
        // A reader that starts in between writes its pid after taking the lock: read again
        // just before clearing (and that reader raises the flag again at its next tick if
        // this clear still comes in between).
        if self.flag.get(&0, 0).map_err(err)? != pid {
            return Ok(None);
        }
        self.flag.set(0, &0, 0).map_err(err)?;
        Ok(Some(pid))
    }
}

/// Takes the exclusive `flock` on `file` without waiting: `Ok(false)` when another holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor the caller owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Records the programs could not write since the pins were made (the ring was full), all
/// readers together.
///
/// # Errors
/// When the metrics are not pinned under `base` or cannot be read.
pub fn lost(base: &Path) -> Result<u64, Error> {
    let (_, metrics) = crate::counters::read_pinned(base)?;
    Ok(metrics.events.slots[event_slots::EVENTS_LOST])
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns: turns the programs' times into wall-clock ones.
#[must_use]
pub fn realtime_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer; both clocks always exist.
        unsafe { libc::clock_gettime(clock, &raw mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let before = read(libc::CLOCK_MONOTONIC);
    let real = read(libc::CLOCK_REALTIME);
    let after = read(libc::CLOCK_MONOTONIC);
    real - (before + after) / 2
}

/// `unix_ns` as RFC 3339 in UTC with `digits` fractional digits (0 to 9).
#[must_use]
pub fn rfc3339(unix_ns: i128, digits: usize) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    let mut s = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let digits = digits.min(9);
    if digits > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(&frac[..digits]);
    }
    s.push('Z');
    s
}

/// A state as the RFC writes it (`TIME-WAIT`, `SYN-RECEIVED`).
#[must_use]
pub fn rfc_name(state: TcpState) -> String {
    state.name().to_ascii_uppercase().replace('_', "-")
}

/// TCP flags as `SYN|ACK`.
#[must_use]
pub fn flags_string(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (tcp_flags::SYN, "SYN"),
        (tcp_flags::FIN, "FIN"),
        (tcp_flags::RST, "RST"),
        (tcp_flags::PSH, "PSH"),
        (tcp_flags::ACK, "ACK"),
        (tcp_flags::URG, "URG"),
        (tcp_flags::ECE, "ECE"),
        (tcp_flags::CWR, "CWR"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("|")
    }
}

/// What `-o ndjson` prints for one endpoint's change (the keys are stable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventView {
    /// Wall-clock time, RFC 3339 in UTC, ns.
    pub time: String,
    /// CLOCK_MONOTONIC of the record, ns (the order of the stream's records).
    pub monotonic_ns: u64,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// The endpoint whose state changed, `address:port`.
    pub endpoint: String,
    /// Its peer.
    pub peer: String,
    /// Outer VLAN id (0: none).
    pub vlan: u16,
    /// client / server / unknown.
    pub role: &'static str,
    /// local / remote / unknown.
    pub side: &'static str,
    /// State before (`established`, ...).
    pub old: &'static str,
    /// State after.
    pub new: &'static str,
    /// `segment`, `expired`, `reconciled` or `table_full`.
    pub cause: &'static str,
    /// The segment's flags (`FIN|ACK`), for cause `segment`.
    pub flags: Option<String>,
    /// Whether this endpoint sent that segment (`false`: it received it), for cause
    /// `segment`.
    pub sent: Option<bool>,
    /// The ports of both endpoints, for filtering.
    #[serde(skip)]
    pub ports: [u16; 2],
    /// The states before and after, for filtering.
    #[serde(skip)]
    pub states: [TcpState; 2],
}

/// The name of a [`cause`].
#[must_use]
pub const fn cause_name(c: u8) -> &'static str {
    match c {
        cause::SEGMENT => "segment",
        cause::EXPIRED => "expired",
        cause::RECONCILED => "reconciled",
        cause::TABLE_FULL => "table_full",
        _ => "unknown",
    }
}

impl EventView {
    /// The endpoint changes of one record, in key order; `offset`: [`realtime_offset_ns`].
    #[must_use]
    pub fn of(t: &Transition, offset: i128) -> Vec<Self> {
        t.changes()
            .into_iter()
            .flatten()
            .map(|c| Self::change(t, &c, offset))
            .collect()
    }

    fn change(t: &Transition, c: &EndpointChange, offset: i128) -> Self {
        let key: &FlowKey = &t.key;
        let segment = t.cause == cause::SEGMENT;
        Self {
            time: rfc3339(i128::from(t.ts_ns) + offset, 9),
            monotonic_ns: t.ts_ns,
            family: if key.ipv6 != 0 { "ipv6" } else { "ipv4" },
            endpoint: endpoint_string(key, c.index),
            peer: endpoint_string(key, 1 - c.index),
            vlan: key.vlan,
            role: c.role.name(),
            side: c.side.name(),
            old: c.old.name(),
            new: c.new.name(),
            cause: cause_name(t.cause),
            flags: segment.then(|| flags_string(t.flags)),
            sent: segment.then_some(usize::from(t.sender & 1) == c.index),
            ports: key.port,
            states: [c.old, c.new],
        }
    }

    /// The human line: time, endpoint → peer, role and side, OLD → NEW, and why.
    #[must_use]
    pub fn human(&self) -> String {
        let why = match (&self.flags, self.sent) {
            (Some(flags), Some(true)) => format!("sent {flags}"),
            (Some(flags), _) => format!("received {flags}"),
            _ => self.cause.replace('_', " "),
        };
        // Microseconds are enough to read; -o ndjson has the nanoseconds.
        let time = &self.time[..self.time.len().min(26)];
        format!(
            "{time}Z {} -> {} {} {} {} -> {} ({why})",
            self.endpoint,
            self.peer,
            self.role,
            self.side,
            rfc_name(self.states[0]),
            rfc_name(self.states[1]),
        )
    }
}

/// What `tcpscope events` keeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    /// Changes of flows with this port at either end.
    pub port: Option<u16>,
    /// Changes into or out of this state.
    pub state: Option<TcpState>,
}

impl Filter {
    /// Whether `v` passes.
    #[must_use]
    pub fn matches(&self, v: &EventView) -> bool {
        self.port.is_none_or(|p| v.ports.contains(&p))
            && self.state.is_none_or(|s| v.states.contains(&s))
    }
}

#[cfg(test)]
mod tests {
    use tcp_common::{
        gauges::{NO_SLOT, gauge_slot},
        state::{Role, Side},
    };

    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        // date -u -d @951782400.5 → 2000-02-29 00:00:00.5 (a leap day of a century year).
        assert_eq!(
            rfc3339(951_782_400_500_000_000, 9),
            "2000-02-29T00:00:00.500000000Z"
        );
        // 2026-11-30T16:40:01.123456789Z
        assert_eq!(
            rfc3339(1_796_056_801_123_456_789, 6),
            "2026-11-30T16:40:01.123456Z"
        );
        assert_eq!(rfc3339(-1_000_000_000, 0), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn flags_and_states_read_as_the_rfc_writes_them() {
        assert_eq!(flags_string(tcp_flags::SYN | tcp_flags::ACK), "SYN|ACK");
        assert_eq!(flags_string(tcp_flags::FIN | tcp_flags::ACK), "FIN|ACK");
        assert_eq!(flags_string(0), "none");
        assert_eq!(rfc_name(TcpState::TimeWait), "TIME-WAIT");
        assert_eq!(rfc_name(TcpState::SynReceived), "SYN-RECEIVED");
        assert_eq!(rfc_name(TcpState::FinWait2), "FIN-WAIT-2");
    }

    fn fin_from_client() -> Transition {
        let mut key = FlowKey::default();
        key.addr[0][..4].copy_from_slice(&[10, 0, 0, 1]);
        key.addr[1][..4].copy_from_slice(&[10, 0, 0, 2]);
        key.port = [43_210, 8080];
        Transition {
            ts_ns: 1_000,
            key,
            slots: [
                gauge_slot(TcpState::Established, Role::Client, Side::Remote),
                gauge_slot(TcpState::Established, Role::Server, Side::Local),
                gauge_slot(TcpState::FinWait1, Role::Client, Side::Remote),
                gauge_slot(TcpState::CloseWait, Role::Server, Side::Local),
            ],
            cause: cause::SEGMENT,
            flags: tcp_flags::FIN | tcp_flags::ACK,
            sender: 0,
            ..Transition::default()
        }
    }

    #[test]
    fn a_record_prints_one_line_per_endpoint_that_changed() {
        let views = EventView::of(&fin_from_client(), 1_796_056_801_000_000_000);
        assert_eq!(views.len(), 2);
        let json = serde_json::to_value(&views[0]).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2026-11-30T16:40:01.000001000Z",
                "monotonic_ns": 1000,
                "family": "ipv4",
                "endpoint": "10.0.0.1:43210",
                "peer": "10.0.0.2:8080",
                "vlan": 0,
                "role": "client",
                "side": "remote",
                "old": "established",
                "new": "fin_wait_1",
                "cause": "segment",
                "flags": "FIN|ACK",
                "sent": true,
            })
        );
        assert_eq!(
            views[1].human(),
            "2026-11-30T16:40:01.000001Z 10.0.0.2:8080 -> 10.0.0.1:43210 server local \
             ESTABLISHED -> CLOSE-WAIT (received FIN|ACK)"
        );
        let mut expired = fin_from_client();
        expired.cause = cause::EXPIRED;
        expired.slots[2] = NO_SLOT;
        expired.slots[3] = NO_SLOT;
        let views = EventView::of(&expired, 0);
        assert_eq!(views[0].flags, None);
        assert!(
            views[0]
                .human()
                .ends_with("ESTABLISHED -> CLOSED (expired)")
        );
    }

    #[test]
    fn filters_take_either_port_and_either_end_of_the_change() {
        let views = EventView::of(&fin_from_client(), 0);
        let pass = |f: Filter| views.iter().filter(|v| f.matches(v)).count();
        assert_eq!(pass(Filter::default()), 2);
        assert_eq!(
            pass(Filter {
                port: Some(8080),
                state: None
            }),
            2
        );
        assert_eq!(
            pass(Filter {
                port: Some(43_210),
                state: None
            }),
            2
        );
        assert_eq!(
            pass(Filter {
                port: Some(80),
                state: None
            }),
            0
        );
        let state = |s| Filter {
            port: None,
            state: Some(s),
        };
        assert_eq!(pass(state(TcpState::Established)), 2);
        assert_eq!(pass(state(TcpState::CloseWait)), 1);
        assert_eq!(pass(state(TcpState::TimeWait)), 0);
    }
}
