//! The msb-vmm host↔guest wire protocol, shared by `msb-init` (the guest's PID 1) and the VMM.
//!
//! One definition used by both sides, so they cannot drift apart. Everything here is plain,
//! portable logic: the host decodes every byte the guest sends with it, so it is written for
//! hostile input (size caps, no panics) and fuzzed (`fuzz/`).
//!
//! - [`frame`]: `[len: u32 LE][postcard(message)]` framing with a size cap.
//! - [`agent`]: the agent protocol's messages (requests with ids, responses, flow control).
//! - [`client`]: the host side of that protocol over any stream.
#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod frame;

/// Version of the agent protocol. The agent announces it first; the host refuses any other.
pub const PROTOCOL_VERSION: u32 = 5;

/// Guest physical address of the boot-timer device on x86_64 guests (Firecracker-compatible).
pub const BOOT_TIMER_ADDR_X86_64: u64 = 0xC000_0000;
/// Guest physical address of the boot-timer device on aarch64 guests (below RAM, which starts
/// at 1 GiB). The VMM's tests check both against its `arch` layouts.
pub const BOOT_TIMER_ADDR_AARCH64: u64 = 0x0a00_0000;
/// The boot-timer address for the architecture msb-init is built for.
#[cfg(target_arch = "x86_64")]
pub const BOOT_TIMER_ADDR: u64 = BOOT_TIMER_ADDR_X86_64;
#[cfg(not(target_arch = "x86_64"))]
pub const BOOT_TIMER_ADDR: u64 = BOOT_TIMER_ADDR_AARCH64;

/// The byte written to the boot timer to say "boot complete".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Kernel command-line flags msb-init understands.
pub mod cmdline {
    /// `msb.hostname=NAME`: the guest's hostname (default `msb`).
    pub const HOSTNAME: &str = "msb.hostname=";
    /// `msb.debug`: print msb-init's set-up time on the console.
    pub const DEBUG: &str = "msb.debug";
    /// `msb.shell`: also run a shell on the console (debugging with `msb-vmm boot --console`).
    pub const SHELL: &str = "msb.shell";
    /// `msb.exit_after_boot`: power off right after signalling boot (boot-time benchmarks of
    /// VMMs that cannot talk to the agent).
    pub const EXIT_AFTER_BOOT: &str = "msb.exit_after_boot";

    /// `msb.net=IP4/LEN,GW4,IP6/LEN,GW6`: configure the virtio-net card (`eth0`) with these
    /// addresses and default routes, and the gateway as the resolver.
    pub const NET: &str = "msb.net=";

