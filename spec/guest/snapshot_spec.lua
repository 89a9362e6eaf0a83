--- Snapshots (csrc/snapshot.c): vm:snapshot() and vm:restore(snap) on tiny
-- guests: a guest resumes from the state saved, every piece of vCPU state a
-- script can read comes back, memory comes back (all of it the first time,
-- then only the pages changed since, by the guest or by the VMM), several
-- vCPUs, and a snapshot that does not fit the VM changes nothing.
local support = require "support"
local kvm = require "kvm.core"

-- real mode at 0x1000: count in memory at 0x5000 and tell port 0x10
local COUNT_IN_MEMORY = "\xff\x06\x00\x50"   -- inc word [0x5000]
                     .. "\xa1\x00\x50"       -- mov ax, [0x5000]
                     .. "\xe7\x10"           -- out 0x10, ax
                     .. "\xeb\xf5"           -- jmp 0x1000

-- flat 32-bit: write ecx into each of ecx pages from 1 MiB up, then hlt
local WRITE_PAGES = "\xbf\x00\x00\x10\x00"   -- mov edi, 0x100000
                 .. "\x89\x0f"               -- mov [edi], ecx
                 .. "\x81\xc7\x00\x10\x00\x00" -- add edi, 0x1000
                 .. "\x49"                   -- dec ecx
                 .. "\x75\xf5"               -- jnz (mov [edi], ecx)
                 .. "\xf4"                   -- hlt

