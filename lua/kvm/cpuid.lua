--- The CPUID a VMM presents to its guest, built from what KVM supports.
--
-- `kvm.supported_cpuid()` is what KVM *can* give; a VMM decides what the guest
-- *sees*. Like QEMU and Firecracker, `cpuid.guest` sets the hypervisor bit
-- (CPUID.1:ECX[31]: without it Linux never looks at 0x40000000 and finds no
-- kvm-clock), keeps KVM's leaves (0x40000000: "KVMKVMKVM" and the highest
-- leaf; 0x40000001: the paravirtual features), puts the vCPU's APIC id in
-- CPUID.1:EBX[31:24], then lets a host profile and the user's hook change the
-- entries, the user last.
--
--     local cpuid = require "kvm.cpuid"
--     assert(cpu:set_cpuid(assert(cpuid.guest{ hook = function(e) ... end })))
-- @module kvm.cpuid
local cpuid = {}

local core = require "kvm.core"

cpuid.HYPERVISOR_BIT = 1 << 31
cpuid.KVM_SIGNATURE = "KVMKVMKVM\0\0\0"

--- The entry for leaf `func` (and `index`, default 0), or nil.
function cpuid.find(entries, func, index)
  for _, e in ipairs(entries) do
    if e.func == func and (e.index or 0) == (index or 0) then return e end
  end
end

--- CPUID entries for a guest vCPU.
-- @tparam[opt] table o {apic_id = n (default 0), profile = a host profile whose
--   `cpuid(entries)` runs before the hook, hook = function(entries) returning
--   entries or nil (changes in place), entries = a list to start from
--   (default kvm.supported_cpuid())}
-- @treturn table entries
-- @return[2] nil, message (KVM_GET_SUPPORTED_CPUID failed)
function cpuid.guest(o)
  o = o or {}
  local entries = o.entries
  if not entries then
    local err
    entries, err = core.supported_cpuid()
    if not entries then return nil, err end
  end
  local apic_id = o.apic_id or 0
  if math.type(apic_id) ~= "integer" or apic_id < 0 or apic_id > 255 then
    error("cpuid.guest: apic_id must be an integer 0..255", 2)
  end
  local leaf1 = cpuid.find(entries, 1)
  if leaf1 then
    leaf1.ecx = leaf1.ecx | cpuid.HYPERVISOR_BIT
    leaf1.ebx = (leaf1.ebx & 0x00ffffff) | (apic_id << 24)
  end
  if o.profile and o.profile.cpuid then o.profile.cpuid(entries) end
  if o.hook then entries = o.hook(entries) or entries end
  return entries
end

return cpuid
