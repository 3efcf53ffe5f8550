//! `--web.config.file`: the Prometheus exporter-toolkit web configuration (TLS, client
//! certificates, basic auth, extra response headers), read at start and on SIGHUP.
//!
//! The format is exporter-toolkit's (`docs/web-configuration.md`), strict as it is: an unknown
//! key is an error. What this server does not implement is refused with an error naming it,
//! never ignored: TLS 1.0 and 1.1 (rustls speaks 1.2 and 1.3), the client-auth policies that
//! accept a certificate without verifying it, `cipher_suites`, `curve_preferences`,
//! `client_allowed_sans`, `rate_limit` and HTTP/2. Relative file names are relative to the
//! configuration file's directory. An empty file is valid (plain HTTP, no auth), and so is a
//! file with only `basic_auth_users`.
//!
//! Basic auth (every path, as exporter-toolkit): a successful bcrypt check is remembered per
//! user as a keyed SHA-256 of the password, so that a scrape every few seconds does not pay
//! bcrypt's cost each time; a failed check is never remembered. bcrypt runs on a blocking
//! thread, one check at a time, and an unknown user costs a bcrypt check too, against the
//! configured hash of the highest cost, so that timing does not tell which users exist (when
//! all hashes have the same cost).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    http_server_config: Option<HttpFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// Known to exporter-toolkit, not implemented: refused.
    rate_limit: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "tls_server_config")]
struct TlsFile {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    prefer_server_cipher_suites: Option<bool>,
    /// Known to exporter-toolkit, not implemented: refused when not empty.
    cipher_suites: Option<Vec<String>>,
    curve_preferences: Option<Vec<String>>,
    client_allowed_sans: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "http_server_config")]
struct HttpFile {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers exporter-toolkit lets a file set, with their allowed values (none
/// listed: any value).
const EXTRA_HEADERS: &[(&str, &[&str])] = &[
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
    ("Content-Security-Policy", &[]),
];

/// Who may present a client certificate, and how it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate asked for.
    None,
    /// A certificate signed by the client CA is required.
    Require,
    /// A certificate is asked for; one that is given must be signed by the client CA.
    VerifyIfGiven,
}

/// The server's security settings.
#[derive(Default)]
pub struct WebConfig {
    /// TLS, when the file configures it.
    pub tls: Option<Arc<ServerConfig>>,
    /// The client-certificate policy of `tls`.
    pub client_auth: Option<ClientAuth>,
    /// Basic auth, when the file lists users.
    pub auth: Option<BasicAuth>,
    /// Headers added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl WebConfig {
    /// Reads and checks `path` (certificates, keys and hashes included). The error is one
    /// line that names the file and the problem.
    pub fn load(path: &Path) -> Result<Self> {
        Self::try_load(path).map_err(|e| {
            anyhow!(
                "--web.config.file {}: {}",
                path.display(),
                format!("{e:#}").replace('\n', " ")
            )
        })
    }

    fn try_load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).context("cannot read it")?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir)
    }

    /// Parses a file's text; relative file names are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let file: File = match serde_yaml_ng::from_str(text) {
            Ok(f) => f,
            // An empty document (nothing, or only comments) configures nothing.
            Err(e) => match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
                Ok(serde_yaml_ng::Value::Null) => File::default(),
                _ => return Err(anyhow!("{e}")),
            },
        };
        ensure!(
            file.rate_limit.is_none(),
            "rate_limit is not supported (the server has its own per-client connection limits)"
        );
        let (tls, client_auth) = match file.tls_server_config {
            Some(t) => match tls_config(t, dir)? {
                Some((config, auth)) => (Some(config), Some(auth)),
                None => (None, None),
            },
            None => (None, None),
        };
        let headers = match file.http_server_config {
            Some(h) => http_config(h)?,
            None => Vec::new(),
        };
        let auth = match file.basic_auth_users {
            Some(users) if !users.is_empty() => Some(BasicAuth::new(users)?),
            _ => None,
        };
        Ok(Self {
            tls,
            client_auth,
            auth,
            headers,
        })
    }

    /// One line for the log: what the server enforces.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.client_auth {
            None => parts.push("no TLS".to_owned()),
            Some(ClientAuth::None) => parts.push("TLS".to_owned()),
            Some(ClientAuth::Require) => parts.push("TLS, client certificate required".to_owned()),
            Some(ClientAuth::VerifyIfGiven) => {
                parts.push("TLS, client certificate verified if given".to_owned());
            }
        }
        match &self.auth {
            Some(a) => {
                let n = a.users.len();
                parts.push(format!(
                    "basic auth, {n} user{}",
                    if n == 1 { "" } else { "s" }
                ));
            }
            None => parts.push("no auth".to_owned()),
        }
        parts.join(", ")
    }
}

