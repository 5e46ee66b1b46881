//! Host tier: a real registry on loopback (Debian's `docker-registry`, the reference
//! implementation), images pushed into it with `skopeo` from OCI layouts this test builds, and
//! pulled with msb-image: verification, unpacking, whiteouts, special files, resumed and
//! tampered downloads, a refusing registry, another platform, and a `docker save` archive.
//!
//! Needs `docker-registry`, `skopeo` (Debian packages of those names); fails naming them when
//! they are missing.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msb_image::{ImageError, PullOptions, Source, Store};
use sha2::{Digest, Sha256};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: apt-get install docker-registry skopeo (./x test installs them)"
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
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
struct Registry {
    child: Child,
    addr: String,
    data: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
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
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                data.display()
            ),
        )
        .unwrap();
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
        Registry { child, addr, data }
    }

    /// Pushes `oci:LAYOUT:TAG` as `REPO:TAG`.
    fn push(&self, layout: &Path, tag: &str, repo: &str) {
        let out = Command::new(tool("skopeo"))
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
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
    fn blob_file(&self, digest: &str) -> PathBuf {
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
struct E<'a>(&'a str, tar::EntryType, u32, &'a [u8], (u32, u32));

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
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

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Writes an OCI layout at `dir` holding one image tagged `tag` with `layers` (uncompressed
/// tars, stored gzipped) and this config; returns the layer blob digests.
fn layout(
    dir: &Path,
    tag: &str,
    arch: &str,
    layers: &[Vec<u8>],
    extra: serde_json::Value,
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
        let (d, n) = put(&gzip(l));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n
        }));
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

fn host_arch() -> &'static str {
    msb_image::host_platform().1
}

use tar::EntryType as T;

