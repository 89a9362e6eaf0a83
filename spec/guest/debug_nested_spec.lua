--- Guest debugging that needs a KVM which intercepts int3 and has data
-- breakpoints (kvm_intel, kvm_amd on hardware): kvm.debug's software
-- breakpoints (int3 patched into guest memory, the original byte restored and
-- stepped over) and watchpoints. kvm_pvm does neither (a guest's int3 there
-- never returns in real mode and is an emulation failure in long mode; a
-- write watchpoint never fires), so this file is tagged userspace: make test
-- runs it nested, on kvm_amd under QEMU's TCG, which does neither either
-- (QEMU 7.2's emulated SVM checks the software-interrupt intercept for int3,
-- not KVM's #BP exception intercept, and does not arm the debug registers
-- loaded for the guest): there each test asserts what the guest does instead.
local support = require "support"

-- mov cx, 5; 1: inc ax; loop 1b; hlt
local LOOP = "\xb9\x05\x00"        -- 0x1000 mov cx, 5
          .. "\x40"                -- 0x1003 inc ax
          .. "\xe2\xfd"            -- 0x1004 loop 0x1003
          .. "\xf4"                -- 0x1006 hlt

-- three words written in a loop: [0x2000] = 1, 2, 3
local STORE_LOOP = "\xb9\x03\x00"      -- 0x1000 mov cx, 3
                .. "\x40"              -- 0x1003 inc ax
                .. "\xa3\x00\x20"      -- 0x1004 mov [0x2000], ax
                .. "\xe2\xfa"          -- 0x1007 loop 0x1003
                .. "\xf4"              -- 0x1009 hlt

-- long mode: the same loop with 64-bit registers, code at 0x1000
local LOOP64 = "\xb9\x05\x00\x00\x00"  -- 0x1000 mov ecx, 5
            .. "\x48\xff\xc0"          -- 0x1005 inc rax
            .. "\xe2\xfb"              -- 0x1008 loop 0x1005
            .. "\xf4"                  -- 0x100a hlt

