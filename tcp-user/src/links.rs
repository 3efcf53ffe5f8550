//! Interfaces come and go: the agent follows the kernel's link events (rtnetlink,
//! `RTMGRP_LINK`) and keeps every interface it was asked to track attached.
//!
//! When an attached interface is deleted (or moved to another namespace, or renamed) the
//! kernel removes the XDP and TC hooks with it; the agent says so, lets go of the dead links,
//! and `/healthz` answers 503 naming it. When an interface of that name appears (with a new
//! index) the agent attaches to it again and says so. Events only wake the check: the truth
//! is always the name's current index (`if_nametoindex`), compared on every event and once a
//! second, so that a burst that overran the socket (`ENOBUFS`) loses nothing.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    time::Instant,
};

use log::{info, warn};

use crate::{
    error::error_chain,
    loader::{Attachment, Mode, Tracker, XdpModeChoice},
};

/// A netlink socket subscribed to link events, non-blocking.
#[derive(Debug)]
pub struct LinkEvents {
    fd: OwnedFd,
}

/// What the kernel said about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed (name, flags, namespace).
    New { index: u32, name: Option<String> },
    /// A link was deleted (or left this namespace).
    Deleted { index: u32, name: Option<String> },
    /// Events were lost (the socket's buffer overran): every interface must be checked.
    Lost,
}

/// `RTMGRP_LINK` (linux/rtnetlink.h).
const RTMGRP_LINK: u32 = 1;
/// `IFLA_IFNAME` (linux/if_link.h).
const IFLA_IFNAME: u16 = 3;
/// `sizeof(struct nlmsghdr)`, `sizeof(struct ifinfomsg)`.
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

impl LinkEvents {
    /// Opens the socket in the caller's network namespace.
    ///
    /// # Errors
    /// When the kernel refuses the socket or the subscription.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just opened and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid `sockaddr_nl`.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: `addr` is a valid `sockaddr_nl` of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Reads every message waiting (none: an empty list).
    ///
    /// # Errors
    /// When reading fails for another reason than an overrun (reported as [`LinkEvent::Lost`]).
    pub fn drain(&self) -> io::Result<Vec<LinkEvent>> {
        let mut events = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(events),
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => events.push(LinkEvent::Lost),
                    _ => return Err(e),
                }
                continue;
            }
            parse(&buf[..n as usize], &mut events);
        }
    }
}

impl AsRawFd for LinkEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for LinkEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Appends the link events of one datagram (several messages) to `out`; anything else, and
/// anything malformed, is skipped.
fn parse(mut buf: &[u8], out: &mut Vec<LinkEvent>) {
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return;
        }
        let kind = u16_at(buf, 4);
        let msg = &buf[NLMSG_HDRLEN..len];
        if (kind == libc::RTM_NEWLINK || kind == libc::RTM_DELLINK) && msg.len() >= IFINFOMSG_LEN {
            let index = u32_at(msg, 4);
            let mut name = None;
            let mut attrs = &msg[IFINFOMSG_LEN..];
            while attrs.len() >= 4 {
                let alen = usize::from(u16_at(attrs, 0));
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if u16_at(attrs, 2) == IFLA_IFNAME {
                    let value = &attrs[4..alen];
                    let value = value.split(|b| *b == 0).next().unwrap_or_default();
                    name = Some(String::from_utf8_lossy(value).into_owned());
                }
                attrs = attrs.get((alen + 3) & !3..).unwrap_or_default();
            }
            out.push(if kind == libc::RTM_NEWLINK {
                LinkEvent::New { index, name }
            } else {
                LinkEvent::Deleted { index, name }
            });
        }
        // NLMSG_ALIGN
        let next = (len + 3) & !3;
        if next >= buf.len() {
            return;
        }
        buf = &buf[next..];
    }
}