    /// The guest's network, as `msb.net=` carries it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NetConfig {
        pub v4: std::net::Ipv4Addr,
        pub v4_prefix: u8,
        pub gateway_v4: std::net::Ipv4Addr,
        pub v6: std::net::Ipv6Addr,
        pub v6_prefix: u8,
        pub gateway_v6: std::net::Ipv6Addr,
    }

    impl NetConfig {
        /// The `msb.net=` word.
        pub fn encode(&self) -> String {
            format!(
                "{NET}{}/{},{},{}/{},{}",
                self.v4, self.v4_prefix, self.gateway_v4, self.v6, self.v6_prefix, self.gateway_v6
            )
        }

        /// Parses the value after `msb.net=`.
        pub fn parse(v: &str) -> Option<NetConfig> {
            let parts: Vec<&str> = v.split(',').collect();
            let [a4, g4, a6, g6] = parts.as_slice() else {
                return None;
            };
            let (v4, p4) = a4.split_once('/')?;
            let (v6, p6) = a6.split_once('/')?;
            let cfg = NetConfig {
                v4: v4.parse().ok()?,
                v4_prefix: p4.parse().ok()?,
                gateway_v4: g4.parse().ok()?,
                v6: v6.parse().ok()?,
                v6_prefix: p6.parse().ok()?,
                gateway_v6: g6.parse().ok()?,
            };
            (cfg.v4_prefix <= 32 && cfg.v6_prefix <= 128).then_some(cfg)
        }
    }

    /// `msb.mount=SPEC`, repeatable: a file system msb-init mounts before signalling boot
    /// (see [`MountSpec`]).
    pub const MOUNT: &str = "msb.mount=";

    /// A mount msb-init makes. Paths are hex on the command line so any bytes survive it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum MountSpec {
        /// `virtiofs:TAG:HEXPATH:ro|rw|overlay`: a shared host directory.
        Virtiofs {
            tag: String,
            path: Vec<u8>,
            access: Access,
        },
        /// `tmpfs:SIZE:HEXPATH`: a tmpfs of at most SIZE bytes (0: the kernel's default).
        Tmpfs { size: u64, path: Vec<u8> },
    }

    /// How the guest may change a shared directory.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Access {
        /// Writes reach the host directory.
        ReadWrite,
        /// No writes (the device refuses them too).
        ReadOnly,
        /// The share is mounted read-only under an overlay whose upper layer is a guest tmpfs:
        /// the guest may change anything, the host directory never changes, and the changes
        /// vanish with the sandbox. The default root file system is shared this way, so many
        /// sandboxes can use one cached tree.
        Overlay,
    }

    impl Access {
        fn word(self) -> &'static str {
            match self {
                Access::ReadWrite => "rw",
                Access::ReadOnly => "ro",
                Access::Overlay => "overlay",
            }
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Option<Vec<u8>> {
        if s.len() % 2 != 0 {
            return None;
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    }

    /// A tag as the VMM generates them: 1-36 of a-z, 0-9, `-`, `_`.
    pub fn valid_tag(tag: &str) -> bool {
        !tag.is_empty()
            && tag.len() <= 36
            && tag
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
    }

    impl MountSpec {
        /// The `msb.mount=` word for this mount.
        pub fn encode(&self) -> String {
            match self {
                MountSpec::Virtiofs { tag, path, access } => {
                    format!("{MOUNT}virtiofs:{tag}:{}:{}", hex(path), access.word())
                }
                MountSpec::Tmpfs { size, path } => format!("{MOUNT}tmpfs:{size}:{}", hex(path)),
            }
        }

        /// Parses the value after `msb.mount=`. Paths must be absolute, without NUL.
        pub fn parse(v: &str) -> Option<MountSpec> {
            let parts: Vec<&str> = v.split(':').collect();
            let spec = match parts.as_slice() {
                ["virtiofs", tag, path, mode] if valid_tag(tag) => MountSpec::Virtiofs {
                    tag: tag.to_string(),
                    path: unhex(path)?,
                    access: match *mode {
                        "ro" => Access::ReadOnly,
                        "rw" => Access::ReadWrite,
                        "overlay" => Access::Overlay,
                        _ => return None,
                    },
                },
                ["tmpfs", size, path] => MountSpec::Tmpfs {
                    size: size.parse().ok()?,
                    path: unhex(path)?,
                },
                _ => return None,
            };
            let path = match &spec {
                MountSpec::Virtiofs { path, .. } | MountSpec::Tmpfs { path, .. } => path,
            };
            (path.first() == Some(&b'/') && !path.contains(&0)).then_some(spec)
        }

        /// Every `msb.mount=` on `cmdline`, in order; malformed ones are returned as errors.
        pub fn all(cmdline: &str) -> Vec<Result<MountSpec, String>> {
            cmdline
                .split_ascii_whitespace()
                .filter_map(|w| w.strip_prefix(MOUNT))
                .map(|v| MountSpec::parse(v).ok_or_else(|| format!("bad {MOUNT}{v}")))
                .collect()
        }
    }

    /// Whether the whitespace-separated `cmdline` contains `flag`.
    pub fn has(cmdline: &str, flag: &str) -> bool {
        cmdline.split_ascii_whitespace().any(|w| w == flag)
    }

    /// The value of `key` (which ends in `=`), if present.
    pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
        cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key))
    }

    /// Whether `name` is a valid hostname (1-64 of a-z, 0-9, `-`, `.`).
    pub fn valid_hostname(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn mount_specs_round_trip_any_path_bytes() {
            let specs = [
                MountSpec::Virtiofs {
                    tag: "vol0".into(),
                    path: b"/data/with space/\xff\n".to_vec(),
                    access: Access::ReadOnly,
                },
                MountSpec::Virtiofs {
                    tag: "root".into(),
                    path: b"/".to_vec(),
                    access: Access::Overlay,
                },
                MountSpec::Tmpfs {
                    size: 64 << 20,
                    path: b"/scratch".to_vec(),
                },
            ];
            let line = format!(
                "quiet {} {} {} x",
                specs[0].encode(),
                specs[1].encode(),
                specs[2].encode()
            );
            let got: Vec<_> = MountSpec::all(&line)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, specs);
            for bad in [
                "virtiofs:vol0:2f:xx",
                "virtiofs:Bad:2f:ro",
                "virtiofs:vol0:61:ro",
                "tmpfs:x:2f",
                "tmpfs:0:2f00",
                "tmpfs:0:2",
                "nfs:a:b",
            ] {
                assert_eq!(MountSpec::parse(bad), None, "{bad}");
            }
        }

        #[test]
        fn net_configs_round_trip() {
            let c = NetConfig {
                v4: "10.0.2.15".parse().unwrap(),
                v4_prefix: 24,
                gateway_v4: "10.0.2.2".parse().unwrap(),
                v6: "fd00::15".parse().unwrap(),
                v6_prefix: 64,
                gateway_v6: "fd00::2".parse().unwrap(),
            };
            let word = c.encode();
            assert_eq!(word, "msb.net=10.0.2.15/24,10.0.2.2,fd00::15/64,fd00::2");
            assert_eq!(
                value(&format!("quiet {word}"), NET).and_then(NetConfig::parse),
                Some(c)
            );
            for bad in [
                "",
                "10.0.2.15/24,10.0.2.2,fd00::15/64",
                "10.0.2.15/33,a,b/1,c",
                "x/1,y,z/2,w",
            ] {
                assert_eq!(NetConfig::parse(bad), None, "{bad}");
            }
        }

        #[test]
        fn flags_and_values() {
            let c = "console=ttyS0 msb.hostname=box-1 msb.debug quiet";
            assert!(has(c, DEBUG) && !has(c, SHELL));
            assert_eq!(value(c, HOSTNAME), Some("box-1"));
            assert!(
                valid_hostname("box-1.local")
                    && !valid_hostname("Box")
                    && !valid_hostname("")
                    && !valid_hostname(&"a".repeat(65))
            );
        }
    }
}
