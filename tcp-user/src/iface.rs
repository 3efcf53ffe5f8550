//! Network interface helpers: which interface holds the default route.

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
