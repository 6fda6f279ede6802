/* spin64: a counted loop of two instructions (dec, jnz) — the instruction-rate probe of
 * benchmarks/bench_cpu.py.
 *
 * 64-bit mode, CPL 0 or 3; position independent.
 *
 * in:  rcx = iterations (>= 1), rdx = 0 at CPL 0, 1 at CPL 3
 * out: CPL 0: port 0x10 <- 0, then hlt; CPL 3: INT3 with rax = 1 (the user_mode stub's
 *      port 0x13 exit, vector 3), then hlt (#GP at CPL 3: the stub's exit with vector 13)
 */
        .code64
        .text
        .globl _start
_start:
1:
        dec     %rcx
        jnz     1b
        xor     %eax, %eax
        test    %rdx, %rdx
        jnz     2f
        out     %eax, $0x10
        hlt
2:
        inc     %eax
        int3
        hlt
