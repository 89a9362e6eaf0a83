/* fuzz_target.S - the 32-bit protected-mode guest of
   examples/snapshot_fuzz.lua: a small parser with two planted bugs. Linked
   at 0, loaded at guest-physical 0x1000 and run from there with flat
   segments (x86.protected_mode), so ABS() turns a label into its address.

   Start-up: stack at 0x8000, an IDT of limit 0 (any exception finds no
   vector, nor does the double fault that follows: a triple fault, and KVM
   reports a shutdown), the canary after the table. Then a write to the
   READY port: the script snapshots the VM there, and every exec starts from
   the instruction after it.

   Each exec: adds one to RUNS and stores in FPRINT a sum of the work area
   (what an exec before it would have changed), so the script can check that
   every exec starts from the same state; then parses the input the script
   wrote at INPUT (a word of length, then the bytes):

     'K' 'V' version=1 count   then `count` records: type, len, len bytes
       type 1 echo: len <= 16 bytes copied to ECHO
       type 2 sum:  the bytes added into SUM
       type 3 set:  len 2: TABLE[data0] = data1; the bound check lets
                    index 8 through (BUG 1: `ja` for `jae`), which writes
                    into the canary after the table
       type 4 div:  len >= 1: SUM = 1000 / data0, with no check for zero
                    (BUG 2: #DE, no IDT: a triple fault)
       other types are skipped

   and ends with a write to DONE (debug_exit: code 0 accepted, 1 rejected),
   or, when the canary was overwritten (checked at the end), a write of 0xbad to CRASH. Each
   branch taken sets its byte in COV (the script's coverage map). */
#define ABS(x)	((x) + 0x1000)
#define READY	0x500
#define DONE	0x501
#define CRASH	0x502

#define RUNS	0x3000		/* dword: execs since the snapshot (1 in each) */
#define FPRINT	0x3004		/* dword: sum of the work area at the start */
#define COV	0x4000		/* one byte per branch */
#define INPUT	0x5000		/* word: length; then the bytes */
#define WORK	0x6000		/* the parser's memory: */
#define TABLE	0x6000		/*   8 bytes */
#define CANARY	0x6008		/*   word 0xc0de */
#define SUM	0x600c		/*   dword */
#define ECHO	0x6010		/*   16 bytes */
#define WORK_DWORDS 8		/* 0x6000-0x601f */

#define COVER(n) movb $1, COV + (n)

	.code32
	.text
	.globl	_start
_start:
	cli
	mov	$0x8000, %esp
	lidt	ABS(idt0)
	movw	$0xc0de, CANARY
	mov	$READY, %dx
	out	%al, (%dx)		/* snapshot here */

exec:
	incl	RUNS
	xor	%eax, %eax
	mov	$WORK, %esi
	mov	$WORK_DWORDS, %ecx
1:	add	(%esi), %eax
	add	$4, %esi
	loop	1b
	mov	%eax, FPRINT

	/* esi: the input; ebp: its end */
	movzwl	INPUT, %ecx
	cmp	$256, %ecx
	ja	reject
	mov	$INPUT + 2, %esi
	mov	%esi, %ebp
	add	%ecx, %ebp
	COVER(0)
	cmp	$4, %ecx
	jb	reject
	cmpb	$'K', (%esi)
	jne	reject
	COVER(1)
	cmpb	$'V', 1(%esi)
	jne	reject
	COVER(2)
	cmpb	$1, 2(%esi)
	jne	reject
	COVER(3)
	movzbl	3(%esi), %ebx		/* records left */
	add	$4, %esi

record:
	test	%ebx, %ebx
	jz	accept
	dec	%ebx
	mov	%ebp, %eax		/* a header: 2 bytes */
	sub	%esi, %eax
	cmp	$2, %eax
	jb	truncated
	movb	(%esi), %dl		/* type */
	movzbl	1(%esi), %ecx		/* len */
	add	$2, %esi
	mov	%ebp, %eax
	sub	%esi, %eax
	cmp	%ecx, %eax
	jb	truncated
	COVER(4)
	cmp	$1, %dl
	je	echo
	cmp	$2, %dl
	je	sum
	cmp	$3, %dl
	je	set
	cmp	$4, %dl
	je	divide
	COVER(5)			/* unknown type: skipped */
next:
	add	%ecx, %esi
	jmp	record

echo:
	COVER(6)
	cmp	$16, %ecx
	ja	reject
	COVER(7)
	push	%esi
	push	%ecx
	mov	$ECHO, %edi
	cld
	rep movsb
	pop	%ecx
	pop	%esi
	jmp	next

sum:
	COVER(8)
	push	%esi
	push	%ecx
	xor	%eax, %eax
	jecxz	2f
1:	add	(%esi), %al
	adc	$0, %ah
	inc	%esi
	loop	1b
2:	add	%eax, SUM
	pop	%ecx
	pop	%esi
	jmp	next

set:
	COVER(9)
	cmp	$2, %ecx
	jne	reject
	COVER(10)
	movzbl	(%esi), %edi		/* index */
	cmp	$8, %edi
	ja	bad_index		/* BUG 1: index 8 is past the table */
	COVER(11)
	movb	1(%esi), %al
	movb	%al, TABLE(%edi)
	jmp	next
bad_index:
	COVER(12)
	jmp	reject

divide:
	COVER(13)
	jecxz	reject
	COVER(14)
	push	%ebx
	movzbl	(%esi), %ebx
	xor	%edx, %edx
	mov	$1000, %eax
	div	%ebx			/* BUG 2: divisor 0: #DE, a triple fault */
	mov	%eax, SUM
	pop	%ebx
	jmp	next

truncated:
	COVER(15)
reject:
	mov	$1, %al
	jmp	done
accept:
	COVER(16)
	xor	%al, %al
done:
	cmpw	$0xc0de, CANARY		/* checked on every way out */
	jne	crash
	mov	$DONE, %dx
	out	%al, (%dx)
	hlt
	jmp	done

crash:
	mov	$CRASH, %dx
	mov	$0xbad, %ax
	out	%ax, (%dx)
	hlt
	jmp	crash

	.balign	8
idt0:	.word	0			/* limit 0 */
	.long	0
