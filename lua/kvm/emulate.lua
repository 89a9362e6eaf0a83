--- A tiny x86-64 instruction emulator for the few instructions a host's KVM
-- cannot run (KVM_EXIT_INTERNAL_ERROR, emulation failure): it decodes the
-- bytes the exit reports, computes memory operands from the registers, reads
-- and writes guest memory through the guest's page tables (`cpu:translate`),
-- and moves RIP past the instruction.
--
-- @module kvm.emulate
local emulate = {}

local fmt = string.format

local REG64 = { "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15" }

--- Decode prefixes and a ModRM memory operand (64-bit mode).
-- @tparam string insn the instruction bytes
-- @tparam integer opcode_len bytes of opcode after the prefixes (1, or 2 for 0f xx)
-- @treturn table {rex=, opcode_at=, modrm=, reg=, length=, ea = function(regs) -> address}
-- or nil, why
function emulate.decode_modrm(insn, opcode_len)
  local i, rex, seg = 1, 0, nil
  while true do
    local b = insn:byte(i)
    if b == nil then return nil, "truncated" end
    if b == 0x66 or b == 0xf2 or b == 0xf3 or b == 0x2e or b == 0x3e or b == 0x26
       or b == 0x36 then i = i + 1
    elseif b == 0x64 or b == 0x65 then seg = (b == 0x64) and "fs" or "gs"; i = i + 1
    elseif b >= 0x40 and b <= 0x4f then rex = b; i = i + 1; break
    else break end
  end
  local op_at = i
  i = i + opcode_len
  local modrm = insn:byte(i)
  if not modrm then return nil, "truncated" end
  i = i + 1
  local mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
  if mod == 3 then return nil, "register operand" end
  local base, index, scale, disp, riprel = nil, nil, 1, 0, false
  local rexb, rexx = (rex & 1) << 3, (rex & 2) << 2
  if rm == 4 then
    local sib = insn:byte(i)
    if not sib then return nil, "truncated" end
    i = i + 1
    scale = 1 << (sib >> 6)
    local idx = ((sib >> 3) & 7) | rexx
    if idx ~= 4 then index = REG64[idx + 1] end
    local b = sib & 7
    if b == 5 and mod == 0 then
      disp = string.unpack("<i4", insn, i); i = i + 4
    else
      base = REG64[(b | rexb) + 1]
    end
  elseif rm == 5 and mod == 0 then
    riprel = true
    disp = string.unpack("<i4", insn, i); i = i + 4
  else
    base = REG64[(rm | rexb) + 1]
  end
  if mod == 1 then disp = string.unpack("<i1", insn, i); i = i + 1
  elseif mod == 2 then disp = string.unpack("<i4", insn, i); i = i + 4 end
  local length = i - 1
  return {
    rex = rex, opcode_at = op_at, reg = reg, length = length, seg = seg,
    ea = function(regs, seg_base)
      local a = disp
      if riprel then a = a + regs.rip + length end
      if base then a = a + regs[base] end
      if index then a = a + regs[index] * scale end
      if seg_base then a = a + seg_base end
      return a
    end,
  }
end

-- guest-virtual read/write through the guest's page tables
local function vread(cpu, vm, gva, n)
  local gpa = cpu:translate(gva)
  if not gpa then return nil, fmt("0x%x is not mapped", gva) end
  return vm:read(gpa, n)
end
local function vwrite(cpu, vm, gva, bytes)
  local gpa, writable = cpu:translate(gva)
  if not gpa then return nil, fmt("0x%x is not mapped", gva) end
  if writable == false then return nil, fmt("0x%x is read-only", gva) end
  vm:write(gpa, bytes)
  return true
end

local function seg_base(cpu, seg)
  if not seg then return 0 end
  return cpu:sregs()[seg].base
end

--- The MXCSR value the guest last loaded (the host may not report it).
emulate.MXCSR_DEFAULT = 0x1f80

--- Emulate the instruction of an emulation-failure exit, if it is one this
-- module knows: `ldmxcsr m32` (0f ae /2), `stmxcsr m32` (0f ae /3),
-- `fwait` (9b), `int3` (cc: injected as #BP). Returns true when the guest can
-- resume, or false and why.
-- @param e the Exit (reason "internal_error", with `insn`)
-- @param cpu the vCPU
-- @param vm the VM
-- @tparam[opt] table state per-VM state (remembers MXCSR)
function emulate.step(e, cpu, vm, state)
  local insn = e.insn
  if not insn or #insn == 0 then return false, "no instruction bytes" end
  state = state or {}
  local b1 = insn:byte(1)
  local regs = cpu:regs()
  if b1 == 0xcc then
    cpu:set_regs{ rip = regs.rip + 1 }
    cpu:set_events{ exception = { injected = 1, nr = 3, has_error_code = 0 } }
    return true, "int3: #BP injected"
  elseif b1 == 0x9b then
    cpu:set_regs{ rip = regs.rip + 1 }
    return true, "fwait: skipped (no x87 exception pending)"
  end
  -- 0f ae /2 and /3 after prefixes
  local d, why = emulate.decode_modrm(insn, 2)
  if d and insn:byte(d.opcode_at) == 0x0f and insn:byte(d.opcode_at + 1) == 0xae
     and (d.reg == 2 or d.reg == 3) then
    local addr = d.ea(regs, seg_base(cpu, d.seg))
    if d.reg == 2 then
      local bytes, err = vread(cpu, vm, addr, 4)
      if not bytes then return false, "ldmxcsr: " .. err end
      local v = string.unpack("<I4", bytes)
      if v & 0xffff0000 ~= 0 then
        cpu:set_events{ exception = { injected = 1, nr = 13, has_error_code = 1, error_code = 0 } }
        return true, fmt("ldmxcsr 0x%x: reserved bits, #GP injected", v)
      end
      state.mxcsr = v
      cpu:set_fpu{ mxcsr = v }
      cpu:set_regs{ rip = regs.rip + d.length }
      return true, fmt("ldmxcsr 0x%x emulated", v)
    else
      local v = state.mxcsr or emulate.MXCSR_DEFAULT
      local ok, err = vwrite(cpu, vm, addr, string.pack("<I4", v))
      if not ok then return false, "stmxcsr: " .. err end
      cpu:set_regs{ rip = regs.rip + d.length }
      return true, fmt("stmxcsr emulated (0x%x)", v)
    end
  end
  return false, why or "not an instruction this emulator knows"
end

return emulate
