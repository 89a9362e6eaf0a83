/* serial_flood.S - sends the 100000 bytes at 0x10000 to COM1 with two
   rep outsb of 50000 bytes each, then exits through port 0x501. */
#include "uart.inc"
	.code16
	.text
	.globl	_start
_start:
	cli
	cld
	mov	$COM, %dx
	mov	$0x1000, %ax		/* 0x10000 */
	mov	%ax, %ds
	xor	%si, %si
	mov	$50000, %cx
	rep	outsb
	mov	$0x1c35, %ax		/* 0x10000 + 50000 */
	mov	%ax, %ds
	xor	%si, %si
	mov	$50000, %cx
	rep	outsb
	done	0x00
