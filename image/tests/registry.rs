//! Host tier: a real registry on loopback (Debian's `docker-registry`, the reference
//! implementation), images pushed into it with `skopeo` from OCI layouts this test builds, and
//! pulled with msb-image: verification, unpacking, whiteouts, special files, resumed and
//! tampered downloads, a refusing registry, another platform, and a `docker save` archive.
//!
//! Needs `docker-registry`, `skopeo` (Debian packages of those names); fails naming them when
//! they are missing.

mod support;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use msb_image::{ImageError, Source, Store};
use support::*;

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

#[test]
fn zstd_layers_pull_as_gzip_ones_do() {
    let t = TempDir::new("zstd");
    let reg = Registry::start(&t.0);
    let layout_dir = t.0.join("layout");
    let blobs = layout_as(
        &layout_dir,
        "1",
        host_arch(),
        &test_layers(),
        serde_json::Value::Null,
        Layer::Zstd,
    );
    assert!(
        fs::read(layout_dir.join("blobs/sha256").join(&blobs[0][7..]))
            .unwrap()
            .starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
        "a zstd frame"
    );
    reg.push(&layout_dir, "1", "test/zstd");
    let store = Store::open(t.0.join("store")).unwrap();
    let name = format!("{}/test/zstd:1", reg.addr);
    let rec = msb_image::pull(&store, &Source::parse(&name).unwrap(), &opts()).unwrap();
    // The same layers as the gzip image's: diff ids name the uncompressed tars.
    let layers = test_layers();
    assert_eq!(rec.diff_ids, [digest(&layers[0]), digest(&layers[1])]);
    let root = store.root(&rec).unwrap();
    assert!(!root.join("etc/motd").exists(), "whiteout applied");
    assert_eq!(fs::read(root.join("opt/app")).unwrap(), b"now a file");
    assert_eq!(stat_of(&root.join("dev/null")), "0:0:020666:259");

    // A zstd stream cut short (its blob digest made to match) fails as corrupt, not as a
    // smaller layer, and leaves nothing behind.
    let cut = t.0.join("cut");
    layout_as(
        &cut,
        "1",
        host_arch(),
        &[layers[0].clone()],
        serde_json::Value::Null,
        Layer::Zstd,
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(cut.join("index.json")).unwrap()).unwrap();
    let blob_path = |d: &str| {
        cut.join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let md = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob_path(&md)).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let data = fs::read(blob_path(&layer)).unwrap();
    let short = &data[..data.len() - 9];
    fs::write(blob_path(&digest(short)), short).unwrap();
    manifest["layers"][0]["digest"] = digest(short).into();
    manifest["layers"][0]["size"] = short.len().into();
    let m = serde_json::to_vec(&manifest).unwrap();
    fs::write(blob_path(&digest(&m)), &m).unwrap();
    let mut index = index;
    index["manifests"][0]["digest"] = digest(&m).into();
    index["manifests"][0]["size"] = m.len().into();
    fs::write(cut.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let store2 = Store::open(t.0.join("store2")).unwrap();
    let err = msb_image::pull(
        &store2,
        &Source::parse(&format!("oci:{}:1", cut.display())).unwrap(),
        &opts(),
    )
    .unwrap_err();
    eprintln!("cut zstd layer: {err}");
    assert!(
        err.to_string().contains(&cut.display().to_string()),
        "{err}"
    );
    assert!(store2.list().is_empty());
    assert_eq!(files_in(&store2.tmp()), 0);
    assert_eq!(files_in(&store2.path().join("layers")), 0);
}
