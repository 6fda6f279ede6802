/* user64: 64-bit code at CPL 3 under the ring-0 stub of kvmem.cpu.modes.user_mode — a heavy
 * loop (user code runs natively on KVM), then three ways user code reaches the kernel: a trap
 * (INT3), a page fault the VMM repairs, and a privileged instruction. (SYSCALL and INT n reach
 * the same stub; they are not used here because the KVM of kvmem's CI host, kvm_pvm, does not
 * deliver them from CPL 3 — tests/test_cpu_user.py shows what it does.)
 *
 * 64-bit mode, CPL 3 (kvmem.cpu.modes.user_mode); position independent.
 *
 * in:  rsi = buffer gva, rcx = qwords (>= 1), rbx = seed, rbp = passes (>= 1),
 *      r12 = a supervisor-only gva
 * out, each an exit of the stub:
 *   INT3 with rax = 1, rdi = checksum          -> port 0x13 <- 3, then back after the INT3;
 *   a store of ~checksum to r12                -> port 0x13 <- 14, edx = 7 (P|W|U), rcx = r12;
 *      the VMM points r12 at a user page and resumes: the store is retried;
 *   HLT (privileged at CPL 3)                  -> port 0x13 <- 13, edx = 0
 */
        .code64
        .text
        .globl _start
_start:
        mov     %rcx, %r8
pass:
        mov     %rsi, %rdi
        mov     %r8, %rcx
fill:
        mov     %rdi, %rax
        xor     %rbx, %rax
        xor     %rbp, %rax
        mov     %rax, (%rdi)
        add     $8, %rdi
        dec     %rcx
        jnz     fill
        xor     %edx, %edx
        mov     %rsi, %rdi
        mov     %r8, %rcx
sum:
        rol     $1, %rdx
        xor     (%rdi), %rdx
        add     $8, %rdi
        dec     %rcx
        jnz     sum
        dec     %rbp
        jnz     pass
        mov     %rdx, %rdi
        mov     $1, %eax
        int3
        not     %rdi
        mov     %rdi, (%r12)
        cmp     %eax, %eax              /* leave no flag undefined */
        hlt
