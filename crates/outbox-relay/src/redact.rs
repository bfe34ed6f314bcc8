//! Secrets kept out of logs and error texts: URLs with their credentials replaced, and
//! [`Secret`], the type of every configuration value that is a password, token or key; and the
//! files secrets come from: [`read_secret_file`], and the permission checks of a secret file
//! ([`world_readable_mode`]) and of a private key ([`key_mode_too_open`]). Each caller words
//! the errors itself, naming the key or variable that named the file.

use std::fmt;
use std::path::Path;

/// A configuration value that must never be shown: a password, a token, a private key.
///
/// `Debug`, `Display` and `Serialize` print `***` (an empty secret prints as empty, so that
/// "not set" stays visible), so a `{:?}` of a config struct, a `tracing` field or a serialized
/// config cannot leak it. The value is read with [`Secret::expose`], only where it is handed to
/// the client library that needs it. `Deserialize` reads a plain string, so a key of this type
/// is set like any other (TOML, `OUTBOX_…` variables, or a file named by `OUTBOX_…_FILE`).
///
/// Not `secrecy::SecretString`: the configuration structs derive `PartialEq` and `Serialize`
/// (the loader builds its defaults and its list of known keys from them), which that type
/// deliberately lacks; and zeroizing on drop would promise more than the relay keeps (the
/// value is copied into the client libraries' own connection options).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself: only for handing it to the library that authenticates with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text to show in place of the value.
    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "***"
        }
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

/// A URL with its password replaced by `***`, for logs and errors. A user name alone is a
/// secret too where the scheme uses it as a token (`nats://TOKEN@host`), and is replaced then;
/// elsewhere (`postgres://app@db`) it is kept, because operators need it to debug access. A
/// `password` query parameter (libpq accepts `?password=…`) is replaced as well.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        return "<unparseable url>".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    } else if !u.username().is_empty() && u.scheme().starts_with("nats") {
        let _ = u.set_username("***");
    }
    let secret_param =
        |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
    if u.query_pairs().any(|(k, _)| secret_param(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret_param(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Why a secret file gave no secret.
#[derive(Debug)]
pub enum SecretFileError {
    /// The file cannot be read; of kind [`std::io::ErrorKind::InvalidData`] when it is not
    /// UTF-8 text (as [`std::fs::read_to_string`] reports it).
    Unreadable(std::io::Error),
    /// The file holds nothing but, at most, the newline.
    Empty,
}

/// A secret from its file: the contents without one trailing newline (`\n` or `\r\n`, what
/// `echo` and most secret stores add); never empty. (A file whose final newline belongs to it,
/// such as a NATS `.creds` file, is read unchanged with [`std::fs::read_to_string`].)
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    let contents = std::fs::read_to_string(path).map_err(SecretFileError::Unreadable)?;
    let value = contents
        .strip_suffix('\n')
        .map(|v| v.strip_suffix('\r').unwrap_or(v))
        .unwrap_or(&contents);
    if value.is_empty() {
        return Err(SecretFileError::Empty);
    }
    Ok(Secret::new(value))
}

/// The permission bits of `path` (`0o777` at most) when every user of the machine may read it;
/// `None` when it is private to its owner and group, or when its metadata cannot be read (a
/// warning at start, not an error: a Kubernetes secret volume is world-readable unless its
/// `defaultMode` says otherwise).
pub fn world_readable_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode())
        .filter(|mode| mode & 0o004 != 0)
        .map(|mode| mode & 0o777)
}

/// libpq's rule for a private key file: mode `0600` or stricter, or `0640` when owned by root
/// (a key shared with a group of readers is how a key leaks). `Some((mode, allowed))`, the
/// file's permission bits and the widest allowed, when the file's are wider.
pub fn key_mode_too_open(meta: &std::fs::Metadata) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    (mode & !allowed != 0).then_some((mode, allowed))
}

#[cfg(test)]
mod tests {
    use super::{redact_url, Secret};

    #[test]
    fn secrets_print_and_serialize_as_stars_and_read_as_plain_strings() {
        let s: Secret = serde_json::from_str("\"hunter2-pw\"").unwrap();
        assert_eq!(s.expose(), "hunter2-pw");
        assert_eq!(format!("{s:?} {s}"), "\"***\" ***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        let empty = Secret::default();
        assert_eq!(format!("{empty:?}"), "\"\"");
        assert_eq!(serde_json::to_string(&empty).unwrap(), "\"\"");
    }

    #[test]
    fn redact_url_hides_passwords_and_nats_tokens_but_keeps_user_names() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("nats://s3cr3t-token@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("not a url"), "<unparseable url>");
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=verify-full&password=s3cret"),
            "postgres://app@db/x?sslmode=verify-full&password=***"
        );
    }
}
