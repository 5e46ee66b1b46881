//! An image layer is hostile input (any registry, any archive): the unpacker and the merge
//! must never panic, never write outside the layer directory, and stay within their limits.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use msb_image::unpack::{unpack, Limits};

fn base() -> PathBuf {
    std::env::temp_dir().join(format!("msb-fuzz-image-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let layer = base.join("layer");
    std::fs::create_dir(&layer).unwrap();
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 256,
        max_path: 4096,
    };
    if unpack(data, &layer, limits).is_ok() {
        let _ = msb_image::merge::merge(&[&layer], &base.join("root"));
    }
    // Nothing beside the layer and the merged root: no escape.
    for e in std::fs::read_dir(&base).unwrap() {
        let name = e.unwrap().file_name();
        assert!(name == "layer" || name == "root", "wrote {name:?} outside the layer");
    }
    let _ = std::fs::remove_dir_all(&base);
});
