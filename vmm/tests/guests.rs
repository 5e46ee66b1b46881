//! Test tier 2: tiny guest programs (crate msb-test-guests) boot on this host's /dev/kvm, PVM
//! included, and report what the VMM set up. They run in milliseconds.
//!
//! These tests need /dev/kvm; without it they fail with the reason (they never skip).

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use msb_test_guests as guests;
use msb_vmm::vm::{Console, GuestExit, Initrd, VmBuilder, VmOutcome};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "tier-2 tests need read/write access to /dev/kvm ({e}); run them on a host with KVM"
        );
    }
}

/// Boots `b` with the console captured; returns the outcome and the console text.
fn boot(b: VmBuilder) -> (VmOutcome, String) {
    require_kvm();
    let cap = Capture::default();
    let out = b
        .console(Console::Writer(Box::new(cap.clone())))
        .timeout(Some(Duration::from_secs(20)))
        .run()
        .expect("VM starts");
    (out, cap.text())
}

/// Parses `key=hex` lines; repeated keys keep every value in order.
fn kv(text: &str) -> HashMap<String, Vec<u64>> {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if let Ok(n) = u64::from_str_radix(v.trim(), 16) {
                m.entry(k.to_string()).or_default().push(n);
            }
        }
    }
    m
}

fn one(m: &HashMap<String, Vec<u64>>, k: &str) -> u64 {
    match m.get(k).map(Vec::as_slice) {
        Some([v]) => *v,
        other => panic!("expected one {k}= line, got {other:?}"),
    }
}

#[test]
fn pvh_entry_state_start_info_and_memory_map() {
    let initrd = Arc::new(vec![0x5au8; 10_000]);
    let mem_mib = 64;
    let (out, text) = boot(
        VmBuilder::new(guests::pvh_boot())
            .memory_mib(mem_mib)
            .initrd(Initrd::Bytes(initrd.clone()))
            .vsock(false)
            .cmdline("test=1 msb \"quoted\""),
    );
    assert_eq!(out.exit, GuestExit::PowerOff, "console:\n{text}");
    let m = kv(&text);
    // 32-bit protected mode, paging off, flat segments from our GDT, interrupts off.
    assert_eq!(one(&m, "cr0") & 0x8000_0001, 1);
    assert_eq!(one(&m, "eflags"), 2);
    assert_eq!((one(&m, "cs"), one(&m, "ds")), (8, 0x10));
    assert_eq!(one(&m, "start_info"), 0x6000);
    assert_eq!(one(&m, "magic"), 0x336e_c578);
    assert_eq!(one(&m, "version"), 1);
    assert_eq!(one(&m, "nr_modules"), 1);
    assert_eq!(one(&m, "mod_size"), initrd.len() as u64);
    let mod_paddr = one(&m, "mod_paddr");
    assert_eq!(mod_paddr % 4096, 0);
    assert!(mod_paddr + initrd.len() as u64 <= mem_mib << 20);
    assert!(text.contains("cmdline=test=1 msb \"quoted\"\n"), "{text}");
    // Memory map: low RAM below the EBDA, then 1 MiB to the end of memory.
    assert_eq!(one(&m, "memmap_entries"), 2);
    assert_eq!(m["mm_addr"], vec![0, 0x10_0000]);
    assert_eq!(m["mm_size_lo"], vec![0x9fc00, (mem_mib << 20) - 0x10_0000]);
    assert_eq!(m["mm_type"], vec![1, 1]);
    // CPUID says KVM; the BSP is APIC 0.
    assert_eq!(one(&m, "hv_sig"), u64::from(u32::from_le_bytes(*b"KVMK")));
    assert_eq!(one(&m, "apic_id"), 0);
    // Nothing claims port 0x510 or MMIO 0xd0000000: all-ones and zero, and the guest goes on.
    assert_eq!(one(&m, "unclaimed_port"), 0xff);
    assert_eq!(one(&m, "unclaimed_mmio"), 0);
    assert!(text.contains("boot_timer=written"));
    let boot = out.boot_time.expect("the boot timer fired");
    assert!(boot > Duration::ZERO);
}

