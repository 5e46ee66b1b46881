//! The HTTP/1.x request rewriter of intercepted flows: placeholders become secret values in
//! request lines, headers (`Authorization: Basic` decoded and re-encoded) and bodies, only for
//! secrets bound to both the flow's TLS server name and the request's Host; every request's
//! Host is shown to the caller, which may refuse it (the policy sees each request of a
//! kept-alive connection).
//!
//! Streaming and bounded: a request head is held until complete (at most [`MAX_HEAD`]); a body
//! whose length changes is held up to [`MAX_HELD_BODY`] so its Content-Length can be fixed,
//! and a longer one (or one the client sends after `100 Continue`) is re-framed as chunked;
//! chunked bodies are re-chunked. Requests that could be read two ways (request smuggling:
//! Content-Length with Transfer-Encoding, two lengths, folded headers) end the flow, as does
//! anything that is not HTTP/1.x. Upgraded connections (WebSocket) pass through unchanged after
//! their head.

use crate::policy::normalize_domain;
use crate::secrets::{Secrets, Substituter};

/// The longest request head held.
pub const MAX_HEAD: usize = 64 << 10;
/// The longest body held to fix its Content-Length.
pub const MAX_HELD_BODY: usize = 1 << 20;
/// The longest chunk-size line.
const MAX_CHUNK_LINE: usize = 1024;

/// Why a flow's requests cannot be rewritten; the flow ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("request head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("not an HTTP/1.x request: {0}")]
    NotHttp1(String),
    #[error("ambiguous request ({0}): refused as a smuggling attempt")]
    Ambiguous(&'static str),
    #[error("bad chunked body: {0}")]
    BadChunk(&'static str),
    #[error("an HTTP/1.0 body over {MAX_HELD_BODY} bytes cannot be rewritten")]
    BodyTooLarge,
    #[error("request to {0} refused by the policy")]
    Refused(String),
}

/// The domain a Host header (or HTTP/2 `:authority`) names, without its port; `None` for an
/// address literal or anything else that is not a domain.
pub(crate) fn host_name(text: &str) -> Option<String> {
    let name = match text.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => text,
    };
    normalize_domain(name)
}

/// One request head, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The Host header's name (normalized, without port), if it names a domain.
    pub host: Option<String>,
    /// Whether the request has a Host header (one that names no domain is an address).
    pub host_header: bool,
}

#[derive(Debug)]
enum State {
    Head,
    /// A body of known length, held whole (its new length goes into `head`).
    Held {
        head: Vec<u8>,
        left: u64,
        body: Vec<u8>,
    },
    /// A body of known length streamed as it is (no secret applies) or re-framed as chunks.
    Length {
        left: u64,
        rechunk: bool,
    },
    /// A chunked body: reading a size line, `left` bytes of a chunk, the CRLF after a chunk,
    /// or trailers.
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkEnd(Vec<u8>),
    Trailers(Vec<u8>),
    /// After an upgrade: no longer HTTP.
    Opaque,
}

/// Rewrites the requests a guest sends on one intercepted connection to `server` (the TLS
/// server name).
#[derive(Debug)]
pub struct RequestRewriter {
    server: String,
    state: State,
    head: Vec<u8>,
    sub: Substituter,
    /// Whether the current request's body is rewritten (some secret applies to it).
    rewriting: bool,
    /// Secrets (by index) that apply to the current request.
    allowed: Vec<bool>,
    /// Substitutions made, per secret index.
    pub counts: Vec<u64>,
    /// Placeholders of secrets not bound to the current request's host, by secret index, in
    /// the order seen: the caller decides (block the flow or log); they were passed unchanged.
    pub violations: Vec<usize>,
    /// Requests seen.
    pub requests: u64,
}

impl RequestRewriter {
    pub fn new(secrets: &Secrets, server: &str) -> RequestRewriter {
        RequestRewriter {
            server: server.to_string(),
            state: State::Head,
            head: Vec::new(),
            sub: Substituter::new(secrets),
            rewriting: false,
            allowed: vec![false; secrets.len()],
            counts: vec![0; secrets.len()],
            violations: Vec::new(),
            requests: 0,
        }
    }

