/* prot32: 32-bit protected mode — CS, DS, ES and SS reloaded from the GDT that
 * kvmem.cpu.modes.protected_mode writes, then a pattern written and folded into a checksum.
 *
 * 32-bit protected mode, flat, CPL 0, no paging (kvmem.cpu.modes.protected_mode); position
 * independent.
 *
 * in:  esi = first gpa, ecx = dwords (>= 1), ebx = seed, esp = a stack
 * out: port 0x10 <- the last dword filled (mid-way), port 0x10 <- checksum, then hlt
 */
        .code32
        .text
        .globl _start
_start:
        call    1f
1:      pop     %eax
        add     $(2f - 1b), %eax
        push    $0x30                   /* the 32-bit code segment of modes.GDT */
        push    %eax
        lret
2:      mov     $0x10, %ax              /* the flat data segment */
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        push    %ecx
        mov     %esi, %edi
fill:
        mov     %edi, %eax
        xor     %ebx, %eax
        stosl
        loop    fill
        out     %eax, $0x10
        pop     %ecx
        xor     %edx, %edx
        mov     %esi, %edi
sum:
        rol     $1, %edx
        xor     %es:(%edi), %edx
        add     $4, %edi
        loop    sum
        mov     %edx, %eax
        out     %eax, $0x10
        cmp     %eax, %eax              /* leave no flag undefined (AF after SHR/XOR/ROL) */
        hlt
