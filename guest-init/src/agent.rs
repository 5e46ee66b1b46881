//! The agent protocol: what the host and msb-init's agent say to each other over one stream
//! (vsock in a guest, a Unix socket when the agent runs as a host process in tests).
//!
//! Every message is a [`crate::frame`]: `[len: u32 LE][postcard(message)]`. On connect the
//! agent sends [`AgentMessage::Hello`]; the host checks the version and then sends requests,
//! each with an id it chooses (unique per connection), so many requests share one stream. Each
//! request gets responses with its id, the last of which is *final* ([`Response::is_final`]).
//!
//! Flow control, both directions, per request: a sender has at most [`WINDOW`] bytes of
//! payload (output, stdin, file data) in flight; the receiver returns credit with `Ack` once it
//! has consumed them (written them to the pipe, file or reader). A slow reader therefore
//! throttles the writer without any side buffering without bound, and without blocking the
//! other requests on the stream.

use serde::{Deserialize, Serialize};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited normally with this code (0..=255).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention for a process exit code: the code itself, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c & 0xff,
            ExitStatus::Signal(s) => 128 + (s & 0x7f),
        }
    }

    /// Exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

/// vsock port the agent listens on in the guest.
pub const AGENT_PORT: u32 = 1024;

/// Payload bytes a sender may have unacknowledged per request, each direction.
pub const WINDOW: u32 = 1 << 20;

/// Largest payload (output, stdin, file data) carried by one message.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Host → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Start request `id`.
    Request { id: u64, request: Request },
    /// Bytes for exec `id`'s standard input (counts against the window).
    Stdin {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close exec `id`'s standard input.
    CloseStdin { id: u64 },
    /// Send a signal to exec `id`'s process group.
    Signal { id: u64, signal: i32 },
    /// Resize exec `id`'s terminal.
    Resize { id: u64, size: TermSize },
    /// Data for file write `id`; `last` ends the file (counts against the window).
    FileData {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    /// The host consumed this many payload bytes of request `id`'s responses.
    Ack { id: u64, bytes: u32 },
    /// The host gave up on request `id`'s input: a file write is discarded (the target left
    /// as it was), an exec's standard input closed.
    Abort { id: u64 },
}

/// What the host asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness; answered by [`Response::Pong`].
    Ping,
    /// Run a process.
    Exec(ExecRequest),
    /// Create or truncate a file and fill it from the following `FileData` messages.
    WriteFile {
        path: Vec<u8>,
        mode: u32,
        create_parents: bool,
    },
    /// Stream a file's contents back as [`Response::FileData`].
    ReadFile { path: Vec<u8> },
    /// File metadata (not following a final symlink).
    Stat { path: Vec<u8> },
    /// Directory entries, in one or more [`Response::DirEntries`].
    ListDir { path: Vec<u8> },
    /// Remove a file, a symlink, an empty directory, or with `recursive` a whole tree.
    Remove { path: Vec<u8>, recursive: bool },
    /// Flush file systems and power off (the agent answers `Done` first).
    Shutdown,
    /// Sandbox-wide settings for every later exec (answered by `Done`).
    Configure(Configure),
    /// The guest's own figures for `msb-vmm stats` (answered by `Stats`).
    Stats,
    /// The guest was restored from a snapshot (answered by `Done`): it woke with the wall
    /// clock of the moment it was saved, and with the same random-number state as every other
    /// restore of that snapshot. Set the clock (nanoseconds since the Unix epoch) and mix
    /// `seed` (fresh host randomness, at most [`MAX_SEED`] bytes) into the kernel's pool with
    /// an immediate reseed.
    Restored { unix_nanos: u64, seed: Vec<u8> },
}

/// What only the guest knows about itself: its memory in use and the agent's exec counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// `MemTotal` and `MemAvailable` of `/proc/meminfo`, KiB.
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// Processes the agent started since boot, and how many of them still run.
    pub execs_started: u64,
    pub execs_running: u64,
    /// Processes in the guest (entries of `/proc` that are pids).
    pub processes: u64,
}

/// The most seed bytes [`Request::Restored`] carries.
pub const MAX_SEED: usize = 512;

