//! `--web.config.file`: the metrics endpoint over TLS with basic auth and client certificates,
//! checked with curl (status codes, headers, handshakes refused) and with a real Prometheus
//! scraping over TLS; stalled TLS handshakes are cut off and evicted like idle connections;
//! bad files stop the agent at start with a one-line error.
//!
//! The certificates come from `openssl` (a CA, a server certificate for 127.0.0.1, a client
//! certificate, and a second CA with a client certificate of its own that the server must
//! refuse), the password hashes from the `bcrypt` crate.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use tcp_testbed::{
    NetNs, RemoveOnDrop,
    agent::{Agent, agent_binary},
    metrics::AGENT,
    prometheus::Prometheus,
    sh, unique,
};

const USER: &str = "prometheus";
const PASSWORD: &str = "correct horse battery staple";

/// A temporary directory with the test's certificates and keys (PEM), removed on drop.
struct Pki {
    dir: RemoveOnDrop,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("tcpscope-pki-"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let pki = Self {
            dir: RemoveOnDrop(dir),
        };
        pki.ca("ca");
        pki.ca("rogue-ca");
        pki.leaf(
            "server",
            "ca",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        pki.leaf("client", "ca", "extendedKeyUsage=clientAuth\n");
        pki.leaf("rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// `name.pem` and `name.key`, as `openssl` wants them.
    fn pem_key(&self, name: &str) -> (String, String) {
        (
            self.path(&format!("{name}.pem")).display().to_string(),
            self.path(&format!("{name}.key")).display().to_string(),
        )
    }

    /// A self-signed CA (P-256).
    fn ca(&self, name: &str) {
        let (pem, key) = self.pem_key(name);
        sh(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN=tcpscope test {name}"),
        ]);
    }

    /// A certificate signed by `ca`, with the extensions `ext`.
    fn leaf(&self, name: &str, ca: &str, ext: &str) {
        let (pem, key) = self.pem_key(name);
        let (ca_pem, ca_key) = self.pem_key(ca);
        let csr = self.path(&format!("{name}.csr")).display().to_string();
        let ext_file = self.path(&format!("{name}.ext"));
        std::fs::write(&ext_file, format!("basicConstraints=CA:FALSE\n{ext}")).expect("ext");
        sh(&[
            "openssl",
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        sh(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext_file.display().to_string(),
        ]);
    }

    /// Writes `web.yml` (or another name) into the directory; returns its path.
    fn web_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("web config");
        path
    }
}

/// A namespace with a veth pair inside (`th0` is the tracked interface).
fn namespace() -> NetNs {
    let ns = NetNs::new("twc");
    ns.sh(&[
        "ip", "link", "add", "th0", "type", "veth", "peer", "name", "th1",
    ]);
    ns.sh(&["ip", "link", "set", "th0", "up"]);
    ns
}

/// The agent on `th0`, serving on [`AGENT`] with `config`; waits until it tracks and checks
/// what it says it serves.
fn start_agent(ns: &NetNs, config: &Path, serving: &str) -> Agent {
    let mut agent = Agent::start(
        ns,
        &[
            "--iface",
            "th0",
            "--web.listen-address",
            AGENT,
            "--web.config.file",
            config.to_str().expect("utf-8 path"),
        ],
    );
    let line = agent.wait_for("serving /metrics");
    assert!(line.contains(serving), "{line}");
    agent.wait_for("tracking;");
    agent
}

/// What one curl call gave.
struct Curl {
    /// curl's exit code (0: a response came, whatever its status).
    exit: i32,
    /// The HTTP status (0 when there was no response).
    status: u16,
    /// Response headers, lower-case names.
    headers: String,
    body: String,
    stderr: String,
}

/// `curl ARGS` inside `ns` (bounded: 5 s).
fn curl(ns: &NetNs, args: &[&str]) -> Curl {
    let head = std::env::temp_dir().join(unique("tcpscope-curl-"));
    let out: Output = ns
        .command("curl")
        .args(["-sS", "--max-time", "5", "-D"])
        .arg(&head)
        .args(args)
        .output()
        .expect("curl (Debian package curl)");
    let headers = std::fs::read_to_string(&head)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let _ = std::fs::remove_file(&head);
    let status = headers
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status,
        headers,
        body: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn https(path: &str) -> String {
    format!("https://{AGENT}{path}")
}

/// A bcrypt hash of `password`, in the form htpasswd and exporter-toolkit's docs use.
fn hash(password: &str) -> String {
    bcrypt::hash(password, 10).expect("bcrypt")
}

#[test]
fn tls_and_basic_auth_through_curl_and_prometheus() {
    tcp_testbed::require_root();
    let pki = Pki::new();
    let ns = namespace();
    // Relative names: taken from the configuration file's directory.
    let config = pki.web_config(
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n\
             http_server_config:\n  headers:\n    X-Frame-Options: deny\n    \
             X-Content-Type-Options: nosniff\n\
             basic_auth_users:\n  {USER}: '{}'\n",
            hash(PASSWORD)
        ),
    );
    let mut agent = start_agent(
        &ns,
        &config,
        "https://127.0.0.1:9977 (TLS, basic auth, 1 user)",
    );
    // A TLS handshake that stalls after five bytes of a ClientHello record: it must be cut
    // off by the head timeout (5 s), not held for the connection's life (60 s).
    let stalled = ns.spawn(|| {
        let mut s = TcpStream::connect(AGENT).expect("connect");
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .expect("partial hello");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        started.elapsed()
    });
    let (ca, _) = pki.pem_key("ca");
    let creds = format!("{USER}:{PASSWORD}");

    let ok = curl(&ns, &["--cacert", &ca, "-u", &creds, &https("/metrics")]);
    assert_eq!((ok.exit, ok.status), (0, 200), "{}", ok.stderr);
    assert!(ok.body.contains("tcpscope_build_info{"), "{}", ok.body);
    assert!(
        ok.headers.contains("x-frame-options: deny"),
        "{}",
        ok.headers
    );
    assert!(
        ok.headers.contains("x-content-type-options: nosniff"),
        "{}",
        ok.headers
    );
    assert!(!ok.headers.contains("www-authenticate"), "{}", ok.headers);
    let health = curl(&ns, &["--cacert", &ca, "-u", &creds, &https("/healthz")]);
    assert_eq!(health.status, 200, "{}", health.stderr);
    let missing = curl(&ns, &["--cacert", &ca, "-u", &creds, &https("/nope")]);
    assert_eq!(missing.status, 404);

    // Every path needs the password; a wrong one, or an unknown user, is refused the same.
    for (path, user) in [
        ("/metrics", None),
        ("/healthz", None),
        ("/nope", None),
        ("/metrics", Some(format!("{USER}:wrong"))),
        ("/metrics", Some(format!("{USER}:{PASSWORD}x"))),
        ("/metrics", Some(format!("nobody:{PASSWORD}"))),
        (
            "/metrics",
            Some(format!("{}:{PASSWORD}", USER.to_uppercase())),
        ),
    ] {
        let mut args = vec!["--cacert", ca.as_str()];
        if let Some(user) = &user {
            args.extend(["-u", user]);
        }
        let url = https(path);
        args.push(&url);
        let r = curl(&ns, &args);
        assert_eq!(r.status, 401, "{path} as {user:?}: {}", r.stderr);
        assert!(
            r.headers.contains("www-authenticate: basic"),
            "{path}: {}",
            r.headers
        );
        assert!(!r.body.contains("tcpscope_"), "{path}: {}", r.body);
        assert!(r.headers.contains("x-frame-options: deny"), "{}", r.headers);
    }
    // The right password still works after the wrong ones.
    let again = curl(&ns, &["--cacert", &ca, "-u", &creds, &https("/metrics")]);
    assert_eq!(again.status, 200);

    // Plain HTTP against the TLS port gets no HTTP answer.
    let plain = curl(&ns, &["-u", &creds, &format!("http://{AGENT}/metrics")]);
    assert!(
        plain.exit != 0 && plain.status == 0,
        "plain HTTP: exit {} status {}",
        plain.exit,
        plain.status
    );
    // A client that does not trust the CA refuses the server's certificate (curl: 60).
    let untrusted = curl(&ns, &["-u", &creds, &https("/metrics")]);
    assert_eq!(untrusted.exit, 60, "{}", untrusted.stderr);
    // TLS 1.2 and 1.3 both work.
    for version in [&["--tls-max", "1.2"][..], &["--tlsv1.3"][..]] {
        let mut args = vec!["--cacert", ca.as_str(), "-u", creds.as_str()];
        args.extend(version);
        let url = https("/healthz");
        args.push(&url);
        let r = curl(&ns, &args);
        assert_eq!(r.status, 200, "{version:?}: {}", r.stderr);
    }

    let waited = stalled.join().expect("stalled client");
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
        "a stalled TLS handshake was closed after {waited:?} (head timeout: 5 s)"
    );

    // As many stalled handshakes as one address may hold (8): they count as idle, so a scrape
    // from that address still gets through, at once.
    let held = ns.spawn(|| {
        let conns: Vec<TcpStream> = (0..8)
            .map(|_| TcpStream::connect(AGENT).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        conns
    });
    let held = held.join().expect("idle handshakes");
    let started = Instant::now();
    let behind = curl(&ns, &["--cacert", &ca, "-u", &creds, &https("/metrics")]);
    assert_eq!(behind.status, 200, "{}", behind.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a scrape behind 8 stalled handshakes took {:?}",
        started.elapsed()
    );
    drop(held);

    // A real Prometheus over TLS with basic auth; a second job with a wrong password is
    // refused (up 0).
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    \
             basic_auth:\n      username: {USER}\n      password: '{password}'\n    \
             static_configs:\n      - targets: ['{AGENT}']\n"
        )
    };
    let prom = Prometheus::start_with_jobs(
        &ns,
        &(job("tcpscope", PASSWORD) + &job("wrong_password", "nope")),
    );
    prom.wait_for(
        "up{job=\"tcpscope\"}",
        |v| v == 1.0,
        Duration::from_secs(15),
    );
    prom.wait_for(
        "up{job=\"wrong_password\"}",
        |v| v == 0.0,
        Duration::from_secs(15),
    );
    let series = prom.scalar("count({job=\"tcpscope\",__name__=~\"tcpscope_.*\"})");
    assert!(
        series.is_some_and(|n| n > 10.0),
        "tcpscope series through TLS: {series:?}"
    );
    assert_eq!(
        prom.scalar("count({job=\"wrong_password\",__name__=~\"tcpscope_.*\"})"),
        None,
        "the refused job got samples"
    );
    drop(prom);

