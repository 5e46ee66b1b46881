//! The flattened device tree an arm64 guest boots with (rust-vmm's `vm-fdt` writes it): memory,
//! vCPUs started through PSCI, the GICv3, the architected timer, the console UART, the
//! virtio-mmio devices, and `/chosen` (command line, initramfs, console).

use thiserror::Error;
use vm_fdt::{FdtWriter, FdtWriterResult};

use super::layout::*;

/// The GIC's phandle (everything's interrupt parent).
const GIC_PHANDLE: u32 = 1;
/// The fixed APB clock's phandle: AMBA devices (the RTC) will not probe without a clock.
const CLOCK_PHANDLE: u32 = 2;
/// Interrupt specifier cells: type (SPI 0, PPI 1), number, flags.
const SPI: u32 = 0;
const PPI: u32 = 1;
const EDGE_RISING: u32 = 1;
const LEVEL_HIGH: u32 = 4;

/// What the tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    pub cpus: u32,
    pub mem_bytes: u64,
    pub cmdline: &'a str,
    /// Guest address and size of the initramfs.
    pub initrd: Option<(u64, u64)>,
    /// The console UART's interrupt (SPI number).
    pub uart_spi: u32,
    /// The real-time clock's interrupt (SPI number).
    pub rtc_spi: u32,
    /// Base address and interrupt (SPI number) of each virtio-mmio device.
    pub virtio: &'a [(u64, u32)],
}

#[derive(Debug, Error)]
pub enum FdtError {
    #[error("building the device tree: {0}")]
    Write(#[from] vm_fdt::Error),
    #[error("the device tree is {0} bytes, more than the 2 MiB kept for it")]
    TooBig(usize),
    #[error("{0} vCPUs: arm64 guests have 1 to {MAX_CPUS}")]
    Cpus(u32),
}

/// The MPIDR KVM gives vCPU `i` (Aff0 holds 16 CPUs, then Aff1), which the tree's `reg` and
/// PSCI CPU_ON name.
pub fn mpidr(i: u32) -> u64 {
    (u64::from(i >> 4) << 8) | u64::from(i & 0xf)
}

/// Builds the tree.
pub fn build(cfg: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
        return Err(FdtError::Cpus(cfg.cpus));
    }
    let blob = write(cfg)?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooBig(blob.len()));
    }
    Ok(blob)
}

