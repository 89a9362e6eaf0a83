/* serial_regs.S - pokes every 16550A register of COM1 and stores what it
   reads at 0x2000..0x201f (the received bytes of the overrun test at
   0x2100). spec/guest/serial_spec.lua lists the expected values. */
#include "uart.inc"
	.code16
	.text
	.globl	_start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	/* scratch register */
	outp	COM+7, 0xa5
	inp	COM+7, 0x2000		/* 0xa5 */
	outp	COM+7, 0x5a
	inp	COM+7, 0x2001		/* 0x5a */
	/* IER keeps bits 3-0 */
	outp	COM+1, 0x0f
	inp	COM+1, 0x2002		/* 0x0f */
	outp	COM+1, 0xff
	inp	COM+1, 0x2003		/* 0x0f */
	/* divisor latch behind DLAB */
	outp	COM+3, 0x83
	outp	COM+0, 0x34
	outp	COM+1, 0x12
	inp	COM+0, 0x2004		/* 0x34 */
	inp	COM+1, 0x2005		/* 0x12 */
	outp	COM+3, 0x03
	inp	COM+1, 0x2006		/* IER again: 0x0f */
	inp	COM+3, 0x2007		/* LCR: 0x03 */
	outp	COM+1, 0x00
	/* IIR FIFO bits */
	inp	COM+2, 0x2008		/* FIFO off, nothing pending: 0x01 */
	outp	COM+2, 0x07
	inp	COM+2, 0x2009		/* FIFO on: 0xc1 */
	inp	COM+5, 0x200a		/* LSR: THRE|TEMT 0x60 */
	/* loopback: MSR mirrors MCR */
	outp	COM+4, 0x1a		/* LOOP|OUT2|RTS */
	inp	COM+6, 0x200b		/* CTS|DCD, DSR went away: 0x92 */
	inp	COM+6, 0x200c		/* deltas cleared: 0x90 */
	outp	COM+4, 0x1f
	inp	COM+6, 0x200d		/* all four, DSR changed: 0xf2 */
	outp	COM+0, 0x41		/* THR -> RBR */
	inp	COM+5, 0x200e		/* DR: 0x61 */
	inp	COM+0, 0x200f		/* 0x41 */
	inp	COM+5, 0x2010		/* 0x60 */
	/* received data interrupt */
	outp	COM+1, 0x01
	outp	COM+0, 0x42
	inp	COM+2, 0x2011		/* 0xc4 */
	inp	COM+0, 0x2012		/* 0x42 */
	inp	COM+2, 0x2013		/* 0xc1 */
	/* THR empty interrupt: cleared by reading IIR, raised by a THR write */
	outp	COM+1, 0x02
	inp	COM+2, 0x2014		/* 0xc2 */
	inp	COM+2, 0x2015		/* 0xc1 */
	outp	COM+0, 0x43
	inp	COM+2, 0x2016		/* 0xc2 */
	inp	COM+0, 0x2017		/* 0x43 */
	outp	COM+1, 0x00
	/* 20 bytes into the 16-byte FIFO: overrun */
	mov	$COM, %dx
	mov	$20, %cx
	mov	$0x61, %al
1:	outb	%al, %dx
	inc	%al
	loop	1b
	inp	COM+5, 0x2018		/* DR|OE|THRE|TEMT: 0x63 */
	inp	COM+5, 0x2019		/* OE cleared by the read: 0x61 */
	xor	%bx, %bx		/* drain into 0x2100, counting */
2:	mov	$COM+5, %dx
	inb	%dx, %al
	test	$1, %al
	jz	3f
	mov	$COM, %dx
	inb	%dx, %al
	mov	%al, 0x2100(%bx)
	inc	%bx
	jmp	2b
3:	mov	%bl, 0x201a		/* 16 */
	/* trigger level 14, one byte: character timeout */
	outp	COM+2, 0xc7
	outp	COM+1, 0x01
	outp	COM+0, 0x44
	inp	COM+2, 0x201b		/* 0xcc */
	inp	COM+0, 0x201c		/* 0x44 */
	outp	COM+1, 0x00
	outp	COM+2, 0x00
	inp	COM+2, 0x201d		/* FIFO off: 0x01 */
	/* out of loopback: a connected modem, RI's trailing edge seen */
	outp	COM+4, 0x00
	inp	COM+6, 0x201e		/* 0xb4 */
	inp	COM+6, 0x201f		/* 0xb0 */
	done	0x00