    // SIGHUP reloads the file: a new password replaces the old one at once.
    const NEW_PASSWORD: &str = "another one";
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n\
             basic_auth_users:\n  {USER}: '{}'\n",
            hash(NEW_PASSWORD)
        ),
    )
    .expect("new config");
    let sighup = |agent: &Agent| {
        // SAFETY: kill has no memory-safety preconditions; the pid is our running child's.
        let rc = unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP: {}", std::io::Error::last_os_error());
    };
    sighup(&agent);
    let line = agent.wait_for("SIGHUP:");
    assert!(
        line.contains("reloaded (TLS, basic auth, 1 user)"),
        "{line}"
    );
    let new_creds = format!("{USER}:{NEW_PASSWORD}");
    let new = curl(
        &ns,
        &["--cacert", &ca, "-u", &new_creds, &https("/metrics")],
    );
    assert_eq!(new.status, 200, "the new password: {}", new.stderr);
    assert!(
        !new.headers.contains("x-frame-options"),
        "the reloaded file sets no header: {}",
        new.headers
    );
    let old = curl(&ns, &["--cacert", &ca, "-u", &creds, &https("/metrics")]);
    assert_eq!(old.status, 401, "the old password after the reload");
    // A bad file is refused and the settings in force are kept.
    std::fs::write(&config, "basic_auth_users: {}\nnope: 1\n").expect("bad config");
    sighup(&agent);
    let line = agent.wait_for("SIGHUP:");
    assert!(
        line.contains("unknown field `nope`") && line.contains("kept"),
        "{line}"
    );
    let still = curl(
        &ns,
        &["--cacert", &ca, "-u", &new_creds, &https("/metrics")],
    );
    assert_eq!(still.status, 200, "{}", still.stderr);
    let no_auth = curl(&ns, &["--cacert", &ca, &https("/metrics")]);
    assert_eq!(
        no_auth.status, 401,
        "the bad file's empty user list was not applied"
    );
    agent.stop();
}

