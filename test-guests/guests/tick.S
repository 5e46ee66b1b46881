/* A timer interrupt held pending across a snapshot. Programs the local APIC's timer for one
   interrupt (vector 0x40) a microsecond away, but keeps interrupts off, counting at 0x50000,
   until the host writes a non-zero word at 0x5000c: only then does it enable interrupts,
   and the interrupt waiting in the APIC's IRR since long before runs its handler, which
   counts at 0x50008. The one-shot timer never fires again: a restore that lost the pending
   interrupt (the APIC state) leaves 0x50008 at 0 for ever. */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov esp, 0x80000
  /* IDT at 0x70000; gate 0x40: a 32-bit interrupt gate to tick in this code segment. */
  mov eax, offset tick
  mov edi, 0x70000 + 0x40 * 8
  mov word ptr [edi], ax
  mov cx, cs
  mov word ptr [edi + 2], cx
  mov byte ptr [edi + 4], 0
  mov byte ptr [edi + 5], 0x8e
  shr eax, 16
  mov word ptr [edi + 6], ax
  lidt [idtr]
  /* Local APIC: enabled (spurious vector 0xff), timer divide by 1, one-shot to vector
     0x40, initial count 1000. */
  mov dword ptr [0xfee000f0], 0x1ff
  mov dword ptr [0xfee003e0], 0xb
  mov dword ptr [0xfee00320], 0x40
  mov dword ptr [0xfee00380], 1000
1:
  inc dword ptr [0x50000]
  cmp dword ptr [0x5000c], 0
  je 1b
  sti
2:
  inc dword ptr [0x50000]
  jmp 2b

tick:
  inc dword ptr [0x50008]
  mov dword ptr [0xfee000b0], 0
  iret

.align 8
idtr:
  .word 256 * 8 - 1
  .long 0x70000
