//! `msb-bench image`: pulling a ~200 MB image from the reference registry on loopback (pull
//! and unpack, MB/s) against `skopeo copy` of the same image to a directory, alternating in
//! one run; with `--launches N` (a /dev/kvm that boots Linux: hardware, or the L2 VM), also
//! `msb-vmm run --image IMAGE -- true` with the image cached against `run -- true` on the
//! default root, alternating.
//!
//! The image is made here from a directory (default: the Debian root `./x setup` builds): one
//! gzip layer, as registries usually serve them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::stats::{summarize, Summary};

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Pulls per tool.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// The directory the image's layer is made of (default: the default Debian root).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Also this many `run --image IMAGE -- true` and as many `run -- true` (default root),
    /// alternating (needs a /dev/kvm that boots Linux).
    #[arg(long, default_value_t = 0)]
    launches: usize,
    /// Work directory (needs user xattrs; default: under the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write samples and summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The msb-vmm binary (default: next to msb-bench).
    #[arg(long)]
    msb_vmm: Option<PathBuf>,
    /// The peer: skopeo.
    #[arg(long, default_value = "skopeo")]
    skopeo: PathBuf,
    /// The registry: Debian's docker-registry.
    #[arg(long, default_value = "docker-registry")]
    registry: PathBuf,
    /// Instead of pulls: the two ways to make a root of an image's layers, `--launches` times
    /// each, alternating (needs a /dev/kvm that boots Linux): one share of the merged layers
    /// (what msb-vmm does) against each layer as a read-only share under a guest overlay.
    /// Start time (cold boots) and metadata walks in the guest.
    #[arg(long)]
    root_strategy: bool,
    /// `--root-strategy`'s image: the root directory, then this many small layers on top,
    /// each adding files to directories the lower ones have (as package installs do).
    #[arg(long, default_value_t = 3)]
    upper_layers: usize,
    /// Compress the layer with zstd (level 3, as `docker buildx --compression zstd` does)
    /// instead of gzip.
    #[arg(long)]
    zstd: bool,
}

#[derive(Serialize, Default)]
struct Report {
    compressed_bytes: u64,
    unpacked_bytes: u64,
    msb_pull_s: Vec<f64>,
    skopeo_copy_s: Vec<f64>,
    inflate_s: Vec<f64>,
    msb_pull: Option<Summary>,
    skopeo_copy: Option<Summary>,
    inflate: Option<Summary>,
    image_run_ms: Vec<f64>,
    default_run_ms: Vec<f64>,
    image_run: Option<Summary>,
    default_run: Option<Summary>,
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha256_file(p: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(p).output()?;
    if !out.status.success() {
        bail!("sha256sum {}", p.display());
    }
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(format!(
        "sha256:{}",
        s.split_whitespace().next().unwrap_or("")
    ))
}

fn sh(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run"))?;
    if !out.status.success() {
        bail!(
            "{what}: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        );
    }
    Ok(())
}

/// Seconds to decompress `blob` with the pull's own decoder, reading from the page cache
/// into nothing: a gzip or zstd stream decompresses on one thread only, so no pull that
/// unpacks can take less.
fn inflate(blob: &Path) -> Result<f64> {
    let t = Instant::now();
    let f = std::fs::File::open(blob)?;
    let mut r = msb_image::unpack::decompressor(std::io::BufReader::with_capacity(1 << 20, f))?;
    // The pull's chunk size: small reads cost the inflater more calls.
    let mut buf = vec![0u8; 256 << 10];
    while std::io::Read::read(&mut r, &mut buf)? > 0 {}
    Ok(t.elapsed().as_secs_f64())
}

/// An OCI layout at `dir/oci` holding `layers` (directories, lowest first) as gzip (or
/// `zstd`) layers, tagged `bench`; returns the compressed and unpacked sizes.
fn make_layout(layers: &[PathBuf], dir: &Path, zstd: bool) -> Result<(u64, u64)> {
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let (mut size, mut unpacked) = (0, 0);
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for root in layers {
        let tar = dir.join("layer.tar");
        sh(
            Command::new("tar")
                .args(["--numeric-owner", "--one-file-system", "-C"])
                .arg(root)
                .args(["-cf"])
                .arg(&tar)
                .arg("."),
            "tar",
        )?;
        diff_ids.push(sha256_file(&tar)?);
        unpacked += std::fs::metadata(&tar)?.len();
        let (gz, media) = if zstd {
            sh(
                Command::new("zstd")
                    .args(["-3", "-q", "-f", "--rm"])
                    .arg(&tar),
                "zstd",
            )?;
            (dir.join("layer.tar.zst"), "zstd")
        } else {
            sh(Command::new("gzip").args(["-1", "-f"]).arg(&tar), "gzip")?;
            (dir.join("layer.tar.gz"), "gzip")
        };
        let layer = sha256_file(&gz)?;
        let n = std::fs::metadata(&gz)?.len();
        size += n;
        std::fs::rename(&gz, blobs.join(&layer[7..]))?;
        descs.push(serde_json::json!({
            "mediaType": format!("application/vnd.oci.image.layer.v1.tar+{media}"), "digest": layer, "size": n
        }));
    }
    let put = |v: serde_json::Value| -> Result<(String, usize)> {
        let b = serde_json::to_vec(&v)?;
        let p = dir.join("blob.tmp");
        std::fs::write(&p, &b)?;
        let d = sha256_file(&p)?;
        std::fs::rename(&p, blobs.join(&d[7..]))?;
        Ok((d, b.len()))
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let (cd, cn) = put(serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))?;
    let (md, mn) = put(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn },
        "layers": descs,
    }))?;
    std::fs::write(
        dir.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    std::fs::write(
        dir.join("oci/index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
                            "annotations": { "org.opencontainers.image.ref.name": "bench" } }],
        }))?,
    )?;
    Ok((size, unpacked))
}

