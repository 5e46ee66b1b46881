//! Our FUSE server: the wire format ([`abi`]), the passthrough backend that serves a host
//! directory ([`passthrough`]), and the host `/dev/fuse` transport ([`devfuse`]) that lets the
//! host kernel's own FUSE client mount the very same server for tests and benches. The
//! virtio-fs device feeds the same [`passthrough::PassthroughFs::handle`] from its queue.
//!
//! Guest-visible ownership, mode, and special-file type live in the extended attribute
//! [`passthrough::OVERRIDE_XATTR`] (`user.msb.stat`), so an unprivileged host user can serve a
//! root-owned tree with device nodes and setuid files while the host files keep that user's
//! own permissions. Its value is ASCII `UID:GID:MODE[:RDEV]`, MODE in octal including the
//! file-type bits (`0:0:0104755` is a setuid root executable, `0:0:020666:259` the char device
//! 1:3 (rdev encoded as the kernel's new_encode_dev)).

pub mod abi;
#[cfg(target_os = "linux")]
pub mod devfuse;
#[cfg(target_os = "linux")]
pub mod devfuse_uring;
#[cfg(target_os = "linux")]
pub mod passthrough;
pub mod rate;
