//! Domain rules and the names in a flow's first bytes (TLS server name, HTTP Host).
//!
//! A guest may reach a server without asking our DNS (a hard-coded address, its own
//! DNS-over-HTTPS). Two cases, for TCP:
//! - **Denied by its address, but an allow rule names a domain for this port**: the guest's
//!   handshake is completed here, with no host connection yet (nothing reaches the address
//!   before it is allowed). Its first bytes must name a server a rule allows, and the host
//!   resolver must confirm the address is one of that name's (so a forged name cannot reach
//!   an arbitrary address). Then the host connection is made and the bytes relayed.
//! - **Allowed, but a deny rule names a domain for this port**: the host connection is made
//!   as usual (server-first protocols work), but the guest's first bytes are held until read;
//!   a name a deny rule matches resets both sides.
//!
//! Bytes that look like TLS or HTTP but do not complete in time, or do not parse, are
//! refused in both cases. What this cannot see: names inside encrypted ClientHellos (ECH),
//! and later requests on a kept-alive HTTP connection.

use crate::policy::Action;
use crate::sniff::{self, Sniffed};

use super::*;

/// How long a flow's first bytes may take to name their server.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection denied by its address, waiting for its first bytes to name a server.
pub(super) struct SniffFlow {
    handle: SocketHandle,
    deadline: StdInstant,
    pub(super) audit: Audit,
    /// The name being checked against the host resolver's answers.
    resolving: Option<String>,
}

impl SniffFlow {
    pub(super) fn new(handle: SocketHandle, audit: Audit) -> SniffFlow {
        SniffFlow {
            handle,
            deadline: StdInstant::now() + SNIFF_TIMEOUT,
            audit,
            resolving: None,
        }
    }
}

/// What the first bytes of an allowed flow decided.
pub(super) enum Inspected {
    /// Not all there yet: keep holding them.
    Wait,
    /// Relay as usual.
    Pass,
    /// Reset, for this reason.
    Refuse(String),
}

/// Reads the held first bytes of allowed flow `dst` for a name a deny rule matches.
pub(super) fn inspect(
    s: &mut tcp::Socket<'_>,
    until: StdInstant,
    policy: &Policy,
    dst: IpEndpoint,
    audit: &mut Audit,
) -> Inspected {
    let finished = finished(s);
    let seen = match s.peek(sniff::MAX_SNIFF) {
        Ok([]) | Err(_) if finished => return Inspected::Pass, // closed without a byte
        Ok(data) => sniff::sniff(data),
        Err(_) => Sniffed::NeedMore,
    };
    match seen {
        Sniffed::NeedMore if !finished && StdInstant::now() < until => Inspected::Wait,
        Sniffed::NoName => Inspected::Pass,
        Sniffed::Name(name) => {
            let d = policy.decide(&Flow {
                proto: Proto::Tcp,
                ip: to_std(dst.addr),
                port: Some(dst.port),
                names: &[&name],
                local: audit.group == Group::Host,
            });
            if !audit.names.contains(&name) {
                audit.names.push(name.clone());
            }
            if !d.allowed && d.by_rule {
                Inspected::Refuse(format!("{} (server name {name})", d.reason))
            } else {
                Inspected::Pass
            }
        }
        Sniffed::NeedMore | Sniffed::Malformed => {
            Inspected::Refuse("TLS or HTTP start that names no server in time".into())
        }
    }
}

/// Whether the guest has sent all it will (its FIN came), past the handshake.
fn finished(s: &tcp::Socket<'_>) -> bool {
    !s.may_recv()
        && !matches!(
            s.state(),
            tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent
        )
}

impl State {
    /// Whether a flow `d` denied may still be allowed by the name in its first bytes.
    pub(super) fn may_sniff(&self, d: &Decision, dst: IpEndpoint, group: Group) -> bool {
        let ip = to_std(dst.addr);
        // A deny rule, the host (only a `host` rule reaches it, never a name) or the guest's
        // own loopback stays denied whatever the name.
        !d.by_rule
            && !matches!(group, Group::Loopback | Group::Host)
            && !ip.is_unspecified()
            && self.flows() < self.cfg.max_flows
            && self
                .cfg
                .policy
                .has_domain_rule(Action::Allow, Proto::Tcp, dst.port)
    }

    /// Until when an allowed flow's first bytes are held for inspection, if a deny rule
    /// naming a domain could match it.
    pub(super) fn inspect_deadline(&self, dst: IpEndpoint) -> Option<StdInstant> {
        self.cfg
            .policy
            .has_domain_rule(Action::Deny, Proto::Tcp, dst.port)
            .then(|| StdInstant::now() + SNIFF_TIMEOUT)
    }

