//! `msb-vmm`: boot a kernel; run a command in a fresh sandbox; keep named sandboxes running and
//! exec into them, copy files in and out.
//!
//! Exit codes: the command's own for `run` and `exec` (128 + signal when killed), 124 when
//! --timeout expired, 125 when msb-vmm or the guest failed, 126/127 when the command could not
//! be executed / was not found, 2 for a bad command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod cli;

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
    #[command(about = BOOT_ABOUT)]
    Boot(BootArgs),
    #[command(about = RUN_ABOUT)]
    Run(RunArgs),
    /// Start a named sandbox that keeps running (returns once its agent is ready).
    Start(StartArgs),
    /// Run a command in a running sandbox.
    Exec(ExecArgs),
    /// Copy a file into or out of a running sandbox: SRC and DST are PATH or NAME:/PATH.
    Cp {
        /// A host path, or NAME:/PATH in a sandbox.
        src: String,
        /// A host path or directory, or NAME:/PATH in a sandbox (a directory there keeps the name).
        dst: String,
    },
    /// List running sandboxes (leftovers of ones whose VMM died are removed).
    Ls,
    /// Stop a running sandbox's vCPUs until `resume` (its memory stays; exec and cp are
    /// refused meanwhile, and an --idle-timeout keeps counting).
    Pause {
        /// The sandbox.
        name: String,
    },
    /// Let a paused sandbox run again.
    Resume {
        /// The sandbox.
        name: String,
    },
    /// Save a running sandbox into DIR (its memory, processes, devices and open files); it
    /// carries on. `restore` continues it, as often as you like.
    Snapshot {
        /// The sandbox.
        name: String,
        /// Where to save it (created if needed; an earlier snapshot there is replaced).
        dir: PathBuf,
        /// Stop the sandbox once it is saved.
        #[arg(long)]
        stop: bool,
    },
    /// Start a named sandbox from a snapshot: the saved one's processes and files carry on,
    /// with the same shares and network (its connections from before are reset).
    Restore {
        /// A directory `msb-vmm snapshot` wrote.
        dir: PathBuf,
        /// Name of the new sandbox.
        #[arg(long)]
        name: String,
    },
    /// Branch a running sandbox, or a snapshot, into new named sandboxes that carry on from
    /// its state (each with its own clock, random numbers, vsock and network).
    Fork {
        /// A running sandbox (branched as it is now), or a directory `snapshot` wrote.
        source: String,
        /// Name of the one new sandbox.
        #[arg(
            long = "name",
            id = "new_name",
            value_name = "NEW",
            required_unless_present = "count",
            conflicts_with = "count"
        )]
        new: Option<String>,
        /// How many new sandboxes, named PREFIX1 to PREFIXK.
        #[arg(long, value_name = "K", requires = "name_prefix", value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: Option<u32>,
        /// The names' prefix for --count.
        #[arg(long, value_name = "PREFIX", requires = "count")]
        name_prefix: Option<String>,
    },
    /// What a running sandbox uses: vCPU time, memory (host and guest), network, files,
    /// processes.
    Stats {
        /// The sandbox.
        name: String,
        /// One JSON object (per reading with --watch) instead of the table.
        #[arg(long)]
        json: bool,
        /// Read again every SECS seconds (default 1) until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1", value_parser = parse_secs)]
        watch: Option<Duration>,
    },
    /// Show a running sandbox's egress policy, or replace it (with the flags `start` takes):
    /// open flows the new policy denies are cut at once.
    Policy(PolicyArgs),
    /// Power off a running sandbox.
    Stop {
        /// The sandbox.
        name: String,
    },
    /// Pull an OCI image into the cache (a registry reference, oci:DIR[:TAG] or
    /// docker-archive:FILE[:TAG]), ready for `run --image`.
    Pull {
        /// The image.
        image: String,
        /// Speak plain HTTP to this registry (HOST[:PORT]; loopback registries always are).
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List the images in the cache.
    Images {
        /// One JSON object per image.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image from the cache (its layers stay until `prune` if others share them).
    Rmi {
        /// The image, as pulled.
        image: String,
    },
    /// Remove cached layers no image uses, and leftovers of interrupted pulls.
    Prune,
    /// Print the sandbox CA's certificate (PEM), the one guests trust for TLS interception;
    /// made on first use.
    Ca {
        /// Replace the CA with a new one (the old one is no longer trusted by new sandboxes).
        #[arg(long)]
        regenerate: bool,
    },
    /// The process behind `start` (internal).
    #[command(hide = true, name = "__serve")]
    Serve(StartArgs),
}

#[derive(Args, Debug, Clone)]
struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest memory in MiB (faulted in as the guest touches it: unused memory costs nothing).
    #[arg(long, default_value_t = msb_vmm::DEFAULT_MEMORY_MIB, value_name = "MIB")]
    memory: u64,
    /// Show the guest's serial console (on stderr for sandboxes).
    #[arg(long)]
    console: bool,
    /// Write a JSON report (exit, boot time) to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Run the VMM's threads without their seccomp filters: only for debugging a filter that
    /// stopped the VMM (capabilities are still dropped)
    #[arg(long)]
    no_seccomp: bool,
    /// Jail the VMM (root only): new mount, PID, IPC and UTS namespaces, pivot_root into DIR
    /// (empty or new) holding only what it needs, at most 8192 open files
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// With --jail: the largest file the VMM may write (bytes, or with k/m/g), e.g. into a
    /// volume; larger writes fail with EFBIG in the guest
    #[arg(long, value_name = "SIZE", requires = "jail")]
    jail_max_file: Option<String>,
}

