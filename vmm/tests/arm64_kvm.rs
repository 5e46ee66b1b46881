//! Test tier 2 on arm64: a tiny guest (ten instructions) on KVM through our hypervisor
//! boundary, with the in-kernel GICv3 and PSCI. It writes and reads MMIO of each kind the
//! devices see and powers off through PSCI SYSTEM_OFF. On this project's x86_64 machine it
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

#[test]
fn a_tiny_guest_does_mmio_and_powers_off_through_psci() {
    let hv =
        KvmHypervisor::open().unwrap_or_else(|e| panic!("{e}: run this inside the arm64 L2 VM"));
    let vm = hv.create_vm(2).expect("a VM with a GICv3");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_START), 2 << 20)]).unwrap();
    let code: Vec<u8> = GUEST.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&code, GuestAddress(RAM_START)).unwrap();
    vm.map_memory(&mem).unwrap();
    // The second vCPU exists (powered off, as the guest's CPU_ON would start it) so the GIC
    // initializes with two redistributors.
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
    for _ in 0..10 {
        match vcpu.run().expect("KVM_RUN") {
            VmExit::MmioWrite { addr, data } => seen.push(format!("write {addr:#x} {data:?}")),
            VmExit::MmioRead { addr, data } => {
                seen.push(format!("read {addr:#x} {}", data.len()));
                data.copy_from_slice(&[0x10, 0, 0, 0][..data.len()]);
            }
            VmExit::PowerOff => {
                seen.push("power off".into());
                break;
            }
            VmExit::Interrupted => continue,
            other => panic!("unexpected exit {other:?} after {seen:?}"),
        }
    }
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
