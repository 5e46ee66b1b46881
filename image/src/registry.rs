//! Pulling from a registry with `oci-client`: manifest (indexes resolved to this host's
//! platform), config and layers, each verified against its digest; layers downloaded
//! concurrently into resumable `tmp/*.partial` files and unpacked as each completes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::io::{Read, Write};
use std::sync::{Condvar, Mutex};

use crate::store::{hex_of, prefix, ImageRecord, Store};
use crate::{host_platform, read_config, ImageError, PullOptions};

/// Layers downloaded at once.
const PARALLEL: usize = 3;
/// The largest manifest config we read into memory.
const MAX_CONFIG: i64 = 16 << 20;
/// The largest layer blob we accept.
const MAX_BLOB: i64 = 64 << 30;

/// True for registries on this machine, spoken to over plain HTTP as Docker does.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The manifest of an index that runs here.
fn resolve(entries: &[ImageIndexEntry]) -> Option<String> {
    let (os, arch) = host_platform();
    let fits = |e: &&ImageIndexEntry| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os.to_string() == os && p.architecture.to_string() == arch)
    };
    // arm64 images may name a variant; v8 is what every arm64 host runs.
    entries
        .iter()
        .filter(fits)
        .find(|e| {
            e.platform
                .as_ref()
                .and_then(|p| p.variant.as_deref())
                .is_none_or(|v| v == "v8")
        })
        .or_else(|| entries.iter().find(fits))
        .map(|e| e.digest.clone())
}

/// Credentials for `registry` from `~/.docker/config.json` (or its credential helper);
/// anonymous when there are none.
fn credentials(r: &Reference) -> RegistryAuth {
    let server = match r.resolve_registry() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "https://index.docker.io/v1/",
        other => other,
    };
    match docker_credential::get_credential(server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
            RegistryAuth::Basic(u, p)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(t)) => RegistryAuth::Bearer(t),
        Err(_) => RegistryAuth::Anonymous,
    }
}

pub fn pull(store: &Store, r: &Reference, opts: &PullOptions) -> Result<ImageRecord, ImageError> {
    let name = r.whole();
    // reqwest takes rustls's process-wide provider: ring, as the netstack uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ImageError::Io(store.path().to_path_buf(), e))?;
    rt.block_on(pull_async(store, r, &name, opts))
}

/// For a registry that turned the request away for want of (good) credentials: why, and the
/// fix, in one line.
fn refused(
    e: &oci_client::errors::OciDistributionError,
    r: &Reference,
    auth: &RegistryAuth,
) -> Option<String> {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
    let auth_error = match e {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => true,
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|x| matches!(x.code, C::Unauthorized | C::Denied)),
        E::ServerError { code, .. } => *code == 401 || *code == 403,
        _ => false,
    };
    if !auth_error {
        return None;
    }
    let host = r.registry();
    Some(match auth {
        RegistryAuth::Anonymous => format!(
            "the registry wants credentials and none are set for {host}: run `docker login {host}` (msb-vmm reads ~/.docker/config.json, or $DOCKER_CONFIG/config.json)"
        ),
        _ => format!(
            "the registry refused the credentials set for {host}: run `docker login {host}` again (msb-vmm reads ~/.docker/config.json, or $DOCKER_CONFIG/config.json)"
        ),
    })
}

fn reg_err(image: &str, e: impl std::fmt::Display) -> ImageError {
    let mut why = e.to_string();
    if why.contains("error sending request") || why.contains("onnection refused") {
        why = format!("the registry is unreachable ({why})");
    }
    ImageError::Registry {
        image: image.to_string(),
        why,
    }
}

