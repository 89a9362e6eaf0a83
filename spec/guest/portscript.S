/* portscript.S - port I/O from a list: the spec writes the list at 0x3000,
   entries of 7 bytes {op, port (16 bits), value (32 bits)}, and the guest
   does them in order: op 1 writes the value's low byte to the port, 2 reads
   a byte, 3 writes the 32-bit value, 4 reads 32 bits; what it reads goes to
   0x4000 on, one byte or four after another. Op 0 ends the list: the guest
   leaves through the debug-exit port 0x501 with code 0. Interrupts stay off.
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
