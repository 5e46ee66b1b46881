//! A sandbox's egress policy, secrets and audit log from the words users give: the CLI's
//! flags and the Python SDK's arguments go through the same functions, so both accept the
//! same rules and print the same one-line errors.

use std::path::Path;

use msb_netstack::policy::{Action, Policy, Preset, SecretSpec};
use msb_netstack::secrets::Secret;
use thiserror::Error;

/// A bad preset, rule, policy file, secret or audit-log path: one line naming it.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct NetConfError(pub String);

/// The policy words: a preset, rules to allow and deny, and a policy file's text (read by the
/// caller: a sandbox process applying a live change may not see the caller's files).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PolicyFlags {
    pub net: Option<String>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// The file's name (for messages) and text.
    pub file: Option<(String, String)>,
}

/// The policy the flags describe: preset `public` unless the file or `net` says otherwise,
/// then the file's rules, `deny` and `allow`.
pub fn policy_from(f: &PolicyFlags) -> Result<Policy, NetConfError> {
    let mut policy = Policy::preset(Preset::Public);
    if let Some((name, text)) = &f.file {
        policy
            .merge_file(name, text)
            .map_err(|e| NetConfError(format!("--policy {e}")))?;
    }
    if let Some(p) = &f.net {
        policy.preset = Preset::parse(p).map_err(|e| NetConfError(format!("--net: {e}")))?;
    }
    for r in &f.deny {
        policy
            .add_flag(Action::Deny, r)
            .map_err(|e| NetConfError(e.to_string()))?;
    }
    for r in &f.allow {
        policy
            .add_flag(Action::Allow, r)
            .map_err(|e| NetConfError(e.to_string()))?;
    }
    Ok(policy)
}

/// Whether a policy leaves the guest with no network at all (`none` with nothing allowed):
/// then, unless ports are published, the sandbox gets no network card.
pub fn airgapped(policy: &Policy) -> bool {
    policy.preset == Preset::None && !policy.rules.iter().any(|r| r.action == Action::Allow)
}

/// The secret a policy file's `[[secret]]` table names: its value from the table's file (one
/// trailing newline dropped), else from the environment variable of its name.
pub fn policy_secret(spec: &SecretSpec) -> Result<Secret, NetConfError> {
    let value = match &spec.file {
        Some(path) => read_secret_file(Path::new(path)).map_err(|e| {
            NetConfError(format!(
                "{}: secret {}: {path}: {e}",
                spec.origin, spec.name
            ))
        })?,
        None => env_secret(&spec.name).ok_or_else(|| {
            NetConfError(format!(
                "{}: secret {}: the environment variable {} is not set (export it, or give the table a file)",
                spec.origin, spec.name, spec.name
            ))
        })?,
    };
    Secret::new(&spec.name, value, &spec.hosts.join(","))
        .map_err(|e| NetConfError(format!("{}: {e}", spec.origin)))
}

/// A secret file's bytes without the line end editors add.
pub fn read_secret_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = std::fs::read(path)?;
    while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        v.pop();
    }
    Ok(v)
}

/// The value of environment variable `name`, as bytes.
pub fn env_secret(name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    std::env::var_os(name).map(|v| v.into_vec())
}

/// An audit-log hook appending one JSON object per line to `path`, each line in one write (so
/// lines from concurrent sandboxes appending to one file never interleave). A new file is the
/// owner's only: it names every host the guest reached.
pub fn audit_log(path: &Path) -> Result<msb_netstack::stack::LogHook, NetConfError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| NetConfError(format!("--net-log {}: {e}", path.display())))?;
    let file = std::sync::Mutex::new(file);
    Ok(std::sync::Arc::new(
        move |e: &msb_netstack::stack::LogEvent| {
            if let Ok(mut line) = serde_json::to_vec(e) {
                line.push(b'\n');
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(err) = std::io::Write::write_all(&mut *f, &line) {
                    tracing::warn!("--net-log: {err}");
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_build_the_policy_and_name_bad_rules() {
        let p = policy_from(&PolicyFlags {
            net: Some("none".into()),
            allow: vec!["example.com:443".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.preset, Preset::None);
        assert!(!airgapped(&p));
        let e = policy_from(&PolicyFlags {
            deny: vec!["exa mple".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("exa mple"), "{e}");
        let e = policy_from(&PolicyFlags {
            net: Some("everything".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.starts_with("--net: "), "{e}");
        assert!(airgapped(&Policy::preset(Preset::None)));
    }

    #[test]
    fn secret_files_lose_their_line_end() {
        let d = std::env::temp_dir().join(format!("msb-netconf-{}", std::process::id()));
        std::fs::write(&d, b"s3cret\r\n").unwrap();
        assert_eq!(read_secret_file(&d).unwrap(), b"s3cret");
        std::fs::remove_file(&d).unwrap();
    }
}
