//! The egress policy: a preset plus allow and deny rules, and the decision for each flow and
//! each DNS answer, with the reason it was taken.
//!
//! **Evaluation order: deny before allow.** A flow is denied if any deny rule matches it;
//! otherwise allowed if any allow rule matches it; otherwise the preset decides. So an allow
//! rule can never undo a deny rule, and the order rules are written in does not matter.
//!
//! Rules are written `[proto:]destination[:ports]`:
//! - proto: `tcp`, `udp`, `icmp` or `any` (the default);
//! - destination: `any` (or `*`), an IP address, a CIDR prefix, an exact domain
//!   (`api.github.com`), a domain suffix (`*.github.com`: any name below it, not the name
//!   itself), or a group: `public`, `private`, `loopback`, `link-local`, `metadata`, `host`
//!   (see [`crate::addr::Group`]); IPv6 addresses with ports go in brackets (`[::1]:80`);
//! - ports: `443` or `8000-9000` (not with `icmp`); all ports when absent.
//!
//! Domains are matched case-insensitively, without a trailing dot, after IDNA (so `bücher.de`
//! and `xn--bcher-kva.de` are one name). A domain rule matches a flow when the flow's address
//! is one the sandbox itself resolved that name to (see [`crate::dns`]), or when the flow
//! carries the name (TLS SNI, HTTP Host).
//!
//! Presets: `none` (nothing), `public` (the default: public addresses only), `all`
//! (everything but `host` and loopback), `non-local` (everything but loopback, link-local, metadata and
//! `host`). No preset allows `host` or reserved addresses: only rules do.
//!
//! **The host.** An address the host kernel delivers locally (the gateway, and any address of
//! any host interface: the caller asks the kernel, see [`crate::local`]) is in the group
//! `host` whatever range it is in, and only an allow rule naming the group `host` reaches it:
//! `any`, a CIDR, an address or a domain rule that happens to cover a host address does not.
//! Deny rules match it as written.

use std::fmt;
use std::net::IpAddr;

use crate::addr::{self, Cidr, Group};

/// Errors in a rule, a preset or a policy file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("bad rule {rule:?}: {why} (rules are [proto:]destination[:ports], e.g. tcp:*.github.com:443)")]
    BadRule { rule: String, why: String },
    #[error("unknown network preset {0:?} (none, public, all, non-local, learn)")]
    BadPreset(String),
    #[error("{file}:{line}: {why}")]
    File {
        file: String,
        line: usize,
        why: String,
    },
}

/// Transport protocol of a flow or a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    /// Rules only: every protocol.
    Any,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Any => "any",
        }
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// Where a rule points.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dest {
    Any,
    Cidr(Cidr),
    /// An exact name (normalized: lower-case ASCII, no trailing dot).
    Domain(String),
    /// Any name strictly below this one (normalized).
    Suffix(String),
    Group(Group),
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ports {
    pub lo: u16,
    pub hi: u16,
}

/// One allow or deny rule, with where it came from (for explanations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub proto: Proto,
    pub dest: Dest,
    pub ports: Option<Ports>,
    /// `--allow tcp:x:443`, or `policy.toml:4`.
    pub origin: String,
}

/// The network presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preset {
    None,
    #[default]
    Public,
    All,
    NonLocal,
    /// Learn mode: what `non-local` allows (no host, loopback, link-local or metadata), with
    /// every flow and name recorded for a suggested allowlist (see [`crate::learn`]).
    Learn,
}

impl Preset {
    pub fn parse(s: &str) -> Result<Preset, PolicyError> {
        Ok(match s {
            "none" => Preset::None,
            "public" => Preset::Public,
            "all" => Preset::All,
            "non-local" => Preset::NonLocal,
            "learn" => Preset::Learn,
            _ => return Err(PolicyError::BadPreset(s.into())),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::None => "none",
            Preset::Public => "public",
            Preset::All => "all",
            Preset::NonLocal => "non-local",
            Preset::Learn => "learn",
        }
    }

    /// Whether the preset allows addresses of `g`.
    pub fn allows(self, g: Group) -> bool {
        match self {
            Preset::None => false,
            Preset::Public => g == Group::Public,
            // The guest's loopback never leaves the guest: a packet for it that reaches us is
            // forged, and relaying it would reach the host's own loopback.
            Preset::All => !matches!(g, Group::Host | Group::Reserved | Group::Loopback),
            Preset::NonLocal | Preset::Learn => matches!(g, Group::Public | Group::Private),
        }
    }
}

/// Normalizes a domain: IDNA to ASCII, lower case, no trailing dot; labels of 1-63 letters,
/// digits, `-` (not first or last) or `_`, at most 253 bytes. `None` if it is not a valid name.
pub fn normalize_domain(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 1024 {
        return None;
    }
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).ok()?
    };
    let valid = ascii.len() <= 253
        && ascii.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    // A name that is all digits and dots would read as an IPv4 address: not a domain.
    let numeric = ascii.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (valid && !numeric).then_some(ascii)
}

