use super::*;
use crate::policy::{Flow, Policy, Preset};

fn obs(proto: Proto, ip: &str, port: Option<u16>, names: &[&str]) -> Observed {
    Observed {
        proto,
        ip: ip.parse().unwrap(),
        port,
        names: names.iter().map(|n| n.to_string()).collect(),
    }
}

fn tcp(ip: &str, port: u16, names: &[&str]) -> Observed {
    obs(Proto::Tcp, ip, Some(port), names)
}

fn udp(ip: &str, port: u16, names: &[&str]) -> Observed {
    obs(Proto::Udp, ip, Some(port), names)
}

fn icmp(ip: &str, names: &[&str]) -> Observed {
    obs(Proto::Icmp, ip, None, names)
}

fn learner(flows: &[Observed]) -> Learner {
    let mut l = Learner::new();
    for f in flows {
        l.flow(f.clone());
    }
    l
}

/// The suggestion read back the way `--policy FILE` reads it.
fn parse(text: &str) -> Policy {
    let mut p = Policy::default();
    p.merge_file("suggested.toml", text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(p.preset, Preset::None, "{text}");
    p
}

/// The allow list, as written.
fn rules(text: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct File {
        allow: Vec<String>,
    }
    toml::from_str::<File>(text).unwrap().allow
}

fn allows(p: &Policy, o: &Observed) -> bool {
    let names: Vec<&str> = o.names.iter().map(String::as_str).collect();
    p.decide(&Flow {
        proto: o.proto,
        ip: o.ip,
        port: o.port,
        names: &names,
        local: false,
    })
    .allowed
}

/// Every observed flow passes the suggestion, and none of `unseen` does.
fn round_trip(seen: &[Observed], unseen: &[Observed]) -> String {
    let text = learner(seen).suggest();
    let p = parse(&text);
    for o in seen {
        assert!(allows(&p, o), "observed {o:?} denied by\n{text}");
    }
    for o in unseen {
        assert!(!allows(&p, o), "unobserved {o:?} allowed by\n{text}");
    }
    text
}

#[test]
fn round_trip_web_workload() {
    let seen = [
        tcp("93.184.216.34", 443, &["a.example.com"]),
        tcp("93.184.216.35", 443, &["b.example.com"]),
        tcp("93.184.216.36", 443, &["example.com"]),
        tcp("140.82.112.6", 443, &["api.github.com"]),
        tcp("140.82.112.6", 22, &["github.com"]),
        tcp("1.1.1.1", 853, &[]),
        tcp("2606:4700::1111", 443, &[]),
        udp("162.159.200.1", 123, &["time.cloudflare.com"]),
        udp("129.6.15.28", 123, &[]),
        icmp("9.9.9.9", &[]),
        icmp("8.8.8.8", &["dns.google"]),
        icmp("2001:4860:4860::8888", &[]),
        tcp("45.33.32.156", 8000, &[]),
        tcp("45.33.32.156", 8001, &[]),
        tcp("45.33.32.156", 8002, &[]),
        tcp("45.33.32.156", 9000, &[]),
    ];
    let unseen = [
        // Another port.
        tcp("1.1.1.1", 854, &[]),
        tcp("93.184.216.34", 80, &["a.example.com"]),
        tcp("93.184.216.36", 80, &["example.com"]),
        tcp("140.82.112.6", 443, &["github.com"]),
        tcp("45.33.32.156", 7999, &[]),
        tcp("45.33.32.156", 8003, &[]),
        tcp("45.33.32.156", 9001, &[]),
        tcp("2606:4700::1111", 80, &[]),
        // Another protocol.
        udp("1.1.1.1", 853, &[]),
        udp("93.184.216.34", 443, &["a.example.com"]),
        tcp("162.159.200.1", 123, &["time.cloudflare.com"]),
        tcp("9.9.9.9", 443, &[]),
        icmp("1.1.1.1", &[]),
        icmp("140.82.112.6", &["api.github.com"]),
        udp("2001:4860:4860::8888", 53, &[]),
        // Another address or an unrelated name.
        tcp("1.0.0.1", 853, &[]),
        tcp("6.6.6.6", 443, &["evil.org"]),
        tcp("6.6.6.6", 443, &["example.org"]),
        tcp("6.6.6.6", 443, &["other.com"]),
        tcp("6.6.6.6", 443, &["gist.github.com"]),
        icmp("8.8.4.4", &[]),
    ];
    let text = round_trip(&seen, &unseen);
    let r = rules(&text);
    for want in [
        "tcp:example.com:443",
        "tcp:*.example.com:443",
        "tcp:api.github.com:443",
        "tcp:github.com:22",
        "udp:time.cloudflare.com:123",
        "icmp:dns.google",
        "tcp:1.1.1.1:853",
        "tcp:[2606:4700::1111]:443",
        "udp:129.6.15.28:123",
        "icmp:9.9.9.9",
        "icmp:2001:4860:4860::8888",
        "tcp:45.33.32.156:8000-8002",
        "tcp:45.33.32.156:9000",
    ] {
        assert!(r.iter().any(|x| x == want), "no {want} in\n{text}");
    }
    assert_eq!(r.len(), 13, "{text}");
}

#[test]
fn round_trip_siblings_under_public_suffixes_stay_apart() {
    let seen = [
        tcp("93.184.216.34", 443, &["a.com"]),
        tcp("93.184.216.35", 443, &["b.com"]),
        tcp("185.199.108.153", 443, &["x.github.io"]),
        tcp("185.199.109.153", 443, &["y.github.io"]),
        tcp("81.2.69.142", 443, &["a.co.uk"]),
        tcp("81.2.69.143", 443, &["b.co.uk"]),
    ];
    let unseen = [
        tcp("93.184.216.36", 443, &["other.com"]),
        tcp("185.199.110.153", 443, &["z.github.io"]),
        tcp("81.2.69.144", 443, &["c.co.uk"]),
        tcp("93.184.216.34", 443, &["sub.a.com"]),
    ];
    let text = round_trip(&seen, &unseen);
    let mut r = rules(&text);
    r.sort();
    assert_eq!(
        r,
        [
            "tcp:a.co.uk:443",
            "tcp:a.com:443",
            "tcp:b.co.uk:443",
            "tcp:b.com:443",
            "tcp:x.github.io:443",
            "tcp:y.github.io:443",
        ],
        "{text}"
    );
}

#[test]
fn round_trip_names_shared_by_addresses_and_flows_with_several_names() {
    // A CDN address several names resolved to, flows known by two names, IPv6 and IPv4 forms.
    let seen = [
        tcp("151.101.1.69", 443, &["pypi.org", "files.pythonhosted.org"]),
        tcp("151.101.1.69", 443, &["pypi.org"]),
        tcp(
            "151.101.65.69",
            443,
            &["files.pythonhosted.org", "pypi.org"],
        ),
        tcp("2a04:4e42::223", 443, &["pypi.org"]),
        tcp("::ffff:151.101.129.69", 80, &[]),
        udp("151.101.1.69", 443, &["pypi.org"]),
        udp("192.168.1.20", 5353, &["printer.lan"]),
    ];
    let unseen = [
        tcp("151.101.1.69", 80, &["pypi.org"]),
        tcp("151.101.1.69", 443, &["files.pythonhosted.org"]),
        tcp("151.101.129.69", 443, &[]),
        udp("192.168.1.20", 5354, &["printer.lan"]),
        udp("192.168.1.21", 5353, &[]),
    ];
    let text = round_trip(&seen, &unseen);
    let mut r = rules(&text);
    r.sort();
    // One name covers every named flow; the mapped address is written as the IPv4 one.
    assert_eq!(
        r,
        [
            "tcp:151.101.129.69:80",
            "tcp:pypi.org:443",
            "udp:printer.lan:5353",
            "udp:pypi.org:443",
        ],
        "{text}"
    );
    assert!(text.contains("#   files.pythonhosted.org\n"), "{text}");
}

/// A small deterministic generator, for a workload bigger than one writes by hand.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn generated(seed: u64, n: usize) -> Vec<Observed> {
    let mut g = Lcg(seed);
    let domains = [
        "example.com",
        "example.org",
        "corp.example.net",
        "co.uk",
        "github.io",
    ];
    let ports = [22, 53, 80, 443, 444, 445, 8080, 8081];
    (0..n)
        .map(|_| {
            let proto = [Proto::Tcp, Proto::Udp, Proto::Icmp][g.next(3) as usize];
            let ip = if g.next(2) == 0 {
                format!("45.{}.{}.{}", g.next(4), g.next(4), g.next(250) + 1)
            } else {
                format!("2a00:1450:{:x}::{:x}", g.next(4), g.next(250) + 1)
            };
            let names: Vec<String> = (0..g.next(3))
                .map(|_| {
                    let d = domains[g.next(domains.len() as u64) as usize];
                    match g.next(3) {
                        0 => d.to_string(),
                        1 => format!("h{}.{d}", g.next(6)),
                        _ => format!("h{}.s{}.{d}", g.next(3), g.next(3)),
                    }
                })
                .collect();
            Observed {
                proto,
                ip: ip.parse().unwrap(),
                port: (proto != Proto::Icmp).then(|| ports[g.next(ports.len() as u64) as usize]),
                names,
            }
        })
        .collect()
}

