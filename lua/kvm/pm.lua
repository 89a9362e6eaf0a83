--- ACPI fixed-hardware power management for a guest: the PM1a event block
-- (status and enable, 16 bits each) and the PM1a control block (16 bits), as
-- Lua port handlers on the ports the FADT names (`kvm.acpi`).
--
-- Control reads back SCI_EN (bit 0) set: there is no SMI_CMD, ACPI is always
-- on. A write with SLP_EN (bit 13) enters the sleep state SLP_TYP (bits 10-12):
-- `on_sleep(slp_typ)` decides; S5 (the DSDT's `\_S5`, type 5) is a power off.
-- Status bits are write-one-to-clear; nothing sets them (no power button, no
-- PM timer, no SCI) yet.
--
--     local pm = require "kvm.pm"
--     pm.attach(vm, { evt = 0x600, cnt = 0x604, on_sleep = function(typ)
--       if typ == 5 then return kvm.POWEROFF end   -- run() returns "poweroff"
--     end })
-- @module kvm.pm
local pm = {}

pm.SCI_EN = 0x0001
pm.SLP_EN = 0x2000
pm.S5 = 5

--- Claim the PM1a ports of `vm`. Accesses of any width at any offset inside
-- the blocks work byte by byte, as on a PC's I/O bus.
-- @param vm a kvm.vm
-- @tparam table o {evt = port (4 bytes), cnt = port (2 bytes), on_sleep = function(slp_typ, value)
--   whose result the port handler returns (kvm.POWEROFF ends run() with "poweroff")}
-- @treturn table the registers {sts=, en=, cnt=, sleeps = {slp_typ, ...}}
function pm.attach(vm, o)
  assert(math.type(o.evt) == "integer" and math.type(o.cnt) == "integer", "pm.attach: evt and cnt ports expected")
  local regs = { sts = 0, en = 0, cnt = pm.SCI_EN, sleeps = {} }
  -- the byte at port p: which register, which byte of it
  local function where(p)
    if p >= o.evt and p < o.evt + 2 then return "sts", p - o.evt end
    if p >= o.evt + 2 and p < o.evt + 4 then return "en", p - o.evt - 2 end
    if p >= o.cnt and p < o.cnt + 2 then return "cnt", p - o.cnt end
  end
  local function handler(port, dir, size, value)
    if dir == "in" then
      local v = 0
      for i = 0, size - 1 do
        local r, b = where(port + i)
        if r then v = v | (((regs[r] >> (8 * b)) & 0xff) << (8 * i)) else v = v | (0xff << (8 * i)) end
      end
      return v
    end
    local sleep
    for i = 0, size - 1 do
      local r, b = where(port + i)
      local byte = (value >> (8 * i)) & 0xff
      if r == "sts" then
        regs.sts = regs.sts & ~(byte << (8 * b))            -- write one to clear
      elseif r == "en" then
        regs.en = (regs.en & ~(0xff << (8 * b))) | (byte << (8 * b))
      elseif r == "cnt" then
        regs.cnt = (regs.cnt & ~(0xff << (8 * b))) | (byte << (8 * b))
        if b == 1 and regs.cnt & pm.SLP_EN ~= 0 then sleep = true end
      end
    end
    regs.cnt = regs.cnt | pm.SCI_EN
    if sleep then
      regs.cnt = regs.cnt & ~pm.SLP_EN                       -- SLP_EN reads as 0
      local typ = (regs.cnt >> 10) & 7
      regs.sleeps[#regs.sleeps + 1] = typ
      if o.on_sleep then return o.on_sleep(typ, regs.cnt) end
    end
  end
  vm:on_io({ o.evt, o.evt + 3 }, handler)
  vm:on_io({ o.cnt, o.cnt + 1 }, handler)
  return regs
end

return pm
