/* poker: a device driver in miniature — MMIO and port reads and writes of every width,
 * with what it reads stored into RAM so a run can be compared byte for byte.
 *
 * 32-bit protected mode, flat, CPL 0, no paging; position independent.
 *
 * in:  esi = MMIO base gpa (no memory slot there), edi = RAM scratch gpa (16 bytes),
 *      edx = port base (3 ports: base, base+1, base+2)
 * out: the exits below, in this order, then hlt
 */
        .code32
        .text
        .globl _start
_start:
        movl    $0x11223344, (%esi)     /* mmio write 4 @ base */
        mov     4(%esi), %eax           /* mmio read 4  @ base+4 */
        mov     %eax, (%edi)
        out     %eax, %dx               /* io write 4   @ port */
        inc     %edx
        in      %dx, %al                /* io read 1    @ port+1 */
        mov     %al, 8(%esi)            /* mmio write 1 @ base+8 */
        movw    0x10(%esi), %ax         /* mmio read 2  @ base+0x10 */
        mov     %ax, 4(%edi)
        inc     %edx
        out     %ax, %dx                /* io write 2   @ port+2 */
        in      %dx, %eax               /* io read 4    @ port+2 */
        mov     %eax, 8(%edi)
        movb    0x18(%esi), %bl         /* mmio read 1  @ base+0x18 */
        mov     %bl, 12(%edi)
        movb    $0x5a, 13(%edi)
        movw    $0xbeef, 14(%edi)
        hlt
