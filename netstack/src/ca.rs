//! The sandbox CA and the leaf certificates interception presents to guests.
//!
//! One CA per installation (ECDSA P-256, ten years), its key kept on the host only (a 0700
//! directory, the key file 0600); guests get its certificate to trust. Leaf certificates are
//! minted per server name on demand (SAN = the name, valid from an hour ago for a week), all
//! with one ECDSA key made per process (minting is then one signature), and kept in a bounded
//! LRU shared by every flow and sandbox of the process. rcgen builds the certificates and
//! rustls signs handshakes with them: no cryptography of our own.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::policy::normalize_domain;

/// The CA's certificate file in its directory.
pub const CERT_FILE: &str = "ca.pem";
/// The CA's private key file in its directory (mode 0600).
pub const KEY_FILE: &str = "ca-key.pem";
/// Leaf certificates kept per process.
pub const LEAF_CACHE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable CA key ({why}); replace it with `msb-vmm ca --regenerate`")]
    BadKey { path: PathBuf, why: String },
    #[error("{path}: is readable by others (mode {mode:o}); it must be 0600 (chmod 600 it, or `msb-vmm ca --regenerate`)")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("making a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("loading a key into rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0:?} is not a server name a certificate can be made for")]
    BadName(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The installation's CA.
pub struct Ca {
    key: KeyPair,
    /// The certificate guests trust, as stored.
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The same name and key, re-made in memory to sign leaves (rcgen signs with a
    /// `Certificate`; its signature bytes differ from the stored one, its name and key do not).
    issuer: rcgen::Certificate,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("name", &ca_name(&self.key))
            .finish_non_exhaustive()
    }
}

/// `msb-vmm sandbox CA <8 hex digits of the key's hash>`: a name tied to the key, so one
/// regenerated is told apart from its predecessor.
fn ca_name(key: &KeyPair) -> String {
    let h = Sha256::digest(key.public_key_der());
    format!(
        "msb-vmm sandbox CA {:02x}{:02x}{:02x}{:02x}",
        h[0], h[1], h[2], h[3]
    )
}

fn ca_params(key: &KeyPair, not_before: OffsetDateTime) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ca_name(key));
    dn.push(DnType::OrganizationName, "msb-vmm");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_before + Duration::days(3650);
    Ok(p)
}

impl Ca {
    /// A new CA, in memory.
    pub fn generate() -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = ca_params(&key, OffsetDateTime::now_utc() - Duration::hours(1))?;
        p.serial_number = Some(random_serial());
        let cert = p.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ca::from_parts(key, cert_pem, cert.der().clone())
    }

    fn from_parts(
        key: KeyPair,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
    ) -> Result<Ca, CaError> {
        let issuer = ca_params(&key, OffsetDateTime::now_utc())?.self_signed(&key)?;
        Ok(Ca {
            key,
            cert_pem,
            cert_der,
            issuer,
        })
    }

    /// The CA kept in `dir`, made there first if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            return Ca::load(dir);
        }
        Ca::create(dir)
    }

    /// A new CA written to `dir` (replacing one there).
    pub fn create(dir: &Path) -> Result<Ca, CaError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let ca = Ca::generate()?;
        // Written under temporary names and renamed, so a reader never sees half a CA.
        write_private(&dir.join(KEY_FILE), ca.key.serialize_pem().as_bytes())?;
        write_private(&dir.join(CERT_FILE), ca.cert_pem.as_bytes())?;
        Ok(ca)
    }

    /// The CA kept in `dir`.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join(KEY_FILE);
        let meta = std::fs::metadata(&key_path).map_err(io_err(&key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyMode {
                path: key_path,
                mode,
            });
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey {
            path: key_path.clone(),
            why: e.to_string(),
        })?;
        if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(CaError::BadKey {
                path: key_path,
                why: "not an ECDSA P-256 key".into(),
            });
        }
        let cert_path = dir.join(CERT_FILE);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let cert_der = pem_der(&cert_pem).ok_or_else(|| CaError::BadKey {
            path: cert_path.clone(),
            why: "no certificate in it".into(),
        })?;
        Ca::from_parts(key, cert_pem, cert_der)
    }

    /// The certificate guests trust (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS's random source");
    b[0] &= 0x7f; // positive
    SerialNumber::from(b.to_vec())
}

/// Writes `data` to `path` with mode 0600, atomically (a temporary file renamed).
fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The first certificate in a PEM text.
fn pem_der(pem: &str) -> Option<CertificateDer<'static>> {
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = pem.find(begin)? + begin.len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    crate::http1::base64_decode(b64.as_bytes()).map(CertificateDer::from)
}

/// Leaf certificates minted on demand, cached, presented by the TLS front end.
pub struct Leaves {
    ca: Ca,
    key: KeyPair,
    signing: Arc<dyn rustls::sign::SigningKey>,
    cache: Mutex<Lru>,
}

impl fmt::Debug for Leaves {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaves")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl Leaves {
    pub fn new(ca: Ca) -> Result<Leaves, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der)?;
        Ok(Leaves {
            ca,
            key,
            signing,
            cache: Mutex::new(Lru::new(LEAF_CACHE)),
        })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The certificate chain and key for `name` (normalized), minted now or from the cache.
    pub fn get(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = normalize_domain(name).ok_or_else(|| CaError::BadName(name.into()))?;
        if let Some(c) = self.cache.lock().expect("leaf cache").get(&name) {
            return Ok(c);
        }
        let mut p = CertificateParams::new(vec![name.clone()])?;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(7);
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name.clone());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let leaf = p.signed_by(&self.key, &self.ca.issuer, &self.ca.key)?;
        let chain = vec![leaf.der().clone(), self.ca.cert_der.clone()];
        let ck = Arc::new(CertifiedKey::new(chain, self.signing.clone()));
        self.cache
            .lock()
            .expect("leaf cache")
            .insert(name, ck.clone());
        Ok(ck)
    }

    /// Leaves minted so far and held now (for stats and tests).
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("leaf cache").map.len()
    }
}

impl ResolvesServerCert for Leaves {
    /// The leaf for the name the guest asked for; no name, no certificate (the handshake
    /// fails: interception needs a name to impersonate).
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        match self.get(name) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!("tls: no certificate for {name:?}: {e}");
                None
            }
        }
    }
}

/// A small least-recently-used map: eviction scans for the oldest use (at most
/// [`LEAF_CACHE`] entries, once per miss when full).
struct Lru {
    map: HashMap<String, (Arc<CertifiedKey>, u64)>,
    cap: usize,
    tick: u64,
}

impl Lru {
    fn new(cap: usize) -> Lru {
        Lru {
            map: HashMap::new(),
            cap,
            tick: 0,
        }
    }

    fn get(&mut self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(name).map(|(c, t)| {
            *t = tick;
            c.clone()
        })
    }

    fn insert(&mut self, name: String, c: Arc<CertifiedKey>) {
        self.tick += 1;
        if self.map.len() >= self.cap && !self.map.contains_key(&name) {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(name, (c, self.tick));
    }
}

#[cfg(test)]
mod tests;
