-- kvm.cpuid's topology (no KVM needed): each vCPU's APIC id and how many
-- there are, in the leaves Linux reads, on entries shaped as
-- kvm.supported_cpuid() returns them.
local cpuid = require "kvm.cpuid"

local function entries()
  return {
    { func = 0, index = 0, eax = 0x1f, ebx = 0, ecx = 0, edx = 0 },
    { func = 1, index = 0, eax = 0x806f0, ebx = 0xaa000800, ecx = 0x80000000, edx = 0x10000000 },
    { func = 0xb, index = 0, eax = 7, ebx = 7, ecx = 0x100, edx = 9 },
    { func = 0xb, index = 1, eax = 7, ebx = 7, ecx = 0x201, edx = 9 },
    { func = 0xb, index = 2, eax = 7, ebx = 7, ecx = 2, edx = 9 },
    { func = 0x1f, index = 1, eax = 7, ebx = 7, ecx = 0x201, edx = 9 },
    { func = 0x80000008, index = 0, eax = 0x3030, ebx = 0, ecx = 0x70ff, edx = 0 },
    { func = 0x8000001e, index = 0, eax = 0x55, ebx = 0x1ff, ecx = 0x3, edx = 0 },
  }
end

describe("kvm.cpuid topology", function()
  it("one vCPU: APIC id 0, no HTT, one core", function()
    local e = cpuid.topology(entries(), 0, 1)
    local l1 = cpuid.find(e, 1)
    assert.equal(0x0001 << 16 | 0x0800, l1.ebx)
    assert.equal(0, l1.edx & (1 << 28))
    assert.same({ 0, 1, 0x100, 0 }, { cpuid.find(e, 0xb, 0).eax, cpuid.find(e, 0xb, 0).ebx,
                                      cpuid.find(e, 0xb, 0).ecx, cpuid.find(e, 0xb, 0).edx })
    assert.same({ 0, 1, 0x201, 0 }, { cpuid.find(e, 0xb, 1).eax, cpuid.find(e, 0xb, 1).ebx,
                                      cpuid.find(e, 0xb, 1).ecx, cpuid.find(e, 0xb, 1).edx })
    assert.equal(0, cpuid.find(e, 0x80000008).ecx & 0xf0ff)
  end)

  it("vCPU 2 of 3: its APIC id everywhere, 3 logical processors, 2 id bits", function()
    local e = cpuid.topology(entries(), 2, 3)
    local l1 = cpuid.find(e, 1)
    assert.equal(2, l1.ebx >> 24)
    assert.equal(3, (l1.ebx >> 16) & 0xff)
    assert.equal(0x0800, l1.ebx & 0xffff)             -- the rest kept
    assert.equal(1 << 28, l1.edx & (1 << 28))
    for _, leaf in ipairs{ { 0xb, 0 }, { 0xb, 1 }, { 0xb, 2 }, { 0x1f, 1 } } do
      assert.equal(2, cpuid.find(e, leaf[1], leaf[2]).edx)
    end
    local core = cpuid.find(e, 0xb, 1)
    assert.same({ 2, 3, 0x201 }, { core.eax, core.ebx, core.ecx })
    local past = cpuid.find(e, 0xb, 2)
    assert.same({ 0, 0, 2 }, { past.eax, past.ebx, past.ecx })
    local a8 = cpuid.find(e, 0x80000008)
    assert.equal(0x7000 & ~0xf000 | (2 << 12) | 2, a8.ecx)
    assert.equal(2, cpuid.find(e, 0x8000001e).eax)
    assert.equal(0x102, cpuid.find(e, 0x8000001e).ebx)
  end)

  it("for_cpu copies: the BSP's entries stay as they were", function()
    local bsp = cpuid.topology(entries(), 0, 2)
    local ap = cpuid.for_cpu(bsp, 1, 2)
    assert.equal(0, cpuid.find(bsp, 1).ebx >> 24)
    assert.equal(1, cpuid.find(ap, 1).ebx >> 24)
    assert.are_not.equal(cpuid.find(bsp, 1), cpuid.find(ap, 1))
  end)

  it("guest{tsc_deadline = true} offers the LAPIC timer's TSC-deadline mode; not by default", function()
    assert.equal(cpuid.TSC_DEADLINE_BIT, cpuid.find(cpuid.guest{ entries = entries(), tsc_deadline = true }, 1).ecx
      & cpuid.TSC_DEADLINE_BIT)
    assert.equal(0, cpuid.find(cpuid.guest{ entries = entries() }, 1).ecx & cpuid.TSC_DEADLINE_BIT)
  end)

  it("guest{cpus = ...} checks its argument", function()
    assert.has_error(function() cpuid.guest{ entries = entries(), cpus = 0 } end,
      "cpuid.guest: cpus must be an integer 1..255")
    local e = cpuid.guest{ entries = entries(), cpus = 4, apic_id = 3 }
    assert.equal(3, cpuid.find(e, 1).ebx >> 24)
    assert.equal(cpuid.HYPERVISOR_BIT, cpuid.find(e, 1).ecx & cpuid.HYPERVISOR_BIT)
  end)
end)
