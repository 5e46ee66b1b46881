/* Reports what the VMM set up for a PVH entry. */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov edi, ebx            /* hvm_start_info */
  mov ebp, esp            /* entry stack pointer */
  mov esp, 0x80000
  pushfd                  /* entry flags (mov changes none) */
  pop esi
  jmp main
#include "common32.S"
main:
  PUTS "hello from pvh_boot\n"
  KV "eflags", esi
  KV "esp", ebp
  mov eax, cr0
  KV "cr0", eax
  mov eax, cs
  KV "cs", eax
  mov eax, ds
  KV "ds", eax
  KV "start_info", edi
  KV "magic", [edi]
  KV "version", [edi + 4]
  KV "nr_modules", [edi + 12]
  mov ebx, [edi + 16]     /* modlist */
  KV "mod_paddr", [ebx]
  KV "mod_size", [ebx + 8]
  mov esi, [edi + 24]     /* cmdline */
  PUTS "cmdline="
  call puts32
  call newline32
  mov ecx, [edi + 48]     /* memmap entries */
  KV "memmap_entries", ecx
  mov ebx, [edi + 40]
1:
  test ecx, ecx
  jz 2f
  KV "mm_addr", [ebx]
  KV "mm_size_lo", [ebx + 8]
  KV "mm_size_hi", [ebx + 12]
  KV "mm_type", [ebx + 16]
  add ebx, 24
  dec ecx
  jmp 1b
2:
  mov eax, 0x40000000     /* hypervisor leaf */
  cpuid
  KV "hv_sig", ebx
  mov eax, 1
  cpuid
  shr ebx, 24
  KV "apic_id", ebx
  mov dx, 0x510           /* a port nothing claims */
  in al, dx
  movzx eax, al
  KV "unclaimed_port", eax
  mov eax, [0xd0000000]   /* MMIO nothing claims */
  KV "unclaimed_mmio", eax
  call boot_timer32
  PUTS "boot_timer=written\n"
  jmp reset32
