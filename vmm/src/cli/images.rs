//! `msb-vmm pull`, `images`, `rmi` and `prune`: the OCI image cache.

use std::io::IsTerminal;

use anyhow::Context;
use msb_vmm::image::{self, PullOptions, Source};

/// Pull options from the flags; progress bars when stderr is a terminal.
pub fn pull_options(insecure: &[String], quiet: bool) -> PullOptions {
    PullOptions {
        insecure_registries: insecure.to_vec(),
        progress: !quiet && std::io::stderr().is_terminal(),
        verbose: !quiet,
    }
}

pub fn pull(name: &str, insecure: Vec<String>, quiet: bool) -> anyhow::Result<u8> {
    let store = image::store().context("the image cache")?;
    let src = Source::parse(name)?;
    let opts = pull_options(&insecure, quiet);
    let t = std::time::Instant::now();
    let rec = msb_image::pull(&store, &src, &opts)?;
    if matches!(src, Source::Registry(_)) {
        store.set_alias(name, &rec.name);
    }
    if !quiet {
        eprintln!(
            "msb-vmm: {} {} ({}, {} layer{}, {}) in {:.1} s",
            rec.name,
            rec.short_id(),
            rec.platform,
            rec.diff_ids.len(),
            if rec.diff_ids.len() == 1 { "" } else { "s" },
            human(rec.size),
            t.elapsed().as_secs_f64()
        );
    }
    println!("{}", rec.config_digest);
    Ok(0)
}

pub fn list(json: bool) -> anyhow::Result<u8> {
    let store = image::store().context("the image cache")?;
    let now = msb_image::store::now();
    if !json {
        println!(
            "{:<50} {:<12} {:>10} {:>8}",
            "IMAGE", "ID", "SIZE", "PULLED"
        );
    }
    for r in store.list() {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "name": r.name, "id": r.config_digest, "manifest": r.manifest_digest,
                    "platform": r.platform, "size": r.size, "layers": r.diff_ids.len(),
                    "pulled": r.pulled,
                })
            );
        } else {
            println!(
                "{:<50} {:<12} {:>10} {:>8}",
                r.name,
                r.short_id(),
                human(r.size),
                age(now.saturating_sub(r.pulled))
            );
        }
    }
    Ok(0)
}

pub fn rmi(name: &str) -> anyhow::Result<u8> {
    let store = image::store().context("the image cache")?;
    // As pulled, or as a reference that normalizes to it (`debian` for docker.io/library/...).
    let key = match msb_image::canonical_name(&store, name) {
        Ok(n) if store.find(&n).is_some() => n,
        _ => name.to_string(),
    };
    // Its root is what they run on.
    let users = super::daemon::sandboxes_using_image(&key);
    if !users.is_empty() {
        anyhow::bail!(
            "image {key} is in use by running sandbox {}: stop it first (msb-vmm stop NAME)",
            users.join(", ")
        );
    }
    let rec = store.remove(&key)?;
    eprintln!(
        "msb-vmm: removed {} ({}); `msb-vmm prune` frees layers no image uses",
        rec.name,
        rec.short_id()
    );
    Ok(0)
}

pub fn prune() -> anyhow::Result<u8> {
    let store = image::store().context("the image cache")?;
    let (bytes, layers) = store.prune()?;
    eprintln!("msb-vmm: removed {layers} unused layers ({})", human(bytes));
    Ok(0)
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn age(s: u64) -> String {
    match s {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
