//! TLS interception of one connection, without I/O: the guest's TLS is terminated with a leaf
//! certificate minted for the name it asked for, the upstream's is originated anew and
//! verified against that name, and the plaintext between them goes through the HTTP/1 request
//! rewriter (secrets substituted toward their hosts, each request shown to the policy), the
//! HTTP/2 inspector (each request shown to the policy; toward hosts no secret is bound to) or,
//! for other protocols toward such hosts, the placeholder scanner. The caller moves bytes:
//! [`Mitm::guest_bytes`] / [`Mitm::take_for_upstream`] one way, [`Mitm::upstream_bytes`] /
//! [`Mitm::take_for_guest`] the other.
//!
//! The guest's handshake is answered only after the upstream's completed, so the guest gets the
//! protocol (ALPN) the upstream chose; a host a secret is bound to is offered HTTP/1.1 only
//! (the rewriter speaks HTTP/1), others get what the guest offered.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{Accepted, Acceptor};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::ca::Leaves;
use crate::http1::{Request, RequestRewriter, RewriteError};
use crate::http2::{InspectError, RequestInspector};
use crate::policy::normalize_domain;
use crate::secrets::{HostPattern, Scanner, Secrets};

/// Debian's (and most distributions') bundle of trusted roots, for verifying upstreams.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Plaintext held each way before the caller must drain it (back-pressure).
const MAX_PENDING: usize = 1 << 20;
/// Guest handshake bytes held while the upstream handshake runs.
const MAX_HELD: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum MitmError {
    #[error("guest TLS: {0}")]
    Guest(rustls::Error),
    #[error("the guest's ClientHello names no server (nothing to intercept)")]
    NoName,
    #[error("upstream TLS to {name}: {err}")]
    Upstream { name: String, err: rustls::Error },
    #[error("{0}")]
    Request(#[from] RewriteError),
    #[error("{0}")]
    Http2(#[from] InspectError),
    #[error("placeholder of secret {secret} sent toward {host}: blocked")]
    Violation { secret: String, host: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Errors setting interception up (a bad CA file, no trusted roots).
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("{path}: {why}")]
    Roots { path: String, why: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What interception needs, shared by every intercepted flow of a process.
#[derive(Debug)]
pub struct Intercept {
    pub leaves: Arc<Leaves>,
    pub secrets: Secrets,
    /// A placeholder where it must not be ends the flow (`block`) or is only logged.
    pub block_violations: bool,
    /// TCP ports whose flows are intercepted (443 unless set).
    pub ports: Vec<u16>,
    /// Names whose flows pass through untouched (certificate-pinned clients).
    pub bypass: Vec<HostPattern>,
    upstream: ClientConfig,
    /// Guest-side configurations by the protocol they offer: none, HTTP/1.1, HTTP/2.
    guest: [Arc<ServerConfig>; 3],
}

/// ring's suites with AES-128-GCM (SHA-256) first: both legs pay a handshake per connection,
/// and SHA-384's key schedule (no SHA-512 instructions on x86) and AES-256 cost more for no
/// practical gain (AES-128-GCM is TLS 1.3's mandatory suite and browsers' first choice).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

impl Intercept {
    /// `roots`: PEM files of CAs upstreams are verified against (the system bundle, plus
    /// `--tls-upstream-ca`); `insecure` skips verification (never by default).
    pub fn new(
        leaves: Arc<Leaves>,
        secrets: Secrets,
        roots: &[&Path],
        insecure: bool,
    ) -> Result<Intercept, InterceptError> {
        let mut store = RootCertStore::empty();
        for path in roots {
            let bad = |why: String| InterceptError::Roots {
                path: path.display().to_string(),
                why,
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
            let mut n = 0;
            for c in certs {
                let c = c.map_err(|e| bad(e.to_string()))?;
                // A bundle may hold roots rustls cannot use; the rest still count.
                if store.add(c).is_ok() {
                    n += 1;
                }
            }
            if n == 0 {
                return Err(bad("no usable CA certificate in it".into()));
            }
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let upstream = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(store).with_no_client_auth()
        };
        let guest_cfg = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, InterceptError> {
            let mut c = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(leaves.clone());
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            c.ignore_client_order = true;
            Ok(Arc::new(c))
        };
        let guest = [
            guest_cfg(&[])?,
            guest_cfg(&[b"http/1.1"])?,
            guest_cfg(&[b"h2"])?,
        ];
        Ok(Intercept {
            leaves,
            secrets,
            block_violations: true,
            ports: vec![443],
            bypass: Vec::new(),
            upstream,
            guest,
        })
    }
}

/// Accepts any upstream certificate (`--tls-insecure-upstream`); signatures are still checked
/// so the handshake itself is sound.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

enum Phase {
    /// Reading the guest's ClientHello.
    Hello(Box<Acceptor>),
    /// Not intercepted after all (a bypassed name, or none): the raw hello goes upstream.
    Bypassed,
    /// The upstream handshake, the guest's ClientHello waiting for its outcome.
    Upstream(Box<Accepted>, Box<ClientConnection>),
    Open(Box<ServerConnection>, Box<ClientConnection>),
    Failed,
}

/// How the plaintext from the guest is read.
enum Inner {
    Http1(Box<RequestRewriter>),
    /// HTTP/2 (toward a host no secret is bound to): each request shown to the policy, the
    /// stream scanned.
    Http2(Box<RequestInspector>, Box<Scanner>),
    /// Anything else toward a host no secret is bound to: scanned only.
    Scanned(Box<Scanner>),
}

/// One intercepted connection.
pub struct Mitm {
    cfg: Arc<Intercept>,
    phase: Phase,
    name: Option<String>,
    alpn: Option<Vec<u8>>,
    inner: Option<Inner>,
    /// Alert bytes for the guest after a failed hello.
    alert: Vec<u8>,
    /// Guest bytes after its hello, until the guest side exists.
    held: Vec<u8>,
    /// The guest's bytes until its hello is read, in case the flow is bypassed.
    raw: Vec<u8>,
    /// Why the flow was bypassed.
    bypass_reason: Option<&'static str>,
    /// Plaintext waiting for the other side's TLS writer.
    to_up_plain: Vec<u8>,
    guest_closed: bool,
    upstream_closed: bool,
    /// Violations logged (not blocked): secret names, in order.
    pub logged_violations: Vec<String>,
}

impl std::fmt::Debug for Mitm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mitm")
            .field("name", &self.name)
            .field("alpn", &self.alpn)
            .finish_non_exhaustive()
    }
}

impl Mitm {
    pub fn new(cfg: Arc<Intercept>) -> Mitm {
        Mitm {
            cfg,
            phase: Phase::Hello(Box::default()),
            name: None,
            alpn: None,
            inner: None,
            alert: Vec::new(),
            held: Vec::new(),
            raw: Vec::new(),
            bypass_reason: None,
            to_up_plain: Vec::new(),
            guest_closed: false,
            upstream_closed: false,
            logged_violations: Vec::new(),
        }
    }

    /// The server name the guest asked for (normalized), once its ClientHello was read.
    pub fn server_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The protocol both sides agreed on, once open.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// Whether both handshakes are done.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(..))
    }

    /// Substitutions made per secret (by index), and requests seen.
    pub fn counts(&self) -> (Vec<u64>, u64) {
        match &self.inner {
            Some(Inner::Http1(rw)) => (rw.counts.clone(), rw.requests),
            Some(Inner::Http2(ins, _)) => (vec![0; self.cfg.secrets.len()], ins.requests),
            _ => (vec![0; self.cfg.secrets.len()], 0),
        }
    }

    /// Whether the caller should hold guest bytes back (the upstream side is full).
    pub fn upstream_full(&self) -> bool {
        self.to_up_plain.len() >= MAX_PENDING
    }

    /// TLS bytes from the guest. `admit` sees each HTTP/1 request (Host) before it is sent.
    pub fn guest_bytes(
        &mut self,
        mut data: &[u8],
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), MitmError> {
        let r = self.guest_bytes_inner(&mut data, admit);
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn guest_bytes_inner(
        &mut self,
        data: &mut &[u8],
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), MitmError> {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Hello(acc) => {
                    let before = *data;
                    acc.read_tls(data)?;
                    self.raw
                        .extend_from_slice(&before[..before.len() - data.len()]);
                    match acc.accept() {
                        Ok(None) => continue,
                        Ok(Some(accepted)) => self.hello(accepted)?,
                        Err((e, mut alert)) => {
                            let _ = alert.write_all(&mut self.alert);
                            return Err(MitmError::Guest(e));
                        }
                    }
                }
                // Handshake records after the hello wait for the upstream (bounded).
                Phase::Upstream(..) => {
                    if self.held.len() + data.len() > MAX_HELD {
                        return Err(MitmError::Io(io::Error::other(
                            "guest handshake bytes piling up before the upstream answered",
                        )));
                    }
                    self.held.extend_from_slice(data);
                    return Ok(());
                }
                Phase::Bypassed => {
                    self.raw.extend_from_slice(data);
                    return Ok(());
                }
                Phase::Open(server, _) => {
                    server.read_tls(data)?;
                    if let Err(e) = server.process_new_packets() {
                        let _ = server.write_tls(&mut self.alert);
                        return Err(MitmError::Guest(e));
                    }
                    self.pump_guest_plaintext(admit)?;
                }
                Phase::Failed => return Ok(()),
            }
        }
        Ok(())
    }

    /// Whether guest bytes may be fed now.
    pub fn wants_guest(&self) -> bool {
        !matches!(self.phase, Phase::Failed) && !self.upstream_full()
    }

    /// The guest's bytes so far, once, if the flow turned out not to be intercepted (then
    /// they go upstream as they are and the caller relays the rest unchanged).
    pub fn bypassed(&mut self) -> Option<(Vec<u8>, &'static str)> {
        match self.phase {
            Phase::Bypassed => self
                .bypass_reason
                .take()
                .map(|why| (std::mem::take(&mut self.raw), why)),
            _ => None,
        }
    }

    fn hello(&mut self, accepted: Accepted) -> Result<(), MitmError> {
        let hello = accepted.client_hello();
        let Some(name) = hello.server_name().and_then(normalize_domain) else {
            // Nothing to impersonate: passed through (it still cannot reach a host the policy
            // denies; a placeholder inside stays unreadable to anyone without the session).
            self.phase = Phase::Bypassed;
            self.bypass_reason = Some("no server name");
            return Ok(());
        };
        if self.cfg.bypass.iter().any(|b| b.matches(&name)) {
            self.name = Some(name);
            self.phase = Phase::Bypassed;
            self.bypass_reason = Some("--tls-bypass");
            return Ok(());
        }
        self.raw = Vec::new();
        let offered: Vec<Vec<u8>> = hello
            .alpn()
            .map(|a| a.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let mut up = self.cfg.upstream.clone();
        up.alpn_protocols = if self.cfg.secrets.any_for(&name) {
            // The rewriter speaks HTTP/1: offered upstream only if the guest offered it (or
            // offered nothing, as plain HTTP/1 clients do).
            offered
                .iter()
                .filter(|p| p.as_slice() == b"http/1.1")
                .cloned()
                .collect()
        } else {
            offered
                .into_iter()
                .filter(|p| p.as_slice() == b"http/1.1" || p.as_slice() == b"h2")
                .collect()
        };
        let server_name = ServerName::try_from(name.clone()).map_err(|_| MitmError::NoName)?;
        let mut client = ClientConnection::new(Arc::new(up), server_name).map_err(|err| {
            MitmError::Upstream {
                name: name.clone(),
                err,
            }
        })?;
        // Plaintext is bounded by the relay's back-pressure (it feeds at most a socket
        // buffer's worth at once), not by rustls refusing writes mid-record.
        client.set_buffer_limit(None);
        self.name = Some(name);
        self.phase = Phase::Upstream(Box::new(accepted), Box::new(client));
        Ok(())
    }

    /// TLS bytes from the upstream.
    pub fn upstream_bytes(&mut self, data: &[u8]) -> Result<(), MitmError> {
        let r = self.upstream_bytes_inner(data);
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn upstream_bytes_inner(&mut self, mut data: &[u8]) -> Result<(), MitmError> {
        let name = self.name.clone().unwrap_or_default();
        while !data.is_empty() {
            let client = match &mut self.phase {
                Phase::Upstream(_, c) | Phase::Open(_, c) => c,
                Phase::Hello(_) | Phase::Bypassed | Phase::Failed => return Ok(()),
            };
            client.read_tls(&mut data)?;
            client
                .process_new_packets()
                .map_err(|err| MitmError::Upstream {
                    name: name.clone(),
                    err,
                })?;
            if matches!(self.phase, Phase::Upstream(..)) {
                self.maybe_open()?;
            }
            if let Phase::Open(server, client) = &mut self.phase {
                // Upstream plaintext straight to the guest.
                let mut buf = [0u8; 16384];
                loop {
                    match client.reader().read(&mut buf) {
                        Ok(0) => {
                            self.upstream_closed = true;
                            server.send_close_notify();
                            break;
                        }
                        Ok(n) => server.writer().write_all(&buf[..n])?,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Once the upstream handshake is done, answers the guest's hello with its protocol.
    fn maybe_open(&mut self) -> Result<(), MitmError> {
        let Phase::Upstream(_, client) = &self.phase else {
            return Ok(());
        };
        if client.is_handshaking() {
            return Ok(());
        }
        let alpn = client.alpn_protocol().map(<[u8]>::to_vec);
        let Phase::Upstream(accepted, client) = std::mem::replace(&mut self.phase, Phase::Failed)
        else {
            unreachable!()
        };
        let cfg = match alpn.as_deref() {
            Some(b"http/1.1") => &self.cfg.guest[1],
            Some(b"h2") => &self.cfg.guest[2],
            _ => &self.cfg.guest[0],
        };
        let server = match accepted.into_connection(cfg.clone()) {
            Ok(s) => s,
            Err((e, mut alert)) => {
                let _ = alert.write_all(&mut self.alert);
                return Err(MitmError::Guest(e));
            }
        };
        let name = self.name.clone().unwrap_or_default();
        self.inner = Some(if alpn.as_deref() == Some(b"h2") {
            Inner::Http2(Box::new(RequestInspector::new(&name)), Box::default())
        } else {
            Inner::Http1(Box::new(RequestRewriter::new(&self.cfg.secrets, &name)))
        });
        self.alpn = alpn;
        let mut server = Box::new(server);
        server.set_buffer_limit(None);
        let held = std::mem::take(&mut self.held);
        let mut rest = &held[..];
        while !rest.is_empty() {
            server.read_tls(&mut rest)?;
            if let Err(e) = server.process_new_packets() {
                let _ = server.write_tls(&mut self.alert);
                return Err(MitmError::Guest(e));
            }
        }
        self.phase = Phase::Open(server, client);
        Ok(())
    }

    /// Guest plaintext through the rewriter (or scanner) into the upstream's writer.
    fn pump_guest_plaintext(
        &mut self,
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), MitmError> {
        let Phase::Open(server, client) = &mut self.phase else {
            return Ok(());
        };
        let name = self.name.as_deref().unwrap_or_default();
        let secrets = &self.cfg.secrets;
        let mut buf = [0u8; 16384];
        loop {
            let n = match server.reader().read(&mut buf) {
                Ok(0) => {
                    self.guest_closed = true;
                    if let Some(Inner::Http1(rw)) = &mut self.inner {
                        rw.finish(secrets, &mut self.to_up_plain);
                    }
                    client.send_close_notify();
                    0
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e.into()),
            };
            if n > 0 {
                let data = &buf[..n];
                // Another protocol inside TLS toward a host no secret is bound to: passed
                // through, scanned for placeholders like HTTP/2.
                if let Some(Inner::Http1(rw)) = &self.inner {
                    if rw.requests == 0 && !secrets.any_for(name) && !looks_like_http1(data) {
                        self.inner = Some(Inner::Scanned(Box::default()));
                    }
                }
                let (found, passthrough) = match self.inner.as_mut() {
                    Some(Inner::Http1(rw)) => {
                        rw.push(secrets, data, &mut self.to_up_plain, admit)?;
                        let found = rw.violations.first().copied();
                        rw.violations.clear();
                        (found, false)
                    }
                    Some(Inner::Http2(ins, sc)) => {
                        ins.push(secrets, data, &mut self.to_up_plain, admit)?;
                        let found = ins.violations.first().copied();
                        ins.violations.clear();
                        (found.or_else(|| sc.scan(secrets, data)), false)
                    }
                    Some(Inner::Scanned(sc)) => (sc.scan(secrets, data), true),
                    None => (None, false),
                };
                if let Some(i) = found {
                    let secret = secrets.get(i).name().to_string();
                    if self.cfg.block_violations {
                        return Err(MitmError::Violation {
                            secret,
                            host: name.to_string(),
                        });
                    }
                    self.logged_violations.push(secret);
                }
                if passthrough {
                    self.to_up_plain.extend_from_slice(data);
                }
            }
            if !self.to_up_plain.is_empty() {
                client.writer().write_all(&self.to_up_plain)?;
                self.to_up_plain.clear();
            }
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// TLS bytes for the upstream (handshake and data).
    pub fn take_for_upstream(&mut self, out: &mut Vec<u8>) -> Result<(), MitmError> {
        if let Phase::Upstream(_, c) | Phase::Open(_, c) = &mut self.phase {
            while c.wants_write() {
                c.write_tls(out)?;
            }
        }
        Ok(())
    }

    /// TLS bytes for the guest (handshake, data, alerts).
    pub fn take_for_guest(&mut self, out: &mut Vec<u8>) -> Result<(), MitmError> {
        out.append(&mut self.alert);
        if let Phase::Open(s, _) = &mut self.phase {
            while s.wants_write() {
                s.write_tls(out)?;
            }
        }
        Ok(())
    }

    /// The guest's TCP stream ended (FIN without close_notify).
    pub fn guest_eof(&mut self) {
        if let Phase::Open(_, c) = &mut self.phase {
            if let Some(Inner::Http1(rw)) = &mut self.inner {
                rw.finish(&self.cfg.secrets, &mut self.to_up_plain);
                let _ = c.writer().write_all(&self.to_up_plain);
                self.to_up_plain.clear();
            }
            c.send_close_notify();
        }
        self.guest_closed = true;
    }

    /// The upstream's TCP stream ended.
    pub fn upstream_eof(&mut self) {
        if let Phase::Open(s, _) = &mut self.phase {
            s.send_close_notify();
        }
        self.upstream_closed = true;
    }

    /// Whether each side has said all it will.
    pub fn closed(&self) -> (bool, bool) {
        (self.guest_closed, self.upstream_closed)
    }

    fn fail(&mut self) {
        self.phase = Phase::Failed;
    }
}

/// Whether `data` can begin an HTTP/1 request line (a method in capitals, then a space).
fn looks_like_http1(data: &[u8]) -> bool {
    let method = data.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method > 0 && (data.len() == method || (method < 16 && data[method] == b' '))
}

#[cfg(test)]
mod tests;
