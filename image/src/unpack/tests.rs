use std::path::PathBuf;

use super::*;
use crate::merge::merge;

/// A fresh directory under the system temp dir (removed when dropped).
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("msb-image-{tag}-{}-{n}", std::process::id()));
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

/// One tar entry, with its name written raw (so hostile names are possible).
pub(crate) struct E<'a> {
    pub name: &'a str,
    pub kind: tar::EntryType,
    pub mode: u32,
    pub data: &'a [u8],
    pub link: &'a str,
    pub dev: (u32, u32),
}

pub(crate) fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        name,
        kind: tar::EntryType::Regular,
        mode: 0o644,
        data,
        link: "",
        dev: (0, 0),
    }
}

pub(crate) fn dir(name: &str) -> E<'_> {
    E {
        name,
        kind: tar::EntryType::Directory,
        mode: 0o755,
        data: b"",
        link: "",
        dev: (0, 0),
    }
}

pub(crate) fn link<'a>(name: &'a str, kind: tar::EntryType, target: &'a str) -> E<'a> {
    E {
        name,
        kind,
        mode: 0o777,
        data: b"",
        link: target,
        dev: (0, 0),
    }
}

pub(crate) fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        {
            let raw = h.as_ustar_mut().unwrap();
            raw.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
            raw.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(e.data.len() as u64);
        if e.dev != (0, 0) {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

fn stat_of(p: &Path) -> String {
    String::from_utf8(get_xattr(p, STAT_XATTR).unwrap()).unwrap()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[test]
fn a_layer_keeps_its_files_owners_modes_links_and_devices() {
    let mut suid = file("usr/bin/su", b"#!/bin/sh\n");
    suid.mode = 0o4755;
    let mut null = link("dev/null", tar::EntryType::Char, "");
    null.mode = 0o666;
    null.dev = (1, 3);
    let mut fifo = link("run/fifo", tar::EntryType::Fifo, "");
    fifo.mode = 0o600;
    let tar = tar_of(&[
        dir("./"),
        dir("usr/"),
        dir("usr/bin/"),
        suid,
        file("etc/hostname", b"image\n"),
        link("etc/link", tar::EntryType::Symlink, "/etc/hostname"),
        link("etc/hard", tar::EntryType::Link, "etc/hostname"),
        null,
        fifo,
    ]);
    let t = TempDir::new("ok");
    let dest = t.0.join("l");
    mkdir(&dest).unwrap();
    let u = unpack(&tar[..], &dest, Limits::default()).unwrap();
    assert_eq!(u.diff_id, sha(&tar));
    assert_eq!(u.bytes, 16);
    assert_eq!(u.markers, 0, "nothing here needs a merge");
    assert_eq!(stat_of(&dest.join("usr/bin/su")), "0:0:0104755");
    // No setuid bit or device on the host: owner-only plain files.
    let m = fs::metadata(dest.join("usr/bin/su")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777,
        0o600
    );
    assert!(fs::metadata(dest.join("dev/null")).unwrap().is_file());
    assert_eq!(stat_of(&dest.join("dev/null")), "0:0:020666:259");
    assert_eq!(stat_of(&dest.join("run/fifo")), "0:0:010600");
    // Parents the tar never named exist, root-owned 0755 in the guest.
    assert_eq!(stat_of(&dest.join("etc")), "0:0:040755");
    assert_eq!(
        fs::read_link(dest.join("etc/link")).unwrap(),
        Path::new("/etc/hostname")
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(dest.join("etc/hard")).unwrap().ino(),
        fs::metadata(dest.join("etc/hostname")).unwrap().ino()
    );

    // The same layer compressed has the same diff id.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let dest2 = t.0.join("gz");
    mkdir(&dest2).unwrap();
    assert_eq!(
        unpack(&gz[..], &dest2, Limits::default()).unwrap().diff_id,
        u.diff_id
    );
}

#[test]
fn hostile_layers_are_refused_and_write_nothing_outside() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", tar_of(&[file("../escaped", b"x")]), "'..'"),
        (
            "deep-dotdot",
            tar_of(&[file("a/../../escaped", b"x")]),
            "'..'",
        ),
        ("absolute", tar_of(&[file("/escaped", b"x")]), "absolute"),
        (
            "through-symlink",
            tar_of(&[
                link("a", tar::EntryType::Symlink, "/tmp"),
                file("a/escaped", b"x"),
            ]),
            "symlink",
        ),
        (
            "hardlink-out",
            tar_of(&[link("h", tar::EntryType::Link, "../../../etc/passwd")]),
            "'..'",
        ),
        (
            "hardlink-abs",
            tar_of(&[link("h", tar::EntryType::Link, "/etc/passwd")]),
            "absolute",
        ),
        (
            "hardlink-via-symlink",
            tar_of(&[
                link("s", tar::EntryType::Symlink, "/etc"),
                link("h", tar::EntryType::Link, "s/passwd"),
            ]),
            "symlink",
        ),
    ];
    for (what, tar, expect) in cases {
        let t = TempDir::new(what);
        let dest = t.0.join("l");
        mkdir(&dest).unwrap();
        let err = unpack(&tar[..], &dest, Limits::default())
            .expect_err(what)
            .to_string();
        assert!(err.contains(expect), "{what}: {err}");
        assert!(!t.0.join("escaped").exists() && !Path::new("/tmp/escaped").exists());
    }
}

#[test]
fn truncated_and_absurd_layers_are_refused() {
    let tar = tar_of(&[file("big", &[7u8; 4096])]);
    let t = TempDir::new("trunc");
    let dest = t.0.join("l");
    mkdir(&dest).unwrap();
    assert!(unpack(&tar[..1024], &dest, Limits::default()).is_err());
    let dest = t.0.join("small");
    mkdir(&dest).unwrap();
    let limits = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let err = unpack(&tar[..], &dest, limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooBig(1000)), "{err}");
    let dest = t.0.join("few");
    mkdir(&dest).unwrap();
    let limits = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let many = tar_of(&[file("a", b""), file("b", b""), file("c", b"")]);
    assert!(matches!(
        unpack(&many[..], &dest, limits),
        Err(UnpackError::TooManyEntries(2))
    ));
    // A corrupt gzip stream is an error, not a panic.
    let dest = t.0.join("gz");
    mkdir(&dest).unwrap();
    assert!(unpack(&[0x1f, 0x8b, 8, 0, 1, 2, 3][..], &dest, Limits::default()).is_err());
}