/// Sandbox-wide settings the host gives the agent once, before the first exec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configure {
    /// Added to every later exec's environment (an exec's own variables win): secret
    /// placeholders, for one.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// A CA certificate (PEM) the guest's TLS clients must trust (TLS interception): written
    /// to [`CA_FILE`] and appended to the root's bundle [`CA_BUNDLE`] when
    /// `append_to_bundle` (a root whose changes vanish with the sandbox), else combined with
    /// that bundle into [`RUN_CA_BUNDLE`]; `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
    /// `CURL_CA_BUNDLE` and `NODE_EXTRA_CA_CERTS` then name them in every exec's environment.
    pub ca_pem: Option<Vec<u8>>,
    pub append_to_bundle: bool,
    /// Limits every later exec's processes share, as a whole (a cgroup v2 group of their
    /// own): a fork bomb or a leak stops at them, and the agent keeps answering.
    pub limits: GuestLimits,
}

/// See [`Configure::limits`]; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLimits {
    /// `pids.max`: processes and threads at once.
    pub pids_max: Option<u64>,
    /// `memory.max` in bytes (swap is off in the guest): past it the guest's OOM killer
    /// picks a process of the group.
    pub memory_max: Option<u64>,
}

impl GuestLimits {
    pub fn is_set(&self) -> bool {
        self.pids_max.is_some() || self.memory_max.is_some()
    }
}

/// The sandbox CA's own file in the guest.
pub const CA_FILE: &str = "/etc/ssl/certs/msb-vmm-ca.pem";
/// Debian's bundle of trusted CAs (OpenSSL's default file there).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The combined bundle when the root's own is left alone (a root that persists).
pub const RUN_CA_BUNDLE: &str = "/run/msb-vmm/ca-certificates.crt";
/// The sandbox CA's file then.
pub const RUN_CA_FILE: &str = "/run/msb-vmm/ca.pem";

/// A process to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<Vec<u8>>,
    /// Environment, complete; the agent adds `PATH`, `HOME` (and `TERM` with a PTY) if absent.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory; the user's home, else `/`, when absent.
    pub workdir: Option<Vec<u8>>,
    /// Run as this user instead of root.
    pub user: Option<User>,
    /// Resource limits to set (soft, hard); RLIMIT_NOFILE defaults to [`DEFAULT_NOFILE`].
    pub rlimits: Vec<Rlimit>,
    /// Pipe standard input from the host; closed (`/dev/null`) otherwise.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are the terminal, and
    /// all output arrives as `Stdout`.
    pub pty: Option<TermSize>,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run chrooted into this guest directory (a container's root in a pod sandbox): the
    /// working directory, `PATH` lookup and the user's home are inside it. As PID 1 the agent
    /// first mounts `/proc`, `/dev` and `/sys` there (where the directories exist).
    pub root: Option<Vec<u8>>,
}

/// Default RLIMIT_NOFILE (soft and hard) for executed processes: data-science and build tools
/// open many files.
pub const DEFAULT_NOFILE: u64 = 1 << 20;

/// A user to run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum User {
    /// Numeric ids; supplementary groups are cleared.
    Id { uid: u32, gid: u32 },
    /// A name (or number) from the guest's /etc/passwd; groups from /etc/group.
    Name(String),
}

/// A resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: RlimitResource,
    pub soft: u64,
    pub hard: u64,
}

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RlimitResource {
    Nofile,
    Nproc,
    As,
    Core,
    Cpu,
    Fsize,
    Stack,
    Memlock,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// Agent → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message on every connection.
    Hello { version: u32 },
    /// A response to request `id`.
    Response { id: u64, response: Response },
}

/// Responses; [`Response::is_final`] ones end their request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Ping` (final).
    Pong,
    /// The process started.
    Started { pid: u32 },
    /// Standard output (or terminal output) bytes; counts against the window.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Standard error bytes; counts against the window.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The agent consumed this many bytes the host sent for this request (stdin, file data).
    Ack(u32),
    /// The process ended (final). `timed_out` when the agent killed it for its timeout;
    /// `oom_killed` when it died of SIGKILL (or 137) while the guest's OOM killer killed.
    Exited {
        status: ExitStatus,
        timed_out: bool,
        oom_killed: bool,
    },
    /// File contents; counts against the window. The last chunk is followed by `Done`.
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Metadata (final).
    Stat(FileStat),
    /// Some directory entries; more may follow, then `Done`.
    DirEntries(Vec<DirEntry>),
    /// The request succeeded (final).
    Done,
    /// The request failed (final).
    Error(AgentError),
    /// Answer to `Stats` (final).
    Stats(GuestStats),
}

