//! DNS as the gateway speaks it: parse the guest's queries, build the answers (records,
//! NXDOMAIN, REFUSED), read upstream answers (A/AAAA with TTLs through CNAME chains), and
//! remember which addresses the sandbox resolved each name to, so domain rules can match the
//! flows that follow ([`Bindings`]).
//!
//! Every byte here comes from the guest or from the network: lengths, counts, labels and
//! compression pointers are bounds-checked, pointer chains are capped, names are limited to
//! 255 bytes on the wire, and nothing panics (fuzz target `dns_parser`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::policy::normalize_domain;

/// Record types we answer.
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// Response codes.
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// The longest message we take from the guest or build (EDNS allows more; we never need it).
pub const MAX_MESSAGE: usize = 4096;
/// Longest name on the wire (RFC 1035).
const MAX_NAME_WIRE: usize = 255;
/// Compression pointers followed per name before we call it a loop.
const MAX_POINTERS: usize = 16;
/// Records read from one upstream answer.
const MAX_RECORDS: usize = 64;

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("truncated DNS message")]
    Truncated,
    #[error("DNS message larger than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("malformed DNS name")]
    BadName,
    #[error("not a standard query with one question")]
    NotAQuery,
    #[error("DNS compression pointers loop or run too long")]
    PointerLoop,
}

/// A guest's question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired (echoed).
    pub rd: bool,
    /// The name, normalized (lower-case ASCII, no trailing dot); `None` when the wire name is
    /// not a valid hostname (we answer those REFUSED).
    pub name: Option<String>,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as sent (echoed in the answer).
    question: Vec<u8>,
}

struct Cursor<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Result<u8, DnsError> {
        let b = *self.msg.get(self.pos).ok_or(DnsError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, DnsError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, DnsError> {
        Ok(u32::from_be_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let end = self.pos.checked_add(n).ok_or(DnsError::Truncated)?;
        let b = self.msg.get(self.pos..end).ok_or(DnsError::Truncated)?;
        self.pos = end;
        Ok(b)
    }

    /// Reads a name, following compression pointers when `allow_pointers`. Returns its labels
    /// joined by dots (raw bytes, not yet validated).
    fn name(&mut self, allow_pointers: bool) -> Result<Vec<u8>, DnsError> {
        let mut out = Vec::new();
        let mut wire = 0usize;
        let mut pos = self.pos;
        let mut jumped = false;
        let mut pointers = 0;
        loop {
            let len = *self.msg.get(pos).ok_or(DnsError::Truncated)? as usize;
            match len & 0xc0 {
                0x00 => {
                    pos += 1;
                    wire += 1 + len;
                    if wire > MAX_NAME_WIRE {
                        return Err(DnsError::BadName);
                    }
                    if len == 0 {
                        break;
                    }
                    let label = self.msg.get(pos..pos + len).ok_or(DnsError::Truncated)?;
                    if !out.is_empty() {
                        out.push(b'.');
                    }
                    out.extend_from_slice(label);
                    pos += len;
                }
                0xc0 if allow_pointers => {
                    let lo = *self.msg.get(pos + 1).ok_or(DnsError::Truncated)? as usize;
                    let target = ((len & 0x3f) << 8) | lo;
                    pointers += 1;
                    // Pointers must point backwards: no loops, and a bounded chain.
                    if pointers > MAX_POINTERS || target >= pos {
                        return Err(DnsError::PointerLoop);
                    }
                    if !jumped {
                        self.pos = pos + 2;
                        jumped = true;
                    }
                    pos = target;
                }
                _ => return Err(DnsError::BadName),
            }
        }
        if !jumped {
            self.pos = pos;
        }
        Ok(out)
    }
}

/// The normalized form of a raw wire name, if it is a valid hostname. Labels holding a dot
/// or bytes outside letters, digits, `-` and `_` are not.
fn hostname(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    if !s.is_ascii() {
        return None;
    }
    normalize_domain(s)
}

/// Parses a guest's query: a standard query (opcode 0, QR clear) with exactly one question and
/// at most an EDNS OPT record. Anything else is an error the caller answers with FORMERR or
/// NOTIMP (see [`error_response`]) or drops when not even the header parses.
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() > MAX_MESSAGE {
        return Err(DnsError::TooLong);
    }
    let mut c = Cursor { msg, pos: 0 };
    let id = c.u16()?;
    let flags = c.u16()?;
    let (qd, an, ns, ar) = (c.u16()?, c.u16()?, c.u16()?, c.u16()?);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return Err(DnsError::NotAQuery);
    }
    let start = c.pos;
    let raw = c.name(false)?;
    let qtype = c.u16()?;
    let qclass = c.u16()?;
    let question = msg[start..c.pos].to_vec();
    if ar == 1 {
        // Only an OPT pseudo-record (EDNS) is accepted here.
        if c.u8()? != 0 || c.u16()? != TYPE_OPT {
            return Err(DnsError::NotAQuery);
        }
        c.bytes(6)?;
        let rdlen = c.u16()? as usize;
        c.bytes(rdlen)?;
    }
    Ok(Query {
        id,
        rd: flags & 0x0100 != 0,
        name: hostname(&raw),
        qtype,
        qclass,
        question,
    })
}

