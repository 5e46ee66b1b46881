//! The content-addressed image cache.
//!
//! ```text
//! STORE/layers/HEX/          one unpacked layer, keyed by its diff id (uncompressed digest)
//! STORE/layers/HEX.json      its size and whether it needs merging (whiteouts, links down)
//! STORE/roots/HEX/           an image's merged root, keyed by its config digest (image id);
//!                            none for one layer that needs no merging: that is the root
//! STORE/images/HEX.json      one record per image name (HEX = sha256 of the name)
//! STORE/tmp/                 downloads in progress (resumable) and staging directories
//! ```
//!
//! Nothing half-made is ever visible outside `tmp/`: layers and roots are built there and
//! renamed into place whole, records are written to a temporary file and renamed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::unpack::{self, Limits, Unpacked};
use crate::ImageError;

/// What an image asks of the process it runs (its config's `Env`, `Entrypoint`, `Cmd`,
/// `WorkingDir` and `User`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl RunConfig {
    /// The command `docker run` would start: `Entrypoint + (args or Cmd)`.
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        let mut v = self.entrypoint.clone();
        if args.is_empty() {
            v.extend(self.cmd.iter().cloned());
        } else {
            v.extend(args.iter().cloned());
        }
        v
    }
}

/// One image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it was pulled by (a full reference, or `oci:`/`docker-archive:` with a path).
    pub name: String,
    /// `sha256:HEX` of the manifest.
    pub manifest_digest: String,
    /// `sha256:HEX` of the config: the image id.
    pub config_digest: String,
    /// `os/arch` of the image.
    pub platform: String,
    /// The layers' diff ids, lowest first.
    pub diff_ids: Vec<String>,
    /// Unpacked bytes of all layers.
    pub size: u64,
    /// When it was pulled (seconds since the epoch).
    pub pulled: u64,
    pub config: RunConfig,
}

impl ImageRecord {
    /// The short image id (12 hex digits), as `docker images` shows it.
    pub fn short_id(&self) -> &str {
        prefix(hex_of(&self.config_digest).unwrap_or(""), 12)
    }
}

/// The image cache at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct LayerMeta {
    bytes: u64,
    entries: u64,
    /// Whiteouts and lower-layer link placeholders in the layer; unknown for layers unpacked
    /// before it was counted.
    #[serde(default)]
    markers: Option<u64>,
}

