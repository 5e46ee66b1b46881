//! Run one command in a fresh microVM: the default kernel, an initramfs with msb-init and a
//! busybox root, the command passed on the kernel command line, its output and exit status
//! coming back over msb-init's control port (the second UART).
//!
//! ```no_run
//! use msb_vmm::sandbox::Sandbox;
//! let out = Sandbox::command(["sh", "-c", "nproc"]).cpus(2).output()?;
//! assert_eq!(out.stdout, b"2\n");
//! # Ok::<(), msb_vmm::sandbox::SandboxError>(())
//! ```

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_devices::bus::lock;
pub use msb_init::control::ExitStatus;
use msb_init::control::{ControlError, ControlEvent, ControlReceiver};
use msb_init::spec::{RunSpec, SpecError};
use msb_init::PROTOCOL_VERSION;
use thiserror::Error;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::hypervisor::HypervisorError;
use crate::initramfs::{self, InitramfsError};
use crate::vm::{
    Console, GuestExit, Initrd, StopHandle, VmBuilder, VmError, VmOutcome, DEFAULT_CMDLINE,
};

/// Errors running a sandboxed command. Guest failures carry the console's last lines.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("invalid command: {0}")]
    Spec(#[from] SpecError),
    #[error("the command, arguments and environment take {0} bytes on the kernel command line; the limit is about {limit}", limit = CMDLINE_MAX_SIZE - DEFAULT_CMDLINE.len() - 16)]
    SpecTooLong(usize),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("timed out after {} s", .after.as_secs_f64())]
    Timeout {
        after: Duration,
        console_tail: Vec<String>,
    },
    #[error("the guest kernel panicked")]
    KernelPanic { console_tail: Vec<String> },
    #[error("guest protocol version {guest} does not match this msb-vmm's version {host}: rebuild msb-init (`./x setup`)")]
    Version { guest: u32, host: u32 },
    #[error("the guest stopped without reporting an exit status ({exit})")]
    NoExitStatus {
        exit: GuestExit,
        console_tail: Vec<String>,
    },
}

impl SandboxError {
    /// The guest console's last lines, for errors where the guest failed.
    pub fn console_tail(&self) -> &[String] {
        match self {
            SandboxError::Timeout { console_tail, .. }
            | SandboxError::KernelPanic { console_tail }
            | SandboxError::NoExitStatus { console_tail, .. } => console_tail,
            _ => &[],
        }
    }
}

/// Entry point of the sandbox API.
#[derive(Debug)]
pub struct Sandbox;

impl Sandbox {
    /// A command to run in a new sandbox: `argv[0]` is looked up in the guest's `PATH`.
    pub fn command<I, S>(argv: I) -> SandboxCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        SandboxCommand {
            spec: RunSpec::new(
                argv.into_iter()
                    .map(|a| a.as_ref().as_bytes().to_vec())
                    .collect(),
            ),
            cpus: 1,
            memory_mib: 128,
            timeout: None,
            console: false,
            kernel: None,
            start: crate::process_start(),
            defer_teardown: false,
        }
    }
}

/// A command and the sandbox it runs in.
#[derive(Debug, Clone)]
pub struct SandboxCommand {
    spec: RunSpec,
    cpus: u32,
    memory_mib: u64,
    timeout: Option<Duration>,
    console: bool,
    kernel: Option<PathBuf>,
    start: Instant,
    defer_teardown: bool,
}

/// How a sandboxed command ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The command's exit status.
    pub status: ExitStatus,
    /// Messages msb-init reported (for example "foo: command not found").
    pub guest_errors: Vec<String>,
    /// Boot-timer time since VMM start.
    pub boot_time: Option<Duration>,
    /// The VM's own outcome.
    pub vm: VmOutcome,
}

/// Captured output of a sandboxed command.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub guest_errors: Vec<String>,
    pub boot_time: Option<Duration>,
}

