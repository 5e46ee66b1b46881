//! What an OCI bundle asks for, in our terms: the process (argv, env, cwd, user, rlimits,
//! terminal), the root, bind mounts as volumes, tmpfs mounts, the sandbox's size and its
//! egress policy. Pure, so every refusal is unit-tested without containerd or a guest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use msb_init::agent::{ExecRequest, Rlimit, RlimitResource, TermSize, User};
use msb_vmm::netconf::PolicyFlags;
use oci_spec::runtime::{LinuxNamespaceType, Mount, PosixRlimitType, Process, Spec};
use thiserror::Error;

/// The CRI annotation that names a container's pod sandbox (the pause container's id).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's summed limits, which CRI (containerd 1.7 and later, kubelet 1.23 and later) puts
/// on the pod's sandbox container: the sandbox holds every container of the pod, so it is
/// sized by these when they are there, and by the container's own limits otherwise.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// Our annotations' prefix.
pub const ANNOTATION_PREFIX: &str = "io.msb-vmm.";

/// The guest file systems msb-init mounts itself: the spec's copies of them are satisfied.
const GUEST_OWNED: &[&str] = &[
    "/proc",
    "/sys",
    "/sys/fs/cgroup",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    // A tmpfs already (containerd's default spec asks for one): the pod share is mounted
    // below it.
    "/run",
];

/// A bundle we cannot run: one line naming the field and what to change.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// A bind mount of the spec, served as a virtio-fs volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    pub guest: PathBuf,
    pub read_only: bool,
}

/// Everything a container needs from its bundle.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The process to run (also the template for `ctr task exec` processes' defaults).
    pub process: ExecRequest,
    /// The spec's `root.path`, made absolute against the bundle.
    pub root: PathBuf,
    pub root_readonly: bool,
    pub binds: Vec<Bind>,
    /// Guest tmpfs mounts: path and size in bytes (0: the guest's default).
    pub tmpfs: Vec<(PathBuf, u64)>,
    /// vCPUs from the CPU quota, rounded up.
    pub cpus: Option<u32>,
    /// Guest memory from the memory limit.
    pub memory_mib: Option<u64>,
    /// The egress policy from `io.msb-vmm.network.*`.
    pub policy: PolicyFlags,
    /// The pod this container belongs to, from the CRI annotation: containers of one pod
    /// share a sandbox.
    pub pod: Option<String>,
    pub hostname: Option<String>,
}

/// vCPUs for a CPU quota per period, rounded up; `None` for no limit (a quota of 0 or -1).
fn vcpus(quota: i64, period: u64) -> Option<u32> {
    (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period).clamp(1, 64) as u32)
}

/// Guest MiB for a memory limit in bytes; `None` for no limit (0 or -1).
fn guest_mib(bytes: i64, what: &str) -> Result<Option<u64>, SpecError> {
    if bytes <= 0 {
        return Ok(None);
    }
    let mib = (bytes as u64).div_ceil(1 << 20);
    if mib < 64 {
        return err(format!(
            "{what} {bytes} bytes: a sandbox needs at least 64 MiB"
        ));
    }
    Ok(Some(mib))
}

/// Reads `config.json` of `bundle`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|e| SpecError(format!("{}: {e}", path.display())))
}