#[test]
fn layers_merge_with_whiteouts_and_opaque_directories() {
    let t = TempDir::new("merge");
    let (l1, l2, root) = (t.0.join("l1"), t.0.join("l2"), t.0.join("root"));
    mkdir(&l1).unwrap();
    mkdir(&l2).unwrap();
    let lower = tar_of(&[
        file("a/keep", b"1"),
        file("a/gone", b"2"),
        file("d/old", b"3"),
        file("e/inside", b"4"),
        file("f", b"5"),
    ]);
    let mut private = dir("a/");
    private.mode = 0o700;
    let upper = tar_of(&[
        private,
        file("a/.wh.gone", b""),
        file("d/.wh..wh..opq", b""),
        file("d/new", b"6"),
        file("e", b"now a file"),
        dir("f/"),
        file("f/inside", b"7"),
    ]);
    assert_eq!(
        unpack(&lower[..], &l1, Limits::default()).unwrap().markers,
        0
    );
    assert_eq!(
        unpack(&upper[..], &l2, Limits::default()).unwrap().markers,
        2,
        "a whiteout and an opaque marker"
    );
    merge(&[&l1, &l2], &root).unwrap();
    let names = |d: &str| {
        let mut v: Vec<String> = fs::read_dir(root.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("a"), ["keep"]);
    assert_eq!(names("d"), ["new"]);
    assert_eq!(fs::read(root.join("e")).unwrap(), b"now a file");
    assert_eq!(names("f"), ["inside"]);
    assert_eq!(stat_of(&root.join("a")), "0:0:040700");
    assert_eq!(stat_of(&root), "0:0:040755");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(root.join("a/keep")).unwrap().ino(),
        fs::metadata(l1.join("a/keep")).unwrap().ino(),
        "files are hard links into the layer, not copies"
    );

    // Hard links to a lower layer's file are made in the merged tree; one to a file no
    // lower layer has, or through a lower layer's symlink, fails the merge.
    let l3 = t.0.join("l3");
    mkdir(&l3).unwrap();
    let linked = tar_of(&[link("a/again", tar::EntryType::Link, "a/keep")]);
    assert_eq!(
        unpack(&linked[..], &l3, Limits::default()).unwrap().markers,
        1,
        "a placeholder for a link into a lower layer"
    );
    let root2 = t.0.join("root2");
    merge(&[&l1, &l2, &l3], &root2).unwrap();
    assert_eq!(
        fs::metadata(root2.join("a/again")).unwrap().ino(),
        fs::metadata(l1.join("a/keep")).unwrap().ino()
    );
    for (i, target) in ["nothere", "s/passwd"].iter().enumerate() {
        // A lower layer's symlink and the upper layer's link through it: the unpacker of the
        // upper layer cannot see the symlink, the merge must.
        let l4 = t.0.join(format!("l4-{i}"));
        mkdir(&l4).unwrap();
        let lower = tar_of(&[link("s", tar::EntryType::Symlink, "/etc")]);
        unpack(&lower[..], &l4, Limits::default()).unwrap();
        let l6 = t.0.join(format!("l6-{i}"));
        mkdir(&l6).unwrap();
        let upper = tar_of(&[link("h", tar::EntryType::Link, target)]);
        unpack(&upper[..], &l6, Limits::default()).unwrap();
        let r = t.0.join(format!("bad-root-{i}"));
        let err = merge(&[&l4, &l6], &r).unwrap_err();
        assert!(err.to_string().contains("no lower layer"), "{err}");
        assert!(!r.join("h").exists() || fs::metadata(r.join("h")).unwrap().len() == 0);
    }
}

