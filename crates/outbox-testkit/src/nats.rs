//! NATS JetStream: [`OwnedNats`], a `nats-server` the caller owns (to stop, kill, freeze and
//! restart); [`NatsConsumer`] and [`read_stream`], readers independent of the relay; the
//! relay's NATS sink config ([`nats_config`], [`relay_config`]); [`NatsTarget`] for the
//! ordering tests. Tests that need no fault use the shared server at [`nats_url`] with unique
//! stream and subject names.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::names::{free_port, unique};
use crate::ordering::{read_until_stopped, Arrival, Arrivals, OrderedTarget, BATCH, POLL};
use crate::tls::CertFiles;
use crate::wait::cleanup_on_own_runtime;

/// The shared server: `NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A config file for a relay on `db_url` publishing every topic to NATS `stream` under
/// `<prefix>.{topic}`. The test streams are capped at 64 MiB: JetStream reserves a stream's
/// `max_bytes` (the relay's default 1 GiB) from the server's memory when it is created, and a
/// few dozen tests in parallel on the shared server would exhaust it. `extra` is appended verbatim (more `[relay]` keys go in `relay_extra`).
pub fn nats_config(
    db_url: &str,
    nats_url: &str,
    stream: &str,
    prefix: &str,
    relay_extra: &str,
) -> String {
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
{relay_extra}

[http]
listen = ""

[sinks.nats]
kind = "nats"
url = "{nats_url}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{topic}}" }}]
"#
    )
}

/// A relay config: `routes` is the TOML array of NATS routes; the stream (file storage,
/// subjects `<prefix>.>`) is created by the relay. `http_port` 0 disables HTTP.
pub fn relay_config(
    db_url: &str,
    nats_url: &str,
    stream: &str,
    prefix: &str,
    routes: &str,
    relay_extra: &str,
    http_port: u16,
) -> String {
    let listen = if http_port == 0 {
        String::new()
    } else {
        format!("127.0.0.1:{http_port}")
    };
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
{relay_extra}

[http]
listen = "{listen}"

[sinks.nats]
kind = "nats"
url = "{nats_url}"
connect_timeout_secs = 2
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "file", max_bytes = 67108864 }}
routes = {routes}
"#
    )
}

/// How an owned server secures itself ([`OwnedNats::start_secured`]): TLS, and one way for
/// clients to authenticate.
#[derive(Clone, Default)]
pub struct NatsSecurity {
    pub tls: Option<ServerTls>,
    pub auth: ServerAuth,
}

/// The server's TLS block: its certificate, the CA it verifies clients against, and whether it
/// requires client certificates (`verify: true`, mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    pub cert: CertFiles,
    pub ca: PathBuf,
    pub verify: bool,
    /// The test's own clients: the CA they trust, and their client certificate (needed when
    /// `verify`). `None` for a server whose certificate the test's clients cannot check (an
    /// expired one, one for another host): the test then only waits for the server's greeting.
    pub client: Option<(PathBuf, Option<CertFiles>)>,
}

/// How clients authenticate to an owned server.
#[derive(Clone, Default)]
pub enum ServerAuth {
    #[default]
    None,
    /// `authorization { user, password }`.
    User { user: String, password: String },
    /// `authorization { token }`.
    Token(String),
    /// `authorization { users = [{ nkey }] }`: the user's seed (the server lists its public key).
    NKey { seed: String },
    /// Operator (JWT) mode: the server trusts `operator`, which signed one account; `creds` is
    /// the `.creds` file of a user of that account.
    Operator(OperatorSetup),
}

/// A NATS operator, one account with JetStream, and one user of it, as `nsc` would make them:
/// JWTs (base64url JSON signed with the issuer's NKey, the format nats-server decodes) and the
/// user's `.creds` file.
#[derive(Clone)]
pub struct OperatorSetup {
    pub operator_jwt: String,
    pub system_public: String,
    pub system_jwt: String,
    pub account_public: String,
    pub account_jwt: String,
    /// The `.creds` file's contents: the user JWT and the user's seed.
    pub creds: String,
}

impl OperatorSetup {
    /// A fresh operator, one account it signed, and a user of that account.
    pub fn new() -> Self {
        let account = nkeys::KeyPair::new_account();
        Self::signed_by(&account, &account)
    }

