-- kvm.cpuid on a real vCPU: a long-mode guest executes CPUID and stores what
-- it sees (leaf 1 EBX/ECX, leaf 0x40000000) at 0x2000.
local support = require "support"
local cpuid = require "kvm.cpuid"

local CODE = table.concat{
  "\xb8\x01\x00\x00\x00",              -- mov eax, 1
  "\x31\xc9",                          -- xor ecx, ecx
  "\x0f\xa2",                          -- cpuid
  "\x89\x1c\x25\x00\x20\x00\x00",      -- mov [0x2000], ebx
  "\x89\x0c\x25\x04\x20\x00\x00",      -- mov [0x2004], ecx
  "\xb8\x00\x00\x00\x40",              -- mov eax, 0x40000000
  "\x0f\xa2",                          -- cpuid
  "\x89\x04\x25\x08\x20\x00\x00",      -- mov [0x2008], eax
  "\x89\x1c\x25\x0c\x20\x00\x00",      -- mov [0x200c], ebx
  "\x89\x0c\x25\x10\x20\x00\x00",      -- mov [0x2010], ecx
  "\x89\x14\x25\x14\x20\x00\x00",      -- mov [0x2014], edx
  "\xf4",                              -- hlt
}

-- run the guest with these CPUID entries; what it saw
local function seen(entries)
  local _, cpu, ram = support.guest(CODE, { mode = "long" })
  assert(cpu:set_cpuid(entries))
  local e = cpu:run{ timeout = 10 }
  assert.equal("hlt", e.reason, tostring(e))
  local ebx1, ecx1, max, b, c, d = string.unpack("<I4I4I4I4I4I4", ram:read(0x2000, 24))
  return { ebx1 = ebx1, ecx1 = ecx1, max = max, sig = string.pack("<I4I4I4", b, c, d) }
end

describe("#guest kvm.cpuid", function()
  it("the guest sees the hypervisor bit, KVM's signature and leaves, its APIC id", function()
    support.need_kvm()
    local s = seen(assert(cpuid.guest{ apic_id = 3 }))
    assert.equal(1 << 31, s.ecx1 & (1 << 31))
    assert.equal(3, s.ebx1 >> 24)
    assert.equal(cpuid.KVM_SIGNATURE, s.sig)
    assert.is_true(s.max >= 0x40000001, ("highest KVM leaf 0x%x"):format(s.max))
  end)

  it("the user's hook comes last and the guest sees what it made", function()
    support.need_kvm()
    local s = seen(assert(cpuid.guest{ hook = function(entries)
      local l1 = cpuid.find(entries, 1)
      l1.ecx = l1.ecx & ~cpuid.HYPERVISOR_BIT
    end }))
    assert.equal(0, s.ecx1 & (1 << 31))
  end)

  it("a bad APIC id raises", function()
    assert.has_error(function() cpuid.guest{ entries = {}, apic_id = 256 } end,
      "cpuid.guest: apic_id must be an integer 0..255")
  end)
end)
