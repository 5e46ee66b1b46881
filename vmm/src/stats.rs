//! What a sandbox uses, for `msb-vmm stats`, [`crate::sandbox::Sandbox::stats`] and the
//! Prometheus endpoint (`--metrics-socket`). Counters only grow; gauges are read at the time.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One reading of a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxStats {
    /// Seconds since the sandbox's agent answered.
    pub uptime_s: f64,
    pub cpus: u32,
    /// CPU time of the vCPU threads (guest time plus the exits they handle), seconds.
    pub vcpu_time_s: f64,
    pub memory: MemoryStats,
    /// Absent without a network.
    pub net: Option<NetStats>,
    /// One entry per virtio-fs share (`root`, `vol0`, ...).
    pub fs: Vec<FsStats>,
    /// From the agent; absent when it did not answer.
    pub guest: Option<GuestStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// The guest's RAM as configured.
    pub guest_bytes: u64,
    /// Guest RAM the host holds now (pages the guest touched and the host has not reclaimed).
    pub host_resident_bytes: u64,
}

/// The guest's own view (see [`msb_init::agent::GuestStats`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// `MemTotal - MemAvailable`.
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub processes: u64,
    pub execs_started: u64,
    pub execs_running: u64,
}

impl From<msb_init::agent::GuestStats> for GuestStats {
    fn from(g: msb_init::agent::GuestStats) -> GuestStats {
        GuestStats {
            memory_used_bytes: g.mem_total_kib.saturating_sub(g.mem_available_kib) * 1024,
            memory_total_bytes: g.mem_total_kib * 1024,
            processes: g.processes,
            execs_started: g.execs_started,
            execs_running: g.execs_running,
        }
    }
}

/// Out is guest → world, in is world → guest (Ethernet frames on the sandbox's link).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetStats {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
    /// Flows the guest opened that the policy allowed, and refusals (flows and DNS names).
    pub flows_out: u64,
    pub denials_out: u64,
    /// Connections and peers that came in through published ports.
    pub flows_in: u64,
    pub flows_open: u64,
    /// Flows a policy change ended.
    pub flows_cut: u64,
    pub dns_answered: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FsStats {
    /// The share's tag (`root`, `vol0`, ...) and guest path.
    pub tag: String,
    pub guest_path: String,
    pub ops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

impl SandboxStats {
    /// The human form `msb-vmm stats` prints.
    pub fn table(&self, name: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "sandbox {name}: up {:.0} s, {} vCPU, vCPU time {:.2} s",
            self.uptime_s, self.cpus, self.vcpu_time_s
        );
        let _ = write!(
            s,
            "memory   {} configured, {} resident on the host",
            human_bytes(self.memory.guest_bytes),
            human_bytes(self.memory.host_resident_bytes)
        );
        match &self.guest {
            Some(g) => {
                let _ = writeln!(
                    s,
                    ", {} in use by the guest",
                    human_bytes(g.memory_used_bytes)
                );
                let _ = writeln!(
                    s,
                    "guest    {} processes; execs: {} started, {} running",
                    g.processes, g.execs_started, g.execs_running
                );
            }
            None => {
                let _ = writeln!(s, "\nguest    the agent did not answer");
            }
        }
        match &self.net {
            Some(n) => {
                let _ = writeln!(
                    s,
                    "net out  {} in {} packets; {} flows allowed, {} denied",
                    human_bytes(n.bytes_out),
                    n.packets_out,
                    n.flows_out,
                    n.denials_out
                );
                let _ = writeln!(
                    s,
                    "net in   {} in {} packets; {} inbound (published) flows",
                    human_bytes(n.bytes_in),
                    n.packets_in,
                    n.flows_in
                );
                let _ = writeln!(
                    s,
                    "flows    {} open, {} cut by policy changes; {} DNS answers",
                    n.flows_open, n.flows_cut, n.dns_answered
                );
            }
            None => {
                let _ = writeln!(s, "net      none");
            }
        }
        for f in &self.fs {
            let _ = writeln!(
                s,
                "fs {:<5} {}: {} ops, {} read, {} written",
                f.tag,
                f.guest_path,
                f.ops,
                human_bytes(f.bytes_read),
                human_bytes(f.bytes_written)
            );
        }
        s
    }

    /// The Prometheus text exposition format (version 0.0.4), every series labelled with
    /// the sandbox's name.
    pub fn prometheus(&self, name: &str) -> String {
        let mut out = String::new();
        let label = format!("sandbox=\"{}\"", escape_label(name));
        let mut metric = |m: &str, kind: &str, help: &str, rows: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP msb_{m} {help}");
            let _ = writeln!(out, "# TYPE msb_{m} {kind}");
            for (extra, v) in rows {
                let _ = writeln!(out, "msb_{m}{{{label}{extra}}} {v}");
            }
        };
        let one = |v: f64| vec![(String::new(), v)];
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the sandbox was ready.",
            &one(self.uptime_s),
        );
        metric("vcpus", "gauge", "vCPUs.", &one(self.cpus.into()));
        metric(
            "vcpu_seconds_total",
            "counter",
            "CPU time of the vCPU threads.",
            &one(self.vcpu_time_s),
        );
        metric(
            "memory_guest_bytes",
            "gauge",
            "Guest RAM as configured.",
            &one(self.memory.guest_bytes as f64),
        );
        metric(
            "memory_host_resident_bytes",
            "gauge",
            "Guest RAM resident on the host.",
            &one(self.memory.host_resident_bytes as f64),
        );
        if let Some(g) = &self.guest {
            metric(
                "memory_guest_used_bytes",
                "gauge",
                "Memory in use in the guest (MemTotal - MemAvailable).",
                &one(g.memory_used_bytes as f64),
            );
            metric(
                "guest_processes",
                "gauge",
                "Processes in the guest.",
                &one(g.processes as f64),
            );
            metric(
                "execs_total",
                "counter",
                "Processes the agent started.",
                &one(g.execs_started as f64),
            );
            metric(
                "execs_running",
                "gauge",
                "Processes the agent started that still run.",
                &one(g.execs_running as f64),
            );
        }
        if let Some(n) = &self.net {
            let dir = |o: u64, i: u64| {
                vec![
                    (",direction=\"out\"".to_string(), o as f64),
                    (",direction=\"in\"".to_string(), i as f64),
                ]
            };
            metric(
                "net_bytes_total",
                "counter",
                "Bytes on the sandbox's link (out: guest to world).",
                &dir(n.bytes_out, n.bytes_in),
            );
            metric(
                "net_packets_total",
                "counter",
                "Frames on the sandbox's link.",
                &dir(n.packets_out, n.packets_in),
            );
            metric(
                "net_flows_total",
                "counter",
                "Flows allowed (out: opened by the guest; in: through published ports).",
                &dir(n.flows_out, n.flows_in),
            );
            metric(
                "net_denials_total",
                "counter",
                "Flows and DNS names the policy refused.",
                &one(n.denials_out as f64),
            );
            metric(
                "net_flows_open",
                "gauge",
                "Flows open now.",
                &one(n.flows_open as f64),
            );
            metric(
                "net_flows_cut_total",
                "counter",
                "Flows ended by a policy change.",
                &one(n.flows_cut as f64),
            );
        }
        let per_share = |f: fn(&FsStats) -> u64| -> Vec<(String, f64)> {
            self.fs
                .iter()
                .map(|s| (format!(",share=\"{}\"", escape_label(&s.tag)), f(s) as f64))
                .collect()
        };
        if !self.fs.is_empty() {
            metric(
                "fs_ops_total",
                "counter",
                "File-system requests served.",
                &per_share(|s| s.ops),
            );
            metric(
                "fs_read_bytes_total",
                "counter",
                "File bytes read by the guest.",
                &per_share(|s| s.bytes_read),
            );
            metric(
                "fs_written_bytes_total",
                "counter",
                "File bytes written by the guest.",
                &per_share(|s| s.bytes_written),
            );
        }
        out
    }
}