fn start_registry(bin: &Path, dir: &Path) -> Result<(Kill, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("registry").display()
        ),
    )?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{}: install Debian's docker-registry", bin.display()))?;
    let k = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            bail!("docker-registry did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((k, addr))
}

pub fn run(a: ImageArgs) -> Result<()> {
    let msb_vmm = match &a.msb_vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("msb-vmm"),
    };
    let root = match &a.root {
        Some(r) => r.clone(),
        None => match msb_vmm::assets::default_root() {
            msb_vmm::assets::DefaultRoot::Dir(d) => d,
            _ => bail!("no default root directory: pass --root DIR"),
        },
    };
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("msb-bench-image-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("making the image from {}", root.display());
    if a.root_strategy {
        let r = root_strategy(&a, &msb_vmm, &root, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    let (compressed, unpacked) = make_layout(&[root], &dir, a.zstd)?;
    let (_registry, addr) = start_registry(&a.registry, &dir)?;
    let image = format!("{addr}/bench/image:1");
    sh(
        Command::new(&a.skopeo)
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:bench", dir.join("oci").display()))
            .arg(format!("docker://{image}")),
        "skopeo copy into the registry",
    )?;
    let mut r = Report {
        compressed_bytes: compressed,
        unpacked_bytes: unpacked,
        ..Default::default()
    };
    // The layer blob, for the floor of any pull that unpacks: decompressing it on one thread.
    let layer = std::fs::read_dir(dir.join("oci/blobs/sha256"))?
        .flatten()
        .max_by_key(|e| e.metadata().map_or(0, |m| m.len()))
        .map(|e| e.path())
        .context("the layout has no blobs")?;
    // Each pull into a new directory, all removed at the end: ext4 makes a file created just
    // after many were deleted wait for their inodes (`recently_deleted`), which would charge
    // one run's clean-up to the next (thousands of files for us, a few for skopeo).
    for i in 0..a.iterations {
        let cache = dir.join(format!("cache-{i}"));
        let t = Instant::now();
        sh(
            Command::new(&msb_vmm)
                .args(["pull", "-q", &image])
                .env("MSB_CACHE_DIR", &cache),
            "msb-vmm pull",
        )?;
        r.msb_pull_s.push(t.elapsed().as_secs_f64());
        let copy = dir.join(format!("skopeo-{i}"));
        let t = Instant::now();
        sh(
            Command::new(&a.skopeo)
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{image}"))
                .arg(format!("dir:{}", copy.display())),
            "skopeo copy",
        )?;
        r.skopeo_copy_s.push(t.elapsed().as_secs_f64());
        r.inflate_s.push(inflate(&layer)?);
        eprint!("\rpulls: {}/{}", i + 1, a.iterations);
    }
    eprintln!();
    r.msb_pull = summarize(&r.msb_pull_s);
    r.skopeo_copy = summarize(&r.skopeo_copy_s);
    r.inflate = summarize(&r.inflate_s);

    if a.launches > 0 {
        // Into the normal cache (the kernel and msb-init are there), and one launch of each
        // first: the pull and the warm templates are not samples.
        sh(
            Command::new(&msb_vmm).args(["pull", "-q", &image]),
            "msb-vmm pull",
        )?;
        let launch = |extra: &[&str]| -> Result<f64> {
            let t = Instant::now();
            let mut c = Command::new(&msb_vmm);
            c.args(["run", "--net", "none"])
                .args(extra)
                .args(["--", "true"]);
            c.env_remove("MSB_ROOTFS");
            sh(&mut c, "msb-vmm run")?;
            Ok(t.elapsed().as_secs_f64() * 1000.0)
        };
        launch(&["--image", &image])?;
        launch(&[])?;
        for i in 0..a.launches {
            r.image_run_ms.push(launch(&["--image", &image])?);
            r.default_run_ms.push(launch(&[])?);
            eprint!("\rlaunches: {}/{}", i + 1, a.launches);
        }
        eprintln!();
        let _ = Command::new(&msb_vmm).args(["rmi", &image]).output();
        r.image_run = summarize(&r.image_run_ms);
        r.default_run = summarize(&r.default_run_ms);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mb = compressed as f64 / 1e6;
    println!(
        "image: {:.1} MB compressed ({}), {:.1} MB unpacked, one layer, from the reference registry on loopback",
        mb,
        if a.zstd { "zstd" } else { "gzip" },
        unpacked as f64 / 1e6
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>10}",
        "seconds (n)", "p50", "p90", "p99", "MB/s p50"
    );
    for (name, s) in [
        ("msb-vmm pull (download + unpack)", r.msb_pull),
        ("skopeo copy to a directory", r.skopeo_copy),
        ("decompress alone, one thread", r.inflate),
    ] {
        if let Some(s) = s {
            println!(
                "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>10.1}",
                format!("{name} ({})", s.n),
                s.p50,
                s.p90,
                s.p99,
                mb / s.p50
            );
        }
    }
    if let (Some(m), Some(s)) = (r.msb_pull, r.skopeo_copy) {
        println!("msb-vmm pull / skopeo copy, p50: {:.2}", m.p50 / s.p50);
    }
    if let (Some(i), Some(d)) = (r.image_run, r.default_run) {
        println!(
            "{:<34} {:>9} {:>9} {:>9}",
            "spawn → exit, ms (n)", "p50", "p90", "p99"
        );
        for (name, s) in [
            ("run --image IMAGE -- true", i),
            ("run -- true (default root)", d),
        ] {
            println!(
                "{:<34} {:>9.1} {:>9.1} {:>9.1}",
                format!("{name} ({})", s.n),
                s.p50,
                s.p90,
                s.p99
            );
        }
        println!("image / default root, p50: {:.3}", i.p50 / d.p50);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}

/// What one `--root-strategy` launch measured.
#[derive(Serialize, Default)]
struct Strategy {
    /// Spawn → exit of `run --cold ... -- true` (the overlay variant mounts its overlay).
    start_ms: Vec<f64>,
    /// `find ROOT -xdev -ls` on a freshly booted guest, then again with its caches warm.
    walk_cold_ms: Vec<f64>,
    walk_warm_ms: Vec<f64>,
    /// 2000 lookups of names that exist in no layer, in a directory every layer has.
    missing_ms: Vec<f64>,
}

/// The guest's side of a walk: three timings in µs on one line.
const WALK: &str = r#"R=$1
t0=$(date +%s%N); find "$R" -xdev -ls >/dev/null
t1=$(date +%s%N); find "$R" -xdev -ls >/dev/null
t2=$(date +%s%N); i=0; while [ $i -lt 2000 ]; do [ -e "$R/usr/lib/none$i" ]; i=$((i+1)); done
t3=$(date +%s%N)
echo "walk $(( (t1-t0)/1000 )) $(( (t2-t1)/1000 )) $(( (t3-t2)/1000 ))""#;

/// One share of the merged layers (msb-vmm's root for images) against each layer as a
/// read-only share with a guest overlay over them, on an image of the root plus
/// `--upper-layers` small layers.
fn root_strategy(a: &ImageArgs, msb_vmm: &Path, root: &Path, dir: &Path) -> Result<()> {
    if a.launches == 0 {
        bail!("--root-strategy needs --launches N (cold boots of each kind)");
    }
    let mut layers = vec![root.to_path_buf()];
    for k in 1..=a.upper_layers {
        let l = dir.join(format!("upper-{k}"));
        for d in 0..10 {
            let p = l.join(format!("usr/lib/layer-{k}/d{d}"));
            std::fs::create_dir_all(&p)?;
            for f in 0..50 {
                std::fs::write(p.join(format!("f{f}")), [b'x'; 100])?;
            }
        }
        std::fs::create_dir_all(l.join("usr/local/bin"))?;
        std::fs::write(l.join(format!("usr/local/bin/tool-{k}")), b"#!/bin/sh\n")?;
        std::fs::create_dir_all(l.join("etc"))?;
        std::fs::write(l.join(format!("etc/layer-{k}.conf")), b"x=1\n")?;
        layers.push(l);
    }
    eprintln!(
        "making a {}-layer image from {} and {} small layers",
        layers.len(),
        root.display(),
        a.upper_layers
    );
    make_layout(&layers, dir, false)?;
    let image = format!("oci:{}:bench", dir.join("oci").display());
    sh(
        Command::new(msb_vmm).args(["pull", "-q", &image]),
        "msb-vmm pull",
    )?;
    let store = msb_vmm::image::store()?;
    let rec = msb_image::cached(&store, &image).context("the image just pulled")?;
    let mut volumes = Vec::new();
    let mut lower = Vec::new();
    for (i, d) in rec.diff_ids.iter().enumerate() {
        volumes.push("-V".to_string());
        // Each layer as immutable as the merged root is (the store never changes them).
        volumes.push(format!(
            "{}:/layers/{i}:ro,cache=always",
            store.layer_dir(d)?.display()
        ));
        lower.insert(0, format!("/layers/{i}"));
    }
    let overlay = format!(
        "mkdir -p /merged /tmp/u /tmp/w && mount -t overlay overlay -o lowerdir={},upperdir=/tmp/u,workdir=/tmp/w /merged",
        lower.join(":")
    );
    let run = |extra: &[String], cmd: &str| -> Result<(f64, String)> {
        let t = Instant::now();
        let out = Command::new(msb_vmm)
            .args(["run", "--cold", "--net", "none"])
            .args(extra)
            .args(["--", "sh", "-c", cmd, "sh"])
            .env_remove("MSB_ROOTFS")
            .output()
            .context("msb-vmm run")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            bail!(
                "msb-vmm run: {} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            );
        }
        Ok((ms, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let merged_args = vec!["--image".to_string(), image.clone()];
    // `prefix` sets the root to walk as `$1`.
    let walk = |extra: &[String], prefix: &str, s: &mut Strategy| -> Result<()> {
        let (_, out) = run(extra, &format!("{prefix}\n{WALK}"))?;
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("walk "))
            .with_context(|| format!("no timings from the guest: {out}"))?;
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|x| x.parse::<f64>().ok())
            .map(|us| us / 1000.0)
            .collect();
        if v.len() != 3 {
            bail!("bad timings from the guest: {line}");
        }
        s.walk_cold_ms.push(v[0]);
        s.walk_warm_ms.push(v[1]);
        s.missing_ms.push(v[2]);
        Ok(())
    };
    // One of each first: nothing of the first boots is a sample.
    run(&merged_args, "true")?;
    run(&volumes, &overlay)?;
    let (mut merged, mut layered) = (Strategy::default(), Strategy::default());
    for i in 0..a.launches {
        merged.start_ms.push(run(&merged_args, "true")?.0);
        layered.start_ms.push(run(&volumes, &overlay)?.0);
        walk(&merged_args, "set -- /", &mut merged)?;
        walk(
            &volumes,
            &format!("{overlay} || exit 1\nset -- /merged"),
            &mut layered,
        )?;
        eprint!("\rlaunches: {}/{}", i + 1, a.launches);
    }
    eprintln!();
    let _ = Command::new(msb_vmm).args(["rmi", &image]).output();
    println!(
        "image: {} layers (the root, then {} small ones); ms (n), p50 / p90 / p99",
        layers.len(),
        a.upper_layers
    );
    println!(
        "{:<40} {:>26} {:>26} {:>7}",
        "", "one merged share", "a share per layer + overlay", "ratio"
    );
    let fmt = |v: &[f64]| {
        summarize(v).map_or("-".into(), |s| {
            format!("{:.0} / {:.0} / {:.0} ({})", s.p50, s.p90, s.p99, s.n)
        })
    };
    for (name, m, l) in [
        (
            "start: run --cold -- true",
            &merged.start_ms,
            &layered.start_ms,
        ),
        (
            "find -ls of the root, cold",
            &merged.walk_cold_ms,
            &layered.walk_cold_ms,
        ),
        (
            "find -ls of the root, warm",
            &merged.walk_warm_ms,
            &layered.walk_warm_ms,
        ),
        (
            "2000 missing names in /usr/lib",
            &merged.missing_ms,
            &layered.missing_ms,
        ),
    ] {
        let ratio = match (summarize(m), summarize(l)) {
            (Some(m), Some(l)) => format!("{:.2}", l.p50 / m.p50),
            _ => "-".into(),
        };
        println!("{name:<40} {:>26} {:>26} {ratio:>7}", fmt(m), fmt(l));
    }
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(
                &serde_json::json!({ "merged": merged, "per_layer": layered }),
            )?,
        )?;
    }
    Ok(())
}
