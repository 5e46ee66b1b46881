//! Test tier 3 for TLS interception and secrets: the netstack with a TAP device in a network
//! namespace the test makes (as `tap.rs`), real clients in it (curl, Python), and real HTTPS
//! upstreams (rustls, with a CA of the test's own given as `--tls-upstream-ca` would) in a
//! "world" namespace. Nothing leaves the machine. Needs root.

#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use msb_devices::net::tap::{in_namespace, GuestNamespace};
use msb_netstack::ca::{Ca, Leaves};
use msb_netstack::intercept::Intercept;
use msb_netstack::policy::{Action, Policy, Preset};
use msb_netstack::secrets::{HostPattern, Secret, Secrets};
use msb_netstack::stack::{Config, LogEvent, NetStack};

const UPSTREAM: &str = "93.184.215.14";

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, removed on drop: the host, where the stack runs (its
/// sockets live there), and the world beyond it, holding the upstream's address and HTTPS
/// servers. So the stack's connections reach only the world, never this machine's network.
struct World {
    name: String,
    host: String,
    /// The CA the upstreams' certificates chain to, as a PEM file.
    ca_file: PathBuf,
    /// The sandbox CA guests trust, as a PEM file.
    sandbox_ca_file: PathBuf,
    sandbox_leaves: Arc<Leaves>,
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in [&self.name, &self.host] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
        let _ = std::fs::remove_file(&self.ca_file);
        let _ = std::fs::remove_file(&self.sandbox_ca_file);
    }
}

/// An HTTP/1.1 server (keep-alive) answering each request with what it received: the head
/// as it came and the body decoded.
fn serve(conn: &mut dyn ReadWrite) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match conn.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if let Some(l) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
        {
            let n: usize = l.trim().parse().unwrap();
            while buf.len() < n {
                match conn.read(&mut tmp) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&tmp[..k]),
                }
            }
            body = buf.drain(..n).collect();
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let line_end = loop {
                    if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    match conn.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                    }
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&buf[..line_end])
                        .split(';')
                        .next()
                        .unwrap()
                        .trim(),
                    16,
                )
                .unwrap();
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    match conn.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                    }
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        let mut reply = head.into_bytes();
        reply.extend_from_slice(&body);
        let out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", reply.len());
        if conn
            .write_all(out.as_bytes())
            .and_then(|_| conn.write_all(&reply))
            .and_then(|_| conn.flush())
            .is_err()
        {
            return;
        }
    }
}

/// A minimal HTTP/2 server (enough for curl): each request is answered with its decoded
/// header fields, one `name: value` line each, after a first line `h2`.
fn serve_h2(conn: &mut dyn ReadWrite) {
    fn frame(ty: u8, flags: u8, stream: u32, p: &[u8]) -> Vec<u8> {
        let n = p.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(p);
        f
    }
    let mut preface = [0u8; 24];
    if conn.read_exact(&mut preface).is_err() || conn.write_all(&frame(4, 0, 0, &[])).is_err() {
        return;
    }
    let (mut dec, mut enc) = (loona_hpack::Decoder::new(), loona_hpack::Encoder::new());
    let mut block = Vec::new();
    loop {
        let mut h = [0u8; 9];
        if conn.read_exact(&mut h).is_err() {
            return;
        }
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (ty, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let mut p = vec![0u8; len];
        if conn.read_exact(&mut p).is_err() {
            return;
        }
        let reply = match ty {
            4 if flags & 1 == 0 => frame(4, 1, 0, &[]),
            1 | 9 => {
                let mut frag = &p[..];
                if ty == 1 && flags & 0x8 != 0 {
                    let pad = usize::from(frag[0]);
                    frag = &frag[1..frag.len() - pad];
                }
                if ty == 1 && flags & 0x20 != 0 {
                    frag = &frag[5..];
                }
                block.extend_from_slice(frag);
                if flags & 0x4 == 0 {
                    continue;
                }
                let mut body = String::from("h2\n");
                for (n, v) in dec.decode(&block).unwrap() {
                    body += &format!(
                        "{}: {}\n",
                        String::from_utf8_lossy(&n),
                        String::from_utf8_lossy(&v)
                    );
                }
                block.clear();
                let len = body.len().to_string();
                let head = enc.encode([
                    (&b":status"[..], &b"200"[..]),
                    (b"content-length", len.as_bytes()),
                ]);
                let mut r = frame(1, 0x4, stream, &head);
                r.extend(frame(0, 0x1, stream, body.as_bytes()));
                r
            }
            7 => return,
            _ => continue,
        };
        if conn.write_all(&reply).and_then(|_| conn.flush()).is_err() {
            return;
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// HTTPS on `port` in the world namespace with leaves from `leaves`.
fn https_server(world: &str, port: u16, leaves: Arc<Leaves>) {
    let l = in_namespace(
        &PathBuf::from(format!("/var/run/netns/{world}")),
        move || TcpListener::bind(("::", port)),
    )
    .unwrap()
    .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_cert_resolver(leaves);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, c);
                if tls.conn.complete_io(&mut tls.sock).is_err() {
                    return;
                }
                if tls.conn.alpn_protocol() == Some(b"h2") {
                    serve_h2(&mut tls);
                } else {
                    serve(&mut tls);
                }
            });
        }
    });
}

