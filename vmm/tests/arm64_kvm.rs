//! Test tier 2 on arm64: tiny guests on KVM through our hypervisor boundary, with the in-kernel
//! GICv3 and PSCI. One (ten instructions) writes and reads MMIO of each kind the devices see and
//! powers off through PSCI SYSTEM_OFF; one takes the virtual timer's interrupt through the GIC. On this project's x86_64 machine it
//! runs inside the arm64 L2 VM: `scripts/l2run --arch aarch64 -- TEST_BINARY` (see README).

#![cfg(all(target_os = "linux", target_arch = "aarch64"))]

use msb_vmm::arch::aarch64::layout::{BOOT_TIMER_START, RAM_START};
use msb_vmm::arch::BootEntry;
use msb_vmm::hypervisor::kvm::KvmHypervisor;
use msb_vmm::hypervisor::{Hypervisor, VcpuBoot, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `movz x0, #0x0a00, lsl #16; mov w1, #42; strb w1, [x0]; ldr w2, [x0, #4];
/// add w2, w2, #1; str w2, [x0, #8]; movz w0, #0x8400, lsl #16; movk w0, #8; hvc #0; b .`
/// (assembled with aarch64-linux-gnu-as).
const GUEST: [u32; 10] = [
    0xd2a1_4000,
    0x5280_0541,
    0x3900_0001,
    0xb940_0402,
    0x1100_0442,
    0xb900_0802,
    0x52b0_8000,
    0x7280_0100,
    0xd400_0002,
    0x1400_0000,
];

/// Runs `code` at the start of RAM on vCPU 0 of a two-vCPU VM (the second powered off, so the
/// GIC initializes with two redistributors) and returns what it did, up to its power-off.
fn run_guest(code: &[u8]) -> Vec<String> {
    let hv =
        KvmHypervisor::open().unwrap_or_else(|e| panic!("{e}: run this inside the arm64 L2 VM"));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_START), 2 << 20)]).unwrap();
    mem.write_slice(code, GuestAddress(RAM_START)).unwrap();
    let vm = hv.create_vm(2, &mem).expect("a VM with a GICv3");
    let _secondary = vm
        .create_vcpu(&VcpuBoot {
            index: 1,
            count: 2,
            entry: None,
        })
        .expect("a powered-off secondary vCPU");
    let mut vcpu = vm
        .create_vcpu(&VcpuBoot {
            index: 0,
            count: 2,
            entry: Some(BootEntry {
                pc: RAM_START,
                fdt: 0,
            }),
        })
        .expect("the boot vCPU");
    let mut seen = Vec::new();
    for _ in 0..100 {
        match vcpu.run().expect("KVM_RUN") {
            VmExit::MmioWrite { addr, data } => seen.push(format!("write {addr:#x} {data:?}")),
            VmExit::MmioRead { addr, data } => {
                seen.push(format!("read {addr:#x} {}", data.len()));
                data.copy_from_slice(&[0x10, 0, 0, 0, 0, 0, 0, 0][..data.len()]);
            }
            VmExit::PowerOff => {
                seen.push("power off".into());
                return seen;
            }
            VmExit::Interrupted => continue,
            other => panic!("unexpected exit {other:?} after {seen:?}"),
        }
    }
    panic!("the guest did not power off: {seen:?}")
}

#[test]
fn a_tiny_guest_does_mmio_and_powers_off_through_psci() {
    let code: Vec<u8> = GUEST.iter().flat_map(|w| w.to_le_bytes()).collect();
    let seen = run_guest(&code);
    let t = BOOT_TIMER_START;
    assert_eq!(
        seen,
        [
            format!("write {t:#x} [42]"),
            format!("read {:#x} 4", t + 4),
            format!("write {:#x} [17, 0, 0, 0]", t + 8),
            "power off".into(),
        ]
    );
}

/// The virtual timer fires, KVM raises PPI 27 on the in-kernel GIC, the guest takes the IRQ at
/// its EL1 vector, acknowledges INTID 27 through ICC_IAR1_EL1, reports it and powers off.
#[test]
fn the_virtual_timer_interrupt_reaches_the_guest_through_the_gic() {
    let seen = run_guest(msb_test_guests::aarch64_timer());
    let t = BOOT_TIMER_START;
    assert_eq!(
        seen,
        [
            format!("write {:#x} [27, 0, 0, 0]", t + 16),
            "power off".into()
        ],
        "a write at +24 is ESR_EL1 of an unexpected exception"
    );
}