#[test]
fn a_later_entry_of_the_same_name_replaces_the_earlier_one() {
    let t = TempDir::new("replace");
    let dest = t.0.join("l");
    mkdir(&dest).unwrap();
    let mut private = dir("d/");
    private.mode = 0o700;
    let tar = tar_of(&[
        file("f", b"first"),
        file("f", b"second"),
        file("s", b"a file"),
        link("s", tar::EntryType::Symlink, "/elsewhere"),
        link("l", tar::EntryType::Symlink, "f"),
        file("l", b"not followed"),
        dir("x/"),
        file("x/inside", b"gone with x"),
        file("x", b"x is a file now"),
        file("d", b"d was a file"),
        dir("d/"),
        private,
        file("h", b"old"),
        link("h", tar::EntryType::Link, "f"),
    ]);
    let u = unpack(&tar[..], &dest, Limits::default()).unwrap();
    assert_eq!(u.markers, 0);
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"second");
    assert_eq!(
        fs::read_link(dest.join("s")).unwrap(),
        Path::new("/elsewhere")
    );
    // The file replaced the symlink; the symlink's target was not written through.
    assert!(!fs::symlink_metadata(dest.join("l")).unwrap().is_symlink());
    assert_eq!(fs::read(dest.join("l")).unwrap(), b"not followed");
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"second");
    assert_eq!(fs::read(dest.join("x")).unwrap(), b"x is a file now");
    assert!(fs::metadata(dest.join("d")).unwrap().is_dir());
    assert_eq!(stat_of(&dest.join("d")), "0:0:040700");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(dest.join("h")).unwrap().ino(),
        fs::metadata(dest.join("f")).unwrap().ino()
    );
}

#[test]
fn a_single_layer_needing_no_merge_is_the_root_itself() {
    use crate::store::{RunConfig, Store};
    let t = TempDir::new("store");
    let store = Store::open(t.0.join("store")).unwrap();
    let plain = tar_of(&[file("etc/hostname", b"image\n")]);
    let marked = tar_of(&[file("etc/.wh.motd", b"")]);
    let record = |name: &str, layers: &[&Vec<u8>]| {
        let ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
        for (l, id) in layers.iter().zip(&ids) {
            store.put_layer(name, id, &l[..]).unwrap();
        }
        let config = sha(name.as_bytes());
        store.record(
            name.into(),
            config.clone(),
            config,
            "linux/amd64".into(),
            ids,
            RunConfig::default(),
        )
    };
    let one = record("one", &[&plain]);
    let root = store.root(&one).unwrap();
    assert_eq!(root, store.layer_dir(&one.diff_ids[0]).unwrap());
    // A layer without a `./` entry still shows the guest a root-owned root.
    assert_eq!(stat_of(&root), "0:0:040755");
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"image\n");
    // A lone layer with a whiteout, and two layers, are merged.
    for rec in [
        record("marked", &[&marked]),
        record("two", &[&plain, &marked]),
    ] {
        let root = store.root(&rec).unwrap();
        assert!(root.starts_with(store.path().join("roots")), "{}", rec.name);
        assert!(!root.join("etc/.wh.motd").exists());
    }
}