fn world() -> World {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "msbtls{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let host = format!("{name}h");
    ip(&["netns", "add", &name]);
    ip(&["netns", "add", &host]);
    ip(&[
        "-n", &host, "link", "add", "h0", "type", "veth", "peer", "name", "w0", "netns", &name,
    ]);
    for (ns, dev, addr) in [
        (&name, "w0", "192.168.78.2/24"),
        (&host, "h0", "192.168.78.1/24"),
    ] {
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    ip(&[
        "-n",
        &name,
        "addr",
        "add",
        &format!("{UPSTREAM}/32"),
        "dev",
        "lo",
    ]);
    ip(&[
        "-n",
        &host,
        "route",
        "add",
        "default",
        "via",
        "192.168.78.2",
    ]);
    let up_ca = Ca::generate().unwrap();
    let ca_file = std::env::temp_dir().join(format!("{name}-upstream-ca.pem"));
    std::fs::write(&ca_file, up_ca.cert_pem()).unwrap();
    https_server(&name, 443, Arc::new(Leaves::new(up_ca).unwrap()));
    // Plain TCP: an echo server.
    let echo = in_namespace(&PathBuf::from(format!("/var/run/netns/{name}")), || {
        TcpListener::bind(("::", 7000))
    })
    .unwrap()
    .unwrap();
    std::thread::spawn(move || {
        for c in echo.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    // An upstream that accepts connections and never says a word.
    let silent = in_namespace(&PathBuf::from(format!("/var/run/netns/{name}")), || {
        TcpListener::bind(("::", 9443))
    })
    .unwrap()
    .unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    // A second upstream whose certificates chain to a CA nobody trusts.
    https_server(
        &name,
        8443,
        Arc::new(Leaves::new(Ca::generate().unwrap()).unwrap()),
    );
    let sb_ca = Ca::generate().unwrap();
    let sandbox_ca_file = std::env::temp_dir().join(format!("{name}-sandbox-ca.pem"));
    std::fs::write(&sandbox_ca_file, sb_ca.cert_pem()).unwrap();
    World {
        name,
        host,
        ca_file,
        sandbox_ca_file,
        sandbox_leaves: Arc::new(Leaves::new(sb_ca).unwrap()),
    }
}

struct Sandbox {
    ns: GuestNamespace,
    stack: Option<NetStack>,
    log: Arc<Mutex<Vec<LogEvent>>>,
    placeholder: String,
}

impl Sandbox {
    fn stop(&mut self) -> Vec<LogEvent> {
        self.stack.take();
        self.log.lock().unwrap().clone()
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.ns
            .command(program)
            .args(args)
            .env("KEY", &self.placeholder)
            .output()
            .unwrap()
    }

    fn curl(&self, args: &[&str]) -> (bool, String) {
        let mut full = vec!["-sS", "--max-time", "10"];
        full.extend_from_slice(args);
        let o = self.run("curl", &full);
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stack.take();
    }
}

fn sandbox(w: &World, tweak: impl FnOnce(&mut Intercept)) -> Sandbox {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the TLS tests make network namespaces and TAP devices: run them as root (./x test does)"
    );
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "msbtg{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let (ns, tap) = GuestNamespace::create(&name, 1500, true).unwrap();
    let secrets = Secrets::new(vec![Secret::new(
        "KEY",
        b"sk-live-real-value".to_vec(),
        "api.test",
    )
    .unwrap()])
    .unwrap();
    let placeholder = secrets.get(0).placeholder().to_string();
    let mut i = Intercept::new(w.sandbox_leaves.clone(), secrets, &[&w.ca_file], false).unwrap();
    i.ports = vec![443, 8443, 9443];
    tweak(&mut i);
    let log = Arc::new(Mutex::new(Vec::new()));
    let hook = log.clone();
    let mut policy = Policy::preset(Preset::Public);
    policy.add_flag(Action::Deny, "evil.test").unwrap();
    let cfg = Config {
        policy,
        resolver: Arc::new(|name: &str| {
            if name.ends_with(".test") {
                Ok(vec![UPSTREAM.parse::<IpAddr>().unwrap()])
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such name",
                ))
            }
        }),
        log: Some(Arc::new(move |e: &LogEvent| {
            hook.lock().unwrap().push(e.clone())
        })),
        intercept: Some(Arc::new(i)),
        // Short, so a silent upstream is given up on within the test.
        handshake_timeout: std::time::Duration::from_secs(3),
        ..Config::default()
    };
    let host = PathBuf::from(format!("/var/run/netns/{}", w.host));
    let stack = in_namespace(&host, move || NetStack::spawn(Box::new(tap), cfg))
        .unwrap()
        .unwrap();
    Sandbox {
        ns,
        stack: Some(stack),
        log,
        placeholder,
    }
}

