#!/usr/bin/env lua5.4
--- boot_linux.lua: boot a Linux kernel on the serial console.
--
-- Usage: lua5.4 examples/boot_linux.lua KERNEL [--initrd FILE] [--mem 256M]
--          [--cmdline "..."] [--append "..."] [--timeout SECONDS] [--status]
--
-- KERNEL is an ELF vmlinux or a bzImage (`make kernel` fetches Debian's cloud
-- kernel into guest-kernel/). The guest's console is this terminal: with an
-- initramfs that starts a shell you type at the guest's shell. Ctrl-C stops
-- the VM and restores the terminal. --status prints, on stderr, the elapsed
-- time and the last console line every few seconds.
--
-- Exit status: 0 the guest powered off (ACPI S5), 5 it halted for good (a
-- poweroff without ACPI), 4 it reset (reboot), 124 timeout, 130 Ctrl-C,
-- 3 a fatal exit (RIP, the code bytes there and the console's last lines
-- are printed), 1 the set-up failed, 2 bad usage.
--
-- Expected output (Debian 6.1 cloud kernel, ELF vmlinux):
--   [    0.000000] Linux version 6.1.0-... (debian-kernel@lists.debian.org) ...
--   [    0.000000] Command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 ...
--   ...
--   [    0.xxxxxx] printk: console [ttyS0] enabled
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local linux = require "kvm.linux"
local cli = require "kvm.cli"

local function usage(msg)
  if msg then io.stderr:write("boot_linux: ", msg, "\n") end
  io.stderr:write("usage: lua5.4 examples/boot_linux.lua KERNEL [--initrd FILE] [--mem 256M]\n",
                  "         [--cmdline \"...\"] [--append \"...\"] [--timeout SECONDS] [--status]\n")
  os.exit(2)
end

local args, bad = cli.parse(arg, { initrd = "string", mem = "size", cmdline = "string", append = "string",
                                    timeout = "number", status = "flag" })
if not args or args.help then usage(bad) end
if not args[1] then usage("no kernel given") end

-- the console: straight to the terminal, remembering the last lines for
-- --status and for the report of a fatal exit
local start = os.time()
local console = cli.console{ echo = io.stdout }
local opts = { kernel = args[1], initrd = args.initrd, memory = args.mem, cmdline = args.cmdline,
               append = args.append, timeout = args.timeout, output = console.output,
               input = io.stdin }   -- keyboard input goes to the guest (a terminal or a pipe)

local ctx, err = linux.setup(opts)
if not ctx then
  io.stderr:write("boot_linux: ", err, "\n")
  os.exit(1)
end
if ctx.profile then
  io.stderr:write("boot_linux: host profile '", ctx.profile.name, "': ", ctx.profile.description, "\n")
end
ctx.log = function(msg) io.stderr:write("\r\nboot_linux: ", msg, "\r\n") end

local e = linux.run(ctx, { timeout = opts.timeout, every = args.status and 5 or nil,
  on_tick = function(_, elapsed)
    io.stderr:write(string.format("\r\27[2K[boot_linux %4ds] %s\n", math.floor(elapsed), console.last:sub(1, 100)))
  end })

local elapsed = os.time() - start
io.stdout:flush()
local function say(fmt, ...)
  io.stderr:write("\r\nboot_linux: ", string.format(fmt, ...), "\n")
end

-- a fatal exit: where the guest was, the bytes it stopped on, what it last said
local function report_fatal()
  local ok, r = pcall(ctx.cpu.regs, ctx.cpu)
  if ok and r then
    local code = "?"
    local gpa = ctx.cpu:translate(r.rip)
    local okr, bytes = pcall(ctx.vm.read, ctx.vm, gpa or r.rip, 16)
    if gpa and okr then code = bytes:gsub(".", function(c) return string.format("%02x ", c:byte()) end) end
    io.stderr:write(string.format("boot_linux: RIP 0x%016x RSP 0x%016x RFLAGS 0x%x\n", r.rip, r.rsp, r.rflags))
    io.stderr:write("boot_linux: code at RIP: ", code, "\n")
  end
  io.stderr:write("boot_linux: the console's last lines:\n")
  for _, line in ipairs(console.lines) do io.stderr:write("  | ", line, "\n") end
end

-- the exit status says how the run ended
local status_of = { poweroff = 0, halted = 5, reset = 4, timeout = 124, intr = 130 }
local code = status_of[e.reason]
if e.reason == "poweroff" then
  say("the guest powered off after %ds", elapsed)
elseif e.reason == "halted" then
  -- poweroff or halt without ACPI: the kernel stops with interrupts off
  say("the guest halted after %ds", elapsed)
elseif e.reason == "reset" then
  say("the guest reset itself after %ds (reboot)", elapsed)
elseif e.reason == "intr" then
  say("interrupted after %ds", elapsed)
elseif e.reason == "timeout" then
  say("timeout after %ds", elapsed)
else
  code = 3
  say("the guest stopped after %ds: %s", elapsed, tostring(e))
  if e.reason == "internal_error" then
    io.stderr:write("boot_linux: the host could not emulate this instruction; see kvm.hostprofile\n")
  end
  report_fatal()
end
ctx.vm:close()
os.exit(code)
