//! msb-netstack: the sandbox's userspace network stack. Planned: virtio-net frames into
//! smoltcp in any-IP mode, allowed flows relayed over host sockets, TLS interception with
//! secret placeholders, host→guest port publishing and a flow audit log (see DESIGN.md,
//! Network, and issue 5).
//!
//! Implemented so far, as plain functions with unit tests and fuzz targets: the sandbox
//! network's address plan and address groups ([`addr`]), the egress policy engine
//! ([`policy`]), and the DNS codec with the name↔address bindings domain rules match against
//! ([`dns`]). The device, the stack and the relays are not there yet: guests have loopback
//! only.
#![forbid(unsafe_code)]

pub mod addr;
pub mod dns;
pub mod policy;
