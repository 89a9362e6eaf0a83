/* portscript.S - port I/O from a list: the spec writes the list at 0x3000,
   entries of 7 bytes {op, port (16 bits), value (32 bits)}, and the guest
   does them in order: op 1 writes the value's low byte to the port, 2 reads
   a byte, 3 writes the 32-bit value, 4 reads 32 bits; what it reads goes to
   0x4000 on, one byte or four after another. Op 5 opens a window for
   interrupts (sti, a short loop, cli): the handler at 0x100 (ABS 0x1100, for
   the spec to put in the IVT) counts them in the word at 0x5000 and sends the
   master PIC an EOI. Op 0 ends the list: the guest leaves through the
   debug-exit port 0x501 with code 0. Interrupts are off but in op 5.
   spec/guest/snapshot_devices_spec.lua drives the port devices with it. */
	.code16
	.text
	.globl	_start
_start:
	cli
	cld
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	$0x3000, %si
	mov	$0x4000, %di
next:
	lodsb				/* op */
	mov	%al, %bl
	lodsw				/* port */
	mov	%ax, %dx
	lodsl				/* value */
	cmp	$1, %bl
	je	outb_
	cmp	$2, %bl
	je	inb_
	cmp	$3, %bl
	je	outl_
	cmp	$4, %bl
	je	inl_
	cmp	$5, %bl
	je	window
	mov	$0x501, %dx		/* op 0 (or another): done */
	xor	%al, %al
	outb	%al, %dx
	hlt
	jmp	_start
outb_:
	outb	%al, %dx
	jmp	next
inb_:
	inb	%dx, %al
	stosb
	jmp	next
outl_:
	outl	%eax, %dx
	jmp	next
inl_:
	inl	%dx, %eax
	stosl
	jmp	next
window:
	mov	$0x400, %cx
	sti
1:	loop	1b
	cli
	jmp	next

	.org	0x100
irq:
	push	%ax
	incw	0x5000
	mov	$0x20, %al
	outb	%al, $0x20
	pop	%ax
	iret
