/* 32-bit helpers: serial output on COM1 (polling LSR), hex printing, reset. */
.intel_syntax noprefix

/* PUTS "text": prints the string that follows the call. */
.macro PUTS s
  call puts_inline32
  .asciz "\s"
.endm

/* KV "key", value: prints key=XXXXXXXX and a newline; clobbers nothing. */
.macro KV key, value
  push eax
  mov eax, \value
  PUTS "\key="
  call puthex32
  call newline32
  pop eax
.endm

.section .text
putc32:
  push edx
  push eax
1:
  mov dx, 0x3fd
  in al, dx
  test al, 0x20
  jz 1b
  pop eax
  mov dx, 0x3f8
  out dx, al
  pop edx
  ret

newline32:
  push eax
  mov al, 10
  call putc32
  pop eax
  ret

puts_inline32:
  xchg esi, [esp]
  push eax
1:
  lodsb
  test al, al
  jz 2f
  call putc32
  jmp 1b
2:
  pop eax
  xchg esi, [esp]
  ret

/* puts32: esi = NUL-terminated string */
puts32:
  push eax
  push esi
1:
  lodsb
  test al, al
  jz 2f
  call putc32
  jmp 1b
2:
  pop esi
  pop eax
  ret

puthex32:
  push eax
  push ecx
  push edx
  mov edx, eax
  mov ecx, 8
1:
  rol edx, 4
  mov eax, edx
  and eax, 0xf
  cmp al, 10
  jb 2f
  add al, 'a' - 10 - '0'
2:
  add al, '0'
  call putc32
  loop 1b
  pop edx
  pop ecx
  pop eax
  ret

boot_timer32:
  mov byte ptr [0xc0000000], 123
  ret

reset32:
  PUTS "reset\n"
  mov al, 0xfe
  out 0x64, al
1:
  hlt
  jmp 1b
