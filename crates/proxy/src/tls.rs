//! TLS termination for ports a deployment declares `tls` (Hathora's TLS proxy): the node
//! accepts TLS on the public port with the operator's certificate, or with a self-signed one it
//! makes at first start and keeps, and forwards plain TCP to the process.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A client that has not finished its handshake by then is dropped (its flow is given back).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `tls` ports present to players.
#[derive(Clone)]
pub struct Identity {
    pub(crate) acceptor: TlsAcceptor,
    /// SHA-256 of the leaf certificate, as `AB:CD:…`.
    pub fingerprint: String,
    /// Where the certificate comes from (for the log).
    pub source: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .field("source", &self.source)
            .finish()
    }
}

impl Identity {
    /// The operator's certificate chain and private key (PEM files).
    pub fn from_files(cert: &Path, key: &Path) -> io::Result<Identity> {
        let bad = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot read the TLS {what} {}: {e}", p.display()),
            )
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad("certificate", cert, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad("certificate", cert, &e))?;
        if chain.is_empty() {
            return Err(bad("certificate", cert, &"no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("key", key, &e))?;
        build(chain, key, cert.display().to_string())
    }

    /// A self-signed certificate for `host`, made at the first start and kept in `dir`
    /// (`cert.pem`, `key.pem` readable by root only); made again when `host` changes.
    pub fn self_signed(dir: &Path, host: &str) -> io::Result<Identity> {
        let (cert_path, key_path, host_path) = paths(dir);
        let same_host = std::fs::read_to_string(&host_path).is_ok_and(|h| h == host);
        if !(same_host && cert_path.is_file() && key_path.is_file()) {
            let made = rcgen::generate_simple_self_signed(vec![host.to_string()])
                .map_err(|e| io::Error::other(format!("cannot make a TLS certificate: {e}")))?;
            std::fs::create_dir_all(dir)?;
            write_private(&key_path, made.key_pair.serialize_pem().as_bytes())?;
            write_private(&cert_path, made.cert.pem().as_bytes())?;
            std::fs::write(&host_path, host)?;
        }
        let mut id = Identity::from_files(&cert_path, &key_path)?;
        id.source = format!("self-signed for {host}, {}", cert_path.display());
        Ok(id)
    }
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("cert.pem"), dir.join("key.pem"), dir.join("host"))
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    source: String,
) -> io::Result<Identity> {
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, chain[0].as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the TLS certificate and key do not go together: {e}"),
            )
        })?;
    // Browsers' WebSockets speak HTTP/1.1 over TLS.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        fingerprint,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_identity_is_kept_and_made_again_for_another_host() {
        let dir = std::env::temp_dir().join(format!("lodge-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Identity::self_signed(&dir, "127.0.0.1").unwrap();
        let again = Identity::self_signed(&dir, "127.0.0.1").unwrap();
        assert_eq!(a.fingerprint, again.fingerprint, "kept across starts");
        let other = Identity::self_signed(&dir, "game.example.com").unwrap();
        assert_ne!(
            a.fingerprint, other.fingerprint,
            "a new host gets a new certificate"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        let wrong = Identity::from_files(&dir.join("cert.pem"), &dir.join("cert.pem"));
        assert!(wrong.is_err(), "a certificate is no key");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