#[test]
fn linux_64bit_protocol_long_mode_and_zero_page() {
    let (out, text) = boot(
        VmBuilder::new(guests::linux64_boot())
            .memory_mib(1024)
            .cmdline("console=ttyS0 x=y"),
    );
    assert_eq!(out.exit, GuestExit::PowerOff, "console:\n{text}");
    let m = kv(&text);
    assert_eq!(one(&m, "efer") & 0x500, 0x500, "LME and LMA");
    assert_eq!(one(&m, "cr0") & 0x8000_0001, 0x8000_0001, "PE and PG");
    assert_eq!(one(&m, "cr4") & 0x20, 0x20, "PAE");
    assert_eq!(one(&m, "cr3"), 0x9000);
    assert_eq!(one(&m, "rsp"), 0x8ff0);
    assert_eq!(one(&m, "zero_page"), 0x7000);
    assert_eq!(one(&m, "hdr_magic"), 0x5372_6448);
    assert_eq!(one(&m, "e820_entries"), 2);
    assert!(
        text.contains("cmdline=console=ttyS0 x=y virtio_mmio.device=4K@0xc0001000:5\n"),
        "{text}"
    );
    assert_eq!(
        one(&m, "mem_512m"),
        0x1234,
        "identity map covers the first GiB"
    );
    assert!(
        out.boot_time.is_some(),
        "boot timer reachable from long mode"
    );
}

#[test]
fn second_vcpu_starts_and_mp_table_lists_all_cpus() {
    for cpus in [2, 4] {
        let (out, text) = boot(VmBuilder::new(guests::smp()).cpus(cpus));
        assert_eq!(out.exit, GuestExit::PowerOff, "console:\n{text}");
        let m = kv(&text);
        assert_eq!(one(&m, "mp_cpus"), u64::from(cpus));
        assert_eq!(one(&m, "bsp_apic"), 0);
        assert!(
            text.contains("ap=started"),
            "vCPU 1 never ran its SIPI trampoline:\n{text}"
        );
    }
}

