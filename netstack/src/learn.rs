//! Learn mode's minimizer: from the flows and DNS names a sandbox used under `--net learn`,
//! the smallest allowlist that would have let exactly that traffic through, written as a
//! policy file (`preset = "none"` plus allow rules) to re-use with `--policy FILE`.
//!
//! How it minimizes:
//! - **Names before addresses.** A flow the sandbox reached by a name gets a rule on a name
//!   (addresses behind names change; and under `none` only names a rule names resolve).
//!   Every name the sandbox resolved that a flow carried gets a rule for that flow's protocol
//!   and port, even when the flow carried others (an address two names resolved to): a re-run
//!   may resolve either, and a name no rule names no longer resolves. Names a flow carried
//!   that were never resolved (TLS SNI or HTTP Host only) are needed only for flows no
//!   resolved name covers: of those, the fewest that cover them all are picked (a name that
//!   was a flow's only name first, then greedily the name covering most flows, then the
//!   shortest). A flow with no name gets a rule on its exact address.
//! - **Siblings become a suffix.** Two or more names (or collapsed subtrees) under one parent,
//!   with the same protocol and port set, become `*.parent`, repeated upwards, but never when
//!   the parent is a public suffix (`com`, `co.uk`, `github.io`: the [`psl`] list), where
//!   siblings belong to unrelated owners. `*.parent` does not match `parent` itself: a flow to
//!   it keeps its own rule.
//! - **Ports.** Per destination and protocol, the ports seen; consecutive ports merge into a
//!   range. One rule per port or range (a rule holds one range).
//!
//! Memory is bounded ([`MAX_FLOWS`], [`MAX_NAMES`]): what did not fit is counted and the file
//! says it is incomplete.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use crate::addr;
use crate::addr::Cidr;
use crate::policy::{self, Action, Dest, Ports, Proto, Rule};

/// Distinct flows a [`Learner`] keeps: past this, flows are counted, not kept.
pub const MAX_FLOWS: usize = 4096;
/// Distinct names a [`Learner`] keeps (resolved and flow names together): past this, names are
/// counted, not kept (a flow that loses all its names gets an address rule).
pub const MAX_NAMES: usize = 4096;
/// Names kept per flow (the stack binds at most 16 per address, plus the SNI or Host).
const MAX_NAMES_PER_FLOW: usize = 32;
/// Names listed after a suffix rule, as the reason for it.
const MAX_LISTED: usize = 8;

/// One flow the sandbox opened (allowed in learn mode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Observed {
    /// Tcp, Udp or Icmp.
    pub proto: Proto,
    pub ip: IpAddr,
    /// Destination port; `None` for ICMP.
    pub port: Option<u16>,
    /// Names the sandbox knew this address by (DNS answers, TLS SNI, HTTP Host), normalized.
    pub names: Vec<String>,
}

/// What learn mode saw: flows, and DNS names resolved. Deduplicated, and bounded so a
/// long-running or hostile sandbox cannot grow it without end.
#[derive(Debug, Default, Clone)]
pub struct Learner {
    flows: BTreeSet<Seen>,
    /// Every name kept (a flow's or a resolved one), shared by the flows that carry it.
    names: BTreeSet<Arc<str>>,
    /// The names the sandbox resolved (a subset of `names`).
    resolved: BTreeSet<Arc<str>>,
    dropped_flows: u64,
    dropped_names: u64,
}

/// A protocol in a fixed order, so flows and rules sort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OrdProto(Proto);

impl OrdProto {
    fn rank(self) -> u8 {
        match self.0 {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Icmp => 2,
            Proto::Any => 3,
        }
    }
}

