//! `msb-vmm ca`: the installation's sandbox CA, the certificate guests trust when their TLS
//! is intercepted.

use anyhow::Context;
use msb_netstack::ca::{Ca, KEY_FILE};

/// Prints the CA's certificate (PEM), making the CA first if there is none, or a new one
/// with `regenerate` (guests and hosts that trusted the old one must be given the new one).
pub fn ca(regenerate: bool) -> anyhow::Result<u8> {
    let dir = msb_vmm::assets::ca_dir();
    let existed = dir.join(KEY_FILE).exists();
    let ca = if regenerate {
        Ca::create(&dir)
    } else {
        Ca::load_or_create(&dir)
    }
    .with_context(|| format!("the sandbox CA in {}", dir.display()))?;
    if regenerate || !existed {
        eprintln!(
            "msb-vmm: made a new sandbox CA in {} (key mode 0600)",
            dir.display()
        );
    }
    print!("{}", ca.cert_pem());
    Ok(0)
}
