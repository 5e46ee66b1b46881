//! Intercepted TCP flows in the relay: bytes between the guest's smoltcp socket, the
//! connection's [`Mitm`] and the host socket to the upstream; and the placeholder scan of
//! flows that are not intercepted (plain TCP, UDP, DNS), where a placeholder is a violation.

use crate::http1::Request;
use crate::intercept::{Intercept, Mitm};
use crate::secrets::Scanner;

use super::*;

/// Bytes held each way before reading more (back-pressure).
const MAX_QUEUED: usize = 256 << 10;

/// The interception state of one TCP flow.
pub(super) struct MitmFlow {
    mitm: Mitm,
    to_up: Vec<u8>,
    up_off: usize,
    to_guest: Vec<u8>,
    guest_off: usize,
    guest_eof: bool,
    up_shut: bool,
    host_eof: bool,
    guest_closed: bool,
    /// Whether the `tls` audit line was written.
    pub(super) announced: bool,
}

impl MitmFlow {
    pub(super) fn new(cfg: Arc<Intercept>) -> MitmFlow {
        MitmFlow {
            mitm: Mitm::new(cfg),
            to_up: Vec::new(),
            up_off: 0,
            to_guest: Vec::new(),
            guest_off: 0,
            guest_eof: false,
            up_shut: false,
            host_eof: false,
            guest_closed: false,
            announced: false,
        }
    }

    pub(super) fn mitm(&self) -> &Mitm {
        &self.mitm
    }
}

