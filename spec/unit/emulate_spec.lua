-- kvm.emulate's decoder against known instruction bytes
local emulate = require "kvm.emulate"

describe("kvm.emulate.decode_modrm", function()
  local regs = { rax = 0x10, rcx = 0x20, rdx = 0, rbx = 0x1000, rsp = 0x8000, rbp = 0x9000,
                 rsi = 0, rdi = 0, r8 = 0x100, r9 = 0, r10 = 0, r11 = 0, r12 = 0x5000,
                 r13 = 0, r14 = 0, r15 = 0, rip = 0x400000 }
  local cases = {
    -- bytes, instruction, length, reg field, effective address
    { "\x0f\xae\x54\x24\x04", "ldmxcsr [rsp+4]", 5, 2, 0x8004 },
    { "\x0f\xae\x1c\x25\x00\x20\x00\x00", "stmxcsr [0x2000]", 8, 3, 0x2000 },
    { "\x0f\xae\x55\xfc", "ldmxcsr [rbp-4]", 4, 2, 0x8ffc },
    { "\x41\x0f\xae\x14\x24", "ldmxcsr [r12]", 5, 2, 0x5000 },
    { "\x0f\xae\x15\x10\x00\x00\x00", "ldmxcsr [rip+0x10]", 7, 2, 0x400000 + 7 + 0x10 },
    { "\x0f\xae\x54\x88\x08", "ldmxcsr [rax+rcx*4+8]", 5, 2, 0x10 + 0x80 + 8 },
    { "\x42\x0f\xae\x1c\x03", "stmxcsr [rbx+r8]", 5, 3, 0x1100 },
    { "\x0f\xae\x93\x00\x01\x00\x00", "ldmxcsr [rbx+0x100]", 7, 2, 0x1100 },
  }
  for _, c in ipairs(cases) do
    it(c[2], function()
      local d = assert(emulate.decode_modrm(c[1], 2))
      assert.equal(c[3], d.length)
      assert.equal(c[4], d.reg)
      assert.equal(c[5], d.ea(regs, 0))
    end)
  end

  it("refuses register operands and truncated bytes", function()
    assert.same({ nil, "register operand" }, { emulate.decode_modrm("\x0f\xae\xe8", 2) })
    assert.same({ nil, "truncated" }, { emulate.decode_modrm("\x0f\xae", 2) })
  end)
end)
