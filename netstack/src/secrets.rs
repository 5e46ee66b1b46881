//! Secrets the guest only ever holds as placeholders.
//!
//! A secret is a real value (an API key) bound to the hosts it may be sent to. The guest gets a
//! placeholder instead: `MSB_SECRET_` and 32 random base62 characters (190 bits), made fresh
//! per sandbox, of characters that survive URLs, headers, JSON and shells unchanged, so a
//! client carries it verbatim. On intercepted flows to a bound host the request rewriter
//! ([`crate::http1`]) swaps placeholders for values ([`Substituter`]); any other outgoing
//! bytes are scanned ([`Scanner`]) and a placeholder there is a violation.
//!
//! All placeholders share one prefix and one length, so finding them is one SIMD substring
//! search for the prefix and a table look-up, whatever the number of secrets.

use std::collections::HashMap;
use std::fmt;

use memchr::memmem;

use crate::policy::normalize_domain;

/// What every placeholder starts with.
pub const PREFIX: &[u8] = b"MSB_SECRET_";
/// Random characters after the prefix.
const RANDOM_LEN: usize = 32;
/// Every placeholder's length.
pub const PLACEHOLDER_LEN: usize = PREFIX.len() + RANDOM_LEN;

/// Errors in a secret's definition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret {0:?}: names are letters, digits and '_', not starting with a digit (an environment variable name)")]
    BadName(String),
    #[error("secret {name}: bad host {host:?} (hosts are domains or *.suffix, comma-separated)")]
    BadHost { name: String, host: String },
    #[error("secret {0}: no hosts (it would never be sent anywhere)")]
    NoHosts(String),
    #[error("secret {0}: the value is empty")]
    Empty(String),
    #[error("secret {0}: defined twice")]
    Duplicate(String),
    #[error("no randomness for placeholders: {0}")]
    Random(String),
}

/// A host a secret may be sent to: an exact name or any name below a suffix (normalized as
/// policy domains are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    Below(String),
}

impl HostPattern {
    /// Parses `api.example.com` or `*.example.com`.
    pub fn parse(s: &str) -> Option<HostPattern> {
        match s.strip_prefix("*.") {
            Some(suffix) => normalize_domain(suffix).map(HostPattern::Below),
            None => normalize_domain(s).map(HostPattern::Exact),
        }
    }

    /// Whether normalized `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(h) => name == h,
            HostPattern::Below(s) => {
                name.len() > s.len() + 1
                    && name.ends_with(s.as_str())
                    && name.as_bytes()[name.len() - s.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Below(s) => write!(f, "*.{s}"),
        }
    }
}

/// One secret: its name (the guest's environment variable), its value, the hosts it may reach
/// and this sandbox's placeholder for it.
#[derive(Clone)]
pub struct Secret {
    name: String,
    value: Vec<u8>,
    hosts: Vec<HostPattern>,
    placeholder: String,
}

impl fmt::Debug for Secret {
    /// Never the value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .finish()
    }
}

impl Secret {
    /// A secret named `name` (an environment variable name) with `value`, bound to `hosts`
    /// (comma-separated domains or `*.suffix`), with a fresh random placeholder.
    pub fn new(name: &str, value: Vec<u8>, hosts: &str) -> Result<Secret, SecretError> {
        let valid_name = !name.is_empty()
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(SecretError::BadName(name.into()));
        }
        if value.is_empty() {
            return Err(SecretError::Empty(name.into()));
        }
        let hosts = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                HostPattern::parse(h).ok_or_else(|| SecretError::BadHost {
                    name: name.into(),
                    host: h.into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.is_empty() {
            return Err(SecretError::NoHosts(name.into()));
        }
        Ok(Secret {
            name: name.into(),
            value,
            hosts,
            placeholder: placeholder()?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the guest holds instead of the value.
    pub fn placeholder(&self) -> &str {
        &self.placeholder
    }

    pub fn hosts(&self) -> &[HostPattern] {
        &self.hosts
    }

    /// Whether the value may be sent to `host` (normalized).
    pub fn allowed_for(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.matches(host))
    }

    /// The real value (for the rewriter only).
    pub(crate) fn value(&self) -> &[u8] {
        &self.value
    }
}

/// A fresh placeholder: the prefix and 32 base62 characters from the OS's CSPRNG.
fn placeholder() -> Result<String, SecretError> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::from_utf8(PREFIX.to_vec()).expect("ASCII");
    while out.len() < PLACEHOLDER_LEN {
        let mut b = [0u8; 64];
        getrandom::fill(&mut b).map_err(|e| SecretError::Random(e.to_string()))?;
        // Rejection sampling keeps the characters uniform (248 = 4 × 62).
        for x in b.into_iter().filter(|x| *x < 248) {
            if out.len() == PLACEHOLDER_LEN {
                break;
            }
            out.push(ALPHABET[usize::from(x % 62)] as char);
        }
    }
    Ok(out)
}

/// The secrets of one sandbox, indexed by placeholder.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    list: Vec<Secret>,
    by_token: HashMap<[u8; RANDOM_LEN], usize>,
}

impl Secrets {
    pub fn new(list: Vec<Secret>) -> Result<Secrets, SecretError> {
        let mut by_token = HashMap::new();
        for (i, s) in list.iter().enumerate() {
            if list[..i].iter().any(|o| o.name == s.name) {
                return Err(SecretError::Duplicate(s.name.clone()));
            }
            by_token.insert(token(s.placeholder.as_bytes()).expect("a placeholder"), i);
        }
        Ok(Secrets { list, by_token })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.list.iter()
    }

    /// The secret whose placeholder `p` (exactly [`PLACEHOLDER_LEN`] bytes) is, if any.
    pub fn by_placeholder(&self, p: &[u8]) -> Option<usize> {
        token(p).and_then(|t| self.by_token.get(&t).copied())
    }

    pub fn get(&self, i: usize) -> &Secret {
        &self.list[i]
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether any secret may be sent to `host`: flows to it are intercepted and rewritten.
    pub fn any_for(&self, host: &str) -> bool {
        self.list.iter().any(|s| s.allowed_for(host))
    }

    /// `NAME=placeholder` for the guest's environment.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        self.list
            .iter()
            .map(|s| (s.name.clone(), s.placeholder.clone()))
            .collect()
    }
}

fn token(p: &[u8]) -> Option<[u8; RANDOM_LEN]> {
    if p.len() != PLACEHOLDER_LEN || !p.starts_with(PREFIX) {
        return None;
    }
    p[PREFIX.len()..].try_into().ok()
}

/// Where the next placeholder starts in `data`, or where one may start that `data` cuts off.
enum Found {
    /// A whole candidate (prefix and length) at this offset.
    Whole(usize),
    /// Bytes from this offset on may begin a placeholder that continues in the next segment.
    Partial(usize),
    None,
}

fn find(data: &[u8], finder: &memmem::Finder<'_>) -> Found {
    if let Some(p) = finder.find(data) {
        return if data.len() - p >= PLACEHOLDER_LEN {
            Found::Whole(p)
        } else {
            Found::Partial(p)
        };
    }
    // A prefix cut by the end of `data`: its longest suffix that starts the prefix.
    let tail = data.len().saturating_sub(PREFIX.len() - 1);
    (tail..data.len())
        .find(|&i| PREFIX.starts_with(&data[i..]))
        .map_or(Found::None, Found::Partial)
}

/// Replaces placeholders by values in a stream cut into arbitrary segments. Bytes that may
/// begin a placeholder are held until the next segment (or [`Substituter::finish`]) decides.
#[derive(Debug)]
pub struct Substituter {
    carry: Vec<u8>,
    finder: memmem::Finder<'static>,
    /// Substitutions made, per secret index.
    pub counts: Vec<u64>,
}

impl Substituter {
    pub fn new(secrets: &Secrets) -> Substituter {
        Substituter {
            carry: Vec::new(),
            finder: memmem::Finder::new(PREFIX),
            counts: vec![0; secrets.len()],
        }
    }

    /// Rewrites `input` into `out` with the secrets `allowed` (by index) substituted; a
    /// placeholder of a secret not allowed here is passed through and returned as a violation.
    pub fn push(
        &mut self,
        secrets: &Secrets,
        allowed: &dyn Fn(usize) -> bool,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        if self.carry.is_empty() {
            return self.run(secrets, allowed, input, out, false);
        }
        let mut work = std::mem::take(&mut self.carry);
        work.extend_from_slice(input);
        self.run(secrets, allowed, &work, out, false)
    }

    /// Flushes what was held at the end of the stream.
    pub fn finish(
        &mut self,
        secrets: &Secrets,
        allowed: &dyn Fn(usize) -> bool,
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        let data = std::mem::take(&mut self.carry);
        self.run(secrets, allowed, &data, out, true)
    }

    /// Whether bytes are held back.
    pub fn holding(&self) -> bool {
        !self.carry.is_empty()
    }

    fn run(
        &mut self,
        secrets: &Secrets,
        allowed: &dyn Fn(usize) -> bool,
        data: &[u8],
        out: &mut Vec<u8>,
        last: bool,
    ) -> Option<usize> {
        let mut violation = None;
        let mut pos = 0;
        loop {
            match find(&data[pos..], &self.finder) {
                Found::Whole(p) => {
                    let at = pos + p;
                    let cand = &data[at..at + PLACEHOLDER_LEN];
                    match secrets.by_placeholder(cand) {
                        Some(i) if allowed(i) => {
                            out.extend_from_slice(&data[pos..at]);
                            out.extend_from_slice(secrets.get(i).value());
                            self.counts[i] += 1;
                            pos = at + PLACEHOLDER_LEN;
                        }
                        found => {
                            violation = violation.or(found);
                            out.extend_from_slice(&data[pos..at + 1]);
                            pos = at + 1;
                        }
                    }
                }
                Found::Partial(p) if !last => {
                    out.extend_from_slice(&data[pos..pos + p]);
                    self.carry.extend_from_slice(&data[pos + p..]);
                    return violation;
                }
                Found::Partial(_) | Found::None => {
                    out.extend_from_slice(&data[pos..]);
                    return violation;
                }
            }
        }
    }
}

/// Finds placeholders in outgoing bytes that must carry none (flows to hosts no secret is bound
/// to, DNS, plain HTTP), across segment boundaries.
#[derive(Debug)]
pub struct Scanner {
    carry: Vec<u8>,
    finder: memmem::Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Scanner {
        Scanner {
            carry: Vec::new(),
            finder: memmem::Finder::new(PREFIX),
        }
    }
}

impl Scanner {
    /// The first secret (by index) whose placeholder `data` completes, if any.
    pub fn scan(&mut self, secrets: &Secrets, data: &[u8]) -> Option<usize> {
        if secrets.is_empty() {
            return None;
        }
        let mut joined;
        let mut buf: &[u8] = data;
        if !self.carry.is_empty() {
            joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(data);
            buf = &joined;
        }
        let mut pos = 0;
        loop {
            match find(&buf[pos..], &self.finder) {
                Found::Whole(p) => {
                    let at = pos + p;
                    if let Some(i) = secrets.by_placeholder(&buf[at..at + PLACEHOLDER_LEN]) {
                        self.carry.clear();
                        return Some(i);
                    }
                    pos = at + 1;
                }
                Found::Partial(p) => {
                    self.carry = buf[pos + p..].to_vec();
                    return None;
                }
                Found::None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests;
