// arm64 tier-2 guest: the virtual timer's interrupt through the GICv3 to an EL1 vector.
// Loaded at the start of RAM and entered in EL1h with interrupts masked and the MMU off. It
// sets up the distributor, its redistributor and CPU interface as Linux does, arms the
// virtual timer, waits in WFI, and from the IRQ vector acknowledges the interrupt, reports
// its INTID with a 32-bit write to boot timer + 16, turns the timer off, ends the interrupt
// and powers off through PSCI SYSTEM_OFF. Any other exception reports ESR_EL1 with a 64-bit
// write to boot timer + 24 and powers off.

        .equ GICD, 0x08000000
        .equ GICR_RD, 0x080a0000        // the first redistributor
        .equ REPORT, 0x0a000000         // the boot timer's page
        .equ VTIMER_INTID, 27

        .text
        .globl _start
_start:
        adr     x1, vectors
        msr     vbar_el1, x1
        isb
        // Distributor: affinity routing, group 1 on.
        mov     x0, #GICD
        mov     w1, #0x12
        str     w1, [x0]
        // Our redistributor: the one whose GICR_TYPER affinity is 0 (KVM lays them out in
        // vCPU creation order, so search as Linux does).
        mov     x3, #GICR_RD
2:      ldr     x4, [x3, #8]
        lsr     x5, x4, #32
        cbz     x5, 3f
        tbnz    x4, #4, unexpected      // the last one, and not ours
        add     x3, x3, #0x20000
        b       2b
        // Awake; INTID 27 in group 1, priority 0xa0, enabled.
3:      str     wzr, [x3, #0x14]
        add     x2, x3, #0x10000
        mov     w1, #-1
        str     w1, [x2, #0x80]
        mov     w1, #0xa0
        strb    w1, [x2, #0x400 + VTIMER_INTID]
        mov     w1, #(1 << VTIMER_INTID)
        str     w1, [x2, #0x100]
        // CPU interface: system registers, priority mask, group 1.
        mov     x1, #1
        msr     icc_sre_el1, x1
        isb
        mov     x1, #0xf0
        msr     icc_pmr_el1, x1
        mov     x1, #1
        msr     icc_igrpen1_el1, x1
        isb
        // The timer: due in 1000 ticks, enabled and not masked.
        mov     x1, #1000
        msr     cntv_tval_el0, x1
        mov     x1, #1
        msr     cntv_ctl_el0, x1
        isb
        msr     daifclr, #2
1:      wfi
        b       1b

irq:
        mrs     x1, icc_iar1_el1
        mov     x0, #REPORT
        str     w1, [x0, #16]
        msr     cntv_ctl_el0, xzr
        msr     icc_eoir1_el1, x1
        isb
        b       off

unexpected:
        mrs     x1, esr_el1
        mov     x0, #REPORT
        str     x1, [x0, #24]
off:
        movz    w0, #0x8400, lsl #16
        movk    w0, #8
        hvc     #0
        b       .

        // EL1 vectors: 16 entries of 0x80; IRQ from the current EL with SP_ELx is entry 5.
        .balign 2048
vectors:
        .rept 5
        b       unexpected
        .balign 128
        .endr
        b       irq
        .balign 128
        .rept 10
        b       unexpected
        .balign 128
        .endr
