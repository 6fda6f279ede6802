/* long64: 64-bit long mode, CPL 0, 4-level paging — one qword per page written through the
 * page tables and folded back, with an SSE register carried across the whole run.
 *
 * 64-bit mode (kvmem.cpu.modes.long_mode: identity map, CR4.OSFXSR); position independent.
 * Where KVM emulates ring 0 its instruction emulator runs this code, so the SSE access is
 * MOVDQU, which the emulator knows.
 *
 * in:  rsi = first gva (page aligned), rcx = pages (>= 1), rbx = seed
 * out: port 0x10 <- low half of the last qword filled (mid-way), then port 0x10 <- low and
 *      port 0x10 <- high half of (checksum + seed), then hlt; the 16 bytes at rsi + 8 hold
 *      xmm1: the seed and the qword that was at rsi + 8
 */
        .code64
        .text
        .globl _start
_start:
        mov     %rbx, (%rsi)
        movdqu  (%rsi), %xmm1           /* kept in xmm1 until the end */
        mov     %rcx, %r8
        mov     %rsi, %rdi
fill:
        mov     %rdi, %rax
        xor     %rbx, %rax
        mov     %rax, (%rdi)
        add     $4096, %rdi
        dec     %rcx
        jnz     fill
        out     %eax, $0x10
        xor     %edx, %edx
        mov     %r8, %rcx
        mov     %rsi, %rdi
sum:
        rol     $1, %rdx
        xor     (%rdi), %rdx
        add     $4096, %rdi
        dec     %rcx
        jnz     sum
        movdqu  %xmm1, 8(%rsi)
        mov     8(%rsi), %rax
        add     %rdx, %rax
        out     %eax, $0x10
        shr     $32, %rax
        out     %eax, $0x10
        cmp     %eax, %eax              /* leave no flag undefined (AF after SHR/XOR/ROL) */
        hlt