fn parse_ports(s: &str) -> Option<Ports> {
    let num = |p: &str| -> Option<u16> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let p = num(s)?;
            (p, p)
        }
    };
    (lo <= hi).then_some(Ports { lo, hi })
}

fn parse_dest(s: &str) -> Result<Dest, String> {
    if s == "any" || s == "*" {
        return Ok(Dest::Any);
    }
    if let Some(g) = Group::parse(s) {
        return Ok(Dest::Group(g));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        return Ok(Dest::Cidr(Cidr::new(ip, len).expect("full length")));
    }
    if s.contains('/') {
        return Cidr::parse(s)
            .map(Dest::Cidr)
            .ok_or_else(|| format!("{s:?} is not a CIDR prefix"));
    }
    if let Some(suffix) = s.strip_prefix("*.") {
        return normalize_domain(suffix)
            .map(Dest::Suffix)
            .ok_or_else(|| format!("{s:?} is not a domain suffix"));
    }
    normalize_domain(s)
        .map(Dest::Domain)
        .ok_or_else(|| format!("{s:?} is not an address, prefix, domain or group"))
}

impl Rule {
    /// Parses `[proto:]destination[:ports]`; `origin` names it in explanations.
    pub fn parse(action: Action, s: &str, origin: &str) -> Result<Rule, PolicyError> {
        let bad = |why: String| PolicyError::BadRule {
            rule: s.into(),
            why,
        };
        let (proto, rest) = match s.split_once(':') {
            Some(("tcp", r)) => (Proto::Tcp, r),
            Some(("udp", r)) => (Proto::Udp, r),
            Some(("icmp", r)) => (Proto::Icmp, r),
            Some(("any", r)) if !r.is_empty() => (Proto::Any, r),
            _ => (Proto::Any, s),
        };
        let (dest, ports) = if let Some(inner) = rest.strip_prefix('[') {
            // [IPv6 address or prefix][:ports]
            let (addr, after) = inner
                .split_once(']')
                .ok_or_else(|| bad("unclosed '['".into()))?;
            let ports = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .and_then(parse_ports)
                        .ok_or_else(|| bad(format!("bad ports {after:?}")))?,
                ),
            };
            if !addr.contains(':') {
                return Err(bad("brackets are for IPv6 addresses".into()));
            }
            (parse_dest(addr).map_err(bad)?, ports)
        } else if rest.parse::<IpAddr>().is_ok()
            || (rest.contains('/') && Cidr::parse(rest).is_some())
        {
            // A bare IPv6 address or prefix: its colons are not a port separator.
            (parse_dest(rest).map_err(bad)?, None)
        } else {
            match rest.rsplit_once(':') {
                Some((d, p)) => {
                    let ports = parse_ports(p).ok_or_else(|| bad(format!("bad ports {p:?}")))?;
                    (parse_dest(d).map_err(bad)?, Some(ports))
                }
                None => (parse_dest(rest).map_err(bad)?, None),
            }
        };
        if proto == Proto::Icmp && ports.is_some() {
            return Err(bad("icmp has no ports".into()));
        }
        Ok(Rule {
            action,
            proto,
            dest,
            ports,
            origin: origin.into(),
        })
    }

    fn matches_proto_port(&self, proto: Proto, port: Option<u16>) -> bool {
        (self.proto == Proto::Any || self.proto == proto)
            && match (self.ports, port) {
                (None, _) => true,
                (Some(r), Some(p)) => r.lo <= p && p <= r.hi,
                (Some(_), None) => false,
            }
    }

    /// Whether the rule covers `ip` (in `group`) or one of its `names`. An allow rule reaches
    /// the host only by naming the group.
    fn matches_dest(&self, ip: IpAddr, group: Group, names: &[&str]) -> bool {
        if self.action == Action::Allow
            && group == Group::Host
            && self.dest != Dest::Group(Group::Host)
        {
            return false;
        }
        match &self.dest {
            Dest::Any => true,
            Dest::Cidr(c) => c.contains(ip),
            Dest::Group(g) => group == *g,
            Dest::Domain(d) => names.iter().any(|n| n == d),
            Dest::Suffix(s) => names.iter().any(|n| is_below(n, s)),
        }
    }

    fn matches_name(&self, name: &str) -> bool {
        match &self.dest {
            Dest::Domain(d) => name == d,
            Dest::Suffix(s) => is_below(name, s),
            _ => false,
        }
    }
}

