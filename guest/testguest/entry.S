/*
 * kvmbox test guest: entry points, exception stubs, ring-3 switch, AP trampoline.
 *
 * Three boot contracts converge on entry_common64:
 *   - PVH: pvh_entry32 (32-bit protected mode, paging off, EBX = hvm_start_info).
 *   - Linux 64-bit: entry64 = ELF e_entry (long mode, identity map, RSI = boot_params).
 *   - Multiboot: mb_entry32 (32-bit protected mode, paging off, EAX = 0x2BADB002,
 *     EBX = multiboot info), the e_entry of the ELF32 multiboot build (Makefile).
 */

#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UDATA   0x18
#define SEL_UCODE   0x20
#define SEL_TSS     0x28
#define SEL_KCODE32 0x38

#define MSR_EFER    0xc0000080
#define EFER_LME    0x100
#define CR0_PE      0x1
#define CR0_PG      0x80000000
#define CR4_PAE     0x20

#define ENTRY_PVH     1
#define ENTRY_LINUX64 2
#define ENTRY_MULTIBOOT 3

#define MB_HEADER_MAGIC 0x1BADB002
#define MB_HEADER_FLAGS 0x3             /* page-aligned modules, memory information */
#define MB_BOOT_MAGIC   0x2BADB002

#define TRAMP_BASE    0x8000
#define AP_STACK_SIZE 8192
#define TRAMP(sym)    ((sym) - ap_tramp_start + TRAMP_BASE)

/* ---------------------------------------------------------------- PVH note */
        .section .note.Xen, "a"
        .balign 4
        .long 4                 /* name size ("Xen\0") */
        .long 4                 /* desc size */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_entry32

/* ------------------------------------------------------- multiboot header */
        .section .text.entry, "ax"
        .balign 4
        .long MB_HEADER_MAGIC, MB_HEADER_FLAGS, -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

/* ----------------------------------------------------------- 64-bit entry */
        .code64
        .globl entry64
entry64:
        cli
        cld
        mov     %rsi, %r12              /* boot_params */
        lgdt    gdt_ptr(%rip)
        mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        lea     boot_stack_top(%rip), %rsp
        pushq   $SEL_KCODE
        lea     1f(%rip), %rax
        pushq   %rax
        lretq
1:      mov     $ENTRY_LINUX64, %edi
        mov     %r12, %rsi
        jmp     entry_common64

/* ---------------------------------------------------- multiboot and PVH entries */
        .code32
        .globl mb_entry32
mb_entry32:
        cmp     $MB_BOOT_MAGIC, %eax
        jne     9f
        mov     $ENTRY_MULTIBOOT, %ebp
        jmp     5f
9:      cli
        hlt
        jmp     9b

        .globl pvh_entry32
pvh_entry32:
        mov     $ENTRY_PVH, %ebp        /* the entry kind, kept to long mode */
5:      cli
        cld
        mov     %ebx, %esi              /* hvm_start_info or multiboot info */
        lgdt    gdt_ptr
        ljmp    $SEL_KCODE32, $1f
1:      mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     $boot_stack_top, %esp
        /*
         * The first GiB is identity-mapped by the static tables below (pml4 -> pdpt ->
         * boot_pd): no code builds them, as ring 0 is emulated on kvm_pvm (a loop over 512
         * entries was ~2,600 emulated instructions at every start). kmain builds the full
         * map from ring 3.
         */
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $(CR0_PG | CR0_PE), %eax
        mov     %eax, %cr0
        ljmp    $SEL_KCODE, $4f
        .code64
4:      mov     %ebp, %edi
        /* esi = start_info (upper half already zero after the mode switch? make sure) */
        mov     %esi, %esi
        jmp     entry_common64

        .code64
entry_common64:
        lea     boot_stack_top(%rip), %rsp
        xor     %ebp, %ebp
        call    kmain
4:      cli
        hlt
        jmp     4b

/* ------------------------------------------------------ ring-3 switching */
/*
 * u64 run_user(u64 (*fn)(u64), u64 arg, void *user_stack_top)
 * Runs fn(arg) in ring 3 and returns its result. The ring-3 side ends with
 * ud2 at user_exit; the #UD handler (trap() in main.c) resumes run_user_return.
 */
        .text
        .globl run_user
run_user:
        push    %rbx
        push    %rbp
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rsp, saved_kernel_rsp(%rip)
        pushq   $(SEL_UDATA | 3)        /* SS */
        pushq   %rdx                    /* RSP */
        pushq   $0x3002                 /* RFLAGS: IOPL=3, IF=0 */
        pushq   $(SEL_UCODE | 3)        /* CS */
        lea     user_tramp(%rip), %rcx
        pushq   %rcx                    /* RIP */
        mov     %rdi, %rax
        mov     %rsi, %rdi
        iretq
user_tramp:
        call    *%rax
        .globl user_exit
user_exit:
        ud2
        .globl run_user_return
run_user_return:
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbp
        pop     %rbx
        ret

/* ------------------------------------------------------ exception stubs */
.macro ISR_NOERR n
isr\n:
        pushq   $0
        pushq   $\n
        jmp     isr_common
.endm
.macro ISR_ERR n
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
/*
 * #UD: fast path for the end of run_user() (ud2 at user_exit from CPL 3): ring 0 is
 * emulated on kvm_pvm, so skip the full frame save. Anything else takes the slow path.
 */
isr6:
        testb   $3, 8(%rsp)             /* CS of the faulting code */
        jz      1f
        cmpq    $user_exit, (%rsp)      /* RIP */
        jne     1f
        mov     saved_kernel_rsp(%rip), %rsp
        mov     $SEL_KDATA, %ecx
        mov     %ecx, %ss
        cld
        jmp     run_user_return
