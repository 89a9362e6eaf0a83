/* serial_out.S - prints a message on COM1 the way a driver does, waiting
   for THRE before each byte, then exits through port 0x501. */
#include "uart.inc"
	.code16
	.text
	.globl	_start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	cld
	mov	$ABS(msg), %si
1:	lodsb
	test	%al, %al
	jz	9f
	mov	%al, %ah
	mov	$COM+5, %dx
2:	inb	%dx, %al
	test	$0x20, %al
	jz	2b
	mov	$COM, %dx
	mov	%ah, %al
	outb	%al, %dx
	jmp	1b
9:	done	0x00
msg:	.asciz	"hello from the guest\nno newline at the end"