/// curl through the sandbox: the placeholder in the query, a header and the body becomes the
/// real value at the upstream, which the guest never sees in its own memory's inputs; the
/// audit log has the tls and secret lines.
#[test]
fn curl_gets_the_value_substituted_toward_its_host_only() {
    let w = world();
    let mut sb = sandbox(&w, |_| {});
    let ca = w.sandbox_ca_file.to_str().unwrap();
    let (ok, out) = sb.curl(&[
        "--cacert",
        ca,
        "--http1.1",
        "-H",
        "Authorization: Bearer $KEY",
        "https://api.test/v1",
    ]);
    assert!(ok, "{out}");
    // The shell is not involved: curl sent the placeholder literally as "$KEY"; now use it.
    let ph = sb.placeholder.clone();
    let (ok, out) = sb.curl(&[
        "--cacert",
        ca,
        "--http1.1",
        "-H",
        &format!("Authorization: Bearer {ph}"),
        "--data-binary",
        &format!("{{\"key\":\"{ph}\"}}"),
        &format!("https://api.test/v1?key={ph}"),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("POST /v1?key=sk-live-real-value HTTP/1.1"),
        "{out}"
    );
    assert!(
        out.contains("Authorization: Bearer sk-live-real-value"),
        "{out}"
    );
    assert!(out.contains("{\"key\":\"sk-live-real-value\"}"), "{out}");
    assert!(!out.contains(&ph), "{out}");
    // curl offering HTTP/2 gets HTTP/1.1 toward a host a secret is bound to, substituted.
    let (ok, out) = sb.curl(&[
        "--cacert",
        ca,
        "--http2",
        "-H",
        &format!("X-Key: {ph}"),
        "https://api.test/h2",
    ]);
    assert!(
        ok && out.contains("GET /h2 HTTP/1.1") && out.contains("X-Key: sk-live-real-value"),
        "{out}"
    );
    // Toward another host the flow is blocked, the value never sent.
    let (ok, out) = sb.curl(&[
        "--cacert",
        ca,
        "-H",
        &format!("X: {ph}"),
        "https://other.test/",
    ]);
    assert!(!ok, "{out}");
    // Without a placeholder other hosts work, through the sandbox CA: HTTP/1.1, and HTTP/2
    // end to end (the upstream speaks it), two requests on one connection.
    let (ok, out) = sb.curl(&["--cacert", ca, "--http1.1", "https://other.test/plain"]);
    assert!(ok && out.contains("GET /plain HTTP/1.1"), "{out}");
    let (ok, out) = sb.curl(&[
        "--cacert",
        ca,
        "--http2",
        "https://other.test/a",
        "https://other.test/b",
    ]);
    assert!(
        ok && out.matches("h2\n").count() == 2
            && out.contains(":path: /b")
            && out.contains(":authority: other.test"),
        "{out}"
    );
    // Each HTTP/2 request's authority is shown to the policy: curl sends its Host header as
    // `:authority`; a denied name ends the flow before the request leaves.
    let (ok, out) = sb.curl(&[
        "--cacert",
        ca,
        "--http2",
        "-H",
        "Host: evil.test",
        "https://other.test/fronted",
    ]);
    assert!(!ok, "{out}");
    // The upstream's own CA is not what the guest sees: interception is visible.
    let (ok, _) = sb.curl(&["--cacert", w.ca_file.to_str().unwrap(), "https://api.test/"]);
    assert!(
        !ok,
        "the guest sees the sandbox CA's leaf, not the upstream's"
    );
    // An upstream whose certificate does not verify: the guest gets no answer.
    let (ok, out) = sb.curl(&["--cacert", ca, "https://api.test:8443/"]);
    assert!(!ok, "{out}");
    // An upstream that never answers the handshake: the guest is reset once the handshake
    // deadline passes (the log line below names it; curl's own limit is far longer).
    let (ok, out) = sb.curl(&["--cacert", ca, "https://api.test:9443/"]);
    assert!(!ok, "{out}");
    let log = sb.stop();
    let has = |kind: &str, verdict: &str, pred: &dyn Fn(&LogEvent) -> bool| {
        log.iter()
            .any(|e| e.kind == kind && e.verdict == verdict && pred(e))
    };
    assert!(
        has("tls", "intercepted", &|e| e.names == ["api.test"]
            && e.rule == "upstream verified"),
        "{log:#?}"
    );
    assert!(
        has("secret", "substituted", &|e| e.secret.as_deref()
            == Some("KEY")
            && e.count == Some(3)),
        "{log:#?}"
    );
    assert!(
        has("tls", "failed", &|e| e
            .rule
            .contains("placeholder of secret KEY")),
        "{log:#?}"
    );
    assert!(
        has("tls", "failed", &|e| e
            .rule
            .contains("request to evil.test refused by the policy")),
        "{log:#?}"
    );
    assert!(
        has("tls", "failed", &|e| e.rule.contains("UnknownIssuer")),
        "{log:#?}"
    );
    assert!(
        has("tls", "failed", &|e| e
            .rule
            .contains("TLS handshake not done after 3 s")),
        "{log:#?}"
    );
    // Finished flows end (and are logged) as they finish, not when the sandbox stops.
    let stop = log
        .iter()
        .rposition(|e| e.kind == "secret" && e.verdict == "substituted")
        .unwrap();
    assert!(
        log[stop + 1..].iter().any(|e| e.kind == "tls"),
        "the substituting flow ended before later ones started: {log:#?}"
    );
    for e in &log {
        let line = serde_json_line(e);
        assert!(
            !line.contains("sk-live-real-value"),
            "the value is never logged: {line}"
        );
    }
}

fn serde_json_line(e: &LogEvent) -> String {
    format!("{e:?}")
}

/// Python's http.client: many requests on one kept-alive connection, each substituted and
/// each Host shown to the policy; a QUIC datagram is refused; a bypassed name keeps the
/// upstream's own certificate chain.
#[test]
fn keep_alive_quic_and_bypass() {
    let w = world();
    let mut sb = sandbox(&w, |i| {
        i.bypass = vec![HostPattern::parse("*.pinned.test").unwrap()]
    });
    let code = format!(
        r#"
import http.client, os, ssl, socket
ctx = ssl.create_default_context(cafile={ca:?})
c = http.client.HTTPSConnection("api.test", 443, context=ctx, timeout=10)
ok = 0
for i in range(20):
    c.request("POST", "/r%d" % i, body=("n=%d&k=" % i) + os.environ["KEY"], headers={{"X-Key": os.environ["KEY"]}})
    r = c.getresponse().read().decode()
    ok += ("POST /r%d HTTP/1.1" % i) in r and r.count("sk-live-real-value") == 2 and "MSB_SECRET_" not in r
print("substituted", ok)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
u.sendto(b"\xc0quic initial", ({up:?}, 443))
try:
    u.recv(100); print("quic answered")
except socket.timeout:
    print("quic refused")
pinned = ssl.create_default_context(cafile={upca:?})
p = http.client.HTTPSConnection("app.pinned.test", 443, context=pinned, timeout=10)
p.request("GET", "/pinned")
print("bypass", p.getresponse().status)
"#,
        ca = w.sandbox_ca_file.to_str().unwrap(),
        up = UPSTREAM,
        upca = w.ca_file.to_str().unwrap(),
    );
    let o = sb.run("python3", &["-c", &code]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("substituted 20"), "{out}");
    assert!(out.contains("quic refused"), "{out}");
    assert!(out.contains("bypass 200"), "{out}");
    let log = sb.stop();
    assert!(
        log.iter()
            .any(|e| e.kind == "flow" && e.rule.contains("QUIC")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|e| e.kind == "tls" && e.verdict == "bypassed" && e.names == ["app.pinned.test"]),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|e| e.kind == "secret" && e.count == Some(40)),
        "{log:#?}"
    );
}

