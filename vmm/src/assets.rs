//! Where the default guest assets live: the kernel built by `kernel-config/build.sh`, msb-init
//! and busybox copied by `./x setup`, all under one cache directory outside the work tree.

use std::path::{Path, PathBuf};

/// The cache directory: `$MSB_CACHE_DIR`, else `$XDG_CACHE_HOME/msb-vmm`, else `~/.cache/msb-vmm`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MSB_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("msb-vmm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("msb-vmm")
}

/// The cache entry `name` for this build's guest architecture: the name itself on x86_64 (as
/// caches made before arm64 guests existed have it), `name-ARCH` elsewhere, so hosts that
/// prepare guests for both architectures (an arm64 L2 VM sharing this host's cache) keep both.
pub fn arch_entry(name: &str) -> String {
    match std::env::consts::ARCH {
        "x86_64" => name.to_string(),
        arch => format!("{name}-{arch}"),
    }
}

fn env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The default guest kernel (`$MSB_KERNEL` overrides): what `kernel-config/build.sh` links,
/// `vmlinux-x86_64` (ELF) or `Image-aarch64` (arm64 boot image).
pub fn default_kernel() -> PathBuf {
    let file = match std::env::consts::ARCH {
        "aarch64" => "Image-aarch64".to_string(),
        arch => format!("vmlinux-{arch}"),
    };
    env_or("MSB_KERNEL", cache_dir().join(file))
}

/// The static msb-init binary (`$MSB_INIT` overrides).
pub fn msb_init() -> PathBuf {
    env_or("MSB_INIT", cache_dir().join(arch_entry("msb-init")))
}

/// The static busybox for the initramfs root (`$MSB_BUSYBOX` overrides; Debian's
/// busybox-static at /bin/busybox when setup has not copied one).
pub fn busybox() -> PathBuf {
    if let Some(p) = std::env::var_os("MSB_BUSYBOX") {
        return PathBuf::from(p);
    }
    let cached = cache_dir().join(arch_entry("busybox"));
    if cached.exists() {
        cached
    } else {
        PathBuf::from("/bin/busybox")
    }
}

/// The root file system a sandbox gets when none is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultRoot {
    /// The initramfs's busybox root (`MSB_ROOTFS=initramfs`).
    Initramfs,
    /// A host directory shared copy-on-write (see `SandboxBuilder::rootfs_overlay`).
    Dir(PathBuf),
}

/// The word that selects the initramfs root in `--rootfs` and `$MSB_ROOTFS`.
pub const INITRAMFS_ROOT: &str = "initramfs";

/// The default root: `$MSB_ROOTFS` (a directory, or `initramfs`), else the Debian minbase
/// tree that `rootfs/build.sh` (run by `./x setup`) caches at `<cache>/rootfs-debian` (with
/// `-aarch64` for arm64 guests).
pub fn default_root() -> DefaultRoot {
    match std::env::var_os("MSB_ROOTFS") {
        Some(v) if v == INITRAMFS_ROOT => DefaultRoot::Initramfs,
        Some(v) => DefaultRoot::Dir(PathBuf::from(v)),
        None => DefaultRoot::Dir(setup_root()),
    }
}

/// Where `./x setup` puts the Debian minbase tree.
fn setup_root() -> PathBuf {
    cache_dir().join(arch_entry("rootfs-debian"))
}

/// Whether `dir` is the tree `./x setup` built (at the path [`default_root`] falls back to):
/// that tree is replaced whole, never changed in place, so it may be served as immutable.
pub fn is_setup_root(dir: &Path) -> bool {
    match (
        std::fs::canonicalize(dir),
        std::fs::canonicalize(setup_root()),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Where the installation's sandbox CA lives (see `msb_netstack::ca`): `$MSB_CA_DIR`, else
/// `msb-vmm-ca` beside the default state directory (`$XDG_STATE_HOME`, else
/// `~/.local/state`). Not under `$XDG_RUNTIME_DIR`: the CA is long-lived and guests may have
/// been given it.
pub fn ca_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MSB_CA_DIR") {
        return PathBuf::from(d);
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join(".local/state")
        });
    state.join("msb-vmm-ca")
}
