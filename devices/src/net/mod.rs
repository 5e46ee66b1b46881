//! Network host transports.

pub mod tap;
