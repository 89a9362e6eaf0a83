/* serial_irq.S - the THR-empty interrupt through the in-kernel PIC. The
   8259 is set up for vectors 0x08-0x0f with only IRQ 4 unmasked. Phase 1
   enables ETBEI with OUT2 clear (no interrupt may arrive); phase 2 sets
   OUT2 and waits in hlt. The handler stores the phase at 0x2000 and IIR at
   0x2001 (THRI) and 0x2002 (cleared by the first read), then exits. */
#include "uart.inc"
	.code16
	.text
	.globl	_start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7000, %sp
	movw	$ABS(handler), 0x30	/* IVT entry 0x0c = IRQ 4 */
	movw	$0, 0x32
	movb	$0xee, 0x2000
	/* 8259: ICW1..ICW4, then the mask */
	outp	0x20, 0x11
	outp	0x21, 0x08
	outp	0x21, 0x04
	outp	0x21, 0x01
	outp	0x21, 0xef
	/* phase 1: interrupt pending but OUT2 clear */
	movb	$1, 0x2010
	outp	COM+4, 0x00
	outp	COM+1, 0x02
	sti
	mov	$0x2000, %cx
1:	nop
	loop	1b
	cli
	/* phase 2: OUT2 lets it through */
	movb	$2, 0x2010
	outp	COM+4, 0x08
	sti
2:	hlt
	jmp	2b

handler:
	mov	0x2010, %al
	mov	%al, 0x2000
	inp	COM+2, 0x2001
	inp	COM+2, 0x2002
	outp	0x20, 0x20		/* EOI */
	done	0x00
