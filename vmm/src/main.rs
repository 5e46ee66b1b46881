//! `msb-vmm`: boot a kernel, or run a command in a fresh sandbox.
//!
//! Exit codes: the command's own for `run` (128 + signal when killed), 124 when --timeout
//! expired, 125 when msb-vmm or the guest failed, 2 for a bad command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit code when the VMM or the guest failed (as docker/podman use it).
const EXIT_FAILURE: u8 = 125;
/// Exit code on --timeout (as timeout(1) uses it).
const EXIT_TIMEOUT: u8 = 124;

#[derive(Parser, Debug)]
#[command(
    name = "msb-vmm",
    version,
    about = "A microVM monitor for hardware-isolated sandboxes"
)]
struct Cli {
    /// More logging on stderr (-v: info, -vv: debug, -vvv: trace). MSB_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel until it powers off.
    Boot(BootArgs),
    /// Run a command in a fresh sandbox and exit with its exit code.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    memory: u64,
    /// Show the guest's serial console.
    #[arg(long)]
    console: bool,
    /// Stop the guest after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Write a JSON report (exit, boot time) to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BootArgs {
    /// Uncompressed ELF kernel (vmlinux), PVH entry preferred.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs (cpio) to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: serial console, reboot=k, panic=-1).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Environment variable for the command; KEY alone copies this process's value.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<OsString>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<OsString>,
    /// Guest kernel (default: the one `./x setup` built).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(v > 0.0 && v.is_finite() && v < 1e9) {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}

fn main() -> ExitCode {
    // First thing: the instant every boot time is measured from.
    let _ = msb_vmm::process_start();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Boot(a) => boot(a),
        Command::Run(a) => run(a),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("msb-vmm: error: {e:#}");
            EXIT_FAILURE
        }
    };
    // The VM was kept alive (defer_teardown_to_exit): exit now and let a helper process pay
    // for destroying it, off the path between the guest finishing and our caller seeing it.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    msb_vmm::host::exit_detaching_teardown(i32::from(code));
    #[allow(unreachable_code)]
    ExitCode::from(code)
}

/// Help and version go to stdout as clap prints them; a usage mistake becomes one line naming
/// the problem and where to look, exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                2
            } else {
                0
            },
        );
    }
    eprintln!("msb-vmm: {} (see `msb-vmm --help`)", one_line(&e));
    ExitCode::from(2)
}

/// The first line of clap's message without its "error: " prefix, plus its tip if any.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ")
        .to_string();
    match lines.find(|l| l.starts_with("tip:")) {
        Some(tip) => format!("{first}; {tip}"),
        None => first,
    }
}

fn print_tail(tail: &[String]) {
    if tail.is_empty() {
        return;
    }
    eprintln!("msb-vmm: last guest console lines:");
    for l in tail {
        eprintln!("  | {l}");
    }
}

