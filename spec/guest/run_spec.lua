--- The run loop (csrc/vcpu.c l_vcpu_run) and exits (csrc/exit.c) on tiny
-- real guests: hlt, port I/O returned to the script or dispatched to Lua
-- handlers, string I/O, MMIO, kvm.STOP and cpu:stop(), handler errors,
-- max_exits, timeout, SIGINT, debug exit, triple fault, stats.
--
-- Guests are byte strings (real mode unless a test says otherwise) loaded at
-- 0x1000 by support.guest, with the instruction beside each byte.
local support = require "support"

local HLT = "\xf4"                 -- hlt

local OUT_IN = "\xb0\x41"          -- mov al, 0x41
            .. "\xe6\x10"          -- out 0x10, al
            .. "\xe4\x11"          -- in al, 0x11
            .. "\xa2\x00\x20"      -- mov [0x2000], al
            .. "\xf4"              -- hlt

local WIDTHS = support.widths_guest(0x13)

local OUTSB = "\xba\x10\x00"       -- mov dx, 0x10
           .. "\xbe\x00\x20"       -- mov si, 0x2000
           .. "\xb9\x10\x00"       -- mov cx, 16
           .. "\xfc"               -- cld
           .. "\xf3\x6e"           -- rep outsb
           .. "\xf4"               -- hlt

local INSB = "\xba\x10\x00"        -- mov dx, 0x10
          .. "\xbf\x00\x30"        -- mov di, 0x3000
          .. "\xb9\x10\x00"        -- mov cx, 16
          .. "\xfc"                -- cld
          .. "\xf3\x6c"            -- rep insb
          .. "\xf4"                -- hlt

local OUT2 = "\xe6\x10"            -- out 0x10, al
          .. "\xe6\x11"            -- out 0x11, al
          .. "\xf4"                -- hlt

local IN1 = "\xe4\x10"             -- in al, 0x10
         .. "\xa2\x00\x20"         -- mov [0x2000], al
         .. "\xf4"                 -- hlt

local LOOP = "\xe6\x10"            -- 1: out 0x10, al
          .. "\xeb\xfc"            --    jmp 1b

local SPIN = "\xeb\xfe"            -- jmp .

local DEBUG_EXIT = "\xb0\x2a"      -- mov al, 42
                .. "\xba\x01\x05"  -- mov dx, 0x501
                .. "\xee"          -- out dx, al
                .. "\xf4"          -- hlt

-- 32-bit protected mode (support.guest mode = "protected")
local MMIO32 = "\xb0\x77"                  -- mov al, 0x77
            .. "\xa2\x00\x00\x00\x10"      -- mov [0x10000000], al
            .. "\xa1\x04\x00\x00\x10"      -- mov eax, [0x10000004]
            .. "\xa3\x00\x01\x00\x00"      -- mov [0x100], eax
            .. "\xf4"                      -- hlt

-- 64-bit long mode (support.guest mode = "long")
local MMIO64 = "\xb0\x77"                          -- mov al, 0x77
            .. "\x88\x04\x25\x00\x00\x00\x10"      -- mov [0x10000000], al
            .. "\x48\x8b\x04\x25\x08\x00\x00\x10"  -- mov rax, [0x10000008]
            .. "\x48\x89\x04\x25\x00\x01\x00\x00"  -- mov [0x100], rax
            .. "\xf4"                              -- hlt

local UD2 = "\x0f\x0b"             -- ud2

