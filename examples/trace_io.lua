#!/usr/bin/env lua5.4
--- trace_io.lua: boot a kernel and watch which I/O ports it touches.
--
-- Every few seconds a table goes to stderr, and a final one to stdout: each
-- port the guest used (vm:stats().ports counts every port-I/O element that
-- reached user space; the in-kernel PIC and PIT never do), how often, which
-- device claimed it (vm:claims(): the C UART, the legacy ports, or nobody),
-- and the VM exits by reason. The kernel's console is not shown (only its
-- last line) unless --console is given.
--
-- Usage: lua5.4 examples/trace_io.lua [KERNEL] [--initrd FILE] [--seconds N]
--          [--every N] [--console]
--   KERNEL defaults to guest-kernel/vmlinux and the initrd to
--   guest-kernel/initramfs.cpio.gz when it exists (`make kernel`);
--   --seconds: stop after N seconds (default 60); --every: report period (5).
--
-- Expected output (final table, --seconds 60 on a software KVM, where the
-- first minute is the early console; later the i8042, CMOS, port 0x61 and
-- PCI probes show up; counts vary from run to run):
--   trace_io: 60 s, 9377 port accesses on 8 ports, 0 unclaimed; exits: io 9377
--     console: [   39.128719] ftrace: allocating 37697 entries in 148 pages
--     port     accesses  claimed by what
--     0x03f8       4684  serial     COM1 data
--     0x03fd       4683  serial     COM1 LSR
--     0x03fb          4  serial     COM1 LCR
--     0x03f9          2  serial     COM1 IER
--     0x03fa          1  serial     COM1 IIR/FCR
--     0x03fc          1  serial     COM1 MCR
--     0x0cf8          1  legacy     PCI config address
--     0x0cfc          1  legacy     PCI config data
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local kvm = require "kvm"
local linux = require "kvm.linux"
local cli = require "kvm.cli"

local fmt = string.format

local function usage(msg)
  if msg then io.stderr:write("trace_io: ", msg, "\n") end
  io.stderr:write("usage: lua5.4 examples/trace_io.lua [KERNEL] [--initrd FILE] [--seconds N]",
                  " [--every N] [--console]\n")
  os.exit(2)
end

-- options
local opts, bad = cli.parse(arg, { initrd = "string", seconds = "number", every = "number", console = "flag" })
if not opts or opts.help then usage(bad) end
local files = cli.guest_kernel(root)
local kernel = opts[1] or files.vmlinux
if not opts.initrd and cli.exists(files.initrd) then opts.initrd = files.initrd end
opts.seconds, opts.every = opts.seconds or 60, opts.every or 5
if not cli.exists(kernel) then usage(kernel .. " not found (run `make kernel`)") end
if not (opts.seconds > 0 and opts.every > 0) then usage("--seconds and --every must be positive") end

-- what the usual PC ports are
local UART_REGS = { [0] = "data", "IER", "IIR/FCR", "LCR", "MCR", "LSR", "MSR", "scratch" }
local function port_name(p)
  for base, name in pairs{ [0x3f8] = "COM1", [0x2f8] = "COM2", [0x3e8] = "COM3", [0x2e8] = "COM4" } do
    if p >= base and p < base + 8 then return name .. " " .. UART_REGS[p - base] end
  end
  local names = {
    [0x20] = "PIC master", [0x21] = "PIC master", [0xa0] = "PIC slave", [0xa1] = "PIC slave",
    [0x40] = "PIT ch0", [0x41] = "PIT ch1", [0x42] = "PIT ch2", [0x43] = "PIT mode",
    [0x60] = "i8042 data", [0x64] = "i8042 cmd/status", [0x61] = "port B (speaker, PIT gate)",
    [0x70] = "CMOS index", [0x71] = "CMOS data", [0x80] = "POST code", [0x87] = "DMA page",
    [0xcf8] = "PCI config address", [0xcf9] = "reset control", [0x4d0] = "ELCR", [0x4d1] = "ELCR",
    [0x510] = "fw_cfg", [0x1ce] = "Bochs VBE",
  }
  if names[p] then return names[p] end
  if p >= 0xcfc and p <= 0xcff then return "PCI config data" end
  if p >= 0x3c0 and p <= 0x3df then return "VGA" end
  return ""
end

-- the console: shown with --console, else only its last line is kept
local console = cli.console{ echo = opts.console and io.stdout or nil, keep = 1 }

local ctx, err = linux.setup{ kernel = kernel, initrd = opts.initrd, output = console.output }
if not ctx then
  io.stderr:write("trace_io: ", err, "\n")
  os.exit(1)
end
local vm = ctx.vm

--- Who claimed `port`: "serial", "legacy", "lua", "debug_exit" or "-".
local function owner(claims, port)
  for _, c in ipairs(claims) do
    if not c.mmio and port >= c.first and port <= c.last then return c.kind end
  end
  return "-"
end

--- The table, as one string: the top `limit` ports by count (all when nil).
local function report(elapsed, limit)
  local stats, claims = vm:stats(), vm:claims()
  local ports, total = {}, 0
  for p, n in pairs(stats.ports) do
    ports[#ports + 1] = { port = p, n = n }
    total = total + n
  end
  table.sort(ports, function(a, b) return a.n > b.n or (a.n == b.n and a.port < b.port) end)
  local exits = {}
  for reason, n in pairs(stats.exits) do exits[#exits + 1] = { reason = reason, n = n } end
  table.sort(exits, function(a, b) return a.n > b.n end)
  local ex = {}
  for k, x in ipairs(exits) do ex[k] = fmt("%s %d", x.reason, x.n) end
  local out = {
    fmt("trace_io: %.0f s, %d port accesses on %d ports, %d unclaimed; exits: %s", elapsed, total, #ports,
      stats.unclaimed_io, table.concat(ex, ", ")),
    fmt("  console: %s", console.last:sub(1, 100)),
    fmt("  %-6s %10s  %-10s %s", "port", "accesses", "claimed by", "what"),
  }
  for k, x in ipairs(ports) do
    if limit and k > limit then
      out[#out + 1] = fmt("  ... %d more", #ports - limit)
      break
    end
    out[#out + 1] = fmt("  0x%04x %10d  %-10s %s", x.port, x.n, owner(claims, x.port), port_name(x.port))
  end
  return table.concat(out, "\n") .. "\n"
end

-- run, stopping every `every` seconds for a report
local start = kvm.now()
local e = linux.run(ctx, { timeout = opts.seconds, every = opts.every,
  on_tick = function(_, elapsed) io.stderr:write(report(elapsed, 12)) end })

local elapsed = kvm.now() - start
if e.reason ~= "timeout" then print(fmt("trace_io: the VM stopped: %s", tostring(e))) end
io.stdout:write(report(elapsed))
vm:close()
