-- kvm.emulate on a real guest: ldmxcsr/stmxcsr run natively on hardware KVM;
-- where the host cannot emulate them (kvm_pvm), emulate.step does.
local kvm = require "kvm"
local x86 = require "kvm.x86"
local emulate = require "kvm.emulate"
local support = require "support"

describe("#guest kvm.emulate", function()
  it("ldmxcsr / stmxcsr give the guest the value it loaded", function()
    support.need_kvm()
    local vm <close> = assert(kvm.vm())
    local ram = assert(vm:memory{ guest = 0, size = 2 << 20 })
    local cpu = assert(vm:vcpu(0))
    assert(cpu:set_cpuid(assert(kvm.supported_cpuid())))
    x86.long_mode(cpu, vm, { ram_size = ram.size })
    vm:debug_exit()
    ram:write(0x1000, table.concat{
      "\x0f\xae\x54\x24\x04",             -- ldmxcsr [rsp+4]
      "\x0f\xae\x1c\x25\x00\x20\x00\x00", -- stmxcsr [0x2000]
      "\xb0\x2a",                         -- mov al, 42
      "\x66\xba\x01\x05",                 -- mov dx, 0x501
      "\xee",                             -- out dx, al
      "\xf4",                             -- hlt
    })
    ram:u32(0x8004, 0x1f80 | 0x40)        -- MXCSR with DAZ set
    cpu:set_regs{ rip = 0x1000, rsp = 0x8000, rflags = 2 }
    local state = {}
    local e
    local steps = 0
    for _ = 1, 10 do
      e = cpu:run{ timeout = 5 }
      if e.reason ~= "internal_error" then break end
      assert(emulate.step(e, cpu, vm, state))
      steps = steps + 1
    end
    assert.equal("debug_exit", e.reason)
    -- hardware KVM runs both natively; only kvm_pvm's emulator needs help
    if not kvm.host_info().pvm then assert.equal(0, steps) end
    assert.equal(42, e.code)
    assert.equal(0x1fc0, ram:u32(0x2000))
  end)
end)