/// The current index of interface `name` in the caller's namespace (0: none).
fn index_of(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// One interface the agent was asked to track.
#[derive(Debug)]
enum Followed {
    Attached(Attachment),
    Absent {
        since: Instant,
        /// The index of the interface of that name whose attach failed, and why: tried again
        /// only on a link event for it or when the name gets another index.
        failed: Option<(u32, String)>,
    },
}

/// The interfaces the agent tracks, and how to attach to them.
#[derive(Debug)]
pub struct Interfaces {
    mode: Mode,
    xdp_mode: XdpModeChoice,
    ifaces: Vec<(String, Followed)>,
}

impl Interfaces {
    /// Follows `ifaces`, none of them attached yet.
    #[must_use]
    pub fn new(ifaces: &[String], mode: Mode, xdp_mode: XdpModeChoice) -> Self {
        let now = Instant::now();
        Self {
            mode,
            xdp_mode,
            ifaces: ifaces
                .iter()
                .map(|i| {
                    (
                        i.clone(),
                        Followed::Absent {
                            since: now,
                            failed: None,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Records an attachment made at start.
    pub fn attached(&mut self, attachment: Attachment) {
        if let Some((_, f)) = self.ifaces.iter_mut().find(|(n, _)| *n == attachment.iface) {
            *f = Followed::Attached(attachment);
        }
    }

    /// Brings every followed interface up to date after `events` (or a periodic check: none):
    /// lets go of attachments whose interface is gone, attaches to interfaces that came.
    pub fn update(&mut self, tracker: &Tracker, events: &[LinkEvent]) {
        for (name, followed) in &mut self.ifaces {
            if let Followed::Attached(a) = followed {
                let deleted = events
                    .iter()
                    .any(|e| matches!(e, LinkEvent::Deleted { index, .. } if *index == a.ifindex));
                let now = index_of(name);
                if deleted || now != a.ifindex {
                    warn!(
                        "{name}: the interface (index {}) is gone: not tracking it until an \
                         interface of that name comes back",
                        a.ifindex
                    );
                    tracker.detach(name);
                    *followed = Followed::Absent {
                        since: Instant::now(),
                        failed: None,
                    };
                }
            }
            let Followed::Absent { since, failed } = followed else {
                continue;
            };
            let index = index_of(name);
            if index == 0 {
                *failed = None;
                continue;
            }
            let event = events.iter().any(|e| {
                matches!(e, LinkEvent::New { index: i, .. } if *i == index)
                    || matches!(e, LinkEvent::Lost)
            });
            if failed.as_ref().is_some_and(|(i, _)| *i == index) && !event {
                continue;
            }
            match tracker.attach(name, self.mode, self.xdp_mode) {
                Ok(a) => {
                    info!(
                        "{name}: the interface is here (index {index}) after {:.0} s without: \
                         attached {a}",
                        since.elapsed().as_secs_f64()
                    );
                    *followed = Followed::Attached(a);
                }
                Err(e) => {
                    let e = error_chain(&e);
                    if failed.as_ref().is_none_or(|(_, last)| *last != e) {
                        warn!(
                            "{name}: attaching failed: {e} (tried again on a link event for \
                             it; logged again only if it changes)"
                        );
                    }
                    *failed = Some((index, e));
                }
            }
        }
    }

    /// `Ok` with the interfaces tracked when all are attached, else `Err` naming those that
    /// are not: `/healthz`'s answer (200 or 503).
    ///
    /// # Errors
    /// When an interface is not attached.
    pub fn health(&self) -> Result<String, String> {
        let mut attached = Vec::new();
        let mut absent = Vec::new();
        for (name, f) in &self.ifaces {
            match f {
                Followed::Attached(_) => attached.push(name.as_str()),
                Followed::Absent { since, failed } => absent.push(match failed {
                    None => format!("{name} absent for {:.0} s", since.elapsed().as_secs_f64()),
                    Some((_, e)) => format!(
                        "{name} not attached for {:.0} s: {e}",
                        since.elapsed().as_secs_f64()
                    ),
                }),
            }
        }
        if absent.is_empty() {
            Ok(format!("ok: tracking on {}\n", attached.join(", ")))
        } else {
            Err(format!(
                "not tracking: {}{}",
                absent.join("; "),
                if attached.is_empty() {
                    String::new()
                } else {
                    format!(" (tracking on {})", attached.join(", "))
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link message as the kernel sends it: nlmsghdr, ifinfomsg, IFLA_IFNAME.
    fn message(kind: u16, index: u32, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let value_len = name.len() + 1;
        attr.extend_from_slice(&((4 + value_len) as u16).to_ne_bytes());
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        attr.extend_from_slice(name.as_bytes());
        attr.push(0);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut ifi = vec![0u8; IFINFOMSG_LEN];
        ifi[4..8].copy_from_slice(&index.to_ne_bytes());
        let len = NLMSG_HDRLEN + ifi.len() + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend(ifi);
        m.extend(attr);
        m
    }

    #[test]
    fn parses_new_and_deleted_links_of_one_datagram() {
        let mut buf = message(libc::RTM_NEWLINK, 7, "veth0");
        buf.extend(message(libc::RTM_DELLINK, 9, "eth12"));
        let mut out = Vec::new();
        parse(&buf, &mut out);
        assert_eq!(
            out,
            [
                LinkEvent::New {
                    index: 7,
                    name: Some("veth0".into())
                },
                LinkEvent::Deleted {
                    index: 9,
                    name: Some("eth12".into())
                }
            ]
        );
    }

    #[test]
    fn skips_truncated_and_other_messages() {
        let mut out = Vec::new();
        let m = message(libc::RTM_NEWLINK, 7, "veth0");
        parse(&m[..m.len() - 3], &mut out);
        let mut other = message(libc::RTM_NEWLINK, 7, "x");
        other[4..6].copy_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
        parse(&other, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
}
