//! msb-image: OCI images as sandbox roots.
//!
//! Pulls images from registries (the OCI distribution API, through `oci-client`), OCI image
//! layouts and `docker save` archives; verifies every blob against its digest; unpacks each
//! layer once into a content-addressed [`Store`]; and gives each image a merged root directory
//! (hard links into its layers) that the VMM serves to the guest under an in-memory overlay.
//! No VMM code here: the CLI and library of `msb-vmm` call [`pull`] and [`Store::root`].

use std::path::PathBuf;

use thiserror::Error;

mod archive;
pub mod merge;
pub mod reference;
mod registry;
pub mod store;
pub mod unpack;

pub use reference::{looks_like_path, Source};
pub use store::{ImageRecord, RunConfig, Store};
pub use unpack::UnpackError;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("'{0}' is not an image: {1}")]
    BadReference(String, String),
    #[error("{image}: {why}")]
    Registry { image: String, why: String },
    #[error("{image}: {what} does not match its digest (got {actual})")]
    DigestMismatch {
        image: String,
        what: String,
        actual: String,
    },
    #[error("{image}: layer {layer}: {err}")]
    Layer {
        image: String,
        layer: String,
        err: UnpackError,
    },
    #[error("{image}: {why}")]
    BadImage { image: String, why: String },
    #[error("{0}: no manifest for {1} (the image is built for other platforms only)")]
    NoPlatform(String, String),
    #[error("'{0}' is not a sha256 digest")]
    BadDigest(String),
    #[error("image {0} is not pulled (run `msb-vmm pull {0}`)")]
    NotPulled(String),
    #[error("image {0}: layer {1} is missing from the cache (pull the image again)")]
    MissingLayer(String, String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`HOST[:PORT]`) spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Progress bars on stderr (a terminal); otherwise one line per layer when `verbose`.
    pub progress: bool,
    /// Plain progress lines on stderr.
    pub verbose: bool,
}

/// The platform images are resolved to: this host's (`linux/amd64`, `linux/arm64`).
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Pulls (or imports) `source` into `store` and returns its record, with its merged root made.
/// An image whose manifest is already in the store is only checked, not fetched again.
pub fn pull(store: &Store, source: &Source, opts: &PullOptions) -> Result<ImageRecord, ImageError> {
    let rec = match source {
        Source::Registry(r) => registry::pull(store, r, opts)?,
        Source::OciLayout { dir, tag } => {
            archive::oci_layout(store, source, dir, tag.as_deref(), opts.verbose)?
        }
        Source::DockerArchive { file, tag } => {
            archive::docker_archive(store, source, file, tag.as_deref(), opts.verbose)?
        }
    };
    store.root(&rec)?;
    store.save(&rec)?;
    Ok(rec)
}

/// The image named `name` from the store, pulled first when it is not there.
pub fn get_or_pull(
    store: &Store,
    name: &str,
    opts: &PullOptions,
) -> Result<ImageRecord, ImageError> {
    if let Some(rec) = cached(store, name) {
        return Ok(rec);
    }
    let source = Source::parse(name)?;
    if let Some(rec) = store.find(&source.name()) {
        if rec.diff_ids.iter().all(|d| store.has_layer(d)) {
            store.set_alias(name, &rec.name);
            return Ok(rec);
        }
    }
    // Said before anything else, so a sandbox's start that has to pull first says why it waits.
    if opts.verbose || opts.progress {
        eprintln!("msb-vmm: pulling {name}");
    }
    let rec = pull(store, &source, opts)?;
    if matches!(source, Source::Registry(_)) {
        store.set_alias(name, &rec.name);
    }
    Ok(rec)
}

/// The image `name` names if the store has it whole, found without parsing `name`: a
/// registry reference is told by a regular expression whose first use costs milliseconds,
/// and this runs on every sandbox start.
pub fn cached(store: &Store, name: &str) -> Option<ImageRecord> {
    let rec = if name.starts_with("oci:") || name.starts_with("docker-archive:") {
        store.find(&Source::parse(name).ok()?.name())?
    } else {
        // Typed in full, or as a pull recorded it.
        match store.find(name) {
            Some(r) => r,
            None => store.find(&store.alias(name)?)?,
        }
    };
    rec.diff_ids
        .iter()
        .all(|d| store.has_layer(d))
        .then_some(rec)
}

/// The name the store keys `name` by (through the alias a pull recorded when there is one).
pub fn canonical_name(store: &Store, name: &str) -> Result<String, ImageError> {
    if let Some(rec) = cached(store, name) {
        return Ok(rec.name);
    }
    Ok(Source::parse(name)?.name())
}

/// Parses an image config blob (checked against its digest by the caller) into a record's
/// run settings and layer list, refusing an image for another platform.
pub(crate) fn read_config(
    image: &str,
    bytes: &[u8],
) -> Result<(RunConfig, Vec<String>, String), ImageError> {
    use oci_spec::image::ImageConfiguration;
    let bad = |why: String| ImageError::BadImage {
        image: image.to_string(),
        why,
    };
    let cfg: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("unreadable config: {e}")))?;
    let platform = format!("{}/{}", cfg.os(), cfg.architecture());
    let (os, arch) = host_platform();
    if platform != format!("{os}/{arch}") {
        return Err(ImageError::NoPlatform(
            image.to_string(),
            format!("{os}/{arch}"),
        ));
    }
    let diff_ids = cfg.rootfs().diff_ids().clone();
    for d in &diff_ids {
        store::hex_of(d).ok_or_else(|| bad(format!("bad layer diff id {d:?}")))?;
    }
    let mut run = RunConfig::default();
    if let Some(c) = cfg.config() {
        run.env = c.env().clone().unwrap_or_default();
        run.entrypoint = c.entrypoint().clone().unwrap_or_default();
        run.cmd = c.cmd().clone().unwrap_or_default();
        run.working_dir = c.working_dir().clone().filter(|w| !w.is_empty());
        run.user = c.user().clone().filter(|u| !u.is_empty());
    }
    Ok((run, diff_ids, platform))
}

/// `sha256:HEX` of `data`.
pub(crate) fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}
