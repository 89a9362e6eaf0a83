--- vm:serial{...}: the 16550A UART (csrc/serial.c) driven by tiny 16-bit
-- real-mode guests. The guests (spec/guest/serial_*.S, built by `make`) are
-- loaded at guest-physical 0x1000 and run with CS base 0, IP 0x1000; they
-- store what they read in guest memory at 0x2000.. and leave through the
-- debug-exit port 0x501.

local kvm = require "kvm"
local support = require "support"

local guest_bin = support.guest_bin

--- A VM with 1 MiB of RAM, port 0x501 as debug exit, code at 0x1000.
-- setup(vm) runs before the vCPU is made (vm:serial goes there).
local function realmode(code, setup)
  return support.guest(code, { size = 1 << 20, setup = function(vm)
    vm:debug_exit(0x501)
    if setup then setup(vm) end
  end })
end

--- Run until the guest's debug exit; fail with the exit otherwise.
local function run_to_exit(cpu, opts)
  local e = assert(cpu:run(opts or {timeout = 20}))
  assert.are.equal("debug_exit", e.reason, tostring(e))
  assert.are.equal(0, e.code)
  return e
end

--- Collect what an output function receives.
local function sink()
  local chunks = {}
  return chunks, function(bytes) chunks[#chunks + 1] = bytes end
end

describe("16550A UART #guest", function()
  describe("registers", function()
    -- what serial_regs.S stores at 0x2000 + i, in order
    local expected = {
      {0xa5, "scratch 0xa5"}, {0x5a, "scratch 0x5a"},
      {0x0f, "IER 0x0f"}, {0x0f, "IER keeps bits 3-0 of 0xff"},
      {0x34, "DLL"}, {0x12, "DLM"}, {0x0f, "IER after DLAB off"}, {0x03, "LCR"},
      {0x01, "IIR, FIFO off"}, {0xc1, "IIR after FCR=0x07"}, {0x60, "LSR THRE|TEMT"},
      {0x92, "MSR loopback RTS|OUT2 (+DDSR)"}, {0x90, "MSR deltas cleared"},
      {0xf2, "MSR loopback, all four"},
      {0x61, "LSR DR after loopback THR write"}, {0x41, "RBR"}, {0x60, "LSR drained"},
      {0xc4, "IIR received data"}, {0x42, "RBR"}, {0xc1, "IIR nothing pending"},
      {0xc2, "IIR THR empty"}, {0xc1, "IIR THRI cleared by reading IIR"},
      {0xc2, "IIR THRI after THR write"}, {0x43, "RBR"},
      {0x63, "LSR overrun"}, {0x61, "LSR OE cleared by reading"}, {16, "FIFO depth"},
      {0xcc, "IIR character timeout below the trigger level"}, {0x44, "RBR"},
      {0x01, "IIR FIFO off again"},
      {0xb4, "MSR out of loopback (+TERI)"}, {0xb0, "MSR connected modem"},
    }

    local vm, cpu
    setup(support.with_kvm(function()
      vm, cpu = realmode(guest_bin("serial_regs"), function(v) v:serial{output = false} end)
      run_to_exit(cpu)
    end))
    teardown(support.with_kvm(function() vm:close() end))

    for i, case in ipairs(expected) do
      it(string.format("0x%04x: %s = 0x%02x", 0x2000 + i - 1, case[2], case[1]), function()
        support.need_kvm()
        assert.are.equal(case[1], vm:u8(0x2000 + i - 1))
      end)
    end

    it("keeps the first 16 of 20 looped-back bytes, in order", function()
      support.need_kvm()
      assert.are.equal("abcdefghijklmnop", vm:read(0x2100, 16))
    end)

    it("outputs nothing in loopback", function()
      support.need_kvm()
      assert.are.equal(0, vm:stats().serial_tx)
    end)
  end)

  it("is what Linux's 8250 autoconfig() calls a 16550A, without THRE/TXEN bugs", function()
    support.need_kvm()
    local vm <close>, cpu = realmode(guest_bin("serial_autoconfig"),
                                     function(v) v:serial{output = false} end)
    run_to_exit(cpu)
    local r = {}
    for i = 0, 0x10 do r[i] = vm:u8(0x2000 + i) end
    -- the decisions of drivers/tty/serial/8250/8250_port.c, in order
    local function linux_type()
      if r[0] & 0x0f ~= 0 or r[1] & 0x0f ~= 0x0f then return "none (IER test)" end
      if r[2] & 0xf0 ~= 0x90 then return "none (LOOP test)" end
      local fifo = r[3] >> 6
      if fifo ~= 3 then return ({[0] = "8250/16450", "unknown", "16550"})[fifo] end
      if r[4] == 0 then return "16650 (EFR with DLAB)" end
      if r[5] == 0 then return "16650V2 (EFR with LCR 0xbf)" end
      if (r[7] ~ r[6]) & 0x10 == 0 and (r[8] ~ r[6]) & 0x10 ~= 0 then return "NS16550A" end
      if r[9] >> 5 == 6 and r[10] >> 5 == 7 then return "16750" end
      if r[11] & 0x40 ~= 0 then return "XScale" end
      if r[12] == 64 then return "U6_16550A" end
      return "16550A"
    end
    assert.are.equal("16550A", linux_type())
    assert.are.equal(16, r[12])
    assert.are.equal(0, r[13] & 1, "THRE test: first IIR")
    assert.are.equal(0, r[14] & 1, "THRE test: THRI not re-asserted (UART_BUG_THRE)")
    assert.is_false(r[15] & 0x40 ~= 0 and r[16] & 1 ~= 0, "UART_BUG_TXEN")
  end)

  describe("output", function()
    local msg = "hello from the guest\nno newline at the end"

    it("goes to a function, a line at a time, the rest when run() returns", function()
      support.need_kvm()
      local chunks, fn = sink()
      local vm <close>, cpu = realmode(guest_bin("serial_out"), function(v) v:serial{output = fn} end)
      run_to_exit(cpu)
      assert.are.equal("hello from the guest\n", chunks[1])
      assert.are.equal(msg, table.concat(chunks))
      assert.are.equal(#msg, vm:stats().serial_tx)
    end)

    it("goes to a FILE", function()
      support.need_kvm()
      local f = io.tmpfile()
      local vm <close>, cpu = realmode(guest_bin("serial_out"), function(v) v:serial{output = f} end)
      run_to_exit(cpu)
      f:seek("set")
      assert.are.equal(msg, f:read("a"))
      f:close()
    end)

    it("is discarded with output = false", function()
      support.need_kvm()
      local vm <close>, cpu = realmode(guest_bin("serial_out"), function(v) v:serial{output = false} end)
      run_to_exit(cpu)
      assert.are.equal(#msg, vm:stats().serial_tx)
    end)

    it("raises the output function's error out of run()", function()
      support.need_kvm()
      local vm <close>, cpu = realmode(guest_bin("serial_out"), function(v)
        v:serial{output = function() error("sink failed") end}
      end)
      local ok, err = pcall(cpu.run, cpu)
      assert.is_false(ok)
      assert.matches("sink failed", tostring(err))
    end)

    it("raises when the output FILE was closed", function()
      support.need_kvm()
      local f = io.tmpfile()
      local vm <close>, cpu = realmode(guest_bin("serial_out"), function(v) v:serial{output = f} end)
      f:close()
      local ok, err = pcall(cpu.run, cpu)
      assert.is_false(ok)
      assert.matches("closed file", tostring(err))
    end)

    it("delivers a 100000-byte flood in order, in chunks of at most 4096", function()
      support.need_kvm()
      -- an LCG so that any reordering or loss shows
      local t, x = {}, 12345
      for i = 1, 100000 do
        x = (x * 1103515245 + 12345) & 0x7fffffff
        t[i] = string.char((x >> 16) & 0xff)
      end
      local data = table.concat(t)
      local chunks, fn = sink()
      local vm <close>, cpu = realmode(guest_bin("serial_flood"), function(v) v:serial{output = fn} end)
      vm:write(0x10000, data)
      run_to_exit(cpu)
      local biggest = 0
      for _, c in ipairs(chunks) do biggest = math.max(biggest, #c) end
      assert.is_true(biggest <= 4096, "chunk of " .. biggest)
      assert.are.equal(#data, #table.concat(chunks))
      assert.is_true(table.concat(chunks) == data, "flood corrupted")
      assert.are.equal(100000, vm:stats().serial_tx)
    end)
  end)

  describe("input", function()
    it("is read from a FILE and echoed back", function()
      support.need_kvm()
      local f = io.tmpfile()
      f:write("ping\npong\n\4")
      f:seek("set")
      local chunks, fn = sink()
      local vm <close>, cpu = realmode(guest_bin("serial_echo"), function(v)
        v:serial{output = fn, input = f}
      end)
      run_to_exit(cpu)
      assert.are.equal("ping\npong\n", table.concat(chunks))
      assert.are.equal(11, vm:stats().serial_rx)
      f:close()
    end)

    it("is read from a pipe, 20000 bytes in order", function()
      support.need_kvm()
      local t = {}
      for i = 1, 2000 do t[i] = string.format("%09d\n", i) end
      local data = table.concat(t)
      local path = os.tmpname()
      local w = assert(io.open(path, "wb"))
      w:write(data, "\4")
      w:close()
      local p = assert(io.popen("cat " .. path, "r"))
      local chunks, fn = sink()
      local vm <close>, cpu = realmode(guest_bin("serial_echo"), function(v)
        v:serial{output = fn, input = p}
      end)
      run_to_exit(cpu)
      p:close()
      os.remove(path)
      assert.is_true(table.concat(chunks) == data, "echo differs")
      assert.are.equal(#data + 1, vm:stats().serial_rx)
    end)
  end)

  it("raises IRQ 4 through the in-kernel PIC only with MCR.OUT2 set", function()
    support.need_kvm()
    local vm <close>, cpu = realmode(guest_bin("serial_irq"), function(v)
      assert(v:irqchip())
      v:serial{output = false}
    end)
    run_to_exit(cpu, {timeout = 10})
    assert.are.equal(2, vm:u8(0x2000), "interrupt taken in phase " .. vm:u8(0x2000))
    assert.are.equal(0x02, vm:u8(0x2001))   -- THRI
    assert.are.equal(0x01, vm:u8(0x2002))   -- acknowledged by reading IIR
  end)

  describe("vm:serial arguments", function()
    local vm
    before_each(support.with_kvm(function() vm = assert(kvm.vm()) end))
    after_each(support.with_kvm(function() vm:close() end))

    it("returns the VM and claims 8 ports", function()
      support.need_kvm()
      assert.are.equal(vm, vm:serial{port = 0x2f8, irq = 3, output = false})
      local found
      for _, c in ipairs(vm:claims()) do
        if c.kind == "serial" then found = c end
      end
      assert.are.equal(0x2f8, found.first)
      assert.are.equal(0x2ff, found.last)
    end)

    local bad = {
      {{port = 0xfff9}, "vm:serial: 'port' must be an integer in 0..0xfff8, got 65529"},
      {{port = -1}, "'port' must be an integer"},
      {{port = 1.5}, "'port' must be an integer in 0..0xfff8, got 1.5"},
      {{irq = 24}, "vm:serial: 'irq' must be an integer in 0..23, got 24"},
      {{output = 42}, "'output' must be a file, a function or false, got number"},
      {{output = true}, "'output' must be a file, a function or false"},
      {{input = "stdin"}, "'input' must be a file, got string"},
      {{prot = 1}, "unknown option 'prot'"},
    }
    for _, case in ipairs(bad) do
      it("rejects " .. case[2], function()
        support.need_kvm()
        local ok, err = pcall(vm.serial, vm, case[1])
        assert.is_false(ok)
        assert.matches(case[2], err, 1, true)
        assert.are.equal(0, #vm:claims())
      end)
    end

    it("rejects a closed input file", function()
      support.need_kvm()
      local f = io.tmpfile()
      f:close()
      assert.has_error(function() vm:serial{input = f} end, "vm:serial: 'input' is a closed file")
    end)

    it("takes a second UART on other ports, each with its own output", function()
      support.need_kvm()
      vm:close()
      -- mov dx, 0x2f8; mov al, 'B'; out dx, al; mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt
      local cpu
      local got = { [1] = {}, [2] = {} }
      vm, cpu = support.guest("\xba\xf8\x02\xb0B\xee\xba\xf8\x03\xb0A\xee\xf4", { setup = function(v)
        v:serial{ output = function(b) got[1][#got[1] + 1] = b end }
        v:serial{ port = 0x2f8, irq = 3, output = function(b) got[2][#got[2] + 1] = b end }
      end })
      assert.equal("hlt", cpu:run().reason)
      assert.equal("A", table.concat(got[1]))
      assert.equal("B", table.concat(got[2]))
      assert.equal(2, vm:stats().serial_tx)
      assert.has_error(function() vm:serial{port = 0x2f8} end, "port 0x2f8 already claimed by 0x2f8-0x2ff")
    end)

    it("rejects ports already claimed", function()
      support.need_kvm()
      vm:debug_exit(0x3fc)
      local ok, err = pcall(vm.serial, vm, {output = false})
      assert.is_false(ok)
      assert.matches("already claimed", err)
      assert.are.equal(1, #vm:claims())
    end)
  end)
end)
