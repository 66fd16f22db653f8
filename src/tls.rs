//! TLS termination from PEM files (rustls with the ring provider), and their reload.
//!
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, as the nginx front offered.
//!
//! The certificate is picked per handshake by [`CertStore`] (a rustls
//! `ResolvesServerCert`), so replacing it is one atomic pointer swap: handshakes
//! after the swap get the new pair, sessions already established keep theirs and
//! no connection is dropped. A [`Reloader`] swaps it on SIGHUP and when the files
//! change on disk (cert-manager and certbot replace them in place or through a
//! symlink). A new pair that does not load (unparseable, key not matching the
//! certificate) is refused with an ERROR and the old one stays.
//!
//! Change detection hashes the two files' contents every `tls_reload_interval`
//! rather than watching mtimes or using inotify: a Kubernetes secret volume swaps
//! a `..data` symlink (the files' own mtimes need not change, and inotify on the
//! file itself watches the old inode), and a same-size rewrite within one mtime
//! tick is invisible to mtime+size. Reading two small files every few seconds
//! costs nothing, needs no extra crate, and follows every kind of replacement.
//!
//! It knows nothing of HTTP or of what the connections carry.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{IntGauge, Registry};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;
use crate::metrics::CounterSet;

/// A TLS configuration problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_cert {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("tls_key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("tls_cert {cert} and tls_key {key} do not form a pair: {message}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("upstream_ca {path}: {message}")]
    UpstreamCa { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

crate::metrics::labels! {
    /// Results of a reload, as the `result` label of `regguard_tls_reloads_total`.
    enum ReloadResult {
        Ok => "ok",
        Error => "error",
    }
}

fn read(path: &Path, err: impl Fn(String) -> TlsError) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Cert {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// The end-entity certificate's notAfter, as a Unix time.
fn not_after(der: &CertificateDer<'_>, path: &Path) -> Result<i64, TlsError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .map_err(|e| TlsError::Cert {
            path: path.to_path_buf(),
            message: format!("cannot read the certificate's validity: {e}"),
        })
}