describe("run loop", function()
  local kvm = require "kvm"
  local err, guest = support.err, support.guest

  describe("exits returned to the script", function()
    it("hlt: reason, exit_reason and rip after the instruction", function()
      support.need_kvm()
      local vm, cpu = guest(HLT)
      local e = cpu:run()
      assert.equal("hlt", e.reason)
      assert.equal(5, e.exit_reason)   -- KVM_EXIT_HLT
      assert.equal(0x1001, e.rip)
      assert.equal("hlt at rip=0x1001", tostring(e))
      assert.same({ reason = "hlt", exit_reason = 5, rip = 0x1001 }, e:fields())
    end)

    it("an unclaimed out: port, direction, size, count, data, value", function()
      support.need_kvm()
      local vm, cpu = guest(OUT_IN)
      local e = cpu:run()
      assert.equal("io", e.reason)
      assert.equal(2, e.exit_reason)   -- KVM_EXIT_IO
      assert.equal(0x10, e.port)
      assert.equal("out", e.direction)
      assert.equal(1, e.size)
      assert.equal(1, e.count)
      assert.equal("A", e.data)
      assert.equal(0x41, e.value)
      assert.equal("io out port=0x10 size=1 count=1 value=0x41", tostring(e))
    end)

    it("an unclaimed in: e:reply(v) gives the guest v", function()
      support.need_kvm()
      local vm, cpu, ram = guest(OUT_IN)
      cpu:run()
      local e = cpu:run()
      assert.equal("io", e.reason)
      assert.equal(0x11, e.port)
      assert.equal("in", e.direction)
      assert.equal(1, e.size)
      assert.is_nil(e.value)
      assert.equal("io in port=0x11 size=1 count=1", tostring(e))
      e:reply(0x5a)
      assert.equal("hlt", cpu:run().reason)
      assert.equal(0x5a, ram:u8(0x2000))
    end)

    it("an in not replied to reads all ones", function()
      support.need_kvm()
      local vm, cpu, ram = guest(IN1)
      assert.equal("io", cpu:run().reason)
      assert.equal("hlt", cpu:run().reason)
      assert.equal(0xff, ram:u8(0x2000))
    end)

    it("reply takes raw bytes too", function()
      support.need_kvm()
      local vm, cpu, ram = guest(IN1)
      cpu:run():reply("\x99")
      cpu:run()
      assert.equal(0x99, ram:u8(0x2000))
    end)

    it("reply errors", function()
      support.need_kvm()
      local vm, cpu = guest(OUT_IN)
      local out = cpu:run()
      assert.equal("reply() needs an \"in\" I/O exit or an MMIO read", err(function() out:reply(1) end))
      local inx = cpu:run()
      assert.equal("bad argument #1 to 'reply' (1 bytes expected)", err(function() inx:reply("ab") end))
      assert.equal("bad argument #1 to 'reply' (number expected, got table)", err(function() inx:reply({}) end))
      inx:reply(1)
      cpu:run()
      assert.equal("reply() to an exit that is no longer current", err(function() inx:reply(1) end))
    end)

    it("an exit keeps its vCPU alive", function()
      support.need_kvm()
      local vm, cpu = guest(IN1)
      local e = cpu:run()
      cpu = nil
      support.gc()
      e:reply(0x33)                                  -- no "closed", no crash
      local r, msg = vm:vcpu(0)
      assert.is_nil(r)
      assert.equal("KVM_CREATE_VCPU: File exists", msg)   -- vCPU 0 still exists
    end)

    it("a reply after the vCPU is closed raises", function()
      support.need_kvm()
      local vm, cpu = guest(IN1)
      local e = cpu:run()
      cpu:close()
      assert.equal("attempt to use a closed kvm.vcpu", err(function() e:reply(1) end))
    end)

    it("widths 1, 2 and 4: values out, replies in", function()
      support.need_kvm()
      local vm, cpu, ram = guest(WIDTHS)
      local outs = {}
      for i = 1, 3 do
        local e = cpu:run()
        outs[i] = { e.port, e.direction, e.size, e.value, e.data }
      end
      assert.same({ { 0x13, "out", 1, 0x12, "\x12" }, { 0x13, "out", 2, 0x1234, "\x34\x12" },
                    { 0x13, "out", 4, 0x12345678, "\x78\x56\x34\x12" } }, outs)
      for _, v in ipairs{ 0xab, 0xcdef, 0x89abcdef } do
        local e = cpu:run()
        assert.equal("in", e.direction)
        e:reply(v)
      end
      assert.equal("hlt", cpu:run().reason)
      assert.equal("\xab\0\xef\xcd\xef\xcd\xab\x89", ram:read(0x2000, 8))
    end)

    it("unclaimed rep outsb: all 16 bytes come out in order", function()
      support.need_kvm()
      local vm, cpu, ram = guest(OUTSB)
      ram:write(0x2000, "0123456789abcdef")
      local got, n = {}, 0
      local e = cpu:run()
      while e.reason == "io" do
        assert.equal(0x10, e.port)
        assert.equal(e.count, #e.data)
        got[#got + 1] = e.data
        n = n + e.count
        e = cpu:run()
      end
      assert.equal("hlt", e.reason)
      assert.equal(16, n)
      assert.equal("0123456789abcdef", table.concat(got))
    end)

    it("unclaimed rep insb: replies fill memory", function()
      support.need_kvm()
      local vm, cpu, ram = guest(INSB)
      local want, filled = "ABCDEFGHIJKLMNOP", 0
      local e = cpu:run()
      while e.reason == "io" do
        assert.equal("in", e.direction)
        e:reply(want:sub(filled + 1, filled + e.count))
        filled = filled + e.count
        e = cpu:run()
      end
      assert.equal("hlt", e.reason)
      assert.equal(want, ram:read(0x3000, 16))
    end)

    it("an integer reply goes to every element of a string in", function()
      support.need_kvm()
      local vm, cpu, ram = guest(INSB)
      local e = cpu:run()
      while e.reason == "io" do e:reply(0x5a); e = cpu:run() end
      assert.equal(string.rep("Z", 16), ram:read(0x3000, 16))
    end)

    it("unclaimed = 'ignore' continues and counts", function()
      support.need_kvm()
      local vm, cpu, ram = guest(OUT_IN)
      assert.equal("hlt", cpu:run{ unclaimed = "ignore" }.reason)
      assert.equal(0xff, ram:u8(0x2000))
      assert.equal(2, vm:stats().unclaimed_io)
      assert.equal(2, vm:stats().exits.io)
    end)
  end)

  describe("on_io handlers", function()
    it("are called with port, direction, size, value; in returns an integer", function()
      support.need_kvm()
      local vm, cpu, ram = guest(WIDTHS)
      local calls = {}
      local replies = { 0xab, 0xcdef, 0x89abcdef }
      vm:on_io({ 0x10, 0x17 }, function(port, dir, size, value)
        calls[#calls + 1] = { port, dir, size, value }
        if dir == "in" then return replies[#calls - 3] end
      end)
      assert.equal("hlt", cpu:run().reason)
      assert.same({
        { 0x13, "out", 1, 0x12 }, { 0x13, "out", 2, 0x1234 }, { 0x13, "out", 4, 0x12345678 },
        { 0x13, "in", 1 }, { 0x13, "in", 2 }, { 0x13, "in", 4 },
      }, calls)
      assert.equal("\xab\0\xef\xcd\xef\xcd\xab\x89", ram:read(0x2000, 8))
    end)

    it("an in returning nil reads all ones for each width", function()
      support.need_kvm()
      local vm, cpu, ram = guest(WIDTHS)
      vm:on_io(0x13, function() end)
      assert.equal("hlt", cpu:run().reason)
      assert.equal(0xff, ram:u8(0x2000))
      assert.equal(0xffff, ram:u16(0x2002))
      assert.equal(0xffffffff, ram:u32(0x2004))
    end)

    it("an in returning a non-integer raises out of run()", function()
      support.need_kvm()
      local vm, cpu = guest(IN1)
      vm:on_io(0x10, function() return "x" end)
      assert.equal("handler for port 0x10 returned a string (integer or nil expected)", err(function() cpu:run() end))
    end)

    it("rep outsb: one call per element, in order", function()
      support.need_kvm()
      local vm, cpu, ram = guest(OUTSB)
      ram:write(0x2000, "0123456789abcdef")
      local got = {}
      vm:on_io(0x10, function(port, dir, size, value)
        assert(port == 0x10 and dir == "out" and size == 1)
        got[#got + 1] = string.char(value)
      end)
      assert.equal("hlt", cpu:run().reason)
      assert.equal("0123456789abcdef", table.concat(got))
      assert.equal(16, vm:claims()[1].hits)
      assert.equal(16, vm:stats().ports[0x10])
    end)

    it("rep insb: memory filled from per-element replies", function()
      support.need_kvm()
      local vm, cpu, ram = guest(INSB)
      local i = 0
      vm:on_io(0x10, function(port, dir, size, value)
        assert(dir == "in" and value == nil)
        i = i + 1
        return 0x40 + i
      end)
      assert.equal("hlt", cpu:run().reason)
      assert.equal(16, i)
      assert.equal("ABCDEFGHIJKLMNOP", ram:read(0x3000, 16))
    end)

    it("removing a handler with nil: the port is unclaimed again", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      local n = 0
      vm:on_io(0x10, function() n = n + 1 end)
      vm:on_io(0x11, function() n = n + 1 end)
      vm:on_io(0x11, nil)
      local e = cpu:run()
      assert.equal(1, n)
      assert.equal("io", e.reason)
      assert.equal(0x11, e.port)
    end)

    it("replacing a handler: the new one is called", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      local who = {}
      vm:on_io({ 0x10, 0x11 }, function() who[#who + 1] = "old" end)
      vm:on_io({ 0x10, 0x11 }, function(port) who[#who + 1] = port end)
      assert.equal("hlt", cpu:run().reason)
      assert.same({ 0x10, 0x11 }, who)
    end)

    it("a handler can claim and remove ports while the guest runs", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      local seen = {}
      vm:on_io(0x10, function(port)
        seen[#seen + 1] = port
        vm:on_io(0x11, function(p) seen[#seen + 1] = p end)
        vm:on_io(0x10, nil)
      end)
      assert.equal("hlt", cpu:run().reason)
      assert.same({ 0x10, 0x11 }, seen)
    end)

    -- BUG (csrc/vcpu.c dispatch_io): the Range pointer is kept across Lua
    -- calls; when a handler removes its own claim in the middle of a string
    -- I/O, the claims shift and the remaining elements go to another range's
    -- handler (seen: port 0x11's handler called 15 times for port 0x10).
    it("a handler removing itself mid string I/O: no other handler sees the port [core bug]", function()
      support.need_kvm()
      local vm, cpu = guest(INSB)
      local wrong = 0
      vm:on_io(0x10, function() vm:on_io(0x10, nil); return 0x41 end)
      vm:on_io(0x11, function(port) if port ~= 0x11 then wrong = wrong + 1 end return 0x42 end)
      pcall(cpu.run, cpu, { unclaimed = "ignore" })
      assert.equal(0, wrong)
    end)
  end)

  describe("stopping", function()
    it("kvm.STOP from a handler returns 'stopped' with the I/O details; run() continues", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      vm:on_io(0x10, function() return kvm.STOP end)
      local e = cpu:run()
      assert.equal("stopped", e.reason)
      assert.equal(0x10, e.port)
      assert.equal("out", e.direction)
      assert.is_nil(e.exit_reason)
      local e2 = cpu:run()
      assert.equal("io", e2.reason)
      assert.equal(0x11, e2.port)
    end)

    it("cpu:stop() inside a handler", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local n = 0
      vm:on_io(0x10, function() n = n + 1; if n == 5 then cpu:stop() end end)
      local e = cpu:run{ timeout = 5 }
      assert.equal("stopped", e.reason)
      assert.equal(5, n)
    end)

    it("kvm.POWEROFF and kvm.RESET from a handler return 'poweroff' and 'reset'", function()
      support.need_kvm()
      for key, reason in pairs{ POWEROFF = "poweroff", RESET = "reset", STOP = "stopped" } do
        local vm, cpu = guest(OUT2)
        vm:on_io(0x10, function() return kvm[key] end)
        local e = cpu:run()
        assert.equal(reason, e.reason)
        assert.equal(0x10, e.port)
        vm:close()
      end
    end)

    it("cpu:stop(reason): 'poweroff' and 'reset' as a device would end the run; others raise", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local n = 0
      vm:on_io(0x10, function() n = n + 1; if n == 3 then cpu:stop("poweroff") end end)
      assert.equal("poweroff", cpu:run{ timeout = 5 }.reason)
      cpu:stop("reset")
      assert.equal("reset", cpu:run{ timeout = 5 }.reason)
      assert.has_error(function() cpu:stop("none") end)
      assert.has_error(function() cpu:stop("halt") end)
      -- the strongest request wins: a reset asked for after a stop
      cpu:stop(); cpu:stop("reset"); cpu:stop()
      assert.equal("reset", cpu:run{ timeout = 5 }.reason)
    end)

    it("cpu:stop() before run() makes it return at once", function()
      support.need_kvm()
      local vm, cpu = guest(SPIN)
      cpu:stop()
      local t0 = support.now()
      assert.equal("stopped", cpu:run{ timeout = 5 }.reason)
      assert.is_true(support.now() - t0 < 2)
      -- and only once
      assert.equal("timeout", cpu:run{ timeout = 0.05 }.reason)
    end)

    -- BUG (csrc/vcpu.c dispatch_io): kvm.STOP or cpu:stop() in the middle of a
    -- string "in" leaves the remaining elements of the data buffer as they
    -- were; KVM still copies all of them to the guest on the next KVM_RUN, so
    -- the guest reads stale bytes (seen: zeros) instead of handler replies
    -- (or at least all ones). The same break drops the rest of a string "out".
    for _, how in ipairs{ "kvm.STOP", "cpu:stop()" } do
      it(how .. " mid rep insb: the guest gets no stale bytes [core bug]", function()
        support.need_kvm()
        local vm, cpu, ram = guest(INSB)
        ram:fill(0x3000, 16, 0xee)
        local i = 0
        vm:on_io(0x10, function()
          i = i + 1
          if i == 1 then
            if how == "kvm.STOP" then return kvm.STOP end
            cpu:stop()
          end
          return 0x41
        end)
        assert.equal("stopped", cpu:run().reason)
        assert.equal("hlt", cpu:run().reason)
        local bytes = ram:read(0x3000, 16)
        assert.matches("^[A\xff]+$", bytes, ("%q"):format(bytes))
      end)
    end

    it("max_exits", function()
      support.need_kvm()
      local vm, cpu = guest(LOOP)
      local e = cpu:run{ unclaimed = "ignore", max_exits = 10 }
      assert.equal("max_exits", e.reason)
      assert.equal(10, cpu:stats().exits)
      assert.equal(10, vm:stats().unclaimed_io)
    end)

    it("timeout on a guest spinning in place", function()
      support.need_kvm()
      local vm, cpu = guest(SPIN)
      local t0 = support.now()
      local e = cpu:run{ timeout = 0.2 }
      local dt = support.now() - t0
      assert.equal("timeout", e.reason)
      assert.is_true(dt >= 0.15 and dt < 3, "took " .. dt .. " s")
      -- the guest can be run again
      assert.equal("timeout", cpu:run{ timeout = 0.05 }.reason)
    end)

    it("SIGINT while the guest spins: reason 'intr', the process survives", function()
      support.need_kvm()
      local vm, cpu = guest(SPIN)
      local pid = support.pid()
      os.execute("(sleep 0.3; kill -INT " .. pid .. ") &")
      local t0 = support.now()
      local e = cpu:run{ timeout = 5 }
      assert.equal("intr", e.reason)
      assert.is_true(support.now() - t0 < 4)
      -- still alive, and the guest still runs
      assert.equal("timeout", cpu:run{ timeout = 0.05 }.reason)
    end)

    local bad_opts = {
      { { unclaimed = "x" }, "bad option 'unclaimed' to 'run' (\"return\" or \"ignore\" expected)" },
      { { unclaimed = true }, "bad option 'unclaimed' to 'run' (\"return\" or \"ignore\" expected)" },
      { { max_exits = 0 }, "bad option 'max_exits' to 'run' (positive integer expected)" },
      { { max_exits = -1 }, "bad option 'max_exits' to 'run' (positive integer expected)" },
      { { max_exits = 1.5 }, "bad option 'max_exits' to 'run' (positive integer expected)" },
      { { max_exits = "x" }, "bad option 'max_exits' to 'run' (positive integer expected)" },
      { { timeout = 0 }, "bad option 'timeout' to 'run' (positive number of seconds expected)" },
      { { timeout = -1 }, "bad option 'timeout' to 'run' (positive number of seconds expected)" },
      { { timeout = "x" }, "bad option 'timeout' to 'run' (positive number of seconds expected)" },
      { { timeout = 0 / 0 }, "bad option 'timeout' to 'run' (positive number of seconds expected)" },
      { { timeout = 1e10 }, "bad option 'timeout' to 'run' (positive number of seconds expected)" },
    }
    for i, c in ipairs(bad_opts) do
      it("bad run options (" .. i .. "): " .. c[2], function()
        support.need_kvm()
        local vm, cpu = guest(HLT)
        assert.equal(c[2], err(function() cpu:run(c[1]) end))
        assert.equal("hlt", cpu:run().reason)   -- nothing half set up
      end)
    end

    it("run wants a table or nothing", function()
      support.need_kvm()
      local vm, cpu = guest(HLT)
      assert.equal("bad argument #1 to 'run' (table expected, got string)", err(function() cpu:run("x") end))
    end)
  end)

  describe("handler errors", function()
    it("propagate out of run() with a traceback naming the handler; run() continues", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      local function exploding_handler() error("boom") end
      local line = debug.getinfo(exploding_handler, "S").linedefined
      vm:on_io(0x10, exploding_handler)
      local ok_, msg = pcall(cpu.run, cpu)
      assert.is_false(ok_)
      assert.matches("boom", msg)
      assert.matches("stack traceback:", msg, 1, true)
      assert.matches("run_spec.lua:" .. line, msg, 1, true)
      local e = cpu:run()
      assert.equal("io", e.reason)
      assert.equal(0x11, e.port)
      assert.equal("hlt", cpu:run().reason)
    end)

    it("an in whose handler failed reads all ones", function()
      support.need_kvm()
      local vm, cpu, ram = guest(IN1)
      vm:on_io(0x10, function() error("no") end)
      assert.is_false(pcall(cpu.run, cpu))
      assert.equal("hlt", cpu:run().reason)
      assert.equal(0xff, ram:u8(0x2000))
    end)

    it("a yield from a handler raises out of run(); the guest continues", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      vm:on_io(0x10, function() coroutine.yield(1) end)
      local co = coroutine.create(function() return cpu:run{ unclaimed = "ignore" } end)
      local ok_, msg = coroutine.resume(co)
      assert.is_false(ok_)
      assert.matches("attempt to yield across a C-call boundary", msg, 1, true)
      assert.equal("hlt", cpu:run{ unclaimed = "ignore" }.reason)
    end)

    it("error() without a value still raises (a traceback)", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      vm:on_io(0x10, function() error() end)
      local ok_, msg = pcall(cpu.run, cpu)
      assert.is_false(ok_)
      assert.matches("stack traceback:", msg, 1, true)
    end)

    -- BUG (csrc/vcpu.c traceback): a non-string error object is replaced by
    -- "(error object is a table value)" even when it has __tostring (lua.c's
    -- message handler uses __tostring).
    it("an error object with __tostring is shown with it [core bug: minor]", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      local obj = setmetatable({}, { __tostring = function() return "custom error object" end })
      vm:on_io(0x10, function() error(obj) end)
      local ok_, msg = pcall(cpu.run, cpu)
      assert.is_false(ok_)
      assert.matches("custom error object", tostring(msg), 1, true)
    end)

    it("run() from inside a handler raises", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      local inner
      vm:on_io(0x10, function() inner = err(function() cpu:run() end) end)
      assert.equal("hlt", cpu:run{ unclaimed = "ignore" }.reason)
      assert.equal("run() called from inside a handler (re-entry is not allowed)", inner)
    end)

    it("close() of the VM, memory or vCPU from a handler raises", function()
      support.need_kvm()
      local vm, cpu, ram = guest(OUT2)
      local msgs = {}
      vm:on_io(0x10, function()
        msgs[1] = err(function() vm:close() end)
        msgs[2] = err(function() ram:close() end)
        msgs[3] = err(function() cpu:close() end)
      end)
      assert.equal("hlt", cpu:run{ unclaimed = "ignore" }.reason)
      assert.same({ "cannot close a kvm.vm while a vcpu runs", "cannot close a kvm.memory while a vcpu runs",
                    "cannot close a kvm.vcpu while it runs" }, msgs)
    end)

    -- BUG (csrc/vm.c, mem.c: __close is l_vm_gc / l_mem_gc, which zero
    -- vm->running first): a <close> variable in a handler closes the VM or
    -- unmaps guest RAM under the running guest; afterwards vm->running is -1
    -- and vm:close() says "cannot close a kvm.vm while a vcpu runs" forever.
    it("a <close> VM variable in a handler does not close it mid-run [core bug]", function()
      support.need_kvm()
      local vm, cpu = guest(OUT2)
      vm:on_io(0x10, function() do local v <close> = vm end end)  -- luacheck: ignore 211
      local ok_, msg = pcall(cpu.run, cpu, { unclaimed = "ignore" })
      assert.is_false(ok_)
      assert.matches("cannot close a kvm.vm while a vcpu runs", msg, 1, true)
      assert.not_equal("kvm.vm (closed)", tostring(vm))
    end)

    it("a <close> memory variable in a handler does not unmap RAM mid-run [core bug]", function()
      support.need_kvm()
      local vm, cpu, ram = guest(OUT2)
      vm:on_io(0x10, function() do local r <close> = ram end end)  -- luacheck: ignore 211
      local ok_, msg = pcall(cpu.run, cpu, { unclaimed = "ignore" })
      assert.is_false(ram.closed)
      assert.is_false(ok_)
      assert.matches("cannot close a kvm.memory while a vcpu runs", msg, 1, true)
      vm:close()   -- must still be possible
      assert.equal("kvm.vm (closed)", tostring(vm))
    end)

    -- BUG (csrc/vcpu.c: __close is l_vcpu_gc, which zeroes c->running and
    -- munmaps kvm_run): the run loop then writes the "in" data into the
    -- unmapped page: SIGSEGV. Run in a child process so the suite survives.
    it("a <close> vCPU variable in a handler does not crash the process [core bug: SIGSEGV]", function()
      support.need_kvm()
      local code, out = support.child([[
        local support = require "support"
        local vm, cpu = support.guest("\xe4\x10\xf4")   -- in al, 0x10; hlt
        vm:on_io(0x10, function() do local c <close> = cpu end return 1 end)
        print(pcall(cpu.run, cpu))
        print("survived")
      ]])
      assert.matches("survived", out, 1, true)
      assert.equal(0, code)
      assert.matches("cannot close a kvm.vcpu while it runs", out, 1, true)
    end)
  end)

  describe("MMIO", function()
    it("unclaimed: addr, len, direction, value; reply to a read", function()
      support.need_kvm()
      local vm, cpu, ram = guest(MMIO32, { mode = "protected" })
      local e = cpu:run()
      assert.equal("mmio", e.reason)
      assert.equal(6, e.exit_reason)   -- KVM_EXIT_MMIO
      assert.equal(0x10000000, e.addr)
      assert.equal(1, e.len)
      assert.equal("out", e.direction)
      assert.is_true(e.is_write)
      assert.equal(0x77, e.value)
      assert.equal("\x77", e.data)
      assert.equal("mmio out addr=0x10000000 len=1 value=0x77", tostring(e))
      e = cpu:run()
      assert.equal("mmio", e.reason)
      assert.equal(0x10000004, e.addr)
      assert.equal(4, e.len)
      assert.equal("in", e.direction)
      assert.is_false(e.is_write)
      assert.is_nil(e.value)
      e:reply(0x11223344)
      assert.equal("hlt", cpu:run().reason)
      assert.equal(0x11223344, ram:u32(0x100))
    end)

    it("on_mmio handler: addr, direction, len, value; a read returns the reply", function()
      support.need_kvm()
      local vm, cpu, ram = guest(MMIO32, { mode = "protected" })
      local calls = {}
      vm:on_mmio(0x10000000, 0x1000, function(addr, dir, len, value)
        calls[#calls + 1] = { addr, dir, len, value }
        if dir == "in" then return 0x55667788 end
      end)
      assert.equal("hlt", cpu:run().reason)
      assert.same({ { 0x10000000, "out", 1, 0x77 }, { 0x10000004, "in", 4 } }, calls)
      assert.equal(0x55667788, ram:u32(0x100))
      assert.equal(2, vm:claims()[1].hits)
    end)

    it("a read whose handler returns nil reads all ones", function()
      support.need_kvm()
      local vm, cpu, ram = guest(MMIO32, { mode = "protected" })
      vm:on_mmio(0x10000000, 0x1000, function() end)
      assert.equal("hlt", cpu:run().reason)
      assert.equal(0xffffffff, ram:u32(0x100))
    end)

    it("64-bit: an 8-byte read of a kernel address (negative integer)", function()
      support.need_kvm()
      local vm, cpu, ram = guest(MMIO64, { mode = "long" })
      local calls = {}
      vm:on_mmio(0x10000000, 0x10, function(addr, dir, len, value)
        calls[#calls + 1] = { addr, dir, len, value }
        if dir == "in" then return 0xffffffff81000000 end
      end)
      assert.equal("hlt", cpu:run().reason)
      assert.same({ { 0x10000000, "out", 1, 0x77 }, { 0x10000008, "in", 8 } }, calls)
      assert.equal(0xffffffff81000000, ram:u64(0x100))
    end)

    it("unclaimed = 'ignore': writes dropped, reads all ones, counted", function()
      support.need_kvm()
      local vm, cpu, ram = guest(MMIO32, { mode = "protected" })
      assert.equal("hlt", cpu:run{ unclaimed = "ignore" }.reason)
      assert.equal(0xffffffff, ram:u32(0x100))
      assert.equal(2, vm:stats().unclaimed_mmio)
    end)

    it("kvm.STOP from an MMIO handler", function()
      support.need_kvm()
      local vm, cpu = guest(MMIO32, { mode = "protected" })
      vm:on_mmio(0x10000000, 0x1000, function() return kvm.STOP end)
      local e = cpu:run()
      assert.equal("stopped", e.reason)
      assert.equal(0x10000000, e.addr)
    end)

    it("a write to a readonly region is an MMIO exit", function()
      support.need_kvm()
      local vm, cpu, ram = guest("\xa2\x00\x00\x20\x00"   -- mov [0x200000], al
                               .. "\xf4", { mode = "protected", regs = { rax = 0x33 } })
      local ro = vm:memory{ guest = 0x200000, size = 0x1000, readonly = true }
      local e = cpu:run()
      assert.equal("mmio", e.reason)
      assert.equal(0x200000, e.addr)
      assert.equal(0x33, e.value)
      assert.equal(0, ro:u8(0))
    end)

    it("dirty_pages lists the pages the guest wrote", function()
      support.need_kvm()
      local vm, cpu = guest("\xa2\x00\x10\x20\x00"          -- mov [0x201000], al
                         .. "\xa2\x00\x30\x20\x00"          -- mov [0x203000], al
                         .. "\xf4", { mode = "protected" }) -- hlt
      local d = vm:memory{ guest = 0x200000, size = 0x4000, dirty_log = true }
      assert.equal("hlt", cpu:run().reason)
      assert.same({ 1, 3 }, d:dirty_pages())
      assert.same({}, d:dirty_pages())   -- cleared by reading
    end)
  end)

  describe("debug exit and shutdown", function()
    it("vm:debug_exit(): the guest's out 0x501 returns 'debug_exit' with e.code", function()
      support.need_kvm()
      local vm, cpu = guest(DEBUG_EXIT)
      assert.equal(vm, vm:debug_exit())
      local e = cpu:run()
      assert.equal("debug_exit", e.reason)
      assert.equal(42, e.code)
      assert.equal(0x501, e.port)
      assert.equal("debug_exit out port=0x501 size=1 count=1 value=0x2a code=42", tostring(e))
      assert.equal("hlt", cpu:run().reason)
    end)

    it("another port", function()
      support.need_kvm()
      local vm, cpu = guest("\xb0\x07"    -- mov al, 7
                         .. "\xe6\xf4"    -- out 0xf4, al
                         .. "\xf4")       -- hlt
      vm:debug_exit(0xf4)
      local e = cpu:run()
      assert.equal("debug_exit", e.reason)
      assert.equal(7, e.code)
    end)

    it("a triple fault (IDT limit 0, ud2 in long mode) is 'shutdown'", function()
      support.need_kvm()
      local vm, cpu = guest(UD2, { mode = "long" })
      cpu:set_sregs{ idt = { base = 0, limit = 0 } }
      assert.equal("shutdown", cpu:run{ timeout = 5 }.reason)
    end)
  end)

  describe("the hot loop", function()
    it("100,000 Lua-handled exits allocate nothing per exit", function()
      support.need_kvm()
      local vm, cpu = guest("count.bin")   -- out 0x10, ax with ax = 0, 1, 2, ...
      local n, bad = 0, 0
      vm:on_io(0x10, function(port, dir, size, value)
        if value ~= (n & 0xffff) then bad = bad + 1 end
        n = n + 1
        if n == 100000 then return kvm.STOP end
      end)
      collectgarbage()
      collectgarbage("stop")
      local before = collectgarbage("count")
      local e = cpu:run{ timeout = 30 }
      local grew = collectgarbage("count") - before
      collectgarbage("restart")
      assert.equal("stopped", e.reason)
      assert.equal(100000, n)
      assert.equal(0, bad)
      assert.is_true(grew < 64, ("grew %.1f KiB"):format(grew))
    end)
  end)

  describe("stats", function()
    it("vm:stats() and cpu:stats() count exits, ports and time", function()
      support.need_kvm()
      local vm, cpu = guest(OUTSB)
      vm:on_io(0x10, function() end)
      assert.equal("hlt", cpu:run().reason)
      local s = vm:stats()
      assert.is_true(s.exits.io >= 1)
      assert.equal(1, s.exits.hlt)
      assert.equal(16, s.ports[0x10])
      assert.equal(0, s.unclaimed_io)
      assert.equal(0, s.unclaimed_mmio)
      assert.is_true(s.run_seconds > 0)
      assert.is_true(s.handler_seconds > 0)
      assert.is_true(s.handler_seconds <= s.run_seconds + 1)
      local c = cpu:stats()
      assert.equal(s.exits.io + 1, c.exits)
      assert.equal(s.exits.io, c.by_reason.io)
      assert.equal(1, c.by_reason.hlt)
      assert.is_true(c.run_seconds > 0)
      assert.is_true(c.handler_seconds > 0)
    end)
  end)
end)