/// A YAML string that Go reads as unset when empty.
fn set<T: AsRef<std::ffi::OsStr>>(v: Option<T>) -> Option<T> {
    v.filter(|s| !s.as_ref().is_empty())
}

fn tls_version(
    key: &str,
    v: Option<String>,
) -> Result<Option<&'static rustls::SupportedProtocolVersion>> {
    Ok(match set(v).as_deref() {
        None => None,
        Some("TLS12") => Some(&TLS12),
        Some("TLS13") => Some(&TLS13),
        Some(v @ ("TLS10" | "TLS11")) => {
            bail!("tls_server_config.{key}: {v} is not supported: TLS12 and TLS13 only")
        }
        Some(v) => bail!("tls_server_config.{key}: unknown TLS version {v:?} (TLS12 or TLS13)"),
    })
}

fn tls_config(t: TlsFile, dir: &Path) -> Result<Option<(Arc<ServerConfig>, ClientAuth)>> {
    for (key, list) in [
        ("cipher_suites", &t.cipher_suites),
        ("curve_preferences", &t.curve_preferences),
        ("client_allowed_sans", &t.client_allowed_sans),
    ] {
        ensure!(
            list.as_ref().is_none_or(Vec::is_empty),
            "tls_server_config.{key} is not supported (rustls' defaults apply)"
        );
    }
    let min = tls_version("min_version", t.min_version)?;
    let max = tls_version("max_version", t.max_version)?;
    let (cert, key, ca, auth_type) = (
        set(t.cert),
        set(t.key),
        set(t.client_ca),
        set(t.client_auth_type),
    );
    let (cert_file, key_file, ca_file) = (
        set(t.cert_file).map(|p| dir.join(p)),
        set(t.key_file).map(|p| dir.join(p)),
        set(t.client_ca_file).map(|p| dir.join(p)),
    );
    let enabled = cert.is_some()
        || key.is_some()
        || ca.is_some()
        || auth_type.is_some()
        || cert_file.is_some()
        || key_file.is_some()
        || ca_file.is_some();
    if !enabled {
        ensure!(
            min.is_none() && max.is_none() && t.prefer_server_cipher_suites.is_none(),
            "tls_server_config sets TLS options but no certificate (cert_file and key_file)"
        );
        return Ok(None);
    }
    ensure!(
        cert.is_none() || cert_file.is_none(),
        "tls_server_config: cert and cert_file are both set"
    );
    ensure!(
        key.is_none() || key_file.is_none(),
        "tls_server_config: key and key_file are both set"
    );
    ensure!(
        ca.is_none() || ca_file.is_none(),
        "tls_server_config: client_ca and client_ca_file are both set"
    );
    let client_auth = match auth_type.as_deref() {
        None | Some("NoClientCert") => ClientAuth::None,
        Some("RequireAndVerifyClientCert") => ClientAuth::Require,
        Some("VerifyClientCertIfGiven") => ClientAuth::VerifyIfGiven,
        Some(v @ ("RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert")) => bail!(
            "tls_server_config.client_auth_type {v} is not supported: it accepts certificates \
             without verifying them (use RequireAndVerifyClientCert or VerifyClientCertIfGiven)"
        ),
        Some(v) => bail!(
            "tls_server_config.client_auth_type: invalid value {v:?} (NoClientCert, \
             VerifyClientCertIfGiven or RequireAndVerifyClientCert)"
        ),
    };
    let (chain, what): (Result<Vec<CertificateDer<'static>>, _>, String) = match (&cert, &cert_file)
    {
        (Some(text), _) => (
            CertificateDer::pem_slice_iter(text.as_bytes()).collect(),
            "tls_server_config.cert".to_owned(),
        ),
        (None, Some(file)) => (
            CertificateDer::pem_file_iter(file).and_then(Iterator::collect),
            format!("tls_server_config.cert_file {}", file.display()),
        ),
        (None, None) => bail!("tls_server_config: missing one of cert or cert_file"),
    };
    let chain = chain.map_err(|e| anyhow!("{what}: {}", pem_problem(&e, "certificate")))?;
    ensure!(!chain.is_empty(), "{what}: no PEM certificate in it");
    let (key, what): (Result<PrivateKeyDer<'static>, _>, String) = match (&key, &key_file) {
        (Some(text), _) => (
            PrivateKeyDer::from_pem_slice(text.as_bytes()),
            "tls_server_config.key".to_owned(),
        ),
        (None, Some(file)) => (
            PrivateKeyDer::from_pem_file(file),
            format!("tls_server_config.key_file {}", file.display()),
        ),
        (None, None) => bail!("tls_server_config: missing one of key or key_file"),
    };
    let key = key.map_err(|e| anyhow!("{what}: {}", pem_problem(&e, "private key")))?;
    let roots = match (&ca, &ca_file) {
        (Some(text), _) => Some(roots(
            CertificateDer::pem_slice_iter(text.as_bytes()).collect::<Result<_, _>>(),
            "tls_server_config.client_ca",
        )?),
        (None, Some(file)) => Some(roots(
            CertificateDer::pem_file_iter(file).and_then(Iterator::collect),
            &format!("tls_server_config.client_ca_file {}", file.display()),
        )?),
        (None, None) => None,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match (client_auth, roots) {
        (ClientAuth::None, None) => None,
        (ClientAuth::None, Some(_)) => bail!(
            "tls_server_config: a client CA is configured without a client_auth_type \
             (RequireAndVerifyClientCert or VerifyClientCertIfGiven)"
        ),
        (_, None) => bail!(
            "tls_server_config.client_auth_type {} needs client_ca_file (or client_ca)",
            auth_type.as_deref().unwrap_or_default()
        ),
        (auth, Some(roots)) => {
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let builder = if auth == ClientAuth::VerifyIfGiven {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            Some(
                builder
                    .build()
                    .context("tls_server_config: the client CA")?,
            )
        }
    };
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [&TLS12, &TLS13]
        .into_iter()
        .filter(|v| {
            let rank = |v: &rustls::SupportedProtocolVersion| u16::from(v.version);
            min.is_none_or(|m| rank(v) >= rank(m)) && max.is_none_or(|m| rank(v) <= rank(m))
        })
        .collect();
    ensure!(
        !versions.is_empty(),
        "tls_server_config: min_version is above max_version"
    );
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .context("tls_server_config: TLS versions")?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("tls_server_config: the certificate and key")?;
    config.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some((Arc::new(config), client_auth)))
}

/// A PEM reading error in words ("no items found" says which items).
fn pem_problem(e: &rustls::pki_types::pem::Error, item: &str) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!("no PEM {item} in it"),
        e => e.to_string(),
    }
}

