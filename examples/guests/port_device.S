/* port_device.S - the 16-bit real-mode guest of examples/port_device.lua.
   Linked at 0, loaded at guest-physical 0x1000 and run with CS = DS = 0,
   IP = 0x1000, so ABS() turns a label into the address it runs at.

   1. Programs the in-kernel 8259 PIC (ICW1..ICW4): vectors 0x20-0x27, only
      IRQ 5 unmasked; points IVT entry 0x25 at timer_isr.
   2. Reads NRAND dwords from the random-number port 0x5f0 into 0x2000...
   3. TICKS times: arms the countdown timer (a 16-bit count of milliseconds
      written to port 0x5f8), then waits with sti; hlt until timer_isr has
      run. The ISR reads the timer's status port 0x5f9 (expiries since the
      last read, which acknowledges them), adds it to the count at 0x2020
      and sends the PIC an EOI.
   4. Writes the interrupt count to the debug-exit port 0x501. */
#define ABS(x)	((x) + 0x1000)
#define RNG	0x5f0
#define TIMER	0x5f8
#define STATUS	0x5f9
#define NRAND	4
#define TICKS	3
#define MS	20
#define RANDS	0x2000		/* NRAND dwords */
#define COUNT	0x2020		/* interrupts seen (word) */
#define WAKES	0x2022		/* times hlt returned (word) */

	.code16
	.text
	.globl	_start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$0x7000, %sp
	movw	$0, COUNT
	movw	$0, WAKES

	/* IVT entry 0x25 (IRQ 5 with the PIC's base at 0x20) = 0000:timer_isr */
	movw	$ABS(timer_isr), 0x25 * 4
	movw	$0, 0x25 * 4 + 2

	/* 8259 master: ICW1 edge-triggered, cascade, ICW4 needed; ICW2 vector
	   base 0x20; ICW3 slave on IRQ 2; ICW4 8086 mode; then the mask */
	mov	$0x11, %al
	out	%al, $0x20
	mov	$0x20, %al
	out	%al, $0x21
	mov	$0x04, %al
	out	%al, $0x21
	mov	$0x01, %al
	out	%al, $0x21
	mov	$0xdf, %al		/* 1101 1111: only IRQ 5 */
	out	%al, $0x21

	/* random numbers: NRAND 32-bit reads */
	mov	$RNG, %dx
	mov	$RANDS, %di
	mov	$NRAND, %cx
1:	inl	%dx, %eax
	mov	%eax, (%di)
	add	$4, %di
	loop	1b

	/* TICKS rounds of: arm the timer, sleep until its interrupt */
	mov	$TICKS, %cx
2:	mov	COUNT, %bx		/* the count before this round */
	mov	$TIMER, %dx
	mov	$MS, %ax
	outw	%ax, %dx
	sti
3:	hlt				/* wakes on any interrupt */
	incw	WAKES
	cmp	COUNT, %bx
	je	3b			/* not ours yet: sleep again */
	cli
	loop	2b

	/* report: the number of interrupts */
	mov	COUNT, %al
	mov	$0x501, %dx
	outb	%al, %dx
	hlt

timer_isr:
	push	%ax
	push	%dx
	mov	$STATUS, %dx
	inb	%dx, %al		/* expiries since the last read */
	xor	%ah, %ah
	add	%ax, COUNT
	mov	$0x20, %al		/* non-specific EOI */
	out	%al, $0x20
	pop	%dx
	pop	%ax
	iret
