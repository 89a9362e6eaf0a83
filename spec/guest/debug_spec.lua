--- Guest debugging on tiny real-mode guests: the core's cpu:set_guest_debug,
-- cpu:guest_debug and cpu:step (csrc/debug.c), the "debug" exit's fields
-- (csrc/exit.c), and kvm.debug's hardware breakpoints with Lua actions. What
-- every KVM here does: single-step and hardware execute breakpoints (kvm_pvm
-- too). Software breakpoints (int3) and watchpoints need kvm_intel or kvm_amd:
-- spec/guest/debug_nested_spec.lua, run nested.
local support = require "support"

-- mov cx, 5; 1: inc ax; loop 1b; hlt: 11 instructions before the hlt
local LOOP = "\xb9\x05\x00"        -- 0x1000 mov cx, 5
          .. "\x40"                -- 0x1003 inc ax
          .. "\xe2\xfd"            -- 0x1004 loop 0x1003
          .. "\xf4"                -- 0x1006 hlt

-- a port written 3 times in a loop
local PORT_LOOP = "\xb9\x03\x00"   -- 0x1000 mov cx, 3
               .. "\xe6\x10"       -- 0x1003 out 0x10, al
               .. "\xe2\xfc"       -- 0x1005 loop 0x1003
               .. "\xf4"           -- 0x1007 hlt

