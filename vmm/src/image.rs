//! OCI images as sandbox roots: the image store in the cache (`msb-image`), pulled on first
//! use, and an image's run settings applied to a command as `docker run` applies them.

use std::path::PathBuf;

pub use msb_image::{
    looks_like_path, ImageError, ImageRecord, PullOptions, RunConfig, Source, Store,
};
use msb_init::agent::{ExecRequest, User};

/// The image store: `CACHE/images`.
pub fn store() -> Result<Store, ImageError> {
    Store::open(crate::assets::cache_dir().join("images"))
}

/// The record and merged root of image `name`, pulling it when the store lacks it.
pub fn resolve(name: &str, opts: &PullOptions) -> Result<(ImageRecord, PathBuf), ImageError> {
    let s = store()?;
    let rec = msb_image::get_or_pull(&s, name, opts)?;
    let root = s.root(&rec)?;
    Ok((rec, root))
}

/// An image's `User` (`NAME`, `UID`, `UID:GID`, `NAME:GROUP`) as the agent takes it.
fn user_of(u: &str) -> User {
    match u.split_once(':') {
        Some((a, b)) => match (a.parse(), b.parse()) {
            (Ok(uid), Ok(gid)) => User::Id { uid, gid },
            // A group by name is not expressible: the user's own groups apply.
            _ => User::Name(a.to_string()),
        },
        None => User::Name(u.to_string()),
    }
}

/// Applies an image's settings to `req` where the caller left them unset: its `Env` under
/// the caller's variables, `WorkingDir`, `User`; with `entrypoint`, the command becomes
/// `Entrypoint + (the caller's argv, or Cmd)` (for `run`; `exec` into a running sandbox
/// keeps the caller's argv, as `docker exec` does).
pub fn apply(
    image: &str,
    cfg: &RunConfig,
    req: &mut ExecRequest,
    entrypoint: bool,
) -> Result<(), ImageError> {
    if entrypoint {
        let mut argv: Vec<Vec<u8>> = cfg
            .entrypoint
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if req.argv.is_empty() {
            argv.extend(cfg.cmd.iter().map(|s| s.as_bytes().to_vec()));
        } else {
            argv.append(&mut req.argv);
        }
        if argv.is_empty() {
            return Err(ImageError::BadImage {
                image: image.to_string(),
                why: "the image has no Entrypoint or Cmd: give a command".into(),
            });
        }
        req.argv = argv;
    }
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = cfg
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    for (k, v) in req.env.drain(..) {
        match env.iter_mut().find(|(ek, _)| *ek == k) {
            Some(e) => e.1 = v,
            None => env.push((k, v)),
        }
    }
    req.env = env;
    if req.workdir.is_none() {
        req.workdir = cfg.working_dir.as_ref().map(|w| w.as_bytes().to_vec());
    }
    if req.user.is_none() {
        req.user = cfg.user.as_deref().map(user_of);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_settings_apply_as_docker_run_does() {
        let cfg = RunConfig {
            env: vec!["PATH=/usr/local/bin:/usr/bin".into(), "LANG=C.UTF-8".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--serve".into()],
            working_dir: Some("/app".into()),
            user: Some("1000:1000".into()),
        };
        let mut req = crate::sandbox::request(Vec::<&str>::new());
        req.env.push((b"LANG".to_vec(), b"en".to_vec()));
        apply("img", &cfg, &mut req, true).unwrap();
        assert_eq!(req.argv, [b"/entry".to_vec(), b"--serve".to_vec()]);
        assert_eq!(
            req.env,
            [
                (b"PATH".to_vec(), b"/usr/local/bin:/usr/bin".to_vec()),
                (b"LANG".to_vec(), b"en".to_vec())
            ]
        );
        assert_eq!(req.workdir.as_deref(), Some(&b"/app"[..]));
        assert_eq!(
            req.user,
            Some(User::Id {
                uid: 1000,
                gid: 1000
            })
        );

        // A given command replaces Cmd, not the Entrypoint; given -w and -u win.
        let mut req = crate::sandbox::request(["x"]);
        req.workdir = Some(b"/w".to_vec());
        req.user = Some(User::Name("root".into()));
        apply("img", &cfg, &mut req, true).unwrap();
        assert_eq!(req.argv, [b"/entry".to_vec(), b"x".to_vec()]);
        assert_eq!(req.workdir.as_deref(), Some(&b"/w"[..]));
        assert_eq!(req.user, Some(User::Name("root".into())));

        // exec keeps its argv; nothing to run is an error naming the fix.
        let mut req = crate::sandbox::request(["ls"]);
        apply("img", &cfg, &mut req, false).unwrap();
        assert_eq!(req.argv, [b"ls".to_vec()]);
        let mut req = crate::sandbox::request(Vec::<&str>::new());
        let err = apply("img", &RunConfig::default(), &mut req, true).unwrap_err();
        assert!(err.to_string().contains("give a command"), "{err}");
        assert_eq!(user_of("app"), User::Name("app".into()));
        assert_eq!(user_of("app:staff"), User::Name("app".into()));
    }
}