    /// Like [`OperatorSetup::new`], but the user JWT is signed by `user_signer` while the
    /// operator signs `account` (another account's key: a user the server must refuse).
    fn signed_by(account: &nkeys::KeyPair, user_signer: &nkeys::KeyPair) -> Self {
        let operator = nkeys::KeyPair::new_operator();
        let user = nkeys::KeyPair::new_user();
        let operator_jwt = encode_jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            serde_json::json!({ "type": "operator", "version": 2 }),
        );
        // JetStream needs a system account in operator mode.
        let system = nkeys::KeyPair::new_account();
        let system_jwt = encode_jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({ "type": "account", "version": 2 }),
        );
        let account_jwt = encode_jwt(
            &operator,
            &account.public_key(),
            "test-account",
            serde_json::json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "default_permissions": { "pub": {}, "sub": {} }
            }),
        );
        let user_jwt = encode_jwt(
            user_signer,
            &user.public_key(),
            "relay",
            serde_json::json!({
                "type": "user", "version": 2,
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1
            }),
        );
        let seed = user.seed().expect("user seed");
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        Self {
            operator_jwt,
            system_public: system.public_key(),
            system_jwt,
            account_public: account.public_key(),
            account_jwt,
            creds,
        }
    }

    /// The `.creds` of a user whose JWT an account the server does not know signed, for a
    /// server set up with `self` (the server must refuse it).
    pub fn foreign_creds(&self) -> String {
        let stranger = nkeys::KeyPair::new_account();
        let other = Self::signed_by(&stranger, &stranger);
        other.creds
    }
}

impl Default for OperatorSetup {
    fn default() -> Self {
        Self::new()
    }
}

/// A new NKey user: its seed (`SU…`) and its public key (`U…`).
pub fn nkey_user() -> (String, String) {
    let user = nkeys::KeyPair::new_user();
    (user.seed().expect("user seed"), user.public_key())
}

/// A NATS JWT: `header.claims.signature`, each base64url without padding, signed (Ed25519) by
/// `issuer` over `header.claims`.
fn encode_jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": unique("jti").to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = issuer
        .sign(format!("{header}.{claims}").as_bytes())
        .expect("sign the JWT");
    format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(signature))
}

impl NatsSecurity {
    /// The server's configuration lines.
    fn server_config(&self) -> String {
        let mut out = String::new();
        if let Some(tls) = &self.tls {
            out.push_str(&format!(
                "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {}\n  timeout: 5\n}}\n",
                tls.cert.cert.display(),
                tls.cert.key.display(),
                tls.ca.display(),
                tls.verify
            ));
        }
        match &self.auth {
            ServerAuth::None => {}
            ServerAuth::User { user, password } => out.push_str(&format!(
                "authorization {{\n  user: \"{user}\"\n  password: \"{password}\"\n}}\n"
            )),
            ServerAuth::Token(token) => {
                out.push_str(&format!("authorization {{\n  token: \"{token}\"\n}}\n"))
            }
            ServerAuth::NKey { seed } => {
                let public = nkeys::KeyPair::from_seed(seed)
                    .expect("user seed")
                    .public_key();
                out.push_str(&format!(
                    "authorization {{\n  users = [ {{ nkey: \"{public}\" }} ]\n}}\n"
                ))
            }
            ServerAuth::Operator(op) => out.push_str(&format!(
                "operator: \"{}\"\nsystem_account: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
                op.operator_jwt,
                op.system_public,
                op.system_public,
                op.system_jwt,
                op.account_public,
                op.account_jwt
            )),
        }
        out
    }