/// The header flags and id of a message, if it has a header: for answering a query that did
/// not parse (FORMERR needs the id).
pub fn error_response(msg: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&msg[..2]);
    out.push(0x80 | (msg[2] & 0x01));
    out.push(0x80 | (rcode & 0xf));
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// One address record of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub ip: IpAddr,
    pub ttl: u32,
}

/// The answer to `q`: `rcode` with `answers` (A records for IPv4 addresses, AAAA for IPv6;
/// each names the question through a compression pointer).
pub fn response(q: &Query, rcode: u8, answers: &[Answer]) -> Vec<u8> {
    let answers = &answers[..answers.len().min(MAX_RECORDS)];
    let mut out = Vec::with_capacity(12 + q.question.len() + answers.len() * 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.push(0x80 | if q.rd { 0x01 } else { 0 });
    out.push(0x80 | (rcode & 0xf)); // RA
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for a in answers {
        out.extend_from_slice(&[0xc0, 12]);
        let (ty, data): (u16, Vec<u8>) = match a.ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&a.ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// A query for `name` (normalized) of type `qtype`, as the gateway sends it upstream.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// An upstream answer, read: its rcode and the address records for `name` (following CNAMEs
/// within the message). Records for other names are ignored, so an upstream cannot bind
/// addresses to names the sandbox did not ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub id: u16,
    pub rcode: u8,
    pub answers: Vec<Answer>,
}

/// Reads an upstream response to a query for `name` (normalized).
pub fn parse_response(msg: &[u8], name: &str) -> Result<Upstream, DnsError> {
    if msg.len() > 65535 {
        return Err(DnsError::TooLong);
    }
    let mut c = Cursor { msg, pos: 0 };
    let id = c.u16()?;
    let flags = c.u16()?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::NotAQuery);
    }
    let (qd, an) = (c.u16()?, c.u16()?);
    c.bytes(4)?;
    for _ in 0..qd.min(4) {
        c.name(true)?;
        c.bytes(4)?;
    }
    if qd > 4 {
        return Err(DnsError::NotAQuery);
    }
    let mut names: Vec<String> = vec![name.to_string()];
    let mut answers = Vec::new();
    for _ in 0..usize::from(an).min(MAX_RECORDS) {
        let owner = c.name(true)?;
        let (ty, class, ttl) = (c.u16()?, c.u16()?, c.u32()?);
        let rdlen = c.u16()? as usize;
        let rdata_start = c.pos;
        let rdata = c.bytes(rdlen)?;
        let Some(owner) = hostname(&owner) else {
            continue;
        };
        if class != CLASS_IN || !names.contains(&owner) {
            continue;
        }
        match (ty, rdlen) {
            (TYPE_A, 4) => answers.push(Answer {
                ip: IpAddr::V4(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
                ttl,
            }),
            (TYPE_AAAA, 16) => {
                let b: [u8; 16] = rdata.try_into().map_err(|_| DnsError::Truncated)?;
                answers.push(Answer {
                    ip: IpAddr::V6(Ipv6Addr::from(b)),
                    ttl,
                });
            }
            (TYPE_CNAME, _) => {
                let mut rc = Cursor {
                    msg,
                    pos: rdata_start,
                };
                let target = rc.name(true)?;
                if let Some(t) = hostname(&target) {
                    if names.len() < 8 && !names.contains(&t) {
                        names.push(t);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Upstream {
        id,
        rcode: (flags & 0xf) as u8,
        answers,
    })
}

/// One binding of [`Bindings`] as a snapshot keeps it: lifetimes are relative, since the
/// clock they are read against (a monotonic `Instant`) does not cross processes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedBinding {
    pub ip: IpAddr,
    pub name: String,
    /// What was left of its lifetime when saved.
    pub ttl_left_ms: u64,
}

/// Which names the sandbox resolved each address to, until their TTLs run out. Bounded: the
/// oldest entries go first when a guest resolves more than `capacity` addresses.
#[derive(Debug)]
pub struct Bindings {
    by_ip: HashMap<IpAddr, Vec<(String, Instant)>>,
    capacity: usize,
    /// Shortest and longest lifetimes honoured (a TTL of 0 still serves the connect that
    /// follows the lookup; a week-long TTL does not pin a binding forever).
    min_ttl: Duration,
    max_ttl: Duration,
}

impl Bindings {
    pub fn new(capacity: usize) -> Bindings {
        Bindings {
            by_ip: HashMap::new(),
            capacity,
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(3600),
        }
    }

    /// Records that `name` resolved to `a.ip` for `a.ttl` seconds from `now`.
    pub fn insert(&mut self, name: &str, a: Answer, now: Instant) {
        let ttl = Duration::from_secs(a.ttl.into()).clamp(self.min_ttl, self.max_ttl);
        let ip = crate::addr::canonical(a.ip);
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= self.capacity {
            self.expire(now);
            if self.by_ip.len() >= self.capacity {
                // Evict the entry that expires first.
                if let Some(victim) = self
                    .by_ip
                    .iter()
                    .min_by_key(|(_, v)| v.iter().map(|(_, t)| *t).max())
                    .map(|(k, _)| *k)
                {
                    self.by_ip.remove(&victim);
                }
            }
        }
        let names = self.by_ip.entry(ip).or_default();
        if let Some((_, until)) = names.iter_mut().find(|(n, _)| n == name) {
            *until = (*until).max(now + ttl);
        } else if names.len() < 16 {
            names.push((name.to_string(), now + ttl));
        }
    }

    /// The bindings alive at `now`, for a snapshot.
    pub fn export(&self, now: Instant) -> Vec<SavedBinding> {
        let mut out = Vec::new();
        for (ip, names) in &self.by_ip {
            for (name, until) in names {
                if *until > now {
                    out.push(SavedBinding {
                        ip: *ip,
                        name: name.clone(),
                        ttl_left_ms: (*until - now).as_millis() as u64,
                    });
                }
            }
        }
        out
    }

    /// Takes back bindings [`Bindings::export`] saved, as of `now`. A saved file is input
    /// like any other: names must be DNS names, lifetimes are capped as live ones are, and
    /// the capacity holds.
    pub fn import(&mut self, saved: &[SavedBinding], now: Instant) {
        for b in saved {
            let name_ok = !b.name.is_empty()
                && b.name.len() <= 253
                && b.name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'));
            if !name_ok {
                tracing::warn!("netstack: a saved DNS binding has an invalid name; skipped");
                continue;
            }
            let left = Duration::from_millis(b.ttl_left_ms).min(self.max_ttl);
            let ip = crate::addr::canonical(b.ip);
            if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= self.capacity {
                break;
            }
            let names = self.by_ip.entry(ip).or_default();
            if names.len() < 16 && !names.iter().any(|(n, _)| *n == b.name) {
                names.push((b.name.to_ascii_lowercase(), now + left));
            }
        }
    }

    /// The names `ip` is bound to at `now`.
    pub fn names(&self, ip: IpAddr, now: Instant) -> Vec<&str> {
        self.by_ip
            .get(&crate::addr::canonical(ip))
            .map(|v| {
                v.iter()
                    .filter(|(_, t)| *t > now)
                    .map(|(n, _)| n.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn expire(&mut self, now: Instant) {
        self.by_ip.retain(|_, v| {
            v.retain(|(_, t)| *t > now);
            !v.is_empty()
        });
    }
}

#[cfg(test)]
mod tests;
