//! Images from local files: an OCI image layout directory and a `docker save` archive.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use crate::registry::file_digest;
use crate::store::{hex_of, prefix, ImageRecord, Store};
use crate::{host_platform, read_config, sha256, ImageError, Source};

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 16 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn bad(image: &str, why: impl Into<String>) -> ImageError {
    ImageError::BadImage {
        image: image.to_string(),
        why: why.into(),
    }
}

/// A blob of the layout, read whole and checked against its digest.
fn layout_blob(image: &str, dir: &Path, digest: &str) -> Result<Vec<u8>, ImageError> {
    let hex = hex_of(digest).ok_or_else(|| ImageError::BadDigest(digest.to_string()))?;
    let path = dir.join("blobs/sha256").join(hex);
    let f = fs::File::open(&path).map_err(|e| ImageError::Io(path.clone(), e))?;
    let mut data = Vec::new();
    f.take(MAX_JSON + 1)
        .read_to_end(&mut data)
        .map_err(|e| ImageError::Io(path.clone(), e))?;
    if data.len() as u64 > MAX_JSON {
        return Err(bad(
            image,
            format!("{digest} is too large for a JSON document"),
        ));
    }
    let actual = sha256(&data);
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            image: image.to_string(),
            what: format!("blob {digest}"),
            actual,
        });
    }
    Ok(data)
}

fn pick_platform<'a>(image: &str, ds: &'a [Descriptor]) -> Result<&'a Descriptor, ImageError> {
    let (os, arch) = host_platform();
    ds.iter()
        .find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
        })
        .ok_or_else(|| ImageError::NoPlatform(image.to_string(), format!("{os}/{arch}")))
}

/// One line per layer being unpacked (a large local image takes seconds), when `verbose`.
fn say_unpacking(verbose: bool, diff_id: &str) {
    if verbose {
        eprintln!(
            "unpacking layer {}",
            prefix(hex_of(diff_id).unwrap_or(diff_id), 12)
        );
    }
}