    /// Rewrites `input` (any segment of the guest's stream) into `out`. `admit` sees each
    /// request head before any of it is written; refusing one ends the flow.
    pub fn push(
        &mut self,
        secrets: &Secrets,
        mut input: &[u8],
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), RewriteError> {
        while !input.is_empty() {
            let used = self.step(secrets, input, out, admit)?;
            input = &input[used..];
        }
        Ok(())
    }

    /// The guest closed its side: what was held goes out as it is (a cut request stays cut).
    pub fn finish(&mut self, secrets: &Secrets, out: &mut Vec<u8>) {
        let allowed = self.allowed.clone();
        let v = self.sub.finish(secrets, &|i| allowed[i], out);
        self.note(v);
        match std::mem::replace(&mut self.state, State::Head) {
            State::Held { head, body, .. } => {
                out.extend_from_slice(&head);
                out.extend_from_slice(&body);
            }
            State::ChunkSize(b) | State::ChunkEnd(b) | State::Trailers(b) => {
                out.extend_from_slice(&b)
            }
            _ => {}
        }
        out.append(&mut self.head);
        self.absorb();
    }

    fn note(&mut self, v: Option<usize>) {
        if let Some(i) = v {
            self.violations.push(i);
        }
    }

    /// Moves the body substituter's counts into the flow's.
    fn absorb(&mut self) {
        add_counts(&mut self.counts, &mut self.sub);
    }

    /// Substitutes `data` with the current request's secrets (streaming).
    fn body(&mut self, secrets: &Secrets, data: &[u8], out: &mut Vec<u8>, last: bool) {
        let allowed = std::mem::take(&mut self.allowed);
        let mut v = self.sub.push(secrets, &|i| allowed[i], data, out);
        if last {
            v = v.or(self.sub.finish(secrets, &|i| allowed[i], out));
        }
        self.allowed = allowed;
        self.note(v);
        self.absorb();
    }

