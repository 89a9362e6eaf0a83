#!/usr/bin/env lua5.4
--- memory_layout.lua: the Linux boot of examples/boot_linux.lua with a memory
-- layout of our own, given to kvm.linux's plan for this boot.
--
-- * Guest RAM in two KVM memory slots with a hole between them: 0-96 MiB and
--   128-224 MiB (`ram = {...}`: the plan makes one memory slot per region and
--   builds its e820 map from them, so the kernel is told about the hole).
-- * The zero page (struct boot_params) and the boot page tables moved from
--   their defaults (linux.DEFAULT_LAYOUT: 0x7000, 0x9000) with `layout = {...}`.
--
-- The script prints the slots and the e820 map it built, boots the kernel
-- until it prints "Hypervisor detected" (stopping the vCPU from the console's
-- output function; that is early, ~20-40 s on a software KVM), and checks
-- that the kernel's "BIOS-e820:" lines are exactly the map it was given and
-- that it found its command line through the moved zero page.
--
-- Run: make && make kernel && lua5.4 examples/memory_layout.lua [KERNEL] [--timeout SECONDS]
--   (KERNEL defaults to guest-kernel/vmlinux; the boot gives up after 300 s)
-- Expected output:
--   memory slots:
--     slot 0: 0x000000000-0x005ffffff (96 MiB)
--     slot 1: 0x008000000-0x00dffffff (96 MiB)
--   zero page at 0x90000, page tables at 0x80000, command line at 0x20000
--   e820 map given to the kernel:
--     0x0000000000000000-0x000000000009fbff ram
--     0x000000000009fc00-0x00000000000fffff reserved
--     0x0000000000100000-0x0000000005ffffff ram
--     0x0000000008000000-0x000000000dffffff ram
--     0x00000000feffc000-0x00000000feffffff reserved
--   kernel stopped after 20s (stopped); its e820 lines:
--     BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable
--     BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved
--     BIOS-e820: [mem 0x0000000000100000-0x0000000005ffffff] usable
--     BIOS-e820: [mem 0x0000000008000000-0x000000000dffffff] usable
--     BIOS-e820: [mem 0x00000000feffc000-0x00000000feffffff] reserved
--   e820: the kernel's map matches the layout; command line read through the zero page at 0x90000: yes
--   ok
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local linux = require "kvm.linux"
local cli = require "kvm.cli"

local MiB = 1 << 20
local RAM = { { guest = 0, size = 96 * MiB },               -- slot 0: [0, 96 MiB)
              { guest = 128 * MiB, size = 96 * MiB } }      -- slot 1: [128 MiB, 224 MiB)
local LAYOUT = { zero_page = 0x90000, page_tables = 0x80000 }

local args, bad = cli.parse(arg, { timeout = "number" })
if not args or args.help then
  if bad then io.stderr:write("memory_layout: ", bad, "\n") end
  io.stderr:write("usage: lua5.4 examples/memory_layout.lua [KERNEL] [--timeout SECONDS]\n")
  os.exit(2)
end
local kernel, timeout = args[1] or cli.guest_kernel(root).vmlinux, args.timeout or 300
if not cli.exists(kernel) then
  io.stderr:write("memory_layout: ", kernel, " not found (run `make kernel`, or give a vmlinux)\n")
  os.exit(2)
end

-- the console: keep it, and stop the vCPU once the e820 lines are out
local console = {}
local ctx, err
local MARKER = "Hypervisor detected"
local tail = ""
local function output(bytes)
  console[#console + 1] = bytes
  tail = (tail .. bytes):sub(-256)
  if tail:find(MARKER, 1, true) then ctx.cpu:stop() end
end

-- the plan: plain data (the RAM regions, the e820 map built from them, the
-- placements, the zero page...), then the VM it describes
local plan
plan, err = linux.plan{ kernel = kernel, ram = RAM, layout = LAYOUT, output = output }
if plan then ctx, err = linux.apply(plan) end
if not ctx then
  io.stderr:write("memory_layout: ", err, "\n")
  os.exit(1)
end

print("memory slots:")
for _, m in ipairs(ctx.vm:regions()) do
  print(("  slot %d: 0x%09x-0x%09x (%d MiB)"):format(m.slot, m.guest, m.guest + m.size - 1, m.size >> 20))
end
print(("zero page at 0x%x, page tables at 0x%x, command line at 0x%x"):format(
  ctx.layout.zero_page, ctx.layout.page_tables, ctx.layout.cmdline))
print("e820 map given to the kernel:")
for line in tostring(ctx.e820):gmatch("[^\n]+") do print("  " .. line) end

local t0 = os.time()
local e = linux.run(ctx, { timeout = timeout })
local text = table.concat(console)
print(("kernel stopped after %ds (%s); its e820 lines:"):format(os.time() - t0, e.reason))

-- the kernel's view, compared with ours
local KIND = { [1] = "usable", [2] = "reserved" }
local want = {}
for _, ent in ipairs(ctx.e820:entries()) do
  want[#want + 1] = ("BIOS-e820: [mem 0x%016x-0x%016x] %s"):format(ent.addr, ent.addr + ent.size - 1,
    KIND[ent.type] or tostring(ent.type))
end
local got = {}
for line in text:gmatch("[^\r\n]+") do
  local l = line:match("(BIOS%-e820: %[mem .*)$")
  if l then got[#got + 1] = l; print("  " .. l) end
end
local ok = #got == #want
for i = 1, #want do ok = ok and got[i] == want[i] end
local cmdline_seen = text:find("Command line: " .. ctx.cmdline, 1, true) ~= nil
print(("e820: %s; command line read through the zero page at 0x%x: %s"):format(
  ok and "the kernel's map matches the layout" or "MISMATCH", ctx.layout.zero_page,
  cmdline_seen and "yes" or "NO"))
ctx.vm:close()
if not (ok and cmdline_seen) then os.exit(1) end
print("ok")
