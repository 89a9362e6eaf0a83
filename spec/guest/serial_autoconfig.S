/* serial_autoconfig.S - replays the probe sequence of Linux's 8250 driver
   (autoconfig(), autoconfig_16550a(), size_fifo() and the THRE/TXEN tests
   of serial8250_do_startup()) on COM1 and stores each reading at 0x2000..;
   serial_spec.lua applies the driver's decisions to them. */
#include "uart.inc"
	.code16
	.text
	.globl	_start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	/* existence test: IER 0 and 0x0f read back */
	outp	COM+1, 0x00
	inp	COM+1, 0x2000		/* & 0x0f == 0x00 */
	outp	COM+1, 0x0f
	inp	COM+1, 0x2001		/* & 0x0f == 0x0f */
	outp	COM+1, 0x00
	/* loopback test */
	outp	COM+4, 0x1a
	inp	COM+6, 0x2002		/* & 0xf0 == 0x90 */
	outp	COM+4, 0x00
	/* EFR cleared through LCR 0xbf, then the FIFO bits of IIR */
	outp	COM+3, 0xbf
	outp	COM+2, 0x00
	outp	COM+3, 0x00
	outp	COM+2, 0x01
	inp	COM+2, 0x2003		/* >> 6 == 3: 16550A family */
	/* EFR at offset 2 with LCR 0x80 and 0xbf (must not read 0) */
	outp	COM+3, 0x80
	inp	COM+2, 0x2004
	outp	COM+3, 0xbf
	inp	COM+2, 0x2005
	/* National Semiconductor EXCR1 check */
	outp	COM+3, 0x00
	inp	COM+4, 0x2006		/* status1 = MCR */
	outp	COM+3, 0xe0
	inp	COM+2, 0x2007		/* status2 */
	outp	COM+3, 0x00
	mov	0x2006, %al
	xor	$0x10, %al
	mov	$COM+4, %dx
	outb	%al, %dx		/* MCR = status1 ^ LOOP */
	outp	COM+3, 0xe0
	inp	COM+2, 0x2008		/* status2 again */
	outp	COM+3, 0x00
	mov	0x2006, %al
	mov	$COM+4, %dx
	outb	%al, %dx
	/* TI16750 64-byte FIFO check */
	outp	COM+2, 0x21
	inp	COM+2, 0x2009		/* >> 5: must not be 6 with ... */
	outp	COM+2, 0x01
	outp	COM+3, 0x80
	outp	COM+2, 0x21
	inp	COM+2, 0x200a		/* ... >> 5 == 7 here */
	outp	COM+2, 0x01
	outp	COM+3, 0x00
	/* XScale UUE bit (IER bit 6) must not stick */
	outp	COM+1, 0x40
	inp	COM+1, 0x200b
	outp	COM+1, 0x00
	/* size_fifo: 256 bytes in loopback at divisor 1, count what arrives */
	outp	COM+2, 0x07
	outp	COM+4, 0x10
	outp	COM+3, 0x80
	outp	COM+0, 0x01
	outp	COM+1, 0x00
	outp	COM+3, 0x03
	mov	$COM, %dx
	xor	%al, %al
	mov	$256, %cx
1:	outb	%al, %dx
	inc	%al
	loop	1b
	xor	%bx, %bx
2:	mov	$COM+5, %dx
	inb	%dx, %al
	test	$1, %al
	jz	3f
	mov	$COM, %dx
	inb	%dx, %al
	inc	%bx
	cmp	$256, %bx
	jb	2b
3:	mov	%bl, 0x200c		/* 16 (64 would be a U6_16550A) */
	outp	COM+4, 0x00
	outp	COM+2, 0x07
	/* THRE test: THRI re-asserted after IER goes 0 -> THRI */
	outp	COM+1, 0x02
	inp	COM+2, 0x200d		/* iir1: pending */
	outp	COM+1, 0x00
	outp	COM+1, 0x02
	inp	COM+2, 0x200e		/* iir: pending again */
	outp	COM+1, 0x00
	/* TXEN test */
	outp	COM+1, 0x02
	inp	COM+5, 0x200f		/* lsr */
	inp	COM+2, 0x2010		/* iir */
	outp	COM+1, 0x00
	done	0x00
