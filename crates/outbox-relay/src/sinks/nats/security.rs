//! TLS and authentication for the NATS sink: the TLS client configuration built from the
//! `tls.*` keys, the one authentication method the keys (or the URL) select, with its secret
//! read from its file at start, and the diagnosis of a connection that fails, in words that
//! name the key to fix. No publishing, no retry policy here.
//!
//! The TLS configuration is built here, with the ring provider named explicitly, rather than by
//! async-nats from file paths: async-nats would take the process-wide default provider, which
//! does not exist (and panics) when another crate in the build enables a second one; and the
//! same configuration serves the diagnosis below, so that it judges the server exactly as the
//! connection does.
//!
//! Why a diagnosis: async-nats reports a failed connection attempt with its error kind only
//! ("IO error", "TLS error"), not with the cause (an unknown CA, an expired or mismatched
//! certificate, a refused client certificate, a server without TLS). When an attempt fails for
//! another reason than refused credentials, [`Probe::diagnose`] opens a connection of its own,
//! reads the server's greeting (`INFO`, which says whether it requires TLS and client
//! certificates) and runs the TLS handshake with the sink's configuration; it sends nothing to
//! the server beyond the handshake (no `CONNECT`, so no credentials and no authorization
//! errors in the server's log).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use async_nats::rustls::{self, AlertDescription, CertificateError, ClientConfig, RootCertStore};
use async_nats::ConnectOptions;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::config::{NatsConfig, NatsTlsConfig};
use crate::redact::{world_readable_mode, Secret, SecretFileError};

/// The port of a URL without one (NATS's default).
const DEFAULT_PORT: u16 = 4222;

/// The rustls configuration for the sink's connections, from `tls.*`: trusted CAs from
/// `ca_file` (only those), else the system's; the client certificate when set. Errors name the
/// key (below `sinks.<name>.`) and say what to fix.
pub(super) fn tls_client_config(tls: &NatsTlsConfig) -> Result<Arc<ClientConfig>, String> {
    let roots = match &tls.ca_file {
        Some(path) => ca_roots(path)?,
        None => system_roots(),
    };
    client_config(tls, roots)
}

/// Checks the `tls.*` files as [`tls_client_config`] reads them, without loading the system's
/// CAs (for the configuration check at load).
pub(super) fn check_tls_files(tls: &NatsTlsConfig) -> Result<(), String> {
    let roots = match &tls.ca_file {
        Some(path) => ca_roots(path)?,
        None => RootCertStore::empty(),
    };
    client_config(tls, roots).map(drop)
}

