//! Test certificates: a private CA per test, server certificates for `localhost` /
//! `127.0.0.1`, client certificates, and the broken cases the error-message tests need (expired,
//! wrong host, signed by another CA). Everything is written as PEM files into a temporary
//! directory the [`TestPki`] owns.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A private certificate authority and the files it issued, in a directory removed on drop.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    /// PEM file of the CA certificate (what a client trusts).
    pub ca_cert: PathBuf,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What an issued certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

impl TestPki {
    /// A new CA named `name` (its common name, also the file prefix).
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outbox-pki-")
            .tempdir()
            .expect("temporary directory for test certificates");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("self-signed CA");
        let ca_cert = dir.path().join(format!("{name}-ca.pem"));
        write_private(&ca_cert, &ca.pem());
        Self {
            dir,
            ca_key,
            ca_params,
            ca_cert,
        }
    }

    /// The directory holding every file of this PKI.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `localhost` and `127.0.0.1`, valid from yesterday for a year.
    pub fn server(&self, name: &str) -> CertFiles {
        self.issue(name, &["localhost", "127.0.0.1"], Usage::Server, false)
    }

    /// A client certificate whose common name is `user` (the user name for certificate
    /// authentication: PostgreSQL `cert`, RabbitMQ EXTERNAL, NATS `verify_and_map`).
    pub fn client(&self, user: &str) -> CertFiles {
        self.issue(user, &[], Usage::Client, false)
    }

    /// A server certificate for the given names only (a host-name mismatch when the client
    /// connects to `127.0.0.1` and `names` lacks it).
    pub fn server_for(&self, name: &str, names: &[&str]) -> CertFiles {
        self.issue(name, names, Usage::Server, false)
    }

    /// A server certificate for `localhost` and `127.0.0.1` that expired yesterday.
    pub fn expired_server(&self, name: &str) -> CertFiles {
        self.issue(name, &["localhost", "127.0.0.1"], Usage::Server, true)
    }

    fn issue(&self, name: &str, names: &[&str], usage: Usage, expired: bool) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS name")),
            })
            .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(30);
            params.not_after = now - time::Duration::days(1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(365);
        }
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign certificate");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        write_private(&files.cert, &cert.pem());
        write_private(&files.key, &key.serialize_pem());
        files
    }
}

/// Writes `contents` readable by the owner only: PostgreSQL refuses a key file that others can
/// read, and the relay's own check of key files expects the same (a secret file, too: the relay
/// warns about one every user may read).
pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