#[test]
fn round_trip_generated_workloads() {
    for seed in 1..=20 {
        let seen = generated(seed, 300);
        let unseen = [
            // Generated addresses are 45.0-3.*.* and 2a00:1450:0-3::*, ports from `ports`.
            tcp("45.0.0.1", 1, &[]),
            udp("45.0.0.1", 9, &["h1.example.com"]),
            tcp("45.200.0.1", 443, &[]),
            tcp("2a00:1450:9::1", 443, &[]),
            tcp("45.200.0.1", 443, &["unrelated.example.edu"]),
            tcp("45.200.0.1", 443, &["h1.other.co.uk"]),
            tcp("45.200.0.1", 443, &["other.github.io"]),
            icmp("45.200.9.9", &["example.edu"]),
        ];
        let text = round_trip(&seen, &unseen);
        assert!(!text.contains("\"tcp:*.co.uk"), "{text}");
        assert!(!text.contains("*.github.io"), "{text}");
    }
}

#[test]
fn siblings_collapse_into_a_suffix() {
    let text = learner(&[
        tcp("93.184.216.34", 443, &["a.example.com"]),
        tcp("93.184.216.35", 443, &["b.example.com"]),
    ])
    .suggest();
    assert_eq!(rules(&text), ["tcp:*.example.com:443"], "{text}");
    // The rule says what it stands for.
    assert!(
        text.contains("\"tcp:*.example.com:443\", # a.example.com, b.example.com"),
        "{text}"
    );
    let p = parse(&text);
    assert!(allows(&p, &tcp("93.184.216.36", 443, &["c.example.com"])));
    // `*.example.com` is strictly below: the parent itself is not allowed.
    assert!(!allows(&p, &tcp("93.184.216.36", 443, &["example.com"])));
}

