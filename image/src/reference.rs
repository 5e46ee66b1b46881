//! Where an image comes from: a registry reference, an OCI image layout or a docker archive.
//!
//! The rule that tells them apart (and, in the CLI, from a root directory):
//! - `oci:DIR[:TAG]` is an OCI image layout directory (`skopeo copy ... oci:DIR:TAG` writes one);
//! - `docker-archive:FILE[:TAG]` is `docker save` output;
//! - anything else is a registry reference, `[REGISTRY/]REPO[:TAG][@DIGEST]`, with Docker's
//!   defaults (`debian` is `docker.io/library/debian:latest`).
//!
//! A path that starts with `/`, `./`, `../` or `~`, or is `.`, is a directory, never an image
//! ([`looks_like_path`]).

use std::path::{Path, PathBuf};

use oci_client::Reference;

use crate::ImageError;

/// An image source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Registry(Reference),
    OciLayout { dir: PathBuf, tag: Option<String> },
    DockerArchive { file: PathBuf, tag: Option<String> },
}

impl Source {
    /// Parses what a user typed.
    pub fn parse(s: &str) -> Result<Source, ImageError> {
        let bad = |why: &str| ImageError::BadReference(s.to_string(), why.to_string());
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split_tag(rest);
            if dir.is_empty() {
                return Err(bad("oci: needs a directory (oci:DIR[:TAG])"));
            }
            return Ok(Source::OciLayout {
                dir: absolute(Path::new(dir)),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, tag) = split_tag(rest);
            if file.is_empty() {
                return Err(bad(
                    "docker-archive: needs a file (docker-archive:FILE[:TAG])",
                ));
            }
            return Ok(Source::DockerArchive {
                file: absolute(Path::new(file)),
                tag,
            });
        }
        if looks_like_path(s) {
            return Err(bad(
                "a path, not an image (use oci:DIR for an image layout)",
            ));
        }
        let r: Reference = s.parse().map_err(|e| bad(&format!("{e}")))?;
        Ok(Source::Registry(r))
    }

    /// The name the store keys this image by: the full registry reference, or the source with
    /// an absolute path.
    pub fn name(&self) -> String {
        match self {
            Source::Registry(r) => r.whole(),
            Source::OciLayout { dir, tag } => match tag {
                Some(t) => format!("oci:{}:{t}", dir.display()),
                None => format!("oci:{}", dir.display()),
            },
            Source::DockerArchive { file, tag } => match tag {
                Some(t) => format!("docker-archive:{}:{t}", file.display()),
                None => format!("docker-archive:{}", file.display()),
            },
        }
    }
}

/// True when `s` is written as a path: the CLI treats it as a root directory.
pub fn looks_like_path(s: &str) -> bool {
    s == "."
        || s == ".."
        || s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
}

/// `PATH[:TAG]`: the tag is what follows the last `:` when it holds no `/`.
fn split_tag(s: &str) -> (&str, Option<String>) {
    match s.rsplit_once(':') {
        Some((p, t)) if !t.is_empty() && !t.contains('/') => (p, Some(t.to_string())),
        _ => (s, None),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_defaults_and_local_sources() {
        let Source::Registry(r) = Source::parse("debian").unwrap() else {
            panic!()
        };
        assert_eq!(r.whole(), "docker.io/library/debian:latest");
        let Source::Registry(r) = Source::parse("127.0.0.1:5000/test/debian:12").unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "test/debian", Some("12"))
        );
        assert_eq!(
            Source::parse("oci:/tmp/layout:v1").unwrap(),
            Source::OciLayout {
                dir: "/tmp/layout".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Source::parse("docker-archive:/tmp/a.tar").unwrap(),
            Source::DockerArchive {
                file: "/tmp/a.tar".into(),
                tag: None
            }
        );
        for bad in ["./root", "/srv/root", "oci:", "Debian", "a b", "x:tag!"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
        assert!(looks_like_path("./x") && looks_like_path("/x") && !looks_like_path("debian"));
    }
}
