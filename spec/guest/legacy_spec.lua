--- vm:legacy_ports{...} and vm:boot_markers() (csrc/legacy.c), driven by
-- 16-bit real-mode guests: spec/guest/legacy.S (built by `make`) and short
-- byte strings. Guests run at 0x1000 with CS base 0 and store what they
-- read at 0x2000..

local kvm = require "kvm"
local support = require "support"

local guest_bin = support.guest_bin

local function realmode(code, parts)
  return support.guest(code, { size = 1 << 20, setup = function(vm)
    vm:debug_exit(0x501)
    vm:legacy_ports(parts)
  end })
end

--- BCD byte -> the two decimal digits it shows
local function bcd(b) return string.format("%02x", b) end

describe("legacy PC ports #guest", function()
  describe("legacy.S", function()
    local vm, cpu, e, before, after
    setup(support.with_kvm(function()
      vm, cpu = realmode(guest_bin("legacy"))
      before = os.time()
      e = assert(cpu:run{timeout = 20})
      after = os.time()
    end))
    teardown(support.with_kvm(function() vm:close() end))

    it("ends with reason 'reset' after 0xfe to port 0x64", function()
      support.need_kvm()
      assert.are.equal("reset", e.reason)
    end)

    it("reads the host's UTC date from the CMOS clock in BCD", function()
      support.need_kvm()
      local ok = false
      for _, t in ipairs{before, after} do
        local d = os.date("!*t", t)
        if bcd(vm:u8(0x2001)) .. bcd(vm:u8(0x2000)) == string.format("%04d", d.year)
          and bcd(vm:u8(0x2002)) == string.format("%02d", d.month)
          and bcd(vm:u8(0x2003)) == string.format("%02d", d.day) then
          ok = true
        end
      end
      assert.is_true(ok, string.format("CMOS says %s%s-%s-%s", bcd(vm:u8(0x2001)),
        bcd(vm:u8(0x2000)), bcd(vm:u8(0x2002)), bcd(vm:u8(0x2003))))
      local h = tonumber(bcd(vm:u8(0x2004)))
      assert.is_true(h ~= nil and h >= 0 and h <= 23, "hour " .. bcd(vm:u8(0x2004)))
    end)

    it("has status registers A=0x26, B=0x02 (24 h, BCD), D=0x80", function()
      support.need_kvm()
      assert.are.same({0x26, 0x02, 0x80}, {vm:u8(0x2005), vm:u8(0x2006), vm:u8(0x2007)})
    end)

    it("keeps CMOS RAM", function()
      support.need_kvm()
      assert.are.same({0x77, 0x88}, {vm:u8(0x2008), vm:u8(0x2009)})
    end)

    it("reads back the PCI address register; config data is all ones", function()
      support.need_kvm()
      assert.are.equal(0x80000000, vm:u32(0x2010))
      assert.are.equal(0xffffffff, vm:u32(0x2014))
      assert.are.equal(0xffff, vm:u16(0x2018))
      assert.are.equal(0xff, vm:u8(0x201a))
    end)

    it("answers the i8042 self test, command byte and aux loopback", function()
      support.need_kvm()
      local got = {}
      for i = 0, 8 do got[#got + 1] = vm:u8(0x2020 + i) end
      assert.are.same({
        0x14,          -- idle: system flag, not inhibited
        0x15, 0x55,    -- self test: output full, 0x55
        0x14,
        0x47,          -- command byte
        0x45,          -- written and read back
        0x00,          -- keyboard interface test passed
        0x35, 0x5a,    -- aux loopback: output full from aux, the byte
      }, got)
    end)

    it("keeps port 0x61 bits 1-0 and toggles bit 4 on each read", function()
      support.need_kvm()
      local a, b = vm:u8(0x2030), vm:u8(0x2031)
      assert.are.equal(0x03, a & 0x0f)
      assert.are.equal(0x03, b & 0x0f)
      assert.are.equal(0x10, (a ~ b) & 0x10)
    end)

    it("records POST codes as boot markers", function()
      support.need_kvm()
      local m, dropped = vm:boot_markers()
      assert.are.equal(0, dropped)
      assert.are.equal(3, #m)
      assert.are.same({0x11, 0x22, 0x33}, {m[1].code, m[2].code, m[3].code})
      for i = 1, 3 do
        assert.is_true(m[i].seconds >= 0 and m[i].seconds < 60)
        assert.are.equal("integer", math.type(m[i].ns))
        if i > 1 then assert.is_true(m[i].ns >= m[i - 1].ns) end
      end
    end)
  end)

  describe("resets", function()
    local cases = {
      {"0xcf9 bit 2", "\xba\xf9\x0c" ..   -- mov dx, 0xcf9
                      "\xb0\x06" ..       -- mov al, 6
                      "\xee" ..           -- out dx, al
                      "\xf4"},            -- hlt
      {"i8042 output port bit 0", "\xb0\xd1" ..  -- mov al, 0xd1
                                  "\xe6\x64" ..  -- out 0x64, al
                                  "\xb0\x00" ..  -- mov al, 0
                                  "\xe6\x60" ..  -- out 0x60, al
                                  "\xf4"},       -- hlt
      {"i8042 pulse 0xfe", "\xb0\xfe" ..         -- mov al, 0xfe
                           "\xe6\x64" ..         -- out 0x64, al
                           "\xf4"},              -- hlt
    }
    for _, case in ipairs(cases) do
      it("comes from " .. case[1], function()
        support.need_kvm()
        local vm <close>, cpu = realmode(case[2])
        local e = assert(cpu:run{timeout = 10})
        assert.are.equal("reset", e.reason)
      end)
    end

    it("does not come from 0xff to port 0x64 (no pulse)", function()
      support.need_kvm()
      local vm <close>, cpu = realmode("\xb0\xff" ..     -- mov al, 0xff
                                       "\xe6\x64" ..     -- out 0x64, al
                                       "\xba\x01\x05" .. -- mov dx, 0x501
                                       "\xee" ..         -- out dx, al
                                       "\xf4")           -- hlt
      local e = assert(cpu:run{timeout = 10})
      assert.are.equal("debug_exit", e.reason)
    end)
  end)

  it("keeps 256 boot markers and counts the rest", function()
    support.need_kvm()
    local vm <close>, cpu = realmode("\xb9\x2c\x01" ..   -- mov cx, 300
                                     "\x88\xc8" ..       -- l: mov al, cl
                                     "\xe6\x80" ..       -- out 0x80, al
                                     "\xe2\xfa" ..       -- loop l
                                     "\xba\x01\x05" ..   -- mov dx, 0x501
                                     "\xee" ..           -- out dx, al
                                     "\xf4")             -- hlt
    local e = assert(cpu:run{timeout = 10})
    assert.are.equal("debug_exit", e.reason)
    local m, dropped = vm:boot_markers()
    assert.are.equal(256, #m)
    assert.are.equal(44, dropped)
    assert.are.equal(300 & 0xff, m[1].code)
    assert.are.equal((300 - 255) & 0xff, m[256].code)
  end)

  it("leaves out the parts set to false", function()
    support.need_kvm()
    local vm <close>, cpu = realmode(
      "\x66\xb8\x00\x00\x00\x80" ..   -- mov eax, 0x80000000
      "\xba\xf8\x0c" ..               -- mov dx, 0xcf8
      "\x66\xef" ..                   -- out dx, eax
      "\xf4",                         -- hlt
      {pci = false, post = false})
    local kinds = {}
    for _, c in ipairs(vm:claims()) do kinds[c.first] = c.kind end
    assert.are.same({[0x60] = "legacy", [0x61] = "legacy", [0x64] = "legacy",
                     [0x70] = "legacy", [0x501] = "debug_exit"}, kinds)
    local e = assert(cpu:run{timeout = 10})
    assert.are.equal("io", e.reason)
    assert.are.equal(0xcf8, e.port)
  end)

  describe("vm:legacy_ports arguments", function()
    local vm
    before_each(support.with_kvm(function() vm = assert(kvm.vm()) end))
    after_each(support.with_kvm(function() vm:close() end))

    it("returns the VM", function()
      support.need_kvm()
      assert.are.equal(vm, vm:legacy_ports())
    end)

    it("rejects an unknown part", function()
      support.need_kvm()
      assert.has_error(function() vm:legacy_ports{rtc = true} end,
        "vm:legacy_ports: unknown part 'rtc' (i8042, pci, cmos, post, port61)")
      assert.are.equal(0, #vm:claims())
    end)

    it("rejects a non-boolean", function()
      support.need_kvm()
      assert.has_error(function() vm:legacy_ports{pci = 1} end,
        "vm:legacy_ports: 'pci' must be a boolean, got number")
    end)

    it("rejects a second call", function()
      support.need_kvm()
      vm:legacy_ports()
      assert.has_error(function() vm:legacy_ports() end,
        "vm:legacy_ports: the legacy ports are already set up")
    end)

    it("claims nothing when one port is taken", function()
      support.need_kvm()
      vm:debug_exit(0x80)
      assert.has_error(function() vm:legacy_ports() end,
        "vm:legacy_ports: port 0x80 already claimed by 0x80-0x80 (post)")
      assert.are.equal(1, #vm:claims())
      vm:legacy_ports{post = false}
      assert.are.equal(6, #vm:claims())
    end)

    it("reads boot markers of a closed VM", function()
      support.need_kvm()
      vm:close()
      local m, dropped = vm:boot_markers()
      assert.are.same({}, m)
      assert.are.equal(0, dropped)
    end)
  end)
end)
