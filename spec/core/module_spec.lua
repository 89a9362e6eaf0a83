--- The kvm.core module's functions (csrc/core.c) and the façade's available().
local support = require "support"
local ok = support.kvm_ok()

local core_ok, core_err = pcall(require, "kvm.core")

describe("kvm module", function()
  if not core_ok then pending("kvm.core does not load (run make): " .. tostring(core_err)) return end
  local kvm = require "kvm"
  local core = require "kvm.core"

  it("available() is true, or false and why", function()
    local avail, reason = kvm.available()
    if ok then
      assert.is_true(avail)
      assert.is_nil(reason)
    else
      assert.is_false(avail)
      assert.matches("^open /dev/kvm: ", reason)
      local vm, msg, errno = kvm.vm()   -- the io.open convention
      assert.is_nil(vm)
      assert.equal(reason, msg)
      assert.equal("integer", math.type(errno))
    end
  end)

  it("the façade gives the core's functions", function()
    for _, name in ipairs{ "api_version", "check_extension", "supported_cpuid", "vm",
                           "capabilities", "host_info" } do
      assert.equal(core[name], kvm[name], name)
    end
  end)

  it("kvm.STOP is a light userdata, the same in core and façade", function()
    assert.equal("userdata", type(kvm.STOP))
    assert.equal(core.STOP, kvm.STOP)
  end)

  it("host_info() reports booleans", function()
    local h = kvm.host_info()
    for _, k in ipairs{ "pvm", "intel", "amd", "vmx", "svm" } do assert.equal("boolean", type(h[k])) end
  end)

  it("host_info() names the KVM that serves /dev/kvm, consistently with the booleans", function()
    local h = kvm.host_info()
    local available = kvm.available()
    if available then assert.is_string(h.module) end
    assert.equal(h.module == "kvm_pvm", h.pvm)
    assert.equal(h.module == "kvm_amd", h.amd)
    assert.equal(h.module == "kvm_intel", h.intel)
    -- hardware KVM needs the CPU's extension; kvm_pvm is what runs without one
    if h.amd then assert.is_true(h.svm) end
    if h.intel then assert.is_true(h.vmx) end
    if h.pvm then assert.is_false(h.svm or h.vmx) end
    -- under tools/nested.sh the host is QEMU's TCG with kvm_amd
    if os.getenv("LUAKVM_NESTED") == "1" then
      assert.equal("kvm_amd", h.module)
      assert.equal("TCGTCGTCGTCG", h.hypervisor)
    end
  end)

  it("capabilities() maps names to numbers", function()
    local caps = kvm.capabilities()
    assert.equal(0, caps.IRQCHIP)
    assert.equal(3, caps.USER_MEMORY)
    for k, v in pairs(caps) do
      assert.equal("string", type(k))
      assert.equal("integer", math.type(v))
    end
  end)

  describe("check_extension", function()
    -- KVM_CAP_IRQCHIP is 0, KVM_CAP_USER_MEMORY 3, KVM_CAP_EXT_CPUID 7
    it("takes a number, a KVM_CAP_ name or a short name, case-insensitive", function()
      support.need_kvm()
      local caps = kvm.capabilities()
      assert.equal(0, caps.IRQCHIP)
      local by_number = kvm.check_extension(caps.IRQCHIP)
      assert.is_true(by_number > 0)
      for _, name in ipairs{ "KVM_CAP_IRQCHIP", "irqchip", "IRQCHIP", "kvm_cap_irqchip" } do
        assert.equal(by_number, kvm.check_extension(name), name)
      end
      assert.equal(kvm.check_extension(3), kvm.check_extension("user_memory"))
      assert.equal(kvm.check_extension(7), kvm.check_extension("KVM_CAP_EXT_CPUID"))
    end)

    it("returns 0 for a capability number KVM does not know", function()
      support.need_kvm()
      assert.equal(0, kvm.check_extension(0x7fffffff))
    end)

    local bad = {
      { "bogus", "bad argument #1 to 'check_extension' (unknown capability 'bogus')" },
      { "KVM_CAP_BOGUS", "bad argument #1 to 'check_extension' (unknown capability 'KVM_CAP_BOGUS')" },
      { -1, "bad argument #1 to 'check_extension' (capability out of range)" },
      { 0x80000000, "bad argument #1 to 'check_extension' (capability out of range)" },
      { 1.5, "bad argument #1 to 'check_extension' (number has no integer representation)" },
      { {}, "bad argument #1 to 'check_extension' (string expected, got table)" },
      { nil, "bad argument #1 to 'check_extension' (string expected, got no value)" },
    }
    for _, c in ipairs(bad) do
      it("raises for " .. tostring(c[1]), function()
        local arg = c[1]
        assert.equal(c[2], support.err(function()
          if arg == nil then kvm.check_extension() else kvm.check_extension(arg) end
        end))
      end)
    end
  end)

  describe("with /dev/kvm", function()
    it("api_version() is 12", function()
      support.need_kvm()
      assert.equal(12, kvm.api_version())
    end)

    it("supported_cpuid() is an array of {func, index, flags, eax, ebx, ecx, edx}", function()
      support.need_kvm()
      local t = kvm.supported_cpuid()
      assert.equal("table", type(t))
      assert.is_true(#t > 0)
      local keys = { "func", "index", "flags", "eax", "ebx", "ecx", "edx" }
      local leaf0
      for i, e in ipairs(t) do
        local n = 0
        for _ in pairs(e) do n = n + 1 end
        assert.equal(#keys, n, "entry " .. i)
        for _, k in ipairs(keys) do
          assert.equal("integer", math.type(e[k]), "entry " .. i .. " " .. k)
          assert.is_true(e[k] >= 0 and e[k] <= 0xffffffff, "entry " .. i .. " " .. k)
        end
        if e.func == 0 then leaf0 = e end
      end
      -- leaf 0: the highest basic leaf, and the vendor string in ebx, edx, ecx
      assert.is_not_nil(leaf0)
      assert.is_true(leaf0.eax >= 1)
      local vendor = string.pack("<I4I4I4", leaf0.ebx, leaf0.edx, leaf0.ecx)
      assert.matches("^[%w ]+$", vendor)
    end)

    it("vm() returns a kvm.vm", function()
      support.need_kvm()
      local vm = assert(kvm.vm())
      assert.matches("^kvm%.vm %(fd %d+, 0 regions, 0 KiB%)$", tostring(vm))
      vm:close()
    end)
  end)
end)
