//! The HTTP/2 request inspector of intercepted flows: the guest's frames pass through
//! unchanged, but every header block is HPACK-decoded (in order, so the dynamic table stays in
//! step with the upstream's) and each request's `:authority` (or `Host`) is shown to the
//! caller before any byte of it is sent, as the HTTP/1 rewriter does for each request of a
//! kept-alive connection. Decoded header values are also scanned for placeholders, which
//! HPACK's Huffman coding would hide from a scan of the raw stream.
//!
//! Bounded: a header block is held until complete (at most [`MAX_BLOCK`]); other frames
//! stream through as they arrive. Anything that could be read two ways (a frame interleaved
//! into a header block, two authorities, pseudo-headers in trailers, a push from the client)
//! ends the flow, as does a decoding error.

use std::borrow::Cow;

use loona_hpack::Decoder;

use crate::http1::{host_name, Request};
use crate::secrets::{Scanner, Secrets};

/// What every HTTP/2 client connection starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest header block (HEADERS and its CONTINUATIONs) held.
pub const MAX_BLOCK: usize = 256 << 10;
/// The largest HPACK dynamic table a guest may ask for (servers advertise 4 KiB by default).
pub const MAX_TABLE: usize = 64 << 10;

const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a flow's requests cannot be inspected; the flow ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InspectError {
    #[error("not an HTTP/2 client connection (no preface)")]
    NoPreface,
    #[error("HTTP/2 header block over {MAX_BLOCK} bytes")]
    BlockTooLarge,
    #[error("bad HTTP/2 framing: {0}")]
    Framing(&'static str),
    #[error("HPACK: {0}")]
    Hpack(String),
    #[error("ambiguous HTTP/2 request ({0}): refused")]
    Ambiguous(&'static str),
    #[error("request to {0} refused by the policy")]
    Refused(String),
}

#[derive(Debug)]
enum State {
    Preface,
    /// Reading a frame header (in `hdr`).
    Header,
    /// Passing `left` payload bytes of a frame that is not a header block.
    Skip(usize),
    /// Holding the payload of a HEADERS or CONTINUATION frame.
    Block {
        ty: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
}

/// Inspects the requests a guest sends on one intercepted HTTP/2 connection to `server` (the
/// TLS server name).
pub struct RequestInspector {
    server: String,
    state: State,
    /// The preface or a frame header, as far as read.
    hdr: Vec<u8>,
    /// The payload of the header-block frame being read.
    payload: Vec<u8>,
    /// Frames of a header block not yet complete: released once it is admitted.
    held: Vec<u8>,
    /// The header block's fragments, joined.
    block: Vec<u8>,
    /// The stream an unfinished header block belongs to (only CONTINUATIONs of it may follow).
    open_block: Option<u32>,
    decoder: Decoder<'static>,
    /// The highest stream a request was seen on.
    last_stream: u32,
    /// Requests seen.
    pub requests: u64,
    /// Placeholders found in decoded headers, by secret index, in the order seen.
    pub violations: Vec<usize>,
}

impl std::fmt::Debug for RequestInspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestInspector")
            .field("server", &self.server)
            .field("state", &self.state)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

/// What a decoded header block says about the request.
#[derive(Default)]
struct Fields {
    method: Option<String>,
    authority: Option<String>,
    host: Option<String>,
    pseudo: bool,
    twice: Option<&'static str>,
    violation: Option<usize>,
}

impl RequestInspector {
    pub fn new(server: &str) -> RequestInspector {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        RequestInspector {
            server: server.to_string(),
            state: State::Preface,
            hdr: Vec::new(),
            payload: Vec::new(),
            held: Vec::new(),
            block: Vec::new(),
            open_block: None,
            decoder,
            last_stream: 0,
            requests: 0,
            violations: Vec::new(),
        }
    }

    /// Passes `input` (any segment of the guest's stream) into `out`, holding header blocks
    /// until `admit` has seen the request they open; refusing one ends the flow.
    pub fn push(
        &mut self,
        secrets: &Secrets,
        mut input: &[u8],
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), InspectError> {
        while !input.is_empty() {
            match self.state {
                State::Preface => {
                    let n = (PREFACE.len() - self.hdr.len()).min(input.len());
                    self.hdr.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if !PREFACE.starts_with(&self.hdr) {
                        return Err(InspectError::NoPreface);
                    }
                    if self.hdr.len() == PREFACE.len() {
                        out.extend_from_slice(PREFACE);
                        self.hdr.clear();
                        self.state = State::Header;
                    }
                }
                State::Header => {
                    let n = (FRAME_HEADER - self.hdr.len()).min(input.len());
                    self.hdr.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.hdr.len() == FRAME_HEADER {
                        self.frame_header(out)?;
                        if matches!(self.state, State::Block { len: 0, .. }) {
                            self.block_frame(secrets, out, admit)?;
                        }
                    }
                }
                State::Skip(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n {
                        State::Header
                    } else {
                        State::Skip(left - n)
                    };
                }
                State::Block { len, .. } => {
                    let n = (len - self.payload.len()).min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.payload.len() == len {
                        self.block_frame(secrets, out, admit)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete frame header: header-block frames are held, others pass.
    fn frame_header(&mut self, out: &mut Vec<u8>) -> Result<(), InspectError> {
        let h = &self.hdr;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (ty, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        match (self.open_block, ty) {
            (Some(s), CONTINUATION) if s == stream => {}
            (Some(_), _) => return Err(InspectError::Framing("a frame inside a header block")),
            (None, CONTINUATION) => return Err(InspectError::Framing("a stray CONTINUATION")),
            (None, PUSH_PROMISE) => {
                return Err(InspectError::Framing("PUSH_PROMISE from a client"))
            }
            _ => {}
        }
        if ty == HEADERS || ty == CONTINUATION {
            if self.block.len() + len > MAX_BLOCK {
                return Err(InspectError::BlockTooLarge);
            }
            self.held.extend_from_slice(&self.hdr);
            self.payload.clear();
            self.state = State::Block {
                ty,
                flags,
                stream,
                len,
            };
        } else {
            out.extend_from_slice(&self.hdr);
            self.state = if len == 0 {
                State::Header
            } else {
                State::Skip(len)
            };
        }
        self.hdr.clear();
        Ok(())
    }

    /// A complete HEADERS or CONTINUATION frame: its fragment joins the block; a finished
    /// block is decoded, its request admitted, and its frames released.
    fn block_frame(
        &mut self,
        secrets: &Secrets,
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Request) -> bool,
    ) -> Result<(), InspectError> {
        let State::Block {
            ty, flags, stream, ..
        } = self.state
        else {
            unreachable!("called in State::Block only")
        };
        self.state = State::Header;
        let p = std::mem::take(&mut self.payload);
        self.held.extend_from_slice(&p);
        let mut frag = &p[..];
        if ty == HEADERS {
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&n, rest) = frag.split_first().ok_or(InspectError::Framing(
                    "a padded frame without its pad length",
                ))?;
                pad = usize::from(n);
                frag = rest;
            }
            if flags & PRIORITY != 0 {
                frag = frag
                    .get(5..)
                    .ok_or(InspectError::Framing("a priority field cut short"))?;
            }
            frag = frag
                .len()
                .checked_sub(pad)
                .map(|end| &frag[..end])
                .ok_or(InspectError::Framing("padding longer than the frame"))?;
        }
        if stream == 0 {
            return Err(InspectError::Framing("a header block on stream 0"));
        }
        self.block.extend_from_slice(frag);
        if flags & END_HEADERS == 0 {
            self.open_block = Some(stream);
            return Ok(());
        }
        self.open_block = None;
        let block = std::mem::take(&mut self.block);
        let f = self.decode(secrets, &block)?;
        if let Some(i) = f.violation {
            self.violations.push(i);
        }
        if let Some(what) = f.twice {
            return Err(InspectError::Ambiguous(what));
        }
        if stream > self.last_stream {
            // A new stream: a request.
            if stream % 2 == 0 {
                return Err(InspectError::Framing("a request on a server stream"));
            }
            self.last_stream = stream;
            let (authority, host) = (
                f.authority.as_deref().map(host_name),
                f.host.as_deref().map(host_name),
            );
            if let (Some(a), Some(h)) = (&authority, &host) {
                if a != h {
                    return Err(InspectError::Ambiguous(":authority and Host differ"));
                }
            }
            let req = Request {
                method: f.method.unwrap_or_default(),
                host: authority.clone().or(host.clone()).flatten(),
                host_header: authority.is_some() || host.is_some(),
            };
            if !admit(&req) {
                return Err(InspectError::Refused(
                    req.host.unwrap_or_else(|| self.server.clone()),
                ));
            }
            self.requests += 1;
        } else if f.pseudo || f.host.is_some() {
            // Trailers (or a reused stream) must not name another host.
            return Err(InspectError::Ambiguous(
                "pseudo-headers or Host in trailers",
            ));
        }
        out.append(&mut self.held);
        Ok(())
    }

    fn decode(&mut self, secrets: &Secrets, block: &[u8]) -> Result<Fields, InspectError> {
        let mut f = Fields::default();
        let text = |v: &Cow<[u8]>| String::from_utf8_lossy(v).into_owned();
        self.decoder
            .decode_with_cb(block, |name, value| {
                if f.violation.is_none() {
                    f.violation = Scanner::default()
                        .scan(secrets, &name)
                        .or_else(|| Scanner::default().scan(secrets, &value));
                }
                let slot = match &name[..] {
                    b":authority" => &mut f.authority,
                    b"host" => &mut f.host,
                    b":method" => &mut f.method,
                    n => {
                        f.pseudo |= n.starts_with(b":");
                        return;
                    }
                };
                f.pseudo |= name.starts_with(b":");
                if slot.is_some() {
                    f.twice = Some("a header given twice");
                }
                *slot = Some(text(&value));
            })
            .map_err(|e| InspectError::Hpack(e.to_string()))?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests;
