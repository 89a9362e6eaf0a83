#!/usr/bin/env lua5.4
--- bench.lua: luakvm beside a reference, measured in the same run, round by
-- round. Each row: median of the rounds (min..max), the ratio of medians, the
-- goal and whether it is met. Run with `make bench` (builds kvm/core.so and
-- bench/floor, installs QEMU, fetches the kernel); the table also goes to
-- bench/out/latest.txt.
--
--   1. port-I/O exit: bare C KVM_RUN loop / exits dispatched to a C device by
--      cpu:run() / exits handled by a Lua function. Goals 1.03x and 1.10x.
--      1c-1e: machine instructions per exit from KVM_RUN's return to the next,
--      counted by callgrind with KVM_RUN faked (bench/exitcost.lua; needs
--      valgrind, not KVM): C device, Lua handler, unclaimed port. Goals 300
--      and 1500 instructions.
--   2. VM lifecycle: create (64 KiB, 1 vCPU), run 5 bytes to HLT, destroy.
--   3. start-up: process start to first KVM_RUN of examples/hello.lua.
--   4. kernel load: ELF vmlinux from file to guest memory vs a memcpy.
--   5. memory: the VMM's resident memory beyond guest RAM, at "console [ttyS0]
--      enabled" of a 128 MiB Linux boot, vs QEMU's (bench/boot.lua).
--   6. boot: spawn to "console [ttyS0] enabled", to the first kernel
--      message, to "Run /init" and to the shell's prompt, vs QEMU's
--      (bench/boot.lua).
--   7. disk, sequential: dd of the whole 256 MiB virtio-blk disk to
--      /dev/null inside the guest, vs QEMU microvm's virtio-blk (bench/disk.lua).
--   8. disk, random: 4 KiB O_DIRECT reads at queue depth 1 inside the guest,
--      vs QEMU's; luakvm's exits, notifies and interrupts per request and
--      the device's time per request (and the preadv in it).
--   9. snapshots: vm:restore() of a 64 MiB guest that dirtied 4 pages vs a
--      bare C reset (memcpy of the 4 pages, KVM_SET_REGS, KVM_SET_SREGS);
--      execs per second of examples/snapshot_fuzz.lua; a booted Linux saved
--      to a file and restored from it (bench/snaplinux.lua; not on kvm_pvm).
--   1g, 1h: an MMIO exit to a virtio register, and a write KVM handles in
--      the kernel through KVM_IOEVENTFD: what ioeventfd would save per queue
--      notify. 1i: KVM_IRQ_LINE up and down against an eventfd write (irqfd).
--
-- Environment: ROUNDS (rows 1-4 and 9a-9b, default 5), BOOT_ROUNDS (rows 5-6,
-- default 3; 0 skips them), DISK_ROUNDS (rows 7-8, default 3; 0 skips them),
-- DISK_MIB (256), RANDREADS (1000), EXITS, LIFECYCLES, RESETS, FUZZ_EXECS,
-- SAVES (rows 9c-9e, default 3; 0 skips them), VMLINUX, BOOT_TIMEOUT,
-- ONLY=boot (rows 5-6 alone), ONLY=disk (rows 7-8 alone), ONLY=snapshot (row 9 alone).
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
local kvm = require "kvm"
local x86 = require "kvm.x86"

local ONLY = os.getenv("ONLY")
local ROUNDS = (ONLY == nil or ONLY == "snapshot") and tonumber(os.getenv("ROUNDS") or "5") or 0
local MAIN_ROUNDS = ONLY == nil and ROUNDS or 0   -- rows 1-4 (ROUNDS: and 9a-9b)
local BOOT_ROUNDS = (ONLY == nil or ONLY == "boot") and tonumber(os.getenv("BOOT_ROUNDS") or "3") or 0
local DISK_ROUNDS = (ONLY == nil or ONLY == "disk") and tonumber(os.getenv("DISK_ROUNDS") or "3") or 0
local RESETS = tonumber(os.getenv("RESETS") or "2000")
local FUZZ_EXECS = tonumber(os.getenv("FUZZ_EXECS") or "3000")
local N = tonumber(os.getenv("EXITS") or "100000")
local LIFE = tonumber(os.getenv("LIFECYCLES") or "1000")
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