    /// Connect options for the test's own clients: the server's credentials and TLS.
    fn client_options(&self) -> Option<async_nats::ConnectOptions> {
        let mut options = match &self.auth {
            ServerAuth::None => async_nats::ConnectOptions::new(),
            ServerAuth::User { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            ServerAuth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            ServerAuth::NKey { seed } => async_nats::ConnectOptions::with_nkey(seed.clone()),
            ServerAuth::Operator(op) => {
                async_nats::ConnectOptions::with_credentials(&op.creds).expect("creds")
            }
        };
        if let Some(tls) = &self.tls {
            let (ca, cert) = tls.client.as_ref()?;
            options = options
                .tls_client_config(tls_client_config(ca, cert.as_ref()))
                .require_tls(true);
        }
        Some(options)
    }
}

/// A rustls client configuration that trusts `ca` (and presents `client`), with the ring
/// provider named (not the process default, which a build with two providers lacks).
pub fn tls_client_config(
    ca: &std::path::Path,
    client: Option<&CertFiles>,
) -> async_nats::rustls::ClientConfig {
    use async_nats::rustls::pki_types::pem::PemObject;
    use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use async_nats::rustls::{self, ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots
            .add(cert.expect("CA certificate"))
            .expect("trust anchor");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots);
    match client {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let certs = CertificateDer::pem_file_iter(&files.cert)
                .expect("client certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate");
            let key = PrivateKeyDer::from_pem_file(&files.key).expect("client key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client certificate and key")
        }
    }
}

/// A `nats-server` owned by the test, configured by a file: JetStream on file storage in its
/// temporary directory (streams survive restarts), plus `extra` config lines.
pub struct OwnedNats {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    security: NatsSecurity,
}

impl OwnedNats {
    /// Starts a server on a free port with `extra` config lines (e.g. `max_payload: 4096`).
    pub async fn start(extra: &str) -> Self {
        Self::start_server_with(extra, NatsSecurity::default()).await
    }

    /// Starts a server that accepts only `user` with `password` ([`OwnedNats::url_as`]).
    pub async fn start_with_user(user: &str, password: &str) -> Self {
        Self::start_secured(NatsSecurity {
            tls: None,
            auth: ServerAuth::User {
                user: user.into(),
                password: password.into(),
            },
        })
        .await
    }

    /// Starts a server with TLS and/or authentication; [`OwnedNats::client`] connects as the
    /// security says.
    pub async fn start_secured(security: NatsSecurity) -> Self {
        Self::start_server_with("", security).await
    }

    async fn start_server_with(extra: &str, security: NatsSecurity) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n}}\n{}{extra}\n",
                store.display(),
                security.server_config()
            ),
        )
        .unwrap();
        let mut s = Self {
            child: None,
            port,
            dir,
            conf,
            security,
        };
        s.start_server().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `tls://127.0.0.1:<port>`: the URL scheme that requires TLS.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// The URL with `user` and `password` in it.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// A client of the test, authenticated and over TLS as the server requires (async_nats
    /// ignores credentials in a URL: they go in the connect options).
    pub async fn client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let options = self
            .security
            .client_options()
            .expect("this server's certificate is not meant to be trusted by the test's clients");
        options.connect(self.url()).await
    }

    /// The server's log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("nats-server is running")
    }

    /// Starts the server (again); waits until it accepts connections.
    pub async fn start_server(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.greets().await {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "owned nats-server did not come up ({}); its log:\n{}",
                    exited.map_or("no greeting within 20 s".into(), |s| s.to_string()),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the server accepts a connection and sends its `INFO` greeting (which it does
    /// once it serves clients, before TLS and authentication).
    async fn greets(&self) -> bool {
        use tokio::io::AsyncBufReadExt;
        let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(tcp);
        let read = reader.read_line(&mut line);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), read).await,
            Ok(Ok(_))
        ) && line.starts_with("INFO ")
    }

    /// SIGTERM (JetStream flushes its store), then waits for the exit; SIGKILL after 15 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL: no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server ([`OwnedNats::stop`]) and starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_server().await;
    }

    /// Freezes the server: connections stay open, nothing is answered (a network-silent broker).
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
    }

    /// A JetStream context on this server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await.expect("connect to the owned NATS"))
    }
}

impl Drop for OwnedNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every message in `stream` as (Nats-Msg-Id, payload), read by a fresh ordered consumer from
/// the first sequence. Independent of the relay.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<(String, Vec<u8>)> {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let total = s.info().await.unwrap().state.messages as usize;
    let consumer = s
        .create_consumer(pull::Config {
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::with_capacity(total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while out.len() < total {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                out.push((id, m.payload.to_vec()));
                let _ = m.ack().await;
            }
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) | Err(_) => panic!(
                "read {} of {total} stored messages before the deadline",
                out.len()
            ),
        }
    }
    out
}