#[test]
fn the_parent_keeps_its_own_rule_beside_the_suffix() {
    let text = learner(&[
        tcp("93.184.216.34", 443, &["example.com"]),
        tcp("93.184.216.35", 443, &["www.example.com"]),
        tcp("93.184.216.36", 443, &["api.example.com"]),
    ])
    .suggest();
    assert_eq!(
        rules(&text),
        ["tcp:example.com:443", "tcp:*.example.com:443"],
        "{text}"
    );
}

#[test]
fn collapse_goes_up_through_subtrees_but_not_past_the_registrable_domain() {
    let text = learner(&[
        tcp("93.184.216.34", 443, &["a.eu.example.co.uk"]),
        tcp("93.184.216.35", 443, &["b.eu.example.co.uk"]),
        tcp("93.184.216.36", 443, &["c.example.co.uk"]),
        tcp("93.184.216.37", 443, &["other.co.uk"]),
    ])
    .suggest();
    assert_eq!(
        rules(&text),
        ["tcp:*.example.co.uk:443", "tcp:other.co.uk:443"],
        "{text}"
    );
    // A lone deep name stays exact.
    let text = learner(&[
        tcp("93.184.216.34", 443, &["a.b.c.example.com"]),
        tcp("93.184.216.35", 443, &["d.example.com"]),
    ])
    .suggest();
    assert_eq!(
        rules(&text),
        ["tcp:a.b.c.example.com:443", "tcp:d.example.com:443"],
        "{text}"
    );
}

