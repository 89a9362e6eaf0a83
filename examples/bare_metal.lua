#!/usr/bin/env lua5.4
--- bare_metal.lua: a guest written in assembly inside this script. The source
-- below is assembled at run time with GNU as and linked to a flat binary with
-- `ld --oformat=binary`; the 64-bit guest computes the 20th Fibonacci number
-- (into rax) and the 64-bit FNV-1a hash of a message the script put in guest
-- memory (into rbx), then writes al to the debug-exit port 0x501. run()
-- returns reason "debug_exit" with e.code = that byte; the script reads the
-- full results from the registers and checks them against Lua's own sums
-- (Lua 5.4's integers wrap at 2^64 exactly as the guest's do).
--
-- Run: make && lua5.4 examples/bare_metal.lua   (needs GNU as and ld: binutils)
-- Expected output:
--   assembled 76 bytes of guest code
--   debug exit: code 109 (0x6d), rip=0x104b
--   fib(20) = 6765 (rax), expected 6765
--   fnv1a64("Hello from bare metal!") = 0x78d75e4d365188bb (rbx), expected 0x78d75e4d365188bb
--   ok
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local kvm = require "kvm"
local x86 = require "kvm.x86"

local N = 20                           -- which Fibonacci number
local MSG = "Hello from bare metal!"   -- what the guest hashes
local MSG_ADDR = 0x3000                -- where the script puts it

-- The guest: 64-bit code, linked at 0 and loaded at 0x1000 (so only
-- RIP-relative or absolute addressing). Inputs in registers: ecx = N,
-- rsi = message address, rdx = message length.
local SOURCE = [[
	.code64
	.text
	.globl _start
_start:
	/* rax = fib(ecx): a, b = 0, 1; repeat ecx times: a, b = b, a + b */
	xor	%eax, %eax
	mov	$1, %r8d
1:	test	%ecx, %ecx
	jz	2f
	lea	(%rax,%r8), %r9
	mov	%r8, %rax
	mov	%r9, %r8
	dec	%ecx
	jmp	1b
2:
	/* rbx = FNV-1a 64 of [rsi, rsi + rdx) */
	movabs	$0xcbf29ce484222325, %rbx
	movabs	$0x100000001b3, %r10
3:	test	%rdx, %rdx
	jz	4f
	movzbq	(%rsi), %r11
	xor	%r11, %rbx
	imul	%r10, %rbx
	inc	%rsi
	dec	%rdx
	jmp	3b
4:
	/* report: the low byte of fib(N) through the debug-exit port */
	mov	$0x501, %dx
	outb	%al, %dx
	hlt
]]

--- Assemble `source` into a flat binary (linked at 0); returns its bytes, or
-- nil and what went wrong.
local function assemble(source)
  local base = os.tmpname()
  local src, obj, bin = base .. ".S", base .. ".o", base .. ".bin"
  local function cleanup()
    for _, f in ipairs{ base, src, obj, bin } do os.remove(f) end
  end
  local f = assert(io.open(src, "w"))
  f:write(source)
  f:close()
  local cmd = string.format("as --64 -o %s %s 2>&1 && ld -Ttext=0 --oformat=binary -o %s %s 2>&1",
    obj, src, bin, obj)
  local p = assert(io.popen(cmd))
  local log = p:read("a")
  local ok = p:close()
  if not ok then
    cleanup()
    return nil, "as/ld failed (is binutils installed?):\n" .. log
  end
  f = assert(io.open(bin, "rb"))
  local bytes = f:read("a")
  f:close()
  cleanup()
  return bytes
end

-- what the guest should compute, in Lua
local function fib(n)
  local a, b = 0, 1
  for _ = 1, n do a, b = b, a + b end
  return a
end

local function fnv1a64(s)
  local h = 0xcbf29ce484222325           -- negative as a Lua integer: fine
  for i = 1, #s do h = (h ~ s:byte(i)) * 0x100000001b3 end
  return h
end

local code = assert(assemble(SOURCE))
print(("assembled %d bytes of guest code"):format(#code))

local vm <close> = assert(kvm.vm())
local ram = assert(vm:memory{ guest = 0, size = 2 << 20 })
vm:debug_exit(0x501)
ram:write(0x1000, code)
ram:write(MSG_ADDR, MSG)
local cpu = assert(vm:vcpu(0))
x86.long_mode(cpu, vm, { ram_size = ram.size })
cpu:set_regs{ rip = 0x1000, rsp = 0x8000, rflags = x86.RFLAGS_RESERVED,
              rcx = N, rsi = MSG_ADDR, rdx = #MSG }

local e = assert(cpu:run{ timeout = 10 })
if e.reason ~= "debug_exit" then
  io.stderr:write("bare_metal: the guest stopped unexpectedly: ", tostring(e), "\n")
  os.exit(1)
end
local r = cpu:regs()
print(("debug exit: code %d (0x%02x), rip=0x%x"):format(e.code, e.code, r.rip))
local want_fib, want_hash = fib(N), fnv1a64(MSG)
print(("fib(%d) = %d (rax), expected %d"):format(N, r.rax, want_fib))
print(("fnv1a64(%q) = 0x%016x (rbx), expected 0x%016x"):format(MSG, r.rbx, want_hash))
if r.rax ~= want_fib or r.rbx ~= want_hash or e.code ~= want_fib & 0xff then
  print("MISMATCH")
  os.exit(1)
end
print("ok")
