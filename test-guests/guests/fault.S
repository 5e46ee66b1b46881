/* Loads an empty IDT and raises an exception: #BP -> #GP -> #DF -> triple fault. */
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
  PUTS "faulting\n"
  lidt [idt0]
  int3
  PUTS "still alive\n"
  jmp reset32
idt0:
  .word 0
  .long 0
