/*
 * count.S - a 16-bit real-mode test guest: writes a counter that starts at
 * 0 to port 0x10 (out 0x10, ax), increments it and loops, forever.
 * Position independent: spec/support.lua loads it at 0x1000.
 */
	.code16
	.text
	xor	%ax, %ax
1:	out	%ax, $0x10
	inc	%ax
	jmp	1b
