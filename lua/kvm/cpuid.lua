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

local function bits(n)          -- bits to number n things: 1 -> 0, 2 -> 1, 3..4 -> 2
  local b = 0
  while (1 << b) < n do b = b + 1 end
  return b
end

--- Give entries (in place) the APIC id of one vCPU of `cpus`, and the
-- topology that says how many there are: one package of `cpus` cores, one
-- thread each, APIC ids 0..cpus-1. CPUID.1: EBX[31:24] the APIC id,
-- EBX[23:16] the logical processors and EDX.HTT (more than one); leaves 0xb
-- and 0x1f (x2APIC topology: the thread and core levels, EDX the x2APIC id);
-- AMD's 0x80000008 (ECX: cores - 1 and the APIC id bits) and 0x8000001e
-- (EAX: the extended APIC id). Only leaves KVM reported are changed.
-- @treturn table entries
function cpuid.topology(entries, apic_id, cpus)
  cpus = cpus or 1
  local leaf1 = cpuid.find(entries, 1)
  if leaf1 then
    leaf1.ebx = (leaf1.ebx & 0x0000ffff) | (apic_id << 24) | ((cpus > 1 and cpus or 1) << 16)
    if cpus > 1 then leaf1.edx = leaf1.edx | (1 << 28) else leaf1.edx = leaf1.edx & ~(1 << 28) end
  end
  for _, leaf in ipairs{ 0xb, 0x1f } do
    for _, e in ipairs(entries) do
      if e.func == leaf then
        local level = e.index or 0
        if level == 0 then          -- threads: one per core
          e.eax, e.ebx, e.ecx = 0, 1, (1 << 8)
        elseif level == 1 then      -- cores: all of them, in one package
          e.eax, e.ebx, e.ecx = bits(cpus), cpus, (2 << 8) | 1
        else                        -- no more levels
          e.eax, e.ebx, e.ecx = 0, 0, level
        end
        e.edx = apic_id
      end
    end
  end
  local amd8 = cpuid.find(entries, 0x80000008)
  if amd8 then amd8.ecx = (amd8.ecx & ~0xf0ff) | (bits(cpus) << 12) | (cpus - 1) end
  local amd1e = cpuid.find(entries, 0x8000001e)
  if amd1e then
    amd1e.eax = apic_id
    amd1e.ebx = (amd1e.ebx & ~0xff) | (apic_id & 0xff)  -- the core id; one thread per core
  end
  return entries
end

--- A copy of entries (a list of tables) for another vCPU: the same CPUID
-- with its APIC id (cpuid.topology).
function cpuid.for_cpu(entries, apic_id, cpus)
  local c = {}
  for i, e in ipairs(entries) do
    local t = {}
    for k, v in pairs(e) do t[k] = v end
    c[i] = t
  end
  return cpuid.topology(c, apic_id, cpus)
end

cpuid.TSC_DEADLINE_BIT = 1 << 24   -- CPUID.1:ECX: the local APIC timer's TSC-deadline mode

--- CPUID entries for a guest vCPU.
-- @tparam[opt] table o {apic_id = n (default 0), tsc_deadline = true to
--   offer the local APIC timer's TSC-deadline mode (KVM emulates it in its
--   in-kernel LAPIC when it has KVM_CAP_TSC_DEADLINE_TIMER, and does not list
--   it in KVM_GET_SUPPORTED_CPUID: a VMM with an in-kernel irqchip turns it
--   on, as QEMU does; a Linux guest then skips calibrating the LAPIC timer
--   against its tick, a busy wait), cpus = how many vCPUs the
--   guest has (default 1: the topology, see cpuid.topology), profile = a host profile whose
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
  local cpus = o.cpus or 1
  if math.type(cpus) ~= "integer" or cpus < 1 or cpus > 255 then
    error("cpuid.guest: cpus must be an integer 1..255", 2)
  end
  local leaf1 = cpuid.find(entries, 1)
  if leaf1 then
    leaf1.ecx = leaf1.ecx | cpuid.HYPERVISOR_BIT
    if o.tsc_deadline then leaf1.ecx = leaf1.ecx | cpuid.TSC_DEADLINE_BIT end
  end
  cpuid.topology(entries, apic_id, cpus)
  if o.profile and o.profile.cpuid then o.profile.cpuid(entries) end
  if o.hook then entries = o.hook(entries) or entries end
  return entries
end

return cpuid