/// Which payload response [`payload_message`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Stdout,
    Stderr,
    FileData,
}

/// `AgentMessage::Response { id, response: Response::Stdout(data) }` (or `Stderr`,
/// `FileData`) borrowing `data`: the agent sends output straight from its read buffer instead
/// of copying each chunk into an owned message. Serializes to the same bytes (tested).
pub fn payload_message(id: u64, kind: Payload, data: &[u8]) -> impl Serialize + '_ {
    let response = match kind {
        Payload::Stdout => ResponseRef::Stdout(data),
        Payload::Stderr => ResponseRef::Stderr(data),
        Payload::FileData => ResponseRef::FileData(data),
    };
    AgentMessageRef::Response { id, response }
}

/// The longest [`payload_header`]: the length prefix, the two variant indices and the
/// varints of the id and the payload's length.
pub const PAYLOAD_HEADER_MAX: usize = 4 + 1 + 10 + 1 + 5;

/// The first bytes of the frame of [`payload_message`]`(id, kind, data)` for a `data` of
/// `len` bytes: the frame's length prefix and the message's encoding up to the payload
/// itself, which follows unchanged. With it the agent writes output straight from its read
/// buffer (one writev of header and data). Returns the buffer and how much of it is used.
pub fn payload_header(
    id: u64,
    kind: Payload,
    len: usize,
) -> Result<([u8; PAYLOAD_HEADER_MAX], usize), crate::frame::FrameError> {
    let mut out = [0u8; PAYLOAD_HEADER_MAX];
    // The message with an empty payload ends in that payload's length, a varint 0.
    let empty = postcard::to_slice(&payload_message(id, kind, &[]), &mut out[4..])
        .map_err(|e| crate::frame::FrameError::Malformed(e.to_string()))?
        .len();
    let mut at = 4 + empty - 1;
    let mut v = len;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[at] = byte;
            at += 1;
            break;
        }
        out[at] = byte | 0x80;
        at += 1;
    }
    let body = at - 4 + len;
    if body > crate::frame::MAX_FRAME_LEN {
        return Err(crate::frame::FrameError::TooLarge(body));
    }
    out[..4].copy_from_slice(&(body as u32).to_le_bytes());
    Ok((out, at))
}

/// Mirrors of [`AgentMessage`] and [`Response`] up to `FileData`. Postcard encodes a variant by
/// its position, so the placeholders keep the positions; their shapes do not matter.
#[derive(Serialize)]
enum AgentMessageRef<'a> {
    #[allow(dead_code)]
    Hello,
    Response {
        id: u64,
        response: ResponseRef<'a>,
    },
}

#[derive(Serialize)]
enum ResponseRef<'a> {
    #[allow(dead_code)]
    Pong,
    #[allow(dead_code)]
    Started,
    Stdout(#[serde(with = "serde_bytes")] &'a [u8]),
    Stderr(#[serde(with = "serde_bytes")] &'a [u8]),
    #[allow(dead_code)]
    Ack,
    #[allow(dead_code)]
    Exited,
    FileData(#[serde(with = "serde_bytes")] &'a [u8]),
}

impl Response {
    /// Whether this response ends its request.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Response::Pong
                | Response::Exited { .. }
                | Response::Stat(_)
                | Response::Stats(_)
                | Response::Done
                | Response::Error(_)
        )
    }

    /// Payload bytes this response carries against the window.
    pub fn payload_len(&self) -> usize {
        match self {
            Response::Stdout(d) | Response::Stderr(d) | Response::FileData(d) => d.len(),
            _ => 0,
        }
    }
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    pub kind: ErrorKind,
    /// For the user, one line.
    pub message: String,
}

/// Failure classes a program can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    InvalidRequest,
    Io,
    /// Exec: the program could not be started (`argv[0]` not found is `NotFound`).
    Spawn,
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AgentError {}