async fn pull_async(
    store: &Store,
    r: &Reference,
    name: &str,
    opts: &PullOptions,
) -> Result<ImageRecord, ImageError> {
    let mut plain = opts.insecure_registries.clone();
    for reg in [r.registry(), r.resolve_registry()] {
        if is_loopback(reg) {
            plain.push(reg.to_string());
        }
    }
    let client = Arc::new(Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain),
        platform_resolver: Some(Box::new(resolve)),
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    }));
    let auth = credentials(r);
    let (manifest, manifest_digest) = client.pull_image_manifest(r, &auth).await.map_err(|e| {
        let s = e.to_string();
        if let Some(why) = refused(&e, r, &auth) {
            reg_err(name, why)
        } else if s.contains("platform") || s.contains("resolve") {
            let (os, arch) = host_platform();
            ImageError::NoPlatform(name.to_string(), format!("{os}/{arch}"))
        } else {
            reg_err(name, e)
        }
    })?;
    if hex_of(&manifest_digest).is_none() {
        return Err(ImageError::BadDigest(manifest_digest));
    }
    if manifest.config.size < 0 || manifest.config.size > MAX_CONFIG {
        return Err(reg_err(name, "the image config is absurdly large"));
    }
    let mut config = Vec::new();
    client
        .pull_blob(r, &manifest.config, &mut config)
        .await
        .map_err(|e| reg_err(name, format!("config: {e}")))?;
    let config_digest = crate::sha256(&config);
    if config_digest != manifest.config.digest {
        return Err(ImageError::DigestMismatch {
            image: name.to_string(),
            what: "the config".into(),
            actual: config_digest,
        });
    }
    let (run, diff_ids, platform) = read_config(name, &config)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(reg_err(
            name,
            "the manifest and the config disagree on the number of layers",
        ));
    }
    for l in &manifest.layers {
        if hex_of(&l.digest).is_none() {
            return Err(ImageError::BadDigest(l.digest.clone()));
        }
        if l.size < 0 || l.size > MAX_BLOB {
            return Err(reg_err(
                name,
                format!("layer {} is absurdly large", l.digest),
            ));
        }
    }

    let progress = Progress::new(opts);
    let jobs = manifest
        .layers
        .iter()
        .zip(&diff_ids)
        .filter(|(_, d)| !store.has_layer(d))
        .map(|(l, d)| {
            let client = client.clone();
            let progress = progress.clone();
            async move {
                let hex = hex_of(&l.digest).expect("checked");
                let file = store.tmp().join(format!("blob-{hex}.partial"));
                if file.exists() {
                    // Resuming: finish the download, then unpack the whole file.
                    download(&client, r, l, store, name, &progress, None).await?;
                    let (store2, name2, d2, file2) =
                        (store.clone(), name.to_string(), d.clone(), file.clone());
                    progress.line(&format!("unpacking {}", short(&l.digest)));
                    tokio::task::spawn_blocking(move || {
                        let blob = crate::unpack::open_blob(&file2)
                            .map_err(|e| ImageError::Io(file2.clone(), e))?;
                        store2.put_layer(&name2, &d2, blob)
                    })
                    .await
                    .map_err(|e| reg_err(name, e))??;
                } else {
                    // Unpacked as it downloads (the unpacker follows the file), published
                    // only once the whole blob has matched its digest.
                    std::fs::File::create(&file).map_err(|e| ImageError::Io(file.clone(), e))?;
                    let tail = Arc::new(Tail::default());
                    let (store2, name2, d2, file2, tail2) = (
                        store.clone(),
                        name.to_string(),
                        d.clone(),
                        file.clone(),
                        tail.clone(),
                    );
                    let unpack = tokio::task::spawn_blocking(move || {
                        let f = std::fs::File::open(&file2)
                            .map_err(|e| ImageError::Io(file2.clone(), e))?;
                        let reader = std::io::BufReader::with_capacity(
                            1 << 20,
                            TailReader {
                                f,
                                pos: 0,
                                tail: tail2,
                            },
                        );
                        store2.stage_layer(&name2, &d2, reader)
                    });
                    let downloaded =
                        download(&client, r, l, store, name, &progress, Some(&tail)).await;
                    tail.finish(downloaded.is_ok());
                    let staged = unpack.await.map_err(|e| reg_err(name, e))?;
                    downloaded?;
                    if let Some(staged) = staged? {
                        staged.publish()?;
                    }
                }
                let _ = std::fs::remove_file(&file);
                progress.line(&format!("layer {} done", short(&l.digest)));
                Ok::<(), ImageError>(())
            }
        });
    let results: Vec<Result<(), ImageError>> = futures_util::stream::iter(jobs)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    progress.finish();
    results.into_iter().collect::<Result<Vec<()>, _>>()?;

    Ok(store.record(
        name.to_string(),
        manifest_digest,
        config_digest,
        platform,
        diff_ids,
        run,
    ))
}

fn short(digest: &str) -> &str {
    prefix(hex_of(digest).unwrap_or(digest), 12)
}

