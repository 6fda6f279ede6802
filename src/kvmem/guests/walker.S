/* walker: write a pattern over guest RAM, read it back into a checksum, report it.
 *
 * 32-bit protected mode, flat segments, CPL 0, no paging (kvmem.guests: "CPU mode").
 * Position independent: load anywhere, enter at the first byte.
 *
 * in:  esi = first gpa, ecx = bytes to walk (a multiple of edi), edi = stride (4..4096),
 *      ebx = seed, ebp = passes (>= 1)
 * out: port 0x10 <- checksum (32 bits), then hlt
 *
 * Each pass p (counting down from ebp to 1) stores (addr ^ seed ^ p) at every stride,
 * then folds the words back: sum = rol(sum, 1) ^ word. One word per page (stride 4096)
 * keeps the ring-0 instruction count small where KVM emulates ring 0.
 */
        .code32
        .text
        .globl _start
_start:
        add     %esi, %ecx              /* ecx = end */
pass:
        mov     %esi, %eax
fill:
        mov     %eax, %edx
        xor     %ebx, %edx
        xor     %ebp, %edx
        mov     %edx, (%eax)
        add     %edi, %eax
        cmp     %ecx, %eax
        jb      fill
        xor     %edx, %edx
        mov     %esi, %eax
sum:
        rol     $1, %edx
        xor     (%eax), %edx
        add     %edi, %eax
        cmp     %ecx, %eax
        jb      sum
        dec     %ebp
        jnz     pass
        mov     %edx, %eax
        out     %eax, $0x10
        hlt