    /// Writes `data` as one chunk (nothing if empty).
    fn chunk(data: &[u8], out: &mut Vec<u8>) {
        if !data.is_empty() {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Consumes a prefix of `input`; returns its length.
    fn step(
        &mut self,
        secrets: &Secrets,
        input: &[u8],
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<usize, RewriteError> {
        match &mut self.state {
            State::Head => {
                // Only the bytes up to the head's end are taken; the body follows.
                let before = self.head.len();
                let scan_from = before.saturating_sub(3);
                self.head.extend_from_slice(input);
                match memchr::memmem::find(&self.head[scan_from..], b"\r\n\r\n") {
                    None => {
                        if self.head.len() > MAX_HEAD {
                            return Err(RewriteError::HeadTooLarge);
                        }
                        Ok(input.len())
                    }
                    Some(p) => {
                        let end = scan_from + p + 4;
                        if end > MAX_HEAD {
                            return Err(RewriteError::HeadTooLarge);
                        }
                        let head: Vec<u8> = self.head.drain(..end).collect();
                        self.head.clear();
                        self.start(secrets, &head, out, admit)?;
                        Ok(end - before)
                    }
                }
            }
            State::Held { left, body, .. } => {
                let n = (*left).min(input.len() as u64) as usize;
                body.extend_from_slice(&input[..n]);
                *left -= n as u64;
                if *left == 0 {
                    let State::Held { head, body, .. } =
                        std::mem::replace(&mut self.state, State::Head)
                    else {
                        unreachable!()
                    };
                    let mut new_body = Vec::with_capacity(body.len());
                    self.body(secrets, &body, &mut new_body, true);
                    out.extend_from_slice(&with_length(&head, new_body.len()));
                    out.extend_from_slice(&new_body);
                }
                Ok(n)
            }
            State::Length { left, rechunk } => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                let (done, rechunk) = (*left == 0, *rechunk);
                if done {
                    self.state = State::Head;
                }
                if rechunk {
                    let mut buf = Vec::with_capacity(n + 64);
                    self.body(secrets, &input[..n], &mut buf, done);
                    Self::chunk(&buf, out);
                    if done {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                } else {
                    self.passthrough(secrets, &input[..n], out, done);
                }
                Ok(n)
            }
            State::ChunkSize(line) => {
                let Some(p) = memchr::memchr(b'\n', input) else {
                    line.extend_from_slice(input);
                    if line.len() > MAX_CHUNK_LINE {
                        return Err(RewriteError::BadChunk("size line too long"));
                    }
                    return Ok(input.len());
                };
                line.extend_from_slice(&input[..=p]);
                if line.len() > MAX_CHUNK_LINE {
                    return Err(RewriteError::BadChunk("size line too long"));
                }
                let size = chunk_size(line)?;
                let raw = std::mem::take(line);
                if !self.rewriting {
                    out.extend_from_slice(&raw);
                }
                self.state = if size == 0 {
                    if self.rewriting {
                        let mut buf = Vec::new();
                        self.body(secrets, &[], &mut buf, true);
                        Self::chunk(&buf, out);
                        out.extend_from_slice(b"0\r\n");
                    } else {
                        self.passthrough(secrets, &[], out, true);
                    }
                    State::Trailers(Vec::new())
                } else {
                    State::ChunkData(size)
                };
                Ok(p + 1)
            }
            State::ChunkData(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::ChunkEnd(Vec::new());
                }
                if self.rewriting {
                    let mut buf = Vec::with_capacity(n + 64);
                    self.body(secrets, &input[..n], &mut buf, false);
                    Self::chunk(&buf, out);
                } else {
                    self.passthrough(secrets, &input[..n], out, false);
                }
                Ok(n)
            }
            State::ChunkEnd(seen) => {
                let need = 2 - seen.len();
                let n = need.min(input.len());
                seen.extend_from_slice(&input[..n]);
                if seen.len() == 2 {
                    if seen != b"\r\n" {
                        return Err(RewriteError::BadChunk("no CRLF after a chunk"));
                    }
                    if !self.rewriting {
                        out.extend_from_slice(b"\r\n");
                    }
                    self.state = State::ChunkSize(Vec::new());
                }
                Ok(n)
            }
            State::Trailers(buf) => {
                // Trailer lines up to an empty line; passed as they are.
                let before = buf.len();
                buf.extend_from_slice(input);
                let done = if buf.starts_with(b"\r\n") {
                    Some(2)
                } else {
                    memchr::memmem::find(buf, b"\r\n\r\n").map(|p| p + 4)
                };
                match done {
                    None if buf.len() > MAX_HEAD => Err(RewriteError::HeadTooLarge),
                    None => Ok(input.len()),
                    Some(end) => {
                        let trailers: Vec<u8> = buf[..end].to_vec();
                        self.state = State::Head;
                        let v = self.whole(secrets, &trailers, out);
                        self.note(v);
                        Ok(end - before)
                    }
                }
            }
            State::Opaque => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
        }
    }

    /// Substitutes a whole piece (a head, trailers, decoded credentials) with the current
    /// request's secrets.
    fn whole(&mut self, secrets: &Secrets, data: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let allowed = &self.allowed;
        let mut sub = Substituter::new(secrets);
        let v = sub.push(secrets, &|i| allowed[i], data, out);
        let v = v.or(sub.finish(secrets, &|i| allowed[i], out));
        add_counts(&mut self.counts, &mut sub);
        v
    }

    /// Body bytes of a request no secret applies to: unchanged, scanned for placeholders.
    fn passthrough(&mut self, secrets: &Secrets, data: &[u8], out: &mut Vec<u8>, last: bool) {
        // Nothing is substituted (no secret is allowed), so the output is the input; the
        // substituter only finds violations.
        let mut sink = Vec::new();
        let mut v = self.sub.push(secrets, &|_| false, data, &mut sink);
        if last {
            v = v.or(self.sub.finish(secrets, &|_| false, &mut sink));
        }
        self.note(v);
        out.extend_from_slice(data);
    }

    /// A complete request head: checked, shown to `admit`, rewritten; sets up its body.
    fn start(
        &mut self,
        secrets: &Secrets,
        head: &[u8],
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), RewriteError> {
        let p = parse_head(head)?;
        let req = Request {
            method: p.method.clone(),
            host: p.host.clone(),
            host_header: p.host_header,
        };
        if !admit(&req) {
            return Err(RewriteError::Refused(
                req.host.unwrap_or_else(|| self.server.clone()),
            ));
        }
        self.requests += 1;
        // A secret applies when bound to both the name the upstream proved (the TLS server
        // name) and the host the request is for (a fronted Host must not get it).
        // A Host that names no domain (an address literal) gets no secret.
        let host = match (&p.host, p.host_header) {
            (Some(h), _) => Some(h.as_str()),
            (None, false) => Some(self.server.as_str()),
            (None, true) => None,
        };
        for (i, s) in secrets.iter().enumerate() {
            self.allowed[i] = host.is_some_and(|h| s.allowed_for(&self.server) && s.allowed_for(h));
        }
        self.rewriting = self.allowed.iter().any(|a| *a);
        self.sub = Substituter::new(secrets);
        // Basic credentials hide placeholders in base64: decoded, substituted, re-encoded.
        let mut decoded = Vec::with_capacity(head.len());
        for line in split_lines(head) {
            match basic_auth(line) {
                Some((prefix, creds)) => {
                    let mut plain = Vec::new();
                    let v = self.whole(secrets, &creds, &mut plain);
                    self.note(v);
                    decoded.extend_from_slice(prefix);
                    decoded.extend_from_slice(base64_encode(&plain).as_bytes());
                    decoded.extend_from_slice(b"\r\n");
                }
                None => decoded.extend_from_slice(line),
            }
        }
        let mut new_head = Vec::with_capacity(decoded.len() + 64);
        let v = self.whole(secrets, &decoded, &mut new_head);
        self.note(v);
        self.state = match p.body {
            Body::None | Body::Length(0) => {
                out.extend_from_slice(&new_head);
                if p.upgrade {
                    State::Opaque
                } else {
                    State::Head
                }
            }
            Body::Length(n) if !self.rewriting => {
                out.extend_from_slice(&new_head);
                State::Length {
                    left: n,
                    rechunk: false,
                }
            }
            Body::Length(n) if n as usize <= MAX_HELD_BODY && !p.expect_continue => State::Held {
                head: new_head,
                left: n,
                body: Vec::with_capacity(n as usize),
            },
            Body::Length(_) if p.http10 => return Err(RewriteError::BodyTooLarge),
            Body::Length(n) => {
                out.extend_from_slice(&to_chunked(&new_head));
                State::Length {
                    left: n,
                    rechunk: true,
                }
            }
            Body::Chunked => {
                out.extend_from_slice(&new_head);
                State::ChunkSize(Vec::new())
            }
        };
        Ok(())
    }
}

#[derive(Debug)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
struct Head {
    method: String,
    host: Option<String>,
    host_header: bool,
    body: Body,
    http10: bool,
    expect_continue: bool,
    upgrade: bool,
}

/// The head's lines, each with its CRLF.
fn split_lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split_inclusive(|b| *b == b'\n')
}

fn parse_head(head: &[u8]) -> Result<Head, RewriteError> {
    let mut lines = split_lines(head);
    let first = lines.next().unwrap_or_default();
    let first = std::str::from_utf8(first.strip_suffix(b"\r\n").unwrap_or(first))
        .map_err(|_| RewriteError::NotHttp1("request line is not text".into()))?;
    let mut parts = first.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version), None) = (method, target, version, parts.next())
    else {
        return Err(RewriteError::NotHttp1(format!("{:?}", trim(first))));
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-')
        || target.is_empty()
        || !matches!(version, "HTTP/1.1" | "HTTP/1.0")
    {
        return Err(RewriteError::NotHttp1(format!("{:?}", trim(first))));
    }
    if method == "CONNECT" {
        return Err(RewriteError::NotHttp1("CONNECT".into()));
    }
    let mut h = Head {
        method: method.to_string(),
        host: None,
        host_header: false,
        body: Body::None,
        http10: version == "HTTP/1.0",
        expect_continue: false,
        upgrade: false,
    };
    let (mut length, mut chunked, mut hosts) = (None::<u64>, false, 0);
    for line in lines {
        let line = line.strip_suffix(b"\r\n").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(RewriteError::Ambiguous("a folded header"));
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(RewriteError::NotHttp1("a header without ':'".into()));
        };
        let name = &line[..colon];
        if name.is_empty()
            || !name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
        {
            return Err(RewriteError::Ambiguous("a bad header name"));
        }
        let value = trim_bytes(&line[colon + 1..]);
        let text = String::from_utf8_lossy(value);
        match name.to_ascii_lowercase().as_slice() {
            b"content-length" => {
                if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                    return Err(RewriteError::Ambiguous("a bad Content-Length"));
                }
                let n: u64 = text
                    .parse()
                    .map_err(|_| RewriteError::Ambiguous("a bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(RewriteError::Ambiguous("two Content-Lengths"));
                }
                length = Some(n);
            }
            b"transfer-encoding" => {
                if !text.eq_ignore_ascii_case("chunked") || chunked {
                    return Err(RewriteError::Ambiguous(
                        "a Transfer-Encoding other than one chunked",
                    ));
                }
                chunked = true;
            }
            b"host" => {
                hosts += 1;
                h.host_header = true;
                h.host = host_name(&text);
            }
            b"expect" => h.expect_continue = text.eq_ignore_ascii_case("100-continue"),
            b"upgrade" => h.upgrade = true,
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(RewriteError::Ambiguous("two Host headers"));
    }
    h.body = match (length, chunked) {
        (Some(_), true) => return Err(RewriteError::Ambiguous("Content-Length with chunked")),
        (Some(n), false) => Body::Length(n),
        (None, true) if h.http10 => return Err(RewriteError::Ambiguous("chunked in HTTP/1.0")),
        (None, true) => Body::Chunked,
        (None, false) => Body::None,
    };
    Ok(h)
}

