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
}

#[derive(Serialize, Default)]
struct Report {
    compressed_bytes: u64,
    unpacked_bytes: u64,
    msb_pull_s: Vec<f64>,
    skopeo_copy_s: Vec<f64>,
    msb_pull: Option<Summary>,
    skopeo_copy: Option<Summary>,
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

/// An OCI layout at `dir/oci` holding `root` as one gzip layer, tagged `bench`.
fn make_layout(root: &Path, dir: &Path) -> Result<(u64, u64)> {
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
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
    let diff_id = sha256_file(&tar)?;
    let unpacked = std::fs::metadata(&tar)?.len();
    sh(Command::new("gzip").args(["-1", "-f"]).arg(&tar), "gzip")?;
    let gz = dir.join("layer.tar.gz");
    let layer = sha256_file(&gz)?;
    let size = std::fs::metadata(&gz)?.len();
    std::fs::rename(&gz, blobs.join(&layer[7..]))?;
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
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))?;
    let (md, mn) = put(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": size }],
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
    let (compressed, unpacked) = make_layout(&root, &dir)?;
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
        eprint!("\rpulls: {}/{}", i + 1, a.iterations);
    }
    eprintln!();
    r.msb_pull = summarize(&r.msb_pull_s);
    r.skopeo_copy = summarize(&r.skopeo_copy_s);

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
        "image: {:.1} MB compressed, {:.1} MB unpacked, one layer, from the reference registry on loopback",
        mb,
        unpacked as f64 / 1e6
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>10}",
        "seconds (n)", "p50", "p90", "p99", "MB/s p50"
    );
    for (name, s) in [
        ("msb-vmm pull (download + unpack)", r.msb_pull),
        ("skopeo copy to a directory", r.skopeo_copy),
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
