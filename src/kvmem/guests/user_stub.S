/* user_stub: the ring-0 side of kvmem.cpu.modes.user_mode — every way CPL-3 code can enter
 * the kernel becomes one port write the VMM sees, and then goes back.
 *
 * 64-bit mode, CPL 0, entered only by the CPU: SYSCALL (IA32_LSTAR = offset 0) and the 256
 * IDT gates (vector v at offset 0x100 + 16 * v). Position independent. Layout is a contract
 * with kvmem/cpu/modes.py (STUB_SYSCALL, STUB_VECTORS).
 *
 * SYSCALL:   port 0x12 <- eax (the number; arguments stay in their registers), then SYSRET.
 * vector v:  rax, rcx, rdx saved on the kernel stack; port 0x13 <- v with edx = error code
 *            (0 for vectors without one) and rcx = CR2; then they are restored and IRET
 *            returns to the interrupted code (after INT n; back at a faulting instruction).
 *            At the exit, rsp + 40 is the interrupt frame (RIP, CS, RFLAGS, RSP, SS).
 */
        .code64
        .text
        .globl _start
_start:
syscall_entry:
        out     %eax, $0x12
        sysretq

        .org    0x100
        .set    vec, 0
        .rept   256
        .balign 16
        .if     (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        push    $vec                    /* the CPU pushed an error code */
        .else
        push    $0
        push    $vec
        .endif
        jmp     common
        .set    vec, vec + 1
        .endr

common:
        push    %rax
        push    %rcx
        push    %rdx
        mov     24(%rsp), %eax          /* vector */
        mov     32(%rsp), %rdx          /* error code */
        mov     %cr2, %rcx
        out     %eax, $0x13
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $16, %rsp
        iretq
