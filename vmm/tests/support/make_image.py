#!/usr/bin/env python3
"""Writes OCI image layouts for the end-to-end image tests.

make_image.py LAYOUT BUSYBOX: two images tagged `plain` and `entry` sharing two layers. The
lower layer is a static busybox with its applets, /etc/passwd (root, app=1000) and /etc/motd;
the upper one deletes /etc/motd (a whiteout) and adds /app owned by app. `plain` sets Env,
WorkingDir=/app and User=app; `entry` adds an Entrypoint and a Cmd.

make_image.py --debian LAYOUT ROOT: a distribution image tagged `12`, as registries serve
them: ROOT (the Debian tree `./x setup` builds) as one gzip layer (made by tar and gzip, as
fast as the emulated machine allows), and an upper layer adding the user app (1000) and its
home /srv/app; Env, WorkingDir=/srv/app and User=app. Also `base`: the Debian layer alone.
"""
import hashlib, io, json, os, subprocess, sys, tarfile

debian = sys.argv[1] == "--debian"
if debian:
    layout, root = sys.argv[2], sys.argv[3]
else:
    layout, busybox = sys.argv[1], sys.argv[2]
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)


def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + d, "size": len(data)}


def layer(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, mode, data, uid in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, uid, 1700000000
            if kind == tarfile.SYMTYPE:
                ti.linkname = data
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


F, D, L = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE
arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]


def write_index(manifests):
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": manifests}, f)


def image(tag, cfg, descs, diff_ids):
    config = {"architecture": arch, "os": "linux", "config": cfg,
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    c = dict(put(json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json")
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": descs}
    return dict(put(json.dumps(m).encode()), mediaType="application/vnd.oci.image.manifest.v1+json",
                annotations={"org.opencontainers.image.ref.name": tag})


def sha256_file(path):
    out = subprocess.run(["sha256sum", path], check=True, capture_output=True, text=True).stdout
    return "sha256:" + out.split()[0]


if debian:
    tar = os.path.join(layout, "base.tar")
    subprocess.run(["tar", "--numeric-owner", "--one-file-system", "-C", root, "-cf", tar, "."], check=True)
    base_diff = sha256_file(tar)
    subprocess.run(["gzip", "-1", "-f", tar], check=True)
    gz = sha256_file(tar + ".gz")
    size = os.path.getsize(tar + ".gz")
    os.rename(tar + ".gz", os.path.join(blobs, gz[7:]))
    passwd = open(os.path.join(root, "etc/passwd"), "rb").read()
    group = open(os.path.join(root, "etc/group"), "rb").read()
    upper = layer([
        ("etc/passwd", F, 0o644, passwd + b"app:x:1000:1000:app:/srv/app:/bin/sh\n", 0),
        ("etc/group", F, 0o644, group + b"app:x:1000:\n", 0),
        ("srv/app", D, 0o755, b"", 1000),
        ("srv/app/data", F, 0o644, b"from-debian-image\n", 1000),
    ])
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": gz, "size": size},
             dict(put(upper), mediaType="application/vnd.oci.image.layer.v1.tar")]
    diff_ids = [base_diff, "sha256:" + hashlib.sha256(upper).hexdigest()]
    cfg = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello-from-debian"],
           "WorkingDir": "/srv/app", "User": "app", "Cmd": ["bash"]}
    # `base`: the Debian layer alone, an image that needs no merge (its layer is its root).
    base_cfg = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    write_index([image("12", cfg, descs, diff_ids), image("base", base_cfg, descs[:1], diff_ids[:1])])
    sys.exit(0)

bb = open(busybox, "rb").read()
lower = [("bin", D, 0o755, b"", 0), ("bin/busybox", F, 0o755, bb, 0)]
for applet in ["sh", "cat", "echo", "id", "pwd", "ls", "test", "touch", "mount", "sleep", "uname", "rm", "stat"]:
    lower.append(("bin/" + applet, L, 0o777, "busybox", 0))
lower += [
    ("etc", D, 0o755, b"", 0),
    ("etc/passwd", F, 0o644, b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n", 0),
    ("etc/group", F, 0o644, b"root:x:0:\napp:x:1000:\n", 0),
    ("etc/motd", F, 0o644, b"deleted by the upper layer\n", 0),
    ("root", D, 0o700, b"", 0),
]
upper = [
    ("etc/.wh.motd", F, 0o644, b"", 0),
    ("app", D, 0o755, b"", 1000),
    ("app/data", F, 0o644, b"from-image\n", 1000),
]
layers = [layer(lower), layer(upper)]
descs = [dict(put(l), mediaType="application/vnd.oci.image.layer.v1.tar") for l in layers]
env = ["PATH=/bin", "GREETING=hello-from-image"]
configs = {
    "plain": {"Env": env, "WorkingDir": "/app", "User": "app"},
    "entry": {"Env": env, "WorkingDir": "/app", "User": "app",
              "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo entry $GREETING; id -u"]},
}
diff_ids = ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]
write_index([image(tag, cfg, descs, diff_ids) for tag, cfg in configs.items()])
