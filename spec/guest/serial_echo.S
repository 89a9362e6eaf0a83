/* serial_echo.S - turns the FIFOs on, then echoes every byte received on
   COM1 back until it reads 0x04 (EOT), and exits through port 0x501. */
#include "uart.inc"
	.code16
	.text
	.globl	_start
_start:
	cli
	outp	COM+2, 0x07
1:	mov	$COM+5, %dx
2:	inb	%dx, %al
	test	$1, %al
	jz	2b
	mov	$COM, %dx
	inb	%dx, %al
	cmp	$0x04, %al
	je	9f
	outb	%al, %dx
	jmp	1b
9:	done	0x00
