--- The device bus (csrc/bus.c) and the devices that are not the UART or the
-- legacy ports: vm:power (ACPI PM1a, csrc/power.c), vm:debugcon (port 0xe9,
-- csrc/debugcon.c), and how devices share the port space. 16-bit real-mode
-- guests as byte strings, at 0x1000.
local support = require "support"

-- mov dx, imm16
local function dx(p) return string.pack("<BI2", 0xba, p) end
-- mov ax, imm16
local function ax(v) return string.pack("<BI2", 0xb8, v) end
-- mov al, imm8
local function al(v) return string.pack("<BB", 0xb0, v) end
local OUT_AX, OUT_AL, IN_AX, IN_AL, INC_DX, HLT = "\xef", "\xee", "\xed", "\xec", "\x42", "\xf4"
-- mov [addr], ax / al
local function store_ax(a) return string.pack("<BI2", 0xa3, a) end
local function store_al(a) return string.pack("<BI2", 0xa2, a) end

local function guest(code, setup)
  return support.guest(code, { setup = setup })
end

describe("devices on the bus #guest", function()
  describe("vm:power (ACPI PM1a)", function()
    local function power(code, opts)
      return guest(code, function(vm) vm:power(opts) end)
    end

    it("ends run() with 'poweroff' on S5 (SLP_TYP 5, SLP_EN) written to PM1a_CNT", function()
      support.need_kvm()
      local vm, cpu = power(dx(0x604) .. ax(0x3401) .. OUT_AX .. HLT)
      local e = cpu:run{ timeout = 5 }
      assert.equal("poweroff", e.reason)
      assert.equal(0x604, e.port)
      assert.equal(1, vm:stats().sleep_requests)
      vm:close()
    end)

    it("takes the control register a byte at a time, SLP_EN in the high byte last", function()
      support.need_kvm()
      local vm, cpu = power(dx(0x604) .. al(0x01) .. OUT_AL .. INC_DX .. al(0x34) .. OUT_AL .. HLT)
      assert.equal("poweroff", cpu:run{ timeout = 5 }.reason)
      vm:close()
    end)

    it("counts and ignores other sleep states: the guest goes on", function()
      support.need_kvm()
      local vm, cpu = power(dx(0x604) .. ax(0x2c01) .. OUT_AX .. HLT)   -- S3
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      assert.equal(1, vm:stats().sleep_requests)
      vm:close()
    end)

    it("reads SCI_EN set and SLP_EN clear; PM1_EN reads back; PM1_STS is write-one-to-clear", function()
      support.need_kvm()
      local code = dx(0x604) .. ax(0x0800) .. OUT_AX .. IN_AX .. store_ax(0x2000)   -- SLP_TYP 2, no SLP_EN
        .. dx(0x602) .. ax(0x0121) .. OUT_AX .. IN_AX .. store_ax(0x2002)          -- PM1_EN
        .. dx(0x600) .. ax(0xffff) .. OUT_AX .. IN_AX .. store_ax(0x2004)          -- PM1_STS
        .. dx(0x608) .. IN_AX .. store_ax(0x2006) .. HLT                           -- nobody's
      local vm, cpu, ram = power(code)
      assert.equal("hlt", cpu:run{ timeout = 5, unclaimed = "ignore" }.reason)
      assert.equal(0x0801, ram:u16(0x2000))
      assert.equal(0x0121, ram:u16(0x2002))
      assert.equal(0, ram:u16(0x2004))
      assert.equal(0xffff, ram:u16(0x2006))
      vm:close()
    end)

    it("puts the blocks where it is told, and S5 where the DSDT says", function()
      support.need_kvm()
      local vm, cpu = power(dx(0xb004) .. ax(0x2001 | (7 << 10)) .. OUT_AX .. HLT, { evt = 0xb000, cnt = 0xb004, s5 = 7 })
      assert.equal("poweroff", cpu:run{ timeout = 5 }.reason)
      local kinds = {}
      for _, c in ipairs(vm:claims()) do kinds[("0x%x-0x%x"):format(c.first, c.last)] = c.kind end
      assert.same({ ["0xb000-0xb003"] = "power", ["0xb004-0xb005"] = "power" }, kinds)
      vm:close()
    end)

    for _, case in ipairs{
      { { s5 = 8 }, "vm:power: 's5' must be an integer in 0..7" },
      { { evt = 0xfffd }, "vm:power: 'evt' must be an integer in 0..65532" },
      { { evt = 0x600, cnt = 0x602 }, "vm:power: the event and control blocks overlap" },
      { { cnt = 0x3f8 }, "vm:power: port 0x3f8 already claimed by 0x3f8-0x3ff" },
    } do
      it("refuses " .. case[2] .. " and claims nothing", function()
        support.need_kvm()
        local vm = guest(HLT, function(v) v:serial{ output = false } end)
        local n = #vm:claims()
        local ok, err = pcall(vm.power, vm, case[1])
        assert.is_false(ok)
        assert.matches(case[2], err, 1, true)
        assert.equal(n, #vm:claims())
        vm:close()
      end)
    end
  end)

  describe("vm:debugcon (port 0xe9)", function()
    it("outputs what the guest writes, a line at a time, and reads back 0xe9", function()
      support.need_kvm()
      local got = {}
      local code = dx(0xe9) .. al(0x68) .. OUT_AL .. al(0x69) .. OUT_AL .. al(10) .. OUT_AL
        .. al(0x21) .. OUT_AL .. IN_AL .. store_al(0x2000) .. HLT
      local vm, cpu, ram = guest(code, function(v)
        v:debugcon{ output = function(b) got[#got + 1] = b end }
      end)
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      assert.same({ "hi\n", "!" }, got)       -- the rest when run() returns
      assert.equal(0xe9, ram:u8(0x2000))
      assert.equal(4, vm:stats().debugcon_tx)
      vm:close()
    end)

    it("takes a string write (rep outsb) whole, on another port", function()
      support.need_kvm()
      local got = {}
      -- mov si, 0x1100; mov cx, 12; mov dx, 0x402; rep outsb; hlt
      local code = "\xbe\x00\x11\xb9\x0c\x00" .. dx(0x402) .. "\xf3\x6e" .. HLT
      local vm, cpu, ram = guest(code, function(v)
        v:debugcon{ port = 0x402, output = function(b) got[#got + 1] = b end }
      end)
      ram:write(0x1100, "hello, world")
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      assert.equal("hello, world", table.concat(got))
      vm:close()
    end)

    it("loses nothing when a wide write fills its buffer, and sums two consoles' counters", function()
      support.need_kvm()
      local got = {}
      -- out 0xe9, al; then 1024 x out dx, eax (4 bytes each): 4097 bytes
      -- mov cx, 1024; l: out dx, eax; loop l; hlt
      local code = dx(0xe9) .. al(0x41) .. OUT_AL .. "\x66\xb8AAAA" .. "\xb9\x00\x04" .. "\x66\xef\xe2\xfc"
        .. dx(0xea) .. OUT_AL .. HLT
      local vm, cpu = guest(code, function(v)
        v:debugcon{ output = function(b) got[#got + 1] = b end }
        v:debugcon{ port = 0xea, output = false }
      end)
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      assert.equal(4097, #table.concat(got))
      assert.equal(4098, vm:stats().debugcon_tx)
      vm:close()
    end)

    it("refuses a taken port or a bad output, claiming nothing", function()
      support.need_kvm()
      local vm = guest(HLT, function(v) v:debug_exit(0xe9) end)
      assert.matches("port 0xe9 already claimed", select(2, pcall(vm.debugcon, vm, { output = false })), 1, true)
      assert.matches("'output' must be a file, a function or false",
        select(2, pcall(vm.debugcon, vm, { port = 0x400, output = 1 })), 1, true)
      assert.equal(1, #vm:claims())
      vm:close()
    end)
  end)

  describe("output functions called by run()", function()
    -- mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt
    local CODE = dx(0x3f8) .. al(0x41) .. OUT_AL .. HLT
    it("cannot close the vCPU or run it again: run() raises, the process lives", function()
      support.need_kvm()
      for _, what in ipairs{ "close", "run" } do
        local vm, cpu
        vm, cpu = guest(CODE, function(v)
          v:serial{ output = function() if what == "close" then cpu:close() else cpu:run() end end }
        end)
        local ok, err = pcall(cpu.run, cpu, { timeout = 5 })
        assert.is_false(ok)
        assert.matches(what == "close" and "cannot close a kvm.vcpu while it runs" or "re-entry is not allowed", err, 1, true)
        assert.matches("^kvm.vcpu 0 %(fd %d+%)$", tostring(cpu))   -- open, not running
        assert.is_true(pcall(vm.close, vm))                          -- nothing runs now
        vm:close()
      end
    end)

    it("may remove another device: every device's output still goes out", function()
      support.need_kvm()
      local got = {}
      local code = dx(0xe9) .. al(0x58) .. OUT_AL .. dx(0x3f8) .. al(0x41) .. OUT_AL .. HLT
      local vm, cpu = guest(code, function(v)
        v:on_io(0x500, function() end)
        v:serial{ output = function(b) got[#got + 1] = "uart:" .. b; v:on_io(0x500, nil) end }
        v:debugcon{ output = function(b) got[#got + 1] = "con:" .. b end }
      end)
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      table.sort(got)
      assert.same({ "con:X", "uart:A" }, got)
      vm:close()
    end)
  end)

  describe("the bus", function()
    it("lists every device's ranges with its kind", function()
      support.need_kvm()
      local vm = guest(HLT, function(v)
        v:serial{ output = false }
        v:legacy_ports()
        v:power()
        v:debugcon{ output = false }
        v:debug_exit()
        v:on_io(0x10, function() end)
        v:on_mmio(0xd0000000, 0x1000, function() end)
      end)
      local kinds = {}
      for _, c in ipairs(vm:claims()) do kinds[c.kind] = (kinds[c.kind] or 0) + 1 end
      assert.same({ serial = 1, legacy = 6, power = 2, debugcon = 1, debug_exit = 1, lua = 2 }, kinds)
      vm:close()
    end)

    it("will not remove a C device's range through on_io(range, nil)", function()
      support.need_kvm()
      local vm = guest(HLT, function(v) v:serial{ output = false } end)
      local ok, err = pcall(vm.on_io, vm, { 0x3f8, 0x3ff }, nil)
      assert.is_false(ok)
      assert.matches("port range 0x3f8-0x3ff belongs to the serial device, not a Lua handler", err, 1, true)
      vm:close()
    end)

    it("frees a removed Lua handler: its range can be claimed again, and nothing is kept", function()
      support.need_kvm()
      local vm = guest(HLT)
      local collected = false
      do
        local fn = setmetatable({}, { __call = function() end, __gc = function() collected = true end })
        vm:on_io(0x10, function() return fn() end)
      end
      vm:on_io(0x10, nil)
      collectgarbage(); collectgarbage()
      assert.is_true(collected)
      vm:debug_exit(0x10)
      assert.equal("debug_exit", vm:claims()[1].kind)
      vm:close()
    end)
  end)
end)