impl SandboxCommand {
    /// Adds an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.spec.env.push((
            key.as_ref().as_bytes().to_vec(),
            value.as_ref().as_bytes().to_vec(),
        ));
        self
    }

    /// The working directory in the guest.
    pub fn workdir(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.spec.workdir = Some(dir.as_ref().as_bytes().to_vec());
        self
    }

    /// The guest's hostname.
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.spec.hostname = name.into();
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Stop the sandbox after this long ([`SandboxError::Timeout`]).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Show the guest kernel's console on standard error.
    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// Boot this kernel instead of the default one.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// The instant boot times are measured from.
    pub fn start_time(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// See [`VmBuilder::defer_teardown_to_exit`]: for programs that exit right after.
    pub fn defer_teardown_to_exit(mut self, on: bool) -> Self {
        self.defer_teardown = on;
        self
    }

    /// Runs the command with its output on this process's stdout and stderr.
    pub fn status(self) -> Result<RunOutcome, SandboxError> {
        self.run_with(Box::new(io::stdout()), Box::new(io::stderr()))
    }

    /// Runs the command and captures its output.
    pub fn output(self) -> Result<Output, SandboxError> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let r = self.run_with(
            Box::new(SharedBuf(out.clone())),
            Box::new(SharedBuf(err.clone())),
        )?;
        let take = |b: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *lock(b));
        Ok(Output {
            status: r.status,
            stdout: take(&out),
            stderr: take(&err),
            guest_errors: r.guest_errors,
            boot_time: r.boot_time,
        })
    }

    /// Runs the command, writing its stdout and stderr to the given writers as they arrive.
    pub fn run_with(
        self,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
    ) -> Result<RunOutcome, SandboxError> {
        // A sandbox always boots Linux: refuse at once where /dev/kvm cannot run it.
        if crate::host::is_pvm() && std::env::var_os("MSB_ALLOW_PVM").is_none() {
            return Err(VmError::Hypervisor(HypervisorError::Pvm).into());
        }
        self.spec.validate()?;
        let param = self.spec.to_cmdline_param();
        let mut cmdline = DEFAULT_CMDLINE.to_string();
        if !self.console {
            cmdline.push_str(" quiet");
        }
        cmdline.push(' ');
        cmdline.push_str(&param);
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(SandboxError::SpecTooLong(param.len()));
        }
        let cache = crate::assets::cache_dir();
        let image = initramfs::cached_default(
            &cache,
            &crate::assets::msb_init(),
            Some(&crate::assets::busybox()),
        )?;
        let kernel = self
            .kernel
            .clone()
            .unwrap_or_else(crate::assets::default_kernel);
        let mut builder = VmBuilder::new(kernel)
            .initrd(Initrd::Path(image))
            .cmdline(cmdline)
            .cpus(self.cpus)
            .memory_mib(self.memory_mib)
            .timeout(self.timeout)
            .start_time(self.start)
            .defer_teardown_to_exit(self.defer_teardown)
            .console(if self.console {
                Console::Stderr
            } else {
                Console::Off
            });
        let state = Arc::new(Mutex::new(ControlState::default()));
        let sink = ControlSink {
            receiver: ControlReceiver::new(),
            state: state.clone(),
            stdout,
            stderr,
            stop: builder.stop_handle(),
        };
        builder = builder.control_port(Box::new(sink));
        let vm = builder.run()?;
        let st = std::mem::take(&mut *lock(&state));
        if let Some(v) = st.version_mismatch {
            return Err(SandboxError::Version {
                guest: v,
                host: PROTOCOL_VERSION,
            });
        }
        match (st.exit, &vm.exit) {
            (Some(status), _) => Ok(RunOutcome {
                status,
                guest_errors: st.errors,
                boot_time: vm.boot_time,
                vm,
            }),
            (None, GuestExit::Timeout(after)) => Err(SandboxError::Timeout {
                after: *after,
                console_tail: vm.console_tail,
            }),
            (None, _) if vm.kernel_panicked => Err(SandboxError::KernelPanic {
                console_tail: vm.console_tail,
            }),
            (None, exit) => Err(SandboxError::NoExitStatus {
                exit: exit.clone(),
                console_tail: vm.console_tail,
            }),
        }
    }
}

