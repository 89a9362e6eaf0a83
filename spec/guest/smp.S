/*
 * smp.S - an SMP test guest. The BSP (flat 32-bit protected mode, loaded at
 * 0x1000 by spec/support.lua) enables its local APIC, wakes every other CPU
 * with INIT and two start-up IPIs (vector 2: they start in real mode at
 * 0x2000), writes its APIC id (from the APIC ID register) to port 0x10, and
 * waits until the APs have counted themselves at 0x3000 up to the number the
 * host put at 0x3004; then it writes port 0x11 and halts with interrupts off.
 * Each AP writes its APIC id (from CPUID leaf 1, EBX[31:24]) to port 0x10,
 * counts itself (lock inc) and halts with interrupts off. Before its APIC
 * id, every CPU writes it to port 0x12 as many times as the host put at
 * 0x3008 (0: none), all CPUs at once.
 */
	.text
	.code32
bsp:
	mov	$0xfee00000, %ebx
	movl	$0x1ff, 0xf0(%ebx)		/* spurious vector register: APIC on */
	movl	$0x000c4500, 0x300(%ebx)	/* INIT, level assert, to all but self */
	movl	$0x000c4602, 0x300(%ebx)	/* start-up IPI, vector 2 */
	movl	$0x000c4602, 0x300(%ebx)	/* and the second one */
	mov	0x20(%ebx), %eax		/* APIC ID register: id in 31:24 */
	shr	$24, %eax
	mov	0x3008, %ecx
	mov	$0x12, %dx
	test	%ecx, %ecx
	jz	5f
4:	out	%eax, (%dx)
	dec	%ecx
	jnz	4b
5:	mov	$0x10, %dx
	out	%eax, (%dx)
1:	pause
	mov	0x3000, %eax
	cmp	0x3004, %eax
	jb	1b
	mov	$0x11, %dx
	out	%al, (%dx)
2:	cli
	hlt
	jmp	2b

	.org	0x1000				/* 0x2000 once loaded */
	.code16
ap:
	xor	%ax, %ax
	mov	%ax, %ds
	mov	$1, %eax
	cpuid
	shr	$24, %ebx
	mov	%ebx, %eax
	mov	0x3008, %ecx
	mov	$0x12, %dx
	test	%ecx, %ecx
	jz	7f
6:	out	%eax, (%dx)
	dec	%ecx
	jnz	6b
7:	mov	$0x10, %dx
	out	%eax, (%dx)
	lock incl 0x3000
3:	cli
	hlt
	jmp	3b
