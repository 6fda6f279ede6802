/* real16: real mode — segment arithmetic, a segment register load, call/ret and push/pop on
 * the stack, and an INT through the interrupt vector table.
 *
 * Real mode (kvmem.cpu.modes.real_mode), loaded at a 16-byte boundary and entered with IP = 0
 * (labels are offsets from CS), DS = 0, SS:SP a stack, the IVT at 0.
 *
 * in:  si = buffer offset (in DS and in ES), cx = words (1..0x7fff), bx = seed,
 *      bp = segment loaded into ES (a second buffer at bp * 16 + si)
 * out: port 0x10 <- the last word filled (mid-way), then the INT 0x40 handler the program
 *      installs writes port 0x10 <- ~checksum and returns, then port 0x10 <- checksum
 *      (16 bits; the words are read back from the ES copy), then hlt
 */
        .code16
        .text
        .globl _start
_start:
        movw    $handler, 0x100         /* IVT[0x40] = CS:handler */
        movw    %cs, 0x102
        mov     %bp, %es
        push    %cx
        mov     %si, %di
fill:
        mov     %di, %ax
        xor     %bx, %ax
        mov     %ax, (%di)
        mov     %ax, %es:(%di)
        add     $2, %di
        loop    fill
        out     %ax, $0x10
        pop     %cx
        call    checksum
        mov     %dx, %ax
        int     $0x40
        mov     %dx, %ax
        out     %ax, $0x10
        cmp     %ax, %ax              /* leave no flag undefined (AF after SHR/XOR/ROL) */
        hlt
checksum:                               /* dx = fold of cx words at ES:si */
        xor     %dx, %dx
        mov     %si, %di
1:
        rol     $1, %dx
        xor     %es:(%di), %dx
        add     $2, %di
        loop    1b
        ret
handler:
        not     %ax
        out     %ax, $0x10
        iret
