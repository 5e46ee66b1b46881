//! The guest's network: the virtio-net card `eth0` gets the addresses and default routes the
//! VMM put on the command line (`msb.net=`), and the gateway becomes the resolver. Plain
//! ioctls, so msb-init needs no `ip` binary in the root.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use msb_init::cmdline::NetConfig;

const IFACE: &[u8] = b"eth0";

fn socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &[u8]) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req
}

fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: every caller passes the structure `request` reads or fills, valid for writes.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request as libc::Ioctl, arg as *mut T) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Brings interface `name` up.
pub fn link_up(name: &[u8]) -> io::Result<()> {
    let sock = socket(libc::AF_INET)?;
    let mut req = ifreq(name);
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; both are plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[repr(C)]
struct In6Ifreq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    type_: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6(ip: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

/// Configures `eth0` as `cfg` says and points the resolver at the gateway.
pub fn configure(cfg: &NetConfig) -> io::Result<()> {
    // Our gateway never claims the guest's address: skip duplicate address detection, so the
    // IPv6 address is usable at once instead of tentative for a second.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/eth0/accept_ra", "0");
    link_up(IFACE)?;
    let v4 = socket(libc::AF_INET)?;
    let mut req = ifreq(IFACE);
    req.ifr_ifru.ifru_addr = sockaddr_in(cfg.v4);
    ioctl(&v4, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
    let mask = if cfg.v4_prefix == 0 {
        0
    } else {
        u32::MAX << (32 - cfg.v4_prefix)
    };
    let mut req = ifreq(IFACE);
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    ioctl(&v4, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(cfg.gateway_v4);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(
        &v4,
        libc::SIOCADDRT,
        &mut rt,
        "adding the IPv4 default route",
    )?;

    let v6 = socket(libc::AF_INET6)?;
    let mut req = ifreq(IFACE);
    ioctl(&v6, libc::SIOCGIFINDEX, &mut req, "SIOCGIFINDEX")?;
    // SAFETY: ifru_ifindex is the union member SIOCGIFINDEX filled in.
    let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
    let mut a = In6Ifreq {
        addr: in6(cfg.v6),
        prefixlen: cfg.v6_prefix.into(),
        ifindex,
    };
    ioctl(&v6, libc::SIOCSIFADDR, &mut a, "adding the IPv6 address")?;
    let mut rt = In6Rtmsg {
        dst: in6(Ipv6Addr::UNSPECIFIED),
        src: in6(Ipv6Addr::UNSPECIFIED),
        gateway: in6(cfg.gateway_v6),
        type_: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
        ifindex,
    };
    ioctl(
        &v6,
        libc::SIOCADDRT,
        &mut rt,
        "adding the IPv6 default route",
    )?;
    resolver(cfg)
}

/// /etc/resolv.conf names the gateway. Written under /run (a tmpfs msb-init mounts) and bound
/// over /etc/resolv.conf, so a read-write root from the host is not changed for it.
fn resolver(cfg: &NetConfig) -> io::Result<()> {
    let text = format!(
        "# written by msb-init: the gateway resolves and filters\nnameserver {}\nnameserver {}\n",
        cfg.gateway_v4, cfg.gateway_v6
    );
    std::fs::write("/run/resolv.conf", text)?;
    let target = std::path::Path::new("/etc/resolv.conf");
    if std::fs::symlink_metadata(target).is_err() {
        let _ = std::fs::create_dir_all("/etc");
        std::fs::write(target, b"")?;
    }
    let (src, dst) = (c"/run/resolv.conf", c"/etc/resolv.conf");
    // SAFETY: NUL-terminated paths; a bind mount takes no fstype or data.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
