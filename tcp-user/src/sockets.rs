//! The kernel's own TCP socket table, through sock_diag (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`: the interface `ss` uses), for reconciling the tracker with it (see
//! `reconcile.rs`).

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use tcp_common::state::TcpState;

/// One socket of the caller's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    /// Local address and port (an IPv4-mapped IPv6 address is given as IPv4).
    pub local: SocketAddr,
    /// Remote address and port.
    pub remote: SocketAddr,
    /// Its state.
    pub state: TcpState,
    /// Time left on its timer: for TIME-WAIT, until it ends.
    pub expires: Duration,
}

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_msg)`.
const INET_DIAG_MSG_LEN: usize = 72;

/// Linux's TCP state numbers (include/net/tcp_states.h) as the tracker's states.
fn state_of(linux: u8) -> Option<TcpState> {
    Some(match linux {
        1 => TcpState::Established,
        2 => TcpState::SynSent,
        3 => TcpState::SynReceived,
        4 => TcpState::FinWait1,
        5 => TcpState::FinWait2,
        6 => TcpState::TimeWait,
        8 => TcpState::CloseWait,
        9 => TcpState::LastAck,
        10 => TcpState::Listen,
        11 => TcpState::Closing,
        // 7 (CLOSE), 12 (NEW_SYN_RECV is reported as SYN_RECV), others: nothing to track.
        _ => return None,
    })
}

/// Every TCP socket of the caller's network namespace, both families, every state but
/// CLOSE.
///
/// # Errors
/// When the kernel refuses the netlink socket or the dump.
pub fn dump() -> io::Result<Vec<Socket>> {
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just opened and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        request(&fd, family)?;
        receive(&fd, &mut out)?;
    }
    Ok(out)
}

/// Sends one dump request (`struct inet_diag_req_v2`, every state).
fn request(fd: &OwnedFd, family: u8) -> io::Result<()> {
    let mut msg = [0u8; NLMSG_HDRLEN + 56];
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    msg[6..8].copy_from_slice(&flags.to_ne_bytes());
    let req = &mut msg[NLMSG_HDRLEN..];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    // idiag_ext 0, pad 0, idiag_states: every state, then a zero socket id.
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: all-zero is a valid `sockaddr_nl` (the kernel as destination).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msg` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a dump's answers up to `NLMSG_DONE`.
fn receive(fd: &OwnedFd, out: &mut Vec<Socket>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sock_diag: a truncated message",
                ));
            }
            match i32::from(kind) {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let code = rest
                        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ if kind == SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse(&rest[NLMSG_HDRLEN..len]) {
                        out.push(s);
                    }
                }
                _ => {}
            }
            let next = (len + 3) & !3;
            if next >= rest.len() {
                break;
            }
            rest = &rest[next..];
        }
    }
}

/// One `struct inet_diag_msg`.
fn parse(m: &[u8]) -> Option<Socket> {
    if m.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let family = i32::from(m[0]);
    let state = state_of(m[1])?;
    // id: sport, dport (network order), src[16], dst[16], if, cookie[2].
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let addr = |at: usize| -> Option<IpAddr> {
        let b: [u8; 16] = m[at..at + 16].try_into().ok()?;
        Some(if family == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        })
    };
    let expires = u32::from_ne_bytes(m[52..56].try_into().ok()?);
    Some(Socket {
        local: SocketAddr::new(addr(8)?, sport),
        remote: SocketAddr::new(addr(24)?, dport),
        state,
        expires: Duration::from_millis(u64::from(expires)),
    })
}

/// The addresses of the interfaces `ifaces`, and those of every interface, in the caller's
/// network namespace (`getifaddrs`; empty sets when it fails).
#[must_use]
pub fn addresses(ifaces: &[String]) -> (HashSet<IpAddr>, HashSet<IpAddr>) {
    let mut mine = HashSet::new();
    let mut all = HashSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; the list is freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return (mine, all);
    }
    let mut at = head;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*at };
        at = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null address of the family it states.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let a = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: a NUL-terminated name, alive until freeifaddrs.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifaces.iter().any(|i| i.as_bytes() == name.to_bytes()) {
            mine.insert(ip);
        }
        all.insert(ip);
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    (mine, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket of this test process is in the dump, in its state (run as any user: sock_diag
    /// needs no privilege for the caller's namespace).
    #[test]
    fn the_dump_holds_a_listening_and_a_connected_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(at).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let all = dump().expect("sock_diag dump");
        assert!(
            all.iter()
                .any(|s| s.local == at && s.state == TcpState::Listen),
            "{all:?}"
        );
        let mine = client.local_addr().expect("addr");
        assert!(
            all.iter()
                .any(|s| s.local == mine && s.remote == at && s.state == TcpState::Established),
            "{all:?}"
        );
    }
}
