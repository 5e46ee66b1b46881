//! Helpers shared by the image crate's host-tier tests: a temporary directory, the reference
//! registry on loopback (optionally behind htpasswd), OCI layouts built from tars in memory.

#![allow(dead_code)] // each test binary uses its own share of these

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msb_image::PullOptions;
use sha2::{Digest, Sha256};

pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: apt-get install docker-registry skopeo zstd (./x test installs them)"
    );
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("msb-image-it-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The reference registry on 127.0.0.1, killed when dropped.
pub struct Registry {
    child: Child,
    pub addr: String,
    data: PathBuf,
    /// `user:password` for pushing, when the registry asks for one.
    creds: Option<String>,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::start_with_user(dir, None)
    }

    /// With `Some((user, password))`, the registry takes only that user (htpasswd, bcrypt),
    /// for reading and pushing alike.
    pub fn start_with_user(dir: &Path, user: Option<(&str, &str)>) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let data = dir.join("registry-data");
        let cfg = dir.join("registry.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{}",
                data.display(),
                match user {
                    Some(_) => format!(
                        "auth:\n  htpasswd:\n    realm: msb-test\n    path: {}\n",
                        dir.join("htpasswd").display()
                    ),
                    None => String::new(),
                }
            ),
        )
        .unwrap();
        if let Some((name, password)) = user {
            // The registry reads bcrypt only; libxcrypt makes it (Python's crypt module).
            let out = Command::new("python3")
                .args(["-W", "ignore", "-c"])
                .arg("import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))")
                .arg(password)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "bcrypt: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let hash = String::from_utf8(out.stdout).unwrap();
            fs::write(dir.join("htpasswd"), format!("{name}:{}\n", hash.trim())).unwrap();
        }
        let child = Command::new(tool("docker-registry"))
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            addr,
            data,
            creds: user.map(|(u, p)| format!("{u}:{p}")),
        }
    }

    /// Pushes `oci:LAYOUT:TAG` as `REPO:TAG`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        self.push_with(layout, tag, repo, &[]);
    }

    /// Pushes with extra `skopeo copy` arguments (say, recompression).
    pub fn push_with(&self, layout: &Path, tag: &str, repo: &str, extra: &[&str]) {
        let mut cmd = Command::new(tool("skopeo"));
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra);
        if let Some(c) = &self.creds {
            cmd.arg("--dest-creds").arg(c);
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The registry's stored copy of blob `digest`.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tar entry: name written raw, kind, mode, data or link target, device numbers.
pub struct E<'a>(
    pub &'a str,
    pub tar::EntryType,
    pub u32,
    pub &'a [u8],
    pub (u32, u32),
);

pub fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for E(name, kind, mode, data, dev) in entries {
        let mut h = tar::Header::new_ustar();
        let is_link = matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link);
        {
            let raw = h.as_ustar_mut().unwrap();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            if is_link {
                raw.linkname[..data.len()].copy_from_slice(data);
            }
        }
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let body: &[u8] = if is_link { b"" } else { data };
        h.set_size(body.len() as u64);
        if *dev != (0, 0) {
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
        }
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Writes an OCI layout at `dir` holding one image tagged `tag` with `layers` (uncompressed
/// tars, stored gzipped) and this config; returns the layer blob digests.
pub fn layout(
    dir: &Path,
    tag: &str,
    arch: &str,
    layers: &[Vec<u8>],
    extra: serde_json::Value,
) -> Vec<String> {
    layout_as(dir, tag, arch, layers, extra, Layer::Gzip)
}

/// How a layout's layers are stored.
#[derive(Clone, Copy)]
pub enum Layer {
    Gzip,
    /// Compressed by the reference `zstd` tool (Debian's zstd package).
    Zstd,
}

/// `layer` through `zstd -3`, the reference implementation (not the crate that decodes it).
pub fn zstd(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool("zstd"))
        .args(["-3", "-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// As [`layout`], with the layers stored as `how` says.
pub fn layout_as(
    dir: &Path,
    tag: &str,
    arch: &str,
    layers: &[Vec<u8>],
    extra: serde_json::Value,
    how: Layer,
) -> Vec<String> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = digest(data);
        fs::write(blobs.join(d.strip_prefix("sha256:").unwrap()), data).unwrap();
        (d, data.len())
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(digest(l));
        let (blob, media) = match how {
            Layer::Gzip => (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip"),
            Layer::Zstd => (zstd(l), "application/vnd.oci.image.layer.v1.tar+zstd"),
        };
        let (d, n) = put(&blob);
        descs.push(serde_json::json!({ "mediaType": media, "digest": d, "size": n }));
    }
    let mut cfg = serde_json::json!({
        "architecture": arch, "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "config": extra,
    });
    if cfg["config"].is_null() {
        cfg["config"] = serde_json::json!({});
    }
    let (cd, cn) = put(&serde_json::to_vec(&cfg).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn },
        "layers": descs,
    });
    let (md, mn) = put(&serde_json::to_vec(&manifest).unwrap());
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
            "annotations": { "org.opencontainers.image.ref.name": tag }
        }]
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    descs
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect()
}

pub fn host_arch() -> &'static str {
    msb_image::host_platform().1
}

use tar::EntryType as T;

/// A busybox-like image whose upper layer deletes files, makes a directory opaque, replaces a
/// directory by a file, and adds hard links, symlinks, a setuid file and a device node.
pub fn test_layers() -> Vec<Vec<u8>> {
    let lower = tar_of(&[
        E("bin/", T::Directory, 0o755, b"", (0, 0)),
        E("bin/busybox", T::Regular, 0o755, b"\x7fELF busybox", (0, 0)),
        E("etc/", T::Directory, 0o755, b"", (0, 0)),
        E(
            "etc/passwd",
            T::Regular,
            0o644,
            b"root:x:0:0::/root:/bin/sh\n",
            (0, 0),
        ),
        E("etc/motd", T::Regular, 0o644, b"old motd\n", (0, 0)),
        E("var/cache/", T::Directory, 0o755, b"", (0, 0)),
        E("var/cache/a", T::Regular, 0o644, b"a", (0, 0)),
        E("opt/app/", T::Directory, 0o755, b"", (0, 0)),
        E("opt/app/lib", T::Regular, 0o644, b"lib", (0, 0)),
    ]);
    let upper = tar_of(&[
        E("etc/.wh.motd", T::Regular, 0o644, b"", (0, 0)),
        E("var/cache/.wh..wh..opq", T::Regular, 0o644, b"", (0, 0)),
        E("var/cache/b", T::Regular, 0o644, b"b", (0, 0)),
        E("opt/.wh.app", T::Regular, 0o644, b"", (0, 0)),
        E("opt/app", T::Regular, 0o644, b"now a file", (0, 0)),
        E("bin/sh", T::Symlink, 0o777, b"busybox", (0, 0)),
        E("bin/ls", T::Link, 0o755, b"bin/busybox", (0, 0)),
        E("bin/su", T::Regular, 0o4755, b"setuid", (0, 0)),
        E("dev/", T::Directory, 0o755, b"", (0, 0)),
        E("dev/null", T::Char, 0o666, b"", (1, 3)),
    ]);
    vec![lower, upper]
}

pub fn stat_of(p: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os,sys; print(os.getxattr(sys.argv[1], 'user.msb.stat', follow_symlinks=False).decode())")
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn opts() -> PullOptions {
    PullOptions::default()
}

pub fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.count())
}
