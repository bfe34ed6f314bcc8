//! The library's error type: every failure the relay's library functions return, each variant
//! saying what to fix. [`Error::error_type`] is a short, bounded name for metric labels and logs;
//! [`Error::is_usage`] tells the CLI which exit code to use (2 for bad input, 1 otherwise).

use crate::sinks::SinkError;

/// A failure of the relay library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the text names each key and what to do.
    #[error("{0}")]
    Config(String),
    /// A command was given input it cannot act on (a malformed filter, an unknown id).
    #[error("{0}")]
    Usage(String),
    /// PostgreSQL could not be reached or refused the connection.
    #[error(
        "cannot connect to PostgreSQL at {url}: {source}; {}",
        connect_advice(source)
    )]
    Connect {
        /// The database URL with its password redacted.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// A statement failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database has no outbox schema.
    #[error("the outbox schema is missing in database {database:?}: run `outbox-relay migrate` first (or check database.url)")]
    SchemaMissing { database: String },
    /// The outbox schema predates this relay: a migration it needs is not applied.
    #[error("the outbox schema in database {database:?} predates this relay ({missing} is missing): run `outbox-relay migrate` (or apply the newer files of migrations/ with your migration tool)")]
    SchemaOutdated { database: String, missing: String },
    /// The HTTP listener could not be bound.
    #[error(
        "cannot listen on http.listen = {addr}: {source}; pick a free address or set it empty"
    )]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A sink could not be built from its configuration.
    #[error("sinks.{name}: {source}")]
    Sink {
        name: String,
        #[source]
        source: SinkError,
    },
    /// The database role lacks a privilege the command needs (or may not migrate).
    #[error("database role {role:?} {problem}; see docs/security.md, \"Roles: least privilege\"")]
    Privileges { role: String, problem: String },
}

impl Error {
    /// A short, bounded name for metric labels and structured logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Usage(_) => "usage",
            Error::Connect { .. } => "connect",
            Error::Database(_) => "database",
            Error::Migrate(_) => "migrate",
            Error::SchemaMissing { .. } => "schema_missing",
            Error::SchemaOutdated { .. } => "schema_outdated",
            Error::Listen { .. } => "listen",
            Error::Sink { .. } => "sink",
            Error::Privileges { .. } => "privileges",
        }
    }

    /// Whether the error is the caller's input (configuration, arguments) rather than the
    /// environment: the CLI exits with 2 for these, 1 otherwise.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(_) | Error::Usage(_))
    }
}

/// What to do about a failed connection to PostgreSQL: from the TLS error (the certificate the
/// relay refused), PostgreSQL's answer (SQLSTATE and message) or the network error. Each answer
/// names the configuration key to change.
pub fn connect_advice(error: &sqlx::Error) -> &'static str {
    if let Some(tls) = find_rustls_error(error) {
        return tls_advice(tls);
    }
    if let sqlx::Error::Tls(e) = error {
        return if e.to_string().contains("does not support TLS") {
            "the server does not offer TLS, but database.tls.mode (OUTBOX_DATABASE__TLS__MODE) or sslmode in database.url requires it: enable ssl on the server; lower the mode to prefer only on a network you trust"
        } else {
            "the TLS settings could not be used: check database.tls.ca_file, database.tls.cert_file and database.tls.key_file (or sslrootcert, sslcert and sslkey in database.url)"
        };
    }
    if plaintext_refused(error) {
        return "the server accepts only TLS connections from here (hostssl in pg_hba.conf): set database.tls.mode (OUTBOX_DATABASE__TLS__MODE) to verify-full and database.tls.ca_file (OUTBOX_DATABASE__TLS__CA_FILE) to the server's CA, or sslmode=verify-full&sslrootcert=… in database.url";
    }
    let Some(db) = error.as_database_error() else {
        return "is PostgreSQL running and reachable there? Start it, or set database.url (OUTBOX_DATABASE__URL)";
    };
    let message = db.message();
    match db.code().as_deref() {
        // invalid_catalog_name
        Some("3D000") => "create that database, or point database.url (OUTBOX_DATABASE__URL) at an existing one",
        // "connection requires a valid client certificate", "certificate authentication failed"
        Some("28000") if message.contains("certificate") => "the server requires a client certificate for this user: set database.tls.cert_file and database.tls.key_file (OUTBOX_DATABASE__TLS__CERT_FILE, OUTBOX_DATABASE__TLS__KEY_FILE) to a certificate whose common name is the user in database.url, signed by the CA of the server's ssl_ca_file",
        // invalid_password, invalid_authorization_specification
        Some("28P01" | "28000") => "check the user in database.url and the password (database.password_file or OUTBOX_DATABASE__PASSWORD_FILE, database.password, or the URL's), and the server's pg_hba.conf",
        Some(_) => "see PostgreSQL's message above, and database.url (OUTBOX_DATABASE__URL)",
        None => "see PostgreSQL's message above, and database.url (OUTBOX_DATABASE__URL)",
    }
}

/// PostgreSQL refused a connection because it was not encrypted: `hostssl` lines only, for
/// this client, in `pg_hba.conf`.
pub fn plaintext_refused(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|db| {
        db.code().as_deref() == Some("28000") && db.message().contains("no encryption")
    })
}

fn tls_advice(error: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer | Cert::BadSignature => "the server's certificate is not signed by a CA the relay trusts: set database.tls.ca_file (OUTBOX_DATABASE__TLS__CA_FILE), or sslrootcert in database.url, to the PEM file of the CA that signed it (a managed database's provider publishes its CA bundle)",
            Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. } => "the server's certificate has expired or is not valid yet: the server must present a current certificate (its ssl_cert_file); check both machines' clocks. A weaker database.tls.mode is no fix",
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => "the server's certificate does not name the host in database.url: connect with a host name the certificate lists (database.url, OUTBOX_DATABASE__URL), or have the certificate reissued for this name",
            _ => "the server's certificate was refused: check database.tls.ca_file (or sslrootcert in database.url) and the certificate the server presents",
        },
        rustls::Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::AccessDenied,
        ) => "the server refused the relay's client certificate (or its absence): set database.tls.cert_file and database.tls.key_file (OUTBOX_DATABASE__TLS__CERT_FILE, OUTBOX_DATABASE__TLS__KEY_FILE) to a current certificate signed by the CA of the server's ssl_ca_file",
        _ => "the TLS handshake with the server failed: check database.tls.mode and database.tls.ca_file (or sslmode and sslrootcert in database.url) against the server's TLS settings",
    }
}

/// The rustls error inside a failed connection, if the failure was TLS's. sqlx wraps it in an
/// `io::Error` (whose `source()` skips the wrapped error itself, hence `get_ref`).
fn find_rustls_error(error: &sqlx::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                    return Some(tls);
                }
            }
        }
        next = e.source();
    }
    None
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
