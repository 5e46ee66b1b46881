//! The name a TCP flow's first bytes carry: the server name (SNI) of a TLS ClientHello, or
//! the Host header of an HTTP/1 request. Domain rules use it besides the DNS answers the
//! sandbox received (see [`crate::stack`]). Guest input: every length is checked, nothing is
//! trusted to be complete, and a name is only returned if it is a valid domain.

use crate::policy::normalize_domain;

/// How many of a flow's first bytes are looked at, at most: a TLS record (16 KiB plus its
/// header) and then some, for a ClientHello split over records.
pub const MAX_SNIFF: usize = 32 << 10;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello's server name or an HTTP request's Host (normalized).
    Name(String),
    /// Neither TLS nor HTTP, or one of them without a name.
    NoName,
    /// A TLS ClientHello or HTTP request that has not fully arrived.
    NeedMore,
    /// Looks like TLS or HTTP but is not valid (or does not fit [`MAX_SNIFF`]).
    Malformed,
}

/// Looks at a flow's first bytes.
pub fn sniff(data: &[u8]) -> Sniffed {
    match data.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => tls(data),
        Some(b'A'..=b'Z') => http(data),
        Some(_) => Sniffed::NoName,
    }
}

/// Bytes `[at, at + n)` of `d`, if there.
fn take<'a>(d: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(n)?;
    let s = d.get(*at..end)?;
    *at = end;
    Some(s)
}

fn u8_at(d: &[u8], at: &mut usize) -> Option<usize> {
    take(d, at, 1).map(|b| b[0] as usize)
}

fn u16_at(d: &[u8], at: &mut usize) -> Option<usize> {
    take(d, at, 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
}

fn tls(data: &[u8]) -> Sniffed {
    // The handshake messages, gathered from consecutive handshake records.
    let mut hs = Vec::new();
    let mut at = 0;
    // Something other than a handshake record came before the hello was whole.
    let mut other = false;
    while at < data.len() {
        if data[at] != 0x16 {
            other = true;
            break;
        }
        let Some(header) = data.get(at..at + 5) else {
            break;
        };
        if header[1] != 3 {
            return Sniffed::Malformed;
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Sniffed::Malformed;
        }
        let end = (at + 5 + len).min(data.len());
        hs.extend_from_slice(&data[at + 5..end]);
        at += 5 + len;
        if hs.len() >= 4 && hs.len() >= 4 + hello_len(&hs) {
            break;
        }
    }
    let incomplete = || {
        if other || data.len() >= MAX_SNIFF {
            Sniffed::Malformed
        } else {
            Sniffed::NeedMore
        }
    };
    if hs.len() < 4 {
        return incomplete();
    }
    if hs[0] != 1 {
        return Sniffed::Malformed; // a client's first handshake message is its hello
    }
    let len = hello_len(&hs);
    if 4 + len > MAX_SNIFF {
        return Sniffed::Malformed;
    }
    match hs.get(4..4 + len) {
        Some(hello) => client_hello(hello).unwrap_or(Sniffed::Malformed),
        None => incomplete(),
    }
}

/// The length a handshake message's header gives (at least 4 bytes of it present).
fn hello_len(hs: &[u8]) -> usize {
    (hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize
}

/// The server_name extension of a whole ClientHello body.
fn client_hello(h: &[u8]) -> Option<Sniffed> {
    let mut at = 0;
    take(h, &mut at, 2 + 32)?; // version, random
    let n = u8_at(h, &mut at)?;
    take(h, &mut at, n)?; // session id
    let n = u16_at(h, &mut at)?;
    take(h, &mut at, n)?; // cipher suites
    let n = u8_at(h, &mut at)?;
    take(h, &mut at, n)?; // compression methods
    if at == h.len() {
        return Some(Sniffed::NoName); // no extensions at all
    }
    let n = u16_at(h, &mut at)?;
    let exts = take(h, &mut at, n)?;
    let mut at = 0;
    while at < exts.len() {
        let kind = u16_at(exts, &mut at)?;
        let n = u16_at(exts, &mut at)?;
        let body = take(exts, &mut at, n)?;
        if kind != 0 {
            continue;
        }
        let mut b = 0;
        let n = u16_at(body, &mut b)?;
        let list = take(body, &mut b, n)?;
        let mut l = 0;
        while l < list.len() {
            let name_type = u8_at(list, &mut l)?;
            let n = u16_at(list, &mut l)?;
            let name = take(list, &mut l, n)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(match normalize_domain(name) {
                    Some(n) => Sniffed::Name(n),
                    None => Sniffed::Malformed,
                });
            }
        }
        return Some(Sniffed::NoName);
    }
    Some(Sniffed::NoName)
}

/// The Host header of an HTTP/1 request head.
fn http(data: &[u8]) -> Sniffed {
    let method_end = data.iter().position(|&b| b == b' ');
    match method_end {
        None if data.len() < 16 && data.iter().all(u8::is_ascii_uppercase) => {
            return Sniffed::NeedMore
        }
        None => return Sniffed::NoName,
        Some(n) if n == 0 || n > 16 || !data[..n].iter().all(u8::is_ascii_uppercase) => {
            return Sniffed::NoName
        }
        Some(_) => {}
    }
    let limit = data.len().min(MAX_SNIFF);
    let Some(end) = data[..limit].windows(4).position(|w| w == b"\r\n\r\n") else {
        return if data.len() >= MAX_SNIFF {
            Sniffed::Malformed
        } else {
            Sniffed::NeedMore
        };
    };
    let Ok(head) = std::str::from_utf8(&data[..end]) else {
        return Sniffed::Malformed;
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    if !request.ends_with(" HTTP/1.1") && !request.ends_with(" HTTP/1.0") {
        return Sniffed::NoName;
    }
    let mut host = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Sniffed::Malformed;
        };
        if k.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Sniffed::Malformed; // two Host headers: which one would the server use?
            }
            host = Some(v.trim());
        }
    }
    let Some(host) = host else {
        return Sniffed::NoName;
    };
    // An IP literal (with or without brackets and port) names no domain.
    if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return Sniffed::NoName;
    }
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Sniffed::NoName;
    }
    match normalize_domain(name) {
        Some(n) => Sniffed::Name(n),
        None => Sniffed::Malformed,
    }
}

#[cfg(test)]
mod tests;