/// The SHA-256 of both files' contents: what "the files changed" means.
fn fingerprint(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// A certificate and key loaded from the files, checked to belong together.
struct Loaded {
    key: Arc<CertifiedKey>,
    not_after: i64,
    fingerprint: [u8; 32],
}

/// Both files' contents.
fn read_pair(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let cert = read(&files.cert, |message| TlsError::Cert {
        path: files.cert.clone(),
        message,
    })?;
    let key = read(&files.key, |message| TlsError::Key {
        path: files.key.clone(),
        message,
    })?;
    Ok((cert, key))
}

fn load(
    files: &TlsFiles,
    (cert_pem, key_pem): (&[u8], &[u8]),
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Loaded, TlsError> {
    let certs = parse_certs(cert_pem, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let not_after = certs
        .first()
        .map(|c| not_after(c, &files.cert))
        .transpose()?
        .unwrap_or(0);
    // `from_der` loads the key and checks it matches the certificate's public key.
    let key = CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        not_after,
        fingerprint: fingerprint(cert_pem, key_pem),
    })
}

/// The certificate handshakes get: swapped whole, read per handshake.
///
/// A std `RwLock` rather than a lock-free cell: the read side clones one `Arc`
/// and is never held across an await, so it is uncontended in practice.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Reloads the pair into a [`CertStore`] on SIGHUP and on file changes.
pub struct Reloader {
    files: TlsFiles,
    store: Arc<CertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    reloads: CounterSet<ReloadResult>,
    expiry: IntGauge,
    /// The fingerprint of the pair in use.
    loaded: [u8; 32],
    /// The fingerprint last tried and refused (not retried until the files change again).
    refused: Option<[u8; 32]>,
    /// The fingerprint seen at the previous poll: a change is acted on once it is
    /// stable for one interval, so a pair replaced one file at a time is not
    /// refused half-written.
    previous: [u8; 32],
}

impl Reloader {
    /// Reloads now (SIGHUP, or a change seen on disk). Returns whether the pair was swapped.
    fn reload(&mut self, why: &'static str) -> bool {
        let contents = read_pair(&self.files);
        let loaded = contents
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|(c, k)| {
                load(&self.files, (c, k), &self.provider).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(l) => {
                self.store.set(l.key);
                self.loaded = l.fingerprint;
                self.previous = l.fingerprint;
                self.refused = None;
                self.expiry.set(l.not_after);
                self.reloads.inc(ReloadResult::Ok);
                tracing::info!(
                    trigger = why,
                    cert = %self.files.cert.display(),
                    not_after = l.not_after,
                    "TLS certificate reloaded"
                );
                true
            }
            Err(error) => {
                // Not retried by the file poll until the files change again.
                if let Ok((c, k)) = &contents {
                    self.refused = Some(fingerprint(c, k));
                }
                self.reloads.inc(ReloadResult::Error);
                tracing::error!(
                    trigger = why,
                    error = %error,
                    "TLS certificate reload refused; keeping the certificate in use"
                );
                false
            }
        }
    }

    /// One poll of the files' contents: reloads when they changed and have stayed the
    /// same since the last poll.
    fn poll(&mut self, contents: Option<(Vec<u8>, Vec<u8>)>) {
        // Unreadable: mid-replacement, or gone; look again next time (SIGHUP reports why).
        let Some((cert, key)) = contents else {
            return;
        };
        let now = fingerprint(&cert, &key);
        let stable = now == self.previous;
        self.previous = now;
        if !stable || now == self.loaded || self.refused == Some(now) {
            return;
        }
        self.reload("file change");
    }

    /// Watches for SIGHUP and polls the files every `interval`, forever.
    async fn run(mut self, mut hangup: Option<tokio::signal::unix::Signal>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = hup => {
                    if got.is_none() {
                        hangup = None;
                        continue;
                    }
                    tracing::info!("SIGHUP received: reloading the TLS certificate");
                    self.reload("SIGHUP");
                }
                _ = tick.tick() => {
                    let files = self.files.clone();
                    let contents = tokio::task::spawn_blocking(move || {
                        Some((std::fs::read(&files.cert).ok()?, std::fs::read(&files.key).ok()?))
                    })
                    .await
                    .ok()
                    .flatten();
                    self.poll(contents);
                }
            }
        }
    }
}

/// Builds the acceptor from the configured PEM files, and starts reloading them on
/// SIGHUP and every `reload_interval` when they change. Metrics go to `registry`.
pub fn acceptor(
    files: &TlsFiles,
    reload_interval: Duration,
    registry: &Registry,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert_pem, key_pem) = read_pair(files)?;
    let first = load(files, (&cert_pem, &key_pem), &provider)?;
    let store = Arc::new(CertStore {
        current: RwLock::new(first.key),
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let reloads = CounterSet::new(
        registry,
        "regguard_tls_reloads_total",
        "TLS certificate reloads (SIGHUP or a change of the files), by result",
        "result",
    )?;
    let expiry = IntGauge::new(
        "regguard_tls_certificate_expiry_seconds",
        "notAfter of the TLS certificate in use, as a Unix time: alert before it passes",
    )?;
    registry.register(Box::new(expiry.clone()))?;
    expiry.set(first.not_after);

    // Registered now, before the listeners report ready: a SIGHUP from then on reloads
    // rather than terminating the process (SIGHUP's default action).
    let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGHUP; TLS files are still reloaded when they change");
            None
        }
    };
    let reloader = Reloader {
        files: files.clone(),
        store,
        provider,
        reloads,
        expiry,
        loaded: first.fingerprint,
        refused: None,
        previous: first.fingerprint,
    };
    tokio::spawn(reloader.run(hangup, reload_interval));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The CA bundle that `https://` upstreams must chain to (`upstream_ca`), as
/// nginx's `proxy_ssl_trusted_certificate`: these roots only, not the system's.
pub fn upstream_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let err = |message: String| TlsError::UpstreamCa {
        path: path.to_path_buf(),
        message,
    };
    let pem = read(path, err)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    Ok(roots)
}