/// What one relay pass decided.
pub(super) enum Relayed {
    /// Still going (whether anything moved).
    Busy(bool),
    /// Not intercepted after all: these bytes go upstream first, then the flow is plain.
    Bypass(Vec<u8>, &'static str),
    /// Ended: the reason for the audit log.
    Fail(String),
}

/// Whether `data` (a datagram, a DNS query) carries a placeholder that blocks it; logs the
/// violation. (Takes the configuration, not the whole state, so callers may hold sockets.)
pub(super) fn datagram_violates(cfg: &Config, data: &[u8], dst: &str, proto: &'static str) -> bool {
    let Some(i) = cfg.intercept.as_ref() else {
        return false;
    };
    let Some(n) = Scanner::default().scan(&i.secrets, data) else {
        return false;
    };
    let name = i.secrets.get(n).name();
    let verdict = if i.block_violations {
        "blocked"
    } else {
        "logged"
    };
    tracing::debug!("netstack: secret {name} toward {dst}: {verdict}");
    if let Some(hook) = &cfg.log {
        let mut e = LogEvent::new("secret", proto, dst.to_string(), verdict, name.to_string());
        e.secret = Some(name.to_string());
        e.count = Some(1);
        hook(&e);
    }
    i.block_violations
}

/// One pass over an intercepted flow.
pub(super) fn relay(
    s: &mut tcp::Socket<'_>,
    stream: &mut TcpStream,
    m: &mut MitmFlow,
    established: bool,
    admit: &mut dyn FnMut(&Request) -> bool,
    audit: &mut Audit,
    (rate_in, throttled): (&mut Option<TokenBucket>, &mut bool),
) -> Relayed {
    let mut busy = false;
    // Guest to the mitm, as fast as the upstream side drains.
    while m.mitm.wants_guest() && m.to_up.len() - m.up_off < MAX_QUEUED && s.can_recv() {
        let r = s.recv(|buf| {
            let r = m.mitm.guest_bytes(buf, admit);
            (buf.len(), (buf.len(), r))
        });
        match r {
            Ok((n, Ok(()))) => {
                audit.bytes_out += n as u64;
                busy = true;
            }
            Ok((_, Err(e))) => return Relayed::Fail(e.to_string()),
            Err(_) => break,
        }
    }
    if let Some((raw, why)) = m.mitm.bypassed() {
        return Relayed::Bypass(raw, why);
    }
    if established && !m.guest_eof && !s.may_recv() && !s.can_recv() {
        m.mitm.guest_eof();
        m.guest_eof = true;
        busy = true;
    }
    if let Err(e) = m.mitm.take_for_upstream(&mut m.to_up) {
        return Relayed::Fail(e.to_string());
    }
    while m.up_off < m.to_up.len() {
        match stream.write(&m.to_up[m.up_off..]) {
            Ok(n) => {
                m.up_off += n;
                busy = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Relayed::Fail(format!("writing upstream: {e}")),
        }
    }
    if m.up_off == m.to_up.len() {
        m.to_up.clear();
        m.up_off = 0;
        if m.guest_eof && !m.up_shut {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            m.up_shut = true;
        }
    }
    // Upstream to the mitm, while the guest side has room.
    let mut buf = [0u8; 16384];
    while !m.host_eof && m.to_guest.len() - m.guest_off < MAX_QUEUED {
        match stream.read(&mut buf) {
            Ok(0) => {
                m.host_eof = true;
                m.mitm.upstream_eof();
                busy = true;
            }
            Ok(n) => {
                busy = true;
                if let Err(e) = m.mitm.upstream_bytes(&buf[..n]) {
                    return Relayed::Fail(e.to_string());
                }
                if let Err(e) = m.mitm.take_for_guest(&mut m.to_guest) {
                    return Relayed::Fail(e.to_string());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Relayed::Fail(format!("reading upstream: {e}")),
        }
    }
    // The upstream's handshake may have opened the guest's side: its answer, and anything
    // after it, go out now (and the upstream may need more of ours).
    if let Err(e) = m.mitm.take_for_guest(&mut m.to_guest) {
        return Relayed::Fail(e.to_string());
    }
    if let Err(e) = m.mitm.take_for_upstream(&mut m.to_up) {
        return Relayed::Fail(e.to_string());
    }
    while m.guest_off < m.to_guest.len() && s.can_send() {
        let Some(cap) = rate_in.allowance(throttled) else {
            break;
        };
        let end = m.to_guest.len().min(m.guest_off.saturating_add(cap));
        match s.send_slice(&m.to_guest[m.guest_off..end]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                rate_in.spend(n);
                m.guest_off += n;
                audit.bytes_in += n as u64;
                busy = true;
            }
        }
    }
    if m.guest_off == m.to_guest.len() {
        m.to_guest.clear();
        m.guest_off = 0;
        if m.host_eof && !m.guest_closed {
            s.close();
            m.guest_closed = true;
        }
    }
    Relayed::Busy(busy)
}

impl State {
    /// The interception state for a new TCP flow to `dst`, if its port is intercepted.
    pub(super) fn mitm_for(&self, dst: IpEndpoint) -> Option<Box<MitmFlow>> {
        let cfg = self.cfg.intercept.as_ref()?;
        cfg.ports
            .contains(&dst.port)
            .then(|| Box::new(MitmFlow::new(cfg.clone())))
    }

    /// A scanner for the guest's bytes of a flow that is not intercepted, when secrets exist.
    pub(super) fn scanner(&self) -> Option<Box<Scanner>> {
        self.cfg
            .intercept
            .as_ref()
            .filter(|i| !i.secrets.is_empty())
            .map(|_| Box::default())
    }

    /// One `secret` line of the audit log (never the value).
    pub(super) fn log_secret(
        &self,
        secret: &str,
        dst: &str,
        proto: &'static str,
        verdict: &'static str,
        count: u64,
    ) {
        tracing::debug!("netstack: secret {secret} toward {dst}: {verdict}");
        let mut e = LogEvent::new(
            "secret",
            proto,
            dst.to_string(),
            verdict,
            secret.to_string(),
        );
        e.secret = Some(secret.to_string());
        e.count = Some(count);
        self.log(e);
    }

    /// The `tls` line for an intercepted flow, once: intercepted (upstream verified),
    /// bypassed, or failed with the reason.
    pub(super) fn log_tls(
        &self,
        audit: &Audit,
        name: Option<&str>,
        verdict: &'static str,
        rule: String,
    ) {
        let mut e = LogEvent::new("tls", "tcp", audit.dst.to_string(), verdict, rule);
        e.names = name.map(|n| vec![n.to_string()]).unwrap_or_default();
        self.log(e);
    }

    /// At the end of an intercepted flow: a `secret` line per secret substituted.
    pub(super) fn log_substitutions(&self, m: &MitmFlow, audit: &Audit) {
        let Some(cfg) = self.cfg.intercept.as_ref() else {
            return;
        };
        let host = m.mitm.server_name().unwrap_or_default();
        let (counts, _) = m.mitm.counts();
        for (i, n) in counts.into_iter().enumerate() {
            if n > 0 {
                let mut e = LogEvent::new(
                    "secret",
                    "tcp",
                    audit.dst.to_string(),
                    "substituted",
                    cfg.secrets.get(i).name().to_string(),
                );
                e.names = vec![host.to_string()];
                e.secret = Some(cfg.secrets.get(i).name().to_string());
                e.count = Some(n);
                self.log(e);
            }
        }
        for name in &m.mitm.logged_violations {
            self.log_secret(name, &audit.dst.to_string(), "tcp", "logged", 1);
        }
    }
}
