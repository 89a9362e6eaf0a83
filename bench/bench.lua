#!/usr/bin/env lua5.4
--- bench.lua: luakvm against a bare C floor (bench/floor), side by side in
-- the same minute. Each row: median of ROUNDS runs (min..max), and the ratio
-- of medians. Run with `make bench` (builds kvm/core.so and bench/floor).
--
--   1. port-I/O exit: bare C KVM_RUN loop / exits dispatched to a C device by
--      cpu:run() / exits handled by a Lua function. Goals 1.03x and 1.10x.
--   2. VM lifecycle: create (64 KiB, 1 vCPU), run 5 bytes to HLT, destroy.
--   3. start-up: process start to first KVM_RUN of examples/hello.lua.
--   4. kernel load: ELF vmlinux from file to guest memory vs a memcpy.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
local kvm = require "kvm"
local x86 = require "kvm.x86"

local ROUNDS = tonumber(os.getenv("ROUNDS") or "5")
local N = tonumber(os.getenv("EXITS") or "100000")
local LIFE = tonumber(os.getenv("LIFECYCLES") or "300")
local FLOOR = "bench/floor"

local function now()
  -- monotonic enough for runs of a second: os.clock is CPU time, so use the
  -- C core's own clock through a tiny VM-free call
  return kvm.now()
end

local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  local ok = p:close()
  assert(ok, cmd .. " failed: " .. out)
  return out
end