fn write_report(
    path: &Option<PathBuf>,
    exit: &str,
    code: u8,
    boot: Option<Duration>,
) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let report = serde_json::json!({
        "exit": exit,
        "exit_code": code,
        "boot_time_us": boot.map(|d| d.as_micros() as u64),
        "vmm_start_to_report_us": msb_vmm::process_start().elapsed().as_micros() as u64,
    });
    std::fs::write(path, format!("{report}\n"))
        .map_err(|e| anyhow::anyhow!("writing --report {}: {e}", path.display()))
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn boot(a: BootArgs) -> anyhow::Result<u8> {
    use msb_vmm::vm::{Console, GuestExit, Initrd, VmBuilder};
    let mut b = VmBuilder::new(&a.kernel)
        .defer_teardown_to_exit(true)
        .cpus(a.vm.cpus)
        .memory_mib(a.vm.memory)
        .timeout(a.vm.timeout)
        .console(if a.vm.console {
            Console::Stdout
        } else {
            Console::Off
        })
        .console_input(a.vm.console);
    if let Some(i) = a.initrd {
        b = b.initrd(Initrd::Path(i));
    }
    if let Some(c) = a.cmdline {
        b = b.cmdline(c);
    }
    let out = b.run()?;
    let code = match &out.exit {
        GuestExit::PowerOff if !out.kernel_panicked => 0,
        GuestExit::Timeout(_) => EXIT_TIMEOUT,
        _ => EXIT_FAILURE,
    };
    write_report(&a.vm.report, &out.exit.to_string(), code, out.boot_time)?;
    if code != 0 {
        let what = if out.kernel_panicked && out.exit.is_power_off() {
            "the guest kernel panicked".to_string()
        } else {
            out.exit.to_string()
        };
        eprintln!("msb-vmm: {what}");
        if !a.vm.console {
            print_tail(&out.console_tail);
        }
    }
    Ok(code)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn run(a: RunArgs) -> anyhow::Result<u8> {
    use msb_vmm::sandbox::{Sandbox, SandboxError};
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Sandbox::command(&a.command)
        .defer_teardown_to_exit(true)
        .cpus(a.vm.cpus)
        .memory_mib(a.vm.memory)
        .timeout(a.vm.timeout)
        .console(a.vm.console);
    for e in &a.env {
        let bytes = e.as_bytes();
        match bytes.iter().position(|&c| c == b'=') {
            Some(i) => {
                cmd = cmd.env(
                    std::ffi::OsStr::from_bytes(&bytes[..i]),
                    std::ffi::OsStr::from_bytes(&bytes[i + 1..]),
                )
            }
            None => match std::env::var_os(e) {
                Some(v) => cmd = cmd.env(e, v),
                None => anyhow::bail!(
                    "--env {}: not set in this environment (use --env KEY=VALUE)",
                    e.to_string_lossy()
                ),
            },
        }
    }
    if let Some(w) = &a.workdir {
        cmd = cmd.workdir(w);
    }
    if let Some(k) = &a.kernel {
        cmd = cmd.kernel(k);
    }
    match cmd.status() {
        Ok(out) => {
            for e in &out.guest_errors {
                eprintln!("msb-vmm: {e}");
            }
            let code = out.status.shell_code() as u8;
            write_report(
                &a.vm.report,
                &format!("{:?}", out.status),
                code,
                out.boot_time,
            )?;
            Ok(code)
        }
        Err(e) => {
            let code = if matches!(e, SandboxError::Timeout { .. }) {
                EXIT_TIMEOUT
            } else {
                EXIT_FAILURE
            };
            let _ = write_report(&a.vm.report, &e.to_string(), code, None);
            eprintln!("msb-vmm: error: {e}");
            if !a.vm.console {
                print_tail(e.console_tail());
            }
            Ok(code)
        }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn boot(_: BootArgs) -> anyhow::Result<u8> {
    anyhow::bail!("this build of msb-vmm runs guests only on Linux x86_64 hosts (KVM)")
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn run(_: RunArgs) -> anyhow::Result<u8> {
    anyhow::bail!("this build of msb-vmm runs guests only on Linux x86_64 hosts (KVM)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("msb-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn run_takes_the_command_verbatim() {
        let cli = parse(&[
            "run",
            "--cpus",
            "2",
            "-e",
            "A=1",
            "--",
            "sh",
            "-c",
            "echo --cpus -e",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.vm.cpus, 2);
        assert_eq!(r.env, vec![OsString::from("A=1")]);
        assert_eq!(
            r.command,
            ["sh", "-c", "echo --cpus -e"].map(OsString::from).to_vec()
        );
        // Without `--`, everything from the first positional argument on is the command.
        let cli = parse(&["run", "ls", "-la", "--memory", "5"]).unwrap();
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.vm.memory, 128);
        assert_eq!(
            r.command,
            ["ls", "-la", "--memory", "5"].map(OsString::from).to_vec()
        );
    }

    #[test]
    fn boot_defaults_and_required_kernel() {
        let cli = parse(&["boot", "--kernel", "/k"]).unwrap();
        let Command::Boot(b) = cli.command else {
            panic!("not boot")
        };
        assert_eq!((b.vm.cpus, b.vm.memory, b.vm.console), (1, 128, false));
        assert!(parse(&["boot"]).is_err());
        assert!(parse(&["run"]).is_err(), "run needs a command");
    }

    #[test]
    fn bad_values_are_one_line() {
        for args in [
            &["run", "--cpus", "x", "--", "true"][..],
            &["boot", "--kernel", "k", "--bogus"],
            &["run", "--timeout", "-1", "--", "true"],
        ] {
            let e = parse(args).unwrap_err();
            let line = one_line(&e);
            assert!(!line.contains('\n') && !line.is_empty(), "{line:?}");
        }
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        assert!(
            parse_secs("0").is_err() && parse_secs("nan").is_err() && parse_secs("inf").is_err()
        );
    }
}
