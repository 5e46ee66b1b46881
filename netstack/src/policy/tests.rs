use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rule(s: &str) -> Rule {
    Rule::parse(Action::Allow, s, s).unwrap()
}

fn flow<'a>(proto: Proto, ip_: &str, port: u16, names: &'a [&'a str]) -> Flow<'a> {
    Flow {
        proto,
        ip: ip(ip_),
        port: Some(port),
        names,
        local: false,
    }
}

/// A flow to an address the host kernel delivers locally (one of the host's own).
fn to_host<'a>(proto: Proto, ip_: &str, port: u16, names: &'a [&'a str]) -> Flow<'a> {
    Flow {
        local: true,
        ..flow(proto, ip_, port, names)
    }
}

#[test]
fn rules_parse_every_destination_kind() {
    let r = rule("tcp:*.github.com:443");
    assert_eq!(
        (r.proto, &r.dest, r.ports),
        (
            Proto::Tcp,
            &Dest::Suffix("github.com".into()),
            Some(Ports { lo: 443, hi: 443 })
        )
    );
    assert_eq!(
        rule("10.0.0.0/8").dest,
        Dest::Cidr(Cidr::parse("10.0.0.0/8").unwrap())
    );
    let r = rule("udp:1.1.1.1:53");
    assert_eq!((r.proto, r.ports.unwrap().lo), (Proto::Udp, 53));
    assert_eq!(rule("host:8080").dest, Dest::Group(Group::Host));
    assert_eq!(rule("metadata").dest, Dest::Group(Group::Metadata));
    assert_eq!(rule("any").dest, Dest::Any);
    assert_eq!(rule("*:80").dest, Dest::Any);
    assert_eq!(
        rule("Example.COM.").dest,
        Dest::Domain("example.com".into())
    );
    assert_eq!(
        rule("bücher.de").dest,
        Dest::Domain("xn--bcher-kva.de".into())
    );
    assert_eq!(rule("2001:db8::1").ports, None);
    assert_eq!(rule("2001:db8::/32").ports, None);
    assert_eq!(rule("fd00:1:2:3:4:5:6:7/64").ports, None);
    let r = rule("tcp:[2001:db8::1]:8000-9000");
    assert_eq!(r.ports, Some(Ports { lo: 8000, hi: 9000 }));
    assert_eq!(r.dest, Dest::Cidr(Cidr::parse("2001:db8::1/128").unwrap()));
    assert_eq!(rule("icmp:8.8.8.8").proto, Proto::Icmp);
    for bad in [
        "",
        "tcp:",
        "tcp:example.com:0-",
        "tcp:example.com:99999",
        "tcp:example.com:9-1",
        "icmp:8.8.8.8:1",
        "[10.0.0.1]:80",
        "[2001:db8::1",
        "exa mple.com",
        "a..b",
        "10.0.0.0/40",
        "*.",
        &"a".repeat(64),
        "-",
    ] {
        assert!(
            Rule::parse(Action::Deny, bad, "t").is_err(),
            "{bad:?} parsed"
        );
    }
}

#[test]
fn deny_wins_over_allow_whatever_the_order() {
    let mut p = Policy::preset(Preset::All);
    p.add_flag(Action::Allow, "tcp:10.1.2.3:443").unwrap();
    p.add_flag(Action::Deny, "10.0.0.0/8").unwrap();
    let d = p.decide(&flow(Proto::Tcp, "10.1.2.3", 443, &[]));
    assert_eq!(d.to_string(), "denied by --deny 10.0.0.0/8");
    let d = p.decide(&flow(Proto::Tcp, "192.168.1.1", 443, &[]));
    assert_eq!(d.to_string(), "allowed by preset all (private address)");
}

#[test]
fn presets() {
    let cases = [
        ("1.1.1.1", [false, true, true, true]),
        ("10.0.0.1", [false, false, true, true]),
        ("127.0.0.1", [false, false, false, false]),
        ("169.254.3.4", [false, false, true, false]),
        ("169.254.169.254", [false, false, true, false]),
        ("10.0.2.2", [false, false, false, false]),
        ("224.0.0.1", [false, false, false, false]),
        ("::ffff:127.0.0.1", [false, false, false, false]),
    ];
    for (addr, want) in cases {
        for (preset, want) in [Preset::None, Preset::Public, Preset::All, Preset::NonLocal]
            .into_iter()
            .zip(want)
        {
            let d = Policy::preset(preset).decide(&flow(Proto::Tcp, addr, 80, &[]));
            assert_eq!(d.allowed, want, "{addr} under {}: {d}", preset.name());
        }
    }
}

#[test]
fn host_is_denied_unless_allowed_and_ports_and_protocols_matter() {
    let mut p = Policy::preset(Preset::All);
    assert!(!p.decide(&flow(Proto::Tcp, "10.0.2.2", 8080, &[])).allowed);
    p.add_flag(Action::Allow, "host:8080").unwrap();
    assert!(p.decide(&flow(Proto::Tcp, "10.0.2.2", 8080, &[])).allowed);
    assert!(p.decide(&flow(Proto::Udp, "10.0.2.2", 8080, &[])).allowed);
    assert!(!p.decide(&flow(Proto::Tcp, "10.0.2.2", 8081, &[])).allowed);
    let mut p = Policy::preset(Preset::None);
    p.add_flag(Action::Allow, "udp:1.1.1.1:53").unwrap();
    assert!(p.decide(&flow(Proto::Udp, "1.1.1.1", 53, &[])).allowed);
    assert!(!p.decide(&flow(Proto::Tcp, "1.1.1.1", 53, &[])).allowed);
    let icmp = Flow {
        proto: Proto::Icmp,
        ip: ip("1.1.1.1"),
        port: None,
        names: &[],
        local: false,
    };
    assert!(!p.decide(&icmp).allowed, "a ported rule never matches ICMP");
}

#[test]
fn domain_rules_match_the_names_a_flow_carries() {
    let mut p = Policy::preset(Preset::None);
    p.add_flag(Action::Allow, "tcp:*.github.com:443").unwrap();
    p.add_flag(Action::Allow, "example.org").unwrap();
    let gh = ["api.github.com"];
    assert!(
        p.decide(&flow(Proto::Tcp, "140.82.112.5", 443, &gh))
            .allowed
    );
    assert!(
        !p.decide(&flow(Proto::Tcp, "140.82.112.5", 443, &["github.com"]))
            .allowed
    );
    assert!(
        !p.decide(&flow(Proto::Tcp, "140.82.112.5", 443, &["evilgithub.com"]))
            .allowed
    );
    assert!(
        !p.decide(&flow(Proto::Tcp, "140.82.112.5", 443, &[]))
            .allowed
    );
    assert!(!p.decide(&flow(Proto::Tcp, "140.82.112.5", 80, &gh)).allowed);
    assert!(
        p.decide(&flow(Proto::Udp, "93.184.215.14", 9, &["example.org"]))
            .allowed
    );
    assert!(
        !p.decide(&flow(Proto::Tcp, "93.184.215.14", 9, &["www.example.org"]))
            .allowed
    );
}

#[test]
fn dns_names_and_answers() {
    let mut p = Policy::preset(Preset::Public);
    p.add_flag(Action::Deny, "*.tracker.example").unwrap();
    p.add_flag(Action::Deny, "tcp:blocked-port.example:25")
        .unwrap();
    assert!(!p.decide_name("ads.tracker.example").allowed);
    assert!(p.decide_name("blocked-port.example").allowed);
    assert!(p.decide_name("anything.example").allowed);
    // Rebinding: a public name answering with a private address is refused under `public`.
    let d = p.decide_answer("evil.example", ip("192.168.1.10"), false);
    assert!(!d.allowed && d.reason.contains("rebinding"), "{d}");
    assert!(
        !p.decide_answer("evil.example", ip("::ffff:127.0.0.1"), false)
            .allowed
    );
    assert!(
        p.decide_answer("good.example", ip("93.184.215.14"), false)
            .allowed
    );
    // ...unless the user opted in for that address or that name.
    p.add_flag(Action::Allow, "internal.corp.example").unwrap();
    assert!(
        p.decide_answer("internal.corp.example", ip("10.1.1.1"), false)
            .allowed
    );
    p.add_flag(Action::Allow, "tcp:192.168.1.0/24:22").unwrap();
    assert!(
        p.decide_answer("evil.example", ip("192.168.1.10"), false)
            .allowed
    );
    // A name never opts in the host (here its loopback, the gateway) or loopback: only `host` does.
    assert!(
        !p.decide_answer("internal.corp.example", ip("10.0.2.2"), false)
            .allowed
    );
    assert!(
        !p.decide_answer("internal.corp.example", ip("127.0.0.1"), false)
            .allowed
    );
    p.add_flag(Action::Allow, "host").unwrap();
    assert!(
        p.decide_answer("internal.corp.example", ip("10.0.2.2"), false)
            .allowed
    );
    // Under `none`, only named domains resolve.
    let mut n = Policy::preset(Preset::None);
    n.add_flag(Action::Allow, "tcp:*.pypi.org:443").unwrap();
    assert!(n.decide_name("files.pypi.org").allowed);
    assert!(!n.decide_name("example.com").allowed);
    assert!(
        n.decide_answer("files.pypi.org", ip("151.101.0.223"), false)
            .allowed
    );
}

#[test]
fn policy_files_parse_and_errors_name_the_line() {
    let mut p = Policy::default();
    p.merge_file(
        "p.toml",
        "# egress\npreset = \"none\"\nallow = [\n  \"tcp:*.github.com:443\",\n  \"udp:1.1.1.1:53\",\n]\ndeny = [\"metadata\"]\n",
    )
    .unwrap();
    assert_eq!(p.preset, Preset::None);
    assert_eq!(p.rules.len(), 3);
    assert_eq!(p.rules[0].origin, "p.toml:7");
    assert_eq!(p.rules[1].origin, "p.toml:4");
    assert_eq!(p.rules[2].origin, "p.toml:5");
    let err = |text: &str| {
        Policy::default()
            .merge_file("p.toml", text)
            .unwrap_err()
            .to_string()
    };
    let e = err("preset = \"public\"\nalow = [\"x.com\"]\n");
    assert!(e.starts_with("p.toml:2: unknown field `alow`"), "{e}");
    let e = err("preset = \"pubic\"\n");
    assert!(e.starts_with("p.toml:1: unknown network preset"), "{e}");
    let e = err("\n\nallow = [\"tcp:x.com:http\"]\n");
    assert!(e.starts_with("p.toml:3: bad rule"), "{e}");
    let e = err("allow = \"x.com\"\n");
    assert!(e.starts_with("p.toml:1:"), "{e}");
    let e = err("allow = [\n");
    assert!(e.starts_with("p.toml:"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn normalization() {
    assert_eq!(
        normalize_domain("WWW.Example.com."),
        Some("www.example.com".into())
    );
    assert_eq!(
        normalize_domain("_dmarc.example.com"),
        Some("_dmarc.example.com".into())
    );
    assert_eq!(normalize_domain("1.2.3.4"), None);
    assert_eq!(normalize_domain(".."), None);
    assert_eq!(normalize_domain(&format!("{}.com", "a".repeat(250))), None);
    assert_eq!(normalize_domain("a\0b.com"), None);
}

/// Any address of the host's own is `host`: no preset reaches it, nor `any`, a CIDR, the
/// address itself or a domain; a `host` rule does, for its ports only; deny rules still deny.
#[test]
fn the_hosts_own_addresses_are_the_host_whatever_their_range() {
    for addr in [
        "192.168.1.5",
        "81.2.69.142",
        "2a02:8070::5",
        "fe80::1",
        "fd42::1",
    ] {
        for preset in [Preset::None, Preset::Public, Preset::All, Preset::NonLocal] {
            let d = Policy::preset(preset).decide(&to_host(Proto::Tcp, addr, 80, &[]));
            assert!(!d.allowed, "{addr} under {}: {d}", preset.name());
            assert!(d.reason.contains(&format!("host address {addr}")), "{d}");
        }
    }
    // The same addresses, not the host's, are their ranges' (the preset decides).
    assert!(
        Policy::preset(Preset::Public)
            .decide(&flow(Proto::Tcp, "81.2.69.142", 80, &[]))
            .allowed
    );
    assert!(
        Policy::preset(Preset::All)
            .decide(&flow(Proto::Tcp, "192.168.1.5", 80, &[]))
            .allowed
    );
    let names = ["lan.example"];
    for r in [
        "any",
        "192.168.0.0/16",
        "192.168.1.5",
        "tcp:192.168.1.5:80",
        "lan.example",
        "private",
    ] {
        let mut p = Policy::preset(Preset::All);
        p.add_flag(Action::Allow, r).unwrap();
        let d = p.decide(&to_host(Proto::Tcp, "192.168.1.5", 80, &names));
        assert!(
            !d.allowed && !d.by_rule,
            "--allow {r} reached the host: {d}"
        );
        assert!(
            p.decide(&flow(Proto::Tcp, "192.168.1.5", 80, &names))
                .allowed,
            "{r}"
        );
    }
    let mut p = Policy::preset(Preset::None);
    p.add_flag(Action::Allow, "tcp:host:8080").unwrap();
    assert!(
        p.decide(&to_host(Proto::Tcp, "192.168.1.5", 8080, &[]))
            .allowed
    );
    assert!(
        p.decide(&to_host(Proto::Tcp, "2a02:8070::5", 8080, &[]))
            .allowed
    );
    assert!(
        !p.decide(&to_host(Proto::Tcp, "192.168.1.5", 8081, &[]))
            .allowed
    );
    assert!(
        !p.decide(&to_host(Proto::Udp, "192.168.1.5", 8080, &[]))
            .allowed
    );
    // IPv6 forms of a host IPv4 address are that address (the caller asks the kernel about
    // the canonical form).
    assert!(
        p.decide(&to_host(Proto::Tcp, "::ffff:192.168.1.5", 8080, &[]))
            .allowed
    );
    assert!(
        !p.decide(&to_host(Proto::Tcp, "64:ff9b::c0a8:105", 80, &[]))
            .allowed
    );
    // A host rule does not make the host's addresses anything but the host.
    assert!(
        !p.decide(&flow(Proto::Tcp, "192.168.1.5", 8080, &[]))
            .allowed
    );
    p.add_flag(Action::Deny, "192.168.0.0/16").unwrap();
    let d = p.decide(&to_host(Proto::Tcp, "192.168.1.5", 8080, &[]));
    assert!(!d.allowed && d.reason == "--deny 192.168.0.0/16", "{d}");
    // The guest's loopback range stays the guest's, though the host kernel delivers it too.
    let mut p = Policy::preset(Preset::All);
    p.add_flag(Action::Allow, "host").unwrap();
    assert!(!p.decide(&to_host(Proto::Tcp, "127.0.0.1", 80, &[])).allowed);
}

#[test]
fn dns_answers_naming_the_hosts_own_addresses_are_refused() {
    let mut p = Policy::preset(Preset::Public);
    p.add_flag(Action::Allow, "lan.example").unwrap();
    p.add_flag(Action::Allow, "81.2.69.0/24").unwrap();
    assert!(
        p.decide_answer("www.example", ip("81.2.69.142"), false)
            .allowed
    );
    let d = p.decide_answer("www.example", ip("81.2.69.142"), true);
    assert!(
        !d.allowed && d.reason.contains("host address 81.2.69.142"),
        "{d}"
    );
    assert!(
        !p.decide_answer("lan.example", ip("192.168.1.5"), true)
            .allowed
    );
    p.add_flag(Action::Allow, "host:8080").unwrap();
    assert!(
        p.decide_answer("lan.example", ip("192.168.1.5"), true)
            .allowed
    );
}

#[test]
fn policy_files_name_secrets_and_the_violation_mode() {
    let mut p = Policy::default();
    let text = "on_violation = \"log\"\n\n[[secret]]\nname = \"OPENAI_API_KEY\"\nhosts = [\"api.openai.com\"]\n\n[[secret]]\nname = \"GH\"\nhosts = [\"*.github.com\"]\nfile = \"/run/gh\"\n";
    p.merge_file("p.toml", text).unwrap();
    assert_eq!(p.on_violation.as_deref(), Some("log"));
    assert_eq!(p.secrets.len(), 2);
    assert_eq!(p.secrets[0].name, "OPENAI_API_KEY");
    assert_eq!(p.secrets[0].origin, "p.toml:3");
    assert_eq!(p.secrets[1].file.as_deref(), Some("/run/gh"));
    let mut q = Policy::default();
    let e = q
        .merge_file(
            "p.toml",
            "[[secret]]\nname = \"K\"\nhosts = [\"not a host\"]\n",
        )
        .unwrap_err();
    assert!(
        e.to_string().starts_with("p.toml:1: secret K: bad host"),
        "{e}"
    );
    let e = q
        .merge_file("p.toml", "\non_violation = \"warn\"\n")
        .unwrap_err();
    assert!(e.to_string().starts_with("p.toml:2: on_violation"), "{e}");
    let e = q
        .merge_file("p.toml", "[[secret]]\nname = \"K\"\nhost = [\"a.test\"]\n")
        .unwrap_err();
    assert!(e.to_string().contains("unknown field `host`"), "{e}");
}

#[test]
fn a_rule_spec_parses_back_to_the_same_rule() {
    for text in [
        "tcp:*.github.com:443",
        "udp:1.1.1.1:53",
        "icmp:example.com",
        "10.0.0.0/8",
        "tcp:[2001:db8::/32]:443-450",
        "tcp:[2001:db8::1]:80",
        "2001:db8::1",
        "host:8080",
        "any",
        "any:tcp",
        "metadata",
        "example.org:1-1024",
    ] {
        let r = Rule::parse(Action::Allow, text, "t").unwrap();
        let again = Rule::parse(Action::Allow, &r.spec(), "t").unwrap();
        assert_eq!(r, again, "{text} -> {}", r.spec());
    }
}

#[test]
fn the_policy_in_force_reads_back_as_a_policy_file() {
    let mut p = Policy::preset(Preset::None);
    p.add_flag(Action::Allow, "tcp:*.github.com:443").unwrap();
    p.add_flag(Action::Deny, "10.0.0.0/8").unwrap();
    p.merge_file(
        "p.toml",
        "allow = [\"udp:1.1.1.1:53\"]\n[[secret]]\nname = \"TOKEN\"\nhosts = [\"api.example.com\"]\n",
    )
    .unwrap();
    let text = p.to_toml();
    assert!(
        text.contains("\"tcp:*.github.com:443\",  # --allow tcp:*.github.com:443"),
        "{text}"
    );
    assert!(text.contains("# p.toml:1"), "{text}");
    let mut back = Policy::default();
    back.merge_file("shown.toml", &text).unwrap();
    assert_eq!(back.preset, p.preset);
    let specs = |q: &Policy| -> Vec<(Action, String)> {
        let mut v: Vec<_> = q.rules.iter().map(|r| (r.action, r.spec())).collect();
        v.sort_by(|a, b| a.1.cmp(&b.1));
        v
    };
    assert_eq!(specs(&back), specs(&p));
    assert_eq!(back.secrets.len(), 1);
    assert_eq!(back.secrets[0].hosts, p.secrets[0].hosts);
}