#[test]
fn client_certificates_required_and_verified() {
    tcp_testbed::require_root();
    let pki = Pki::new();
    let ns = namespace();
    let (ca, _) = pki.pem_key("ca");
    let (client, client_key) = pki.pem_key("client");
    let (rogue, rogue_key) = pki.pem_key("rogue-client");
    let creds = format!("{USER}:{PASSWORD}");
    let cert_args = |cert: &str, key: &str| -> Vec<String> {
        vec![
            "--cacert".into(),
            ca.clone(),
            "--cert".into(),
            cert.into(),
            "--key".into(),
            key.into(),
        ]
    };
    let run = |args: Vec<String>, path: &str| {
        let mut args = args;
        args.extend(["-u".into(), creds.clone(), https(path)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&ns, &args)
    };
    let no_cert = || vec!["--cacert".to_owned(), ca.clone()];

    // Required: no certificate, or one from another CA, and the handshake fails.
    let config = pki.web_config(
        "web-require.yml",
        &format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n\
             basic_auth_users:\n  {USER}: '{}'\n",
            hash(PASSWORD)
        ),
    );
    let agent = start_agent(
        &ns,
        &config,
        "https://127.0.0.1:9977 (TLS, client certificate required, basic auth, 1 user)",
    );
    let with = run(cert_args(&client, &client_key), "/metrics");
    assert_eq!((with.exit, with.status), (0, 200), "{}", with.stderr);
    assert!(with.body.contains("tcpscope_build_info{"));
    let without = run(no_cert(), "/metrics");
    assert!(
        without.exit != 0 && without.status == 0,
        "no client certificate: exit {} status {}: {}",
        without.exit,
        without.status,
        without.stderr
    );
    let rogue_cert = run(cert_args(&rogue, &rogue_key), "/metrics");
    assert!(
        rogue_cert.exit != 0 && rogue_cert.status == 0,
        "a certificate of another CA: exit {} status {}: {}",
        rogue_cert.exit,
        rogue_cert.status,
        rogue_cert.stderr
    );
    // The certificate does not replace the password.
    let mut no_password = cert_args(&client, &client_key);
    no_password.push(https("/metrics"));
    let args: Vec<&str> = no_password.iter().map(String::as_str).collect();
    assert_eq!(curl(&ns, &args).status, 401);

    // Prometheus with the client certificate scrapes; without it, it cannot.
    let job = |name: &str, cert: bool| {
        let cert = if cert {
            format!("\n      cert_file: {client}\n      key_file: {client_key}")
        } else {
            String::new()
        };
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      \
             ca_file: {ca}{cert}\n    basic_auth:\n      username: {USER}\n      \
             password: '{PASSWORD}'\n    static_configs:\n      - targets: ['{AGENT}']\n"
        )
    };
    let prom = Prometheus::start_with_jobs(&ns, &(job("tcpscope", true) + &job("no_cert", false)));
    prom.wait_for(
        "up{job=\"tcpscope\"}",
        |v| v == 1.0,
        Duration::from_secs(15),
    );
    prom.wait_for("up{job=\"no_cert\"}", |v| v == 0.0, Duration::from_secs(15));
    let series = prom.scalar("count({job=\"tcpscope\",__name__=~\"tcpscope_.*\"})");
    assert!(
        series.is_some_and(|n| n > 10.0),
        "tcpscope series through mutual TLS: {series:?}"
    );
    drop(prom);
    agent.stop();

    // Verified if given: none is fine, a good one is fine, a bad one fails the handshake.
    let config = pki.web_config(
        "web-if-given.yml",
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
         client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.pem\n",
    );
    let _agent = start_agent(
        &ns,
        &config,
        "(TLS, client certificate verified if given, no auth)",
    );
    assert_eq!(run(no_cert(), "/healthz").status, 200);
    assert_eq!(run(cert_args(&client, &client_key), "/healthz").status, 200);
    let bad = run(cert_args(&rogue, &rogue_key), "/healthz");
    assert!(
        bad.exit != 0 && bad.status == 0,
        "a certificate of another CA: exit {} status {}",
        bad.exit,
        bad.status
    );
}