/// Whether normalized `name` is strictly below normalized `suffix`.
fn is_below(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.ends_with(suffix)
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

impl Rule {
    /// The rule as a flag or policy file writes it (`tcp:*.github.com:443`, `[::1]:80`);
    /// parsing it gives the same rule.
    pub fn spec(&self) -> String {
        let dest = match &self.dest {
            Dest::Any => "any".to_string(),
            Dest::Cidr(c) => {
                let full = if c.is_v4() { 32 } else { 128 };
                let text = if c.prefix_len() == full {
                    c.addr().to_string()
                } else {
                    c.to_string()
                };
                if c.is_v4() || self.ports.is_none() {
                    text
                } else {
                    format!("[{text}]")
                }
            }
            Dest::Domain(d) => d.clone(),
            Dest::Suffix(d) => format!("*.{d}"),
            Dest::Group(g) => g.name().to_string(),
        };
        let mut out = match self.proto {
            // `any:` only where the destination alone would read as a protocol name.
            Proto::Any if matches!(dest.as_str(), "tcp" | "udp" | "icmp") => format!("any:{dest}"),
            Proto::Any => dest,
            p => format!("{}:{dest}", p.name()),
        };
        if let Some(p) = self.ports {
            if p.lo == p.hi {
                out.push_str(&format!(":{}", p.lo));
            } else {
                out.push_str(&format!(":{}-{}", p.lo, p.hi));
            }
        }
        out
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)
    }
}

/// One flow (or a DNS answer being checked as a possible flow).
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub proto: Proto,
    pub ip: IpAddr,
    /// Destination port (`None` for ICMP).
    pub port: Option<u16>,
    /// Names known for this flow, normalized: what the sandbox resolved `ip` from, its SNI
    /// or Host.
    pub names: &'a [&'a str],
    /// Whether the host kernel delivers `ip` locally (an address of the host's own): then the
    /// flow is to the group `host`, whatever the address.
    pub local: bool,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Whether a rule decided (rather than the preset).
    pub by_rule: bool,
    /// The rule's origin (`--deny 10.0.0.0/8`, `policy.toml:3`) or `preset public (private)`.
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.allowed { "allowed" } else { "denied" };
        write!(f, "{v} by {}", self.reason)
    }
}

/// A preset and rules, and the secrets a policy file names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub preset: Preset,
    pub rules: Vec<Rule>,
    /// `[[secret]]` tables of a policy file (their values are read by the caller).
    pub secrets: Vec<SecretSpec>,
    /// `on_violation = "block" | "log"` of a policy file.
    pub on_violation: Option<String>,
}

/// A secret a policy file names: the value comes from the environment variable `name`, or
/// from `file`; it may go to `hosts` only (checked as [`crate::secrets::HostPattern`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    pub hosts: Vec<String>,
    pub file: Option<String>,
    /// `policy.toml:7`, for messages.
    pub origin: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    preset: Option<toml::Spanned<String>>,
    #[serde(default)]
    allow: Vec<toml::Spanned<String>>,
    #[serde(default)]
    deny: Vec<toml::Spanned<String>>,
    #[serde(default)]
    secret: Vec<toml::Spanned<SecretTable>>,
    on_violation: Option<toml::Spanned<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    name: String,
    hosts: Vec<String>,
    file: Option<String>,
}

impl Policy {
    /// A preset alone.
    pub fn preset(preset: Preset) -> Policy {
        Policy {
            preset,
            ..Policy::default()
        }
    }

    /// Adds `--allow RULE` / `--deny RULE` from the command line.
    pub fn add_flag(&mut self, action: Action, rule: &str) -> Result<(), PolicyError> {
        let flag = match action {
            Action::Allow => "--allow",
            Action::Deny => "--deny",
        };
        self.rules
            .push(Rule::parse(action, rule, &format!("{flag} {rule}"))?);
        Ok(())
    }