    /// Moves the flows waiting for their first bytes along.
    pub(super) fn sniff_tcp(&mut self) -> bool {
        let mut busy = false;
        let now_std = StdInstant::now();
        let keys: Vec<FlowKey> = self.sniffing.keys().copied().collect();
        for key in keys {
            let Some(f) = self.sniffing.get_mut(&key) else {
                continue;
            };
            if f.resolving.is_some() {
                if now_std >= f.deadline + self.cfg.dns_timeout {
                    self.refuse_sniffed(key, "the server name's lookup timed out".into());
                    busy = true;
                }
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(f.handle);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                self.refuse_sniffed(key, "closed before naming a server".into());
                busy = true;
                continue;
            }
            let finished = finished(s);
            let seen = match s.peek(sniff::MAX_SNIFF) {
                Ok(data) => sniff::sniff(data),
                Err(_) => Sniffed::NeedMore,
            };
            let reason = match seen {
                Sniffed::NeedMore if !finished && now_std < f.deadline => continue,
                Sniffed::Name(name) => {
                    let (d, audit) = self.judge(Proto::Tcp, key.1, Some(&name));
                    if d.allowed {
                        let f = self.sniffing.get_mut(&key).expect("still there");
                        f.audit.names = audit.names;
                        f.audit.rule = d.reason;
                        // Is the address really one of the name's?
                        let busy_resolver = self.resolving.load(Ordering::Relaxed) >= 64;
                        match (busy_resolver, self.lookup(name.clone())) {
                            (false, Some(id)) => {
                                self.lookups.insert(id, key);
                                let f = self.sniffing.get_mut(&key).expect("still there");
                                f.resolving = Some(name);
                                busy = true;
                                continue;
                            }
                            _ => "the resolver is busy".to_string(),
                        }
                    } else {
                        format!("{d} (server name {name})")
                    }
                }
                Sniffed::NoName => "no TLS server name or HTTP Host that a rule allows".into(),
                Sniffed::NeedMore | Sniffed::Malformed => {
                    "TLS or HTTP start that names no server in time".into()
                }
            };
            self.refuse_sniffed(key, reason);
            busy = true;
        }
        busy
    }

    /// The host resolver's answer for a sniffed flow's name.
    pub(super) fn sniff_resolved(&mut self, key: FlowKey, result: io::Result<Vec<IpAddr>>) {
        let Some(f) = self.sniffing.get_mut(&key) else {
            return;
        };
        let Some(name) = f.resolving.take() else {
            return;
        };
        let ip = addr::canonical(to_std(key.1.addr));
        let listed = result
            .map(|ips| ips.iter().any(|a| addr::canonical(*a) == ip))
            .unwrap_or(false);
        if !listed {
            self.refuse_sniffed(key, format!("{ip} is not an address of {name}"));
            return;
        }
        let local = self.delivery(ip) == Delivery::Local;
        let d = self.cfg.policy.decide_answer(&name, ip, local);
        if !d.allowed {
            self.refuse_sniffed(key, format!("{d}"));
            return;
        }
        self.bindings
            .insert(&name, Answer { ip, ttl: DNS_TTL }, StdInstant::now());
        self.promote(key);
    }

    /// Starts the host connection of a sniffed flow now allowed; relaying starts once it is up.
    fn promote(&mut self, key: FlowKey) {
        let Some(f) = self.sniffing.remove(&key) else {
            return;
        };
        let target = host_target(key.1);
        let stream = TcpStream::connect(target).and_then(|mut stream| {
            self.watch(&mut stream, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        match stream {
            Ok(stream) => {
                self.stats.tcp_allowed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("netstack: tcp {} -> {}: {}", key.0, key.1, f.audit.rule);
                let mut flow = TcpFlow::new(stream, Some(f.handle), None, false, f.audit);
                flow.inspect_until = self.inspect_deadline(key.1);
                flow.mitm = self.mitm_for(key.1);
                flow.scanner = self.scanner();
                self.tcp.insert(key, flow);
            }
            Err(e) => {
                tracing::debug!("netstack: connecting to {target}: {e}");
                self.sockets.get_mut::<tcp::Socket>(f.handle).abort();
                self.reap.push((f.handle, false));
                self.log(f.audit.event("allowed"));
            }
        }
    }

    /// Resets a sniffed flow's guest side and logs the denial.
    fn refuse_sniffed(&mut self, key: FlowKey, reason: String) {
        let Some(mut f) = self.sniffing.remove(&key) else {
            return;
        };
        tracing::debug!("netstack: tcp {} -> {}: {reason}", key.0, key.1);
        self.stats.tcp_denied.fetch_add(1, Ordering::Relaxed);
        self.sockets.get_mut::<tcp::Socket>(f.handle).abort();
        self.reap.push((f.handle, false));
        f.audit.rule = reason;
        self.log(f.audit.event("denied"));
    }
}
