-- Several vCPUs: vm:run runs each on a thread of its own; Lua handlers run
-- on the Lua thread, one at a time; every way a run ends stops every vCPU.
-- The guest is spec/guest/smp.S: the BSP wakes the APs with INIT and
-- start-up IPIs through its in-kernel local APIC, every CPU reports its APIC
-- id on port 0x10 (after writing it `hammer` times to port 0x12), the APs
-- count themselves at 0x3000, and the BSP writes port 0x11 once all did.
local support = require "support"
local kvm = require "kvm"
local x86 = require "kvm.x86"

-- a VM of n vCPUs with the smp guest (support.smp_guest: `wait`, `hammer`)
local smp_vm = support.smp_guest

-- a VM whose vCPU 0 runs `code` in real mode at 0x1000 and whose vCPU 1 is
-- never started (it waits for a start-up IPI nobody sends)
local function bsp_and_idle_ap(code)
  local vm = assert(kvm.vm())
  vm:memory{ guest = 0, size = support.RAM }
  assert(vm:irqchip())
  local c0 = assert(vm:vcpu(0))
  assert(vm:vcpu(1))
  x86.real_mode(c0)
  vm:write(0x1000, code)
  c0:set_regs{ rip = 0x1000, rflags = 2 }
  return vm
end

local function sorted(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c
end

local function count_lines(cmd)
  local p = assert(io.popen(cmd))
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

describe("#guest vm:run with several vCPUs", function()
  before_each(support.need_kvm)

  for _, n in ipairs{ 2, 4 } do
    it(("wakes %d CPUs with INIT/SIPI; each reports the APIC id its CPUID gives it"):format(n), function()
      local vm, cpus = smp_vm(n)
      local seen = {}
      vm:on_io(0x10, function(_, _, _, v) seen[#seen + 1] = v end)
      vm:on_io(0x11, function() return kvm.STOP end)
      local e = assert(vm:run{ timeout = 30 })
      assert.equal("stopped", e.reason)
      assert.equal(0, e.cpu)                       -- the BSP's write to 0x11 ended it
      assert.equal(0x11, e.port)
      local want = {}
      for i = 0, n - 1 do want[#want + 1] = i end
      assert.same(want, sorted(seen))
      for _, c in ipairs(cpus) do assert.is_true(c:stats().exits > 0) end
      vm:close()
    end)
  end

  it("a VM with one vCPU runs it on this thread, as cpu:run does", function()
    local vm = smp_vm(1)
    vm:on_io(0x10, function() end)
    vm:on_io(0x11, function() return kvm.STOP end)
    local e = assert(vm:run{ timeout = 10 })
    assert.equal("stopped", e.reason)
    assert.equal(0, e.cpu)
  end)

  it("Lua handlers called from 4 vCPUs at once run one at a time and see every call", function()
    local per = 3000
    local vm = smp_vm(4, { hammer = per })
    local counts, busy, overlaps = {}, false, 0
    vm:on_io(0x12, function(_, _, _, v)
      if busy then overlaps = overlaps + 1 end
      busy = true
      counts[v] = (counts[v] or 0) + 1
      busy = false
    end)
    vm:on_io(0x10, function() end)
    vm:on_io(0x11, function() return kvm.STOP end)
    local e = assert(vm:run{ timeout = 60 })
    assert.equal("stopped", e.reason)
    assert.equal(0, overlaps)
    assert.same({ [0] = per, [1] = per, [2] = per, [3] = per }, counts)
    assert.is_true(vm:stats().exits.io >= 4 * per)
  end)

  it("a C device two vCPUs write to at once (the debug console) loses and mixes no byte", function()
    local per = 2000
    local vm = smp_vm(2, { hammer = per })
    local got = {}
    vm:debugcon{ port = 0x12, output = function(s) got[#got + 1] = s end }
    vm:on_io(0x10, function() end)
    vm:on_io(0x11, function() return kvm.STOP end)
    assert.equal("stopped", assert(vm:run{ timeout = 60 }).reason)
    -- out %eax: four bytes per write, each write's together
    local all = table.concat(got)
    assert.equal(2 * per * 4, #all)
    local n = {}
    for i = 1, #all, 4 do
      local w = all:sub(i, i + 3)
      n[w] = (n[w] or 0) + 1
    end
    assert.same({ ["\0\0\0\0"] = per, ["\1\0\0\0"] = per }, n)
  end)

  it("an exit nobody serves ends the run on the vCPU that made it, and names it", function()
    for _ = 1, 3 do
      local vm = smp_vm(4, { hammer = 1 })   -- port 0x12 unclaimed
      vm:on_io(0x10, function() end)
      local e = assert(vm:run{ timeout = 30 })
      assert.equal("io", e.reason)
      assert.equal(0x12, e.port)
      assert.equal(e.cpu, e.value)            -- each CPU writes its APIC id = its vCPU id
      vm:close()
    end
  end)

  it("the timeout stops every vCPU, spinning or waiting for a start-up IPI", function()
    local vm = smp_vm(3, { wait = 99 })       -- the BSP spins for APs that never come
    vm:on_io(0x10, function() end)
    local t0 = kvm.now()
    local e = assert(vm:run{ timeout = 0.5 })
    assert.equal("timeout", e.reason)
    assert.equal(0, e.cpu)
    assert.is_true(kvm.now() - t0 < 5)
    -- and it goes on where it stopped
    e = assert(vm:run{ timeout = 0.3 })
    assert.equal("timeout", e.reason)
  end)

  it("a vCPU that was never started does not keep the run from ending (timeout)", function()
    local vm = bsp_and_idle_ap("\xeb\xfe")     -- jmp $
    assert.equal("timeout", assert(vm:run{ timeout = 0.3 }).reason)
  end)

  it("the BSP halted for good and an AP never started: reason 'halted'", function()
    local vm = bsp_and_idle_ap("\xfa\xf4\xeb\xfc") -- cli; hlt; jmp back
    assert.equal("halted", assert(vm:run{ timeout = 30 }).reason)
  end)

  it("cpu:stop() from a handler stops another vCPU, spinning on its thread, at once", function()
    local vm, cpus = smp_vm(2, { wait = 99 })   -- the BSP spins without exits
    vm:on_io(0x10, function(_, _, _, v) if v == 1 then cpus[1]:stop() end end)
    local t0 = kvm.now()
    local e = assert(vm:run{ timeout = 20 })
    assert.equal("stopped", e.reason)
    assert.equal(0, e.cpu)
    assert.is_true(kvm.now() - t0 < 5)
  end)

  it("every vCPU halted for good with interrupts off: reason 'halted'", function()
    local vm = smp_vm(2)
    vm:on_io(0x10, function() end)
    vm:on_io(0x11, function() end)            -- the BSP then halts with cli
    local e = assert(vm:run{ timeout = 30 })
    assert.equal("halted", e.reason)
  end)

  it("max_exits counts the exits of every vCPU", function()
    local vm = smp_vm(4, { hammer = 1000000 })
    local calls = 0
    vm:on_io(0x12, function() calls = calls + 1 end)
    vm:on_io(0x10, function() end)
    local e = assert(vm:run{ max_exits = 2000, timeout = 60 })
    assert.equal("max_exits", e.reason, e.reason .. " on vCPU " .. tostring(e.cpu) .. " port " .. tostring(e.port) .. " calls " .. calls)
    assert.is_true(calls <= 2000 + 4, calls)
  end)

  it("kvm.POWEROFF from a handler serving an AP: reason 'poweroff', that AP named", function()
    local vm = smp_vm(4)
    vm:on_io(0x10, function(_, _, _, v) if v == 2 then return kvm.POWEROFF end end)
    vm:on_io(0x11, function() end)
    local e = assert(vm:run{ timeout = 30 })
    assert.equal("poweroff", e.reason)
    assert.equal(2, e.cpu)
  end)

  it("^C stops every vCPU: reason 'intr'", function()
    local vm = smp_vm(2, { wait = 99 })
    vm:on_io(0x10, function() end)
    os.execute(("(sleep 0.5; kill -INT %d) &"):format(support.pid()))
    local e = assert(vm:run{ timeout = 20 })
    assert.equal("intr", e.reason)
  end)

  it("a handler's error stops every vCPU and is raised with its traceback; the VM runs on", function()
    local vm, _, ram = smp_vm(4)
    vm:on_io(0x10, function(_, _, _, v) if v == 3 then error("boom from AP 3") end end)
    vm:on_io(0x11, function() return kvm.STOP end)
    local ok, err = pcall(vm.run, vm, { timeout = 30 })
    assert.is_false(ok)
    assert.matches("boom from AP 3", err)
    assert.matches("traceback", err)
    -- every thread is gone: the VM runs again, its APs go on from where they were
    vm:on_io(0x10, function() end)
    local e = assert(vm:run{ timeout = 30 })
    assert.equal("stopped", e.reason)
    assert.equal(3, string.unpack("<I4", ram:read(0x3000, 4)))
  end)

  it("a handler may read the vCPU it serves, not one running on its thread", function()
    local vm, cpus = smp_vm(2, { wait = 99 })
    local mine, other
    vm:on_io(0x10, function(_, _, _, v)
      if v == 1 then
        mine = cpus[2]:regs()
        other = select(2, pcall(cpus[1].regs, cpus[1]))
        return kvm.STOP
      end
    end)
    local e = assert(vm:run{ timeout = 30 })
    assert.equal("stopped", e.reason)
    assert.equal(1, e.cpu)
    assert.is_table(mine)
    assert.matches("vCPU 0 is running on its thread", other)
    assert.is_table(cpus[1]:regs())            -- after the run, of course
  end)

  it("from a handler: no run, close, or device change while the threads run", function()
    local vm, cpus = smp_vm(2, { wait = 99 })
    local errs = {}
    vm:on_io(0x10, function(_, _, _, v)
      if v ~= 1 then return end
      errs.run = select(2, pcall(vm.run, vm))
      errs.cpurun = select(2, pcall(cpus[2].run, cpus[2]))
      errs.close = select(2, pcall(vm.close, vm))
      errs.on_io = select(2, pcall(vm.on_io, vm, 0x50, function() end))
      errs.remove = select(2, pcall(vm.on_io, vm, 0x10, nil))
      return kvm.STOP
    end)
    assert.equal("stopped", assert(vm:run{ timeout = 30 }).reason)
    assert.matches("already running", errs.run)
    assert.matches("re%-entry", errs.cpurun)
    assert.matches("cannot close", errs.close)
    assert.matches("cannot add a device while vm:run", errs.on_io)
    assert.matches("cannot remove a device while vm:run", errs.remove)
    vm:on_io(0x50, function() end)             -- after the run it can
  end)

  it("a device's Lua method (a virtio device's info, read) works from a handler while the threads run", function()
    local vm = smp_vm(2, { wait = 99 })
    local rng = assert(vm:virtio_rng{})
    local info, magic
    vm:on_io(0x10, function(_, _, _, v)
      if v == 1 then
        info = rng:info()
        magic = rng:read(0, 4)
        return kvm.STOP
      end
    end)
    assert.equal("stopped", assert(vm:run{ timeout = 30 }).reason)
    assert.equal("virtio-rng", info.kind)
    assert.equal(0x74726976, magic)                -- "virt"
  end)

  it("bad arguments", function()
    local vm, cpus = smp_vm(2)
    local other = assert(kvm.vm())
    local oc = assert(other:vcpu(0))
    assert.matches("another VM", support.merr(vm, "run", { cpus = { cpus[1], oc } }))
    assert.matches("listed twice", support.merr(vm, "run", { cpus = { cpus[1], cpus[1] } }))
    assert.matches("no vCPU", support.merr(other:close() or assert(kvm.vm()), "run"))
    assert.matches("max_exits", support.merr(vm, "run", { max_exits = -1 }))
  end)

  it("runs only the vCPUs listed in cpus", function()
    local vm, cpus = smp_vm(2)
    vm:on_io(0x10, function() end)
    -- the BSP alone: its INIT/SIPI reach vCPU 1, which does not run; it spins
    local e = assert(vm:run{ cpus = { cpus[1] }, timeout = 0.3 })
    assert.equal("timeout", e.reason)
  end)

  it("100 create/run/close cycles of a 4-vCPU VM leave no fd, thread or vCPU behind", function()
    local pid = support.pid()
    -- KVM's fds: the VMs' and the vCPUs' (anon_inode:kvm-vm, kvm-vcpu:N)
    local function fds() return count_lines("ls -l /proc/" .. pid .. "/fd | grep kvm") end
    -- this process's threads but KVM's own workers (kvm-nx-lpage-recovery
    -- and the like, which a kernel may run in the VMM's thread group and
    -- which leave when KVM is done with the VM, not when its fd closes)
    local function tasks()
      return count_lines("cat /proc/" .. pid .. "/task/*/comm | grep -v '^kvm'")
    end
    local function vcpu_threads()
      return count_lines("cat /proc/" .. pid .. "/task/*/comm | grep '^vcpu '")
    end
    local function cycle()
      local vm, cpus = smp_vm(4)
      vm:on_io(0x10, function() end)
      vm:on_io(0x11, function() return kvm.STOP end)
      assert.equal("stopped", assert(vm:run{ timeout = 30 }).reason)
      assert.equal(4, #cpus)
      vm:close()
    end
    cycle()                                    -- what the first run sets up once
    collectgarbage()
    collectgarbage()
    local f0, t0 = fds(), tasks()
    for _ = 1, 100 do cycle() end
    collectgarbage()
    collectgarbage()
    assert.equal(f0, fds())
    assert.equal(t0, tasks())
    assert.equal(0, vcpu_threads())
  end)
end)