impl VmArgs {
    fn seccomp(&self) -> msb_confine::Seccomp {
        if self.no_seccomp {
            msb_confine::Seccomp::Off
        } else {
            msb_confine::Seccomp::Enforce
        }
    }
}

/// File systems for a sandbox.
#[derive(Args, Debug, Clone, Default)]
struct MountArgs {
    /// Host directory to boot as the guest's root file system, shared read-write; or
    /// `initramfs` for the small busybox root in memory (use ./initramfs for a directory of
    /// that name). Default: $MSB_ROOTFS, else the Debian minbase tree `./x setup` builds,
    /// shared copy-on-write (guest changes stay in guest memory and vanish with it).
    #[arg(long, value_name = "DIR|initramfs", conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// Boot an OCI image as the root, copy-on-write: a registry reference
    /// ([REGISTRY/]REPO[:TAG][@DIGEST]), oci:DIR[:TAG] or docker-archive:FILE[:TAG]; pulled
    /// on first use. Its Env, WorkingDir, User, Entrypoint and Cmd apply.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Speak plain HTTP to this registry (HOST[:PORT]; loopback registries always are).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Mount host directory HOST at GUEST (repeatable); OPTS: ro, rw, cache=none|auto|always.
    #[arg(long = "volume", short = 'V', value_name = "HOST:GUEST[:OPTS]")]
    volumes: Vec<String>,
    /// Mount a tmpfs at GUEST (repeatable), at most SIZE (bytes, or with k/m/g).
    #[arg(long = "tmpfs", value_name = "GUEST[:SIZE]")]
    tmpfs: Vec<String>,
}

/// An egress policy as flags (`run`, `start`, and `policy` for a running sandbox).
#[derive(Args, Debug, Clone, Default)]
struct RuleArgs {
    /// Egress preset: none (no network card), public (public internet only; the default),
    /// all (everything but the host), non-local (no loopback, link-local, metadata or host),
    /// learn (as non-local, recording what is reached). The host is every address it holds,
    /// not just the gateway; only a host rule reaches it. Wins over a policy file's preset.
    #[arg(long, value_name = "PRESET")]
    net: Option<String>,
    /// Allow [proto:]destination[:ports] (repeatable), e.g. tcp:*.github.com:443, host:8080.
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<String>,
    /// Deny [proto:]destination[:ports] (repeatable); deny rules win over allow rules.
    #[arg(long = "deny", value_name = "RULE")]
    deny: Vec<String>,
    /// TOML policy file: preset = "...", allow = [...], deny = [...] (for `policy`, its
    /// secrets must be the ones the sandbox started with).
    #[arg(long, alias = "file", value_name = "FILE")]
    policy: Option<PathBuf>,
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
impl RuleArgs {
    /// The flags with the policy file read (the sandbox process that applies a live change
    /// may not see the caller's files).
    fn flags(&self) -> anyhow::Result<cli::PolicyFlags> {
        let file = match &self.policy {
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--policy {}: {e}", path.display()))?,
            )),
            None => None,
        };
        Ok(cli::PolicyFlags {
            net: self.net.clone(),
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            file,
        })
    }
}