/// A busybox-like image whose upper layer deletes files, makes a directory opaque, replaces a
/// directory by a file, and adds hard links, symlinks, a setuid file and a device node.
fn test_layers() -> Vec<Vec<u8>> {
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

fn stat_of(p: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os,sys; print(os.getxattr(sys.argv[1], 'user.msb.stat', follow_symlinks=False).decode())")
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn opts() -> PullOptions {
    PullOptions::default()
}

fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn pull_verify_unpack_and_merge_from_a_loopback_registry() {
    let t = TempDir::new("pull");
    let reg = Registry::start(&t.0);
    let layout_dir = t.0.join("layout");
    let layer_blobs = layout(
        &layout_dir,
        "1",
        host_arch(),
        &test_layers(),
        serde_json::json!({ "Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/opt", "User": "1000:1000", "Cmd": ["/bin/sh"] }),
    );
    reg.push(&layout_dir, "1", "test/busy");
    let store = Store::open(t.0.join("store")).unwrap();
    let name = format!("{}/test/busy:1", reg.addr);
    let rec = msb_image::pull(&store, &Source::parse(&name).unwrap(), &opts()).unwrap();
    assert_eq!(rec.name, name);
    assert_eq!(rec.diff_ids.len(), 2);
    assert_eq!(rec.config.env, ["PATH=/bin", "GREETING=hi"]);
    assert_eq!(rec.config.working_dir.as_deref(), Some("/opt"));
    assert_eq!(rec.config.user.as_deref(), Some("1000:1000"));
    let root = store.root(&rec).unwrap();
    assert!(!root.join("etc/motd").exists(), "whiteout applied");
    assert!(root.join("etc/passwd").exists());
    assert_eq!(
        fs::read_dir(root.join("var/cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>(),
        ["b"],
        "opaque directory"
    );
    assert_eq!(fs::read(root.join("opt/app")).unwrap(), b"now a file");
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(root.join("bin/ls")).unwrap().ino(),
        fs::metadata(root.join("bin/busybox")).unwrap().ino()
    );
    assert_eq!(stat_of(&root.join("bin/su")), "0:0:0104755");
    assert_eq!(stat_of(&root.join("dev/null")), "0:0:020666:259");
    assert!(
        fs::metadata(root.join("dev/null")).unwrap().is_file(),
        "no device node on the host"
    );
    assert_eq!(store.list().len(), 1);
    assert_eq!(
        files_in(&store.tmp()),
        0,
        "no download or staging left behind"
    );

    // A second pull of the same image fetches no layer again and gives the same record.
    let again = msb_image::pull(&store, &Source::parse(&name).unwrap(), &opts()).unwrap();
    assert_eq!(
        (again.config_digest, again.diff_ids),
        (rec.config_digest.clone(), rec.diff_ids.clone())
    );

    // An interrupted download is resumed: a partial file with the right first half completes.
    let store2 = Store::open(t.0.join("store2")).unwrap();
    let blob = fs::read(reg.blob_file(&layer_blobs[1])).unwrap();
    let partial = store2.tmp().join(format!(
        "blob-{}.partial",
        layer_blobs[1].strip_prefix("sha256:").unwrap()
    ));
    fs::write(&partial, &blob[..blob.len() / 2]).unwrap();
    msb_image::pull(&store2, &Source::parse(&name).unwrap(), &opts()).unwrap();
    assert!(!partial.exists());
    // ...and resumed for real: wrong first bytes kept from before fail the digest check,
    // leave nothing behind, and the next pull starts over and succeeds.
    let store3 = Store::open(t.0.join("store3")).unwrap();
    let partial3 = store3.tmp().join(partial.file_name().unwrap());
    fs::write(&partial3, vec![0u8; blob.len() / 2]).unwrap();
    let err = msb_image::pull(&store3, &Source::parse(&name).unwrap(), &opts()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    assert!(!partial3.exists());
    assert!(!store3.has_layer(&rec.diff_ids[1]));
    msb_image::pull(&store3, &Source::parse(&name).unwrap(), &opts()).unwrap();
    assert!(store3.has_layer(&rec.diff_ids[1]));
}

#[test]
fn tampered_refused_and_foreign_images_fail_cleanly() {
    let t = TempDir::new("bad");
    let reg = Registry::start(&t.0);
    let layout_dir = t.0.join("layout");
    let blobs = layout(
        &layout_dir,
        "1",
        host_arch(),
        &test_layers(),
        serde_json::Value::Null,
    );
    reg.push(&layout_dir, "1", "test/tampered");
    // The registry now serves a corrupt layer under the right digest.
    let f = reg.blob_file(&blobs[0]);
    let mut data = fs::read(&f).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    fs::write(&f, &data).unwrap();
    let store = Store::open(t.0.join("store")).unwrap();
    let name = format!("{}/test/tampered:1", reg.addr);
    let err = msb_image::pull(&store, &Source::parse(&name).unwrap(), &opts()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(!store.has_layer(&digest(&test_layers()[0])));
    assert!(store.list().is_empty());

    // An image for another architecture only.
    let other = if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    let foreign = t.0.join("foreign");
    layout(
        &foreign,
        "1",
        other,
        &test_layers(),
        serde_json::Value::Null,
    );
    reg.push(&foreign, "1", "test/foreign");
    let name = format!("{}/test/foreign:1", reg.addr);
    let err = msb_image::pull(&store, &Source::parse(&name).unwrap(), &opts()).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform(..)), "{err}");

    // A tag that is not there, and a registry that is not there.
    let err = msb_image::pull(
        &store,
        &Source::parse(&format!("{}/test/missing:1", reg.addr)).unwrap(),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Registry { .. }), "{err}");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = msb_image::pull(
        &store,
        &Source::parse(&format!("{closed}/test/x:1")).unwrap(),
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(store.list().is_empty());
    assert_eq!(files_in(&store.tmp()), 0);
    // The untampered layer, downloaded alongside, is whole and verified: it may stay.
    for e in fs::read_dir(store.path().join("layers")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            digest(&test_layers()[1]).ends_with(name.trim_end_matches(".json")),
            "only whole, verified layers are kept: {name}"
        );
    }
}

#[test]
fn oci_layouts_and_docker_archives_share_layers() {
    let t = TempDir::new("local");
    let layout_dir = t.0.join("layout");
    layout(
        &layout_dir,
        "v1",
        host_arch(),
        &test_layers(),
        serde_json::json!({ "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"] }),
    );
    let archive = t.0.join("image.tar");
    let out = Command::new(tool("skopeo"))
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:v1", layout_dir.display()))
        .arg(format!("docker-archive:{}:test/busy:v1", archive.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(t.0.join("store")).unwrap();
    let a = msb_image::pull(
        &store,
        &Source::parse(&format!("oci:{}:v1", layout_dir.display())).unwrap(),
        &opts(),
    )
    .unwrap();
    assert_eq!(a.config.argv(&[]), ["/bin/sh", "-c", "echo hi"]);
    let b = msb_image::pull(
        &store,
        &Source::parse(&format!("docker-archive:{}", archive.display())).unwrap(),
        &opts(),
    )
    .unwrap();
    assert_eq!(a.diff_ids, b.diff_ids, "the same layers, unpacked once");
    assert_eq!(
        files_in(&store.path().join("layers")),
        4,
        "two layers and their size files"
    );
    assert_eq!(store.list().len(), 2);
    // rmi keeps shared layers; prune frees them once no image uses them.
    store.remove(&a.name).unwrap();
    assert_eq!(store.prune().unwrap().1, 0);
    store.remove(&b.name).unwrap();
    assert_eq!(store.prune().unwrap().1, 2);
    assert!(matches!(
        store.remove(&b.name),
        Err(ImageError::NotPulled(_))
    ));
    // A layout whose blob was altered after it was written is refused.
    let (_, layer) = fs::read_dir(layout_dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (fs::metadata(&p).unwrap().len(), p)
        })
        .max()
        .unwrap();
    let mut data = fs::read(&layer).unwrap();
    data[10] ^= 1;
    fs::write(&layer, data).unwrap();
    let err = msb_image::pull(
        &store,
        &Source::parse(&format!("oci:{}:v1", layout_dir.display())).unwrap(),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
}