fn client_config(tls: &NatsTlsConfig, roots: RootCertStore) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: cannot set up TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(
                "tls.cert_file is set without tls.key_file: set both (the client certificate and its private key) or neither".into(),
            )
        }
        (None, Some(_)) => {
            return Err(
                "tls.key_file is set without tls.cert_file: set both (the client certificate and its private key) or neither".into(),
            )
        }
        (Some(cert), Some(key)) => {
            let certs = pem_certificates("tls.cert_file", cert, "the client certificate")?;
            let bytes = read_file("tls.key_file", key)?;
            let private = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                format!(
                    "tls.key_file: {} holds no PEM private key ({e}): point it at the client certificate's key",
                    key.display()
                )
            })?;
            builder.with_client_auth_cert(certs, private).map_err(|e| {
                format!(
                    "tls.cert_file and tls.key_file: {} and {} are not a certificate and its key ({e}): use the key the certificate was issued for",
                    cert.display(),
                    key.display()
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certificates(
        "tls.ca_file",
        path,
        "the CA certificate that signs the server's",
    )? {
        roots.add(cert).map_err(|e| {
            format!(
                "tls.ca_file: {} holds a certificate that cannot be a trust anchor ({e}): point it at the CA's certificate",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The operating system's CAs; a store that cannot be read leaves them out (the connection
/// then fails with an unknown issuer, which the diagnosis explains).
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "cannot read part of the system's CA store");
    }
    roots.add_parsable_certificates(found.certs);
    roots
}

fn pem_certificates(
    key: &str,
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{key}: {} is not a PEM certificate file ({e}): point it at {what}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----): point it at {what}",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| unreadable(key, path, e))
}

fn unreadable(key: &str, path: &Path, e: io::Error) -> String {
    format!(
        "{key}: cannot read {} ({e}): mount the file there and make it readable by the relay's user, or unset {key}",
        path.display()
    )
}

/// A secret from its file: the contents without one trailing newline; never empty.
fn read_secret(key: &str, path: &Path) -> Result<Secret, String> {
    crate::redact::read_secret_file(path).map_err(|e| match e {
        SecretFileError::Unreadable(e) if e.kind() == io::ErrorKind::InvalidData => format!(
            "{key}: {} is not UTF-8 text: write the secret into it as text",
            path.display()
        ),
        SecretFileError::Unreadable(e) => unreadable(key, path, e),
        SecretFileError::Empty => format!(
            "{key}: {} is empty: write the secret into it",
            path.display()
        ),
    })
}

/// The TLS settings for the start-up log.
pub(super) fn describe_tls(config: &NatsConfig) -> String {
    let tls = &config.tls;
    let mut out = if requires_tls(&config.url, tls) {
        "required".to_string()
    } else {
        "when the server requires it".to_string()
    };
    match &tls.ca_file {
        Some(ca) => out.push_str(&format!(", CA {}", ca.display())),
        None => out.push_str(", the system's CAs"),
    }
    if let Some(cert) = &tls.cert_file {
        out.push_str(&format!(", client certificate {}", cert.display()));
    }
    out
}

/// Warnings about secrets at risk: a password or token sent over a connection that does not
/// require TLS to another machine, and secret files every local user may read.
pub(super) fn warn_about_exposure(name: &str, config: &NatsConfig, auth: &Auth) {
    let host = url::Url::parse(&config.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if auth.sends_secret() && !loopback && !requires_tls(&config.url, &config.tls) {
        tracing::warn!(
            sink = name,
            "the sink's password or token is sent in clear text unless the server requires \
             TLS: set sinks.{name}.tls.required = true (or a tls:// url, or tls.ca_file)"
        );
    }
    let files = [
        ("password_file", &config.password_file),
        ("token_file", &config.token_file),
        ("nkey_seed_file", &config.nkey_seed_file),
        ("credentials_file", &config.credentials_file),
        ("tls.key_file", &config.tls.key_file),
    ];
    for (key, path) in files {
        if let Some(path) = path.as_ref().filter(|p| world_readable_mode(p).is_some()) {
            tracing::warn!(
                sink = name,
                "sinks.{name}.{key} names {}, which every user of this machine may read: \
                 chmod o-r it (a Kubernetes secret volume: defaultMode 0400 or 0440)",
                path.display()
            );
        }
    }
}

/// The one authentication method of a sink.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Auth {
    None,
    /// `nats://user:password@host`.
    UrlUserPassword {
        user: String,
        password: Secret,
    },
    /// `nats://token@host`: NATS reads a user name without a password as a token.
    UrlToken(Secret),
    /// `user` with `password` (`from = "password"`) or `password_file`.
    UserPassword {
        user: String,
        password: Secret,
        from: &'static str,
    },
    /// `token` or `token_file` (`from`).
    Token {
        token: Secret,
        from: &'static str,
    },
    /// `nkey_seed_file`: the seed, and its public key (what the server lists).
    NKey {
        seed: Secret,
        public: String,
    },
    /// `credentials_file`: its contents (a user JWT and the seed that signs with it).
    Credentials {
        path: PathBuf,
        contents: Secret,
    },
}

impl Auth {
    /// The method the configuration selects, its secret read from its file. More than one
    /// method, or half of one, is an error naming the keys.
    pub fn from_config(c: &NatsConfig) -> Result<Self, String> {
        let (_, in_url) = split_credentials(&c.url);
        let mut methods: Vec<&str> = Vec::new();
        if in_url != Auth::None {
            methods.push("credentials in url");
        }
        if c.user.is_some() || !c.password.is_empty() || c.password_file.is_some() {
            methods.push("user/password");
        }
        if !c.token.is_empty() || c.token_file.is_some() {
            methods.push("token/token_file");
        }
        if c.nkey_seed_file.is_some() {
            methods.push("nkey_seed_file");
        }
        if c.credentials_file.is_some() {
            methods.push("credentials_file");
        }
        if methods.len() > 1 {
            return Err(format!(
                "url, user, password, token, nkey_seed_file, credentials_file: more than one way to authenticate is set ({}): keep one",
                methods.join(", ")
            ));
        }
        if !in_url.eq(&Auth::None) {
            return Ok(in_url);
        }
        if c.user.is_some() || !c.password.is_empty() || c.password_file.is_some() {
            let user = match c.user.as_deref() {
                Some(u) if !u.is_empty() => u.to_owned(),
                _ => {
                    return Err(
                        "user: a password is set but no user: set user to the NATS user the password belongs to"
                            .into(),
                    )
                }
            };
            let (password, from) = match (&c.password_file, c.password.is_empty()) {
                (Some(_), false) => {
                    return Err("password and password_file are both set: keep one".into())
                }
                (Some(path), true) => (read_secret("password_file", path)?, "password_file"),
                (None, false) => (c.password.clone(), "password"),
                (None, true) => {
                    return Err(
                        "password_file: user is set without a password: set password_file (or password, or OUTBOX_SINKS__<NAME>__PASSWORD)".into(),
                    )
                }
            };
            return Ok(Auth::UserPassword {
                user,
                password,
                from,
            });
        }
        match (&c.token_file, c.token.is_empty()) {
            (Some(_), false) => {
                return Err("token and token_file are both set: keep one".into());
            }
            (Some(path), true) => {
                return Ok(Auth::Token {
                    token: read_secret("token_file", path)?,
                    from: "token_file",
                })
            }
            (None, false) => {
                return Ok(Auth::Token {
                    token: c.token.clone(),
                    from: "token",
                })
            }
            (None, true) => {}
        }
        if let Some(path) = &c.nkey_seed_file {
            let seed = read_secret("nkey_seed_file", path)?;
            let seed = Secret::new(seed.expose().trim());
            let pair = nkeys::KeyPair::from_seed(seed.expose()).map_err(|e| {
                format!(
                    "nkey_seed_file: {} does not hold an NKey seed ({e}): write the user's seed (SU…, as `nk -gen user` prints it) into it",
                    path.display()
                )
            })?;
            let public = pair.public_key();
            if !public.starts_with('U') {
                return Err(format!(
                    "nkey_seed_file: {} holds the seed of a {:?} key, not of a user: write a user seed (SU…) into it",
                    path.display(),
                    pair.key_pair_type()
                ));
            }
            return Ok(Auth::NKey { seed, public });
        }
        if let Some(path) = &c.credentials_file {
            // As it is: the parser wants the newline after the seed's closing line.
            let contents = String::from_utf8(read_file("credentials_file", path)?)
                .map(Secret::new)
                .map_err(|_| {
                    format!(
                        "credentials_file: {} is not UTF-8 text: point it at the user's .creds file",
                        path.display()
                    )
                })?;
            ConnectOptions::with_credentials(contents.expose()).map_err(|e| {
                format!(
                    "credentials_file: {} is not a NATS credentials file ({e}): point it at the user's .creds file (nsc generate creds)",
                    path.display()
                )
            })?;
            return Ok(Auth::Credentials {
                path: path.clone(),
                contents,
            });
        }
        Ok(Auth::None)
    }

    /// The connect options that authenticate this way.
    pub fn options(&self) -> io::Result<ConnectOptions> {
        let options = ConnectOptions::new();
        Ok(match self {
            Auth::None => options,
            Auth::UrlUserPassword { user, password }
            | Auth::UserPassword { user, password, .. } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            Auth::UrlToken(token) | Auth::Token { token, .. } => {
                options.token(token.expose().to_owned())
            }
            Auth::NKey { seed, .. } => options.nkey(seed.expose().to_owned()),
            Auth::Credentials { contents, .. } => options.credentials(contents.expose())?,
        })
    }

    /// Whether a secret crosses the connection as it is (a password or a token), rather than
    /// a signature of the server's challenge (NKey, JWT).
    pub fn sends_secret(&self) -> bool {
        matches!(
            self,
            Auth::UrlUserPassword { .. }
                | Auth::UrlToken(_)
                | Auth::UserPassword { .. }
                | Auth::Token { .. }
        )
    }

    /// For the start-up log: the method and whom it names, no secret.
    pub fn describe(&self, sink: &str) -> String {
        match self {
            Auth::None => "none".into(),
            Auth::UrlUserPassword { user, .. } => format!("user {user:?} (password in the url)"),
            Auth::UrlToken(_) => "token (in the url)".into(),
            Auth::UserPassword { user, from, .. } => {
                format!("user {user:?} (password from sinks.{sink}.{from})")
            }
            Auth::Token { from, .. } => format!("token (from sinks.{sink}.{from})"),
            Auth::NKey { public, .. } => format!("nkey {public}"),
            Auth::Credentials { path, .. } => format!("credentials file {}", path.display()),
        }
    }

    /// What to check when the server refuses the credentials ("authorization violation").
    pub fn refused_hint(&self, sink: &str) -> String {
        match self {
            Auth::None => format!(
                "the server requires credentials and the sink has none: set sinks.{sink}.user with password_file, or token_file, nkey_seed_file or credentials_file"
            ),
            Auth::UrlUserPassword { .. } => {
                format!("check the user and password in sinks.{sink}.url")
            }
            Auth::UrlToken(_) => format!("check the token in sinks.{sink}.url"),
            Auth::UserPassword { from, .. } => {
                format!("check the user and password (sinks.{sink}.user, sinks.{sink}.{from})")
            }
            Auth::Token { from, .. } => format!("check the token (sinks.{sink}.{from})"),
            Auth::NKey { public, .. } => format!(
                "check that the server's authorization lists the nkey {public} (the public key of sinks.{sink}.nkey_seed_file)"
            ),
            Auth::Credentials { .. } => format!(
                "check sinks.{sink}.credentials_file: its user JWT must be issued by an account the server trusts, unexpired and not revoked"
            ),
        }
    }
}

/// The URL without its credentials, and the credentials. async_nats sends only the
/// credentials set on its `ConnectOptions` and ignores those in the URL (0.51 reads them from
/// the URL nowhere), so a `nats://user:password@host` URL would connect without them and be
/// refused with "authorization violation" whatever the password.
pub(super) fn split_credentials(raw: &str) -> (String, Auth) {
    let Ok(mut url) = url::Url::parse(raw) else {
        return (raw.to_owned(), Auth::None);
    };
    let user = percent_decode(url.username());
    let password = url.password().map(percent_decode);
    let credentials = match (user.is_empty(), password) {
        (true, None) => return (raw.to_owned(), Auth::None),
        (_, Some(password)) => Auth::UrlUserPassword {
            user,
            password: Secret::new(password),
        },
        (false, None) => Auth::UrlToken(Secret::new(user)),
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    (url.to_string(), credentials)
}

/// `%xx` escapes decoded (a password with `@` or `:` is written `%40`, `%3A` in a URL).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the diagnosis found: the cause in words, and whether it is a TLS problem (error type
/// `tls`) or not (`disconnected`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Finding {
    pub tls: bool,
    pub text: String,
}

impl Finding {
    fn tls(text: String) -> Self {
        Self { tls: true, text }
    }
    fn other(text: String) -> Self {
        Self { tls: false, text }
    }
}

/// The part of the server's `INFO` greeting the diagnosis reads.
#[derive(Debug, Default, serde::Deserialize)]
struct ServerInfo {
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    tls_available: bool,
    #[serde(default)]
    tls_verify: bool,
}

/// Diagnoses failed connections to one server with the sink's own TLS configuration.
pub(super) struct Probe {
    sink: String,
    host: String,
    port: u16,
    /// Whether this sink requires TLS (a `tls://` URL, `tls.required` or a `tls.*` file).
    require_tls: bool,
    tls: Arc<ClientConfig>,
    ca_file: Option<PathBuf>,
    client_cert: bool,
    timeout: Duration,
}

impl Probe {
    pub fn new(
        sink: &str,
        url: &str,
        tls_keys: &NatsTlsConfig,
        tls: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Option<Self> {
        let parsed = url::Url::parse(url).ok()?;
        Some(Self {
            sink: sink.to_owned(),
            host: parsed.host_str()?.trim_matches(['[', ']']).to_owned(),
            port: parsed.port().unwrap_or(DEFAULT_PORT),
            require_tls: requires_tls(url, tls_keys),
            tls,
            ca_file: tls_keys.ca_file.clone(),
            client_cert: tls_keys.cert_file.is_some(),
            timeout,
        })
    }

    /// Why a connection to the server fails, as far as the greeting and the TLS handshake
    /// tell; `None` when both go through (the cause is elsewhere).
    pub async fn diagnose(&self) -> Option<Finding> {
        let address = format!("{}:{}", self.host, self.port);
        let tcp = match tokio::time::timeout(
            self.timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Some(Finding::other(format!(
                    "nothing accepts connections at {address} ({e})"
                )))
            }
            Err(_) => {
                return Some(Finding::other(format!(
                    "no answer from {address} within {}s",
                    self.timeout.as_secs_f32()
                )))
            }
        };
        let mut reader = BufReader::new(tcp);
        let mut line = String::new();
        let greeting = tokio::time::timeout(
            self.timeout,
            (&mut reader).take(64 * 1024).read_line(&mut line),
        )
        .await;
        let info = match greeting {
            Ok(Ok(_)) => line
                .strip_prefix("INFO ")
                .and_then(|json| serde_json::from_str::<ServerInfo>(json.trim()).ok()),
            _ => None,
        };
        let Some(info) = info else {
            return Some(Finding::other(format!(
                "{address} accepted the connection but did not greet as a NATS server does (no INFO line): check the host and port in sinks.{}.url",
                self.sink
            )));
        };
        let sink = &self.sink;
        if self.require_tls && !info.tls_required && !info.tls_available {
            return Some(Finding::tls(format!(
                "this sink requires TLS (a tls:// url, sinks.{sink}.tls.required or a sinks.{sink}.tls file) but the server at {address} does not offer TLS: enable TLS on the server (its tls {{}} block), or point sinks.{sink}.url at a server that has it"
            )));
        }
        if !(self.require_tls || info.tls_required) {
            return None;
        }
        let Ok(name) = ServerName::try_from(self.host.clone()) else {
            return Some(Finding::tls(format!(
                "{:?} in sinks.{sink}.url is not a host name TLS can check a certificate against",
                self.host
            )));
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls));
        let tcp = reader.into_inner();
        let mut stream =
            match tokio::time::timeout(self.timeout, connector.connect(name, tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Some(self.handshake_failed(&address, &e, &info)),
                Err(_) => {
                    return Some(Finding::tls(format!(
                        "the TLS handshake with {address} did not finish within {}s",
                        self.timeout.as_secs_f32()
                    )))
                }
            };
        if info.tls_verify && !self.client_cert {
            return Some(Finding::tls(format!(
                "the server at {address} requires a client certificate (mutual TLS) and the sink has none: set sinks.{sink}.tls.cert_file and sinks.{sink}.tls.key_file"
            )));
        }
        // TLS 1.3: the server checks the client certificate after the client's last handshake
        // message, and answers a refused one with an alert. The server sends nothing else
        // before the client's CONNECT, so a quiet connection here means it accepted the
        // handshake.
        let mut byte = [0u8; 1];
        let settle = self.timeout.min(Duration::from_millis(500));
        if let Ok(Err(e)) = tokio::time::timeout(settle, stream.read(&mut byte)).await {
            if let Some(finding) = self.client_refused(&address, &e) {
                return Some(finding);
            }
        }
        None
    }

    fn handshake_failed(&self, address: &str, e: &io::Error, info: &ServerInfo) -> Finding {
        let sink = &self.sink;
        let Some(tls_error) = rustls_error(e) else {
            return Finding::tls(format!("the TLS handshake with {address} failed: {e}"));
        };
        let Some(certificate) = certificate_error(tls_error) else {
            return self.client_refused(address, e).unwrap_or_else(|| {
                Finding::tls(format!(
                    "the TLS handshake with {address} failed: {tls_error}"
                ))
            });
        };
        let text = match certificate {
            CertificateError::UnknownIssuer => match (&self.ca_file, self.require_tls) {
                (Some(ca), _) => format!(
                    "the server's certificate is not signed by the CA in sinks.{sink}.tls.ca_file ({}): set tls.ca_file to the CA that signed the certificate of the server at {address} ({tls_error})",
                    ca.display()
                ),
                (None, false) if info.tls_required => format!(
                    "the server at {address} requires TLS, and its certificate is not signed by a CA this machine trusts: set sinks.{sink}.tls.ca_file to the CA that signed it ({tls_error})"
                ),
                (None, _) => format!(
                    "the certificate of the server at {address} is not signed by a CA this machine trusts: set sinks.{sink}.tls.ca_file to the CA that signed it ({tls_error})"
                ),
            },
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the certificate of the server at {address} has expired ({tls_error}): renew the server's certificate (or check this machine's clock); nothing in sinks.{sink}.tls fixes it"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "the certificate of the server at {address} is not valid yet ({tls_error}): check the clocks of this machine and of the CA"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the certificate of the server at {address} is not issued for {:?} ({tls_error}): connect by a name the certificate lists (sinks.{sink}.url), or reissue the certificate with that name",
                    self.host
                )
            }
            _ => format!(
                "the certificate of the server at {address} is not accepted ({tls_error}): check sinks.{sink}.tls.ca_file and the server's certificate"
            ),
        };
        Finding::tls(text)
    }

    /// An alert that says the server refused this client's certificate (or its absence).
    fn client_refused(&self, address: &str, e: &io::Error) -> Option<Finding> {
        let sink = &self.sink;
        let rustls::Error::AlertReceived(alert) = rustls_error(e)? else {
            return None;
        };
        match alert {
            AlertDescription::CertificateRequired if !self.client_cert => Some(Finding::tls(format!(
                "the server at {address} requires a client certificate (mutual TLS) and the sink has none: set sinks.{sink}.tls.cert_file and sinks.{sink}.tls.key_file"
            ))),
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => Some(Finding::tls(format!(
                "the server at {address} refused the client certificate (TLS alert {alert:?}): sinks.{sink}.tls.cert_file must be signed by a CA the server trusts (its tls.ca_file), valid now, and issued for client authentication"
            ))),
            _ => None,
        }
    }
}