fn write(cfg: &FdtConfig<'_>) -> FdtWriterResult<Vec<u8>> {
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", cfg.cmdline)?;
    w.property_string("stdout-path", &format!("/uart@{UART_START:x}"))?;
    if let Some((addr, len)) = cfg.initrd {
        w.property_u64("linux,initrd-start", addr)?;
        w.property_u64("linux,initrd-end", addr + len)?;
    }
    w.end_node(chosen)?;

    let memory = w.begin_node(&format!("memory@{RAM_START:x}"))?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &[RAM_START, cfg.mem_bytes])?;
    w.end_node(memory)?;

    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 0)?;
    for i in 0..cfg.cpus {
        let cpu = w.begin_node(&format!("cpu@{:x}", mpidr(i)))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,arm-v8")?;
        w.property_string("enable-method", "psci")?;
        w.property_u64("reg", mpidr(i))?;
        w.end_node(cpu)?;
    }
    w.end_node(cpus)?;

    let psci = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    w.property_string("method", "hvc")?;
    w.end_node(psci)?;

    let gic = w.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_null("interrupt-controller")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_array_u64(
        "reg",
        &[
            GIC_DIST_START,
            GIC_DIST_SIZE,
            GIC_REDIST_START,
            GIC_REDIST_SIZE_PER_CPU * u64::from(cfg.cpus),
        ],
    )?;
    w.property_u32("phandle", GIC_PHANDLE)?;
    // The virtual maintenance interrupt.
    w.property_array_u32("interrupts", &[PPI, 9, LEVEL_HIGH])?;
    w.end_node(gic)?;

    // Secure, non-secure, virtual and hypervisor physical timers.
    let timer = w.begin_node("timer")?;
    w.property_string("compatible", "arm,armv8-timer")?;
    w.property_null("always-on")?;
    let mut irqs = Vec::new();
    for ppi in [13, 14, 11, 10] {
        irqs.extend_from_slice(&[PPI, ppi, LEVEL_HIGH]);
    }
    w.property_array_u32("interrupts", &irqs)?;
    w.end_node(timer)?;

    let uart = w.begin_node(&format!("uart@{UART_START:x}"))?;
    w.property_string("compatible", "ns16550a")?;
    w.property_array_u64("reg", &[UART_START, UART_SIZE])?;
    // Edge: the UART's interrupt arrives as an irqfd pulse. Declared level, the GIC would drop
    // it with the line before the guest looked, and the guest's handler, finding nothing,
    // counts "nobody cared" until it disables the line (seen: "Disabling IRQ #13").
    w.property_array_u32("interrupts", &[SPI, cfg.uart_spi, EDGE_RISING])?;
    w.property_u32("clock-frequency", 1_843_200)?;
    w.end_node(uart)?;

    let clock = w.begin_node("apb-pclk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", 24_000_000)?;
    w.property_string("clock-output-names", "clk24mhz")?;
    w.property_u32("phandle", CLOCK_PHANDLE)?;
    w.end_node(clock)?;

    let rtc = w.begin_node(&format!("rtc@{RTC_START:x}"))?;
    w.property_string_list(
        "compatible",
        vec!["arm,pl031".into(), "arm,primecell".into()],
    )?;
    w.property_array_u64("reg", &[RTC_START, RTC_SIZE])?;
    w.property_array_u32("interrupts", &[SPI, cfg.rtc_spi, EDGE_RISING])?;
    w.property_u32("clocks", CLOCK_PHANDLE)?;
    w.property_string("clock-names", "apb_pclk")?;
    w.end_node(rtc)?;

    for (base, spi) in cfg.virtio {
        let dev = w.begin_node(&format!("virtio_mmio@{base:x}"))?;
        w.property_string("compatible", "virtio,mmio")?;
        w.property_array_u64("reg", &[*base, 0x1000])?;
        w.property_array_u32("interrupts", &[SPI, *spi, EDGE_RISING])?;
        w.property_null("dma-coherent")?;
        w.end_node(dev)?;
    }

    w.end_node(root)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg<'a>(virtio: &'a [(u64, u32)], initrd: Option<(u64, u64)>) -> FdtConfig<'a> {
        FdtConfig {
            cpus: 18,
            mem_bytes: 512 << 20,
            cmdline: "console=ttyS0 panic=-1",
            initrd,
            uart_spi: 1,
            rtc_spi: 2,
            virtio,
        }
    }

    /// The blob decompiled by `dtc` (Debian's device-tree-compiler; `./x test` installs it).
    fn decompile(blob: &[u8]) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("msb-fdt-{}-{n}.dtb", std::process::id()));
        std::fs::write(&path, blob).unwrap();
        let out = std::process::Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts", "-q"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("dtc: {e} (install device-tree-compiler; ./x test does)"));
        std::fs::remove_file(&path).unwrap();
        assert!(
            out.status.success(),
            "dtc rejects the tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_tree_describes_the_machine() {
        let virtio = [(VIRTIO_MMIO_START, 16), (VIRTIO_MMIO_START + 0x1000, 17)];
        let blob = build(&cfg(&virtio, Some((0x4800_0000, 0x10_0000)))).unwrap();
        let dts = decompile(&blob);
        for want in [
            "bootargs = \"console=ttyS0 panic=-1\";",
            "stdout-path = \"/uart@9000000\";",
            "linux,initrd-start = <0x00 0x48000000>;",
            "linux,initrd-end = <0x00 0x48100000>;",
            "memory@40000000 {",
            "reg = <0x00 0x40000000 0x00 0x20000000>;",
            "compatible = \"arm,psci-1.0\\0arm,psci-0.2\";",
            "method = \"hvc\";",
            "compatible = \"arm,gic-v3\";",
            // 18 redistributors of 128 KiB.
            "reg = <0x00 0x8000000 0x00 0x10000 0x00 0x80a0000 0x00 0x240000>;",
            "compatible = \"arm,armv8-timer\";",
            "virtio_mmio@a001000 {",
            "interrupts = <0x00 0x10 0x01>;",
            "virtio_mmio@a002000 {",
            "interrupts = <0x00 0x11 0x01>;",
            "compatible = \"ns16550a\";",
            "rtc@9010000 {",
            "compatible = \"arm,pl031\\0arm,primecell\";",
            "clock-names = \"apb_pclk\";",
            "compatible = \"fixed-clock\";",
        ] {
            assert!(dts.contains(want), "missing {want:?} in\n{dts}");
        }
        // vCPU 17 is Aff1 1, Aff0 1.
        assert_eq!(dts.matches("enable-method = \"psci\";").count(), 18);
        assert!(dts.contains("cpu@101 {"), "{dts}");
        assert!(dts.contains("reg = <0x00 0x101>;"), "{dts}");
    }

    #[test]
    fn without_an_initramfs_chosen_names_none() {
        let dts = decompile(&build(&cfg(&[], None)).unwrap());
        assert!(!dts.contains("initrd"), "{dts}");
        assert!(!dts.contains("virtio_mmio"), "{dts}");
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        let mut c = cfg(&[], None);
        c.cpus = 0;
        assert!(matches!(build(&c), Err(FdtError::Cpus(0))));
        c.cpus = MAX_CPUS + 1;
        assert!(build(&c).unwrap_err().to_string().contains("1 to 64"));
        assert_eq!(mpidr(15), 0xf);
        assert_eq!(mpidr(16), 0x100);
    }
}
