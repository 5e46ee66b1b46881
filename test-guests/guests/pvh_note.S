/* The PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): makes the VMM enter at _start in 32-bit mode. */
.pushsection .note.Xen, "a", @note
  .balign 4
  .long 4          /* name size */
  .long 4          /* desc size */
  .long 18         /* XEN_ELFNOTE_PHYS32_ENTRY */
  .asciz "Xen"
  .balign 4
  .long _start
  .balign 4
.popsection
