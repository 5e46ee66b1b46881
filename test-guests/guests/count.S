/* Counts forever, twice: the word at COUNT_ADDR (0x50000) in memory, and EBX, copied to
   0x50004 after each step. Pausing must stop both; a restored snapshot must continue both
   (the copy restarts from 0 if the registers were not restored). */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov esp, 0x80000
  xor ebx, ebx
1:
  inc dword ptr [0x50000]
  inc ebx
  mov dword ptr [0x50004], ebx
  jmp 1b
