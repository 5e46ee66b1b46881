/* Counts forever at COUNT_ADDR (0x50000) and prints nothing: pausing must stop the count
   and resuming must continue it. */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov esp, 0x80000
1:
  inc dword ptr [0x50000]
  jmp 1b