/// At most the first 80 bytes of `s` for an error message, cut where a character starts:
/// the line is the guest's and may hold any UTF-8.
fn trim(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn trim_bytes(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// `Authorization: Basic X` (or Proxy-Authorization): the line up to X, and X decoded.
fn basic_auth(line: &[u8]) -> Option<(&[u8], Vec<u8>)> {
    let colon = memchr::memchr(b':', line)?;
    let name = line[..colon].to_ascii_lowercase();
    if name != b"authorization" && name != b"proxy-authorization" {
        return None;
    }
    let rest = &line[colon + 1..];
    let value = trim_bytes(rest.strip_suffix(b"\r\n").unwrap_or(rest));
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let creds = trim_bytes(&value[6..]);
    let decoded = base64_decode(creds)?;
    let prefix_len = creds.as_ptr() as usize - line.as_ptr() as usize;
    Some((&line[..prefix_len], decoded))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = u32::from(c[0]) << 16
            | u32::from(*c.get(1).unwrap_or(&0)) << 8
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Standard base64 with padding; `None` if it is not that.
pub(crate) fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 != 0 {
        return None;
    }
    let val = |c: u8| B64.iter().position(|b| *b == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (k, q) in s.chunks(4).enumerate() {
        let last = k == s.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in q.iter().enumerate() {
            let v = if i >= 4 - pad { 0 } else { val(*c)? };
            n = n << 6 | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Adds a substituter's counts to `counts` and zeroes its own.
fn add_counts(counts: &mut [u64], sub: &mut Substituter) {
    for (c, n) in counts.iter_mut().zip(sub.counts.iter_mut()) {
        *c += std::mem::take(n);
    }
}

/// `head` with its Content-Length set to `len`.
fn with_length(head: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 8);
    for line in split_lines(head) {
        if is_header(line, b"content-length") {
            out.extend_from_slice(format!("Content-Length: {len}\r\n").as_bytes());
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

/// `head` without Content-Length, with chunked Transfer-Encoding added before the blank line.
fn to_chunked(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 32);
    for line in split_lines(head) {
        if line == b"\r\n" {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        } else if !is_header(line, b"content-length") {
            out.extend_from_slice(line);
        }
    }
    out
}

fn is_header(line: &[u8], lower_name: &[u8]) -> bool {
    line.len() > lower_name.len()
        && line[lower_name.len()] == b':'
        && line[..lower_name.len()].eq_ignore_ascii_case(lower_name)
}

/// A chunk-size line's size (extensions ignored).
fn chunk_size(line: &[u8]) -> Result<u64, RewriteError> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(RewriteError::BadChunk("size line without CRLF"))?;
    let hex = line.split(|b| *b == b';').next().unwrap_or_default();
    let hex = trim_bytes(hex);
    if hex.is_empty() || hex.len() > 15 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(RewriteError::BadChunk("bad size"));
    }
    u64::from_str_radix(std::str::from_utf8(hex).expect("hex digits"), 16)
        .map_err(|_| RewriteError::BadChunk("bad size"))
}

#[cfg(test)]
mod tests;
