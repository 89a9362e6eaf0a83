--- Host profiles: what a Linux guest needs on a particular kind of /dev/kvm.
--
-- On hardware KVM (Intel VT-x, AMD-V) nothing is needed and `detect()`
-- returns nil. On kvm_pvm, a software implementation of the KVM API, the
-- host's instruction emulator stops on a few instructions
-- (KVM_EXIT_INTERNAL_ERROR, emulation failure). The `pvm` profile keeps the
-- guest away from them and recovers from the rest:
--
-- * CPUID: CX16 cleared (SLUB's `lock cmpxchg16b`), POPCNT cleared (`popcnt`
--   in hweight), SMAP cleared (`clac`/`stac` at exception entry), XSAVE
--   cleared (`xsave`/`xrstor` in the FPU code).
-- * kernel parameters: `noxsave clearcpuid=151,308` (POPCNT, SMAP: the kernel
--   also patches some of these in from its own feature words).
-- * exits: `int3` (0xcc) that the host cannot deliver becomes an injected #BP
--   with RIP past it; `fwait` (0x9b) with no x87 exception pending is skipped.
--
-- @module kvm.hostprofile
local hostprofile = {}

local fmt = string.format

--- Clear bit `bit` of register `reg` in CPUID leaf `func` (all subleaves, or `index`).
-- @tparam table entries as kvm.supported_cpuid() returns
function hostprofile.clear_cpuid_bit(entries, func, reg, bit, index)
  for _, e in ipairs(entries) do
    if e.func == func and (index == nil or e.index == index) then
      e[reg] = e[reg] & ~(1 << bit)
    end
  end
end

--- The instruction bytes of an exit as hex ("0f 01 ca").
function hostprofile.hex_bytes(s)
  return (s or ""):gsub(".", function(c) return fmt("%02x ", c:byte()) end):sub(1, -2)
end

--- Recover from an emulation failure the pvm host reports for an instruction
-- a real CPU would have executed. Returns true when the guest can resume.
-- @param e the Exit
-- @param ctx {cpu = vcpu, log = function(msg)?}
function hostprofile.pvm_on_exit(e, ctx)
  if e.reason ~= "internal_error" or e.suberror ~= 1 or not e.insn then return false end
  local cpu = ctx.cpu
  local op = e.insn:byte(1)
  local log = ctx.log
  if op == 0xcc then
    -- int3: deliver #BP as the CPU would (trap: RIP after the instruction)
    local r = cpu:regs()
    cpu:set_regs{ rip = r.rip + 1 }
    cpu:set_events{ exception = { injected = 1, nr = 3, has_error_code = 0 } }
    if log then log(fmt("pvm: int3 at 0x%x injected as #BP", r.rip)) end
    return true
  elseif op == 0x9b then
    -- fwait with no unmasked x87 exception pending is a no-op
    local r = cpu:regs()
    cpu:set_regs{ rip = r.rip + 1 }
    if log then log(fmt("pvm: fwait at 0x%x skipped", r.rip)) end
    return true
  end
  return false
end

--- The profile for kvm_pvm.
hostprofile.pvm = {
  name = "pvm",
  description = "kvm_pvm software KVM: CPUID and kernel parameters that avoid " ..
    "instructions its emulator lacks, int3/fwait recovery",
  cmdline = "noxsave clearcpuid=151,308",
  cpuid = function(entries)
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 13)   -- CX16
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 23)   -- POPCNT
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 26)   -- XSAVE
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 27)   -- OSXSAVE
    hostprofile.clear_cpuid_bit(entries, 7, "ebx", 20, 0) -- SMAP
    return entries
  end,
  on_exit = hostprofile.pvm_on_exit,
}

--- The profile this host needs, or nil on hardware KVM.
-- @treturn ?table a profile {name, description, cmdline, cpuid = fn, on_exit = fn}
function hostprofile.detect()
  local core = require "kvm.core"
  local info = core.host_info()
  if info.pvm then return hostprofile.pvm end
  return nil
end

return hostprofile
