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

local function usage(msg)
  if msg then io.stderr:write("boot_linux: ", msg, "\n") end
  io.stderr:write("usage: lua5.4 examples/boot_linux.lua KERNEL [--initrd FILE] [--mem 256M]\n",
                  "         [--cmdline \"...\"] [--append \"...\"] [--timeout SECONDS] [--status]\n")
  os.exit(2)
end

local function parse_size(s)
  local n, unit = tostring(s):match("^(%d+)([KkMmGg]?)$")
  if not n then return nil end
  local shift = ({ [""] = 0, k = 10, K = 10, m = 20, M = 20, g = 30, G = 30 })[unit]
  return math.tointeger(n) << shift
end

local opts = { output = io.stdout }
local status = false
local i = 1
while i <= #arg do
  local a = arg[i]
  local function value()
    i = i + 1
    if arg[i] == nil then usage(a .. " needs a value") end
    return arg[i]
  end
  if a == "--initrd" then opts.initrd = value()
  elseif a == "--mem" then
    opts.memory = parse_size(value()) or usage("--mem: a size like 256M expected")
  elseif a == "--cmdline" then opts.cmdline = value()
  elseif a == "--append" then opts.append = value()
  elseif a == "--timeout" then opts.timeout = tonumber(value()) or usage("--timeout: seconds expected")
  elseif a == "--status" then status = true
  elseif a == "-h" or a == "--help" then usage()
  elseif a:sub(1, 2) == "--" then usage("unknown option " .. a)
  elseif not opts.kernel then opts.kernel = a
  else usage("one kernel only") end
  i = i + 1
end
if not opts.kernel then usage("no kernel given") end

-- the console: straight to the terminal, remembering the last lines for
-- --status and for the report of a fatal exit
local start = os.time()
local last_line, last_lines, partial = "", {}, ""
opts.output = function(bytes)
  io.stdout:write(bytes)
  io.stdout:flush()
  partial = partial .. bytes
  for line in partial:gmatch("([^\r\n]*)\r?\n") do
    if line ~= "" then
      last_line = line
      last_lines[#last_lines + 1] = line
      if #last_lines > 10 then table.remove(last_lines, 1) end
    end
  end
  partial = partial:match("([^\n]*)$"):sub(-4096)
end
-- keyboard input goes to the guest when stdin is a terminal or a pipe
opts.input = io.stdin

local ctx, err = linux.setup(opts)
if not ctx then
  io.stderr:write("boot_linux: ", err, "\n")
  os.exit(1)
end
if ctx.profile then
  io.stderr:write("boot_linux: host profile '", ctx.profile.name, "': ", ctx.profile.description, "\n")
end
ctx.log = function(msg) io.stderr:write("\r\nboot_linux: ", msg, "\r\n") end

local e = linux.run(ctx, { timeout = opts.timeout, every = status and 5 or nil,
  on_tick = function(_, elapsed)
    io.stderr:write(string.format("\r\27[2K[boot_linux %4ds] %s\n", math.floor(elapsed), last_line:sub(1, 100)))
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
  for _, line in ipairs(last_lines) do io.stderr:write("  | ", line, "\n") end
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