/// The first `n` bytes of `s`, cut where a character starts (for names shown to people: a
/// digest that is not hex yet came from a registry and may hold any UTF-8).
pub fn prefix(s: &str, n: usize) -> &str {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The HEX of a `sha256:HEX` digest, checked (64 lowercase hex digits).
pub fn hex_of(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(h)
}

fn checked_hex(digest: &str) -> Result<&str, ImageError> {
    hex_of(digest).ok_or_else(|| ImageError::BadDigest(digest.to_string()))
}

impl Store {
    /// Opens (creating, owner-only) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, ImageError> {
        let root = root.into();
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)
                .map_err(|e| ImageError::Io(root.clone(), e))?;
        }
        for d in ["layers", "roots", "images", "aliases", "tmp"] {
            let p = root.join(d);
            if let Err(e) = unpack::mkdir(&p) {
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(ImageError::Io(p, e));
                }
            }
        }
        Ok(Store { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh staging path in `tmp/` (named after us, so `prune` can tell a dead one).
    pub fn staging(&self, what: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tmp()
            .join(format!("{what}.{}.{n}.staging", std::process::id()))
    }

    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers").join(checked_hex(diff_id)?))
    }

    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id).is_ok_and(|d| d.is_dir())
    }

    /// Unpacks `blob` as the layer `diff_id` unless the store has it. The uncompressed stream
    /// must hash to `diff_id`; otherwise nothing is kept.
    pub fn put_layer(
        &self,
        image: &str,
        diff_id: &str,
        blob: impl io::Read,
    ) -> Result<u64, ImageError> {
        match self.stage_layer(image, diff_id, blob)? {
            Some(staged) => staged.publish(),
            None => Ok(self.layer_size(diff_id)),
        }
    }

    /// Unpacks `blob` into a staging directory, checked against `diff_id`, for
    /// [`StagedLayer::publish`] once the caller has checked the blob itself; `None` when the
    /// store has the layer. Dropped unpublished, the staging directory goes.
    pub fn stage_layer(
        &self,
        image: &str,
        diff_id: &str,
        blob: impl io::Read,
    ) -> Result<Option<StagedLayer>, ImageError> {
        let dest = self.layer_dir(diff_id)?;
        if dest.is_dir() {
            return Ok(None);
        }
        let stage = self.staging("layer");
        unpack::mkdir(&stage).map_err(|e| ImageError::Io(stage.clone(), e))?;
        let mut staged = StagedLayer {
            store: self.clone(),
            diff_id: diff_id.to_string(),
            stage,
            unpacked: None,
        };
        match unpack::unpack(blob, &staged.stage, Limits::default()) {
            Ok(u) if u.diff_id == diff_id => staged.unpacked = Some(u),
            Ok(u) => {
                return Err(ImageError::DigestMismatch {
                    image: image.to_string(),
                    what: format!("layer {diff_id} (uncompressed)"),
                    actual: u.diff_id,
                })
            }
            Err(e) => {
                return Err(ImageError::Layer {
                    image: image.to_string(),
                    layer: diff_id.to_string(),
                    err: e,
                })
            }
        }
        Ok(Some(staged))
    }

    fn publish_layer(&self, diff_id: &str, stage: &Path, u: &Unpacked) -> Result<(), ImageError> {
        let dest = self.layer_dir(diff_id)?;
        let meta = serde_json::to_vec(&LayerMeta {
            bytes: u.bytes,
            entries: u.entries,
            markers: Some(u.markers),
        })
        .expect("plain struct");
        write_atomic(&dest.with_extension("json"), &meta)?;
        if let Err(e) = fs::rename(stage, &dest) {
            let _ = fs::remove_dir_all(stage);
            // Another pull of the same layer won the race: theirs is as good as ours.
            if !dest.is_dir() {
                return Err(ImageError::Io(dest, e));
            }
        }
        Ok(())
    }

    /// The record of an image whose layers this store now holds, pulled now: one place for
    /// every source (registry, OCI layout, docker archive).
    pub fn record(
        &self,
        name: String,
        manifest_digest: String,
        config_digest: String,
        platform: String,
        diff_ids: Vec<String>,
        config: RunConfig,
    ) -> ImageRecord {
        ImageRecord {
            name,
            manifest_digest,
            config_digest,
            platform,
            size: diff_ids.iter().map(|d| self.layer_size(d)).sum(),
            diff_ids,
            pulled: now(),
            config,
        }
    }

    /// Unpacked bytes of a layer in the store (0 when it is not there).
    pub fn layer_size(&self, diff_id: &str) -> u64 {
        self.layer_meta(diff_id).map_or(0, |m| m.bytes)
    }

    fn layer_meta(&self, diff_id: &str) -> Option<LayerMeta> {
        let d = self.layer_dir(diff_id).ok()?;
        let b = fs::read(d.with_extension("json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The record file of an image name.
    fn record_path(&self, name: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(name.as_bytes()));
        self.root.join("images").join(format!("{h}.json"))
    }

    /// The full name a pull recorded for what the user typed (`debian` →
    /// `docker.io/library/debian:latest`).
    pub fn alias(&self, typed: &str) -> Option<String> {
        let h = hex::encode(Sha256::digest(typed.as_bytes()));
        let name = fs::read_to_string(self.root.join("aliases").join(h)).ok()?;
        (!name.is_empty()).then_some(name)
    }

    /// Records that `typed` names the image `name` (best effort: only a shortcut).
    pub fn set_alias(&self, typed: &str, name: &str) {
        if typed == name || self.alias(typed).as_deref() == Some(name) {
            return;
        }
        let h = hex::encode(Sha256::digest(typed.as_bytes()));
        let _ = write_atomic(&self.root.join("aliases").join(h), name.as_bytes());
    }

    /// Saves `rec` (replacing an older record of the same name).
    pub fn save(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let data = serde_json::to_vec_pretty(rec).expect("plain struct");
        write_atomic(&self.record_path(&rec.name), &data)
    }

    /// The record of an image name, if pulled.
    pub fn find(&self, name: &str) -> Option<ImageRecord> {
        let b = fs::read(self.record_path(name)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Every image, newest first.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v: Vec<ImageRecord> = fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        v.sort_by(|a: &ImageRecord, b| b.pulled.cmp(&a.pulled).then(a.name.cmp(&b.name)));
        v
    }

    /// Removes an image's record and, when no other name uses it, its merged root. Layers stay
    /// until [`Store::prune`].
    pub fn remove(&self, name: &str) -> Result<ImageRecord, ImageError> {
        let rec = self
            .find(name)
            .ok_or_else(|| ImageError::NotPulled(name.to_string()))?;
        fs::remove_file(self.record_path(name))
            .map_err(|e| ImageError::Io(self.record_path(name), e))?;
        if !self
            .list()
            .iter()
            .any(|r| r.config_digest == rec.config_digest)
        {
            if let Ok(h) = checked_hex(&rec.config_digest) {
                let root = self.root.join("roots").join(h);
                let gone = self.staging("root-removed");
                if fs::rename(&root, &gone).is_ok() {
                    let _ = fs::remove_dir_all(&gone);
                }
            }
        }
        Ok(rec)
    }

    /// Removes layers and roots no image uses and staging left by dead processes; returns the
    /// bytes of layer data freed.
    pub fn prune(&self) -> Result<(u64, usize), ImageError> {
        let images = self.list();
        let mut freed = 0;
        let mut count = 0;
        for e in fs::read_dir(self.root.join("layers"))
            .map_err(|e| ImageError::Io(self.root.join("layers"), e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.trim_end_matches(".json");
            let id = format!("sha256:{hex}");
            if images.iter().any(|r| r.diff_ids.contains(&id)) {
                continue;
            }
            if e.path().is_dir() {
                freed += self.layer_size(&id);
                count += 1;
                let gone = self.staging("layer-removed");
                if fs::rename(e.path(), &gone).is_ok() {
                    let _ = fs::remove_dir_all(&gone);
                }
            } else {
                let _ = fs::remove_file(e.path());
            }
        }
        for e in fs::read_dir(self.root.join("roots"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = format!("sha256:{}", e.file_name().to_string_lossy());
            if !images.iter().any(|r| r.config_digest == id) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        for e in fs::read_dir(self.tmp()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('.').nth(1).and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            // Downloads (`*.partial`) are kept for resuming unless they are a day old.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|d| d.as_secs() > 86_400));
            let drop_it = if name.ends_with(".partial") {
                old
            } else {
                !alive
            };
            if drop_it {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        Ok((freed, count))
    }

    /// The root of `rec`: its layer itself for one layer that needs no merging (no
    /// whiteouts, no links into lower layers: most base images), otherwise the merged root,
    /// built on first use. Either is served read-only, so sharing the layer's inodes is safe.
    pub fn root(&self, rec: &ImageRecord) -> Result<PathBuf, ImageError> {
        if let [only] = rec.diff_ids.as_slice() {
            let l = self.layer_dir(only)?;
            if l.is_dir() && self.layer_meta(only).and_then(|m| m.markers) == Some(0) {
                return Ok(l);
            }
        }
        let dest = self
            .root
            .join("roots")
            .join(checked_hex(&rec.config_digest)?);
        if dest.is_dir() {
            return Ok(dest);
        }
        let mut layers = Vec::new();
        for d in &rec.diff_ids {
            let l = self.layer_dir(d)?;
            if !l.is_dir() {
                return Err(ImageError::MissingLayer(rec.name.clone(), d.clone()));
            }
            layers.push(l);
        }
        let stage = self.staging("root");
        let refs: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
        if let Err(e) = crate::merge::merge(&refs, &stage) {
            let _ = fs::remove_dir_all(&stage);
            return Err(ImageError::Io(stage, e));
        }
        if fs::rename(&stage, &dest).is_err() {
            let _ = fs::remove_dir_all(&stage);
            if !dest.is_dir() {
                return Err(ImageError::Io(
                    dest,
                    io::Error::other("could not publish the merged root"),
                ));
            }
        }
        Ok(dest)
    }
}

/// A layer unpacked and checked against its diff id, not yet in the store.
#[derive(Debug)]
pub struct StagedLayer {
    store: Store,
    diff_id: String,
    stage: PathBuf,
    unpacked: Option<Unpacked>,
}

impl StagedLayer {
    /// Moves the layer into the store; returns its bytes.
    pub fn publish(mut self) -> Result<u64, ImageError> {
        let u = self.unpacked.take().expect("staged layers are unpacked");
        self.store.publish_layer(&self.diff_id, &self.stage, &u)?;
        Ok(u.bytes)
    }
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if self.unpacked.is_some() || self.stage.exists() {
            let _ = fs::remove_dir_all(&self.stage);
        }
    }
}

/// Writes `data` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, data).map_err(|e| ImageError::Io(tmp.clone(), e))?;
    fs::rename(&tmp, path).map_err(|e| ImageError::Io(path.to_path_buf(), e))
}

/// Seconds since the epoch (the records' `pulled`).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
