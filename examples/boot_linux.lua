#!/usr/bin/env lua5.4
--- boot_linux.lua: boot a Linux kernel on the serial console.
--
-- Usage: lua5.4 examples/boot_linux.lua KERNEL [--initrd FILE] [--mem 256] [--cpus N]
--          [--disk FILE[,ro]]... [--rng]
--          [--cmdline "..."] [--append "..."] [--timeout SECONDS] [--status]
--          [--gdb HOST:PORT [--gdb-wait]]
--        lua5.4 examples/boot_linux.lua --help | --version
-- (installed by the rock as `kvm-boot`; --help lists the options and their defaults)
--
-- KERNEL is an ELF vmlinux or a bzImage (`make kernel` fetches Debian's cloud
-- kernel into guest-kernel/). The guest's console is this terminal: with an
-- initramfs that starts a shell you type at the guest's shell. Ctrl-C stops
-- the VM and restores the terminal. --status prints, on stderr, the elapsed
-- time and the last console line every few seconds. --gdb listens for gdb
-- (kvm.gdb: `target remote HOST:PORT`), --gdb-wait first waits for it with the
-- guest stopped before its first instruction.
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
-- from a checkout (examples/boot_linux.lua), the checkout's modules and
-- kvm/core.so; installed (kvm-boot), the ones on the module paths
local script = arg and arg[0] or ""
local root = script:match("^(.*)/examples/[^/]*$") or (script:match("^examples/[^/]*$") and ".")
if root then
  package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
  package.cpath = root .. "/?.so;" .. package.cpath
end

local linux = require "kvm.linux"
local cli = require "kvm.cli"

-- how to run this script again: "lua5.4 examples/boot_linux.lua" or "kvm-boot"
local prog = root and "lua5.4 examples/boot_linux.lua" or script:match("[^/]*$")
local me = root and "boot_linux" or prog   -- the messages' prefix

local OPTIONS = { initrd = "string", mem = "mib", cpus = "number", cmdline = "string",
                  append = "string", timeout = "number", status = "flag", version = "flag",
                  disk = "disks", rng = "flag", gdb = "string", ["gdb-wait"] = "flag",
                  ["save-at"] = "pair", restore = "string" }

