--- ACPI tables describing the machine to the guest: RSDP, XSDT, FADT, DSDT and
-- MADT, as packed bytes a VMM copies into guest memory.
--
-- A kernel built without MP-table parsing (Debian's cloud kernel) finds its
-- CPUs and IOAPIC only in the MADT, and powers off through the FADT's PM1a
-- control block and the DSDT's `\_S5` object. Each table is a function of the
-- normalised options (`acpi.rsdp`, `acpi.xsdt`, `acpi.fadt`, `acpi.dsdt`,
-- `acpi.madt`); replace one to change what the guest sees. `acpi.table` adds
-- the standard 36-byte header and its checksum to a body.
--
-- The tables follow ACPI 6.5: RSDP revision 2, XSDT 1, FADT 6 (276 bytes, with
-- both the 32-bit fields and their 64-bit `X_` generic addresses), MADT 5, DSDT 2
-- (64-bit AML integers). There is no FACS: SMI_CMD is 0, so the OS finds ACPI
-- already enabled and takes no global lock (the DSDT uses none); the VMM's PM1a
-- control register must read back SCI_EN (bit 0) as 1.
--
-- What the VMM sees: 16-bit reads and writes of PM1a status at `pm1a_evt` and
-- enable at `pm1a_evt + 2`, 16-bit accesses to PM1a control at `pm1a_cnt`, an
-- 8-bit write of `reset.value` to `reset.port` for a reboot, and for a poweroff
-- (S5) the PM1a control value `built.pm1a_cnt_poweroff`, 0x3401: SLP_EN (bit 13)
-- | SLP_TYP 5 (bits 10-12) | SCI_EN (bit 0, read back and written again), after
-- a first write of 0x1401 without SLP_EN. Test `(v & 0x3c00) == 0x3400` rather
-- than the exact value: the OS preserves bits it read back.
-- @usage
-- local acpi = require "kvm.acpi"
-- local built = acpi.build{ base = 0xe0000, cpus = 2 }
-- acpi.write(vm, built)              -- or acpi.write(function(addr, bytes) ... end, built)
-- bp.acpi_rsdp_addr = built.rsdp     -- boot_params; the kernel also scans 0xe0000-0xfffff
-- map:reserve(built.base, built.size) -- or add it as e820.ACPI
-- @module kvm.acpi

local acpi = {}

local fmt = string.format
local pack = string.pack

--- The order tables are laid out from `base`: `{name, signature}`. The RSDP
-- comes first so a guest scanning 0xe0000-0xfffff on 16-byte boundaries finds it.
-- @table LAYOUT
acpi.LAYOUT = {
  { "RSDP", "RSD PTR " },
  { "XSDT", "XSDT" },
  { "FADT", "FACP" },
  { "DSDT", "DSDT" },
  { "MADT", "APIC" },
}

--- Default `base` of the tables: 0xe0000, in the BIOS area a kernel scans for
-- the RSDP (kvm.linux's `DEFAULT_LAYOUT.acpi`).
acpi.BASE = 0xe0000
--- Alignment of every table, in bytes.
acpi.ALIGN = 16
--- Size of the standard table header.
acpi.HEADER_SIZE = 36
--- Size of a revision 6 FADT.
acpi.FADT_SIZE = 276

--- FADT `Flags` bits (ACPI 6.5 table 5.10).
-- @table FADT_F
acpi.FADT_F = {
  WBINVD = 1 << 0,              -- WBINVD flushes all caches (required)
  WBINVD_FLUSH = 1 << 1,
  PROC_C1 = 1 << 2,             -- C1 (HLT) works on every CPU
  P_LVL2_UP = 1 << 3,
  PWR_BUTTON = 1 << 4,          -- set: no fixed-feature power button
  SLP_BUTTON = 1 << 5,          -- set: no fixed-feature sleep button
  FIX_RTC = 1 << 6,             -- set: RTC wake status is not in PM1 status
  RTC_S4 = 1 << 7,
  TMR_VAL_EXT = 1 << 8,
  DCK_CAP = 1 << 9,
  RESET_REG_SUP = 1 << 10,      -- RESET_REG / RESET_VALUE are valid
  SEALED_CASE = 1 << 11,
  HEADLESS = 1 << 12,
  CPU_SW_SLP = 1 << 13,
  PCI_EXP_WAK = 1 << 14,
  USE_PLATFORM_CLOCK = 1 << 15,
  S4_RTC_STS_VALID = 1 << 16,
  REMOTE_POWER_ON_CAPABLE = 1 << 17,
  FORCE_APIC_CLUSTER_MODEL = 1 << 18,
  FORCE_APIC_PHYSICAL_DESTINATION_MODE = 1 << 19,
  HW_REDUCED_ACPI = 1 << 20,
  LOW_POWER_S0_IDLE_CAPABLE = 1 << 21,
}

--- FADT `IAPC_BOOT_ARCH` bits.
-- @table IAPC
acpi.IAPC = {
  LEGACY_DEVICES = 1 << 0,      -- ISA/LPC devices ACPI does not enumerate (COM1, PIT)
  I8042 = 1 << 1,               -- an 8042 keyboard controller
  VGA_NOT_PRESENT = 1 << 2,
  MSI_NOT_SUPPORTED = 1 << 3,
  PCIE_ASPM_CONTROLS = 1 << 4,
  CMOS_RTC_NOT_PRESENT = 1 << 5,
}

--- PM1 control register bits.
acpi.SCI_EN = 1 << 0
acpi.SLP_TYP_SHIFT = 10
acpi.SLP_EN = 1 << 13
--- SLP_TYP of S5 (soft off) in this DSDT's `\_S5` package.
acpi.S5_SLP_TYP = 5

--- Generic Address Structure address spaces.
acpi.SYSTEM_MEMORY = 0
acpi.SYSTEM_IO = 1

local U32 = 1 << 32

local function hex(v) return fmt("0x%x", v) end

local function kind(v) return math.type(v) or type(v) end

local function align(v, a) return (v + a - 1) & ~(a - 1) end

--- Sum of the bytes of a string, mod 256 (0 for a table with a right checksum).
-- @tparam string s
-- @treturn integer 0..255
function acpi.sum(s)
  local n = 0
  for i = 1, #s do n = n + s:byte(i) end
  return n & 0xff
end

-- Store the checksum byte at `pos` (1-based) of the first `len` bytes of `s`
-- (whose byte at pos is 0) so that they sum to 0.
local function set_checksum(s, pos, len)
  local c = (-acpi.sum(s:sub(1, len))) & 0xff
  return s:sub(1, pos - 1) .. string.char(c) .. s:sub(pos + 1)
end

-- A fixed-width ASCII field, space padded.
local function id(s, width) return s .. string.rep(" ", width - #s) end

--- A Generic Address Structure (12 bytes).
-- @tparam integer space `acpi.SYSTEM_IO`, `acpi.SYSTEM_MEMORY`, ...
-- @tparam integer bits register width in bits
-- @tparam integer access 0 undefined, 1 byte, 2 word, 3 dword, 4 qword
-- @tparam integer addr
-- @treturn string
function acpi.gas(space, bits, access, addr)
  return pack("<I1I1I1I1I8", space, bits, 0, access, addr)
end

local NO_GAS = acpi.gas(0, 0, 0, 0)

--- A whole table: the standard 36-byte header before `body`, with the length
-- and checksum filled in.
-- @tparam string sig 4-character signature ("FACP", "APIC", ...)
-- @tparam integer revision
-- @tparam string body the bytes after the header
-- @tparam table o normalised options (`oem_id`, `oem_table_id`, `oem_revision`)
-- @treturn string
function acpi.table(sig, revision, body, o)
  local hdr = pack("<c4I4I1I1c6c8I4c4I4", sig, acpi.HEADER_SIZE + #body, revision, 0,
    id(o.oem_id, 6), id(o.oem_table_id or ("LKVM" .. sig), 8), o.oem_revision,
    "LKVM", 1)
  local t = hdr .. body
  return set_checksum(t, 10, #t)
end

--- The RSDP, revision 2 (36 bytes): the XSDT's address, no RSDT, both checksums.
-- @tparam table o normalised options; `o.addr.XSDT` is the XSDT's address
-- @treturn string
function acpi.rsdp(o)
  local t = pack("<c8I1c6I1I4I4I8I1xxx", "RSD PTR ", 0, id(o.oem_id, 6), 2, 0, 36,
    o.addr.XSDT, 0)
  t = set_checksum(t, 9, 20)
  return set_checksum(t, 33, 36)
end

--- The XSDT: the FADT and the MADT (the DSDT is reached through the FADT).
-- @tparam table o normalised options with `o.addr`
-- @treturn string
function acpi.xsdt(o)
  return acpi.table("XSDT", 1, pack("<I8I8", o.addr.FADT, o.addr.MADT), o)
end

--- The FADT `Flags` for these options: WBINVD, PROC_C1, SLP_BUTTON, FIX_RTC,
-- RESET_REG_SUP, and PWR_BUTTON unless `o.power_button`.
-- @tparam table o normalised options
-- @treturn integer
function acpi.fadt_flags(o)
  local F = acpi.FADT_F
  local flags = F.WBINVD | F.PROC_C1 | F.SLP_BUTTON | F.FIX_RTC | F.RESET_REG_SUP
  if not o.power_button then flags = flags | F.PWR_BUTTON end
  return flags
end

--- The FADT `IAPC_BOOT_ARCH` for these options: legacy devices, no VGA, the
-- 8042 if `o.i8042`, "no CMOS RTC" unless `o.cmos_rtc`.
-- @tparam table o normalised options
-- @treturn integer
function acpi.iapc_boot_arch(o)
  local I = acpi.IAPC
  local v = I.LEGACY_DEVICES | I.VGA_NOT_PRESENT
  if o.i8042 then v = v | I.I8042 end
  if not o.cmos_rtc then v = v | I.CMOS_RTC_NOT_PRESENT end
  return v
end

--- The FADT, revision 6 (276 bytes): SCI, PM1a event and control blocks (32-bit
-- fields and `X_` generic addresses), no PM timer, GPE, C2/C3 or SMI port, the
-- reset register, the DSDT in both `DSDT` and `X_DSDT`.
-- @tparam table o normalised options with `o.addr`
-- @treturn string
function acpi.fadt(o)
  local dsdt = o.addr.DSDT
  local body = table.concat{
    pack("<I4I4", 0, dsdt),                      -- FIRMWARE_CTRL (no FACS), DSDT
    pack("<I1I1I2", 0, 0, o.sci_irq),            -- reserved, PM profile unspecified, SCI_INT
    pack("<I4I1I1I1I1", 0, 0, 0, 0, 0),          -- SMI_CMD, ACPI_ENABLE/DISABLE, S4BIOS, PSTATE_CNT
    pack("<I4I4I4I4I4I4I4I4", o.pm1a_evt, 0, o.pm1a_cnt, 0, 0, 0, 0, 0),
    pack("<I1I1I1I1I1I1I1I1", 4, 2, 0, 0, 0, 0, 0, 0), -- PM1_EVT_LEN, PM1_CNT_LEN, the rest absent
    pack("<I2I2I2I2", 0x0fff, 0x0fff, 0, 0),     -- P_LVL2/3_LAT > 100/1000: no C2, C3
    pack("<I1I1I1I1I1", 0, 0, 0, 0, o.rtc_century), -- DUTY_*, DAY/MON_ALRM, CENTURY
    pack("<I2I1I4", acpi.iapc_boot_arch(o), 0, acpi.fadt_flags(o)),
    acpi.gas(acpi.SYSTEM_IO, 8, 1, o.reset.port),  -- RESET_REG
    pack("<I1I2I1", o.reset.value, 0, 5),        -- RESET_VALUE, ARM_BOOT_ARCH, minor version 5
    pack("<I8I8", 0, dsdt),                      -- X_FIRMWARE_CTRL, X_DSDT
    acpi.gas(acpi.SYSTEM_IO, 32, 2, o.pm1a_evt), -- X_PM1a_EVT_BLK: status, enable (16 bits each)
    NO_GAS,                                      -- X_PM1b_EVT_BLK
    acpi.gas(acpi.SYSTEM_IO, 16, 2, o.pm1a_cnt), -- X_PM1a_CNT_BLK
    NO_GAS, NO_GAS, NO_GAS, NO_GAS, NO_GAS,      -- X_PM1b_CNT, X_PM2_CNT, X_PM_TMR, X_GPE0, X_GPE1
    NO_GAS, NO_GAS,                              -- SLEEP_CONTROL/STATUS_REG (hardware-reduced only)
    pack("<I8", 0),                              -- hypervisor vendor identity
  }
  return acpi.table("FACP", 6, body, o)
end

--- An AML PkgLength for `n` bytes of content after it (the encoding counts
-- itself): 1 to 4 bytes.
-- @tparam integer n
-- @treturn string
-- @raise when the package would be 2^28 bytes or more
function acpi.pkglength(n)
  if math.type(n) ~= "integer" or n < 0 then
    error("acpi.pkglength: expected a non-negative integer, got " .. tostring(n), 2)
  end
  if n + 1 < 0x40 then return string.char(n + 1) end
  for extra = 1, 3 do
    local len = n + 1 + extra
    if len < 1 << (4 + 8 * extra) then
      local t = { (extra << 6) | (len & 0x0f) }
      for i = 1, extra do t[i + 1] = (len >> (4 + 8 * (i - 1))) & 0xff end
      return string.char(table.unpack(t))
    end
  end
  error(fmt("acpi.pkglength: %d bytes do not fit a PkgLength (< 2^28)", n), 2)
end

--- AML for `Name (_S5, Package (4) {5, Zero, Zero, Zero})`: SLP_TYP 5 for
-- PM1a and PM1b, two reserved elements.
-- @treturn string
function acpi.aml_s5()
  local elements = "\x04"                        -- NumElements
    .. "\x0a" .. string.char(acpi.S5_SLP_TYP)    -- BytePrefix 5: SLP_TYPa
    .. "\x00\x00\x00"                            -- ZeroOp x3: SLP_TYPb, reserved
  return "\x08_S5_"                              -- NameOp, NameSeg
    .. "\x12" .. acpi.pkglength(#elements) .. elements -- PackageOp PkgLength
end

--- AML for a name string's integer: ZeroOp, OneOp or the shortest prefixed constant.
-- @tparam integer v 0..2^32-1
-- @treturn string
function acpi.aml_integer(v)
  if v == 0 then return "\x00" end
  if v == 1 then return "\x01" end
  if v < 0x100 then return pack("<BI1", 0x0a, v) end
  if v < 0x10000 then return pack("<BI2", 0x0b, v) end
  return pack("<BI4", 0x0c, v)
end

--- A resource template for one MMIO range and one interrupt: `Memory32Fixed
-- (ReadWrite, base, size)`, `Interrupt (ResourceConsumer, Level, ActiveHigh,
-- Exclusive) {gsi}`, the end tag; as a Buffer object.
-- @tparam integer base
-- @tparam integer size
-- @tparam integer gsi
-- @treturn string AML `Buffer (n) {...}`
function acpi.aml_crs_mmio_irq(base, size, gsi)
  local res = pack("<BI2BI4I4", 0x86, 9, 1, base, size)   -- Memory32Fixed, read-write
    .. pack("<BI2BBI4", 0x89, 6, 0x01, 1, gsi)            -- Extended Interrupt: consumer, level, high, exclusive
    .. "\x79\x00"                                         -- End Tag (checksum 0: none)
  local body = acpi.aml_integer(#res) .. res
  return "\x11" .. acpi.pkglength(#body) .. body          -- BufferOp
end

--- AML for one virtio-mmio device, as QEMU's microvm describes them:
-- `Device (VRnn) { Name (_HID, "LNRO0005") Name (_UID, n) Name (_CCA, One)
-- Name (_CRS, ResourceTemplate () { Memory32Fixed ... Interrupt ... }) }`.
-- @tparam integer n its number (0..255): the name VR00.. and _UID
-- @tparam table dev `{base =, size = (default 0x200), irq =}`
-- @treturn string
function acpi.aml_virtio(n, dev)
  local body = fmt("VR%02X", n)
    .. "\x08_HID\x0dLNRO0005\x00"
    .. "\x08_UID" .. acpi.aml_integer(n)
    .. "\x08_CCA\x01"
    .. "\x08_CRS" .. acpi.aml_crs_mmio_irq(dev.base, dev.size or 0x200, dev.irq)
  return "\x5b\x82" .. acpi.pkglength(#body) .. body      -- DeviceOp
end

--- The DSDT, revision 2: `\_S5`, then `Scope (\_SB) { ... }` with a device
-- for each of `o.virtio` (none: no scope), then `o.dsdt_extra`.
-- @tparam table o normalised options
-- @treturn string
function acpi.dsdt(o)
  local sb = ""
  if #o.virtio > 0 then
    local devs = {}
    for i, d in ipairs(o.virtio) do devs[i] = acpi.aml_virtio(i - 1, d) end
    local body = "_SB_" .. table.concat(devs)              -- \_SB, as iasl writes it
    sb = "\x10" .. acpi.pkglength(#body) .. body          -- ScopeOp
  end
  return acpi.table("DSDT", 2, acpi.aml_s5() .. sb .. o.dsdt_extra, o)
end

--- The MADT, revision 5: the local APIC address, PCAT_COMPAT (there are 8259s),
-- one enabled Processor Local APIC per CPU (UIDs and APIC ids 0..cpus-1), the
-- IOAPIC, interrupt source overrides for ISA IRQ0 -> GSI `irq0_gsi` (edge,
-- unless `irq0_gsi` is 0) and the SCI (level, active high), and LINT1 as NMI.
-- @tparam table o normalised options
-- @treturn string
function acpi.madt(o)
  local t = { pack("<I4I4", o.lapic, 1) }
  for i = 0, o.cpus - 1 do
    t[#t + 1] = pack("<I1I1I1I1I4", 0, 8, i, i, 1)      -- Processor Local APIC, enabled
  end
  t[#t + 1] = pack("<I1I1I1I1I4I4", 1, 12, o.ioapic.id, 0, o.ioapic.addr, o.ioapic.gsi_base)
  if o.irq0_gsi ~= 0 then
    t[#t + 1] = pack("<I1I1I1I1I4I2", 2, 10, 0, 0, o.irq0_gsi, 0)   -- ISA IRQ0, bus default
  end
  -- polarity 01 active high, trigger mode 11 (bits 2-3) level
  t[#t + 1] = pack("<I1I1I1I1I4I2", 2, 10, 0, o.sci_irq, o.sci_irq, 0x000d)
  t[#t + 1] = pack("<I1I1I1I2I1", 4, 6, 0xff, 0, 1)       -- Local APIC NMI: all CPUs, LINT1
  return acpi.table("APIC", 5, table.concat(t), o)
end

-- ---- options ----

local DEFAULTS = {
  base = acpi.BASE, cpus = 1, lapic = 0xfee00000, sci_irq = 9, irq0_gsi = 2,
  pm1a_evt = 0x600, pm1a_cnt = 0x604, oem_id = "LUAKVM", oem_revision = 1,
  i8042 = true, cmos_rtc = true, power_button = false, dsdt_extra = "",
}
local KNOWN = { ioapic = true, reset = true, oem_table_id = true, rtc_century = true, virtio = true }
for k in pairs(DEFAULTS) do KNOWN[k] = true end

-- An integer in [lo, hi]; returns it or raises naming the field.
local function int(where, v, lo, hi)
  if math.type(v) ~= "integer" then
    error(fmt("%s must be an integer, got %s", where, kind(v)), 0)
  end
  if v < lo or v > hi then
    local f = hi < 0x100 and "%d" or "0x%x"
    error(fmt("%s = " .. f .. " out of range (" .. f .. ".." .. f .. ")", where, v, lo, hi), 0)
  end
  return v
end

local function bool(where, v)
  if type(v) ~= "boolean" then error(fmt("%s must be a boolean, got %s", where, type(v)), 0) end
  return v
end

local function ascii(where, v, width)
  if type(v) ~= "string" then error(fmt("%s must be a string, got %s", where, type(v)), 0) end
  if #v > width or v:find("[^\32-\126]") then
    error(fmt("%s must be at most %d printable ASCII characters, got %q", where, width, v), 0)
  end
  return v
end

local function sub(where, v, known)
  if v == nil then return {} end
  if type(v) ~= "table" then error(fmt("%s must be a table, got %s", where, type(v)), 0) end
  for k in pairs(v) do
    if not known[k] then error(fmt("%s: unknown field '%s'", where, tostring(k)), 0) end
  end
  return v
end

local function pick(v, default) if v == nil then return default end return v end

-- Normalise and check options; raises with a message (level 0) naming the field.
local function normalise(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then error("expected an options table, got " .. type(opts), 0) end
  for k in pairs(opts) do
    if not KNOWN[k] then error(fmt("unknown option '%s'", tostring(k)), 0) end
  end
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = pick(opts[k], v) end
  o.base = int("opts.base", o.base, 0, U32 - 1)
  if o.base % acpi.ALIGN ~= 0 then
    error(fmt("opts.base = %s is not %d-byte aligned", hex(o.base), acpi.ALIGN), 0)
  end
  o.cpus = int("opts.cpus", o.cpus, 1, 255)
  o.lapic = int("opts.lapic", o.lapic, 0, U32 - 1)
  o.sci_irq = int("opts.sci_irq", o.sci_irq, 0, 15)
  o.irq0_gsi = int("opts.irq0_gsi", o.irq0_gsi, 0, U32 - 1)
  o.pm1a_evt = int("opts.pm1a_evt", o.pm1a_evt, 0, 0xffff - 3)
  o.pm1a_cnt = int("opts.pm1a_cnt", o.pm1a_cnt, 0, 0xffff - 1)
  if o.pm1a_cnt < o.pm1a_evt + 4 and o.pm1a_evt < o.pm1a_cnt + 2 then
    error(fmt("opts.pm1a_cnt = %s overlaps the PM1a event block at %s..%s",
      hex(o.pm1a_cnt), hex(o.pm1a_evt), hex(o.pm1a_evt + 3)), 0)
  end
  o.oem_id = ascii("opts.oem_id", o.oem_id, 6)
  if opts.oem_table_id ~= nil then o.oem_table_id = ascii("opts.oem_table_id", opts.oem_table_id, 8) end
  o.oem_revision = int("opts.oem_revision", o.oem_revision, 0, U32 - 1)
  o.i8042 = bool("opts.i8042", o.i8042)
  o.cmos_rtc = bool("opts.cmos_rtc", o.cmos_rtc)
  o.power_button = bool("opts.power_button", o.power_button)
  o.rtc_century = int("opts.rtc_century", pick(opts.rtc_century, o.cmos_rtc and 0x32 or 0), 0, 0x7f)
  if type(o.dsdt_extra) ~= "string" then
    error("opts.dsdt_extra must be a string of AML bytes, got " .. type(o.dsdt_extra), 0)
  end
  local io = sub("opts.ioapic", opts.ioapic, { id = true, addr = true, gsi_base = true })
  o.ioapic = {
    id = int("opts.ioapic.id", pick(io.id, o.cpus), 0, 255),
    addr = int("opts.ioapic.addr", pick(io.addr, 0xfec00000), 0, U32 - 1),
    gsi_base = int("opts.ioapic.gsi_base", pick(io.gsi_base, 0), 0, U32 - 1),
  }
  o.virtio = {}
  if opts.virtio ~= nil then
    if type(opts.virtio) ~= "table" then error("opts.virtio must be a list, got " .. type(opts.virtio), 0) end
    if #opts.virtio > 256 then error("opts.virtio: at most 256 devices", 0) end
    for i, d in ipairs(opts.virtio) do
      local where = fmt("opts.virtio[%d]", i)
      d = sub(where, d, { base = true, size = true, irq = true })
      o.virtio[i] = {
        base = int(where .. ".base", d.base, 0, U32 - 1),
        size = int(where .. ".size", pick(d.size, 0x200), 1, U32 - 1),
        irq = int(where .. ".irq", d.irq, 0, 255),
      }
      if o.virtio[i].base + o.virtio[i].size > U32 then
        error(fmt("%s: 0x%x bytes at 0x%x cross 4 GiB", where, o.virtio[i].size, o.virtio[i].base), 0)
      end
    end
  end
  local rs = sub("opts.reset", opts.reset, { port = true, value = true })
  o.reset = {
    port = int("opts.reset.port", pick(rs.port, 0xcf9), 0, 0xffff),
    value = int("opts.reset.value", pick(rs.value, 0x06), 0, 0xff),
  }
  return o
end

-- Build every table with o.addr as it is; returns the list of byte strings.
local function build_all(o)
  local out = {}
  for i, entry in ipairs(acpi.LAYOUT) do
    local f = acpi[entry[1]:lower()]
    local bytes = f(o)
    if type(bytes) ~= "string" then
      error(fmt("acpi.%s returned %s, not a string", entry[1]:lower(), type(bytes)), 0)
    end
    out[i] = bytes
  end
  return out
end

--- Build the tables.
-- Every table starts 16-byte aligned, in `acpi.LAYOUT` order, from `base`; all
-- of them must end at or below 4 GiB.
-- @tparam[opt] table opts
--   `base` (GPA, 16-byte aligned, default 0xe0000),
--   `cpus` (1..255, default 1),
--   `lapic` (default 0xfee00000),
--   `ioapic` (`{id = cpus, addr = 0xfec00000, gsi_base = 0}`),
--   `sci_irq` (ISA IRQ of the SCI, default 9; level, active high),
--   `irq0_gsi` (GSI of ISA IRQ0, default 2 as on QEMU; 0: no override. KVM's
--   default GSI routing is the identity, so the in-kernel PIT (GSI 0) reaches
--   IOAPIC pin 0: a VMM that keeps it passes 0, or routes GSI 0 to IOAPIC
--   pin 2 with KVM_SET_GSI_ROUTING as QEMU does),
--   `pm1a_evt` (I/O port of the 4-byte PM1a event block, default 0x600),
--   `pm1a_cnt` (I/O port of the 2-byte PM1a control block, default 0x604),
--   `reset` (`{port = 0xcf9, value = 0x06}`),
--   `i8042` (an 8042 is present, default true),
--   `cmos_rtc` (a CMOS RTC is present, default true),
--   `rtc_century` (CMOS index of the century, default 0x32 with an RTC, else 0),
--   `power_button` (a fixed-feature power button in PM1, default false),
--   `oem_id` (default "LUAKVM"), `oem_table_id` (default "LKVM" .. signature),
--   `oem_revision` (default 1),
--   `virtio` (virtio-mmio devices for the DSDT, `{{base =, irq =, size =
--   0x200}, ...}`: `LNRO0005` devices VR00, VR01... under `\_SB`, default none),
--   `dsdt_extra` (AML bytes appended to the DSDT, default "").
-- @treturn table `{rsdp = GPA of the RSDP, base =, size = bytes from base to the
--   end of the last table, blobs = {{name = "RSDP", sig = "RSD PTR ", addr =,
--   bytes =}, ...}, addr = {RSDP =, XSDT =, FADT =, DSDT =, MADT =},
--   pm1a_evt =, pm1a_cnt =, sci_irq =, reset = {port =, value =},
--   s5_slp_typ = 5, pm1a_cnt_poweroff = 0x3401}`
-- @raise on an unknown option, a value of the wrong type or out of range (the
--   message names the field), or tables that would cross 4 GiB
function acpi.build(opts)
  local ok, o = pcall(normalise, opts)
  if not ok then error("acpi.build: " .. tostring(o), 2) end
  -- pass 1: sizes, with every address 0; pass 2: the real addresses
  o.addr = {}
  for _, entry in ipairs(acpi.LAYOUT) do o.addr[entry[1]] = 0 end
  local ok1, first = pcall(build_all, o)
  if not ok1 then error("acpi.build: " .. tostring(first), 2) end
  local at = o.base
  for i, entry in ipairs(acpi.LAYOUT) do
    o.addr[entry[1]] = at
    at = at + #first[i]
    if i < #acpi.LAYOUT then at = align(at, acpi.ALIGN) end
  end
  if at > U32 then
    error(fmt("acpi.build: tables at opts.base = %s (0x%x bytes) cross 4 GiB", hex(o.base), at - o.base), 2)
  end
  local ok2, bytes = pcall(build_all, o)
  if not ok2 then error("acpi.build: " .. tostring(bytes), 2) end
  local blobs = {}
  for i, entry in ipairs(acpi.LAYOUT) do
    if #bytes[i] ~= #first[i] then
      error(fmt("acpi.build: acpi.%s changed size with its addresses (%d then %d bytes)",
        entry[1]:lower(), #first[i], #bytes[i]), 2)
    end
    blobs[i] = { name = entry[1], sig = entry[2], addr = o.addr[entry[1]], bytes = bytes[i] }
  end
  local typ = acpi.S5_SLP_TYP << acpi.SLP_TYP_SHIFT
  return {
    rsdp = o.addr.RSDP, base = o.base, size = at - o.base, blobs = blobs, addr = o.addr,
    pm1a_evt = o.pm1a_evt, pm1a_cnt = o.pm1a_cnt, sci_irq = o.sci_irq,
    reset = { port = o.reset.port, value = o.reset.value },
    s5_slp_typ = acpi.S5_SLP_TYP,
    pm1a_cnt_poweroff = typ | acpi.SLP_EN | acpi.SCI_EN,
  }
end

--- Write built tables into guest memory.
-- @param target a `kvm.vm` (or anything with a `write(self, addr, bytes)`
--   method), or a function(addr, bytes)
-- @tparam table built from `acpi.build`
-- @raise when `target` is neither, or `built` has no blobs
function acpi.write(target, built)
  if type(built) ~= "table" or type(built.blobs) ~= "table" then
    error("acpi.write: built must be the table acpi.build returned", 2)
  end
  local put
  if type(target) == "function" then
    put = target
  else
    local ok, w = pcall(function() return target.write end)
    if not ok or type(w) ~= "function" then
      error("acpi.write: target must be a function(addr, bytes) or have a write method, got " ..
        type(target), 2)
    end
    put = function(addr, bytes) return w(target, addr, bytes) end
  end
  for _, b in ipairs(built.blobs) do put(b.addr, b.bytes) end
end

return acpi
