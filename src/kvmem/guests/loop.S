/* loop: keep writing a counter to a page and reading it back, while the host
 * reconfigures the memory slot under the page (the atomic-update demonstration).
 *
 * 32-bit protected mode, flat, CPL 0, no paging; position independent.
 *
 * in:  esi = data gpa (one dword; the page must stay RAM), ecx = iterations
 *      (0 = 2^32, i.e. until kicked), ebx = first counter value - 1
 * out: port 0x11 <- the value read back whenever it differs from what was just written
 *      (a write or read that did not reach RAM); after the last iteration,
 *      port 0x10 <- the counter, then hlt
 */
        .code32
        .text
        .globl _start
_start:
next:
        inc     %ebx
        mov     %ebx, (%esi)
        mov     (%esi), %eax
        cmp     %ebx, %eax
        jne     torn
again:
        dec     %ecx
        jnz     next
        mov     %ebx, %eax
        out     %eax, $0x10
        hlt
torn:
        out     %eax, $0x11
        jmp     again