local rows, notes = {}, {}
-- ours, ref: arrays of samples (ref may be empty); goal: text; met(m, ratio)
local function row(name, ours, ref, goal, met)
  if #ours == 0 then return end
  local r = { name = name, goal = goal or "-" }
  r.m, r.lo, r.hi = stats(ours)
  if #ref > 0 then
    r.rm, r.rlo, r.rhi = stats(ref)
    r.ratio = r.m / r.rm
  end
  if met then r.met = met(r.m, r.ratio) and "yes" or "NO" end
  rows[#rows + 1] = r
end

-- the exit guest: mov dx, 0x3ff ; l: out dx, al ; jmp l
local EXIT_GUEST = "\xba\xff\x03\xee\xeb\xfd"

local function exit_vm(code)
  local vm = assert(kvm.vm())
  local ram = assert(vm:memory{ guest = 0, size = 64 << 10 })
  ram:write(0x1000, code or EXIT_GUEST)
  local cpu = assert(vm:vcpu(0))
  x86.real_mode(cpu)
  cpu:set_regs{ rip = 0x1000, rflags = 2 }
  return vm, cpu, ram
end

-- close in the floor's order: vCPU, VM, then memory (closing memory while its
-- VM is open would also delete the slot, a synchronize_srcu the floor skips);
-- nothing is left for the GC, so no VM outlives its row
local function close_all(cpu, vm, ram)
  cpu:close(); vm:close(); ram:close()
end

-- 1000 exits to warm up, then N timed; everything closed: us per exit
local function timed_exits(vm, cpu, ram)
  cpu:run{ max_exits = 1000 }
  local t0 = now()
  local e = cpu:run{ max_exits = N }
  local t = now() - t0
  assert(e.reason == "max_exits", tostring(e))
  close_all(cpu, vm, ram)
  return t / N * 1e6
end

local function per_exit_c_device()
  local vm, cpu, ram = exit_vm()
  vm:serial{ port = 0x3f8, output = function() end }   -- 0x3ff is its scratch register
  return timed_exits(vm, cpu, ram)
end

local garbage = 0
local function per_exit_lua()
  local vm, cpu, ram = exit_vm()
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
  close_all(cpu, vm, ram)
  return t / N * 1e6
end

-- two vCPUs writing the same Lua-handled port at once: each exit is handed
-- from its vCPU's thread to the Lua thread (vm:run) and back; time per exit
-- of either. No irqchip: both vCPUs start runnable, no INIT/SIPI needed.
local function per_exit_lua_2cpus()
  local vm = assert(kvm.vm())
  local ram = assert(vm:memory{ guest = 0, size = 64 << 10 })
  ram:write(0x1000, EXIT_GUEST)
  local cpus = {}
  for i = 1, 2 do
    cpus[i] = assert(vm:vcpu(i - 1))
    x86.real_mode(cpus[i])
    cpus[i]:set_regs{ rip = 0x1000, rflags = 2 }
  end
  local count = 0
  vm:on_io(0x3ff, function() count = count + 1 end)
  vm:run{ max_exits = 1000 }
  local c0 = count
  local t0 = now()
  local e = vm:run{ max_exits = N }
  local t = now() - t0
  assert(e.reason == "max_exits", tostring(e))
  local n = count - c0                         -- the exits that reached the handler
  for i = 1, 2 do cpus[i]:close() end
  vm:close(); ram:close()
  return t / n * 1e6
end

-- the MMIO exit guest: mov ax, 0xd000 ; mov ds, ax ; l: mov [0x64], eax ; jmp l
-- (a 32-bit write to 0xd0064: InterruptACK of a virtio device at 0xd0000)
local MMIO_GUEST = "\xb8\x00\xd0\x8e\xd8\x66\xa3\x64\x00\xeb\xfa"

local function per_exit_mmio_virtio()
  local vm, cpu, ram = exit_vm(MMIO_GUEST)
  vm:virtio_rng{ base = 0xd0000 }
  return timed_exits(vm, cpu, ram)
end

-- `floor exits|mmio|ioeventfd N`: us per exit
local function per_exit_floor(mode)
  mode = mode or "exits"
  local n, secs = sh(FLOOR .. " " .. mode .. " " .. N):match(mode .. " (%d+) ([%d.]+)")
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
    close_all(cpu, vm, ram)
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
  local ram = assert(vm:memory{ guest = 0, size = 128 << 20 })
  local t0 = now()
  local info = assert(vm:load_elf(VMLINUX))
  local t = now() - t0
  vm:close(); ram:close()
  return t * 1e3, info
