/* The benchmark's stub guest: boot timer, then reset. Nothing else, so the VMM's own cost is
   what is measured. */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov byte ptr [0xc0000000], 123
  mov al, 0xfe
  out 0x64, al
1:
  hlt
  jmp 1b