describe("guest debug", function()
  local kvm = require "kvm"
  local err, merr, guest = support.err, support.merr, support.guest

  -- kvm_pvm loses the debug trap of an instruction whose port exit userspace
  -- completed: the single-step stops after the next instruction, and a
  -- hardware breakpoint on the next instruction is not hit
  local function pvm() return kvm.host_info().module == "kvm_pvm" end

  -- Does this KVM stop for `what` ("step", "hw": hardware execute
  -- breakpoints)? Measured: kvm_pvm single-steps and has hardware execute
  -- breakpoints; kvm_amd nested under QEMU's TCG (CPUID hypervisor signature
  -- TCGTCGTCGTCG) single-steps only (QEMU 7.2's emulated SVM does not arm the
  -- debug registers KVM loads for the guest); a KVM on hardware does both.
  local function can(what)
    local info = kvm.host_info()
    if info.module == "kvm_pvm" then return what == "step" or what == "hw" end
    if info.hypervisor == "TCGTCGTCGTCG" then return what == "step" end
    return true
  end

  -- where the KVM has no hardware breakpoints: the guest runs to its hlt
  -- as if there were none, and nothing was hit
  local function runs_through(d)
    assert.equal("hlt", d:run{ timeout = 5 }.reason)
    for _, bp in ipairs(d:list()) do assert.equal(0, bp.hits) end
  end

  describe("cpu:set_guest_debug and cpu:guest_debug", function()
    it("round-trips a configuration and turns off with nil", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      assert.same({}, cpu:guest_debug())
      assert.is_true(cpu:set_guest_debug{ sw_bp = true, hw = {
        [1] = { addr = 0x1003 },
        [3] = { addr = 0x2000, kind = "write", len = 8 },
        [4] = { addr = 0x2002, kind = "access", len = 2 } } })
      assert.same({ sw_bp = true, hw = {
        [1] = { addr = 0x1003, kind = "exec", len = 1 },
        [3] = { addr = 0x2000, kind = "write", len = 8 },
        [4] = { addr = 0x2002, kind = "access", len = 2 } } }, cpu:guest_debug())
      assert.is_true(cpu:set_guest_debug(nil))
      assert.same({}, cpu:guest_debug())
      assert.is_true(cpu:set_guest_debug{ singlestep = true })
      assert.same({ singlestep = true }, cpu:guest_debug())
      assert.is_true(cpu:set_guest_debug(false))
      assert.same({}, cpu:guest_debug())
    end)

    local bad = {
      { { foo = 1 }, "bad key 'foo' in guest debug (singlestep, sw_bp or hw expected)" },
      { { hw = 1 }, "bad field 'hw' in guest debug (table expected)" },
      { { hw = { [5] = { addr = 0 } } }, "bad key in hw (a debug register slot 1..4 expected)" },
      { { hw = { [0] = { addr = 0 } } }, "bad key in hw (a debug register slot 1..4 expected)" },
      { { hw = { x = { addr = 0 } } }, "bad key in hw (a debug register slot 1..4 expected)" },
      { { hw = { [1] = 5 } }, "bad hw[1] (table expected)" },
      { { hw = { [1] = {} } }, "bad field 'addr' in hw[1] (integer expected, got nil)" },
      { { hw = { [1] = { addr = "x" } } }, "bad field 'addr' in hw[1] (integer expected, got string)" },
      { { hw = { [1] = { addr = 0x800000000000 } } }, "bad field 'addr' in hw[1] (not a canonical address)" },
      { { hw = { [2] = { addr = 0, kind = "read" } } },
        "bad field 'kind' in hw[2] (\"exec\", \"write\" or \"access\" expected)" },
      { { hw = { [2] = { addr = 0, kind = 1 } } },
        "bad field 'kind' in hw[2] (\"exec\", \"write\" or \"access\" expected)" },
      { { hw = { [1] = { addr = 0, len = 4 } } }, "bad field 'len' in hw[1] (an exec breakpoint has length 1)" },
      { { hw = { [1] = { addr = 0, kind = "write", len = 3 } } }, "bad field 'len' in hw[1] (1, 2, 4 or 8 expected)" },
      { { hw = { [1] = { addr = 0x2002, kind = "write", len = 4 } } },
        "bad field 'addr' in hw[1] (not aligned to its length 4)" },
      { { hw = { [1] = { addr = 0, kind = "write", len = 1.5 } } },
        "bad field 'len' in hw[1] (integer expected, got number)" },
    }
    for _, case in ipairs(bad) do
      it("raises: " .. case[2], function()
        support.need_kvm()
        local vm, cpu = guest(LOOP)
        assert.equal(case[2], merr(cpu, "set_guest_debug", case[1]))
        assert.same({}, cpu:guest_debug())     -- nothing changed
      end)
    end

    it("raises for a non-table and for a closed vCPU", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      assert.matches("table expected, got number", merr(cpu, "set_guest_debug", 5))
      cpu:close()
      assert.equal("attempt to use a closed kvm.vcpu", merr(cpu, "set_guest_debug", {}))
      assert.equal("attempt to use a closed kvm.vcpu", merr(cpu, "step"))
      assert.equal("attempt to use a closed kvm.vcpu", merr(cpu, "guest_debug"))
    end)

    it("step() from inside a handler raises", function()
      support.need_kvm()
      local vm, cpu = guest(PORT_LOOP)
      local msg
      vm:on_io(0x10, function() msg = support.err(function() cpu:step() end) return kvm.STOP end)
      assert.equal("stopped", cpu:run().reason)
      assert.equal("step() called from inside a handler (re-entry is not allowed)", msg)
    end)
  end)

  describe("cpu:step", function()
    it("executes one instruction: the loop takes 11 steps to its hlt", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local n, e = 0, nil
      repeat
        e = cpu:step{ timeout = 5 }
        assert.equal("debug", e.reason)
        assert.is_true(e.step)
        assert.equal(1, e.exception)
        assert.equal(e.rip, e.pc)           -- real mode, cs base 0
        assert.equal(0, e.dr6 & 0xf)        -- no breakpoint's bit
        assert.equal(0x4000, e.dr6 & 0x4000)
        n = n + 1
      until e.rip == 0x1006 or n > 100
      assert.equal(11, n)
      assert.equal(5, cpu:regs().rax & 0xffff)
      assert.equal(0, cpu:regs().rcx & 0xffff)
      assert.same({}, cpu:guest_debug())    -- single-step was for those runs only
      assert.equal("hlt", cpu:run().reason)
      assert.matches("^debug exception=1 step at rip=0x1003$", tostring(select(2, guest(LOOP)):step()))
    end)

    it("dispatches a port exit of the stepped instruction to its handler", function()
      support.need_kvm()
      local vm, cpu = guest(PORT_LOOP)
      local outs = 0
      vm:on_io(0x10, function() outs = outs + 1 end)
      assert.equal(0x1003, cpu:step().rip)
      local e = cpu:step()
      assert.equal("debug", e.reason)
      assert.equal(pvm() and 0x1003 or 0x1005, e.rip)   -- kvm_pvm: out, then loop
      assert.equal(1, outs)
    end)

    it("returns the port exit no device serves, then the step", function()
      support.need_kvm()
      local vm, cpu = guest(PORT_LOOP)
      cpu:step()
      local e = cpu:step()
      assert.equal("io", e.reason)
      assert.equal(0x10, e.port)
      e = cpu:step()
      assert.equal("debug", e.reason)
      assert.equal(pvm() and 0x1003 or 0x1005, e.rip)
    end)

    it("steps past a hardware breakpoint at the current instruction", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      assert(cpu:set_guest_debug{ hw = { [1] = { addr = 0x1000 } } })
      local e = cpu:step()
      assert.equal(0x1003, e.rip)
      assert.is_nil(e.slot)
      assert.same({ hw = { [1] = { addr = 0x1000, kind = "exec", len = 1 } } }, cpu:guest_debug())
    end)
  end)

  describe("hardware breakpoints in the core", function()
    it("stop before the instruction: reason debug, pc, slot, dr6, dr7", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      assert(cpu:set_guest_debug{ hw = { [3] = { addr = 0x1004 } } })
      local e = cpu:run{ timeout = 5 }
      if not can("hw") then assert.equal("hlt", e.reason) return end
      assert.equal("debug", e.reason)
      assert.equal(4, e.exit_reason)      -- KVM_EXIT_DEBUG
      assert.equal(1, e.exception)
      assert.equal(0x1004, e.pc)
      assert.equal(0x1004, e.rip)
      assert.equal(3, e.slot)
      assert.equal(4, e.dr6 & 0xf)        -- B2
      assert.is_nil(e.step)
      assert.equal(1, cpu:regs().rax & 0xffff)   -- the inc before it ran, the loop not yet
      assert.equal("debug exception=1 slot=3 at rip=0x1004", tostring(e))
      assert.is_number(e.dr7)
      local f = e:fields()
      assert.equal(0x1004, f.pc)
    end)
  end)

  describe("kvm.debug", function()
    it("a hardware breakpoint whose function continues: hit once per pass, the instruction runs once", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      local seen = {}
      local id = d:break_at(0x1003, function(c, e)
        assert.equal(cpu, c)
        seen[#seen + 1] = c:regs().rax & 0xffff
        assert.equal(0x1003, e.pc)
        return true
      end)
      assert.equal(1, id)
      if not can("hw") then return runs_through(d) end
      local e = d:run{ timeout = 5 }
      assert.equal("hlt", e.reason)
      assert.same({ 0, 1, 2, 3, 4 }, seen)
      assert.equal(5, cpu:regs().rax & 0xffff)
      assert.same({ { id = 1, type = "hw", addr = 0x1003, kind = "exec", len = 1, hits = 5, slot = 1 } }, d:list())
    end)

    it("a breakpoint without a function stops run(); run() again goes past it", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      local id = d:break_at(0x1004)
      if not can("hw") then return runs_through(d) end
      for pass = 1, 5 do
        local e, hit = d:run{ timeout = 5 }
        assert.equal("debug", e.reason)
        assert.equal(0x1004, e.pc)
        assert.equal(id, hit)
        assert.equal(pass, cpu:regs().rax & 0xffff)
      end
      assert.equal("hlt", d:run{ timeout = 5 }.reason)
      assert.equal(5, d:list()[1].hits)
    end)

    it("fn can change a register: cx = 1 ends the loop after this pass", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      d:break_at(0x1003, function(c)
        c:set_regs{ rcx = 1 }
        return true
      end)
      if not can("hw") then return runs_through(d) end
      assert.equal("hlt", d:run{ timeout = 5 }.reason)
      assert.equal(1, cpu:regs().rax & 0xffff)
      assert.equal(1, d:list()[1].hits)
    end)

    it("fn can move RIP: skipping the inc", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      d:break_at(0x1003, function(c)
        c:set_regs{ rip = 0x1004 }
        return true
      end)
      if not can("hw") then return runs_through(d) end
      assert.equal("hlt", d:run{ timeout = 5 }.reason)
      assert.equal(0, cpu:regs().rax & 0xffff)
      assert.equal(5, d:list()[1].hits)
    end)

    it("a breakpoint inside a Lua-handled port loop", function()
      support.need_kvm()
      local vm, cpu = guest(PORT_LOOP)
      local d = kvm.debug.new(cpu)
      local log = {}
      vm:on_io(0x10, function() log[#log + 1] = "out" end)
      d:break_at(0x1005, function() log[#log + 1] = "bp" return true end)
      d:break_at(0x1003, function() log[#log + 1] = "before" return true end)
      if not can("hw") then return runs_through(d) end
      assert.equal("hlt", d:run{ timeout = 5 }.reason)
      if pvm() then   -- the breakpoint after the out is not hit there
        assert.same({ "before", "out", "before", "out", "before", "out" }, log)
      else
        assert.same({ "before", "out", "bp", "before", "out", "bp", "before", "out", "bp" }, log)
      end
    end)

    it("the fifth hardware breakpoint has no debug register; remove frees one", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      for i = 1, 4 do assert.equal(i, d:break_at(0x1000 + i, nil, { type = "hw" })) end
      local ok, why = d:break_at(0x1010, nil, { type = "hw" })
      assert.is_nil(ok)
      assert.equal("no free debug register (4 hardware breakpoints and watchpoints at most)", why)
      assert.is_nil(d:watch(0x2000, 4))
      assert.is_true(d:remove(2))
      assert.is_false(d:remove(2))
      assert.equal(5, d:watch(0x2000, 4))
      assert.same({ 1, 3, 4, 5 }, { d:list()[1].id, d:list()[2].id, d:list()[3].id, d:list()[4].id })
      assert.equal("write", cpu:guest_debug().hw[2].kind)
      d:clear()
      assert.same({}, d:list())
      assert.same({}, cpu:guest_debug())
    end)

    it("raises for bad arguments", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      assert.equal("bad argument #1 to 'new' (kvm.vcpu expected)", err(kvm.debug.new, vm))
      local d = kvm.debug.new(cpu)
      assert.equal("bad argument #1 to 'break_at' (integer expected, got string)", merr(d, "break_at", "x"))
      assert.equal("bad argument #2 to 'break_at' (function or nil expected, got number)", merr(d, "break_at", 1, 2))
      assert.equal("bad option 'type' to 'break_at' (\"hw\" or \"sw\" expected)",
                   merr(d, "break_at", 1, nil, { type = "x" }))
      assert.equal("bad argument #2 to 'watch' (1, 2, 4 or 8 expected)", merr(d, "watch", 0x2000, 3))
      assert.equal("bad argument #1 to 'watch' (address not aligned to the length)", merr(d, "watch", 0x2001, 2))
      assert.equal("bad argument #1 to 'watch' (integer expected, got number)", merr(d, "watch", 0.5, 2))
      assert.equal("bad option 'kind' to 'watch' (\"write\" or \"access\" expected)",
                   merr(d, "watch", 0x2000, 2, nil, { kind = "exec" }))
      d:break_at(0x1003)
      assert.equal("a breakpoint is already set at 0x1003 (id 1)", merr(d, "break_at", 0x1003))
    end)

    it("a software breakpoint at an address outside guest memory fails", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      local ok, why = d:break_at(0x10000000, nil, { type = "sw" })
      assert.is_nil(ok)
      assert.equal("address 0x10000000 is not in guest memory", why)
      assert.same({}, d:list())
    end)

    it("a breakpoint where the guest starts stops the first run; the next goes past it", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      d:break_at(0x1000)
      if not can("hw") then return runs_through(d) end
      local e, id = d:run{ timeout = 5 }
      assert.equal("debug", e.reason)
      assert.equal(0x1000, e.pc)
      assert.equal(1, id)
      assert.equal("hlt", d:run{ timeout = 5 }.reason)
      assert.equal(5, cpu:regs().rax & 0xffff)
    end)

    it("d:step() steps; the exit says so", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local d = kvm.debug.new(cpu)
      d:break_at(0x1000)
      local e = d:step()
      assert.equal(0x1003, e.rip)
      assert.is_true(e.step)
    end)
  end)
end)