#[test]
fn public_suffix_siblings_do_not_collapse() {
    for (a, b) in [
        ("a.com", "b.com"),
        ("x.github.io", "y.github.io"),
        ("a.co.uk", "b.co.uk"),
        ("a.internal", "b.internal"),
    ] {
        let text = learner(&[
            tcp("93.184.216.34", 443, &[a]),
            tcp("93.184.216.35", 443, &[b]),
        ])
        .suggest();
        let mut r = rules(&text);
        r.sort();
        assert_eq!(
            r,
            [format!("tcp:{a}:443"), format!("tcp:{b}:443")],
            "{text}"
        );
    }
    assert!(!one_owner("com"));
    assert!(!one_owner("github.io"));
    assert!(!one_owner("co.uk"));
    assert!(one_owner("example.com"));
    assert!(one_owner("eu.example.co.uk"));
    assert!(one_owner("user.github.io"));
}

#[test]
fn siblings_with_other_ports_or_protocols_stay_apart() {
    let text = learner(&[
        tcp("93.184.216.34", 443, &["a.example.com"]),
        tcp("93.184.216.35", 80, &["b.example.com"]),
        udp("93.184.216.36", 443, &["c.example.com"]),
        tcp("93.184.216.37", 443, &["d.example.com"]),
        tcp("93.184.216.37", 80, &["d.example.com"]),
    ])
    .suggest();
    assert_eq!(
        rules(&text),
        [
            "tcp:a.example.com:443",
            "tcp:b.example.com:80",
            "udp:c.example.com:443",
            "tcp:d.example.com:80",
            "tcp:d.example.com:443",
        ],
        "{text}"
    );
    // The same port set does collapse.
    let text = learner(&[
        tcp("93.184.216.34", 80, &["a.example.com"]),
        tcp("93.184.216.34", 443, &["a.example.com"]),
        tcp("93.184.216.35", 443, &["b.example.com"]),
        tcp("93.184.216.35", 80, &["b.example.com"]),
    ])
    .suggest();
    assert_eq!(
        rules(&text),
        ["tcp:*.example.com:80", "tcp:*.example.com:443"],
        "{text}"
    );
}

#[test]
fn consecutive_ports_merge_into_ranges() {
    let mut flows: Vec<Observed> = (6000..=6010).map(|p| tcp("45.33.32.156", p, &[])).collect();
    flows.push(tcp("45.33.32.156", 6012, &[]));
    flows.push(tcp("45.33.32.156", 65535, &[]));
    flows.push(tcp("45.33.32.156", 65534, &[]));
    flows.push(udp("2a00:1450::1", 0, &[]));
    flows.push(udp("2a00:1450::1", 1, &[]));
    let text = learner(&flows).suggest();
    assert_eq!(
        rules(&text),
        [
            "tcp:45.33.32.156:6000-6010",
            "tcp:45.33.32.156:6012",
            "tcp:45.33.32.156:65534-65535",
            "udp:[2a00:1450::1]:0-1",
        ],
        "{text}"
    );
    parse(&text);
}

#[test]
fn names_that_read_as_groups_or_junk_get_no_rule() {
    let text = round_trip(
        &[
            tcp("45.33.32.156", 80, &["metadata"]),
            tcp("45.33.32.157", 80, &["host", "any"]),
            tcp("45.33.32.158", 80, &["bad name\n\"", "ok.example.com"]),
        ],
        &[
            tcp("169.254.169.254", 80, &["metadata"]),
            tcp("10.0.0.1", 80, &[]),
        ],
    );
    assert_eq!(
        rules(&text),
        [
            "tcp:ok.example.com:80",
            "tcp:45.33.32.156:80",
            "tcp:45.33.32.157:80"
        ],
        "{text}"
    );
    let mut l = Learner::new();
    l.dns("public");
    l.dns("x\ny");
    assert!(l.is_empty());
}

#[test]
fn resolved_names_never_connected_to_are_listed_not_allowed() {
    let mut l = learner(&[
        tcp("93.184.216.34", 443, &["a.example.com"]),
        tcp("93.184.216.35", 443, &["b.example.com"]),
    ]);
    for n in [
        "a.example.com",
        "unused.example.org",
        "c.example.com",
        "Mixed.Example.NET.",
    ] {
        l.dns(n);
    }
    let text = l.suggest();
    assert_eq!(rules(&text), ["tcp:*.example.com:443"], "{text}");
    assert!(text.contains("#   unused.example.org\n"), "{text}");
    assert!(text.contains("#   mixed.example.net\n"), "{text}");
    assert!(
        text.contains("#   c.example.com (covered by a rule above)\n"),
        "{text}"
    );
    assert!(!text.contains("#   a.example.com"), "{text}");
    let p = parse(&text);
    assert!(!p.decide_name("unused.example.org").allowed);
    assert!(p.decide_name("a.example.com").allowed);
}