#[test]
fn guest_fault_ends_the_vm_with_an_error() {
    let (out, text) = boot(VmBuilder::new(guests::fault()));
    assert!(text.contains("faulting"));
    assert!(!text.contains("still alive"));
    // Hardware KVM reports the triple fault as a CPU shutdown; PVM cannot emulate the faulting
    // path and reports an internal error. Either way the VM stops with a failure, never a hang.
    match &out.exit {
        GuestExit::CpuShutdown { vcpu: 0 } => {}
        GuestExit::Fatal {
            vcpu: Some(0),
            message,
        } if msb_vmm::host::is_pvm() => assert!(message.contains("internal error"), "{message}"),
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn reset_is_a_clean_power_off_and_signals_boot() {
    let (out, _) = boot(VmBuilder::new(guests::stub()));
    assert_eq!(out.exit, GuestExit::PowerOff);
    assert!(out.boot_time.is_some());
    assert!(!out.kernel_panicked);
}

#[test]
fn a_spinning_guest_is_stopped_by_timeout_and_stop_handle() {
    require_kvm();
    let cap = Capture::default();
    let out = VmBuilder::new(guests::hang())
        .cpus(2)
        .console(Console::Writer(Box::new(cap.clone())))
        .timeout(Some(Duration::from_millis(300)))
        .run()
        .unwrap();
    assert_eq!(out.exit, GuestExit::Timeout(Duration::from_millis(300)));
    assert!(cap.text().contains("hanging"));
    assert!(out.boot_time.is_none(), "the hang guest never signals boot");

    let b = VmBuilder::new(guests::hang());
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stop.stop();
    assert_eq!(vm.wait().exit, GuestExit::Stopped);
}

fn count(vm: &msb_vmm::vm::RunningVm) -> u32 {
    let mut b = [0u8; 4];
    vm.read_memory(guests::COUNT_ADDR, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Waits (up to 10 s: a stalled guest fails here, not a timing assertion) until the count
/// passes `above`.
fn count_passes(vm: &msb_vmm::vm::RunningVm, above: u32, what: &str) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = count(vm);
        if c > above {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the count stayed at {c}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pause_stops_every_vcpu_and_resume_continues_where_it_was() {
    require_kvm();
    // Two vCPUs: the second never gets a SIPI and waits inside KVM_RUN, which a pause must
    // still reach.
    let b = VmBuilder::new(guests::count()).cpus(2);
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    let before = count_passes(&vm, 0, "booting");
    vm.pause(Duration::from_secs(5)).expect("pause");
    assert!(vm.is_paused());
    let frozen = count(&vm);
    assert!(frozen >= before);
    // Paused vCPUs run no guest code at all: the count cannot move, however long we look.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(count(&vm), frozen, "a paused guest ran");
    }
    // Pausing again is harmless.
    vm.pause(Duration::from_secs(5)).expect("a second pause");
    vm.resume();
    assert!(!vm.is_paused());
    count_passes(&vm, frozen, "after resume");
    // A paused VM can still be stopped, and a stopped one cannot be paused.
    vm.pause(Duration::from_secs(5)).expect("pause before stop");
    stop.stop();
    let out = vm.wait();
    assert_eq!(out.exit, GuestExit::Stopped);
}

#[test]
fn a_stopped_vm_refuses_to_pause() {
    require_kvm();
    let b = VmBuilder::new(guests::count());
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    count_passes(&vm, 0, "booting");
    stop.stop();
    assert!(vm.wait_stopped(Duration::from_secs(10)));
    assert_eq!(
        vm.pause(Duration::from_secs(1)),
        Err(msb_vmm::vm::PauseError::Stopped)
    );
    assert!(!vm.is_paused());
    vm.wait();
}

fn counts(vm: &msb_vmm::vm::RunningVm) -> (u32, u32) {
    let mut b = [0u8; 8];
    vm.read_memory(guests::COUNT_ADDR, &mut b).unwrap();
    (
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    )
}

#[test]
fn a_snapshot_restored_continues_its_memory_and_registers() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("msb-snap-t2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let b = VmBuilder::new(guests::count()).memory_mib(64);
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    count_passes(&vm, 1000, "booting");
    vm.save_snapshot(&dir).expect("snapshot");
    assert!(!vm.is_paused(), "a running VM is left running");
    let after = count_passes(&vm, 0, "the original after its snapshot");
    stop.stop();
    vm.wait();

    // What was saved: the count in memory and EBX's copy, at the same step.
    let mem = std::fs::read(dir.join(msb_vmm::snapshot::MEMORY_FILE)).unwrap();
    let at = guests::COUNT_ADDR as usize;
    let word = |o: usize| u32::from_le_bytes(mem[at + o..at + o + 4].try_into().unwrap());
    let (saved, saved_ebx) = (word(0), word(4));
    assert!(
        saved > 1000 && saved <= after,
        "saved {saved}, after {after}"
    );
    assert!(
        saved_ebx + 1 >= saved && saved_ebx <= saved,
        "{saved_ebx} vs {saved}"
    );
    // The sparse memory file holds what the guest used, not its 64 MiB.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join(msb_vmm::snapshot::MEMORY_FILE)).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );

    let b = msb_vmm::vm::VmBuilder::restore(&dir).expect("reading the snapshot");
    let stop = b.stop_handle();
    let restored = b.start().expect("restoring");
    let (c, _) = counts(&restored);
    assert!(c >= saved, "memory went back: {c} < {saved}");
    count_passes(&restored, saved + 1000, "the restored VM");
    // The copy of EBX trails the count by at most the one step being taken: EBX came back
    // too (restarted from 0 it would trail by the whole saved count).
    let (c, ebx) = counts(&restored);
    assert!(
        c.wrapping_sub(ebx) <= 1,
        "EBX {ebx} vs count {c} (saved {saved})"
    );
    stop.stop();
    assert_eq!(restored.wait().exit, GuestExit::Stopped);

    // A missing memory file or a damaged state file is refused before anything runs.
    let memory = dir.join(msb_vmm::snapshot::MEMORY_FILE);
    std::fs::rename(&memory, dir.join("moved")).unwrap();
    let e = msb_vmm::vm::VmBuilder::restore(&dir).unwrap_err();
    assert!(e.to_string().contains("memory file"), "{e}");
    std::fs::rename(dir.join("moved"), &memory).unwrap();
    let state = dir.join(msb_vmm::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let e = msb_vmm::vm::VmBuilder::restore(&dir).unwrap_err();
    assert!(e.to_string().contains("corrupted"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_snapshot_with_devices_restores_only_with_the_same_devices() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("msb-snap-dev-{}", std::process::id()));
    let share = std::env::temp_dir().join(format!("msb-snap-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&share).unwrap();
    let fs = || {
        Arc::new(
            msb_devices::fs::passthrough::PassthroughFs::new(&share, Default::default()).unwrap(),
        )
    };
    // A VM with a vsock device and a share (its guest never sets them up) and a console.
    let b = VmBuilder::new(guests::count())
        .memory_mib(64)
        .vsock(true)
        .share("root", fs());
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    count_passes(&vm, 1000, "booting");
    vm.save_snapshot(&dir).expect("snapshot with devices");
    stop.stop();
    vm.wait();

    // Without the devices, or with others, the restore is refused with the fix.
    for (what, b) in [
        ("no devices", VmBuilder::restore(&dir).unwrap()),
        ("no share", VmBuilder::restore(&dir).unwrap().vsock(true)),
        (
            "two shares",
            VmBuilder::restore(&dir)
                .unwrap()
                .vsock(true)
                .share("root", fs())
                .share("vol0", fs()),
        ),
    ] {
        let e = b
            .start()
            .err()
            .unwrap_or_else(|| panic!("{what}: restored"));
        assert!(
            e.to_string().contains("restore with the same devices"),
            "{what}: {e}"
        );
    }
    let b = VmBuilder::restore(&dir)
        .unwrap()
        .vsock(true)
        .share("root", fs());
    let stop = b.stop_handle();
    let restored = b.start().expect("restoring with the same devices");
    let (c, _) = counts(&restored);
    count_passes(&restored, c + 1000, "the restored VM");
    stop.stop();
    assert_eq!(restored.wait().exit, GuestExit::Stopped);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&share).unwrap();
}

#[test]
fn a_full_disk_fails_the_snapshot_and_leaves_the_vm_running() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test mounts a tiny tmpfs: run the tier-2 tests as root (CI does)"
    );
    let dir = std::env::temp_dir().join(format!("msb-snap-full-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let target = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings alive for the call; a 8 KiB tmpfs over our own directory.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=8k".as_ptr().cast(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mounting a tmpfs: {}",
        std::io::Error::last_os_error()
    );
    /// Unmounts the tmpfs however the test ends.
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: unmounting the tmpfs this test mounted; the string is NUL-terminated.
            unsafe { libc::umount(self.0.as_ptr()) };
        }
    }
    let mounted = Unmount(target);
    let b = VmBuilder::new(guests::count()).memory_mib(64);
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    count_passes(&vm, 1000, "booting");
    let e = vm.save_snapshot(&dir.join("snap")).unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    // Nothing half-written is left, and the guest runs on.
    let left: Vec<_> = std::fs::read_dir(dir.join("snap"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!vm.is_paused());
    let (c, _) = counts(&vm);
    count_passes(&vm, c, "after the failed snapshot");
    stop.stop();
    assert_eq!(vm.wait().exit, GuestExit::Stopped);
    drop(mounted);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Pss` and `Private_Dirty` of this process, in KiB.
fn pss_and_private_dirty() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in smaps_rollup"))
    };
    (field("Pss:"), field("Private_Dirty:"))
}

/// Taken by the test that keeps a hundred restored VMs alive (their descriptors and threads
/// number in the hundreds) and by the test that counts this process's descriptors and
/// threads around twenty boots, so the count never includes the other's hundred VMs.
static COUNTED: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_hundred_restores_of_one_snapshot_share_its_memory() {
    let _counted = COUNTED.lock().unwrap_or_else(|p| p.into_inner());
    require_kvm();
    let dir = std::env::temp_dir().join(format!("msb-snap-100-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let b = VmBuilder::new(guests::count()).memory_mib(64);
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    count_passes(&vm, 1000, "booting");
    vm.save_snapshot(&dir).expect("snapshot");
    stop.stop();
    vm.wait();
    // 32 MiB of the saved guest's RAM holds data (the counting guest never looks at it).
    const DATA: (u64, usize) = (16 << 20, 32 << 20);
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(msb_vmm::snapshot::MEMORY_FILE))
            .unwrap();
        f.seek(SeekFrom::Start(DATA.0)).unwrap();
        f.write_all(&vec![0xa5; DATA.1]).unwrap();
    }

    let (pss0, dirty0) = pss_and_private_dirty();
    let mut vms = Vec::new();
    let mut buf = vec![0u8; DATA.1];
    for i in 0..100 {
        let b = VmBuilder::restore(&dir).unwrap();
        let stop = b.stop_handle();
        let vm = b.start().unwrap_or_else(|e| panic!("restore {i}: {e}"));
        // Every copy reads all of the data: each maps the same pages.
        vm.read_memory(DATA.0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0xa5),
            "restore {i} reads other data"
        );
        let (c, _) = counts(&vm);
        count_passes(&vm, c, &format!("restore {i}"));
        // Parked, so a hundred counting guests do not share two host CPUs.
        vm.pause(Duration::from_secs(10)).unwrap();
        vms.push((vm, stop));
    }
    let (pss1, dirty1) = pss_and_private_dirty();
    let (pss, dirty) = ((pss1 - pss0) >> 10, (dirty1.saturating_sub(dirty0)) >> 10);
    eprintln!("100 restores: Pss +{pss} MiB, Private_Dirty +{dirty} MiB");
    // Copied, the data alone would be 3200 MiB; shared it is 32 MiB once, plus what each VM
    // wrote and its own small VMM state.
    assert!(pss < 32 + 100 * 2, "Pss grew by {pss} MiB");
    assert!(dirty < 100 * 2, "Private_Dirty grew by {dirty} MiB");
    for (vm, stop) in vms {
        stop.stop();
        assert_eq!(vm.wait().exit, GuestExit::Stopped);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn console_ring_keeps_output_when_not_shown() {
    require_kvm();
    let out = VmBuilder::new(guests::pvh_boot()).run().unwrap();
    assert_eq!(out.exit, GuestExit::PowerOff);
    assert!(
        out.console_tail.iter().any(|l| l == "boot_timer=written"),
        "{:?}",
        out.console_tail
    );
    assert_eq!(out.console_tail.last().map(String::as_str), Some("reset"));
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).unwrap().count()
}

#[test]
fn twenty_boots_leak_no_fds_or_threads() {
    require_kvm();
    let _counted = COUNTED.lock().unwrap_or_else(|p| p.into_inner());
    // Warm up once: the first boot installs the kick signal handler and logging state.
    VmBuilder::new(guests::stub()).run().unwrap();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    for _ in 0..20 {
        let out = VmBuilder::new(guests::smp()).cpus(2).run().unwrap();
        assert_eq!(out.exit, GuestExit::PowerOff);
    }
    // Other tests run in parallel threads of this process; allow for them, but not for 20 boots'
    // worth of leaks (each boot opens over ten fds and starts three threads).
    let (fds_after, threads_after) = (count_dir("/proc/self/fd"), count_dir("/proc/self/task"));
    assert!(fds_after <= fds + 8, "fds {fds} -> {fds_after}");
    assert!(
        threads_after <= threads + 6,
        "threads {threads} -> {threads_after}"
    );
}

#[test]
fn user_mistakes_get_clear_errors() {
    use msb_vmm::vm::VmError;
    let e = VmBuilder::new(guests::stub()).cpus(0).run().unwrap_err();
    assert!(matches!(e, VmError::BadCpus(0)));
    assert!(e.to_string().contains("use 1 to 64"));
    let e = VmBuilder::new(guests::stub())
        .memory_mib(2)
        .run()
        .unwrap_err();
    assert!(e.to_string().contains("--memory 2 MiB"), "{e}");
    let e = VmBuilder::new("/nonexistent/vmlinux").run().unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
    let text = std::env::temp_dir().join(format!("msb-not-elf-{}", std::process::id()));
    std::fs::write(&text, vec![b'x'; 4096]).unwrap();
    let e = VmBuilder::new(&text).run().unwrap_err();
    assert!(e.to_string().contains("not an ELF image"), "{e}");
    std::fs::remove_file(&text).unwrap();
    let e = VmBuilder::new(guests::stub())
        .initrd(Initrd::Path("/nonexistent.cpio".into()))
        .run()
        .unwrap_err();
    assert!(e.to_string().contains("initramfs /nonexistent.cpio"), "{e}");
}

/// The `tick` guest's words: its count, its timer interrupts, and the gate the host opens.
fn ticks(vm: &msb_vmm::vm::RunningVm) -> (u32, u32) {
    let mut b = [0u8; 12];
    vm.read_memory(guests::COUNT_ADDR, &mut b).unwrap();
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
    )
}

/// Lets the `tick` guest enable interrupts and waits for its one timer interrupt.
fn open_gate_and_wait_tick(vm: &msb_vmm::vm::RunningVm, what: &str) {
    assert_eq!(
        ticks(vm).1,
        0,
        "{what}: an interrupt ran with interrupts off"
    );
    vm.write_memory(guests::COUNT_ADDR + 12, &1u32.to_le_bytes())
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ticks(vm).1 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the pending timer interrupt never ran (count {})",
            ticks(vm).0
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ticks(vm).1, 1, "{what}: a one-shot timer interrupted twice");
}

/// An interrupt pending at the moment of a snapshot (the local APIC's one-shot timer fired
/// while the guest kept interrupts off) is delivered by the restored VM once the guest
/// enables interrupts: the in-kernel APIC's state crosses the snapshot.
#[test]
fn a_timer_interrupt_pending_at_the_snapshot_is_delivered_after_restore() {
    require_kvm();
    // The guest works: without a snapshot, opening the gate runs the pending interrupt.
    let b = VmBuilder::new(guests::tick()).memory_mib(16);
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    wait_count(&vm, 100_000, "the tick guest");
    open_gate_and_wait_tick(&vm, "without a snapshot");
    stop.stop();
    vm.wait();

    let dir = std::env::temp_dir().join(format!("msb-snap-tick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let b = VmBuilder::new(guests::tick()).memory_mib(16);
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    // Long after the timer's microsecond: its interrupt waits in the APIC.
    wait_count(&vm, 100_000, "the tick guest");
    vm.save_snapshot(&dir).expect("snapshot");
    stop.stop();
    vm.wait();
    let b = VmBuilder::restore(&dir).expect("reading the snapshot");
    let stop = b.stop_handle();
    let restored = b.start().expect("restoring");
    open_gate_and_wait_tick(&restored, "restored");
    stop.stop();
    restored.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits until the `tick` guest's count passes `n`.
fn wait_count(vm: &msb_vmm::vm::RunningVm, n: u32, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ticks(vm).0 <= n {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} stopped counting"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
