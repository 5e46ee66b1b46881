//! Host tier: a registry that wants a user (htpasswd): no credentials and wrong ones are each
//! one error naming the image and the fix, leaving nothing in the store; the right ones from a
//! Docker config file pull the image.
//!
//! Its own test binary: it points `DOCKER_CONFIG` at files it writes, and the process's
//! environment must not change under other tests' threads.

mod support;

use std::fs;
use std::path::Path;

use msb_image::{ImageError, Source, Store};
use support::*;

/// A Docker config file in `dir` holding `user:password` for `registry`, as `docker login`
/// writes it (base64 in `auths`).
fn docker_config(dir: &Path, registry: &str, user: &str, password: &str) {
    fs::create_dir_all(dir).unwrap();
    let auth = base64(format!("{user}:{password}").as_bytes());
    fs::write(
        dir.join("config.json"),
        serde_json::json!({ "auths": { registry: { "auth": auth } } }).to_string(),
    )
    .unwrap();
}

fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_registry_that_wants_a_user_gets_it_from_the_docker_config() {
    assert_eq!(base64(b"msb:pw"), "bXNiOnB3");
    let t = TempDir::new("creds");
    let reg = Registry::start_with_user(&t.0, Some(("msb", "right-password")));
    let layout_dir = t.0.join("layout");
    layout(
        &layout_dir,
        "1",
        host_arch(),
        &test_layers(),
        serde_json::Value::Null,
    );
    reg.push(&layout_dir, "1", "test/private");
    let name = format!("{}/test/private:1", reg.addr);
    let source = Source::parse(&name).unwrap();
    let store = Store::open(t.0.join("store")).unwrap();
    let left_nothing = |store: &Store| {
        assert!(store.list().is_empty());
        assert_eq!(files_in(&store.tmp()), 0, "nothing staged");
        assert_eq!(files_in(&store.path().join("layers")), 0, "no layer");
    };

    // No credentials at all: the registry's refusal, and how to give it some.
    let none = t.0.join("no-config");
    fs::create_dir_all(&none).unwrap();
    std::env::set_var("DOCKER_CONFIG", &none);
    let err = msb_image::pull(&store, &source, &opts()).unwrap_err();
    eprintln!("without credentials: {err}");
    assert!(matches!(err, ImageError::Registry { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&name), "names the image: {msg}");
    assert!(msg.contains("docker login"), "names the fix: {msg}");
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    left_nothing(&store);

    // The wrong password.
    let wrong = t.0.join("wrong-config");
    docker_config(&wrong, &reg.addr, "msb", "wrong-password");
    std::env::set_var("DOCKER_CONFIG", &wrong);
    let err = msb_image::pull(&store, &source, &opts()).unwrap_err();
    eprintln!("wrong credentials: {err}");
    let msg = err.to_string();
    assert!(msg.contains(&name) && msg.contains("docker login"), "{msg}");
    assert!(
        msg.contains("refused"),
        "says the credentials were refused: {msg}"
    );
    left_nothing(&store);

    // The right ones.
    let right = t.0.join("right-config");
    docker_config(&right, &reg.addr, "msb", "right-password");
    std::env::set_var("DOCKER_CONFIG", &right);
    let rec = msb_image::pull(&store, &source, &opts()).unwrap();
    assert_eq!(rec.diff_ids.len(), 2);
    assert!(store.root(&rec).unwrap().join("bin/busybox").exists());
}
