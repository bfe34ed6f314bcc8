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
            Error::Listen { .. } => "listen",
            Error::Sink { .. } => "sink",
        }
    }

    /// Whether the error is the caller's input (configuration, arguments) rather than the
    /// environment: the CLI exits with 2 for these, 1 otherwise.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(_) | Error::Usage(_))
    }
}

/// What to do about a failed connection, from PostgreSQL's answer (SQLSTATE) where it gave one.
fn connect_advice(error: &sqlx::Error) -> &'static str {
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    match code.as_deref() {
        // invalid_catalog_name
        Some("3D000") => "create that database, or point database.url (OUTBOX_DATABASE__URL) at an existing one",
        // invalid_password, invalid_authorization_specification
        Some("28P01" | "28000") => "check the user and password in database.url (OUTBOX_DATABASE__URL) and the server's pg_hba.conf",
        Some(_) => "see PostgreSQL's message above, and database.url (OUTBOX_DATABASE__URL)",
        None => "is PostgreSQL running and reachable there? Start it, or set database.url (OUTBOX_DATABASE__URL)",
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