fn roots(
    certs: Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error>,
    what: &str,
) -> Result<RootCertStore> {
    let certs = certs.map_err(|e| anyhow!("{what}: {}", pem_problem(&e, "certificate")))?;
    ensure!(!certs.is_empty(), "{what}: no PEM certificate in it");
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .with_context(|| format!("{what}: not a CA certificate"))?;
    }
    Ok(store)
}

fn http_config(h: HttpFile) -> Result<Vec<(HeaderName, HeaderValue)>> {
    ensure!(
        h.http2 != Some(true),
        "http_server_config.http2: true is not supported: the server speaks HTTP/1.1 \
         (set it to false or leave it out)"
    );
    let mut out = Vec::new();
    for (name, value) in h.headers.unwrap_or_default() {
        let Some((_, allowed)) = EXTRA_HEADERS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = EXTRA_HEADERS.iter().map(|(n, _)| *n).collect();
            bail!(
                "http_server_config.headers: {name:?} can not be configured (one of {})",
                names.join(", ")
            );
        };
        ensure!(
            allowed.is_empty() || allowed.contains(&value.as_str()),
            "http_server_config.headers.{name}: {value:?} is not one of {allowed:?}"
        );
        if value.is_empty() {
            continue;
        }
        let header_value = HeaderValue::from_str(&value)
            .map_err(|_| anyhow!("http_server_config.headers.{name}: invalid value {value:?}"))?;
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow!("http_server_config.headers: invalid name {name:?}"))?;
        out.push((header_name, header_value));
    }
    Ok(out)
}

