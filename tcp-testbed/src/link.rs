//! Two namespaces joined by a veth pair: the tests' [`Link`], and the pair itself, which the
//! benchmark's [`crate::Testbed`] creates too.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
};

use anyhow::Result;

use crate::{
    cmd::{try_sh, unique},
    netns::NetNs,
};

/// One end of a veth pair: its namespace, its name, and its MAC address when it is chosen.
pub(crate) struct End<'a> {
    pub ns: &'a NetNs,
    pub iface: &'a str,
    pub mac: Option<[u8; 6]>,
}

/// Creates a veth pair with one end in each namespace (down, without addresses).
pub(crate) fn add_veth(a: &End<'_>, b: &End<'_>) -> Result<()> {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let end = |e: &End<'_>| -> Vec<String> {
        let mut args = vec![e.iface.to_owned()];
        if let Some(m) = e.mac {
            args.extend(["address".to_owned(), mac(m)]);
        }
        args.extend(["netns".to_owned(), e.ns.name.clone()]);
        args
    };
    let mut argv: Vec<String> = ["ip", "link", "add"].map(str::to_owned).to_vec();
    argv.extend(end(a));
    argv.extend(["type", "veth", "peer", "name"].map(str::to_owned));
    argv.extend(end(b));
    try_sh(&argv.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(())
}

/// Two namespaces joined by a veth pair, with IPv4 and IPv6 addresses, offloads off (so
/// that one packet on the wire is one segment for the kernel's counters too).
pub struct Link {
    pub client: NetNs,
    pub server: NetNs,
    pub client_if: String,
    pub server_if: String,
    /// Last octet / group, so several links can coexist: 10.<net>.0.1 and fd00:<net>::1.
    pub net: u8,
}

impl Link {
    pub const CLIENT_V4: &'static str = "1";

    /// Creates both namespaces and the wired pair.
    #[allow(
        clippy::new_without_default,
        reason = "creating namespaces and interfaces is no default value"
    )]
    pub fn new() -> Self {
        let client = NetNs::new("tsc");
        let server = NetNs::new("tss");
        let client_if = unique("vc");
        let server_if = unique("vs");
        let net = (std::process::id() % 200 + 20) as u8;
        let link = Self {
            client,
            server,
            client_if,
            server_if,
            net,
        };
        link.wire();
        link
    }

    /// Creates the veth pair with its addresses, up (again, after a test deleted it).
    pub fn wire(&self) {
        let Self {
            client,
            server,
            client_if,
            server_if,
            net,
        } = self;
        let end = |ns, iface| End {
            ns,
            iface,
            mac: None,
        };
        add_veth(&end(client, client_if), &end(server, server_if))
            .unwrap_or_else(|e| panic!("{e:#}"));
        for (ns, iface, host) in [(&client, client_if, 1), (&server, server_if, 2)] {
            ns.sh(&[
                "ip",
                "addr",
                "add",
                &format!("10.{net}.0.{host}/24"),
                "dev",
                iface,
            ]);
            ns.sh(&[
                "ip",
                "addr",
                "add",
                &format!("fd00:{net}::{host}/64"),
                "dev",
                iface,
                "nodad",
            ]);
            ns.sh(&[
                "ethtool", "-K", iface, "tso", "off", "gso", "off", "gro", "off",
            ]);
            ns.sh(&["ip", "link", "set", iface, "up"]);
        }
    }

    pub fn client_v4(&self) -> String {
        format!("10.{}.0.1", self.net)
    }
    pub fn server_v4(&self) -> String {
        format!("10.{}.0.2", self.net)
    }
    pub fn server_v6(&self) -> String {
        format!("fd00:{}::2", self.net)
    }

    /// `n` connections over IPv4 from the client to a listener of the server's on `port`: the
    /// client sends 5 bytes and the server answers 5; the client closes first (it ends in
    /// TIME-WAIT) or, with `server_first`, the server does.
    pub fn exchange(&self, port: u16, n: usize, server_first: bool) {
        let (v4, _) = self.server_addrs(port);
        let listener = self
            .server
            .enter(move || TcpListener::bind(v4).expect("listener"));
        self.exchange_on(&listener, n, server_first);
    }

    /// [`Self::exchange`] through a listener the caller bound in the server namespace (and
    /// keeps, e.g. for connections it holds open).
    pub fn exchange_on(&self, listener: &TcpListener, n: usize, server_first: bool) {
        let to = listener.local_addr().expect("listener address");
        let listener = listener.try_clone().expect("listener");
        let server = self.server.spawn(move || {
            for _ in 0..n {
                let (mut s, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).expect("request");
                s.write_all(b"world").expect("reply");
                if server_first {
                    s.shutdown(Shutdown::Write).expect("server FIN");
                }
                // Wait for the peer's FIN (EOF) before closing our side (client first), or
                // for its FIN after ours (server first): either way the close order is fixed.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).expect("EOF");
            }
        });
        self.client.enter(move || {
            for _ in 0..n {
                let mut c = TcpStream::connect(to).expect("connect");
                c.write_all(b"hello").expect("request");
                let mut buf = [0u8; 5];
                c.read_exact(&mut buf).expect("reply");
                if server_first {
                    let mut rest = Vec::new();
                    c.read_to_end(&mut rest).expect("server FIN");
                }
                c.shutdown(Shutdown::Both).expect("client FIN");
            }
        });
        server.join().expect("server");
    }

    /// The server's IPv4 and IPv6 socket addresses on `port`.
    pub fn server_addrs(&self, port: u16) -> (SocketAddr, SocketAddr) {
        let v4 = format!("{}:{port}", self.server_v4())
            .parse()
            .expect("IPv4 address");
        let v6 = format!("[{}]:{port}", self.server_v6())
            .parse()
            .expect("IPv6 address");
        (v4, v6)
    }
}

/// Sets SO_LINGER to 0 on `s`: closing it then sends a RST (an abort) instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and an option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}