describe("guest debug: software breakpoints and watchpoints #userspace", function()
  local kvm = require "kvm"
  local guest = support.guest

  -- Does this KVM stop for `what` ("int3", "watch")? (debug_spec.lua's
  -- `can`, measured.) Where it does not, the guest's int3 reaches the
  -- guest: in real mode through the empty IVT into zeros (no stop, the
  -- timeout), in long mode (no IDT) a triple fault on kvm_amd, an emulation
  -- failure on kvm_pvm; a watchpoint never fires.
  local function can()
    local info = kvm.host_info()
    return info.module ~= "kvm_pvm" and info.hypervisor ~= "TCGTCGTCGTCG"
  end

  it("a software breakpoint: int3 in memory, hit once per pass, the instruction runs once", function()
    support.need_kvm()
    local vm, cpu = guest(LOOP)
    local d = kvm.debug.new(cpu)
    local seen = {}
    local id = d:break_at(0x1003, function(c, e)
      assert.equal(3, e.exception)
      assert.equal(0x1003, c:regs().rip)
      seen[#seen + 1] = c:regs().rax & 0xffff
      return true
    end, { type = "sw" })
    assert.equal("\xcc", vm:read(0x1003, 1))
    assert.same({ sw_bp = true }, cpu:guest_debug())
    if not can() then
      assert.equal("timeout", d:run{ timeout = 1 }.reason)
      assert.same({}, seen)
      d:remove(id)
      assert.equal("\x40", vm:read(0x1003, 1))
      return
    end
    assert.equal("hlt", d:run{ timeout = 10 }.reason)
    assert.same({ 0, 1, 2, 3, 4 }, seen)
    assert.equal(5, cpu:regs().rax & 0xffff)
    assert.equal("\xcc", vm:read(0x1003, 1))   -- put back after each step over it
    assert.same({ { id = id, type = "sw", addr = 0x1003, kind = "exec", len = 1, hits = 5 } }, d:list())
    d:remove(id)
    assert.equal("\x40", vm:read(0x1003, 1))
    assert.same({}, cpu:guest_debug())
  end)

  it("a software breakpoint without a function stops run() at it, rip on the instruction", function()
    support.need_kvm()
    local vm, cpu = guest(LOOP)
    local d = kvm.debug.new(cpu)
    local id = d:break_at(0x1004, nil, { type = "sw" })
    if not can() then
      assert.equal("timeout", d:run{ timeout = 1 }.reason)
      return
    end
    for pass = 1, 5 do
      local e, hit = d:run{ timeout = 10 }
      assert.equal("debug", e.reason)
      assert.equal(3, e.exception)
      assert.equal(id, hit)
      assert.equal(0x1004, cpu:regs().rip)
      assert.equal(pass, cpu:regs().rax & 0xffff)
    end
    assert.equal("hlt", d:run{ timeout = 10 }.reason)
  end)

  it("a software breakpoint in long mode, through the page tables", function()
    support.need_kvm()
    local vm, cpu = guest(LOOP64, { mode = "long" })
    local d = kvm.debug.new(cpu)
    local n = 0
    d:break_at(0x1008, function() n = n + 1 return true end, { type = "sw" })
    d:break_at(0x1005, function(c) c:set_regs{ rcx = 1 } return true end, { type = "hw" })
    if not can() then
      local e = d:run{ timeout = 10 }
      if kvm.host_info().module == "kvm_pvm" then
        assert.equal("internal_error", e.reason)
        assert.equal("\xcc", e.insn:sub(1, 1))
        assert.equal(0x1008, e.rip)
      else
        assert.equal("shutdown", e.reason)
      end
      assert.equal(0, n)
      return
    end
    assert.equal("hlt", d:run{ timeout = 10 }.reason)
    assert.equal(1, n)            -- rcx = 1 at the inc: the loop ends after one pass
    assert.equal(1, cpu:regs().rax)
  end)

  it("a write watchpoint stops after the write; fn sees the value written", function()
    support.need_kvm()
    local vm, cpu = guest(STORE_LOOP)
    local d = kvm.debug.new(cpu)
    local seen = {}
    local id = d:watch(0x2000, 2, function(c, e)
      assert.equal(1, e.exception)
      seen[#seen + 1] = { rip = c:regs().rip, value = vm:u16(0x2000) }
      return true
    end)
    if not can() then
      assert.equal("hlt", d:run{ timeout = 10 }.reason)
      assert.same({}, seen)
      assert.equal(3, vm:u16(0x2000))
      return
    end
    assert.equal("hlt", d:run{ timeout = 10 }.reason)
    assert.same({ { rip = 0x1007, value = 1 }, { rip = 0x1007, value = 2 }, { rip = 0x1007, value = 3 } }, seen)
    assert.equal(3, d:list()[1].hits)
    assert.equal("watch", d:list()[1].type)
    assert.equal(1, d:list()[1].slot)
    d:remove(id)
  end)

  it("a watchpoint without a function stops run() with slot and pc", function()
    support.need_kvm()
    local vm, cpu = guest(STORE_LOOP)
    local d = kvm.debug.new(cpu)
    if not can() then
      d:watch(0x2000, 2)
      assert.equal("hlt", d:run{ timeout = 10 }.reason)   -- the watchpoint never fires
      return
    end
    d:break_at(0x1000, nil, { type = "sw" })
    local id = d:watch(0x2000, 2)
    local e = d:run{ timeout = 10 }
    assert.equal(0x1000, e.pc)   -- the breakpoint where the guest starts stops it
    e = assert(d:run{ timeout = 10 })
    assert.equal("debug", e.reason)
    assert.equal(2, e.slot)
    assert.equal(0x1007, e.rip)
    assert.equal(1, vm:u16(0x2000))
    local _, hit = d:run{ timeout = 10 }
    assert.equal(id, hit)
    assert.equal(2, vm:u16(0x2000))
  end)

  it("a watchpoint not on the written word does not fire", function()
    support.need_kvm()
    local vm, cpu = guest(STORE_LOOP)
    local d = kvm.debug.new(cpu)
    d:watch(0x2008, 8)
    assert.equal("hlt", d:run{ timeout = 10 }.reason)
    assert.equal(0, d:list()[1].hits)
  end)
end)
