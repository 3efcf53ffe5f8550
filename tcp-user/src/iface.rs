//! Network interface helpers: which interface holds the default route, which driver runs an
//! interface.

use std::fs;

/// Whether an interface of this name exists in the caller's network namespace.
#[must_use]
pub fn exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// What `ethtool -i` tells of an interface's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    /// The driver's name (`veth`, `virtio_net`, `mlx5_core`, ...).
    pub name: String,
    /// The device's bus address (`0000:03:00.0`, `virtio0`); empty for devices that exist in
    /// software only.
    pub bus_info: String,
}

impl Driver {
    /// Whether the device exists in software only (veth, tun/tap and the like): no bus
    /// address, or the tun driver, which reports one of its own. On these, native XDP moves the
    /// receive path onto a small ring of its own (veth's holds 256 frames), which drops under a
    /// burst that the generic path's backlog absorbs.
    #[must_use]
    pub fn is_virtual(&self) -> bool {
        self.bus_info.is_empty() || self.name == "tun"
    }
}

/// The driver of interface `name` in the caller's network namespace (`ETHTOOL_GDRVINFO`).
///
/// # Errors
/// When the interface does not exist or its driver does not answer ethtool.
pub fn driver(name: &str) -> std::io::Result<Driver> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    /// `struct ifreq` with its `ifr_data` member.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: all-zero is a valid `ethtool_drvinfo` (integers and byte arrays).
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut info,
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket this function owns and closes; the ioctl writes only into
    // `info`, through the pointer in `req`, both alive for the call.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL, &raw mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 { Err(err) } else { Ok(()) }
    };
    rc?;
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok(Driver {
        name: text(&info.driver),
        bus_info: text(&info.bus_info),
    })
}

/// The interface of the IPv4 default route, else of the IPv6 one (from procfs, in the
/// caller's network namespace).
#[must_use]
pub fn default_route_interface() -> Option<String> {
    let v4 = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    from_route_tables(&v4, &v6)
}

/// Picks the default-route interface out of the texts of `/proc/net/route` and
/// `/proc/net/ipv6_route`. The route with the lowest metric wins.
fn from_route_tables(v4: &str, v6: &str) -> Option<String> {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
    let ipv4 = v4
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let up = u32::from_str_radix(f.get(3)?, 16).ok()? & 1 == 1;
            (up && *f.get(1)? == "00000000" && *f.get(7)? == "00000000")
                .then(|| Some((f.get(6)?.parse::<u32>().ok()?, f[0].to_owned())))?
        })
        .min();
    if let Some((_, iface)) = ipv4 {
        return Some(iface);
    }
    // dest plen src plen next-hop metric refcnt use flags iface
    v6.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let default = f.first()?.bytes().all(|b| b == b'0') && *f.get(1)? == "00";
            let iface = *f.get(9)?;
            (default && iface != "lo")
                .then(|| Some((u32::from_str_radix(f.get(5)?, 16).ok()?, iface.to_owned())))?
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::from_route_tables;

    const V4: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth1\t00000000\t0102000A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
        eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
    const V6: &str = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003  wlan0\n\
        00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";

    #[test]
    fn lowest_metric_ipv4_default_wins() {
        assert_eq!(from_route_tables(V4, V6).as_deref(), Some("eth0"));
    }

    #[test]
    fn falls_back_to_ipv6_default_and_skips_loopback() {
        assert_eq!(
            from_route_tables("Iface\tDestination\n", V6).as_deref(),
            Some("wlan0")
        );
        assert_eq!(
            from_route_tables("", V6.lines().nth(1).unwrap_or_default()),
            None
        );
    }
}