/// Downloads one layer blob into `tmp/HEX.partial`, continuing a file an interrupted pull
/// left there, and checks the whole file against the descriptor's digest.
async fn download(
    client: &Client,
    r: &Reference,
    desc: &OciDescriptor,
    store: &Store,
    image: &str,
    progress: &Progress,
    tail: Option<&Tail>,
) -> Result<PathBuf, ImageError> {
    let hex = hex_of(&desc.digest).expect("checked");
    let path = store.tmp().join(format!("blob-{hex}.partial"));
    let size = desc.size as u64;
    let mut have = std::fs::metadata(&path).map_or(0, |m| m.len());
    if have > size {
        have = 0;
    }
    let bar = progress.bar(short(&desc.digest), size, have);
    // A download from the first byte is checked as it arrives, by oci-client's verifying
    // stream (which ends in an error on a mismatch, handled below); a resumed one is hashed
    // whole at the end. Hashing a full download a second time here cost a tenth of a pull.
    let mut verified = false;
    if have < size {
        let resp = if have == 0 {
            BlobResponse::Full(
                client
                    .pull_blob_stream(r, desc)
                    .await
                    .map_err(|e| reg_err(image, format!("layer {}: {e}", desc.digest)))?,
            )
        } else {
            progress.line(&format!("resuming {} at {have} bytes", short(&desc.digest)));
            client
                .pull_blob_stream_partial(r, desc, have, Some(size - have))
                .await
                .map_err(|e| reg_err(image, format!("layer {}: {e}", desc.digest)))?
        };
        let (mut stream, append) = match resp {
            BlobResponse::Full(s) => (s.stream, false),
            BlobResponse::Partial(s) => (s.stream, true),
        };
        if !append {
            have = 0;
            verified = true;
        }
        // Plain writes: page-cache copies of a few KiB, and visible at once to an unpacker
        // following the file.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|e| ImageError::Io(path.clone(), e))?;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let why = e.to_string();
                    // oci-client checks a whole download against its digest itself.
                    if let Some((_, got)) = why.split_once(", got ") {
                        drop(f);
                        let _ = std::fs::remove_file(&path);
                        return Err(ImageError::DigestMismatch {
                            image: image.to_string(),
                            what: format!("layer {}", desc.digest),
                            actual: got.trim().to_string(),
                        });
                    }
                    return Err(reg_err(image, format!("layer {}: {why}", desc.digest)));
                }
            };
            have += chunk.len() as u64;
            if have > size {
                drop(f);
                let _ = std::fs::remove_file(&path);
                return Err(reg_err(
                    image,
                    format!("layer {} is longer than its manifest says", desc.digest),
                ));
            }
            f.write_all(&chunk)
                .map_err(|e| ImageError::Io(path.clone(), e))?;
            if let Some(t) = tail {
                t.advance(have);
            }
            if let Some(b) = &bar {
                b.set_position(have);
            }
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let actual = if verified {
        desc.digest.clone()
    } else {
        let p2 = path.clone();
        tokio::task::spawn_blocking(move || file_digest(&p2))
            .await
            .map_err(|e| reg_err(image, e))?
            .map_err(|e| ImageError::Io(path.clone(), e))?
    };
    if actual != desc.digest {
        let _ = std::fs::remove_file(&path);
        return Err(ImageError::DigestMismatch {
            image: image.to_string(),
            what: format!("layer {}", desc.digest),
            actual,
        });
    }
    Ok(path)
}

/// How far a download has written its file, and whether it ended well.
#[derive(Default)]
struct Tail {
    state: Mutex<(u64, Option<bool>)>,
    cv: Condvar,
}

impl Tail {
    fn advance(&self, written: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = written;
        self.cv.notify_all();
    }

    fn finish(&self, ok: bool) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(ok);
        self.cv.notify_all();
    }
}

/// Reads a file while a download writes it: waits for more at the end until the download
/// has finished; a failed download is an error.
struct TailReader {
    f: std::fs::File,
    pos: u64,
    tail: Arc<Tail>,
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut st = self.tail.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (written, done) = *st;
            if self.pos < written {
                drop(st);
                let want = buf.len().min((written - self.pos) as usize);
                let n = self.f.read(&mut buf[..want])?;
                self.pos += n as u64;
                return Ok(n);
            }
            match done {
                Some(true) => return Ok(0),
                Some(false) => return Err(std::io::Error::other("the download failed")),
                None => {
                    st = self
                        .tail
                        .cv
                        .wait_timeout(st, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

/// `sha256:HEX` of a file's contents.
pub(crate) fn file_digest(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Progress on stderr: bars on a terminal, plain lines otherwise (when asked).
#[derive(Clone)]
struct Progress {
    multi: Option<indicatif::MultiProgress>,
    verbose: bool,
}

impl Progress {
    fn new(opts: &PullOptions) -> Progress {
        Progress {
            multi: opts.progress.then(indicatif::MultiProgress::new),
            verbose: opts.verbose,
        }
    }

    fn bar(&self, label: &str, size: u64, at: u64) -> Option<indicatif::ProgressBar> {
        let m = self.multi.as_ref()?;
        let b = m.add(indicatif::ProgressBar::new(size));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_prefix(label.to_string());
        b.set_position(at);
        Some(b)
    }

    fn line(&self, s: &str) {
        if let Some(m) = &self.multi {
            let _ = m.println(s);
        } else if self.verbose {
            eprintln!("{s}");
        }
    }

    fn finish(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_registries() {
        for r in ["127.0.0.1:5000", "localhost:80", "[::1]:5000", "localhost"] {
            assert!(super::is_loopback(r), "{r}");
        }
        for r in ["docker.io", "10.0.0.1:5000", "ghcr.io"] {
            assert!(!super::is_loopback(r), "{r}");
        }
    }
}
