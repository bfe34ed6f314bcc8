//! TLS for `amqps://`: the rustls client configuration built from `[sinks.<name>.tls]` (whom
//! to trust, the relay's client certificate, the name the broker's certificate must carry),
//! the password file, and the failed handshakes turned into sentences that name the setting to
//! fix. No AMQP here.
//!
//! The handshake runs on rustls with ring (the stack lapin, async-nats and sqlx use in this
//! binary), started by `service.rs` on the TCP stream it opened itself: lapin's own TLS upgrade
//! always checks the certificate against the URL's host and cannot be told another name.

use std::io;
use std::path::Path;
use std::sync::Arc;

use lapin::tcp::RustlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use super::config::AmqpTls;
use crate::Secret;

/// What a TLS connection to the broker needs: the rustls configuration and the name to check.
#[derive(Clone)]
pub(super) struct TlsSetup {
    pub connector: RustlsConnector,
    /// The name the broker's certificate must carry: `tls.server_name`, else the URL's host.
    pub server_name: String,
    /// Whether the trust comes from `tls.ca_file` (else the system's store).
    ca_file: bool,
    /// Whether a client certificate is configured.
    client_cert: bool,
}

impl TlsSetup {
    /// Reads the files of `tls` and builds the configuration. Errors start with the key to fix
    /// (below `sinks.<name>.`).
    pub fn new(tls: &AmqpTls, url_host: &str) -> Result<Self, String> {
        let server_name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| url_host.to_string());
        if ServerName::try_from(server_name.as_str()).is_err() {
            let key = if tls.server_name.is_some() {
                "tls.server_name"
            } else {
                "url"
            };
            return Err(format!(
                "{key}: {server_name:?} is not a DNS name or an IP address, so the broker's certificate cannot be checked against it"
            ));
        }
        let mut roots = RootCertStore::empty();
        match &tls.ca_file {
            Some(path) => {
                let certs = read_certs("tls.ca_file", path)?;
                for (i, cert) in certs.into_iter().enumerate() {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "tls.ca_file: certificate {} in {} is not a usable CA certificate: {e}",
                            i + 1,
                            path.display()
                        )
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    return Err(
                        "tls.ca_file: the system's CA store is empty or unreadable (install ca-certificates, or set SSL_CERT_FILE); set tls.ca_file to the CA that signs the broker's certificate"
                            .into(),
                    );
                }
            }
        }
        // The provider is named rather than taken from the process default, so that nothing
        // another library installs changes what this connection accepts.
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls: {e}"))?
                .with_root_certificates(roots);
        let config = match (&tls.cert_file, &tls.key_file) {
            (Some(cert_path), Some(key_path)) => {
                let chain = read_certs("tls.cert_file", cert_path)?;
                let key = read_key(key_path)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "tls.key_file: {} does not go with the certificate in tls.cert_file {} ({e}): set the key that belongs to the certificate",
                        key_path.display(),
                        cert_path.display()
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Self {
            connector: RustlsConnector::from(config),
            server_name,
            ca_file: tls.ca_file.is_some(),
            client_cert: tls.cert_file.is_some(),
        })
    }

    /// A sentence for a TLS connection that failed during the handshake: what went wrong and
    /// the key to change (`prefix` is `sinks.<name>.`).
    pub fn describe_failure(&self, e: &io::Error, prefix: &str) -> String {
        let trust = if self.ca_file {
            format!("the CA in {prefix}tls.ca_file")
        } else {
            format!("the system's CA store ({prefix}tls.ca_file is not set)")
        };
        let name = &self.server_name;
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted => format!(
                    "the server closed the connection during the TLS handshake ({e}): check that the port is the broker's TLS listener and that it accepts the relay's client certificate ({prefix}tls.cert_file)"
                ),
                _ => format!("TLS handshake failed: {e}"),
            };
        };
        match tls {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the broker's certificate is not signed by a CA the relay trusts ({trust}): set {prefix}tls.ca_file to the CA that issued it ({tls})"
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "the broker's certificate is not valid for {name:?} ({tls}): connect with a host name the certificate lists in {prefix}url, or set {prefix}tls.server_name to one"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                    "the broker's certificate has expired ({tls}): renew it on the broker (if it is not expired, check this machine's clock)"
                ),
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    format!(
                        "the broker's certificate is not valid yet ({tls}): check the clocks of this machine and of the broker"
                    )
                }
                _ => format!(
                    "the broker's certificate was refused ({tls}); it must be signed by {trust} and name {name:?}"
                ),
            },
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure
                    if !self.client_cert =>
                {
                    format!(
                        "the broker requires a client certificate ({tls}): set {prefix}tls.cert_file and {prefix}tls.key_file"
                    )
                }
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                | AlertDescription::HandshakeFailure => format!(
                    "the broker refused the relay's client certificate ({tls}): {prefix}tls.cert_file must be signed by a CA the broker trusts (its ssl_options.cacertfile) and be valid now"
                ),
                _ => format!("the broker ended the TLS handshake: {tls}"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!(
                    "the server did not answer in TLS ({tls}): the port looks like a plaintext AMQP listener; use amqps:// only with the broker's TLS port (5671 by default), or amqp:// for a plaintext one"
                )
            }
            rustls::Error::PeerIncompatible(_) => format!(
                "the broker offers no TLS version or cipher suite the relay accepts (TLS 1.2 or 1.3 with forward secrecy) ({tls}): update its ssl_options.versions and ciphers"
            ),
            _ => format!("TLS handshake failed: {tls}"),
        }
    }
}