/// A bcrypt hash of "fakepassword", checked when there is no user's hash to stand in for an
/// unknown user (never: basic auth always has users).
const DUMMY_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// The hash an unknown user's password is checked against, so that an unknown user costs what
/// a known one does: the configured hash of the highest cost (`$2y$COST$…`).
fn stand_in_hash(users: &BTreeMap<String, String>) -> String {
    let cost = |h: &String| h.get(4..6).and_then(|c| c.parse::<u32>().ok()).unwrap_or(0);
    users
        .values()
        .max_by_key(|h| cost(h))
        .cloned()
        .unwrap_or_else(|| DUMMY_HASH.to_owned())
}

/// Basic-auth users and their bcrypt hashes, with the cache of successful checks.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// Per user: the keyed digest of the last password that passed its bcrypt check.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// The digest's key, random per process.
    key: [u8; 32],
    /// One bcrypt check at a time (it is CPU-bound on purpose).
    bcrypt: tokio::sync::Mutex<()>,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<Self> {
        for (user, hash) in &users {
            ensure!(
                !user.contains(':'),
                "basic_auth_users: user name {user:?} contains ':'"
            );
            check_hash(hash).map_err(|e| anyhow!("basic_auth_users.{user}: {e}"))?;
        }
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| anyhow!("no randomness for the password cache key"))?;
        Ok(Self {
            users,
            verified: Mutex::new(HashMap::new()),
            key,
            bcrypt: tokio::sync::Mutex::new(()),
        })
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.key);
        ctx.update(&(user.len() as u64).to_le_bytes());
        ctx.update(user.as_bytes());
        ctx.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Whether an `Authorization` header names a user with the right password.
    pub async fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let hash = self.users.get(&user);
        let digest = self.digest(&user, &password);
        if hash.is_some() {
            let verified = self
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if verified.get(&user).is_some_and(|d| same(d, &digest)) {
                return true;
            }
        }
        let checked = {
            let _one_at_a_time = self.bcrypt.lock().await;
            let hash = hash.cloned().unwrap_or_else(|| stand_in_hash(&self.users));
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
        };
        let ok = checked && hash.is_some();
        if ok {
            self.verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(user, digest);
        }
        ok
    }
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Basic base64(user:password)` → user and password.
fn parse_basic(value: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = raw.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(raw[..colon].to_vec()).ok()?;
    Some((user, raw[colon + 1..].to_vec()))
}

/// A well-formed bcrypt hash (`$2a$`, `$2b$`, `$2x$` or `$2y$`, cost 4 to 31, 53 characters
/// of salt and hash in bcrypt's base64).
fn check_hash(hash: &str) -> Result<()> {
    let parts: bcrypt::HashParts = hash
        .parse()
        .map_err(|e| anyhow!("not a bcrypt hash ({e})"))?;
    ensure!(
        (4..=31).contains(&parts.get_cost()),
        "not a bcrypt hash (cost {} is not 4 to 31)",
        parts.get_cost()
    );
    let tail = hash.rsplit('$').next().unwrap_or_default();
    ensure!(
        tail.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/'),
        "not a bcrypt hash (a character outside bcrypt's base64)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig> {
        WebConfig::parse(text, Path::new("/nonexistent"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn empty_and_comment_only_files_configure_nothing() {
        for text in ["", "\n", "# nothing here\n", "---\n"] {
            let c = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e:#}"));
            assert!(c.tls.is_none() && c.auth.is_none() && c.headers.is_empty());
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(err("nope: 1\n").contains("unknown field `nope`"));
        assert!(err("tls_server_config:\n  certfile: x\n").contains("unknown field `certfile`"));
        assert!(err("http_server_config:\n  header: {}\n").contains("unknown field `header`"));
    }

    #[test]
    fn users_only_is_plain_http_with_auth() {
        let hash = bcrypt::hash("secret", 4).expect("hash");
        let c = parse(&format!("basic_auth_users:\n  alice: '{hash}'\n")).expect("valid");
        assert!(c.tls.is_none());
        assert_eq!(c.auth.expect("auth").users.len(), 1);
    }

    #[test]
    fn malformed_hashes_are_errors() {
        for bad in [
            "secret",
            "$2y$10$short",
            "$3y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi",
            "$2y$99$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi",
            "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeS!",
        ] {
            let e = err(&format!("basic_auth_users:\n  bob: '{bad}'\n"));
            assert!(
                e.contains("basic_auth_users.bob") && e.contains("not a bcrypt hash"),
                "{bad}: {e}"
            );
        }
        assert!(err("basic_auth_users:\n  'a:b': x\n").contains("contains ':'"));
    }

    #[test]
    fn unsupported_options_are_named() {
        for (text, needle) in [
            ("rate_limit:\n  burst: 1\n", "rate_limit is not supported"),
            (
                "http_server_config:\n  http2: true\n",
                "http2: true is not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [X]\n",
                "cipher_suites is not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n",
                "TLS10 is not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  max_version: TLS14\n",
                "unknown TLS version",
            ),
            (
                "tls_server_config:\n  min_version: TLS13\n",
                "no certificate",
            ),
            (
                "http_server_config:\n  headers:\n    X-Powered-By: me\n",
                "\"X-Powered-By\" can not be configured",
            ),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "X-Frame-Options: \"allow\" is not one of",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn http2_false_and_headers_are_accepted() {
        let c = parse(
            "http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    \
             Content-Security-Policy: \"default-src 'none'\"\n    X-XSS-Protection: ''\n",
        )
        .expect("valid");
        let names: Vec<&str> = c.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-security-policy", "x-frame-options"]);
    }

    #[test]
    fn missing_files_name_the_key_and_the_file() {
        let e = err("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n");
        assert!(
            e.contains("tls_server_config.cert_file /nonexistent/cert.pem"),
            "relative to the file's directory: {e}"
        );
        assert!(err("tls_server_config:\n  key_file: key.pem\n").contains("missing one of cert"));
        // Inline PEM text that holds no key, or no certificate.
        let e = err("tls_server_config:\n  cert: 'junk'\n  key: 'junk'\n");
        assert!(
            e.contains("tls_server_config.cert: no PEM certificate in it"),
            "{e}"
        );
    }

    #[test]
    fn basic_header_parsing() {
        let v = HeaderValue::from_static("Basic YWxpY2U6czNjcjp0"); // alice:s3cr:t
        assert_eq!(
            parse_basic(&v),
            Some(("alice".to_owned(), b"s3cr:t".to_vec()))
        );
        assert_eq!(parse_basic(&HeaderValue::from_static("Bearer abc")), None);
        assert_eq!(parse_basic(&HeaderValue::from_static("Basic !!!")), None);
        assert_eq!(
            parse_basic(&HeaderValue::from_static("Basic YWxpY2U=")),
            None
        );
    }

    #[tokio::test]
    async fn right_passwords_pass_and_are_cached_wrong_ones_never() {
        let hash = bcrypt::hash("secret", 4).expect("hash");
        let auth = BasicAuth::new(BTreeMap::from([("alice".to_owned(), hash)])).expect("auth");
        let header = |user: &str, pass: &str| {
            let raw = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            HeaderValue::from_str(&format!("Basic {raw}")).expect("header")
        };
        assert!(!auth.allows(None).await);
        assert!(!auth.allows(Some(&header("alice", "wrong"))).await);
        assert!(!auth.allows(Some(&header("alice", "wrong"))).await);
        assert!(auth.verified.lock().expect("lock").is_empty());
        assert!(!auth.allows(Some(&header("mallory", "secret"))).await);
        assert!(auth.allows(Some(&header("alice", "secret"))).await);
        assert_eq!(auth.verified.lock().expect("lock").len(), 1);
        assert!(auth.allows(Some(&header("alice", "secret"))).await);
        // The cache holds the right password only: a wrong one is still checked, and fails.
        assert!(!auth.allows(Some(&header("alice", "secreT"))).await);
        assert!(auth.allows(Some(&header("alice", "secret"))).await);
    }
}