#[test]
fn nothing_observed_is_a_valid_empty_allowlist() {
    let l = Learner::new();
    assert!(l.is_empty());
    let text = l.suggest();
    assert!(text.contains("msb-vmm learn mode"), "{text}");
    assert!(text.contains("msb-vmm run --policy FILE"), "{text}");
    assert!(rules(&text).is_empty(), "{text}");
    let p = parse(&text);
    assert!(p.rules.is_empty());
    assert!(!allows(&p, &tcp("1.1.1.1", 443, &[])));
    assert!(!allows(&p, &tcp("1.1.1.1", 443, &["example.com"])));
}

#[test]
fn output_is_the_same_whatever_the_order() {
    let mut flows = generated(7, 200);
    flows.push(tcp(
        "93.184.216.34",
        443,
        &["b.example.com", "a.example.com"],
    ));
    let names = ["z.example.org", "a.example.org", "example.net"];
    let mut a = learner(&flows);
    for n in names {
        a.dns(n);
    }
    let mut b = Learner::new();
    for n in names.iter().rev() {
        b.dns(n);
    }
    for f in flows.iter().rev() {
        let mut f = f.clone();
        f.names.reverse();
        b.flow(f.clone());
        // Seen twice: deduplicated.
        b.flow(f);
    }
    assert_eq!(a.flows.len(), b.flows.len());
    assert_eq!(a.suggest(), b.suggest());
    let mut c = Learner::new();
    let mut rotated = flows.clone();
    rotated.rotate_left(77);
    for f in rotated {
        c.flow(f);
    }
    for n in names {
        c.dns(n);
    }
    assert_eq!(a.suggest(), c.suggest());
}

#[test]
fn repeats_are_kept_once() {
    let mut l = Learner::new();
    for _ in 0..100 {
        l.flow(tcp("93.184.216.34", 443, &["example.com"]));
        l.flow(tcp(
            "::ffff:93.184.216.34",
            443,
            &["example.com", "EXAMPLE.com."],
        ));
        l.flow(icmp("1.1.1.1", &[]));
        // ICMP has no port: one given is ignored.
        l.flow(obs(Proto::Icmp, "1.1.1.1", Some(7), &[]));
        l.dns("example.com");
    }
    assert_eq!(l.flows.len(), 2);
    assert_eq!(l.names.len(), 1);
    assert_eq!(l.resolved.len(), 1);
    let text = l.suggest();
    assert_eq!(
        rules(&text),
        ["tcp:example.com:443", "icmp:1.1.1.1"],
        "{text}"
    );
    assert!(
        text.contains("Observed: 2 distinct flows, 1 names resolved"),
        "{text}"
    );
}

#[test]
fn memory_is_bounded_and_what_was_dropped_is_said() {
    let mut l = Learner::new();
    let flows: Vec<Observed> = (0..MAX_FLOWS + 100)
        .map(|i| tcp("45.33.32.156", i as u16 + 1, &[]))
        .collect();
    for f in &flows {
        l.flow(f.clone());
    }
    // A flow kept before the limit still dedups after it.
    l.flow(flows[0].clone());
    for i in 0..MAX_NAMES + 50 {
        l.dns(&format!("n{i}.example.com"));
    }
    assert_eq!(l.flows.len(), MAX_FLOWS);
    assert_eq!(l.names.len(), MAX_NAMES);
    assert_eq!((l.dropped_flows, l.dropped_names), (100, 50));
    // No room for its name: the flow is kept by its address.
    l.flows.pop_last();
    l.flow(tcp("45.33.32.157", 443, &["late.example.com"]));
    let text = l.suggest();
    assert!(
        text.contains("keeps 4096 distinct flows; 100 more flow records were not kept"),
        "{}",
        &text[..600]
    );
    assert!(
        text.contains("keeps 4096 names; 51 more name records were not kept"),
        "{}",
        &text[..600]
    );
    let p = parse(&text);
    assert!(allows(&p, &flows[0]));
    assert!(allows(&p, &tcp("45.33.32.157", 443, &["late.example.com"])));
    assert!(!allows(&p, &flows[MAX_FLOWS + 50]));
    // Consecutive ports: one range for all the kept ones.
    assert_eq!(
        rules(&text),
        ["tcp:45.33.32.156:1-4095", "tcp:45.33.32.157:443"]
    );
}