/// The plan for the spec of the bundle at `bundle`.
pub fn plan(spec: &Spec, bundle: &Path) -> Result<Plan, SpecError> {
    let Some(process) = spec.process() else {
        return err("the spec has no process to run");
    };
    let exec = process_request(process)?;
    let root = match spec.root() {
        Some(r) if r.path().is_absolute() => r.path().clone(),
        Some(r) => bundle.join(r.path()),
        None => bundle.join("rootfs"),
    };
    let root_readonly = spec.root().as_ref().and_then(|r| r.readonly()) == Some(true);
    let annotations = spec.annotations().clone().unwrap_or_default();
    let policy = policy(&annotations)?;
    let pod = annotations
        .get(CRI_SANDBOX_ID)
        .filter(|p| !p.is_empty())
        .cloned();
    let (mut cpus, mut memory_mib) = (None, None);
    if let Some(linux) = spec.linux() {
        if let Some(ns) = linux.namespaces() {
            if !ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network) {
                return err("host networking (no network namespace in the spec) is not \
                            supported: a sandbox always has its own network");
            }
            if let Some(n) = ns.iter().find(|n| n.path().is_some()) {
                return err(format!(
                    "joining an existing {:?} namespace is not supported: containers of one pod \
                     share a sandbox through the {CRI_SANDBOX_ID} annotation instead",
                    n.typ()
                ));
            }
        }
        if let Some(d) = linux.devices().as_ref().and_then(|d| d.first()) {
            return err(format!(
                "device {} is not supported: host devices cannot be passed into a sandbox \
                 (privileged containers neither)",
                d.path().display()
            ));
        }
        if let Some(res) = linux.resources() {
            if let Some(cpu) = res.cpu() {
                if let (Some(q), Some(p)) = (cpu.quota(), cpu.period()) {
                    cpus = vcpus(q, p);
                }
            }
            if let Some(m) = res.memory().as_ref().and_then(|m| m.limit()) {
                memory_mib = guest_mib(m, "memory limit")?;
            }
        }
    }
    let number = |key: &str| -> Result<Option<i64>, SpecError> {
        match annotations.get(key).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| SpecError(format!("annotation {key}: {v:?} is not a whole number"))),
        }
    };
    if let (Some(q), Some(p)) = (
        number(CRI_SANDBOX_CPU_QUOTA)?,
        number(CRI_SANDBOX_CPU_PERIOD)?,
    ) {
        if let Some(n) = vcpus(q, u64::try_from(p).unwrap_or(0)) {
            cpus = Some(n);
        }
    }
    if let Some(m) = number(CRI_SANDBOX_MEMORY)? {
        if let Some(mib) = guest_mib(m, "the pod's memory limit")? {
            memory_mib = Some(mib);
        }
    }
    let mut binds = Vec::new();
    let mut tmpfs = Vec::new();
    for m in spec.mounts().iter().flatten() {
        match mount_kind(m)? {
            MountKind::GuestOwned => {}
            MountKind::Bind(b) => binds.push(b),
            MountKind::Tmpfs(size) => tmpfs.push((m.destination().clone(), size)),
        }
    }
    Ok(Plan {
        process: exec,
        root,
        root_readonly,
        binds,
        tmpfs,
        cpus,
        memory_mib,
        policy,
        pod,
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
    })
}

enum MountKind {
    GuestOwned,
    Bind(Bind),
    Tmpfs(u64),
}

fn mount_kind(m: &Mount) -> Result<MountKind, SpecError> {
    let dest = m.destination();
    let options = m.options().clone().unwrap_or_default();
    let typ = m.typ().clone().unwrap_or_default();
    let is_bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
    if !dest.is_absolute() {
        return err(format!(
            "mount destination {}: must be absolute",
            dest.display()
        ));
    }
    if is_bind {
        let Some(src) = m.source() else {
            return err(format!("bind mount at {}: no source", dest.display()));
        };
        if !src.is_absolute() {
            return err(format!(
                "bind mount {} at {}: the source must be an absolute host path",
                src.display(),
                dest.display()
            ));
        }
        if !src.is_dir() {
            // virtio-fs shares directories; a single file (/etc/hosts, resolv.conf from CRI)
            // is the guest's own business.
            if is_cri_file(dest) {
                return Ok(MountKind::GuestOwned);
            }
            return err(format!(
                "bind mount {} at {}: only directories can be shared into a sandbox",
                src.display(),
                dest.display()
            ));
        }
        return Ok(MountKind::Bind(Bind {
            host: src.clone(),
            guest: dest.clone(),
            read_only: options.iter().any(|o| o == "ro"),
        }));
    }
    if GUEST_OWNED.iter().any(|g| Path::new(g) == dest) {
        return Ok(MountKind::GuestOwned);
    }
    match typ.as_str() {
        "tmpfs" => {
            let size = options
                .iter()
                .find_map(|o| o.strip_prefix("size="))
                .map(|s| {
                    parse_size(s).ok_or_else(|| {
                        SpecError(format!("tmpfs at {}: bad size={s}", dest.display()))
                    })
                })
                .transpose()?
                .unwrap_or(0);
            Ok(MountKind::Tmpfs(size))
        }
        "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2" => err(format!(
            "a {typ} mount at {} is not supported: the guest mounts its own at the usual places",
            dest.display()
        )),
        other => err(format!(
            "mount type {other:?} at {} is not supported (bind mounts of directories and tmpfs \
             are)",
            dest.display()
        )),
    }
}