local function stats(t)
  table.sort(t)
  return t[(#t + 1) // 2], t[1], t[#t]
end

local rows = {}
local function row(name, ours, ref, unit, goal)
  local m, lo, hi = stats(ours)
  local rm, rlo, rhi = stats(ref)
  rows[#rows + 1] = { name = name, m = m, lo = lo, hi = hi, rm = rm, rlo = rlo, rhi = rhi,
                      ratio = m / rm, unit = unit, goal = goal }
end

-- the exit guest: mov dx, 0x3ff ; l: out dx, al ; jmp l
local EXIT_GUEST = "\xba\xff\x03\xee\xeb\xfd"

local function exit_vm()
  local vm = assert(kvm.vm())
  local ram = assert(vm:memory{ guest = 0, size = 64 << 10 })
  ram:write(0x1000, EXIT_GUEST)
  local cpu = assert(vm:vcpu(0))
  x86.real_mode(cpu)
  cpu:set_regs{ rip = 0x1000, rflags = 2 }
  return vm, cpu
end

local function per_exit_c_device()
  local vm, cpu = exit_vm()
  vm:serial{ port = 0x3f8, output = function() end }   -- 0x3ff is its scratch register
  cpu:run{ max_exits = 1000 }
  local t0 = now()
  local e = cpu:run{ max_exits = N }
  local t = now() - t0
  assert(e.reason == "max_exits", tostring(e))
  vm:close()
  return t / N * 1e6
end

local garbage = 0
local function per_exit_lua()
  local vm, cpu = exit_vm()
  local count = 0
  vm:on_io(0x3ff, function() count = count + 1 end)
  cpu:run{ max_exits = 1000 }
  collectgarbage("collect")
  collectgarbage("stop")
  local before = collectgarbage("count")
  local t0 = now()
  local e = cpu:run{ max_exits = N }
  local t = now() - t0
  garbage = math.max(garbage, collectgarbage("count") - before)
  collectgarbage("restart")
  assert(e.reason == "max_exits", tostring(e))
  assert(count == N + 1000)
  vm:close()
  return t / N * 1e6
end

local function per_exit_floor()
  local n, secs = sh(FLOOR .. " exits " .. N):match("exits (%d+) ([%d.]+)")
  return tonumber(secs) / tonumber(n) * 1e6
end

local LIFE_GUEST = "\x90\x90\x90\x90\xf4"   -- nop x4 ; hlt
local function lifecycle_lua()
  local t0 = now()
  for _ = 1, LIFE do
    local vm = assert(kvm.vm())
    local ram = assert(vm:memory{ guest = 0, size = 64 << 10 })
    ram:write(0x1000, LIFE_GUEST)
    local cpu = assert(vm:vcpu(0))
    cpu:set_sregs{ cs = { base = 0, selector = 0 }, ds = { base = 0, selector = 0 } }
    cpu:set_regs{ rip = 0x1000, rflags = 2 }
    local e = cpu:run()
    assert(e.reason == "hlt")
    cpu:close(); ram:close(); vm:close()
  end
  return (now() - t0) / LIFE * 1e3
end

local function lifecycle_c()
  local n, secs = sh(FLOOR .. " lifecycle " .. LIFE):match("lifecycle (%d+) ([%d.]+)")
  return tonumber(secs) / tonumber(n) * 1e3
end

local function startup()
  -- time from process start to the first KVM_RUN, as the hello example
  -- reports it itself with LUAKVM_STARTUP=1
  local t0 = now()
  local out = sh("LUAKVM_STARTUP=1 lua5.4 examples/hello.lua")
  local t1 = assert(tonumber(out:match("first KVM_RUN at ([%d.]+)")), out)
  return (t1 - t0) * 1e3
end

local function startup_ref()
  -- the floor for a process: lua5.4 starting and exiting
  local t0 = now()
  sh("lua5.4 -e ''")
  return (now() - t0) * 1e3
end

local VMLINUX = os.getenv("VMLINUX") or "guest-kernel/vmlinux"
local function kernel_load()
  local vm = assert(kvm.vm())
  assert(vm:memory{ guest = 0, size = 128 << 20 })
  local t0 = now()
  local info = assert(vm:load_elf(VMLINUX))
  local t = now() - t0
  vm:close()
  return t * 1e3, info
end
local function kernel_memcpy()
  local _, secs = sh(FLOOR .. " memcpy " .. VMLINUX):match("memcpy (%d+) ([%d.]+)")
  return tonumber(secs) * 1e3
end

local floor_t, cdev_t, lua_t, life_l, life_c, st, st_ref, kl, kc = {}, {}, {}, {}, {}, {}, {}, {}, {}
local have_kernel = io.open(VMLINUX, "rb")
if have_kernel then have_kernel:close() end
for r = 1, ROUNDS do
  io.stderr:write(("round %d/%d\r"):format(r, ROUNDS))
  floor_t[r] = per_exit_floor()
  cdev_t[r] = per_exit_c_device()
  lua_t[r] = per_exit_lua()
  life_c[r] = lifecycle_c()
  life_l[r] = lifecycle_lua()
  st[r] = startup()
  st_ref[r] = startup_ref()
  if have_kernel then kc[r] = kernel_memcpy(); kl[r] = kernel_load() end
end
row("port-I/O exit, C device (us)", cdev_t, floor_t, "us", 1.03)
row("port-I/O exit, Lua handler (us)", lua_t, floor_t, "us", 1.10)
row("VM lifecycle (ms)", life_l, life_c, "ms", 1.2)
row("start-up to first KVM_RUN (ms)", st, st_ref, "ms", nil)
if have_kernel then row("ELF vmlinux load (ms)", kl, kc, "ms", 1.5) end

print(("luakvm bench, %s, %d rounds (median [min..max]); reference = bare C floor, "
  .. "or `lua5.4 -e ''` for start-up"):format(os.date("!%Y-%m-%d %H:%M UTC"), ROUNDS))
print(("%-34s %-26s %-26s %7s %6s"):format("row", "luakvm", "reference", "ratio", "goal"))
for _, r in ipairs(rows) do
  print(("%-34s %8.3f [%7.3f..%7.3f] %8.3f [%7.3f..%7.3f] %6.3fx %6s"):format(
    r.name, r.m, r.lo, r.hi, r.rm, r.rlo, r.rhi, r.ratio, r.goal and (r.goal .. "x") or "-"))
end
print(("Lua garbage across %d Lua-handled exits: %.1f KiB"):format(N, garbage))