/// A label value as the exposition format wants it: `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SandboxStats {
        SandboxStats {
            uptime_s: 12.0,
            cpus: 2,
            vcpu_time_s: 0.5,
            memory: MemoryStats {
                guest_bytes: 512 << 20,
                host_resident_bytes: 40 << 20,
            },
            net: Some(NetStats {
                bytes_out: 1000,
                bytes_in: 3 << 20,
                flows_out: 4,
                denials_out: 1,
                ..Default::default()
            }),
            fs: vec![FsStats {
                tag: "root".into(),
                guest_path: "/".into(),
                ops: 77,
                bytes_read: 4096,
                bytes_written: 0,
            }],
            guest: Some(GuestStats {
                memory_used_bytes: 30 << 20,
                memory_total_bytes: 480 << 20,
                processes: 3,
                execs_started: 5,
                execs_running: 1,
            }),
        }
    }

    #[test]
    fn the_table_names_every_figure() {
        let t = sample().table("box");
        for want in [
            "sandbox box: up 12 s, 2 vCPU",
            "512.0 MiB configured, 40.0 MiB resident",
            "30.0 MiB in use by the guest",
            "execs: 5 started, 1 running",
            "net out  1000 B in 0 packets; 4 flows allowed, 1 denied",
            "net in   3.0 MiB",
            "fs root  /: 77 ops, 4.0 KiB read, 0 B written",
        ] {
            assert!(t.contains(want), "{want:?} missing from:\n{t}");
        }
    }

    #[test]
    fn prometheus_text_is_well_formed_and_labelled() {
        let p = sample().prometheus("a\"b");
        let mut families = 0;
        for line in p.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families += 1;
                assert!(
                    rest.ends_with(" gauge") || rest.ends_with(" counter"),
                    "{line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            // name{labels} value
            let (series, value) = line.rsplit_once(' ').expect(line);
            value.parse::<f64>().expect(line);
            assert!(
                series.starts_with("msb_") && series.contains("{sandbox=\"a\\\"b\""),
                "{line}"
            );
            assert!(series.ends_with('}'), "{line}");
        }
        assert!(families >= 15, "{p}");
        assert!(p.contains("msb_net_bytes_total{sandbox=\"a\\\"b\",direction=\"in\"} 3145728"));
        assert!(p.contains("msb_fs_ops_total{sandbox=\"a\\\"b\",share=\"root\"} 77"));
        assert!(p.contains("msb_execs_total{sandbox=\"a\\\"b\"} 5"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SandboxStats>(&j).unwrap(), s);
    }
}
