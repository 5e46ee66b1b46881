/* Brings up vCPU 1 with INIT/SIPI and counts CPUs in the MP table. */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov esp, 0x80000
  jmp main
#include "common32.S"

.code16
ap_trampoline:
  cli
  xor ax, ax
  mov ds, ax
  mov byte ptr [0x9000], 1
1:
  hlt
  jmp 1b
ap_trampoline_end:
.code32

main:
  PUTS "hello from smp\n"
  /* MP table: find "_MP_" in 0xf0000..0x100000, count processor entries. */
  mov esi, 0xf0000
1:
  cmp esi, 0x100000
  jae 9f
  cmp dword ptr [esi], 0x5f504d5f
  je 2f
  add esi, 16
  jmp 1b
2:
  mov ebx, [esi + 4]              /* configuration table */
  movzx ecx, word ptr [ebx + 34]  /* entry count */
  lea esi, [ebx + 44]
  xor edx, edx                    /* processors */
3:
  test ecx, ecx
  jz 5f
  cmp byte ptr [esi], 0
  jne 4f
  inc edx
  add esi, 20
  dec ecx
  jmp 3b
4:
  add esi, 8
  dec ecx
  jmp 3b
5:
  KV "mp_cpus", edx
  jmp 10f
9:
  PUTS "mp_table=missing\n"
10:
  /* Local APIC: enable, report our id, wake APIC 1. */
  mov eax, [0xfee00020]
  shr eax, 24
  KV "bsp_apic", eax
  mov dword ptr [0xfee000f0], 0x1ff
  mov byte ptr [0x9000], 0
  /* Copy the trampoline to 0x8000 (SIPI vector 8). */
  mov esi, offset ap_trampoline
  mov edi, 0x8000
  mov ecx, offset ap_trampoline_end
  sub ecx, esi
  rep movsb
  mov dword ptr [0xfee00310], 0x01000000
  mov dword ptr [0xfee00300], 0x00004500     /* INIT */
  mov ecx, 100000
11:
  dec ecx
  jnz 11b
  mov dword ptr [0xfee00310], 0x01000000
  mov dword ptr [0xfee00300], 0x00004608     /* SIPI, vector 8 */
  mov ecx, 100000
12:
  dec ecx
  jnz 12b
  mov dword ptr [0xfee00310], 0x01000000
  mov dword ptr [0xfee00300], 0x00004608     /* second SIPI, as the spec asks */
  mov ecx, 1000000000
13:
  cmp byte ptr [0x9000], 1
  je 14f
  dec ecx
  jnz 13b
  PUTS "ap=timeout\n"
  jmp reset32
14:
  PUTS "ap=started\n"
  jmp reset32
