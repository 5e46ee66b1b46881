/* Prints one line, then spins with interrupts off: only the VMM can end it. */
#include "pvh_note.S"
.intel_syntax noprefix
.code32
.section .text.entry
.global _start
_start:
  mov esp, 0x80000
  jmp main
#include "common32.S"
main:
  PUTS "hanging\n"
1:
  jmp 1b
