/* fuzzme: a parser with a planted bug, reachable one input byte at a time (the target
 * of examples/fuzz.py and the demo's fuzz panel).
 *
 * 32-bit protected mode, flat, CPL 0, no paging; position independent; no stack.
 *
 * in:  esi = input gpa, ecx = input length, edi = scratch gpa (6 pages: the parser
 *      writes each byte it reads into a page of its own, so every run dirties pages)
 * out: port 0x20 <- how many leading input bytes match "KVMEM!", after each match
 *      port 0x21 <- 0xBAD when all six do (the planted bug), then hlt
 *      hlt when a byte does not match or the input ends
 */
        .code32
        .text
        .globl _start

        .macro step ch
        cmp     %ecx, %edx
        jae     done
        movzbl  (%esi,%edx), %eax
        mov     %eax, (%edi)
        add     $4096, %edi
        cmp     $\ch, %al
        jne     done
        inc     %edx
        mov     %edx, %eax
        out     %eax, $0x20
        .endm

_start:
        xor     %edx, %edx
        step    0x4B            /* K */
        step    0x56            /* V */
        step    0x4D            /* M */
        step    0x45            /* E */
        step    0x4D            /* M */
        step    0x21            /* ! */
        mov     $0xBAD, %eax
        out     %eax, $0x21
done:
        hlt