-- a counting guest stopped when it has said `n`; the values it said go to `seen`
local function counter(n)
  local vm, cpu, ram = support.guest(COUNT_IN_MEMORY)
  local t = { seen = {}, stop_at = n }
  vm:on_io(0x10, function(_, _, _, v)
    t.seen[#t.seen + 1] = v
    if t.stop_at and v >= t.stop_at then return kvm.STOP end
  end)
  return vm, cpu, ram, t
end

describe("snapshots", function()
  it("a guest counting in memory, snapshotted and restored, counts on from the same value, every time", function()
    support.need_kvm()
    local vm, cpu, _, t = counter(100)
    assert.equal("stopped", cpu:run().reason)
    local snap = assert(vm:snapshot())
    t.stop_at = 150
    cpu:run()
    assert.equal(150, vm:u16(0x5000))
    for _ = 1, 5 do
      local ok, pages = vm:restore(snap)
      assert.is_true(ok)
      assert.equal(1, pages)             -- the counter's page, nothing else
      assert.equal(100, vm:u16(0x5000))
      assert.equal(100, cpu:regs().rax & 0xffff)
      t.seen, t.stop_at = {}, 103
      assert.equal("stopped", cpu:run().reason)
      assert.same({ 101, 102, 103 }, t.seen)
    end
  end)

  it("the first restore copies every page that is not zero; later ones only those changed since", function()
    support.need_kvm()
    local vm, cpu, ram = support.guest(WRITE_PAGES, { mode = "protected", size = 8 << 20 })
    ram:write(0x200000 - 8, "marker!!")
    local before = ram:read(0, 8 << 20)
    local snap = assert(vm:snapshot())
    local used = snap:memory()[1].pages
    assert.is_true(used >= 3 and used < 20, "pages in use " .. used)
    -- a vCPU's first run may leave one more page dirty (kvm_amd logs the
    -- code page then): one run first, restored, then the counts are exact
    cpu:set_regs{ rip = support.BASE, rcx = 1, rflags = 2 }
    assert.equal("hlt", cpu:run().reason)
    local ok0, first = vm:restore(snap)
    assert.is_true(ok0 and first >= 1 and first <= 2, "the first restore copied " .. tostring(first))
    for _, n in ipairs{ 1, 10, 1000 } do
      cpu:set_regs{ rip = support.BASE, rcx = n, rflags = 2 }
      assert.equal("hlt", cpu:run().reason)
      assert.equal(n, ram:u32(0x100000))
      local ok, pages = vm:restore(snap)
      assert.is_true(ok)
      assert.equal(n, pages)
      assert.is_true(ram:read(0, 8 << 20) == before)
    end
    -- a snapshot loaded into another VM copies everything the first time
    local vm2, _, ram2 = support.guest(WRITE_PAGES, { mode = "protected", size = 8 << 20 })
    ram2:fill(0x300000, 4096 * 3, 0x55)
    local ok, pages = vm2:restore(snap)
    assert.is_true(ok)
    assert.equal(used, pages)
    assert.is_true(ram2:read(0, 8 << 20) == before)
    vm2:close()
  end)

  it("pages the VMM wrote (vm:write, memory:write, memory:fill) come back too", function()
    support.need_kvm()
    local vm, _, ram = support.guest("\xf4")
    local snap = assert(vm:snapshot())
    vm:write(0x10000, "abc")
    ram:write(0x20000, "def")
    ram:fill(0x30000, 8192, 7)
    local ok, pages = vm:restore(snap)
    assert.is_true(ok)
    assert.equal(4, pages)
    assert.equal(("\0"):rep(3), vm:read(0x10000, 3))
    assert.equal(("\0"):rep(3), vm:read(0x20000, 3))
    assert.equal(("\0"):rep(8192), vm:read(0x30000, 8192))
  end)

  it("memory:dirty_pages between restores does not hide pages from the next restore", function()
    support.need_kvm()
    local vm = assert(kvm.vm())
    local ram = vm:memory{ guest = 0, size = support.RAM, dirty_log = true }
    local cpu = assert(vm:vcpu(0))
    require("kvm.x86").real_mode(cpu)
    ram:write(support.BASE, "\xc6\x06\x00\x60\x2a\xf4")   -- mov byte [0x6000], 42; hlt
    cpu:set_regs{ rip = support.BASE, rsp = 0x8000, rflags = 2 }
    local snap = assert(vm:snapshot())
    assert.equal("hlt", cpu:run().reason)
    local seen = ram:dirty_pages()
    assert.is_true(#seen >= 1)
    local ok, pages = vm:restore(snap)
    assert.is_true(ok)
    assert.is_true(pages >= 1)
    assert.equal(0, vm:u8(0x6000))
    assert.equal(support.BASE, cpu:regs().rip)
  end)

  it("every piece of vCPU state a script can read comes back", function()
    support.need_kvm()
    local vm, cpu = support.guest("\xf4")
    local regs = {}
    for i, r in ipairs{ "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10",
                        "r11", "r12", "r13", "r14", "r15" } do
      regs[r] = 0x1111111111111 * i
    end
    regs.rip, regs.rsp, regs.rflags = support.BASE, 0x8000, 0x202
    cpu:set_regs(regs)
    assert.is_true(cpu:set_msrs{ [0x174] = 0x10, [0xc0000081] = 0x0023001000000000 })
    local fpu = cpu:fpu()
    fpu.mxcsr = 0x1f80 | 0x6000              -- round toward zero
    assert(cpu:set_fpu(fpu))
    assert.is_true(cpu:set_events{ nmi = { pending = 1 } })
    local want = { regs = cpu:regs(), sregs = cpu:sregs(), fpu = cpu:fpu(), events = cpu:events(),
                   msrs = cpu:msrs{ 0x174, 0xc0000081 } }
    local snap = assert(vm:snapshot())
    cpu:set_regs{ rax = 1, rbx = 2, rip = 0x2000, rflags = 2 }
    assert.is_true(cpu:set_msrs{ [0x174] = 0x20, [0xc0000081] = 0 })
    local s2 = cpu:sregs()
    s2.cs.selector, s2.cs.base = 0x100, 0x1000
    cpu:set_sregs(s2)
    fpu.mxcsr = 0x1f80
    assert(cpu:set_fpu(fpu))
    assert.is_true(cpu:set_events{ nmi = { pending = 0 } })
    assert.is_true(vm:restore(snap))
    assert.same(want.regs, cpu:regs())
    assert.same(want.sregs, cpu:sregs())
    assert.same(want.fpu, cpu:fpu())
    assert.same(want.events, cpu:events())
    assert.same(want.msrs, cpu:msrs{ 0x174, 0xc0000081 })
  end)

  it("a guest stopped on a port read resumes with the value it was given, the access not done twice", function()
    support.need_kvm()
    -- in al, 0x11; mov [0x2000], al; out 0x10, al; hlt
    local vm, cpu = support.guest("\xe4\x11\xa2\x00\x20\xe6\x10\xf4")
    local reads, outs = 0, {}
    vm:on_io(0x11, function() reads = reads + 1 cpu:stop() return 0x5a end)
    vm:on_io(0x10, function(_, _, _, v) outs[#outs + 1] = v end)
    local e = cpu:run()
    assert.equal("stopped", e.reason)
    local snap = assert(vm:snapshot())
    assert.equal("hlt", cpu:run().reason)
    assert.is_true(vm:restore(snap))
    assert.equal("hlt", cpu:run().reason)
    assert.equal(1, reads)
    assert.same({ 0x5a, 0x5a }, outs)
  end)

  it("two vCPUs, snapshotted in the middle of a vm:run, go on the same way after each restore", function()
    support.need_kvm()
    local vm, cpus = support.smp_guest(2, { hammer = 40 })
    local counts, stop_after = {}, 30
    local n = 0
    vm:on_io(0x12, function(_, _, _, v)
      counts[v] = (counts[v] or 0) + 1
      n = n + 1
      if n == stop_after then return kvm.STOP end
    end)
    vm:on_io(0x10, function() end)
    vm:on_io(0x11, function() return kvm.STOP end)
    assert.equal("stopped", assert(vm:run{ timeout = 30 }).reason)
    local snap = assert(vm:snapshot())
    assert.equal(2, #(function()
      local v = {}
      for _, p in ipairs(snap:parts()) do if p.kind == "vcpu" then v[#v + 1] = p end end
      return v
    end)())
    local at = { [0] = counts[0] or 0, [1] = counts[1] or 0 }
    local function finish()
      counts, n, stop_after = { [0] = 0, [1] = 0 }, 0, -1
      local e = assert(vm:run{ timeout = 30 })
      assert.equal("stopped", e.reason)
      return counts, vm:u32(0x3000)
    end
    local c1, aps1 = finish()
    assert.same({ [0] = 40 - at[0], [1] = 40 - at[1] }, c1)
    assert.equal(1, aps1)
    for _ = 1, 3 do
      assert.is_true(vm:restore(snap))
      local c2, aps2 = finish()
      assert.same(c1, c2)
      assert.equal(aps1, aps2)
    end
    assert.equal(2, #cpus)
  end)

  describe("a snapshot that does not fit the VM changes nothing", function()
    local function unchanged(vm, cpu, fn)
      local regs, mem = cpu:regs(), vm:read(0, support.RAM)
      local ok, msg, errno = fn()
      assert.is_nil(ok)
      assert.equal("number", type(errno))
      assert.same(regs, cpu:regs())
      assert.is_true(vm:read(0, support.RAM) == mem)
      return msg
    end

    it("another memory layout", function()
      support.need_kvm()
      local a = support.guest("\xf4", { size = 4 << 20 })
      local snap = assert(a:snapshot())
      local vm, cpu = support.guest("\xf4")
      cpu:set_regs{ rax = 77 }
      local msg = unchanged(vm, cpu, function() return vm:restore(snap) end)
      assert.matches("memory slot 0 %(0x0, 4194304 bytes%) is not in this VM", msg)
      local vm3, cpu3 = support.guest("\xf4")
      vm3:memory{ guest = 0x1000000, size = 0x10000 }
      local snap3 = assert(support.guest("\xf4"):snapshot())
      assert.matches("this VM has 2 memory regions, the snapshot 1",
                     unchanged(vm3, cpu3, function() return vm3:restore(snap3) end))
    end)

    it("another number of vCPUs, or an irqchip where there was none", function()
      support.need_kvm()
      local snap = assert(support.guest("\xf4"):snapshot())
      local vm, cpu = support.guest("\xf4")
      assert(vm:vcpu(1))
      assert.matches("this VM has 2 vCPUs, the snapshot 1", unchanged(vm, cpu, function() return vm:restore(snap) end))
      local vm2, cpu2 = support.guest("\xf4", { setup = function(v) assert(v:irqchip()) end })
      assert.matches("no local APIC", unchanged(vm2, cpu2, function() return vm2:restore(snap) end))
      local snap2 = assert(vm2:snapshot())
      local vm3, cpu3 = support.guest("\xf4")
      assert.matches("local APIC, this VM has no in%-kernel irqchip",
                     unchanged(vm3, cpu3, function() return vm3:restore(snap2) end))
    end)
  end)

  it("vm:snapshot and vm:restore refuse while a vCPU runs, and take only a snapshot", function()
    support.need_kvm()
    local vm, cpu, _, t = counter(3)
    local snap = assert(vm:snapshot())
    local errs = {}
    vm:on_io(0x10, function(_, _, _, v)
      errs[#errs + 1] = select(2, pcall(vm.snapshot, vm))
      errs[#errs + 1] = select(2, pcall(vm.restore, vm, snap))
      if v >= t.stop_at then return kvm.STOP end
    end)
    cpu:run()
    assert.matches("vm:snapshot: a vCPU is running %(call it between runs%)", errs[1])
    assert.matches("vm:restore: a vCPU is running", errs[2])
    assert.has_error(function() vm:restore({}) end)
    assert.has_error(function() vm:restore() end)
    assert.matches("kvm.snapshot %(1 vCPUs, 1 memory regions, 2 MiB%)", tostring(snap))
  end)
end)
