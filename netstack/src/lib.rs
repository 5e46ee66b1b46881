//! msb-netstack: the sandbox's userspace network stack. Planned: virtio-net frames into
//! smoltcp in any-IP mode, allowed flows relayed over host sockets, TLS interception with
//! secret placeholders, host→guest port publishing and a flow audit log (see DESIGN.md,
//! Network, and issue 5).
//!
//! Implemented so far: the sandbox network's address plan and address groups ([`addr`]), the
//! egress policy engine ([`policy`]), the kernel's word on which destinations are the host's
//! own ([`local`]), the DNS codec with the name↔address bindings domain
//! rules match against ([`dns`]), and the gateway itself ([`stack`]: smoltcp in any-IP mode,
//! TCP and UDP relayed through the policy, DNS answered and filtered), tested with the host
//! kernel as the guest through a TAP device in a network namespace (`msb_devices::net::tap`). Sandboxes
//! reach it through msb-vmm's virtio-net device.
#![forbid(unsafe_code)]

pub mod addr;
pub mod ca;
pub mod dns;
pub mod http1;
pub mod http2;
pub mod intercept;
pub mod learn;
pub mod limit;
pub mod local;
pub mod offload;
pub mod policy;
pub mod secrets;
pub mod sniff;
pub mod stack;