#[test]
fn choosing_names_covers_every_flow_with_few_names() {
    let text = learner(&[
        tcp("45.33.32.1", 443, &["a.example.org"]),
        tcp("45.33.32.2", 443, &["a.example.org", "zz.example.net"]),
        tcp("45.33.32.3", 443, &["m.example.edu", "zz.example.net"]),
        tcp("45.33.32.4", 443, &["zz.example.net", "y.example.edu"]),
        tcp(
            "45.33.32.5",
            443,
            &["long-name.example.info", "q.example.info"],
        ),
    ])
    .suggest();
    assert_eq!(
        rules(&text),
        [
            "tcp:q.example.info:443",
            "tcp:zz.example.net:443",
            "tcp:a.example.org:443",
        ],
        "{text}"
    );
}

#[test]
fn every_resolved_name_a_flow_used_resolves_again() {
    // Flows carrying several names: an address two resolved names point to, a CDN address
    // known by two resolved names and an SNI, and one known by two SNIs only.
    let seen = [
        tcp("93.184.216.34", 443, &["a.example.com", "cdn.example.net"]),
        tcp("93.184.216.34", 80, &["a.example.com"]),
        udp(
            "151.101.1.69",
            443,
            &["pypi.org", "files.pythonhosted.org", "sni.example.org"],
        ),
        tcp(
            "45.33.32.1",
            443,
            &["long-name.example.info", "x.example.info"],
        ),
        tcp("45.33.32.2", 8443, &["api.example.dev"]),
        icmp("8.8.8.8", &["dns.google"]),
    ];
    let resolved = [
        "a.example.com",
        "cdn.example.net",
        "pypi.org",
        "files.pythonhosted.org",
        "api.example.dev",
        "dns.google",
    ];
    let mut l = learner(&seen);
    for n in resolved {
        l.dns(n);
    }
    l.dns("unused.example.org");
    let text = l.suggest();
    let p = parse(&text);

    let mut r = rules(&text);
    r.sort();
    assert_eq!(
        r,
        [
            "icmp:dns.google",
            "tcp:a.example.com:443",
            "tcp:a.example.com:80",
            "tcp:api.example.dev:8443",
            "tcp:cdn.example.net:443",
            // Never resolved: the fewest names (here the shorter one) still.
            "tcp:x.example.info:443",
            "udp:files.pythonhosted.org:443",
            "udp:pypi.org:443",
        ],
        "{text}"
    );

    for n in resolved {
        assert!(
            p.decide_name(n).allowed,
            "{n} does not resolve under\n{text}"
        );
    }
    // Resolved but unused, or never resolved: no rule, so they do not resolve.
    for n in [
        "unused.example.org",
        "sni.example.org",
        "long-name.example.info",
    ] {
        assert!(!p.decide_name(n).allowed, "{n} resolves under\n{text}");
    }
    assert!(text.contains("#   unused.example.org\n"), "{text}");
    assert!(text.contains("#   sni.example.org\n"), "{text}");
    assert!(text.contains("#   long-name.example.info\n"), "{text}");
    assert!(!text.contains("#   cdn.example.net"), "{text}");
    assert!(!text.contains("#   files.pythonhosted.org"), "{text}");

    for o in &seen {
        assert!(allows(&p, o), "observed {o:?} denied by\n{text}");
        // A re-run that resolves any one of the flow's resolved names connects by it alone.
        let alone = o.names.iter().filter(|n| resolved.contains(&n.as_str()));
        for n in alone {
            let by_one = Observed {
                names: vec![n.clone()],
                ..o.clone()
            };
            assert!(allows(&p, &by_one), "{by_one:?} denied by\n{text}");
        }
        // Other ports stay denied, by whichever name.
        if let Some(port) = o.port {
            for other in [port.wrapping_add(1), 9] {
                let mut names = vec![o.names.clone()];
                names.extend(o.names.iter().map(|n| vec![n.clone()]));
                for names in names {
                    let moved = Observed {
                        port: Some(other),
                        names,
                        ..o.clone()
                    };
                    assert!(!allows(&p, &moved), "{moved:?} allowed by\n{text}");
                }
            }
        }
    }
}
