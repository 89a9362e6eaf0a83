/* hello.S - a bare-metal 64-bit guest: prints "Hello, KVM!\n" on the COM1
   port 0x3f8 and halts. examples/hello.lua puts the CPU in long mode and
   loads this at guest-physical 0x1000 (linked at 0 as a flat binary, so the
   code only uses RIP-relative addressing). */
	.code64
	.text
	.globl _start
_start:
	lea	msg(%rip), %rsi
	mov	$0x3f8, %dx
	mov	$(msg_end - msg), %ecx
1:	lodsb
	outb	%al, %dx
	loop	1b
	hlt
	jmp	_start		/* not reached: run() returns on hlt */
msg:	.ascii	"Hello, KVM!\n"
msg_end:
