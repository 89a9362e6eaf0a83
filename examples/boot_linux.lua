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

-- the console: straight to the terminal, remembering the last line for --status
local start = os.time()
local last_line = ""
opts.output = function(bytes)
  io.stdout:write(bytes)
  io.stdout:flush()
  if status then
    local line = bytes:match("([^\r\n]*)[\r\n]*$")
    if line and line ~= "" then last_line = line end
  end
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
if e.reason == "internal_error" then
  io.stderr:write(string.format("\r\nboot_linux: the guest stopped after %ds: %s\n", elapsed, tostring(e)))
  io.stderr:write("boot_linux: the host could not emulate this instruction; see kvm.hostprofile\n")
  os.exit(3)
elseif e.reason == "intr" then
  io.stderr:write(string.format("\r\nboot_linux: interrupted after %ds\n", elapsed))
elseif e.reason == "timeout" then
  io.stderr:write(string.format("\r\nboot_linux: timeout after %ds\n", elapsed))
elseif e.reason == "stopped" and ctx.power.state == "poweroff" then
  io.stderr:write(string.format("\r\nboot_linux: the guest powered off after %ds\n", elapsed))
elseif e.reason == "halted" then
  -- poweroff or halt without ACPI: the kernel stops with interrupts off
  io.stderr:write(string.format("\r\nboot_linux: the guest halted after %ds\n", elapsed))
else
  io.stderr:write(string.format("\r\nboot_linux: VM stopped after %ds: %s\n", elapsed, tostring(e)))
end
ctx.vm:close()
