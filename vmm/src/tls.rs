//! The process-wide side of TLS interception: one sandbox CA (loaded from, or made in,
//! [`crate::assets::ca_dir`]) and one leaf cache, shared by every sandbox this process runs.

use std::path::Path;
use std::sync::{Arc, Mutex};

use msb_netstack::ca::{Ca, CaError, Leaves};
use msb_netstack::intercept::{Intercept, InterceptError, SYSTEM_ROOTS};
use msb_netstack::secrets::{HostPattern, Secrets};

/// Errors setting interception up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the sandbox CA: {0}")]
    Ca(#[from] CaError),
    #[error("{0}")]
    Intercept(#[from] InterceptError),
    #[error("no CA to verify upstream servers with: {SYSTEM_ROOTS} is missing (install ca-certificates) and no --tls-upstream-ca FILE was given")]
    NoRoots,
}

/// The leaf minter of this process (the CA loaded once).
pub fn leaves() -> Result<Arc<Leaves>, TlsError> {
    static LEAVES: Mutex<Option<Arc<Leaves>>> = Mutex::new(None);
    let mut l = LEAVES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = &*l {
        return Ok(l.clone());
    }
    let ca = Ca::load_or_create(&crate::assets::ca_dir())?;
    let made = Arc::new(Leaves::new(ca)?);
    *l = Some(made.clone());
    Ok(made)
}

/// How a sandbox intercepts TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub secrets: Secrets,
    /// Intercepted TCP ports (443 when empty).
    pub ports: Vec<u16>,
    pub bypass: Vec<HostPattern>,
    /// Extra CAs upstreams may chain to (besides the system's).
    pub upstream_cas: Vec<std::path::PathBuf>,
    /// Accept any upstream certificate (explicit only).
    pub insecure_upstream: bool,
    /// A placeholder where none may be only logged, not blocked.
    pub log_violations: bool,
}

impl TlsOptions {
    /// The netstack's interception settings, with this process's CA.
    pub fn build(&self) -> Result<Arc<Intercept>, TlsError> {
        let mut roots: Vec<&Path> = Vec::new();
        let system = Path::new(SYSTEM_ROOTS);
        if system.exists() {
            roots.push(system);
        }
        roots.extend(self.upstream_cas.iter().map(|p| p.as_path()));
        if roots.is_empty() && !self.insecure_upstream {
            return Err(TlsError::NoRoots);
        }
        let mut i = Intercept::new(
            leaves()?,
            self.secrets.clone(),
            &roots,
            self.insecure_upstream,
        )?;
        if !self.ports.is_empty() {
            i.ports = self.ports.clone();
        }
        i.bypass = self.bypass.clone();
        i.block_violations = !self.log_violations;
        Ok(Arc::new(i))
    }
}