/// `oci:DIR[:TAG]`.
pub fn oci_layout(
    store: &Store,
    source: &Source,
    dir: &Path,
    tag: Option<&str>,
    verbose: bool,
) -> Result<ImageRecord, ImageError> {
    let name = source.name();
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(|e| ImageError::Io(index_path.clone(), e))?;
    let index: ImageIndex =
        serde_json::from_slice(&index_bytes).map_err(|e| bad(&name, format!("index.json: {e}")))?;
    let chosen = match tag {
        Some(t) => index
            .manifests()
            .iter()
            .find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|n| n == t)
            })
            .ok_or_else(|| bad(&name, format!("no image tagged {t} in the layout")))?,
        None if index.manifests().len() == 1 => &index.manifests()[0],
        None => {
            return Err(bad(
                &name,
                "the layout holds several images: name one as oci:DIR:TAG",
            ))
        }
    };
    let mut desc = chosen.clone();
    // A nested index (multi-platform image): take this host's manifest.
    if *desc.media_type() == MediaType::ImageIndex {
        let inner: ImageIndex =
            serde_json::from_slice(&layout_blob(&name, dir, desc.digest().as_ref())?)
                .map_err(|e| bad(&name, format!("nested index: {e}")))?;
        desc = pick_platform(&name, inner.manifests())?.clone();
    }
    let manifest_digest = desc.digest().to_string();
    let manifest: ImageManifest =
        serde_json::from_slice(&layout_blob(&name, dir, &manifest_digest)?)
            .map_err(|e| bad(&name, format!("manifest: {e}")))?;
    let config_digest = manifest.config().digest().to_string();
    let config = layout_blob(&name, dir, &config_digest)?;
    let (run, diff_ids, platform) = read_config(&name, &config)?;
    if diff_ids.len() != manifest.layers().len() {
        return Err(bad(
            &name,
            "the manifest and the config disagree on the number of layers",
        ));
    }
    for (l, d) in manifest.layers().iter().zip(&diff_ids) {
        let digest = l.digest().to_string();
        let hex = hex_of(&digest).ok_or_else(|| ImageError::BadDigest(digest.clone()))?;
        let path = dir.join("blobs/sha256").join(hex);
        if !store.has_layer(d) {
            let actual = file_digest(&path).map_err(|e| ImageError::Io(path.clone(), e))?;
            if actual != digest {
                return Err(ImageError::DigestMismatch {
                    image: name.clone(),
                    what: format!("layer {digest}"),
                    actual,
                });
            }
        }
        if !store.has_layer(d) {
            say_unpacking(verbose, d);
        }
        let blob = crate::unpack::open_blob(&path).map_err(|e| ImageError::Io(path.clone(), e))?;
        store.put_layer(&name, d, blob)?;
    }
    Ok(store.record(
        name,
        manifest_digest,
        config_digest,
        platform,
        diff_ids,
        run,
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Normalizes a path inside the archive (`./a/b` is `a/b`).
fn norm(p: &str) -> String {
    p.trim_start_matches("./").to_string()
}

/// `docker-archive:FILE[:TAG]` (`docker save` output, old and OCI-style).
pub fn docker_archive(
    store: &Store,
    source: &Source,
    file: &Path,
    tag: Option<&str>,
    verbose: bool,
) -> Result<ImageRecord, ImageError> {
    let name = source.name();
    let open = || -> Result<tar::Archive<std::io::BufReader<fs::File>>, ImageError> {
        let f = fs::File::open(file).map_err(|e| ImageError::Io(file.to_path_buf(), e))?;
        Ok(tar::Archive::new(std::io::BufReader::with_capacity(
            1 << 20,
            f,
        )))
    };
    let tar_err = |e: std::io::Error| bad(&name, format!("not a readable docker archive: {e}"));
    // Pass 1: the small JSON documents (manifest.json and the configs).
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut kept = 0u64;
    for e in open()?.entries().map_err(tar_err)? {
        let mut e = e.map_err(tar_err)?;
        let size = e.header().size().unwrap_or(u64::MAX);
        let path = norm(&String::from_utf8_lossy(&e.path_bytes()));
        let wanted =
            path == "manifest.json" || path.ends_with(".json") || path.starts_with("blobs/");
        if wanted
            && size <= MAX_JSON
            && kept + size <= 4 * MAX_JSON
            && e.header().entry_type().is_file()
        {
            let mut b = Vec::with_capacity(size as usize);
            e.read_to_end(&mut b).map_err(tar_err)?;
            kept += size;
            small.insert(path, b);
        }
    }
    let manifests: Vec<DockerManifest> = serde_json::from_slice(
        small
            .get("manifest.json")
            .ok_or_else(|| bad(&name, "no manifest.json: not `docker save` output"))?,
    )
    .map_err(|e| bad(&name, format!("manifest.json: {e}")))?;
    let m = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| {
                m.repo_tags
                    .iter()
                    .flatten()
                    .any(|rt| rt == t || rt.rsplit_once(':').is_some_and(|(_, tt)| tt == t))
            })
            .ok_or_else(|| bad(&name, format!("no image tagged {t} in the archive")))?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            return Err(bad(
                &name,
                "the archive holds several images: name one as docker-archive:FILE:TAG",
            ))
        }
    };
    let config = small.get(&norm(&m.config)).ok_or_else(|| {
        bad(
            &name,
            format!("config {} missing from the archive", m.config),
        )
    })?;
    let config_digest = sha256(config);
    // The config's file name is its digest (`HEX.json` or `blobs/sha256/HEX`): check it.
    let stem = norm(&m.config);
    let stem = stem
        .trim_end_matches(".json")
        .rsplit('/')
        .next()
        .unwrap_or("");
    if stem.len() == 64 && format!("sha256:{stem}") != config_digest {
        return Err(ImageError::DigestMismatch {
            image: name.clone(),
            what: format!("config {}", m.config),
            actual: config_digest,
        });
    }
    let (run, diff_ids, platform) = read_config(&name, config)?;
    if diff_ids.len() != m.layers.len() {
        return Err(bad(
            &name,
            "manifest.json and the config disagree on the number of layers",
        ));
    }
    // Pass 2: each needed layer straight from the archive into the store (the unpacker
    // checks it against its diff id).
    let mut wanted: HashMap<String, &String> = HashMap::new();
    for (l, d) in m.layers.iter().zip(&diff_ids) {
        if !store.has_layer(d) {
            wanted.insert(norm(l), d);
        }
    }
    if !wanted.is_empty() {
        for e in open()?.entries().map_err(tar_err)? {
            let e = e.map_err(tar_err)?;
            let path = norm(&String::from_utf8_lossy(&e.path_bytes()));
            if let Some(d) = wanted.remove(&path) {
                say_unpacking(verbose, d);
                store.put_layer(&name, d, e)?;
            }
            if wanted.is_empty() {
                break;
            }
        }
    }
    if let Some(missing) = wanted.keys().next() {
        return Err(bad(
            &name,
            format!("layer {missing} missing from the archive"),
        ));
    }
    Ok(store.record(
        name,
        sha256(small.get("manifest.json").map_or(&[][..], |v| v)),
        config_digest,
        platform,
        diff_ids,
        run,
    ))
}
