/* SPDX-License-Identifier: GPL-2.0-or-later
 * Entry of the bare-metal test guest: multiboot (a.out kludge, so a flat 64-bit image loads),
 * identity-map the first 64 GiB with 2 MiB pages, enter long mode, call kmain(mbi).
 */
#define MB_MAGIC   0x1BADB002
#define MB_FLAGS   0x00010003          /* page-align modules, memory info, a.out kludge */
#define IDENT_GIB  64                  /* identity-mapped physical range */

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header                    /* header_addr */
    .long _load_start                  /* load_addr */
    .long _load_end                    /* load_end_addr */
    .long _bss_end                     /* bss_end_addr */
    .long _start32                     /* entry_addr */

    .section .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    mov     %ebx, %esi                 /* multiboot info pointer */
    /* zero .bss (page tables and stack live there) */
    mov     $_bss_start, %edi
    mov     $_bss_end, %ecx
    sub     %edi, %ecx
    shr     $2, %ecx
    xor     %eax, %eax
    rep stosl
    /* PML4[0] -> PDPT */
    mov     $pdpt, %eax
    or      $0x3, %eax
    mov     %eax, pml4
    /* PDPT[i] -> PD page i, for i < IDENT_GIB */
    xor     %ecx, %ecx
1:  mov     %ecx, %eax
    shl     $12, %eax
    add     $pd, %eax
    or      $0x3, %eax
    mov     %eax, pdpt(,%ecx,8)
    inc     %ecx
    cmp     $IDENT_GIB, %ecx
    jb      1b
    /* PD entries: 2 MiB leaves, frame j << 21 */
    xor     %ecx, %ecx
2:  mov     %ecx, %eax
    shl     $21, %eax
    or      $0x83, %eax                /* present, writable, PS */
    mov     %eax, pd(,%ecx,8)
    mov     %ecx, %eax
    shr     $11, %eax
    mov     %eax, pd+4(,%ecx,8)
    inc     %ecx
    cmp     $(IDENT_GIB * 512), %ecx
    jb      2b
    /* enable PAE, long mode, paging */
    mov     $pml4, %eax
    mov     %eax, %cr3
    mov     %cr4, %eax
    or      $0x20, %eax
    mov     %eax, %cr4
    mov     $0xC0000080, %ecx
    rdmsr
    or      $0x100, %eax
    wrmsr
    mov     %cr0, %eax
    or      $0x80000001, %eax
    mov     %eax, %cr0
    lgdt    gdt_ptr
    ljmp    $0x08, $start64

    .code64
start64:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    xor     %ax, %ax
    mov     %ax, %fs
    mov     %ax, %gs
    mov     $stack_top, %rsp
    mov     %esi, %edi
    call    kmain
3:  cli
    hlt
    jmp     3b

/* Interrupt stubs: push a vector (and a dummy error code where the CPU pushes none). */
.macro ISR_NOERR n
    .globl isr\n
isr\n:
    pushq   $0
    pushq   $\n
    jmp     isr_common
.endm
.macro ISR_ERR n
    .globl isr\n
isr\n:
    pushq   $\n
    jmp     isr_common
.endm
ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
.irp n,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
ISR_NOERR \n
.endr

isr_common:
    push    %rax
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    mov     %rsp, %rdi                 /* struct trap_frame * */
    call    trap
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rax
    add     $16, %rsp                  /* vector, error code */
    iretq

    .section .rodata
    .align 8
gdt:
    .quad 0
    .quad 0x00209A0000000000           /* 0x08: 64-bit code */
    .quad 0x0000920000000000           /* 0x10: data */
gdt_ptr:
    .word gdt_ptr - gdt - 1
    .long gdt

    .section .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096 * IDENT_GIB
stack:  .skip 65536
stack_top:
