//! msb-netstack will hold the sandbox's userspace network stack: virtio-net frames into smoltcp
//! in any-IP mode, the egress policy engine (presets; rules by domain, suffix, IP, CIDR, port),
//! DNS answered and filtered by the gateway, TLS interception with secret placeholders, host→
//! guest port publishing, and the flow audit log (see DESIGN.md, Network, and issue 5).
//!
//! Implemented so far: the address plan and groups ([`addr`]), and the policy engine
//! ([`policy`]). The device, the stack and the relays are not there yet: guests have
//! loopback only.
#![forbid(unsafe_code)]

pub mod addr;
pub mod policy;