    /// Reads a TOML policy file:
    ///
    /// ```toml
    /// preset = "public"                       # optional: keeps the current preset
    /// allow = ["tcp:*.github.com:443", "udp:1.1.1.1:53"]
    /// deny = ["metadata", "10.0.0.0/8"]
    /// ```
    ///
    /// Errors name the file and line. `file` is only used in messages.
    pub fn merge_file(&mut self, file: &str, text: &str) -> Result<(), PolicyError> {
        let line_of = |offset: usize| {
            let before = &text.as_bytes()[..offset.min(text.len())];
            before.iter().filter(|&&b| b == b'\n').count() + 1
        };
        let parsed: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::File {
            file: file.into(),
            line: e.span().map_or(1, |s| line_of(s.start)),
            why: e.message().trim().replace('\n', " "),
        })?;
        if let Some(p) = parsed.preset {
            self.preset = Preset::parse(p.get_ref()).map_err(|e| PolicyError::File {
                file: file.into(),
                line: line_of(p.span().start),
                why: e.to_string(),
            })?;
        }
        if let Some(v) = parsed.on_violation {
            if !matches!(v.get_ref().as_str(), "block" | "log") {
                return Err(PolicyError::File {
                    file: file.into(),
                    line: line_of(v.span().start),
                    why: format!("on_violation {:?}: use \"block\" or \"log\"", v.get_ref()),
                });
            }
            self.on_violation = Some(v.into_inner());
        }
        for t in parsed.secret {
            let line = line_of(t.span().start);
            let t = t.into_inner();
            let bad = |why: String| PolicyError::File {
                file: file.into(),
                line,
                why,
            };
            if t.hosts.is_empty() {
                return Err(bad(format!("secret {}: no hosts", t.name)));
            }
            if let Some(h) = t
                .hosts
                .iter()
                .find(|h| crate::secrets::HostPattern::parse(h).is_none())
            {
                return Err(bad(format!(
                    "secret {}: bad host {h:?} (a domain or *.suffix)",
                    t.name
                )));
            }
            self.secrets.push(SecretSpec {
                name: t.name,
                hosts: t.hosts,
                file: t.file,
                origin: format!("{file}:{line}"),
            });
        }
        for (action, list) in [(Action::Deny, parsed.deny), (Action::Allow, parsed.allow)] {
            for r in list {
                let line = line_of(r.span().start);
                let rule =
                    Rule::parse(action, r.get_ref(), &format!("{file}:{line}")).map_err(|e| {
                        PolicyError::File {
                            file: file.into(),
                            line,
                            why: e.to_string(),
                        }
                    })?;
                self.rules.push(rule);
            }
        }
        Ok(())
    }

    /// The policy as a policy file (`preset`, `deny`, `allow`, each rule with where it came
    /// from), for `msb-vmm policy NAME`. Secrets are named, never their values (the policy
    /// holds none).
    pub fn to_toml(&self) -> String {
        let quote = |s: &str| -> String {
            let mut q = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => q.push_str("\\\""),
                    '\\' => q.push_str("\\\\"),
                    c if c.is_control() => q.push_str(&format!("\\u{:04x}", c as u32)),
                    c => q.push(c),
                }
            }
            q.push('"');
            q
        };
        let mut out = format!("preset = {}\n", quote(self.preset.name()));
        if let Some(v) = &self.on_violation {
            out.push_str(&format!("on_violation = {}\n", quote(v)));
        }
        for (key, action) in [("deny", Action::Deny), ("allow", Action::Allow)] {
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.action == action).collect();
            if rules.is_empty() {
                out.push_str(&format!("{key} = []\n"));
                continue;
            }
            out.push_str(&format!("{key} = [\n"));
            for r in rules {
                out.push_str(&format!("  {},  # {}\n", quote(&r.spec()), r.origin));
            }
            out.push_str("]\n");
        }
        for sec in &self.secrets {
            let hosts: Vec<String> = sec.hosts.iter().map(|h| quote(h)).collect();
            out.push_str(&format!(
                "\n[[secret]]  # {}\nname = {}\nhosts = [{}]\n",
                sec.origin,
                quote(&sec.name),
                hosts.join(", ")
            ));
            if let Some(f) = &sec.file {
                out.push_str(&format!("file = {}\n", quote(f)));
            }
        }
        out
    }

    /// The decision for `flow`: deny rules, then allow rules, then the preset.
    pub fn decide(&self, flow: &Flow<'_>) -> Decision {
        let ip = addr::canonical(flow.ip);
        let g = addr::group_at(ip, flow.local);
        for action in [Action::Deny, Action::Allow] {
            if let Some(r) = self.rules.iter().find(|r| {
                r.action == action
                    && r.matches_proto_port(flow.proto, flow.port)
                    && r.matches_dest(ip, g, flow.names)
            }) {
                return Decision {
                    allowed: action == Action::Allow,
                    by_rule: true,
                    reason: r.origin.clone(),
                };
            }
        }
        Decision {
            allowed: self.preset.allows(g),
            by_rule: false,
            reason: self.preset_reason(ip, g),
        }
    }

    /// Why the preset decided: its name and the address's group (and for the host, which
    /// address, since it may not look like one of the host's).
    fn preset_reason(&self, ip: IpAddr, g: Group) -> String {
        if g == Group::Host {
            format!(
                "preset {} (host address {ip}: only a host rule reaches the host)",
                self.preset.name()
            )
        } else {
            format!("preset {} ({} address)", self.preset.name(), g.name())
        }
    }

    /// Whether a rule with `action` names a domain and could match a `proto` flow to `port`:
    /// then the name in the flow's first bytes (TLS SNI, HTTP Host) can change its fate.
    pub fn has_domain_rule(&self, action: Action, proto: Proto, port: u16) -> bool {
        self.rules.iter().any(|r| {
            r.action == action
                && matches!(r.dest, Dest::Domain(_) | Dest::Suffix(_))
                && r.matches_proto_port(proto, Some(port))
        })
    }

    /// Whether the sandbox may resolve `name` (normalized) at all. A deny rule for the name
    /// without ports makes it NXDOMAIN; under `none`, only names an allow rule names resolve.
    pub fn decide_name(&self, name: &str) -> Decision {
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.action == Action::Deny && r.ports.is_none() && r.matches_name(name))
        {
            return Decision {
                allowed: false,
                by_rule: true,
                reason: r.origin.clone(),
            };
        }
        if self.preset == Preset::None {
            return match self
                .rules
                .iter()
                .find(|r| r.action == Action::Allow && r.matches_name(name))
            {
                Some(r) => Decision {
                    allowed: true,
                    by_rule: true,
                    reason: r.origin.clone(),
                },
                None => Decision {
                    allowed: false,
                    by_rule: false,
                    reason: "preset none (no rule names this domain)".into(),
                },
            };
        }
        Decision {
            allowed: true,
            by_rule: false,
            reason: format!("preset {}", self.preset.name()),
        }
    }

    /// Whether an answer `ip` for `name` may reach the sandbox (rebinding protection): kept
    /// when some flow to it could be allowed: a deny rule for the address or name without
    /// ports drops it; the preset's groups, and allow rules naming the address, its group or
    /// the name itself (explicit opt-in, e.g. an internal name) keep it. `local`: whether the host kernel delivers `ip` locally (it is then the host's).
    pub fn decide_answer(&self, name: &str, ip: IpAddr, local: bool) -> Decision {
        let ip = addr::canonical(ip);
        let g = addr::group_at(ip, local);
        let names = [name];
        if let Some(r) = self.rules.iter().find(|r| {
            r.action == Action::Deny && r.ports.is_none() && r.proto == Proto::Any && {
                r.matches_dest(ip, g, &names)
            }
        }) {
            return Decision {
                allowed: false,
                by_rule: true,
                reason: r.origin.clone(),
            };
        }
        if self.preset.allows(g) {
            return Decision {
                allowed: true,
                by_rule: false,
                reason: self.preset_reason(ip, g),
            };
        }
        // A name never opts in the host (any address of its own) or loopback: only a rule
        // naming the group does, so no DNS answer can aim a domain rule at the host.
        let by_name: &[&str] = if matches!(g, Group::Host | Group::Loopback) {
            &[]
        } else {
            &names
        };
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.action == Action::Allow && r.matches_dest(ip, g, by_name))
        {
            return Decision {
                allowed: true,
                by_rule: true,
                reason: r.origin.clone(),
            };
        }
        Decision {
            allowed: false,
            by_rule: false,
            reason: if g == Group::Host {
                format!(
                    "preset {} (host address {ip} for {name}: rebinding protection)",
                    self.preset.name()
                )
            } else {
                format!(
                    "preset {} ({} address for {name}: rebinding protection)",
                    self.preset.name(),
                    g.name()
                )
            },
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