/// A NATS JetStream consumer independent of the relay: reads every message of `stream`.
pub struct NatsConsumer {
    pub messages: async_nats::jetstream::consumer::pull::Stream,
    pub context: async_nats::jetstream::Context,
    pub stream: String,
    url: String,
}

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub subject: String,
    pub msg_id: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

impl NatsConsumer {
    /// Creates the stream (memory storage, `subjects`) if needed and a consumer from the start.
    pub async fn new(nats_url: &str, stream: &str, subjects: &[String]) -> Self {
        use async_nats::jetstream::{consumer::pull, stream::Config, stream::StorageType};
        let client = async_nats::connect(nats_url)
            .await
            .expect("connect to NATS");
        let context = async_nats::jetstream::new(client);
        let s = context
            .get_or_create_stream(Config {
                name: stream.to_string(),
                subjects: subjects.to_vec(),
                storage: StorageType::Memory,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .expect("create stream");
        let consumer = s
            .create_consumer(pull::Config {
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .expect("create consumer");
        let messages = consumer.messages().await.expect("consume");
        Self {
            messages,
            context,
            stream: stream.into(),
            url: nats_url.into(),
        }
    }

    /// Reads until `n` messages arrived or `timeout` passed; returns what arrived.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        use futures::StreamExt;
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.messages.next()).await {
                Ok(Some(Ok(m))) => {
                    let _ = m.ack().await;
                    let mut headers = std::collections::BTreeMap::new();
                    if let Some(h) = &m.headers {
                        for (k, vs) in h.iter() {
                            if let Some(v) = vs.first() {
                                headers.insert(k.to_string(), v.as_str().to_string());
                            }
                        }
                    }
                    out.push(Received {
                        subject: m.subject.to_string(),
                        msg_id: headers.get("Nats-Msg-Id").cloned().unwrap_or_default(),
                        headers,
                        payload: m.payload.to_vec(),
                    });
                }
                Ok(Some(Err(e))) => panic!("consumer error: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    /// Messages stored in the stream (JetStream drops duplicates inside its window).
    pub async fn stored(&self) -> u64 {
        let mut s = self.context.get_stream(&self.stream).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

impl Drop for NatsConsumer {
    /// Deletes the stream, also when the test panicked, through a NATS connection of its own.
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.stream.clone());
        cleanup_on_own_runtime(async move {
            if let Ok(client) = async_nats::connect(&url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await;
            }
        });
    }
}

/// Deletes a stream on drop (also when the test panicked): for a stream the relay creates.
pub struct DeleteStreamOnDrop {
    pub url: String,
    pub stream: String,
}

impl Drop for DeleteStreamOnDrop {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.stream.clone());
        cleanup_on_own_runtime(async move {
            if let Ok(client) = async_nats::connect(&url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await;
            }
        });
    }
}

impl NatsConsumer {
    /// Deletes the test's stream.
    pub async fn delete_stream(&self) {
        let _ = self.context.delete_stream(&self.stream).await;
    }
}

/// JetStream: the stream captures `<prefix>.*` and the route publishes to `<prefix>.<key>`, so
/// the poisoned key (it contains a dot) lands on `<prefix>.poison.pill`, which no stream
/// captures: JetStream answers "no responders" and the sink reports a retriable failure.
pub struct NatsTarget {
    pub url: String,
    pub stream: String,
    pub prefix: String,
}

impl NatsTarget {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            stream: unique("ORD"),
            prefix: unique("ord"),
        }
    }
}

impl OrderedTarget for NatsTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.nats]
kind = "nats"
url = "{url}"
stream = {{ name = "{stream}", subjects = ["{prefix}.*"], create = false }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{key}}" }}]
"#,
            url = self.url,
            stream = self.stream,
            prefix = self.prefix
        )
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let consumer =
            NatsConsumer::new(&self.url, &self.stream, &[format!("{}.*", self.prefix)]).await;
        tokio::spawn(async move {
            let consumer = read_until_stopped(consumer, &sink, &stop, |mut c| async move {
                let got = c.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|r| Arrival {
                    key: r.headers.get("outbox-key").cloned(),
                    message_id: r.msg_id,
                    payload: r.payload,
                });
                (c, got.collect())
            })
            .await;
            consumer.delete_stream().await;
        })
    }

    fn poison_error(&self) -> &'static str {
        // Followed by the subject, which the error names.
        "no JetStream stream captures this subject"
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}