/// The files CRI bind-mounts into every container; the guest writes its own.
fn is_cri_file(dest: &Path) -> bool {
    [
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/dev/termination-log",
    ]
    .iter()
    .any(|f| Path::new(f) == dest)
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The agent request for an OCI process (the container's or an exec's).
pub fn process_request(p: &Process) -> Result<ExecRequest, SpecError> {
    let argv: Vec<Vec<u8>> = p
        .args()
        .iter()
        .flatten()
        .map(|a| a.as_bytes().to_vec())
        .collect();
    if argv.is_empty() || argv[0].is_empty() {
        return err("the process has no args: give a command");
    }
    let mut env = Vec::new();
    for e in p.env().iter().flatten() {
        let Some((k, v)) = e.split_once('=') else {
            return err(format!("environment entry {e:?}: not NAME=VALUE"));
        };
        env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    let cwd = p.cwd();
    if !cwd.is_absolute() {
        return err(format!("cwd {}: must be absolute", cwd.display()));
    }
    let u = p.user();
    let user = if u.uid() == 0 && u.gid() == 0 {
        None
    } else {
        Some(User::Id {
            uid: u.uid(),
            gid: u.gid(),
        })
    };
    let mut rlimits = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let resource = match r.typ() {
            PosixRlimitType::RlimitNofile => RlimitResource::Nofile,
            PosixRlimitType::RlimitNproc => RlimitResource::Nproc,
            PosixRlimitType::RlimitAs => RlimitResource::As,
            PosixRlimitType::RlimitCore => RlimitResource::Core,
            PosixRlimitType::RlimitCpu => RlimitResource::Cpu,
            PosixRlimitType::RlimitFsize => RlimitResource::Fsize,
            PosixRlimitType::RlimitStack => RlimitResource::Stack,
            PosixRlimitType::RlimitMemlock => RlimitResource::Memlock,
            other => {
                return err(format!(
                    "rlimit {other:?} is not supported (NOFILE, NPROC, AS, CORE, CPU, FSIZE, \
                     STACK and MEMLOCK are)"
                ))
            }
        };
        if r.soft() > r.hard() {
            return err(format!("rlimit {:?}: soft exceeds hard", r.typ()));
        }
        rlimits.push(Rlimit {
            resource,
            soft: r.soft(),
            hard: r.hard(),
        });
    }
    let pty = (p.terminal() == Some(true)).then(|| {
        let (rows, cols) = p
            .console_size()
            .map(|b| (b.height() as u16, b.width() as u16))
            .filter(|&(r, c)| r > 0 && c > 0)
            .unwrap_or((24, 80));
        TermSize { rows, cols }
    });
    Ok(ExecRequest {
        argv,
        env,
        workdir: Some(cwd.as_os_str().as_encoded_bytes().to_vec()),
        user,
        rlimits,
        stdin: pty.is_none(),
        pty,
        timeout_ms: None,
        root: None,
    })
}

/// The egress policy of `io.msb-vmm.network.{preset,allow,deny,policy-file}`; any other
/// `io.msb-vmm.` annotation is a mistake worth an error, not silence.
pub fn policy(annotations: &HashMap<String, String>) -> Result<PolicyFlags, SpecError> {
    let mut flags = PolicyFlags::default();
    let list = |v: &str| -> Vec<String> {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let mut keys: Vec<_> = annotations.keys().collect();
    keys.sort();
    for k in keys {
        let Some(name) = k.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        let v = &annotations[k];
        match name {
            "network.preset" => flags.net = Some(v.clone()),
            "network.allow" => flags.allow = list(v),
            "network.deny" => flags.deny = list(v),
            "network.policy-file" => {
                let text = std::fs::read_to_string(v)
                    .map_err(|e| SpecError(format!("annotation {k}: {v}: {e}")))?;
                flags.file = Some((v.clone(), text));
            }
            _ => {
                return err(format!(
                    "annotation {k}: unknown (known: {ANNOTATION_PREFIX}network.preset, \
                     .allow, .deny, .policy-file)"
                ))
            }
        }
    }
    // Checked here so a bad value fails `create`, naming the annotation.
    msb_vmm::netconf::policy_from(&flags)
        .map_err(|e| SpecError(format!("annotations {ANNOTATION_PREFIX}network.*: {e}")))?;
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec as `ctr run --rootfs` writes it (trimmed), with `extra` merged into it.
    fn spec(extra: serde_json::Value) -> Spec {
        let mut v = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["sh", "-c", "echo hi"],
                "env": ["PATH=/usr/bin:/bin", "A=b=c"],
                "cwd": "/",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
            },
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs"},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn plan_of(extra: serde_json::Value) -> Result<Plan, SpecError> {
        plan(&spec(extra), Path::new("/b"))
    }

    #[test]
    fn the_process_and_mounts_of_a_plain_spec() {
        let p = plan_of(serde_json::json!({})).unwrap();
        assert_eq!(
            p.process.argv,
            vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()]
        );
        assert_eq!(p.process.env[1], (b"A".to_vec(), b"b=c".to_vec()));
        assert_eq!(p.process.workdir.as_deref(), Some(&b"/"[..]));
        assert_eq!(p.process.user, None);
        assert_eq!(p.process.rlimits.len(), 1);
        assert!(p.process.stdin && p.process.pty.is_none());
        assert_eq!(p.root, PathBuf::from("/b/rootfs"));
        // /proc, /dev, /dev/pts, /sys and /run are the guest's; /tmp is a sized tmpfs.
        assert_eq!(p.tmpfs, vec![(PathBuf::from("/tmp"), 64 << 20)]);
        assert!(p.binds.is_empty());
        assert_eq!((p.cpus, p.memory_mib), (None, None));
        assert_eq!(p.policy.net, None);
    }

    #[test]
    fn users_terminals_and_resources() {
        let p = plan_of(serde_json::json!({
            "process": {"user": {"uid": 1000, "gid": 100}, "terminal": true,
                        "consoleSize": {"height": 50, "width": 132}},
            "root": {"path": "/abs/root", "readonly": true},
            "linux": {"resources": {"cpu": {"quota": 150000, "period": 100000},
                                     "memory": {"limit": 536870912}}}
        }))
        .unwrap();
        assert_eq!(
            p.process.user,
            Some(User::Id {
                uid: 1000,
                gid: 100
            })
        );
        assert_eq!(
            p.process.pty,
            Some(TermSize {
                rows: 50,
                cols: 132
            })
        );
        assert!(!p.process.stdin);
        assert_eq!(p.root, PathBuf::from("/abs/root"));
        assert!(p.root_readonly);
        assert_eq!((p.cpus, p.memory_mib), (Some(2), Some(512)));
    }

    #[test]
    fn a_pods_summed_limits_size_its_sandbox() {
        // The pause container of a pod with two containers (1.5 + 0.25 CPU, 256 + 128 MiB):
        // its own spec has no limits, the annotations have the pod's.
        let p = plan_of(serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-cpu-quota": "175000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-cpu-shares": "1792",
            "io.kubernetes.cri.sandbox-memory": "402653184"
        }}))
        .unwrap();
        assert_eq!((p.cpus, p.memory_mib), (Some(2), Some(384)));
        // They win over the container's own limits; empty and unlimited values are no limit.
        let p = plan_of(serde_json::json!({
            "annotations": {"io.kubernetes.cri.sandbox-cpu-quota": "-1",
                            "io.kubernetes.cri.sandbox-cpu-period": "100000",
                            "io.kubernetes.cri.sandbox-memory": "1073741824"},
            "linux": {"resources": {"cpu": {"quota": 300000, "period": 100000},
                                     "memory": {"limit": 536870912}}}
        }))
        .unwrap();
        assert_eq!((p.cpus, p.memory_mib), (Some(3), Some(1024)));
        let p = plan_of(serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-cpu-quota": "",
            "io.kubernetes.cri.sandbox-memory": "0"
        }}))
        .unwrap();
        assert_eq!((p.cpus, p.memory_mib), (None, None));
        // A pod too small for a sandbox, and values that are not numbers, are refused.
        let e = plan_of(serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-memory": "33554432"
        }}))
        .unwrap_err();
        assert!(e.0.contains("the pod's memory limit 33554432 bytes"), "{e}");
        let e = plan_of(serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-cpu-quota": "lots",
            "io.kubernetes.cri.sandbox-cpu-period": "100000"
        }}))
        .unwrap_err();
        assert!(e.0.contains("io.kubernetes.cri.sandbox-cpu-quota"), "{e}");
    }

    #[test]
    fn bind_mounts_become_volumes() {
        let dir = std::env::temp_dir();
        let p = plan_of(serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": dir, "options": ["rbind", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/no/such/file", "options": ["rbind"]}
        ]}))
        .unwrap();
        assert_eq!(
            p.binds,
            vec![Bind {
                host: dir,
                guest: "/data".into(),
                read_only: true
            }]
        );
    }

    #[test]
    fn what_we_cannot_do_is_refused_by_name() {
        let cases = [
            (
                serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}}),
                "host networking",
            ),
            (
                serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}}),
                "joining an existing",
            ),
            (
                serde_json::json!({"linux": {"devices": [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}]}}),
                "device /dev/kvm",
            ),
            (
                serde_json::json!({"annotations": {"io.msb-vmm.bogus": "1"}}),
                "io.msb-vmm.bogus: unknown",
            ),
            (
                serde_json::json!({"annotations": {"io.msb-vmm.network.allow": "tcp:host:notaport"}}),
                "network",
            ),
            (serde_json::json!({"process": {"args": []}}), "no args"),
            (serde_json::json!({"process": {"cwd": "rel"}}), "cwd rel"),
            (
                serde_json::json!({"process": {"env": ["NOEQUALS"]}}),
                "NOEQUALS",
            ),
            (
                serde_json::json!({"process": {"rlimits": [{"type": "RLIMIT_RTPRIO", "hard": 1, "soft": 1}]}}),
                "RlimitRtprio",
            ),
            (
                serde_json::json!({"linux": {"resources": {"memory": {"limit": 1048576}}}}),
                "at least 64 MiB",
            ),
            (
                serde_json::json!({"mounts": [{"destination": "/x", "type": "nfs", "source": "h:/x"}]}),
                "mount type \"nfs\"",
            ),
            (
                serde_json::json!({"mounts": [{"destination": "/x", "type": "bind", "source": "rel", "options": ["rbind"]}]}),
                "absolute host path",
            ),
        ];
        for (extra, want) in cases {
            let e = plan_of(extra.clone()).expect_err(&extra.to_string());
            assert!(e.0.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn network_annotations_make_the_policy() {
        let p = plan_of(serde_json::json!({"annotations": {
            "io.msb-vmm.network.preset": "none",
            "io.msb-vmm.network.allow": "tcp:example.com:443, 10.0.0.0/8",
            "io.msb-vmm.network.deny": "metadata",
            "io.kubernetes.cri.sandbox-id": "pod"
        }}))
        .unwrap();
        assert_eq!(p.policy.net.as_deref(), Some("none"));
        assert_eq!(p.policy.allow, vec!["tcp:example.com:443", "10.0.0.0/8"]);
        assert_eq!(p.policy.deny, vec!["metadata"]);
        assert_eq!(p.pod.as_deref(), Some("pod"));
    }
}