end
local function kernel_memcpy()
  local _, secs = sh(FLOOR .. " memcpy " .. VMLINUX):match("memcpy (%d+) ([%d.]+)")
  return tonumber(secs) * 1e3
end

-- row 9a: a 64 MiB guest in flat 32-bit protected mode increments a dword in
-- 4 pages and halts (the same bytes as floor.c's reset_code), loaded at 0x1000
local RESET_GUEST = "\xff\x05\x00\x00\x10\x00"   -- inc dword [0x100000]
  .. "\xff\x05\x00\x00\x80\x00"                 -- inc dword [0x800000]
  .. "\xff\x05\x00\x00\x00\x02"                 -- inc dword [0x2000000]
  .. "\xff\x05\x00\xf0\xff\x03"                 -- inc dword [0x3fff000]
  .. "\xf4"                                     -- hlt
local RESET_PAGES = { 0x100000, 0x800000, 0x2000000, 0x3fff000 }

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- snapshot at the first instruction; then RESETS times: run to hlt (each
-- counter must read 1: the run started from the snapshot), vm:restore (timed,
-- and it must have copied the 4 pages)
local function reset_lua()
  local vm = assert(kvm.vm())
  local ram = assert(vm:memory{ guest = 0, size = 64 << 20 })
  ram:write(0x1000, RESET_GUEST)
  local cpu = assert(vm:vcpu(0))
  x86.protected_mode(cpu, vm)
  cpu:set_regs{ rip = 0x1000, rflags = x86.RFLAGS_RESERVED }
  local snap = assert(vm:snapshot())
  -- one run and restore untimed: on kvm_amd the first run also logs the code
  -- page dirty (KVM's first mapping of it), and that restore copies 5 pages
  assert(cpu:run().reason == "hlt")
  assert(vm:restore(snap))
  local t = {}
  for i = 1, RESETS do
    local e = cpu:run()
    assert(e.reason == "hlt", tostring(e))
    for _, pg in ipairs(RESET_PAGES) do
      if ram:u32(pg) ~= 1 then error(("reset: run %d: page 0x%x holds %d, 1 expected"):format(i, pg, ram:u32(pg))) end
    end
    local t0 = now()
    local ok, pages = vm:restore(snap)
    t[i] = now() - t0
    assert(ok, pages)
    assert(pages == #RESET_PAGES, "restore copied " .. tostring(pages) .. " pages")
  end
  close_all(cpu, vm, ram)
  return median(t) * 1e6
end

local function reset_c()
  local med = sh(FLOOR .. " reset " .. RESETS):match("reset %d+ ([%d.]+)")
  return tonumber(med) * 1e6
end

-- row 9b: the fuzzing example, a fixed seed; its own execs/s line
local function fuzz_execs()
  local out = sh("lua5.4 examples/snapshot_fuzz.lua --seed 1 --execs " .. FUZZ_EXECS)
  return assert(tonumber(out:match("\n%d+ execs in [%d.]+ s: (%d+) execs/s")), out)
end

local floor_t, cdev_t, lua_t, life_l, life_c, st, st_ref, kl, kc = {}, {}, {}, {}, {}, {}, {}, {}, {}
local lua2_t, reset_l, reset_f, fuzz = {}, {}, {}, {}
local mmio_t, mmio_floor_t, ioev_t, irqline_t, eventfd_t = {}, {}, {}, {}, {}
local have_kernel = io.open(VMLINUX, "rb")
if have_kernel then have_kernel:close() end
for r = 1, ROUNDS do
  io.stderr:write(("round %d/%d\r"):format(r, ROUNDS))
  reset_f[r] = reset_c()
  reset_l[r] = reset_lua()
  fuzz[r] = fuzz_execs()
  if r > MAIN_ROUNDS then goto next_round end
  floor_t[r] = per_exit_floor()
  cdev_t[r] = per_exit_c_device()
  lua_t[r] = per_exit_lua()
  lua2_t[r] = per_exit_lua_2cpus()
  mmio_floor_t[r] = per_exit_floor("mmio")
  mmio_t[r] = per_exit_mmio_virtio()
  ioev_t[r] = per_exit_floor("ioeventfd")
  irqline_t[r] = per_exit_floor("irqline")
  eventfd_t[r] = per_exit_floor("eventfd")
  life_c[r] = lifecycle_c()
  life_l[r] = lifecycle_lua()
  st[r] = startup()
  st_ref[r] = startup_ref()
  if have_kernel then kc[r] = kernel_memcpy(); kl[r] = kernel_load() end
  ::next_round::
end
if ROUNDS > 0 then io.stderr:write("\r\27[2K") end
local function ratio_le(g) return function(_, ratio) return ratio ~= nil and ratio <= g end end
row("1a port-I/O exit, C device (us)", cdev_t, floor_t, "<=1.03x", ratio_le(1.03))
row("1b port-I/O exit, Lua handler (us)", lua_t, floor_t, "<=1.10x", ratio_le(1.10))
row("1f  the same, 2 vCPUs, vs 1b (us)", lua2_t, lua_t)
row("1g MMIO exit, virtio register (us)", mmio_t, mmio_floor_t)
row("1h  MMIO write, KVM_IOEVENTFD, vs 1g (us)", ioev_t, mmio_floor_t)
row("1i IRQ_LINE up+down vs eventfd write (us)", irqline_t, eventfd_t)
if MAIN_ROUNDS > 0 then
  notes[#notes + 1] = "row 1g: a 32-bit write to a virtio device's InterruptACK, cpu:run{max_exits = N}, against "
    .. "`floor mmio` (the same write, bare KVM_RUN); row 1h: `floor ioeventfd`, the same write with a "
    .. "KVM_IOEVENTFD on the address (KVM signals an eventfd without leaving the kernel), against `floor mmio`; "
    .. "row 1i: `floor irqline`, KVM_IRQ_LINE high then low on GSI 16 (a virtio interrupt now), against "
    .. "`floor eventfd`, one eventfd write (what would signal a KVM_IRQFD)"
end
if MAIN_ROUNDS > 0 then
  notes[#notes + 1] = "row 1f: two vCPUs write one Lua-handled port at once (vm:run): each exit goes "
    .. "from its vCPU's thread to the Lua thread and back; time per exit of either vCPU, against 1b's one vCPU "
    .. "running on the Lua thread itself"
end

-- rows 1c-1e: instructions per exit, callgrind over bench/exitcost (no KVM),
-- two runs each (the counts are deterministic: min..max shows they agree)
if MAIN_ROUNDS > 0 then
  local exitcost = dofile "bench/exitcost.lua"
  local ok, why = exitcost.available()
  if not ok then notes[#notes + 1] = "rows 1c-1e: not measured: " .. why end
  for _, s in ipairs(ok and exitcost.SCENARIOS or {}) do
    io.stderr:write("\r\27[2Kcallgrind: ", s.key)
    local a, top = exitcost.per_exit(s.key, 4)
    local b = exitcost.per_exit(s.key)
    row(s.name, { a, b }, {}, s.goal and ("<=" .. s.goal) or nil,
      s.goal and function(m) return m <= s.goal end)
    notes[#notes + 1] = ("%s, per exit: %s"):format(s.name:match("^%S+"), exitcost.top_text(top))
  end
  if ok then
    io.stderr:write("\r\27[2K")
    notes[#notes + 1] = ("rows 1c-1e: instructions from KVM_RUN's return to the next, callgrind over "
      .. "bench/exitcost (KVM_RUN faked), (I(%d) - I(%d)) / %d exits, two runs"):format(exitcost.N2, exitcost.N1,
      exitcost.N2 - exitcost.N1)
  end
end
row("2  VM lifecycle (ms)", life_l, life_c, "<=1.2x", ratio_le(1.2))
row("3  start-up to first KVM_RUN (ms)", st, st_ref, "<=10 ms", function(m) return m <= 10 end)
if have_kernel then row("4  ELF vmlinux load (ms)", kl, kc, "<=1.5x", ratio_le(1.5)) end
if MAIN_ROUNDS > 0 then
  notes[#notes + 1] = ("rows 1-4: %d rounds; references: bare C (bench/floor), `lua5.4 -e ''` for row 3, "
    .. "a memcpy of the file for row 4; Lua garbage across %d Lua-handled exits: %.1f KiB"):format(ROUNDS, N, garbage)
end

-- rows 5 and 6: Linux boots, ours and QEMU's (bench/boot.lua)
if BOOT_ROUNDS > 0 and have_kernel then
  local boot = dofile "bench/boot.lua"
  local res = boot.measure(BOOT_ROUNDS, function(msg) io.stderr:write("\r\27[2K", msg) end)
  io.stderr:write("\r\27[2K")
  local samples, cmdline = {}, res.cmdline
  for _, who in ipairs{ "ours", "qemu" } do
    local s = { own = {}, anon = {}, console = {}, first = {}, init = {}, shell = {} }
    for r, b in ipairs(res[who]) do
      if b.console then
        s.console[#s.console + 1] = b.console
        if b.mem and b.mem.guest then
          s.own[#s.own + 1] = (b.mem.rss - b.mem.guest) / 1024
          s.anon[#s.anon + 1] = (b.mem.anon - b.mem.guest) / 1024
        else
          notes[#notes + 1] = ("%s round %d: no %d MiB guest mapping found in smaps"):format(who, r, boot.MEMORY_MIB)
        end
      else
        notes[#notes + 1] = ("%s round %d: STOPPED before the milestone (%s); last line: %s")
          :format(who, r, b.stopped or "?", b.last:sub(1, 80))
      end
      if b.first then s.first[#s.first + 1] = b.first end
      if b.init then s.init[#s.init + 1] = b.init end
      if b.shell then s.shell[#s.shell + 1] = b.shell end
      if b.cmdline ~= cmdline then
        notes[#notes + 1] = ("%s round %d: the kernel's command line differs from the expected one: %s")
          :format(who, r, tostring(b.cmdline))
      end
    end
    samples[who] = s
  end
  local o, q = samples.ours, samples.qemu
  row("5a VMM RSS beyond guest RAM (MiB)", o.own, q.own, "<=5 MiB", function(m) return m <= 5 end)
  row("5b  of which anonymous (MiB)", o.anon, q.anon)
  row("6a boot to console enabled (s)", o.console, q.console, "<=1.0x", ratio_le(1.0))
  row("6b spawn to first kernel msg (s)", o.first, q.first)
  row("6c spawn to Run /init (s)", o.init, q.init, "<=1.0x", ratio_le(1.0))
  row("6d spawn to shell prompt (s)", o.shell, q.shell, "<=1.0x", ratio_le(1.0))
  notes[#notes + 1] = ("rows 5-6: %d boots each, interleaved; reference: QEMU (%s), -M microvm -accel kvm, "
    .. "same vmlinux, initramfs, command line and %d MiB; milestones \"%s\", \"%s\", the prompt \"%s\"")
    :format(BOOT_ROUNDS,
    (sh("qemu-system-x86_64 --version"):match("version ([%w.+~:-]+)") or "?"), boot.MEMORY_MIB, boot.MILESTONE,
    boot.INIT, boot.PROMPT)
  for who, s in pairs(samples) do
    if #s.console < BOOT_ROUNDS then
      notes[#notes + 1] = ("%s reached the milestone in %d of %d boots"):format(who, #s.console, BOOT_ROUNDS)
    end
  end
end

-- rows 7 and 8: reading a virtio-blk disk in the guest, ours and QEMU's (bench/disk.lua)
if DISK_ROUNDS > 0 and have_kernel then
  local disk = dofile "bench/disk.lua"
  local res = disk.measure(DISK_ROUNDS, function(msg) io.stderr:write("\r\27[2K", msg) end)
  io.stderr:write("\r\27[2K")
  local seq, rand = { ours = {}, qemu = {} }, { ours = {}, qemu = {} }
  -- luakvm's counters per guest request, phase by phase: the differences of
  -- its counters (host) over the differences of the guest's completed reads
  local per = { seq = {}, rand = {} }
  local function add(t, k, v) t[k] = t[k] or {}; t[k][#t[k] + 1] = v end
  for _, who in ipairs{ "ours", "qemu" } do
    for r, b in ipairs(res[who]) do
      if b.seq then seq[who][#seq[who] + 1] = b.seq end
      if b.rand then rand[who][#rand[who] + 1] = b.rand / disk.RANDREADS * 1e6 end
      if not b.done then
        notes[#notes + 1] = ("disk %s round %d: STOPPED before the end (%s); last line: %s")
          :format(who, r, b.stopped or "?", b.last:sub(1, 80))
      end
      for phase, from in pairs{ seq = "start", rand = "seq" } do
        local g1, g0, h1, h0 = b.guest[phase], b.guest[from], b.host[phase], b.host[from]
        if who == "ours" and g1 and g0 and h1 and h0 and g1[1] > g0[1] then
          local reqs = g1[1] - g0[1]                       -- reads the guest completed
          local chains = h1.virtio_chains - h0.virtio_chains
          local pp = per[phase]
          add(pp, "reqs", reqs)
          add(pp, "exits", (h1.exits - h0.exits) / reqs)
          add(pp, "mmio", ((h1.exit_mmio or 0) - (h0.exit_mmio or 0)) / reqs)
          for k, v in pairs(h1) do
            local reason = k:match("^exit_(.*)")
            if reason then add(pp, "by_" .. reason, (v - (h0[k] or 0)) / reqs) end
          end
          add(pp, "notifies", (h1.virtio_notifies - h0.virtio_notifies) / reqs)
          add(pp, "irqs", (h1.virtio_irqs - h0.virtio_irqs) / reqs)
          add(pp, "kib", (h1.blk_read_bytes - h0.blk_read_bytes) / chains / 1024)
          add(pp, "dev_us", (h1.blk_request_ns - h0.blk_request_ns) / chains / 1e3)
          add(pp, "io_us", (h1.blk_io_ns - h0.blk_io_ns) / chains / 1e3)
        end
      end
    end
  end
  row(("7  dd %d MiB from vda (s)"):format(disk.MIB), seq.ours, seq.qemu)
  row("8  4 KiB random read, QD1 (us)", rand.ours, rand.qemu)
  local p = per.rand
  if p.exits then
    row("8b  exits per request", p.exits, {})
    row("8c   of which MMIO", p.mmio, {})
    row("8d  device time per request (us)", p.dev_us, {})
    row("8e   of which preadv (us)", p.io_us, {})
  end
  local function med(t) return t and (stats(t)) or 0 / 0 end
  local function by_reason(pp)
    local t = {}
    for k, v in pairs(pp) do
      local reason = k:match("^by_(.*)")
      if reason and med(v) >= 0.005 then t[#t + 1] = ("%s %.2f"):format(reason, med(v)) end
    end
    table.sort(t)
    return table.concat(t, ", ")
  end
  local s = per.seq
  if s.exits then
    notes[#notes + 1] = ("row 7, per request (luakvm, medians): %.0f requests of %.0f KiB, %.2f exits "
      .. "(%.2f MMIO), %.2f notifies, %.2f interrupts; device time %.1f us, of which preadv %.1f us; "
      .. "%.1f MiB/s ours, %.1f MiB/s QEMU")
      :format(med(s.reqs), med(s.kib), med(s.exits), med(s.mmio), med(s.notifies), med(s.irqs), med(s.dev_us),
        med(s.io_us), disk.MIB / med(seq.ours), disk.MIB / med(seq.qemu))
    notes[#notes + 1] = "row 7, exits per request by reason: " .. by_reason(s)
  end
  if p.exits then
    notes[#notes + 1] = ("row 8, per request (luakvm, medians): %.0f requests, %.2f notifies, %.2f interrupts; "
      .. "exits by reason: %s"):format(med(p.reqs), med(p.notifies), med(p.irqs), by_reason(p))
  end
  notes[#notes + 1] = ("rows 7-8: %d boots each, interleaved; reference: QEMU, -M microvm -accel kvm, "
    .. "virtio-blk-device, readonly=on, default cache (the host's page cache, as ours); %d MiB read-only "
    .. "image of random bytes, %d random reads, %d MiB guest; timed on the host from the console line before "
    .. "to the one after")
    :format(DISK_ROUNDS, disk.MIB, disk.RANDREADS, disk.MEMORY_MIB)
end

-- row 9: snapshots
row("9a snapshot reset, 4 pages (us)", reset_l, reset_f, "<=4x", ratio_le(4))
row("9b snapshot_fuzz.lua (execs/s)", fuzz, {}, ">=1000/s", function(m) return m >= 1000 end)
if ROUNDS > 0 then
  notes[#notes + 1] = ("row 9a: per reset, the median of %d in a round (and of the rounds): vm:restore(snap) of a "
    .. "64 MiB VM whose guest dirtied 4 pages, against `floor reset` (memcpy of the 4 pages, KVM_SET_REGS, "
    .. "KVM_SET_SREGS); row 9b: `examples/snapshot_fuzz.lua --seed 1 --execs %d`"):format(RESETS, FUZZ_EXECS)
end
-- rows 9c-9e: a booted Linux saved to a file and restored (bench/snaplinux.lua);
-- the boot reaches user mode, which kvm_pvm cannot run
local SAVES = tonumber(os.getenv("SAVES") or "3")
if SAVES > 0 and (ONLY == nil or ONLY == "snapshot") and have_kernel then
  if kvm.host_info().module == "kvm_pvm" then
    notes[#notes + 1] = "rows 9c-9e: not measured: kvm_pvm cannot run the guest's user mode (`make bench` runs nested)"
  else
    local snaplinux = dofile "bench/snaplinux.lua"
    local ok, res = pcall(snaplinux.measure, SAVES, function(msg) io.stderr:write("\r\27[2K", msg) end)
    io.stderr:write("\r\27[2K")
    if ok then
      row("9c save booted Linux (ms)", res.save, {})
      row("9d restore booted Linux (ms)", res.restore, res.memcpy)
      row("9e  its file, vs guest RAM (MiB)", { res.size / 2^20 }, { snaplinux.MEMORY / 2^20 })
      notes[#notes + 1] = ("rows 9c-9e: Linux booted to its shell in %.1f s (%d MiB, one vCPU), then linux.save to "
        .. "a file %d times (vm:snapshot + snap:save: written, fsync'd, renamed), then linux.restore of it %d times "
        .. "(file read and checked, machine built, vm:restore), each restored shell answering a typed command")
        :format(res.boot, snaplinux.MEMORY >> 20, SAVES, SAVES)
      notes[#notes + 1] = ("rows 9c-9d: of which vm:snapshot() %.1f ms, kvm.load_snapshot(file) %.1f ms (medians, "
        .. "each timed alone before a save and a restore)"):format(median(res.snapshot), median(res.load))
    else
      notes[#notes + 1] = "rows 9c-9e: FAILED: " .. tostring(res)
    end
  end
end

local function first_line(cmd) return (sh(cmd .. " 2>/dev/null || true"):match("[^\n]*")) end
local cpu = first_line("grep -m1 '^model name' /proc/cpuinfo"):match(":%s*(.*)") or "?"
-- which KVM measured: the host's, or kvm_amd nested under QEMU TCG (tools/nested.sh)
local hi = kvm.host_info()
local which = ({ kvm_pvm = "kvm_pvm (software KVM)", kvm_amd = "kvm_amd", kvm_intel = "kvm_intel" })[hi.module]
  or tostring(hi.module)
if os.getenv("LUAKVM_NESTED") == "1" then
  which = "nested " .. which .. " under QEMU TCG (no usable /dev/kvm on the host)"
elseif hi.hypervisor then
  which = which .. " (this host itself runs under " .. hi.hypervisor .. ")"
end
local out = {}
local function say(fmt, ...) out[#out + 1] = (fmt:format(...):gsub("%s+$", "")) end
say("luakvm bench, %s; Linux %s, %s, %s CPUs%s", os.date("!%Y-%m-%d %H:%M UTC"), first_line("uname -r"),
  cpu, first_line("nproc"), ", " .. which)
say("%-38s %-27s %-27s %7s %8s %4s", "row: median [min..max]", "luakvm", "reference", "ratio", "goal", "met")
for _, r in ipairs(rows) do
  local ref = r.rm and ("%8.3f [%7.3f..%7.3f]"):format(r.rm, r.rlo, r.rhi) or "-"
  say("%-38s %8.3f [%7.3f..%7.3f] %-27s %7s %8s %4s", r.name, r.m, r.lo, r.hi, ref,
    r.ratio and ("%.3fx"):format(r.ratio) or "-", r.goal, r.met or "")
end
for _, n in ipairs(notes) do say("  %s", n) end
local text = table.concat(out, "\n") .. "\n"
io.write(text)
os.execute("mkdir -p bench/out")
local f = assert(io.open("bench/out/latest.txt", "w"))
f:write(text)
f:close()
