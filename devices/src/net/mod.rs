//! Host-side helpers for the netstack: the TAP transport and guest namespaces its host-transport
//! tests and `msb-bench net` use, and the allocator tuning the VMM applies before it starts a
//! netstack (kept here because `msb-netstack` has no unsafe code).

pub mod alloc;
pub mod tap;