impl TlsSetup {
    /// A sentence for a connection the broker dropped right after the TLS handshake, before
    /// the AMQP one: with TLS 1.3 that is how a broker refuses a missing or untrusted client
    /// certificate (its alert is often lost with the connection).
    pub fn describe_drop_after_handshake(&self, error: &str, prefix: &str) -> String {
        if self.client_cert {
            format!(
                "the broker closed the connection right after the TLS handshake ({error}): it most likely refused the relay's client certificate: {prefix}tls.cert_file must be signed by a CA the broker trusts (its ssl_options.cacertfile) and be valid now"
            )
        } else {
            format!(
                "the broker closed the connection right after the TLS handshake ({error}): it most likely requires a client certificate: set {prefix}tls.cert_file and {prefix}tls.key_file"
            )
        }
    }
}

/// Reads the password file: its contents without one trailing newline.
pub(super) fn read_password_file(path: &Path) -> Result<Secret, String> {
    crate::sinks::files::read_secret_file(path)
}

/// Every certificate of a PEM file; at least one.
fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{key}: {} cannot be read ({e})", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {} is not a PEM file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no certificate (a PEM file with -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of `tls.key_file`, which only its owner may read.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    crate::sinks::files::check_private_key(path).map_err(|e| format!("tls.key_file: {e}"))?;
    let bytes = std::fs::read(path)
        .map_err(|e| format!("tls.key_file: {} cannot be read ({e})", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "tls.key_file: {} holds no usable private key ({e}): give an unencrypted PEM key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(ca: bool, client: bool) -> TlsSetup {
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        TlsSetup {
            connector: RustlsConnector::from(config),
            server_name: "rabbit.internal".into(),
            ca_file: ca,
            client_cert: client,
        }
    }

    fn said(setup: &TlsSetup, e: rustls::Error) -> String {
        setup.describe_failure(&io::Error::new(io::ErrorKind::InvalidData, e), "sinks.r.")
    }

    #[test]
    fn handshake_failures_name_the_key_to_fix() {
        let s = setup(true, false);
        let e = said(&s, CertificateError::Expired.into());
        assert!(e.starts_with("the broker's certificate has expired"), "{e}");
        let e = said(&s, CertificateError::UnknownIssuer.into());
        assert!(
            e.contains("(the CA in sinks.r.tls.ca_file): set sinks.r.tls.ca_file"),
            "{e}"
        );
        let e = said(&setup(false, false), CertificateError::UnknownIssuer.into());
        assert!(
            e.contains("the system's CA store (sinks.r.tls.ca_file is not set)"),
            "{e}"
        );
        let e = said(&s, CertificateError::NotValidForName.into());
        assert!(
            e.contains("not valid for \"rabbit.internal\"")
                && e.contains("sinks.r.tls.server_name"),
            "{e}"
        );
        let e = said(
            &s,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        );
        assert!(
            e.contains("requires a client certificate")
                && e.ends_with("set sinks.r.tls.cert_file and sinks.r.tls.key_file"),
            "{e}"
        );
        let e = said(
            &setup(true, true),
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        );
        assert!(e.contains("refused the relay's client certificate"), "{e}");
        let e = s.describe_drop_after_handshake("reset", "sinks.r.");
        assert!(e.contains("requires a client certificate"), "{e}");
    }
}
