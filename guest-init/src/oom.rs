//! Whether the guest's OOM killer ended a command: the kernel log says so.
//!
//! A command killed for want of memory dies of SIGKILL like one killed by anything else; only
//! the kernel log tells them apart. The OOM killer logs `Out of memory: Killed process PID
//! (comm) ...` (`Memory cgroup out of memory: ...` for a group's limit) as it kills. The agent
//! keeps `/dev/kmsg` open at its end and reads what is new at each exec's start and at a killed
//! exec's end: one non-blocking read per exec otherwise, never a thread or a poll.
//!
//! The count is guest-wide, as a cgroup's `memory.events` is for containerd: a command that
//! ends by SIGKILL (or with 137, a shell whose child was killed) while the OOM killer killed a
//! process of the guest is reported OOM-killed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use msb_init::agent::ExitStatus;

/// What the OOM killer writes in each of its kill records.
const KILL_MARK: &[u8] = b": Killed process ";

/// Bytes read per drain at most: a guest flooding its kernel log cannot hold an exec up.
const MAX_DRAIN: usize = 1 << 20;

/// The kernel log, read for OOM kills.
pub struct OomWatch(Mutex<Option<Log>>);

struct Log {
    file: File,
    /// OOM kill records seen since the watch opened.
    kills: u64,
    /// The start of a line a read cut (a plain file; `/dev/kmsg` gives whole records).
    partial: Vec<u8>,
    /// Read buffer, larger than any record (`/dev/kmsg` refuses a read too short for the
    /// next record, and would refuse it forever).
    buf: Vec<u8>,
}

impl OomWatch {
    /// Watches the log at `path` from its current end; a log that cannot be opened is
    /// logged once and means no command is ever reported OOM-killed.
    pub fn open(path: &Path) -> OomWatch {
        let log = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map(|mut file| {
                // Old records are not this agent's to count.
                let _ = file.seek(SeekFrom::End(0));
                Log {
                    file,
                    kills: 0,
                    partial: Vec::new(),
                    buf: vec![0; 16 * 1024],
                }
            });
        match log {
            Ok(l) => OomWatch(Mutex::new(Some(l))),
            Err(e) => {
                eprintln!(
                    "msb-init: {}: {e}: commands killed by the OOM killer are reported as killed",
                    path.display()
                );
                OomWatch::disabled()
            }
        }
    }

    /// A watch that sees nothing (an agent running on a host, without a log of its own).
    pub fn disabled() -> OomWatch {
        OomWatch(Mutex::new(None))
    }

    /// OOM kills logged since the watch opened, reading what is new first.
    pub fn kills(&self) -> u64 {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = g.as_mut() else { return 0 };
        let mut drained = 0;
        while drained < MAX_DRAIN {
            match log.file.read(&mut log.buf) {
                // The end of a plain file (the tests' log); `/dev/kmsg` says WouldBlock.
                Ok(0) => break,
                Ok(n) => {
                    drained += n;
                    take(&mut log.kills, &mut log.partial, &log.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Records were overwritten before they were read; the next read goes on from
                // the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                // WouldBlock: nothing new. Anything else: nothing to count either.
                Err(_) => break,
            }
        }
        log.kills
    }
}

/// Counts into `kills` the kill records among the whole lines of `partial` + `data`, keeping
/// a cut line in `partial` for later.
fn take(kills: &mut u64, partial: &mut Vec<u8>, data: &[u8]) {
    partial.extend_from_slice(data);
    let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
        // No whole line yet; a line longer than any record is dropped.
        if partial.len() > 64 * 1024 {
            partial.clear();
        }
        return;
    };
    *kills += count_kills(&partial[..end]);
    partial.drain(..=end);
}

/// Kill records among `lines`.
fn count_kills(lines: &[u8]) -> u64 {
    lines
        .split(|&b| b == b'\n')
        .filter(|l| l.windows(KILL_MARK.len()).any(|w| w == KILL_MARK))
        .count() as u64
}

/// Whether a command that ended with `status` died as OOM victims do (SIGKILL, or 137 from a
/// shell whose child was killed); the OOM killer did it if it killed during the command's life.
/// A timeout's kill is the agent's own.
pub fn killed_as_victim(status: ExitStatus, timed_out: bool) -> bool {
    !timed_out
        && matches!(
            status,
            ExitStatus::Signal(libc::SIGKILL) | ExitStatus::Code(137)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_kill_records_of_both_kinds() {
        let log = b"3,512,1000,-;Out of memory: Killed process 42 (python3) total-vm:1kB\n\
                    6,513,1001,-;oom_reaper: reaped process 42 (python3)\n\
                    3,514,1002,-;Memory cgroup out of memory: Killed process 43 (sh)\n \
                    SUBSYSTEM=memory\n";
        assert_eq!(count_kills(log), 2);
        assert_eq!(count_kills(b"6,1,1,-;eth0: link up\n"), 0);
    }

    #[test]
    fn a_record_cut_across_reads_counts_once() {
        let (mut kills, mut partial) = (0, Vec::new());
        take(&mut kills, &mut partial, b"3,1,1,-;Out of memory: Kill");
        assert_eq!(kills, 0);
        take(
            &mut kills,
            &mut partial,
            b"ed process 7 (x)\n3,2,2,-;other\n",
        );
        assert_eq!(kills, 1);
        assert!(partial.is_empty());
    }

    #[test]
    fn reads_what_was_appended_since_it_opened() {
        let path = std::env::temp_dir().join(format!("msb-oom-file-{}", std::process::id()));
        std::fs::write(&path, b"3,1,1,-;Out of memory: Killed process 1 (old)\n").unwrap();
        let w = OomWatch::open(&path);
        assert_eq!(
            w.kills(),
            0,
            "records from before the watch are not counted"
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"3,2,2,-;Out of memory: Killed process 2 (new)\n")
            .unwrap();
        assert_eq!(w.kills(), 1);
        assert_eq!(w.kills(), 1, "a record counts once");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(OomWatch::disabled().kills(), 0);
    }

    #[test]
    fn only_a_kill_can_be_an_oom_kill() {
        assert!(killed_as_victim(ExitStatus::Signal(9), false));
        assert!(killed_as_victim(ExitStatus::Code(137), false));
        assert!(
            !killed_as_victim(ExitStatus::Signal(9), true),
            "the timeout's kill"
        );
        assert!(!killed_as_victim(ExitStatus::Code(1), false));
        assert!(!killed_as_victim(ExitStatus::Signal(15), false));
    }
}
