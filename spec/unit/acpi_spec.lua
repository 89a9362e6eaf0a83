-- kvm.acpi: layout, checksums, every field Linux reads, bad options, and iasl
-- (Debian's acpica-tools) disassembling and recompiling each table.
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local acpi = require "kvm.acpi"
local support = require "support"

local unpack = string.unpack

-- The values string.unpack reads, without the position it returns last.
local function U(f, s, pos)
  local t = { unpack(f, s, pos) }
  t[#t] = nil
  return t
end

local function named(built, name)
  for _, b in ipairs(built.blobs) do
    if b.name == name then return b end
  end
  error("no blob " .. name)
end

local function at(built, addr)
  for _, b in ipairs(built.blobs) do
    if b.addr == addr then return b end
  end
end

-- The MADT's subtables as {type, bytes}.
local function subtables(madt)
  local out, pos = {}, 45
  while pos <= #madt do
    local ty, len = unpack("<I1I1", madt, pos)
    assert(len >= 2, "zero-length MADT subtable")
    out[#out + 1] = { ty, madt:sub(pos, pos + len - 1) }
    pos = pos + len
  end
  assert.are.equal(#madt + 1, pos)
  return out
end

local S5_AML = "\x08_S5_\x12\x07\x04\x0a\x05\x00\x00\x00"

describe("kvm.acpi", function()
  it("lays out the tables for one CPU", function()
    local b = acpi.build()
    local got = {}
    for i, blob in ipairs(b.blobs) do got[i] = { blob.name, blob.sig, blob.addr, #blob.bytes } end
    assert.are.same({
      { "RSDP", "RSD PTR ", 0xe0000, 36 },
      { "XSDT", "XSDT", 0xe0030, 52 },
      { "FADT", "FACP", 0xe0070, 276 },
      { "DSDT", "DSDT", 0xe0190, 49 },
      { "MADT", "APIC", 0xe01d0, 90 },
    }, got)
    assert.are.equal(0xe0000, b.rsdp)
    assert.are.equal(0xe0000, b.base)
    assert.are.equal(0x1d0 + 90, b.size)
    assert.are.same({ RSDP = 0xe0000, XSDT = 0xe0030, FADT = 0xe0070, DSDT = 0xe0190, MADT = 0xe01d0 }, b.addr)
  end)

  for _, cpus in ipairs{ 1, 2, 8, 255 } do
    describe(("with %d CPU%s"):format(cpus, cpus > 1 and "s" or ""), function()
      local b = acpi.build{ base = 0x9f000, cpus = cpus }

      it("aligns every table to 16 bytes inside [base, base+size) without overlap", function()
        local last_end = b.base
        for _, blob in ipairs(b.blobs) do
          assert.are.equal(0, blob.addr % 16, blob.name)
          assert.is_true(blob.addr >= last_end, blob.name)
          last_end = blob.addr + #blob.bytes
        end
        assert.are.equal(b.base + b.size, last_end)
        assert.are.equal(b.base, b.rsdp)
      end)

      it("has right checksums and lengths", function()
        for _, blob in ipairs(b.blobs) do
          assert.are.equal(0, acpi.sum(blob.bytes), blob.name)
          if blob.name ~= "RSDP" then
            assert.are.equal(blob.sig, blob.bytes:sub(1, 4))
            assert.are.equal(#blob.bytes, unpack("<I4", blob.bytes, 5), blob.name)
            assert.are.equal("LUAKVM", blob.bytes:sub(11, 16))
          end
        end
        local r = named(b, "RSDP").bytes
        assert.are.equal(0, acpi.sum(r:sub(1, 20)))
        assert.are.equal(0, acpi.sum(r))
      end)

      it("points the RSDP at the XSDT, with no RSDT", function()
        local r = named(b, "RSDP").bytes
        local sig, _, oem, rev, rsdt, len, xsdt = unpack("<c8I1c6I1I4I4I8", r)
        assert.are.same({ "RSD PTR ", "LUAKVM", 2, 0, 36, b.addr.XSDT }, { sig, oem, rev, rsdt, len, xsdt })
        assert.are.equal("\0\0\0", r:sub(34, 36))
      end)

      it("lists the FADT and the MADT in the XSDT", function()
        local x = named(b, "XSDT").bytes
        assert.are.equal(1, x:byte(9))
        assert.are.equal(36 + 16, #x)
        local e1, e2 = unpack("<I8I8", x, 37)
        assert.are.equal("FACP", at(b, e1).sig)
        assert.are.equal("APIC", at(b, e2).sig)
      end)

      it("points the FADT's DSDT and X_DSDT at the DSDT", function()
        local f = named(b, "FADT").bytes
        assert.are.equal(b.addr.DSDT, unpack("<I4", f, 41))
        assert.are.equal(b.addr.DSDT, unpack("<I8", f, 141))
        assert.are.equal("DSDT", at(b, b.addr.DSDT).sig)
      end)

      it("has one enabled local APIC per CPU, the IOAPIC, the overrides and LINT1 NMI", function()
        local m = named(b, "MADT").bytes
        assert.are.equal(5, m:byte(9))
        assert.are.same({ 0xfee00000, 1 }, U("<I4I4", m, 37))
        local subs = subtables(m)
        assert.are.equal(cpus + 4, #subs)
        for i = 1, cpus do
          assert.are.same({ 0, 8, i - 1, i - 1, 1 }, U("<I1I1I1I1I4", subs[i][2]))
        end
        assert.are.same({ 1, 12, cpus, 0, 0xfec00000, 0 }, U("<I1I1I1I1I4I4", subs[cpus + 1][2]))
        assert.are.same({ 2, 10, 0, 0, 2, 0 }, U("<I1I1I1I1I4I2", subs[cpus + 2][2]))
        assert.are.same({ 2, 10, 0, 9, 9, 0xd }, U("<I1I1I1I1I4I2", subs[cpus + 3][2]))
        assert.are.same({ 4, 6, 0xff, 0, 1 }, U("<I1I1I1I2I1", subs[cpus + 4][2]))
      end)
    end)
  end

  it("describes PM1a, the SCI, the reset register and the flags in the FADT", function()
    local f = named(acpi.build(), "FADT").bytes
    assert.are.equal(276, #f)
    assert.are.equal(6, f:byte(9))
    assert.are.equal(5, f:byte(132))                               -- minor version: ACPI 6.5
    assert.are.equal(0, unpack("<I4", f, 37))                       -- FIRMWARE_CTRL: no FACS
    assert.are.same({ 0, 0, 9 }, U("<I1I1I2", f, 45))               -- reserved, PM profile, SCI_INT
    assert.are.equal(0, unpack("<I4", f, 49))                       -- SMI_CMD: ACPI already on
    assert.are.same({ 0x600, 0, 0x604, 0, 0, 0, 0, 0 }, U("<I4I4I4I4I4I4I4I4", f, 57))
    assert.are.same({ 4, 2, 0, 0, 0, 0 }, U("<I1I1I1I1I1I1", f, 89))
    assert.are.same({ 0x0fff, 0x0fff }, U("<I2I2", f, 97))
    assert.are.equal(0x32, f:byte(109))                             -- CENTURY
    assert.are.equal(0x0007, unpack("<I2", f, 110))                 -- legacy, 8042, no VGA
    local F = acpi.FADT_F
    assert.are.equal(F.WBINVD | F.PROC_C1 | F.PWR_BUTTON | F.SLP_BUTTON | F.FIX_RTC | F.RESET_REG_SUP,
      unpack("<I4", f, 113))
    assert.are.equal(0x475, unpack("<I4", f, 113))
    assert.are.same({ 1, 8, 0, 1, 0xcf9, 6 }, U("<I1I1I1I1I8I1", f, 117))
    assert.are.same({ 1, 32, 0, 2, 0x600 }, U("<I1I1I1I1I8", f, 149))  -- X_PM1a_EVT_BLK
    assert.are.same({ 1, 16, 0, 2, 0x604 }, U("<I1I1I1I1I8", f, 173))  -- X_PM1a_CNT_BLK
    assert.are.equal(string.rep("\0", 12), f:sub(161, 172))          -- X_PM1b_EVT_BLK
    assert.are.equal(string.rep("\0", 12 * 7 + 8), f:sub(185, 276))  -- the rest
  end)

  it("follows i8042, cmos_rtc, power_button, reset, the PM1a ports and the SCI", function()
    local b = acpi.build{ i8042 = false, cmos_rtc = false, power_button = true, sci_irq = 11,
      pm1a_evt = 0xb000, pm1a_cnt = 0xb004, reset = { port = 0x64, value = 0xfe } }
    local f = named(b, "FADT").bytes
    assert.are.equal(0x0025, unpack("<I2", f, 110))                 -- legacy, no VGA, no CMOS RTC
    assert.are.equal(0, f:byte(109))
    assert.are.equal(0x475 & ~acpi.FADT_F.PWR_BUTTON, unpack("<I4", f, 113))
    assert.are.equal(11, unpack("<I2", f, 47))
    assert.are.same({ 0xb000, 0xb004 }, { (unpack("<I4", f, 57)), (unpack("<I4", f, 65)) })
    assert.are.same({ 0x64, 0xfe }, U("<I8I1", f, 121))
    assert.are.same({ 0xb000, 0xb004, 11, { port = 0x64, value = 0xfe } },
      { b.pm1a_evt, b.pm1a_cnt, b.sci_irq, b.reset })
    local subs = subtables(named(b, "MADT").bytes)
    assert.are.same({ 2, 10, 0, 11, 11, 0xd }, U("<I1I1I1I1I4I2", subs[4][2]))
  end)

  it("places the IOAPIC and the local APIC where asked; irq0_gsi = 0 drops the IRQ0 override", function()
    local b = acpi.build{ cpus = 2, lapic = 0xfee10000, irq0_gsi = 0,
      ioapic = { id = 7, addr = 0xfec10000, gsi_base = 24 } }
    local m = named(b, "MADT").bytes
    assert.are.equal(0xfee10000, unpack("<I4", m, 37))
    local subs = subtables(m)
    assert.are.equal(5, #subs)
    assert.are.same({ 1, 12, 7, 0, 0xfec10000, 24 }, U("<I1I1I1I1I4I4", subs[3][2]))
    assert.are.equal(9, subs[4][2]:byte(4))
  end)

  it("writes _S5 and powers off with PM1a_CNT = 0x3401", function()
    local b = acpi.build()
    local d = named(b, "DSDT").bytes
    assert.are.equal(2, d:byte(9))
    assert.are.equal(S5_AML, d:sub(37))
    assert.are.equal(0x3401, b.pm1a_cnt_poweroff)
    assert.are.equal(5, b.s5_slp_typ)
    -- SLP_TYPa is the package's first element (BytePrefix 0x0a, then the value)
    assert.are.equal(d:byte(37 + 9), (b.pm1a_cnt_poweroff >> acpi.SLP_TYP_SHIFT) & 7)
    assert.are.equal(acpi.SLP_EN | acpi.SCI_EN, b.pm1a_cnt_poweroff & ~(7 << acpi.SLP_TYP_SHIFT))
  end)

  it("appends dsdt_extra to the DSDT", function()
    local extra = "\x08ABCD\x0a\x2a"  -- Name (ABCD, 0x2A)
    local b = acpi.build{ dsdt_extra = extra }
    local d = named(b, "DSDT").bytes
    assert.are.equal(S5_AML .. extra, d:sub(37))
    assert.are.equal(36 + #S5_AML + #extra, unpack("<I4", d, 5))
    assert.are.equal(0, acpi.sum(d))
  end)

  it("describes virtio-mmio devices in the DSDT: LNRO0005, Memory32Fixed, a level interrupt", function()
    local b = acpi.build{ virtio = { { base = 0xfeb00000, irq = 16 }, { base = 0xfeb00200, irq = 17, size = 0x1000 } } }
    local d = named(b, "DSDT").bytes
    assert.are.equal(0, acpi.sum(d))
    local body = d:sub(37 + #S5_AML)
    -- Scope (\_SB) { Device (VR00) {...} Device (VR01) {...} }
    assert.are.equal(0x10, body:byte(1))                            -- ScopeOp, a 2-byte PkgLength
    assert.are.equal("_SB_\x5b\x82", body:sub(4, 9))
    local dev0 = "VR00\x08_HID\x0dLNRO0005\x00\x08_UID\x00\x08_CCA\x01\x08_CRS"
      .. "\x11\x1a\x0a\x17"                                    -- Buffer (23)
      .. "\x86\x09\x00\x01" .. string.pack("<I4I4", 0xfeb00000, 0x200)
      .. "\x89\x06\x00\x01\x01" .. string.pack("<I4", 16)       -- consumer, level, active high
      .. "\x79\x00"
    assert.are.equal("\x5b\x82" .. acpi.pkglength(#dev0) .. dev0, acpi.aml_virtio(0, { base = 0xfeb00000, irq = 16 }))
    assert.truthy(body:find(dev0, 1, true))
    assert.truthy(body:find("VR01\x08_HID\x0dLNRO0005\x00\x08_UID\x01", 1, true))
    assert.truthy(body:find(string.pack("<I4I4", 0xfeb00200, 0x1000), 1, true))
    -- none: no scope, the DSDT as before
    assert.are.equal(S5_AML, named(acpi.build{ virtio = {} }, "DSDT").bytes:sub(37))
  end)

  it("takes the OEM ids", function()
    local b = acpi.build{ oem_id = "ACME", oem_table_id = "VM1", oem_revision = 7 }
    for _, blob in ipairs(b.blobs) do
      if blob.name == "RSDP" then
        assert.are.equal("ACME  ", blob.bytes:sub(10, 15))
      else
        assert.are.same({ "ACME  ", "VM1     ", 7 }, U("<c6c8I4", blob.bytes, 11))
      end
    end
    assert.are.equal("LKVMFACP", named(acpi.build(), "FADT").bytes:sub(17, 24))
  end)

  it("encodes AML PkgLengths", function()
    local cases = {
      { 0, "\x01" }, { 62, "\x3f" }, { 63, "\x41\x04" }, { 0xffd, "\x4f\xff" },
      { 0xffe, "\x81\x00\x01" }, { 0xffffc, "\x8f\xff\xff" }, { 0xffffd, "\xc1\x00\x00\x01" },
      { 0xffffffb, "\xcf\xff\xff\xff" },
    }
    for _, c in ipairs(cases) do assert.are.equal(c[2], acpi.pkglength(c[1]), c[1]) end
    assert.has_error(function() acpi.pkglength(0xffffffc) end,
      "acpi.pkglength: 268435452 bytes do not fit a PkgLength (< 2^28)")
    assert.has_error(function() acpi.pkglength(-1) end, "acpi.pkglength: expected a non-negative integer, got -1")
  end)

  it("lets a table function be replaced", function()
    local saved = acpi.dsdt
    finally(function() acpi.dsdt = saved end)
    acpi.dsdt = function(o) return acpi.table("DSDT", 2, acpi.aml_s5() .. "\x08ONE_\x01", o) end
    local b = acpi.build()
    assert.are.equal(S5_AML .. "\x08ONE_\x01", named(b, "DSDT").bytes:sub(37))
    acpi.dsdt = function(o) return o.addr.DSDT == 0 and "x" or "xy" end
    assert.has_error(function() acpi.build() end,
      "acpi.build: acpi.dsdt changed size with its addresses (1 then 2 bytes)")
    acpi.dsdt = function() return 1 end
    assert.has_error(function() acpi.build() end, "acpi.build: acpi.dsdt returned number, not a string")
  end)

  it("writes through a function or a write method", function()
    local b = acpi.build{ cpus = 2 }
    local seen = {}
    acpi.write(function(addr, bytes) seen[#seen + 1] = { addr, bytes } end, b)
    assert.are.equal(5, #seen)
    for i, blob in ipairs(b.blobs) do assert.are.same({ blob.addr, blob.bytes }, seen[i]) end
    local mem = { log = {} }
    function mem:write(addr, bytes) self.log[#self.log + 1] = addr; assert(#bytes > 0) end
    acpi.write(mem, b)
    assert.are.same({ b.addr.RSDP, b.addr.XSDT, b.addr.FADT, b.addr.DSDT, b.addr.MADT }, mem.log)
    assert.has_error(function() acpi.write(42, b) end,
      "acpi.write: target must be a function(addr, bytes) or have a write method, got number")
    assert.has_error(function() acpi.write(mem, {}) end, "acpi.write: built must be the table acpi.build returned")
  end)

  local bad = {
    { "a string", "x", "acpi.build: expected an options table, got string" },
    { "an unknown option", { cpu = 2 }, "acpi.build: unknown option 'cpu'" },
    { "cpus 0", { cpus = 0 }, "acpi.build: opts.cpus = 0 out of range (1..255)" },
    { "cpus 256", { cpus = 256 }, "acpi.build: opts.cpus = 256 out of range (1..255)" },
    { "cpus 1.5", { cpus = 1.5 }, "acpi.build: opts.cpus must be an integer, got float" },
    { "cpus '2'", { cpus = "2" }, "acpi.build: opts.cpus must be an integer, got string" },
    { "a float base", { base = 0xe0000 + 0.0 }, "acpi.build: opts.base must be an integer, got float" },
    { "a negative base", { base = -16 }, "acpi.build: opts.base = 0xfffffffffffffff0 out of range (0x0..0xffffffff)" },
    { "base at 4 GiB", { base = 1 << 32 }, "acpi.build: opts.base = 0x100000000 out of range (0x0..0xffffffff)" },
    { "an unaligned base", { base = 0xe0008 }, "acpi.build: opts.base = 0xe0008 is not 16-byte aligned" },
    { "tables crossing 4 GiB", { base = 0xfffffe00 },
      "acpi.build: tables at opts.base = 0xfffffe00 (0x22a bytes) cross 4 GiB" },
    { "a lapic above 4 GiB", { lapic = 0x1fee00000 },
      "acpi.build: opts.lapic = 0x1fee00000 out of range (0x0..0xffffffff)" },
    { "sci_irq 16", { sci_irq = 16 }, "acpi.build: opts.sci_irq = 16 out of range (0..15)" },
    { "irq0_gsi false", { irq0_gsi = false }, "acpi.build: opts.irq0_gsi must be an integer, got boolean" },
    { "pm1a_evt past 0xffff", { pm1a_evt = 0xfffd },
      "acpi.build: opts.pm1a_evt = 0xfffd out of range (0x0..0xfffc)" },
    { "pm1a_cnt past 0xffff", { pm1a_cnt = 0xffff },
      "acpi.build: opts.pm1a_cnt = 0xffff out of range (0x0..0xfffe)" },
    { "pm1a_cnt inside pm1a_evt", { pm1a_cnt = 0x602 },
      "acpi.build: opts.pm1a_cnt = 0x602 overlaps the PM1a event block at 0x600..0x603" },
    { "pm1a_cnt just below pm1a_evt", { pm1a_cnt = 0x5ff },
      "acpi.build: opts.pm1a_cnt = 0x5ff overlaps the PM1a event block at 0x600..0x603" },
    { "ioapic not a table", { ioapic = 1 }, "acpi.build: opts.ioapic must be a table, got number" },
    { "ioapic.id 256", { ioapic = { id = 256 } }, "acpi.build: opts.ioapic.id = 256 out of range (0..255)" },
    { "an ioapic.addr of -1", { ioapic = { addr = -1 } },
      "acpi.build: opts.ioapic.addr = 0xffffffffffffffff out of range (0x0..0xffffffff)" },
    { "ioapic unknown field", { ioapic = { base = 0 } }, "acpi.build: opts.ioapic: unknown field 'base'" },
    { "reset.port", { reset = { port = 0x10000 } },
      "acpi.build: opts.reset.port = 0x10000 out of range (0x0..0xffff)" },
    { "reset.value", { reset = { value = 256 } }, "acpi.build: opts.reset.value = 256 out of range (0..255)" },
    { "an oem_id too long", { oem_id = "LUAKVM2" },
      'acpi.build: opts.oem_id must be at most 6 printable ASCII characters, got "LUAKVM2"' },
    { "an oem_table_id with a NUL", { oem_table_id = "A\0" },
      'acpi.build: opts.oem_table_id must be at most 8 printable ASCII characters, got "A\\0"' },
    { "i8042 not a boolean", { i8042 = 1 }, "acpi.build: opts.i8042 must be a boolean, got number" },
    { "rtc_century 0x80", { rtc_century = 0x80 }, "acpi.build: opts.rtc_century = 128 out of range (0..127)" },
    { "virtio not a list", { virtio = 1 }, "acpi.build: opts.virtio must be a list, got number" },
    { "a virtio device without irq", { virtio = { { base = 0x1000 } } },
      "acpi.build: opts.virtio[1].irq must be an integer, got nil" },
    { "a virtio device past 4 GiB", { virtio = { { base = 0xffffff00, irq = 5 } } },
      "acpi.build: opts.virtio[1]: 0x200 bytes at 0xffffff00 cross 4 GiB" },
    { "a virtio device's unknown field", { virtio = { { base = 0, irq = 5, gsi = 1 } } },
      "acpi.build: opts.virtio[1]: unknown field 'gsi'" },
    { "dsdt_extra not a string", { dsdt_extra = {} },
      "acpi.build: opts.dsdt_extra must be a string of AML bytes, got table" },
  }
  for _, c in ipairs(bad) do
    it("refuses " .. c[1], function()
      assert.has_error(function() acpi.build(c[2]) end, c[3])
    end)
  end

  it("fits tables that end at 4 GiB", function()
    -- one CPU and no IRQ0 override: 0x220 bytes
    local b = acpi.build{ base = (1 << 32) - 0x220, irq0_gsi = 0 }
    assert.are.equal(0x220, b.size)
    assert.are.equal(1 << 32, b.base + b.size)
    assert.has_error(function() acpi.build{ base = (1 << 32) - 0x220, irq0_gsi = 0, cpus = 2 } end,
      "acpi.build: tables at opts.base = 0xfffffde0 (0x228 bytes) cross 4 GiB")
  end)
end)

-- ---- iasl ----

local sh = support.sh

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function spit(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- Lines of iasl's output or listing that report a problem.
local function problems(text)
  local bad = {}
  for line in text:gmatch("[^\n]+") do
    local l = line:lower()
    if (l:find("error") or l:find("warning") or l:find("remark") or l:find("invalid") or l:find("%*%*%*%*"))
      and not l:find("^compilation successful%. 0 errors, 0 warnings, 0 remarks") then
      bad[#bad + 1] = line
    end
  end
  return table.concat(bad, "\n")
end

-- The RSDP cannot be loaded from a file by `iasl -d` ("Loading an RSDP is not
-- supported"): write its fields in iasl's data-table language (the format of
-- `iasl -T RSDP`) instead, compile that, and compare: iasl computes both
-- checksums itself.
local function rsdp_source(r)
  local sig, sum, oem, rev, rsdt, len, xsdt, xsum = unpack("<c8I1c6I1I4I4I8I1", r)
  return table.concat({
    ('[0008] Signature : "%s"'):format(sig),
    ("[0001] Checksum : %02X"):format(sum),
    ('[0006] Oem ID : "%s"'):format(oem),
    ("[0001] Revision : %02X"):format(rev),
    ("[0004] RSDT Address : %08X"):format(rsdt),
    ("[0004] Length : %08X"):format(len),
    ("[0008] XSDT Address : %016X"):format(xsdt),
    ("[0001] Extended Checksum : %02X"):format(xsum),
    "[0003] Reserved : 000000",
  }, "\n") .. "\n"
end

-- Everything but the checksum and the compiler id and revision, which iasl
-- sets to its own when it recompiles.
local function comparable(t) return t:sub(1, 9) .. t:sub(11, 28) .. t:sub(37) end

describe("kvm.acpi under iasl", function()
  local iasl = sh("command -v iasl"):match("^(%S+)")
  local dir

  before_each(function()
    assert(iasl, "iasl not found: install acpica-tools (apt-get install -y acpica-tools) to check the tables")
    dir = sh("mktemp -d"):match("^(%S+)")
    assert(dir and dir:match("^/"), "mktemp -d failed")
  end)

  after_each(function()
    if dir then os.execute("rm -rf '" .. dir .. "'") end
    dir = nil
  end)

  -- Disassemble each table with `iasl -d`, recompile the listing, and compare.
  local function check(built)
    for _, blob in ipairs(built.blobs) do
      local name = blob.name:lower()
      local base = dir .. "/" .. name
      if blob.name == "RSDP" then
        spit(base .. ".asl", rsdp_source(blob.bytes))
        local out, code = sh(("cd '%s' && %s -p rsdp_rt rsdp.asl"):format(dir, iasl))
        assert.are.equal(0, code, out)
        assert.are.equal("", problems(out), out)
        assert.are.equal(blob.bytes, slurp(dir .. "/rsdp_rt.aml"))
      else
        spit(base .. ".dat", blob.bytes)
        local out, code = sh(("cd '%s' && %s -d %s.dat"):format(dir, iasl, name))
        assert.are.equal(0, code, out)
        assert.are.equal("", problems(out), blob.name .. ":\n" .. out)
        local dsl = slurp(base .. ".dsl")
        assert.are.equal("", problems(dsl), blob.name .. ":\n" .. dsl)
        out, code = sh(("cd '%s' && %s -p %s_rt %s.dsl"):format(dir, iasl, name, name))
        assert.are.equal(0, code, out)
        assert.are.equal("", problems(out), blob.name .. ":\n" .. out)
        assert.are.equal(comparable(blob.bytes), comparable(slurp(base .. "_rt.aml")), blob.name)
      end
    end
  end

  for _, cpus in ipairs{ 1, 2, 8 } do
    it(("disassembles and recompiles every table with %d CPU(s), without errors or warnings"):format(cpus),
    function()
      check(acpi.build{ cpus = cpus })
    end)
  end

  it("disassembles the DSDT with virtio-mmio devices, without errors or warnings", function()
    local virtio = {}
    for i = 1, 8 do virtio[i] = { base = 0xfeb00000 + (i - 1) * 0x200, irq = 15 + i } end
    check(acpi.build{ virtio = virtio })
    local dsl = slurp(dir .. "/dsdt.dsl")
    assert.truthy(dsl:find('Name (_HID, "LNRO0005")', 1, true))
    assert.truthy(dsl:find("Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )", 1, true))
    assert.truthy(dsl:find("0xFEB00E00,", 1, true))
    assert.truthy(dsl:find("Device (VR07)", 1, true))
  end)

  it("disassembles the DSDT with 2- and 3-byte PkgLengths in dsdt_extra, and other options", function()
    -- Name (BUFA, Buffer (0x200) {...}) and Name (BUFB, Buffer (0x1800) {...})
    local function buffer(name, n)
      local body = "\x0b" .. string.pack("<I2", n) .. string.rep("\x5a", n)   -- WordPrefix size, data
      return "\x08" .. name .. "\x11" .. acpi.pkglength(#body) .. body
    end
    local extra = buffer("BUFA", 0x200) .. buffer("BUFB", 0x1800)
    assert.are.equal(0x80, buffer("BUFB", 0x1800):byte(7) & 0xc0)    -- 3-byte PkgLength
    check(acpi.build{ cpus = 4, i8042 = false, cmos_rtc = false, power_button = true, irq0_gsi = 0,
      sci_irq = 11, pm1a_evt = 0xb000, pm1a_cnt = 0xb004, dsdt_extra = extra })
  end)
end)
