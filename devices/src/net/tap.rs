//! A TAP device, optionally created inside a network namespace: the host transport that lets
//! the host kernel's own TCP/IP stack (curl, iperf, DNS clients in that namespace) play the
//! guest against our netstack at full speed. Needs CAP_NET_ADMIN (and root for namespaces).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use msb_netstack::offload::{accept, VNET_HDR_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;

/// An open TAP device, non-blocking; each read or write is one Ethernet frame.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Frames carry a virtio-net header, and the kernel may leave checksums to us and send
    /// TCP segments of up to 64 KiB (as a virtio-net guest with offloads does).
    offload: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates TAP device `name` (at most 15 bytes) in the network namespace at `netns`
    /// (`/var/run/netns/NAME`), or in ours when `None`; with `offload`, the kernel's side may
    /// send partial checksums and 64 KiB TCP segments (see `msb_netstack::offload`).
    pub fn open(name: &str, netns: Option<&Path>, offload: bool) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        let name = name.to_string();
        let open = move || -> io::Result<Tap> {
            let path = CString::new("/dev/net/tun").expect("no NUL");
            // SAFETY: NUL-terminated path; the fd returned, if any, is ours.
            let raw = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI | if offload { IFF_VNET_HDR } else { 0 },
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads an ifreq, which `req` is laid out as.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
                return Err(io::Error::last_os_error());
            }
            if offload {
                let hdr = VNET_HDR_LEN as libc::c_int;
                // SAFETY: TUNSETVNETHDRSZ reads an int, which `hdr` is.
                if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
                // SAFETY: TUNSETOFFLOAD takes its flags by value.
                if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, flags) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(Tap { fd, name, offload })
        };
        match netns {
            Some(ns) => in_namespace(ns, open)?,
            None => open(),
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vnet header (only with offloads on: otherwise it takes no bytes) and the frame, as
    /// one readv/writev argument.
    fn iov_pair(&self, hdr: *mut u8, frame: *mut u8, len: usize) -> [libc::iovec; 2] {
        [
            libc::iovec {
                iov_base: hdr.cast(),
                iov_len: if self.offload { VNET_HDR_LEN } else { 0 },
            },
            libc::iovec {
                iov_base: frame.cast(),
                iov_len: len,
            },
        ]
    }

    /// Reads one frame; `Ok(None)` when none is waiting. With offloads, the frame may be up
    /// to 64 KiB whatever the MTU and its checksum partial (the netstack does not check it).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let iov = self.iov_pair(hdr.as_mut_ptr(), buf.as_mut_ptr(), buf.len());
        // SAFETY: both iovecs point into live buffers of their lengths; the fd is ours.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if !self.offload {
            return Ok(Some(n as usize));
        }
        let n = (n as usize).saturating_sub(VNET_HDR_LEN);
        if let Err(e) = accept(&hdr, &mut buf[..n]) {
            tracing::debug!("tap: dropping a frame: {e}");
            return Ok(Some(0));
        }
        Ok(Some(n))
    }

    /// Writes one frame (dropped by the kernel when the interface is down).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // No offload asked of the kernel: checksums are whole, one segment per frame.
        self.send_with(&[0u8; VNET_HDR_LEN], frame)
    }

    /// Writes one frame behind its vnet header (only sent with offloads on): the kernel
    /// finishes a partial TCP checksum and takes a large segment as the header says, as from
    /// a virtio-net device.
    pub fn send_with(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let iov = self.iov_pair(
            hdr.as_ptr().cast_mut(),
            frame.as_ptr().cast_mut(),
            frame.len(),
        );
        // SAFETY: both iovecs point into live buffers of their lengths (only read); the fd
        // is ours.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A full queue drops the frame, as a link would.
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl msb_netstack::stack::Link for Tap {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Tap::recv(self, buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        Tap::send(self, frame)
    }
    fn offloads(&self) -> bool {
        self.offload
    }
    fn send_offloaded(&mut self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        self.send_with(hdr, frame)
    }
}

/// Runs `f` on a thread of its own inside the network namespace at `netns`
/// (`/var/run/netns/NAME`), so the caller stays where it is. Threads `f` starts (a netstack,
/// its resolver threads) stay in that namespace, and sockets they open belong to it.
pub fn in_namespace<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let f_ns = File::open(netns)?;
    std::thread::spawn(move || -> io::Result<T> {
        // SAFETY: a valid namespace fd; affects only this thread.
        if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("a thread in the namespace panicked"))?
}

/// A network namespace playing the guest: a TAP device `tap0` with the guest's addresses
/// ([`msb_netstack::addr`]), routes through the gateway and the gateway as its resolver (through
/// `ip netns exec`). Tests and `msb-bench net` run their clients in it. Removed on drop.
#[derive(Debug)]
pub struct GuestNamespace {
    name: String,
}

impl GuestNamespace {
    /// Creates namespace `name` and its TAP device with link MTU `mtu`, with checksum and
    /// TCP segmentation offloads if `offload` (as a sandbox's virtio-net card has them); the
    /// TAP is returned for the netstack to serve.
    pub fn create(name: &str, mtu: usize, offload: bool) -> io::Result<(GuestNamespace, Tap)> {
        use msb_netstack::addr::{
            GATEWAY_V4, GATEWAY_V6, GUEST_V4, GUEST_V6, PREFIX_V4, PREFIX_V6,
        };
        ip(&["netns", "add", name])?;
        let ns = GuestNamespace {
            name: name.to_string(),
        };
        // `ip netns exec` puts this file at /etc/resolv.conf for the namespace's processes.
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            format!("{etc}/resolv.conf"),
            format!("nameserver {GATEWAY_V4}\noptions timeout:2 attempts:1\n"),
        )?;
        let tap = Tap::open(
            "tap0",
            Some(Path::new(&format!("/var/run/netns/{name}"))),
            offload,
        )?;
        let (v4, v6, mtu) = (
            format!("{GUEST_V4}/{PREFIX_V4}"),
            format!("{GUEST_V6}/{PREFIX_V6}"),
            mtu.to_string(),
        );
        let (gw4, gw6) = (GATEWAY_V4.to_string(), GATEWAY_V6.to_string());
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", "tap0", "mtu", &mtu],
            &["addr", "add", &v4, "dev", "tap0"],
            &["addr", "add", &v6, "dev", "tap0", "nodad"],
            &["link", "set", "tap0", "up"],
            &["route", "add", "default", "via", &gw4],
            &["-6", "route", "add", "default", "via", &gw6],
        ] {
            let mut full = vec!["-n", name];
            full.extend_from_slice(args);
            ip(&full)?;
        }
        // Unprivileged ICMP sockets (`ping` without raw sockets) for every group in it.
        allow_ping_sockets(Path::new(&format!("/var/run/netns/{name}")))?;
        Ok((ns, tap))
    }

    /// The namespace's name, for `ip netns exec NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command run inside the namespace (through `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for GuestNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// Lets every group open ICMP datagram sockets in the namespace at `netns` (the setting is
/// per namespace; /proc/sys/net shows the namespace of whoever opens it).
pub fn allow_ping_sockets(netns: &Path) -> io::Result<()> {
    in_namespace(netns, || {
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
    })?
}

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running ip (iproute2): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