#[test]
fn bad_configs_stop_the_agent_with_one_line() {
    tcp_testbed::require_root();
    let pki = Pki::new();
    let ns = namespace();
    let good_hash = hash(PASSWORD);
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "missing-cert.yml",
            "tls_server_config:\n  cert_file: nothere.pem\n  key_file: server.key\n".into(),
            &["tls_server_config.cert_file", "nothere.pem", "No such file"],
        ),
        (
            "bad-hash.yml",
            format!("basic_auth_users:\n  {USER}: '{PASSWORD}'\n"),
            &["basic_auth_users.prometheus", "not a bcrypt hash"],
        ),
        (
            "truncated-hash.yml",
            format!("basic_auth_users:\n  {USER}: '{}'\n", &good_hash[..50]),
            &["basic_auth_users.prometheus", "not a bcrypt hash"],
        ),
        (
            "unknown-key.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             listen: 1\n"
                .into(),
            &["unknown field `listen`"],
        ),
        (
            "unknown-top-key.yml",
            "basic_auth_user:\n  a: b\n".into(),
            &["unknown field `basic_auth_user`"],
        ),
        (
            "any-client-cert.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.pem\n"
                .into(),
            &["client_auth_type RequireAnyClientCert is not supported"],
        ),
        (
            "invalid-client-auth.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             client_auth_type: Always\n"
                .into(),
            &["client_auth_type: invalid value \"Always\""],
        ),
        (
            "no-client-ca.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n"
                .into(),
            &["needs client_ca_file"],
        ),
        (
            "key-is-a-cert.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: ca.pem\n".into(),
            &[
                "tls_server_config.key_file",
                "ca.pem: no PEM private key in it",
            ],
        ),
        (
            "key-mismatch.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: client.key\n".into(),
            &["the certificate and key"],
        ),
        (
            "tls10.yml",
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             min_version: TLS10\n"
                .into(),
            &["min_version: TLS10 is not supported"],
        ),
        (
            "not-yaml.yml",
            "tls_server_config: [\n".into(),
            &["tls_server_config"],
        ),
    ];
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("tcpscope-test-")));
    let start = |config: &Path, extra: &[&str]| -> Output {
        ns.command(agent_binary())
            .args(["run", "--iface", "th0", "--pin-dir"])
            .arg(&pin_dir)
            .arg("--web.config.file")
            .arg(config)
            .args(extra)
            .output()
            .expect("tcpscope")
    };
    let check = |what: &str, out: &Output, needles: &[&str], file: &Path| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit 0");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: {stderr}");
        assert!(
            lines[0].starts_with("error: --web.config.file"),
            "{what}: {stderr}"
        );
        assert!(
            lines[0].contains(&file.display().to_string()),
            "{what} names the file: {stderr}"
        );
        for needle in needles {
            assert!(lines[0].contains(needle), "{what}: {needle:?} in {stderr}");
        }
        assert!(!pin_dir.exists(), "{what}: the agent got as far as pinning");
    };
    for (name, text, needles) in &cases {
        let file = pki.web_config(name, text);
        check(name, &start(&file, &[]), needles, &file);
    }
    let absent = pki.path("absent.yml");
    check(
        "absent file",
        &start(&absent, &[]),
        &["cannot read it"],
        &absent,
    );
    // A valid file without a server to apply it to.
    let valid = pki.web_config("valid.yml", "");
    let out = start(&valid, &["--listen", "off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--listen is off"), "{stderr}");
    let _ = std::fs::remove_dir_all(&pin_dir);
}