/// Whether the sink refuses to talk without TLS: a `tls://` URL, `tls.required`, or any
/// `tls.*` file (a CA or a client certificate is configured to be used).
pub(super) fn requires_tls(url: &str, tls: &NatsTlsConfig) -> bool {
    url.starts_with("tls://") || tls.required || tls.any_file()
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

fn certificate_error(e: &rustls::Error) -> Option<&CertificateError> {
    match e {
        rustls::Error::InvalidCertificate(c) => Some(c),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> NatsConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn credentials_leave_the_url_for_the_connect_options() {
        assert_eq!(
            split_credentials("nats://relay:p%40ss@127.0.0.1:4222"),
            (
                "nats://127.0.0.1:4222".to_string(),
                Auth::UrlUserPassword {
                    user: "relay".into(),
                    password: Secret::new("p@ss")
                }
            )
        );
        assert_eq!(
            split_credentials("tls://s3cr3t@nats.example:4222"),
            (
                "tls://nats.example:4222".to_string(),
                Auth::UrlToken(Secret::new("s3cr3t"))
            )
        );
        assert_eq!(
            split_credentials("nats://127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".to_string(), Auth::None)
        );
    }

    #[test]
    fn one_way_to_authenticate_with_its_secret_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret pw\r\n").unwrap();
        let c = config(&format!("user = \"relay\"\npassword_file = {:?}", file));
        let auth = Auth::from_config(&c).unwrap();
        assert_eq!(
            auth,
            Auth::UserPassword {
                user: "relay".into(),
                password: Secret::new("s3cret pw"),
                from: "password_file"
            }
        );
        assert!(!format!("{auth:?} {}", auth.describe("events")).contains("s3cret"));
        assert!(auth
            .refused_hint("events")
            .contains("sinks.events.password_file"));

        for (toml, want) in [
            (
                "url = \"nats://a:b@h:4222\"\ntoken = \"t\"",
                "more than one way",
            ),
            (
                "token = \"t\"\ntoken_file = \"/x\"",
                "token and token_file are both set",
            ),
            ("user = \"u\"", "user is set without a password"),
            ("password = \"p\"", "a password is set but no user"),
            (
                "user = \"u\"\npassword = \"p\"\npassword_file = \"/x\"",
                "both set",
            ),
            (
                "token_file = \"/nonexistent\"",
                "token_file: cannot read /nonexistent",
            ),
        ] {
            let e = Auth::from_config(&config(toml)).unwrap_err();
            assert!(e.contains(want), "{toml}: {e}");
        }
    }

    #[test]
    fn an_nkey_seed_file_must_hold_a_user_seed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("seed");
        let user = nkeys::KeyPair::new_user();
        std::fs::write(&file, format!("{}\n", user.seed().unwrap())).unwrap();
        let c = config(&format!("nkey_seed_file = {:?}", file));
        let Auth::NKey { public, .. } = Auth::from_config(&c).unwrap() else {
            panic!("an nkey");
        };
        assert_eq!(public, user.public_key());
        std::fs::write(&file, nkeys::KeyPair::new_account().seed().unwrap()).unwrap();
        let e = Auth::from_config(&c).unwrap_err();
        assert!(e.contains("not of a user"), "{e}");
    }

    #[test]
    fn tls_is_required_by_the_scheme_the_flag_or_any_file() {
        let mut tls = NatsTlsConfig::default();
        assert!(!requires_tls("nats://h:4222", &tls));
        assert!(requires_tls("tls://h:4222", &tls));
        tls.ca_file = Some("/ca.pem".into());
        assert!(requires_tls("nats://h:4222", &tls));
        assert!(check_tls_files(&tls)
            .unwrap_err()
            .starts_with("tls.ca_file: cannot read /ca.pem"));
    }
}