/// The sandbox's network (every packet ends in our netstack, which enforces the policy).
#[derive(Args, Debug, Clone, Default)]
struct NetArgs {
    #[command(flatten)]
    rules: RuleArgs,
    /// A secret the guest holds only as a placeholder: the real value is taken from this
    /// process's environment variable NAME and sent only to HOSTS (comma-separated domains
    /// or *.suffix) over intercepted TLS. Repeatable.
    #[arg(long = "secret", value_name = "NAME=HOSTS")]
    secret: Vec<String>,
    /// A secret whose value is the content of PATH (trailing newline removed). Repeatable.
    #[arg(long = "secret-file", value_name = "NAME=PATH=HOSTS")]
    secret_file: Vec<String>,
    /// What a placeholder where no secret may go does: block (the default) ends that flow,
    /// log only writes the audit line.
    #[arg(long, value_name = "block|log")]
    on_violation: Option<String>,
    /// Intercept TLS (with the sandbox CA, see `msb-vmm ca`) even without secrets.
    #[arg(long)]
    tls_intercept: bool,
    /// Intercepted TCP ports, comma-separated (default 443).
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    tls_intercept_ports: Vec<u16>,
    /// Pass flows to these names through untouched (domain or *.suffix; repeatable), for
    /// certificate-pinned clients.
    #[arg(long = "tls-bypass", value_name = "PATTERN")]
    tls_bypass: Vec<String>,
    /// Also trust this CA (PEM) when verifying upstream servers. Repeatable.
    #[arg(long = "tls-upstream-ca", value_name = "FILE")]
    tls_upstream_ca: Vec<PathBuf>,
    /// Do not verify upstream certificates (only for testing; never the default).
    #[arg(long)]
    tls_insecure_upstream: bool,
    /// Link MTU (68 to 65520).
    #[arg(long, value_name = "BYTES", default_value_t = 1500)]
    mtu: u16,
    /// Forward host port HOSTPORT (on HOSTIP, default 127.0.0.1) to the guest's GUESTPORT
    /// (repeatable); a port in use is an error before boot.
    #[arg(
        long = "publish",
        short = 'p',
        value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/udp]"
    )]
    publish: Vec<String>,
    /// Append one JSON line per flow and per DNS decision to FILE (the audit log).
    #[arg(long, value_name = "FILE")]
    net_log: Option<PathBuf>,
    /// With --net learn (`run` only): write the smallest policy file that admits exactly
    /// what the guest reached to FILE when the command ends (`msb-vmm policy NAME --suggest`
    /// for named sandboxes).
    #[arg(long, value_name = "FILE")]
    suggest_to: Option<PathBuf>,
}

