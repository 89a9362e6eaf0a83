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
--   cleared (`xsave`/`xrstor` in the FPU code), SSSE3, SSE4.1/4.2, AES-NI and
--   PCLMULQDQ cleared (the host's emulator lacks SSE register moves such as
--   `movd`, which the kernel's SSSE3 blake2s uses at ~670 s of boot), so the
--   kernel picks its generic C code.
-- * kernel parameters: `noxsave clearcpuid=129,137,141,147,148,151,153,308`
--   (PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT, AES-NI, SMAP: feature
--   numbers word*32+bit of the 6.1 kernel's cpufeatures.h). These carry the
--   weight: measured here, a guest's CPUID instruction is not intercepted by
--   kvm_pvm, so the guest sees the host's CPUID whatever KVM_SET_CPUID2 says
--   (the CPUID changes above are kept for hosts that do intercept it).
-- * exits (kvm.emulate): `int3` (0xcc) that the host cannot deliver becomes
--   an injected #BP with RIP past it; `fwait` (0x9b) with no x87 exception
--   pending is skipped; `ldmxcsr`/`stmxcsr` are emulated.
-- * `nosoftlockup`: the kernel's boot-time self-checks are slow under
--   emulation and would print soft-lockup backtraces (slower still).
-- * `cryptomgr.notests audit=0 lsm=capability`: privileged guest code runs
--   emulated here, so boot-time work costs ~100x; these skip the crypto
--   self-tests (minutes), audit and the LSMs (AppArmor, TOMOYO, IMA/EVM).
--
-- @module kvm.hostprofile
local hostprofile = {}

local fmt = string.format
local emulate = require "kvm.emulate"

--- Clear bit `bit` of register `reg` in CPUID leaf `func` (all subleaves, or `index`).
-- @tparam table entries as kvm.supported_cpuid() returns
-- @tparam integer func the leaf (CPUID function)
-- @tparam string reg "eax", "ebx", "ecx" or "edx"
-- @tparam integer bit 0..31
-- @tparam[opt] integer index the subleaf; all of them when nil
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
-- a real CPU would have executed (kvm.emulate: int3, fwait, ldmxcsr,
-- stmxcsr). Returns true when the guest can resume.
-- @param e the Exit
-- @param ctx {cpu = vcpu, cpus = {vcpu, ...}?, vm = vm, log = function(msg)?}
function hostprofile.pvm_on_exit(e, ctx)
  if e.reason ~= "internal_error" or e.suberror ~= 1 or not e.insn then return false end
  ctx.emulate_state = ctx.emulate_state or {}
  local cpu = ctx.cpus and e.cpu and ctx.cpus[e.cpu + 1] or ctx.cpu   -- the vCPU that exited
  local ok, what = emulate.step(e, cpu, ctx.vm, ctx.emulate_state)
  if ctx.log then
    ctx.log(fmt("pvm: %s at 0x%x: %s", hostprofile.hex_bytes(e.insn:sub(1, 6)), e.rip or 0, what))
  end
  return ok
end

--- The profile for kvm_pvm.
hostprofile.pvm = {
  name = "pvm",
  description = "kvm_pvm software KVM: CPUID and kernel parameters that avoid " ..
    "instructions its emulator lacks, int3/fwait recovery",
  cmdline = "noxsave clearcpuid=129,137,141,147,148,151,153,308 nosoftlockup " ..
    "cryptomgr.notests audit=0 lsm=capability",
  cpuid = function(entries)
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 1)    -- PCLMULQDQ
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 9)    -- SSSE3 (blake2s_compress_ssse3: movd)
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 19)   -- SSE4.1
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 20)   -- SSE4.2
    hostprofile.clear_cpuid_bit(entries, 1, "ecx", 25)   -- AES-NI
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