impl Ord for OrdProto {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl PartialOrd for OrdProto {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A flow as kept: canonical address, no port for ICMP, usable names sorted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    proto: OrdProto,
    ip: IpAddr,
    port: Option<u16>,
    names: Vec<Arc<str>>,
}

/// `name` normalized, if a rule can name it as a domain: a valid name that does not read as a
/// group or `any` (a flow "named" `metadata` must not become a rule for the metadata group).
fn usable(name: &str) -> Option<String> {
    let n = policy::normalize_domain(name)?;
    match Rule::parse(Action::Allow, &n, "learn") {
        Ok(Rule {
            dest: Dest::Domain(d),
            ports: None,
            ..
        }) if d == n => Some(n),
        _ => None,
    }
}

impl Learner {
    /// An empty record, for one sandbox run.
    pub fn new() -> Learner {
        Learner::default()
    }

    /// Records a flow the sandbox opened.
    pub fn flow(&mut self, o: Observed) {
        let port = if o.proto == Proto::Icmp { None } else { o.port };
        let mut names: Vec<String> = Vec::new();
        for n in o.names.iter().filter_map(|n| usable(n)) {
            if names.len() == MAX_NAMES_PER_FLOW {
                break;
            }
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names.sort();
        let mut seen = Seen {
            proto: OrdProto(o.proto),
            ip: addr::canonical(o.ip),
            port,
            names: Vec::new(),
        };
        // A flow already kept has all its names kept: look it up without spending name slots.
        if let Some(known) = names
            .iter()
            .map(|n| self.names.get(n.as_str()).cloned())
            .collect::<Option<Vec<_>>>()
        {
            seen.names = known;
            if self.flows.contains(&seen) {
                return;
            }
        }
        if self.flows.len() >= MAX_FLOWS {
            self.dropped_flows += 1;
            return;
        }
        // Interning keeps the order: `names` is sorted.
        seen.names = names.into_iter().filter_map(|n| self.intern(n)).collect();
        self.flows.insert(seen);
    }

    /// Records a name the sandbox resolved (normalized already).
    pub fn dns(&mut self, name: &str) {
        if let Some(n) = usable(name).and_then(|n| self.intern(n)) {
            self.resolved.insert(n);
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty() && self.resolved.is_empty()
    }

    /// The shared copy of `name`, kept if there is room.
    fn intern(&mut self, name: String) -> Option<Arc<str>> {
        if let Some(n) = self.names.get(name.as_str()) {
            return Some(n.clone());
        }
        if self.names.len() >= MAX_NAMES {
            self.dropped_names += 1;
            return None;
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        Some(n)
    }

    /// The minimal allowlist as a policy file (TOML text) that `Policy::merge_file` accepts.
    pub fn suggest(&self) -> String {
        let flows: Vec<&Seen> = self.flows.iter().collect();
        let chosen = choose_names(&flows, &self.resolved);

        // Ports per (name, protocol) and per (address, protocol).
        type PortSet = BTreeSet<Option<u16>>;
        let mut by_name: BTreeMap<(Arc<str>, OrdProto), PortSet> = BTreeMap::new();
        let mut by_ip: BTreeMap<(IpAddr, OrdProto), PortSet> = BTreeMap::new();
        let mut ambiguous = Vec::new();
        for f in &flows {
            // Every name of the flow the sandbox resolved: a re-run may resolve any of them.
            let mut resolved = f
                .names
                .iter()
                .filter(|n| self.resolved.contains(*n))
                .peekable();
            if resolved.peek().is_some() {
                for n in resolved {
                    by_name
                        .entry((n.clone(), f.proto))
                        .or_default()
                        .insert(f.port);
                }
                continue;
            }
            let cands: Vec<&Arc<str>> = f.names.iter().filter(|n| chosen.contains(*n)).collect();
            match cands[..] {
                [] => {
                    by_ip.entry((f.ip, f.proto)).or_default().insert(f.port);
                }
                [n] => {
                    by_name
                        .entry((n.clone(), f.proto))
                        .or_default()
                        .insert(f.port);
                }
                _ => ambiguous.push((f, cands)),
            }
        }
        // A flow (by unresolved names only) several picked names cover goes to one that
        // already has its port, if any.
        for (f, cands) in ambiguous {
            let has_port = |n: &&Arc<str>| {
                by_name
                    .get(&((*n).clone(), f.proto))
                    .is_some_and(|s| s.contains(&f.port))
            };
            let shortest = |a: &&&Arc<str>, b: &&&Arc<str>| (a.len(), a).cmp(&(b.len(), b));
            let pick = cands
                .iter()
                .filter(|n| has_port(n))
                .min_by(shortest)
                .or_else(|| cands.iter().min_by(shortest))
                .expect("several candidates");
            by_name
                .entry(((*pick).clone(), f.proto))
                .or_default()
                .insert(f.port);
        }

        // Names with the same protocol and ports collapse together.
        let mut groups: BTreeMap<(OrdProto, PortSet), BTreeSet<String>> = BTreeMap::new();
        for ((n, p), ports) in by_name {
            groups.entry((p, ports)).or_default().insert(n.to_string());
        }
        let mut lines: Vec<Line> = Vec::new();
        let mut exact: BTreeSet<String> = BTreeSet::new();
        let mut suffixes: BTreeSet<String> = BTreeSet::new();
        for ((proto, ports), names) in &groups {
            for (dest, covers) in collapse(names) {
                let (rule_dest, labels, note) = match &dest {
                    NameDest::Exact(n) => {
                        exact.insert(n.clone());
                        (Dest::Domain(n.clone()), reversed_labels(n), None)
                    }
                    NameDest::Suffix(s) => {
                        suffixes.insert(s.clone());
                        let mut labels = reversed_labels(s);
                        labels.push("*".into());
                        (Dest::Suffix(s.clone()), labels, Some(listed(&covers)))
                    }
                };
                for r in ranges(ports) {
                    lines.push(Line {
                        key: (0, labels.clone(), None, *proto, r.map_or(0, |r| r.0)),
                        text: rule_text(proto.0, rule_dest.clone(), r),
                        note: note.clone(),
                    });
                }
            }
        }
        for ((ip, proto), ports) in &by_ip {
            let full = if ip.is_ipv4() { 32 } else { 128 };
            let dest = Dest::Cidr(Cidr::new(*ip, full).expect("full length"));
            for r in ranges(ports) {
                lines.push(Line {
                    key: (1, Vec::new(), Some(*ip), *proto, r.map_or(0, |r| r.0)),
                    text: rule_text(proto.0, dest.clone(), r),
                    note: None,
                });
            }
        }
        lines.sort_by(|a, b| (&a.key, &a.text).cmp(&(&b.key, &b.text)));
        lines.dedup_by(|a, b| a.text == b.text);

        let covered = |n: &str| exact.contains(n) || ancestors(n).any(|a| suffixes.contains(a));
        let connected: BTreeSet<&Arc<str>> = flows.iter().flat_map(|f| &f.names).collect();
        self.render(&lines, &connected, &covered)
    }

    fn render(
        &self,
        lines: &[Line],
        connected: &BTreeSet<&Arc<str>>,
        covered: &dyn Fn(&str) -> bool,
    ) -> String {
        let mut out = String::new();
        out.push_str(
            "# Egress allowlist written by msb-vmm learn mode (--net learn): the rules the traffic\n\
             # it observed needed, and no more. Review it, then run with it:\n\
             #   msb-vmm run --policy FILE -- CMD ...\n\
             # (without --net, which would override the preset below).\n",
        );
        let _ = writeln!(
            out,
            "# Observed: {} distinct flows, {} names resolved.",
            self.flows.len(),
            self.resolved.len()
        );
        if self.dropped_flows > 0 {
            let _ = writeln!(
                out,
                "# INCOMPLETE: learn mode keeps {MAX_FLOWS} distinct flows; {} more flow records \
                 were not kept and have no rule.",
                self.dropped_flows
            );
        }
        if self.dropped_names > 0 {
            let _ = writeln!(
                out,
                "# INCOMPLETE: learn mode keeps {MAX_NAMES} names; {} more name records were not \
                 kept (flows by those names got address rules, or none if not kept).",
                self.dropped_names
            );
        }
        out.push_str("preset = \"none\"\n");
        if lines.is_empty() {
            out.push_str("allow = []\n");
        } else {
            out.push_str("allow = [\n");
            for l in lines {
                let _ = write!(out, "    \"{}\",", l.text);
                if let Some(note) = &l.note {
                    let _ = write!(out, " # {note}");
                }
                out.push('\n');
            }
            out.push_str("]\n");
        }

        let unused: Vec<&Arc<str>> = self
            .resolved
            .iter()
            .filter(|n| !connected.contains(n))
            .collect();
        if !unused.is_empty() {
            out.push_str(
                "\n# Resolved but never connected to: no rule (one would open a port to them), so\n\
                 # under this policy they no longer resolve unless a rule above covers them:\n",
            );
            for n in unused {
                let mark = if covered(n) {
                    " (covered by a rule above)"
                } else {
                    ""
                };
                let _ = writeln!(out, "#   {n}{mark}");
            }
        }
        // Every resolved name a flow carried has a rule: what is left was never resolved.
        let others: Vec<&&Arc<str>> = connected.iter().filter(|n| !covered(n)).collect();
        if !others.is_empty() {
            out.push_str(
                "\n# Seen only as a TLS SNI or HTTP Host (never resolved) on flows that a rule above\n\
                 # allows by another of their names: no rule of their own, so they do not resolve:\n",
            );
            for n in others {
                let _ = writeln!(out, "#   {n}");
            }
        }
        out
    }
}

/// One allow rule of the output, with the order it sorts in.
struct Line {
    /// (names 0 / addresses 1, reversed labels, address, protocol, first port).
    key: (u8, Vec<String>, Option<IpAddr>, OrdProto, u16),
    text: String,
    /// Said after the rule: the names a suffix rule stands for.
    note: Option<String>,
}

/// A name rule's destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum NameDest {
    Exact(String),
    /// `*.suffix`: names strictly below it.
    Suffix(String),
}

impl NameDest {
    fn domain(&self) -> &str {
        match self {
            NameDest::Exact(d) | NameDest::Suffix(d) => d,
        }
    }
}

/// `name` without its first label.
fn parent(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, p)| p)
}

/// The strict ancestors of `name`, nearest first.
fn ancestors(name: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(parent(name), |n| parent(n))
}

/// Whether `*.domain` stays within one owner: `domain` is a registrable domain or below it,
/// not a public suffix (`com`, `co.uk`, `github.io`) nor an unknown top-level label.
fn one_owner(domain: &str) -> bool {
    psl::domain(domain.as_bytes()).is_some()
}

/// `names` as exact names and suffixes: siblings (names, or subtrees already collapsed) under
/// one parent that is not a public suffix become `*.parent`, repeatedly; each destination
/// with the names it covers.
fn collapse(names: &BTreeSet<String>) -> BTreeMap<NameDest, BTreeSet<String>> {
    let mut nodes: BTreeMap<NameDest, BTreeSet<String>> = names
        .iter()
        .map(|n| (NameDest::Exact(n.clone()), BTreeSet::from([n.clone()])))
        .collect();
    loop {
        let mut by_parent: BTreeMap<&str, Vec<NameDest>> = BTreeMap::new();
        for d in nodes.keys() {
            if let Some(p) = parent(d.domain()).filter(|p| one_owner(p)) {
                by_parent.entry(p).or_default().push(d.clone());
            }
        }
        let merges: Vec<(String, Vec<NameDest>)> = by_parent
            .into_iter()
            .filter(|(_, kids)| kids.len() >= 2)
            .map(|(p, kids)| (p.to_string(), kids))
            .collect();
        let mut changed = !merges.is_empty();
        for (p, kids) in merges {
            let mut covers = BTreeSet::new();
            for k in kids {
                covers.extend(nodes.remove(&k).unwrap_or_default());
            }
            nodes.entry(NameDest::Suffix(p)).or_default().extend(covers);
        }
        // A destination below a suffix is already covered by it.
        let inside: Vec<(NameDest, String)> = nodes
            .keys()
            .filter_map(|d| {
                ancestors(d.domain())
                    .filter(|a| nodes.contains_key(&NameDest::Suffix(a.to_string())))
                    .last()
                    .map(|a| (d.clone(), a.to_string()))
            })
            .collect();
        for (d, s) in inside {
            let covers = nodes.remove(&d).unwrap_or_default();
            nodes.entry(NameDest::Suffix(s)).or_default().extend(covers);
            changed = true;
        }
        if !changed {
            return nodes;
        }
    }
}

/// Names that name every flow that has names: every `resolved` name a flow carried (each
/// gets a rule), names a flow had alone (any allowlist needs them), then for the flows still
/// unnamed the fewest of their names, greedily the name naming most flows not yet named
/// (ties: the shortest, then the first in order).
fn choose_names(flows: &[&Seen], resolved: &BTreeSet<Arc<str>>) -> BTreeSet<Arc<str>> {
    let mut chosen: BTreeSet<Arc<str>> = flows
        .iter()
        .flat_map(|f| &f.names)
        .filter(|n| resolved.contains(*n))
        .cloned()
        .collect();
    chosen.extend(
        flows
            .iter()
            .filter(|f| f.names.len() == 1)
            .map(|f| f.names[0].clone()),
    );
    let open: Vec<&[Arc<str>]> = flows
        .iter()
        .map(|f| &f.names[..])
        .filter(|ns| !ns.is_empty() && !ns.iter().any(|n| chosen.contains(n)))
        .collect();
    let mut flows_of: BTreeMap<&Arc<str>, Vec<usize>> = BTreeMap::new();
    for (i, ns) in open.iter().enumerate() {
        for n in *ns {
            flows_of.entry(n).or_default().push(i);
        }
    }
    let mut count: BTreeMap<&Arc<str>, usize> =
        flows_of.iter().map(|(n, fs)| (*n, fs.len())).collect();
    let mut queue: BTreeSet<(Reverse<usize>, usize, &Arc<str>)> = count
        .iter()
        .map(|(n, c)| (Reverse(*c), n.len(), *n))
        .collect();
    let mut named = vec![false; open.len()];
    while let Some((_, _, n)) = queue.pop_first() {
        chosen.insert(n.clone());
        for &i in &flows_of[n] {
            if std::mem::replace(&mut named[i], true) {
                continue;
            }
            for m in open[i].iter().filter(|m| *m != n) {
                let c = count.get_mut(m).expect("counted");
                queue.remove(&(Reverse(*c), m.len(), m));
                *c -= 1;
                if *c > 0 {
                    queue.insert((Reverse(*c), m.len(), m));
                }
            }
        }
    }
    chosen
}

/// `name`'s labels, top-level first (so a domain's rules sort together).
fn reversed_labels(name: &str) -> Vec<String> {
    name.rsplit('.').map(String::from).collect()
}

/// The names a suffix rule stands for, a few of them.
fn listed(covers: &BTreeSet<String>) -> String {
    let mut s: Vec<&str> = covers.iter().take(MAX_LISTED).map(String::as_str).collect();
    let more = covers.len().saturating_sub(MAX_LISTED);
    let more = format!("and {more} more");
    if covers.len() > MAX_LISTED {
        s.push(&more);
    }
    s.join(", ")
}

/// Ports as inclusive ranges of consecutive ports; `[None]` (all ports, or none for ICMP) if
/// a flow had no port.
fn ranges(ports: &BTreeSet<Option<u16>>) -> Vec<Option<(u16, u16)>> {
    if ports.contains(&None) {
        return vec![None];
    }
    let mut out: Vec<(u16, u16)> = Vec::new();
    for p in ports.iter().flatten() {
        match out.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(*p) => *hi = *p,
            _ => out.push((*p, *p)),
        }
    }
    out.into_iter().map(Some).collect()
}

/// The allow rule `proto:dest[:ports]` as a policy file writes it.
fn rule_text(proto: Proto, dest: Dest, ports: Option<(u16, u16)>) -> String {
    Rule {
        action: Action::Allow,
        proto,
        dest,
        ports: ports.map(|(lo, hi)| Ports { lo, hi }),
        origin: String::new(),
    }
    .spec()
}

#[cfg(test)]
mod tests;