/// What a sandbox's commands and network may use.
#[derive(Args, Debug, Clone, Default)]
struct LimitArgs {
    /// Processes and threads the sandbox's commands may have at once, together (a cgroup in
    /// the guest: a fork bomb stops there).
    #[arg(long, value_name = "N")]
    pids_limit: Option<u64>,
    /// Memory the sandbox's commands may use together (bytes, or with k/m/g); past it the
    /// guest's OOM killer ends one of them.
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// Network flows (connections, UDP peers, pings) open at once; more are refused.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_flows: usize,
    /// Bandwidth into and out of the sandbox in bytes per second (k/m/g suffixes): IN/OUT,
    /// IN/, /OUT, or one value for both, e.g. 10m/1m.
    #[arg(long, value_name = "[IN]/[OUT]")]
    net_rate: Option<String>,
    /// Bytes the sandbox may send over its life (k/m/g); once spent, its connections are
    /// cut and new ones refused (logged).
    #[arg(long, value_name = "SIZE")]
    egress_budget: Option<String>,
    /// Requests and file bytes per second the sandbox's shares serve, together: OPS/BYTES
    /// (k/m/g), either may be empty, e.g. 1000/50m; the guest's file system calls wait.
    #[arg(long, value_name = "[OPS]/[BYTES]")]
    fs_rate: Option<String>,
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
    /// Stop the guest after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// No virtio-vsock device.
    #[arg(long)]
    no_vsock: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// How to run a command (shared by `run` and `exec`).
#[derive(Args, Debug, Clone)]
struct ExecOpts {
    /// Environment variable for the command; KEY alone copies this process's value.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<OsString>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<OsString>,
    /// Run as this user (name from the guest's /etc/passwd, or UID[:GID]).
    #[arg(long, short = 'u', value_name = "USER")]
    user: Option<String>,
    /// Run on a terminal: your terminal in raw mode, window-size changes forwarded.
    #[arg(long, short = 't')]
    tty: bool,
    /// Forward standard input even when it is a terminal (it is forwarded from pipes and files
    /// anyway).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    exec: ExecOpts,
    /// Guest kernel (default: the one `./x setup` built).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Guest hostname.
    #[arg(long, default_value = "msb")]
    hostname: String,
    /// Boot the kernel even when a warm snapshot of this configuration is cached (by
    /// default `run` continues one, saved the first time a configuration runs).
    #[arg(long)]
    cold: bool,
    #[command(flatten)]
    mounts: MountArgs,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    vm: VmArgs,
    /// The command and its arguments; `IMAGE -- CMD...` runs CMD in that image (a word
    /// before `--`), and with --image the command may be left out (the image's Cmd runs).
    #[arg(
        required_unless_present = "image",
        trailing_var_arg = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

#[derive(Args, Debug, Clone)]
struct StartArgs {
    /// Name of the sandbox (1-63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit).
    #[arg(long)]
    name: String,
    /// Guest kernel (default: the one `./x setup` built).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Guest hostname (default: the sandbox name where valid, else msb).
    #[arg(long)]
    hostname: Option<String>,
    #[command(flatten)]
    mounts: MountArgs,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    vm: VmArgs,
    /// Serve Prometheus metrics (text format, over HTTP) on a Unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    metrics_socket: Option<PathBuf>,
    /// Stop the sandbox cleanly after SECS seconds with no exec running or started and no
    /// network traffic.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    idle_timeout: Option<Duration>,
    /// Stop the sandbox cleanly SECS seconds after it started, whatever it is doing.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    max_lifetime: Option<Duration>,
    /// Continue the sandbox saved in this snapshot directory (internal: `msb-vmm restore`).
    #[arg(long, hide = true, value_name = "DIR")]
    restore: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PolicyArgs {
    /// The sandbox.
    name: String,
    #[command(flatten)]
    rules: RuleArgs,
    /// Print the policy learn mode suggests (a sandbox started with --net learn): the
    /// smallest allowlist that admits exactly what the guest has reached so far.
    #[arg(long, conflicts_with_all = ["net", "allow", "deny", "policy"])]
    suggest: bool,
}

#[derive(Args, Debug)]
struct ExecArgs {
    #[command(flatten)]
    exec: ExecOpts,
    /// The sandbox.
    name: String,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
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
    msb_vmm::init_logging(match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    });
}

fn main() -> ExitCode {
    // First thing: the instant every boot time is measured from.
    let _ = msb_vmm::process_start();
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.verbose);
    let code = run_command(cli.command);
    // A VM kept alive (defer_teardown_to_exit) is destroyed by a helper process, off the path
    // between the guest finishing and our caller seeing us exit.
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    msb_vmm::host::exit_detaching_teardown(i32::from(code));
    #[allow(unreachable_code)]
    ExitCode::from(code)
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn run_command(command: Command) -> u8 {
    let result = match command {
        Command::Boot(a) => cli::boot(a),
        Command::Run(a) => cli::run(a),
        Command::Start(a) => cli::daemon::start(a),
        Command::Serve(a) => cli::daemon::serve(a),
        Command::Exec(a) => cli::daemon::exec(a),
        Command::Cp { src, dst } => cli::daemon::cp(&src, &dst),
        Command::Ls => cli::daemon::ls(),
        Command::Pause { name } => cli::daemon::pause(&name, true),
        Command::Resume { name } => cli::daemon::pause(&name, false),
        Command::Snapshot { name, dir, stop } => cli::daemon::snapshot(&name, &dir, stop),
        Command::Restore { dir, name } => cli::daemon::restore(&dir, &name),
        Command::Fork {
            source,
            new,
            count,
            name_prefix,
        } => {
            let names = match (new, count, name_prefix) {
                (Some(n), _, _) => vec![n],
                (None, Some(k), Some(p)) => (1..=k).map(|i| format!("{p}{i}")).collect(),
                _ => unreachable!("clap requires --name or --count with --name-prefix"),
            };
            cli::daemon::fork(&source, &names)
        }
        Command::Stop { name } => cli::daemon::stop(&name),
        Command::Stats { name, json, watch } => cli::daemon::stats(&name, json, watch),
        Command::Policy(a) => cli::daemon::policy(a),
        Command::Ca { regenerate } => cli::ca::ca(regenerate),
        Command::Pull {
            image,
            insecure_registries,
            quiet,
        } => cli::images::pull(&image, insecure_registries, quiet),
        Command::Images { json } => cli::images::list(json),
        Command::Rmi { image } => cli::images::rmi(&image),
        Command::Prune => cli::images::prune(),
    };
    result.unwrap_or_else(|e| {
        eprintln!("msb-vmm: error: {e:#}");
        EXIT_FAILURE
    })
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn run_command(_: Command) -> u8 {
    eprintln!("msb-vmm: this build runs guests only on Linux hosts (KVM, x86_64 or arm64); macOS on Apple silicon needs the Hypervisor.framework build");
    EXIT_FAILURE
}

/// Help and version go to stdout as clap prints them; a usage mistake becomes one line naming
/// the problem and where to look, exit code 2.
/// The command line. clap builds every subcommand's arguments before it parses anything, a
/// tenth of the time to a guest's first instruction here; `boot` and `run`, the commands
/// that start a VM, are parsed with their own arguments alone (the same definitions, so the
/// same results, errors and help: the tests compare both ways).
fn parse(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    use clap::{ArgMatches, FromArgMatches};
    let only =
        |name: &'static str, about: &'static str, augment: fn(clap::Command) -> clap::Command| {
            // `about` last: a flattened struct's doc comment sets its own, as in the full parser
            // (where the variant's doc comment comes after).
            let cmd = augment(clap::Command::new(name))
                .about(about)
                .long_about(None)
                .bin_name(format!("msb-vmm {name}"))
                .arg(verbose_arg());
            cmd.try_get_matches_from(&args[1..])
        };
    let verbose = |m: &ArgMatches| m.get_count("verbose");
    match args.get(1).and_then(|a| a.to_str()) {
        Some("boot") => {
            let m = only("boot", BOOT_ABOUT, BootArgs::augment_args)?;
            Ok(Cli {
                verbose: verbose(&m),
                command: Command::Boot(BootArgs::from_arg_matches(&m)?),
            })
        }
        Some("run") => {
            let m = only("run", RUN_ABOUT, RunArgs::augment_args)?;
            Ok(Cli {
                verbose: verbose(&m),
                command: Command::Run(RunArgs::from_arg_matches(&m)?),
            })
        }
        _ => Cli::try_parse_from(args),
    }
}

/// `Cli::verbose` as clap derives it (global, so every subcommand takes it).
fn verbose_arg() -> clap::Arg {
    clap::Arg::new("verbose")
        .short('v')
        .long("verbose")
        .action(clap::ArgAction::Count)
        .global(true)
        // The first of `Cli`'s arguments: its place in the full parser's help.
        .display_order(0)
        .help("More logging on stderr (-v: info, -vv: debug, -vvv: trace). MSB_LOG overrides")
}

/// The `about` of `boot` and `run`, for the full parser and for their own alone.
const BOOT_ABOUT: &str = "Boot a kernel until it powers off";
const RUN_ABOUT: &str = "Run a command in a fresh sandbox and exit with its exit code";

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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let full = Cli::try_parse_from(std::iter::once("msb-vmm").chain(args.iter().copied()));
        let fast = super::parse(
            std::iter::once("msb-vmm")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect(),
        );
        // The fast path for `boot` and `run` gives what the full parser gives.
        match (&full, &fast) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{args:?}"),
            (Err(a), Err(b)) => assert_eq!(
                (a.kind(), a.to_string()),
                (b.kind(), b.to_string()),
                "{args:?}"
            ),
            _ => panic!("{args:?}: full {full:?}, fast {fast:?}"),
        }
        full
    }

