//! Test tier 4: the real guest kernel and msb-init. Built only with `--features e2e`.
