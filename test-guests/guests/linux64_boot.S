/* No PVH note: the VMM uses the Linux 64-bit boot protocol. Reports long-mode state and the
   zero page. */
.intel_syntax noprefix
.code64
.section .text.entry
.global _start
_start:
  mov rdi, rsi              /* boot_params */
  mov rbp, rsp              /* entry stack pointer */
  jmp main

.macro PUTS s
  call puts_inline64
  .asciz "\s"
.endm

.macro KV key, value
  push rax
  mov rax, \value
  PUTS "\key="
  call puthex64
  call newline64
  pop rax
.endm

putc64:
  push rdx
  push rax
1:
  mov dx, 0x3fd
  in al, dx
  test al, 0x20
  jz 1b
  pop rax
  mov dx, 0x3f8
  out dx, al
  pop rdx
  ret

newline64:
  push rax
  mov al, 10
  call putc64
  pop rax
  ret

puts_inline64:
  xchg rsi, [rsp]
  push rax
1:
  lodsb
  test al, al
  jz 2f
  call putc64
  jmp 1b
2:
  pop rax
  xchg rsi, [rsp]
  ret

puthex64:
  push rax
  push rcx
  push rdx
  mov rdx, rax
  mov rcx, 16
1:
  rol rdx, 4
  mov rax, rdx
  and rax, 0xf
  cmp al, 10
  jb 2f
  add al, 'a' - 10 - '0'
2:
  add al, '0'
  call putc64
  loop 1b
  pop rdx
  pop rcx
  pop rax
  ret

main:
  PUTS "hello from linux64_boot\n"
  KV "rsp", rbp
  KV "zero_page", rdi
  mov ecx, 0xc0000080       /* EFER */
  rdmsr
  KV "efer", rax
  mov rax, cr0
  KV "cr0", rax
  mov rax, cr3
  KV "cr3", rax
  mov rax, cr4
  KV "cr4", rax
  mov eax, [rdi + 0x202]
  KV "hdr_magic", rax
  movzx eax, byte ptr [rdi + 0x1e8]
  KV "e820_entries", rax
  mov esi, [rdi + 0x228]
  PUTS "cmdline="
1:
  lodsb
  test al, al
  jz 2f
  call putc64
  jmp 1b
2:
  call newline64
  /* Touch memory at 512 MiB through the identity map (the VMM maps the first GiB). */
  mov rax, 0x20000000
  mov qword ptr [rax], 0x1234
  mov rax, [rax]
  KV "mem_512m", rax
  /* The VMM identity-maps only the first GiB; map 3..4 GiB with one more page directory
     (at 0xc000) so the boot timer at 0xc0000000 is reachable. */
  mov rax, 0xc0000083
  mov qword ptr [0xc000], rax
  mov rbx, cr3
  mov rax, [rbx]
  and rax, ~0xfff            /* PDPT */
  mov qword ptr [rax + 3 * 8], 0xc003
  mov cr3, rbx
  mov rax, 0xc0000000
  mov byte ptr [rax], 123
  PUTS "reset\n"
  mov al, 0xfe
  out 0x64, al
3:
  hlt
  jmp 3b