/// What kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// Metadata of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub stat: FileStat,
}

/// Directory entries per `DirEntries` message (keeps frames far below the size cap even with
/// 255-byte names).
pub const DIR_ENTRIES_PER_MESSAGE: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode, FrameReader, MAX_FRAME_LEN};

    #[test]
    fn payload_headers_are_the_encodings_first_bytes() {
        for id in [0, 1, 127, 128, 0x1234_5678_9abc, u64::MAX] {
            for len in [0usize, 1, 127, 128, 16_383, 16_384, MAX_CHUNK] {
                let data = vec![0x5a; len];
                for kind in [Payload::Stdout, Payload::Stderr, Payload::FileData] {
                    let frame = crate::frame::encode(&payload_message(id, kind, &data)).unwrap();
                    let (head, n) = payload_header(id, kind, len).unwrap();
                    assert_eq!(
                        &head[..n],
                        &frame[..frame.len() - len],
                        "{id} {len} {kind:?}"
                    );
                }
            }
        }
        assert!(payload_header(1, Payload::Stdout, crate::frame::MAX_FRAME_LEN).is_err());
    }

    #[test]
    fn payload_messages_encode_like_the_owned_ones() {
        let data: Vec<u8> = (0..=255).collect();
        for (kind, owned) in [
            (Payload::Stdout, Response::Stdout(data.clone())),
            (Payload::Stderr, Response::Stderr(data.clone())),
            (Payload::FileData, Response::FileData(data.clone())),
        ] {
            let id = 0x1234_5678_9abc;
            let a = postcard::to_stdvec(&payload_message(id, kind, &data)).unwrap();
            let b = postcard::to_stdvec(&AgentMessage::Response {
                id,
                response: owned.clone(),
            })
            .unwrap();
            assert_eq!(a, b, "{kind:?}");
        }
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            HostMessage::Request {
                id: 1,
                request: Request::Exec(ExecRequest {
                    argv: vec![b"sh".to_vec()],
                    pty: Some(TermSize { rows: 24, cols: 80 }),
                    user: Some(User::Name("nobody".into())),
                    rlimits: vec![Rlimit {
                        resource: RlimitResource::Nofile,
                        soft: 10,
                        hard: 20,
                    }],
                    ..Default::default()
                }),
            },
            HostMessage::Stdin {
                id: 1,
                data: vec![0; MAX_CHUNK],
            },
            HostMessage::Ack {
                id: u64::MAX,
                bytes: WINDOW,
            },
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut r = FrameReader::new(&stream[..], 4096);
        for m in &msgs {
            assert_eq!(r.read_frame::<HostMessage>().unwrap().as_ref(), Some(m));
        }
        assert_eq!(r.read_frame::<HostMessage>().unwrap(), None);
    }

    #[test]
    fn largest_messages_fit_a_frame() {
        let out = AgentMessage::Response {
            id: u64::MAX,
            response: Response::Stdout(vec![0xff; MAX_CHUNK]),
        };
        assert!(encode(&out).unwrap().len() < MAX_FRAME_LEN);
        let stat = FileStat {
            kind: FileKind::File,
            mode: 0o7777,
            size: u64::MAX,
            uid: u32::MAX,
            gid: u32::MAX,
            mtime: i64::MIN,
        };
        let entries = vec![
            DirEntry {
                name: vec![b'x'; 255],
                stat
            };
            DIR_ENTRIES_PER_MESSAGE
        ];
        let dir = AgentMessage::Response {
            id: 1,
            response: Response::DirEntries(entries),
        };
        assert!(encode(&dir).unwrap().len() < MAX_FRAME_LEN);
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Code(256 + 3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert!(ExitStatus::Code(0).success() && !ExitStatus::Signal(1).success());
    }

    #[test]
    fn final_responses() {
        assert!(Response::Done.is_final());
        assert!(Response::Exited {
            status: ExitStatus::Code(0),
            timed_out: false,
            oom_killed: false,
        }
        .is_final());
        assert!(!Response::Stdout(vec![]).is_final());
        assert!(!Response::Started { pid: 1 }.is_final());
        assert_eq!(Response::FileData(vec![1, 2]).payload_len(), 2);
    }
}