/// A `Write` into a shared buffer.
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct ControlState {
    exit: Option<ExitStatus>,
    errors: Vec<String>,
    version_mismatch: Option<u32>,
}

/// Most msb-init messages kept per run.
const MAX_GUEST_ERRORS: usize = 16;

/// Feeds msb-init's control stream (as it arrives on the UART, in the vCPU thread, so a slow
/// reader of our stdout slows the guest down instead of buffering without bound) through the
/// protocol's [`ControlReceiver`]; any violation fails the VM.
struct ControlSink {
    receiver: ControlReceiver,
    state: Arc<Mutex<ControlState>>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stop: StopHandle,
}

impl Write for ControlSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (state, stdout, stderr) = (&self.state, &mut self.stdout, &mut self.stderr);
        let res = self.receiver.push(buf, |event| match event {
            ControlEvent::Stdout(b) => {
                let _ = stdout.write_all(&b).and_then(|_| stdout.flush());
            }
            ControlEvent::Stderr(b) => {
                let _ = stderr.write_all(&b).and_then(|_| stderr.flush());
            }
            ControlEvent::Error(e) => {
                let mut st = lock(state);
                if st.errors.len() < MAX_GUEST_ERRORS {
                    st.errors.push(e);
                }
            }
            ControlEvent::Exited(status) => lock(state).exit = Some(status),
        });
        if let Err(e) = res {
            tracing::error!("guest control stream: {e}");
            if let ControlError::Version { guest, .. } = e {
                lock(&self.state).version_mismatch = Some(guest);
            }
            self.stop.fail(format!("guest control stream: {e}"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_init::control::GuestMessage;
    use msb_init::frame::encode;

    #[test]
    fn output_exit_and_failures_reach_the_run() {
        let state = Arc::new(Mutex::new(ControlState::default()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let stop = VmBuilder::new("/nonexistent").stop_handle();
        let mut sink = ControlSink {
            receiver: ControlReceiver::new(),
            state: state.clone(),
            stdout: Box::new(SharedBuf(out.clone())),
            stderr: Box::new(io::sink()),
            stop,
        };
        let mut stream = encode(&GuestMessage::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        stream.extend(encode(&GuestMessage::Stdout(b"hi\n".to_vec())).unwrap());
        stream.extend(encode(&GuestMessage::Error("boom".into())).unwrap());
        stream.extend(encode(&GuestMessage::Exited(ExitStatus::Code(7))).unwrap());
        for b in stream {
            sink.write_all(&[b]).unwrap();
        }
        assert_eq!(&*lock(&out), b"hi\n");
        assert_eq!(lock(&state).exit, Some(ExitStatus::Code(7)));
        assert_eq!(lock(&state).errors, vec!["boom".to_string()]);
        sink.write_all(&encode(&GuestMessage::Stdout(b"late".to_vec())).unwrap())
            .unwrap();
        assert_eq!(&*lock(&out), b"hi\n", "nothing after Exited reaches stdout");
    }

    #[test]
    fn version_mismatch_is_recorded() {
        let state = Arc::new(Mutex::new(ControlState::default()));
        let mut sink = ControlSink {
            receiver: ControlReceiver::new(),
            state: state.clone(),
            stdout: Box::new(io::sink()),
            stderr: Box::new(io::sink()),
            stop: VmBuilder::new("/nonexistent").stop_handle(),
        };
        sink.write_all(
            &encode(&GuestMessage::Hello {
                version: PROTOCOL_VERSION + 1,
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(lock(&state).version_mismatch, Some(PROTOCOL_VERSION + 1));
    }
}
