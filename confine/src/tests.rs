use super::*;

/// Runs `f` on a fresh thread confined as `kind` (filters are per thread: the test process
/// itself stays unconfined).
fn confined<T: Send + 'static>(kind: ThreadKind, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        enter(kind, Seccomp::Enforce).expect("confinement installs");
        f()
    })
    .join()
    .expect("the confined thread ran")
}

#[test]
fn every_kind_has_a_filter_that_compiles() {
    for kind in ThreadKind::ALL {
        let programs = filter_for(kind).unwrap();
        assert!(!programs.is_empty(), "{kind:?}");
        assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
    }
}

#[test]
fn a_confined_thread_has_no_capabilities_no_new_privs_and_a_filter() {
    let status = confined(ThreadKind::Control, || {
        std::fs::read_to_string("/proc/thread-self/status").unwrap()
    });
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {k} in {status}"))
            .to_string()
    };
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
}

#[test]
fn kinds_that_open_no_files_get_eacces_and_keep_running() {
    for kind in [ThreadKind::Vcpu, ThreadKind::Netstack, ThreadKind::Net] {
        let r = confined(kind, || {
            let opened = std::fs::File::open("/etc/hostname").map(|_| ());
            // Still alive and able to allocate, log and start nothing.
            let v = vec![7u8; 1 << 20];
            (opened.map_err(|e| e.raw_os_error()), v.len())
        });
        assert_eq!(r, (Err(Some(libc::EACCES)), 1 << 20), "{kind:?}");
    }
}

#[test]
fn threads_of_a_confined_thread_start_and_inherit_its_filter() {
    // A listener opens no files: its connection threads cannot either.
    let opened = confined(ThreadKind::VsockListener, || {
        std::thread::spawn(|| {
            std::fs::File::open("/etc/hostname")
                .map(|_| ())
                .map_err(|e| e.raw_os_error())
        })
        .join()
        .unwrap()
    });
    assert_eq!(opened, Err(Some(libc::EACCES)));
}

#[test]
fn names_of_system_calls() {
    assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
    assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
    assert_eq!(syscall_name(100_000), None);
    assert_eq!(syscall_name(-1), None);
}