/// Node's and Go's HTTPS clients, given only the environment msb-init sets in a sandbox
/// (`NODE_EXTRA_CA_CERTS`, `SSL_CERT_FILE`), trust the sandbox CA and get the value
/// substituted toward its host; toward another host the flow is blocked.
#[test]
fn node_and_go_clients_work_unchanged() {
    let w = world();
    let sb = sandbox(&w, |_| {});
    let ca = w.sandbox_ca_file.to_str().unwrap();
    let node = r#"
const https = require("https");
const get = (host) => new Promise((resolve) => {
  const req = https.request({ host, path: "/node?k=" + process.env.KEY, headers: { "X-Key": process.env.KEY } },
    (res) => { let b = ""; res.on("data", (d) => b += d); res.on("end", () => resolve(b)); });
  req.on("error", (e) => resolve("error " + e.code));
  req.end();
});
(async () => { console.log(await get("api.test")); console.log("other:", await get("other.test")); })();
"#;
    let o = sb
        .ns
        .command("node")
        .args(["-e", node])
        .env("KEY", &sb.placeholder)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .output()
        .expect("node is needed (./x test installs nodejs)");
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        out.contains("GET /node?k=sk-live-real-value HTTP/1.1")
            && out.contains("X-Key: sk-live-real-value")
            && out.contains("other: error ECONNRESET"),
        "{out}"
    );
    let dir = std::env::temp_dir().join(format!("{}-go", w.name));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("main.go"),
        r#"package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func get(url string) string {
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("X-Key", os.Getenv("KEY"))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return "error " + err.Error()
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