local function help()
  local cmdline = ("  " .. linux.DEFAULT_CMDLINE):gsub("(" .. ("."):rep(60) .. "%S*) ", "%1\n  ")
  io.stdout:write((([[
usage: PROG KERNEL [options]
       PROG --restore FILE [--timeout S] [--status]
       PROG --help | --version
Boot a Linux kernel (an ELF vmlinux or a bzImage) with this terminal as its
serial console (you type at the guest; Ctrl-C stops it).

options (default in brackets):
  --initrd FILE      the initramfs [none]
  --mem SIZE         guest RAM: a bare number is MiB, or with a suffix: 256M,
                     1G, 65536K; 16M or more, a multiple of 2M [MEM]
  --cpus N           virtual CPUs, 1 to MAXCPUS, each a thread of this process [1]
  --disk FILE[,ro]   a raw disk image as a virtio-blk device, read-only with
                     ,ro; repeat for more: the first is /dev/vda [none]
  --rng              a virtio-rng device: the host's entropy [off]
  --cmdline "..."    replaces the default kernel command line [below]
  --append "..."     adds to the command line: the default one or --cmdline's
                     [nothing]
  --timeout SECONDS  stop the guest after SECONDS [none: run until it stops]
  --status           every 5 s, the elapsed time and the console's last line
                     on stderr [off]
  --gdb HOST:PORT    a GDB remote stub on this TCP address (127.0.0.1:1234;
                     gdb: target remote 127.0.0.1:1234); each vCPU is a
                     thread of gdb's [none]
  --gdb-wait         with --gdb: stop before the first instruction and wait
                     for gdb to connect [off]
  --save-at TEXT FILE  when the console first prints TEXT (the shell's
                     prompt, say), save the whole VM to FILE (kvm.linux.save)
                     and go on [never]
  --restore FILE     build the machine FILE describes (the kernel and disk
                     files it names must still be there) and resume it where
                     it was saved, instead of booting [no]
  -h, --help         this help, then exit
  --version          the version, then exit
A host profile (kvm.hostprofile; named on stderr when one applies) adds its
parameters after the command line, before --append's. With --disk or --rng
the default command line leaves out nomodules (the virtio drivers are
modules in Debian's cloud kernel; the initramfs loads them).

default command line:
CMDLINE

exit status:
  0    the guest powered off (ACPI S5)
  5    it halted for good (a poweroff without ACPI)
  4    it reset (reboot)
  124  --timeout ran out
  130  Ctrl-C
  137  gdb killed the guest (kill)
  3    a fatal exit (RIP, the code bytes there and the console's last lines
       are printed on stderr)
  1    the set-up failed (kernel, initrd, memory, /dev/kvm)
  2    bad usage
]]):gsub("PROG", prog):gsub("MEM", (linux.DEFAULT_MEMORY >> 20) .. "M")
   :gsub("MAXCPUS", linux.MAX_CPUS):gsub("CMDLINE", function() return cmdline end)))
  os.exit(0)
end

local function usage(msg)
  io.stderr:write(me, ": ", msg, " (try: ", prog, " --help)\n")
  os.exit(2)
end

local args, bad = cli.parse(arg, OPTIONS)
if not args then usage(bad) end
if args.help then help() end
if args.version then
  io.stdout:write(me, " (luakvm) ", require("kvm.core")._VERSION, "\n")
  os.exit(0)
end
if args.restore then
  if args[1] then usage("--restore FILE takes no KERNEL: the file names it") end
  for _, o in ipairs{ "initrd", "mem", "cpus", "cmdline", "append", "disk", "rng" } do
    if args[o] then usage("--restore FILE takes no --" .. o .. ": the machine is the one saved") end
  end
end
if not args[1] and not args.restore then usage("no kernel given") end
if args["save-at"] and args["save-at"][1] == "" then usage("--save-at: the text to wait for is empty") end
if args.mem and (args.mem < 16 << 20 or args.mem % (2 << 20) ~= 0) then
  usage("--mem: 16M or more, a multiple of 2M expected")
end
if args.gdb and not args.gdb:match("^[%d%.]*:%d+$") and not args.gdb:match("^localhost:%d+$") then
  usage("--gdb: HOST:PORT expected (like 127.0.0.1:1234)")
end
if args["gdb-wait"] and not args.gdb then usage("--gdb-wait needs --gdb HOST:PORT") end
if args.cpus and (math.type(args.cpus) ~= "integer" or args.cpus < 1 or args.cpus > linux.MAX_CPUS) then
  usage(("--cpus: a whole number from 1 to %d expected"):format(linux.MAX_CPUS))
end

-- the console: straight to the terminal, remembering the last lines for
-- --status and for the report of a fatal exit
local start = os.time()
local console = cli.console{ echo = io.stdout }
local opts = { kernel = args[1], initrd = args.initrd, memory = args.mem, cpus = args.cpus,
               cmdline = args.cmdline,
               append = args.append, timeout = args.timeout, output = console.output,
               disks = args.disk, rng = args.rng,
               input = io.stdin }   -- keyboard input goes to the guest (a terminal or a pipe)

-- --save-at: the console's output is watched for the text; the run stops
-- there, the VM is saved (on_exit below) and goes on
local save_at, want_save = args["save-at"], false
local ctx, err
if save_at then
  local seen, text, echo = "", save_at[1], console.output
  opts.output = function(bytes)
    echo(bytes)
    if seen == nil then return end
    seen = (seen .. bytes):sub(-(#text + 4096))
    if seen:find(text, 1, true) then
      seen, want_save = nil, true
      ctx.cpu:stop()
    end
  end
end

if args.restore then
  ctx, err = linux.restore(args.restore, { output = opts.output, input = opts.input,
                                           timeout = opts.timeout })
  if ctx then opts.timeout = ctx.opts.timeout end
else
  ctx, err = linux.setup(opts)
end
if not ctx then
  io.stderr:write(me, ": ", err, "\n")
  os.exit(1)
end
if ctx.profile then
  io.stderr:write(me, ": host profile '", ctx.profile.name, "': ", ctx.profile.description, "\n")
end
ctx.log = function(msg) io.stderr:write("\r\n", me, ": ", msg, "\r\n") end

-- --gdb: the stub (kvm.gdb) on every vCPU (gdb's threads); between slices of the run it looks
-- for a client connecting and for Ctrl-C from gdb, and it serves gdb at
-- each "debug" exit (a breakpoint, a watchpoint)
local stub, killed
if args.gdb then
  local ok, why
  ok, stub, why = pcall(require("kvm.gdb").new, ctx.cpus or ctx.cpu, { listen = args.gdb, log = ctx.log })
  if not ok then usage("--gdb: " .. tostring(stub):gsub("^.-%(", "("):gsub("^%((.*)%)$", "%1")) end
  if not stub then
    io.stderr:write(me, ": --gdb ", args.gdb, ": ", why, "\n")
    os.exit(1)
  end
  io.stderr:write(me, ": gdb: target remote ", args.gdb:gsub(":%d+$", ""), ":", stub.port,
                  args.gdb:match(":0$") and " (the port chosen)" or "", "\n")
  if args["gdb-wait"] then
    io.stderr:write(me, ": waiting for gdb, the guest stopped before its first instruction\n")
    assert(stub:accept())
    killed = stub:stopped(nil, 5, true) == "kill"
  end
end

local every = args.status and 5 or nil
local next_status = 5
local e
if killed then
  e = { reason = "killed" }
else
  e = linux.run(ctx, { timeout = opts.timeout, every = stub and stub.slice or every,
    on_tick = function(_, elapsed)
      if stub then
        local p = stub:poll()
        local how = p == "connected" and stub:stopped(nil, 5, true) or p == "interrupt" and stub:stopped(nil, 2)
        if how == "kill" then killed = true ctx.cpu:stop() end
      end
      if every and elapsed >= next_status then
        next_status = next_status + every
        io.stderr:write(string.format("\r\27[2K[%s %4ds] %s\n", me, math.floor(elapsed), console.last:sub(1, 100)))
      end
    end,
    on_exit = function(ex)
      if want_save and ex.reason == "stopped" then
        want_save = false
        local ok, serr = linux.save(ctx, save_at[2])
        ctx.log(ok and ("saved the VM to " .. save_at[2]) or ("--save-at: " .. serr))
        return true
      end
      if not stub or ex.reason ~= "debug" then return false end
      if stub:stopped(ex, 5) ~= "kill" then return true end
      killed = true
      return false
    end })
  if killed then e = { reason = "killed" } end
end

local elapsed = os.time() - start
io.stdout:flush()
local function say(fmt, ...)
  io.stderr:write("\r\n", me, ": ", string.format(fmt, ...), "\n")
end

-- a fatal exit: where the guest was, the bytes it stopped on, what it last said
local function report_fatal()
  local cpu = ctx.cpus[(e.cpu or 0) + 1] or ctx.cpu   -- the vCPU that stopped
  local ok, r = pcall(cpu.regs, cpu)
  if ok and r then
    local code = "?"
    local gpa = cpu:translate(r.rip)
    local okr, bytes = pcall(ctx.vm.read, ctx.vm, gpa or r.rip, 16)
    if gpa and okr then code = bytes:gsub(".", function(c) return string.format("%02x ", c:byte()) end) end
    io.stderr:write(me, string.format(": vCPU %d: RIP 0x%016x RSP 0x%016x RFLAGS 0x%x\n", e.cpu or 0,
                                      r.rip, r.rsp, r.rflags))
    io.stderr:write(me, ": code at RIP: ", code, "\n")
  end
  io.stderr:write(me, ": the console's last lines:\n")
  for _, line in ipairs(console.lines) do io.stderr:write("  | ", line, "\n") end
end

-- the exit status says how the run ended
local status_of = { poweroff = 0, halted = 5, reset = 4, timeout = 124, intr = 130, killed = 137 }
local code = status_of[e.reason]
if stub then stub:close() end
if e.reason == "killed" then
  say("gdb killed the guest after %ds", elapsed)
elseif e.reason == "poweroff" then
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
    io.stderr:write(me, ": the host could not emulate this instruction; see kvm.hostprofile\n")
  end
  report_fatal()
end
ctx.vm:close()
os.exit(code)
