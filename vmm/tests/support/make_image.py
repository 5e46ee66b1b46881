#!/usr/bin/env python3
"""Writes a small OCI image layout for the end-to-end image tests.

make_image.py LAYOUT BUSYBOX: two images tagged `plain` and `entry` sharing two layers. The
lower layer is a static busybox with its applets, /etc/passwd (root, app=1000) and /etc/motd;
the upper one deletes /etc/motd (a whiteout) and adds /app owned by app. `plain` sets Env,
WorkingDir=/app and User=app; `entry` adds an Entrypoint and a Cmd.
"""
import hashlib, io, json, os, sys, tarfile

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
arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
env = ["PATH=/bin", "GREETING=hello-from-image"]
configs = {
    "plain": {"Env": env, "WorkingDir": "/app", "User": "app"},
    "entry": {"Env": env, "WorkingDir": "/app", "User": "app",
              "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo entry $GREETING; id -u"]},
}
manifests = []
for tag, cfg in configs.items():
    config = {"architecture": arch, "os": "linux", "config": cfg,
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]}}
    c = dict(put(json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json")
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": descs}
    md = dict(put(json.dumps(m).encode()), mediaType="application/vnd.oci.image.manifest.v1+json",
              annotations={"org.opencontainers.image.ref.name": tag})
    manifests.append(md)
with open(os.path.join(layout, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": manifests}, f)