1:      pushq   $0
        pushq   $6
        jmp     isr_common
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
        ISR_NOERR 20
        ISR_ERR   21
        ISR_NOERR 22
        ISR_NOERR 23
        ISR_NOERR 24
        ISR_NOERR 25
        ISR_NOERR 26
        ISR_NOERR 27
        ISR_NOERR 28
        ISR_ERR   29
        ISR_ERR   30
        ISR_NOERR 31

isr_common:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %rbp
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rsp, %rdi
        cld
        call    trap
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rbp
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        add     $16, %rsp
        iretq

/* ------------------------------------------------------ external interrupts */
/*
 * COM1 (VECTOR_COM1): taken only in ring 0, on the current stack. Saves the registers a C
 * function may clobber (the CPU pushed 40 bytes onto a 16-byte aligned stack, plus 72 here:
 * the call sees the ABI's alignment), calls com1_interrupt (which sends the EOI).
 */
        .text
        .globl irq_com1_entry
irq_com1_entry:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        cld
        call    com1_interrupt
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq

/* LAPIC spurious interrupt: no EOI. */
        .globl irq_spurious_entry
irq_spurious_entry:
        iretq

        .section .rodata
        .balign 8
        .globl isr_table
isr_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad isr\n
        .endr

/* ------------------------------------------------------ AP trampoline */
/*
 * Copied to TRAMP_BASE (SIPI vector 0x08) by smp.c. Real mode -> 32-bit
 * protected mode -> long mode on the BSP's page tables, then ap_entry64.
 */
        .text
        .code16
        .globl ap_tramp_start
ap_tramp_start:
        cli
        cld
        xor     %ax, %ax
        mov     %ax, %ds
        lgdtl   TRAMP(tramp_gdtr)
        mov     %cr0, %eax
        or      $CR0_PE, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $TRAMP(tramp32)
        .code32
tramp32:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $CR0_PG, %eax
        mov     %eax, %cr0
        ljmp    $0x18, $TRAMP(tramp64)
        .code64
tramp64:
        mov     $1, %eax
        lock xadd %eax, ap_next_index   /* absolute: the image sits below 2 GiB */
        cmp     $63, %eax               /* ap_stacks holds 64 stacks; index i uses i + 1 */
        jae     5f
        mov     %eax, %edi              /* ap_main(index) */
        lea     1(%rax), %rax
        imul    $AP_STACK_SIZE, %rax, %rax
        mov     $ap_stacks, %rsp
        add     %rax, %rsp
        movabs  $ap_entry64, %rax
        jmp     *%rax
5:      cli
        hlt
        jmp     5b
        .balign 8
tramp_gdt:
        .quad 0
        .quad 0x00cf9a000000ffff        /* 0x08: code32 */
        .quad 0x00cf92000000ffff        /* 0x10: data */
        .quad 0x00af9a000000ffff        /* 0x18: code64 */
tramp_gdtr:
        .word tramp_gdtr - tramp_gdt - 1
        .long TRAMP(tramp_gdt)
        .globl ap_tramp_end
ap_tramp_end:

        .code64
ap_entry64:
        lgdt    gdt_ptr(%rip)
        mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        pushq   $SEL_KCODE
        lea     1f(%rip), %rax
        pushq   %rax
        lretq
1:      lidt    idt_ptr(%rip)
        xor     %ebp, %ebp
        call    ap_main
2:      cli
        hlt
        jmp     2b

/* ------------------------------------------------------ data */
        .data
        .balign 16
        .globl gdt
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08 kernel code64 */
        .quad 0x00cf92000000ffff        /* 0x10 kernel data */
        .quad 0x00cff2000000ffff        /* 0x18 user data (DPL 3) */
        .quad 0x00affa000000ffff        /* 0x20 user code64 (DPL 3) */
        .quad 0, 0                      /* 0x28 TSS, filled by kmain */
        .quad 0x00cf9a000000ffff        /* 0x38 kernel code32 (PVH entry) */
gdt_end:
        .globl gdt_ptr
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

        .globl idt_ptr
idt_ptr:
        .word 0
        .quad 0

        .globl ap_next_index
        .balign 4
ap_next_index:
        .long 0

/*
 * No code zeroes memory: ring 0 is emulated on kvm_pvm and `rep stos` over the 1 MiB image
 * took ~70 ms. Zero-initialised data is stored in the file (linker.ld); .bss.noinit holds
 * only stacks and page directories that are written before they are read.
 */
        .balign 4096
        .globl pml4, pdpt
pml4:   .quad pdpt + 7                  /* P | RW | US */
        .skip 4096 - 8
pdpt:   .quad boot_pd + 7               /* replaced by pds[0] once kmain maps everything */
        .skip 4096 - 8
boot_pd:                                /* 0..1 GiB in 2 MiB pages, P | RW | US | PS */
        .set pde, 0x87
        .rept 512
        .quad pde
        .set pde, pde + 0x200000
        .endr

        .section .bss.noinit, "aw", @nobits
        .balign 4096
        .globl pds
pds:    .skip 4096 * 64                 /* maps up to 64 GiB with 2 MiB pages */

        .balign 16
        .globl boot_stack_top
boot_stack:
        .skip 32768
boot_stack_top:

        .globl ap_stacks
        .balign 16
ap_stacks:
        .skip AP_STACK_SIZE * 64

        .data
        .balign 8
        .globl saved_kernel_rsp
saved_kernel_rsp:
        .quad 0