func main() {
	fmt.Println(get("https://api.test/go"))
	fmt.Println("other:", get("https://other.test/go"))
}
"#,
    )
    .unwrap();
    let o = sb
        .ns
        .command("go")
        .args(["run", "main.go"])
        .current_dir(&dir)
        .env("KEY", &sb.placeholder)
        .env("SSL_CERT_FILE", ca)
        .env("GOCACHE", std::env::temp_dir().join("msb-test-gocache"))
        .env("GO111MODULE", "off")
        .output()
        .expect("go is needed (./x test installs golang-go)");
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        out.contains("GET /go HTTP/1.1") && out.contains("X-Key: sk-live-real-value"),
        "{out}"
    );
    assert!(out.contains("other: error"), "{out}");
}

/// A placeholder in plain HTTP, raw TCP, UDP or a DNS query (flows not intercepted) is a
/// violation: the flow is blocked and logged.
#[test]
fn placeholders_elsewhere_are_blocked() {
    let w = world();
    let mut sb = sandbox(&w, |_| {});
    let code = format!(
        r#"
import os, socket
k = os.environ["KEY"]
s = socket.create_connection(({up:?}, 7000), timeout=3)
s.sendall(b"hello "); print("echo", s.recv(100))
s.sendall(("then " + k).encode())
try:
    print("raw tcp", s.recv(100) or b"closed")
except OSError as e:
    print("raw tcp reset", e.errno)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
u.sendto(("payload " + k).encode(), ({up:?}, 9999))
try:
    socket.getaddrinfo(k + ".example.org", 80)
    print("dns answered")
except socket.gaierror as e:
    print("dns refused", e.errno)
"#,
        up = UPSTREAM
    );
    let o = sb.run("python3", &["-c", &code]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("dns refused"), "{out}");
    assert!(out.contains("echo b'hello '"), "{out}");
    assert!(
        out.contains("raw tcp reset") || out.contains("raw tcp b'closed'"),
        "{out}"
    );
    let log = sb.stop();
    let blocked = |proto: &str, dst: &str| {
        log.iter().any(|e| {
            e.kind == "secret" && e.verdict == "blocked" && e.proto == proto && e.dst.contains(dst)
        })
    };
    assert!(blocked("udp", "93.184.215.14:9999"), "{log:#?}");
    assert!(blocked("udp", ":53"), "{log:#?}");
    assert!(blocked("tcp", "93.184.215.14:7000"), "{log:#?}");
}