    /// `boot --help` and `run --help` read the same either way.
    #[test]
    fn the_fast_parsers_help_is_the_full_ones() {
        for (sub, args) in [
            ("boot", vec!["msb-vmm", "boot", "--help"]),
            ("run", vec!["msb-vmm", "run", "--help"]),
            ("run", vec!["msb-vmm", "run", "-h"]),
            ("boot", vec!["msb-vmm", "-v", "boot", "--kernel", "k"]),
            ("boot", vec!["msb-vmm", "boot", "-vv", "--kernel", "k"]),
            ("boot", vec!["msb-vmm", "boot", "--version"]),
            ("boot", vec!["msb-vmm", "boot", "--kernel"]),
            ("run", vec!["msb-vmm", "run"]),
            ("run", vec!["msb-vmm", "run", "--bogus", "x"]),
            ("run", vec!["msb-vmm", "run", "--memory", "x", "--", "true"]),
        ] {
            let full = Cli::try_parse_from(&args);
            let fast = super::parse(args.iter().map(OsString::from).collect());
            match (full, fast) {
                (Err(a), Err(b)) => {
                    assert_eq!(a.kind(), b.kind(), "{sub}");
                    assert_eq!(a.render().to_string(), b.render().to_string(), "{sub}");
                }
                (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
                (a, b) => panic!("{sub}: {a:?} / {b:?}"),
            }
        }
    }

    #[test]
    fn run_takes_the_command_verbatim() {
        let cli = parse(&[
            "run",
            "--cpus",
            "2",
            "-e",
            "A=1",
            "-t",
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
        assert!(r.exec.tty);
        assert_eq!(r.exec.env, vec![OsString::from("A=1")]);
        assert_eq!(
            r.command,
            ["sh", "-c", "echo --cpus -e"].map(OsString::from).to_vec()
        );
        // Without `--`, everything from the first positional argument on is the command.
        let cli = parse(&["run", "ls", "-la", "--memory", "5"]).unwrap();
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.vm.memory, msb_vmm::DEFAULT_MEMORY_MIB);
        assert_eq!(
            r.command,
            ["ls", "-la", "--memory", "5"].map(OsString::from).to_vec()
        );
    }

    #[test]
    fn long_running_commands() {
        let Command::Exec(e) = parse(&["exec", "-t", "box", "--", "bash"]).unwrap().command else {
            panic!()
        };
        assert_eq!((e.name.as_str(), e.exec.tty), ("box", true));
        let Command::Start(s) = parse(&["start", "--name", "box", "--cpus", "2"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((s.name.as_str(), s.vm.cpus), ("box", 2));
        assert!(matches!(
            parse(&["cp", "a", "box:/b"]).unwrap().command,
            Command::Cp { .. }
        ));
        assert!(matches!(parse(&["ls"]).unwrap().command, Command::Ls));
        assert!(matches!(
            parse(&["ca", "--regenerate"]).unwrap().command,
            Command::Ca { regenerate: true }
        ));
        assert!(parse(&["stop"]).is_err());
        assert!(parse(&["start"]).is_err(), "start needs --name");
    }

    #[test]
    fn boot_defaults_and_required_kernel() {
        let cli = parse(&["boot", "--kernel", "/k"]).unwrap();
        let Command::Boot(b) = cli.command else {
            panic!("not boot")
        };
        assert_eq!(
            (b.vm.cpus, b.vm.memory, b.vm.console),
            (1, msb_vmm::DEFAULT_MEMORY_MIB, false)
        );
        assert!(parse(&["boot"]).is_err());
        assert!(parse(&["run"]).is_err(), "run needs a command");
        let Command::Run(r) = parse(&["run", "--image", "debian"]).unwrap().command else {
            panic!("not run")
        };
        assert!(r.command.is_empty() && r.mounts.image.as_deref() == Some("debian"));
        let Command::Run(r) = parse(&["run", "debian:12", "--", "ls", "-l"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert_eq!(
            r.command,
            ["debian:12", "--", "ls", "-l"].map(OsString::from).to_vec(),
            "cli::run tells the image before `--`"
        );
        assert!(parse(&["run", "--image", "x", "--rootfs", "/r", "--", "ls"]).is_err());
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
