-- kvm.linux.plan and apply without KVM: the plan of an ELF and of a bzImage
-- as plain data, its checks, the hooks; apply's steps on a stand-in VM that
-- logs every call (which steps run, in what order, what a failure closes).
local support = require "support"
local kvm = require "kvm"
local linux = require "kvm.linux"
local e820 = require "kvm.e820"
local bootparams = require "kvm.bootparams"
local cpuid = require "kvm.cpuid"

local MiB = 1 << 20
local MEM = 32 * MiB

-- the CPUID a plan starts from (instead of kvm.supported_cpuid(): no KVM here)
local function entries(pdpe1gb)
  return {
    { func = 0, index = 0, flags = 0, eax = 0xd, ebx = 0, ecx = 0, edx = 0 },
    { func = 1, index = 0, flags = 0, eax = 0x800f12, ebx = 0x01000800, ecx = 0, edx = 0 },
    { func = 0x80000001, index = 0, flags = 0, eax = 0, ebx = 0, ecx = 0, edx = pdpe1gb and 1 << 26 or 0 },
  }
end

-- an ELF64 kernel: one PT_LOAD at 2 MiB, entering there
local function elf()
  return support.make_elf{ entry = 0x200000, segments = {
    { paddr = 0x200000, vaddr = 0xffffffff80200000, data = ("\x90"):rep(16), memsz = 64 } } }
end

-- Every value in t is a number, string, boolean or such a table, without
-- metatables; returns nil or the path of the first that is not.
local function not_plain(t, path, seen)
  seen = seen or {}
  if seen[t] then return nil end
  seen[t] = true
  if getmetatable(t) then return path .. " has a metatable" end
  for k, v in pairs(t) do
    local p = path .. "." .. tostring(k)
    local ty = type(v)
    if ty == "table" then
      local bad = not_plain(v, p, seen)
      if bad then return bad end
    elseif ty ~= "number" and ty ~= "string" and ty ~= "boolean" then
      return p .. " is a " .. ty
    end
  end
end

describe("kvm.linux.plan", function()
  local files = {}
  local function tmpfile(bytes) return support.write_tmp(bytes, files) end
  teardown(function() for _, p in ipairs(files) do os.remove(p) end end)

  local function plan(o)
    local t = { memory = MEM, profile = false, cpuid_entries = entries() }
    for k, v in pairs(o) do t[k] = v end
    return linux.plan(t)
  end

  it("plans an ELF vmlinux: RAM, e820, placements, zero page, ACPI, CPUID, registers", function()
    local path = tmpfile(elf())
    local p = assert(plan{ kernel = path })
    assert.equal("elf", p.kind)
    assert.same({ size = #elf(), path = path }, p.kernel)
    assert.is_nil(p.entry)                   -- the ELF's own, known when it is loaded
    assert.is_nil(p.initrd)
    assert.equal(MEM, p.memory)
    assert.same({ { guest = 0, size = MEM } }, p.ram)
    assert.equal(linux.DEFAULT_CMDLINE, p.cmdline)
    assert.equal(2047, p.cmdline_size)
    local want = { memory = MEM }
    for k, v in pairs(linux.DEFAULT_LAYOUT) do want[k] = v end
    assert.same(want, p.layout)
    assert.same({
      { addr = 0, size = 0x9fc00, type = e820.RAM },
      { addr = 0x9fc00, size = 0x60400, type = e820.RESERVED },
      { addr = 0x100000, size = MEM - 0x100000, type = e820.RAM },
      { addr = 0xfeffc000, size = 0x4000, type = e820.RESERVED },   -- identity map + TSS
    }, p.e820)
    assert.same({ { name = "gdt", addr = 0x500, size = 32 }, { name = "zero_page", addr = 0x7000, size = 4096 },
                  { name = "page_tables", addr = 0x9000, size = 0x6000 },
                  { name = "cmdline", addr = 0x20000, size = #p.cmdline + 1 } }, p.ranges)
    local hdr = p.bootparams.hdr
    assert.equal(0xaa55, hdr.boot_flag)
    assert.equal(bootparams.HDRS_MAGIC, hdr.header)
    assert.equal(0xff, hdr.type_of_loader)
    assert.equal(0x20000, hdr.cmd_line_ptr)
    assert.equal(bootparams.LOADED_HIGH | bootparams.CAN_USE_HEAP, hdr.loadflags)
    assert.is_nil(p.bootparams.e820)         -- plan.e820 is the zero page's map
    assert.equal(0xe0000, p.acpi.rsdp)
    assert.equal(p.acpi.rsdp, p.bootparams.acpi_rsdp_addr)
    assert.equal(cpuid.HYPERVISOR_BIT, cpuid.find(p.cpuid, 1).ecx & cpuid.HYPERVISOR_BIT)
    assert.same({ gdt = 0x500, page_tables = 0x9000, map_size = 4 << 30, huge_1g = false }, p.long_mode)
    assert.same({ rsi = 0x7000, rflags = 2, rsp = 0 }, p.registers)
    assert.same({ serial = { port = 0x3f8, irq = 4 }, legacy = true, power = true }, p.devices)
    assert.is_false(p.profile)
    -- and it packs: the zero page apply writes
    local bp = {}
    for k, v in pairs(p.bootparams) do bp[k] = v end
    bp.e820 = p.e820
    local back = bootparams.unpack(bootparams.pack(bp))
    assert.same(p.e820, back.e820)
  end)

  it("plans a bzImage: loaded at pref_address, entry 0x200 in, the initrd at the top of RAM", function()
    local path = tmpfile(support.make_bzimage())
    local initrd = tmpfile(("I"):rep(5000))
    local p = assert(plan{ kernel = path, initrd = initrd, cmdline = "console=ttyS0", append = "quiet",
                           cpuid_entries = entries(true) })
    assert.equal("bzimage", p.kind)
    assert.equal(0x1000000, p.kernel.load_addr)
    assert.equal(0x1000200, p.entry)
    assert.equal(4096, p.kernel.image)
    assert.equal(0x20000, p.kernel.need)       -- init_size
    assert.equal("console=ttyS0 quiet", p.cmdline)
    assert.equal(255, p.cmdline_size)
    assert.same({ path = initrd, size = 5000, addr = (MEM - 5000) & ~0xfff }, p.initrd)
    local hdr = p.bootparams.hdr
    assert.equal(0x1000000, hdr.code32_start)
    assert.equal(p.initrd.addr, hdr.ramdisk_image)
    assert.equal(5000, hdr.ramdisk_size)
    assert.equal(0x020f, hdr.version)
    assert.is_true(p.long_mode.huge_1g)      -- the guest's CPUID offers pdpe1gb
    assert.same({ name = "kernel", addr = 0x1000000, size = 0x20000 }, p.ranges[5])
    assert.same({ name = "initrd", addr = p.initrd.addr, size = 5000 }, p.ranges[6])
  end)

  it("is plain data: numbers, strings, booleans and tables, no metatables", function()
    for _, bytes in ipairs{ elf(), support.make_bzimage() } do
      local p = assert(plan{ kernel = tmpfile(bytes), initrd = tmpfile("x") })
      assert.is_nil(not_plain(p, "plan"))
    end
  end)

  it("takes RAM regions: the memory slots and the e820 map follow them", function()
    local p = assert(plan{ kernel = tmpfile(elf()), memory = nil,
                           ram = { { guest = 0, size = 24 * MiB }, { guest = 64 * MiB, size = 8 * MiB } } })
    assert.equal(32 * MiB, p.memory)
    assert.same({ addr = 0x100000, size = 23 * MiB, type = e820.RAM }, p.e820[3])
    assert.same({ addr = 64 * MiB, size = 8 * MiB, type = e820.RAM }, p.e820[4])
  end)

  it("runs the hooks: bootparams (with e820 as a kvm.e820 map) and cpuid", function()
    local p = assert(plan{ kernel = tmpfile(elf()),
      bootparams = function(bp)
        bp.hdr.vid_mode = 0xfffd
        bp.e820:reserve(0xfec00000, 0x1000)   -- a method of kvm.e820 maps
      end,
      cpuid = function(list) return { list[1] } end })
    assert.equal(0xfffd, p.bootparams.hdr.vid_mode)
    assert.equal(5, #p.e820)
    assert.same({ addr = 0xfec00000, size = 0x1000, type = e820.RESERVED }, p.e820[4])
    assert.equal(1, #p.cpuid)
    local boom = function() error("hook failed", 0) end
    assert.has_error(function() plan{ kernel = tmpfile(elf()), bootparams = boom } end, "hook failed")
    assert.has_error(function() plan{ kernel = tmpfile(elf()), cpuid = boom } end, "hook failed")
  end)

  it("plans virtio devices: disks then rng in the slots, the DSDT, no nomodules", function()
    local kernel = tmpfile(elf())
    local d1, d2 = tmpfile(("\0"):rep(4096)), tmpfile(("\0"):rep(1024))
    local p = assert(plan{ kernel = kernel, disks = { d1, { path = d2, readonly = true, discard = false } }, rng = true })
    assert.same({
      { kind = "blk", path = d1, readonly = false, size = 4096, base = 0xfeb00000, irq = 16 },
      { kind = "blk", path = d2, readonly = true, discard = false, size = 1024, base = 0xfeb00200, irq = 17 },
      { kind = "rng", base = 0xfeb00400, irq = 18 },
    }, p.devices.virtio)
    assert.is_nil(not_plain(p, "plan"))
    assert.equal(linux.DEFAULT_CMDLINE:gsub(" nomodules", ""), p.cmdline)
    local dsdt
    for _, b in ipairs(p.acpi.blobs) do if b.name == "DSDT" then dsdt = b.bytes end end
    local n = 0
    for _ in dsdt:gmatch("LNRO0005") do n = n + 1 end
    assert.equal(3, n)
    -- a command line of one's own is left as it is
    assert.equal("console=ttyS0 nomodules", plan{ kernel = kernel, rng = true, cmdline = "console=ttyS0 nomodules" }.cmdline)
    assert.is_nil(plan{ kernel = kernel }.devices.virtio)
    assert.same({ nil, "/nonexistent.img: No such file or directory" },
      { plan{ kernel = kernel, disks = { "/nonexistent.img" } } })
    local nine = {}
    for i = 1, 9 do nine[i] = d1 end
    assert.same({ nil, "9 virtio devices, at most 8" }, { plan{ kernel = kernel, disks = nine } })
    assert.equal("linux.plan: disks[1] must be a path or {path = string, readonly = boolean}",
      support.err(function() plan{ kernel = kernel, disks = { 1 } } end))
    assert.equal("linux.plan: disks[1].readonly must be a boolean",
      support.err(function() plan{ kernel = kernel, disks = { { path = d1, readonly = "yes" } } } end))
    assert.equal("linux.plan: disks[1].discard must be a boolean",
      support.err(function() plan{ kernel = kernel, disks = { { path = d1, discard = 0 } } } end))
    assert.equal("linux.plan: 'rng' must be a boolean", support.err(function() plan{ kernel = kernel, rng = 1 } end))
    -- a virtio console after them, and it also needs the modules
    local c = assert(plan{ kernel = kernel, rng = true, virtio_console = { output = false } })
    assert.same({ { kind = "rng", base = 0xfeb00000, irq = 16 },
                  { kind = "console", output = false, base = 0xfeb00200, irq = 17 } }, c.devices.virtio)
    assert.is_nil(c.cmdline:find("nomodules", 1, true))
    assert.equal("linux.plan: 'virtio_console' must be a table {output =, input =}",
      support.err(function() plan{ kernel = kernel, virtio_console = true } end))
  end)

  it("plans virtio devices written in Lua after the others, their options as given", function()
    local kernel = tmpfile(elf())
    local d1 = tmpfile(("\0"):rep(4096))
    local fn = function() end
    local cow = { type = "block", on_queue = fn, config = "x" }
    local p = assert(plan{ kernel = kernel, disks = { d1 }, virtio = { cow, { type = "entropy", on_queue = fn } } })
    assert.same({ "blk", "lua", "lua" }, { p.devices.virtio[1].kind, p.devices.virtio[2].kind, p.devices.virtio[3].kind })
    assert.equal(cow, p.devices.virtio[2].options)
    assert.same({ 0xfeb00200, 17, 0xfeb00400, 18 }, { p.devices.virtio[2].base, p.devices.virtio[2].irq,
                                                    p.devices.virtio[3].base, p.devices.virtio[3].irq })
    assert.is_true(linux.wants_modules{ virtio = { cow } })
    assert.is_false(linux.wants_modules{ virtio = {} })
    assert.is_nil(p.cmdline:find("nomodules", 1, true))
    local dsdt
    for _, b in ipairs(p.acpi.blobs) do if b.name == "DSDT" then dsdt = b.bytes end end
    local n = 0
    for _ in dsdt:gmatch("LNRO0005") do n = n + 1 end
    assert.equal(3, n)
    for _, case in ipairs{
      { 1, "linux.plan: 'virtio' must be a list of vm:virtio options" },
      { { 1 }, "linux.plan: virtio[1] must be vm:virtio's options, with an on_queue function" },
      { { { type = "block" } }, "linux.plan: virtio[1] must be vm:virtio's options, with an on_queue function" },
      { { { type = "block", on_queue = fn, irq = 5 } },
        "linux.plan: virtio[1]: 'base' and 'irq' are the plan's (the next free slot)" },
    } do
      assert.equal(case[2], support.err(function() plan{ kernel = kernel, virtio = case[1] } end))
    end
  end)

  it("returns nil and a message for what does not fit, and raises on bad options", function()
    local kernel = tmpfile(support.make_bzimage())
    assert.same({ nil, ("layout: zero_page (0x20000-0x20fff) overlaps cmdline (0x20000-0x%x)"):format(
      0x20000 + #linux.DEFAULT_CMDLINE) }, { plan{ kernel = kernel, layout = { zero_page = 0x20000 } } })
    assert.same({ nil, "command line is 256 bytes, the kernel accepts at most 255" },
      { plan{ kernel = kernel, cmdline = ("x"):rep(256) } })
    assert.same({ nil, "acpi.build: opts.cpus = 0 out of range (1..255)" },
      { plan{ kernel = kernel, acpi = { cpus = 0 } } })
    assert.equal("linux.plan: options table expected", support.err(function() linux.plan() end))
    assert.equal("linux.plan: 'kernel' (a path) is required", support.err(function() linux.plan{} end))
    assert.equal("linux.plan: 'memory' must be an integer number of bytes, >= 16 MiB, a multiple of 2 MiB",
      support.err(function() plan{ kernel = kernel, memory = 3 * MiB } end))
    assert.equal("linux.plan: ram[1] must start at guest address 0",
      support.err(function() plan{ kernel = kernel, ram = { { guest = MiB, size = MEM } } } end))
  end)
end)

describe("kvm.linux.apply on a stand-in VM", function()
  local files = {}
  teardown(function() for _, p in ipairs(files) do os.remove(p) end end)

  -- an object whose every method call is logged as "what:method" and
  -- returns true; memory and vcpu return such objects of their own
  local function fake(log, what)
    return setmetatable({}, { __index = function(_, method)
      return function(_, ...)
        log[#log + 1] = what .. ":" .. method
        if method == "memory" or method == "vcpu" then return fake(log, method) end
        if method == "load_elf" then return { entry = 0x200000, low = 0x200000, high = 0x200040 } end
        return true
      end
    end })
  end

  local real_vm, log
  before_each(function()
    log = {}
    real_vm = kvm.vm
    kvm.vm = function() log[#log + 1] = "kvm.vm" return fake(log, "vm") end
  end)
  after_each(function() kvm.vm = real_vm end)

  local function the_plan()
    return assert(linux.plan{ kernel = support.write_tmp(elf(), files), memory = MEM, profile = false,
                              cpuid_entries = entries() })
  end

  -- the steps that ran, from the log of calls
  local function calls(prefix)
    local out = {}
    for _, c in ipairs(log) do if c:find(prefix, 1, true) == 1 then out[#out + 1] = c end end
    return out
  end

  it("runs the default steps in linux.ORDER and hands the VM over", function()
    assert.same({ "memory", "platform", "kernel", "initrd", "cmdline", "acpi", "zero_page", "devices",
                  "vcpu", "cpuid", "long_mode", "registers" }, linux.ORDER)
    local ctx = assert(linux.apply(the_plan()))
    assert.equal(0x200000, ctx.entry)
    assert.equal("kvm.vm", log[1])
    assert.same({ "vm:memory", "vm:identity_map_addr", "vm:tss_addr", "vm:irqchip", "vm:pit", "vm:load_elf" },
      { table.unpack(log, 2, 7) })
    assert.same({ "vcpu:set_cpuid", "vcpu:set_sregs", "vcpu:set_regs" }, calls("vcpu:"))
    assert.same({}, calls("vm:close"))
    assert.equal(tostring(e820.from_entries(ctx.plan.e820)), tostring(ctx.e820))
  end)

  it("replaces a step for one call only; linux.STEPS is not changed", function()
    local before = {}
    for k, v in pairs(linux.STEPS) do before[k] = v end
    local seen
    local ctx = assert(linux.apply(the_plan(), {
      cmdline = function(c, p) seen = p.cmdline; c.mine = true end,
      acpi = false,
    }))
    assert.equal(linux.DEFAULT_CMDLINE, seen)
    assert.is_true(ctx.mine)
    assert.same(before, linux.STEPS)
    for k, v in pairs(before) do assert.equal(v, linux.STEPS[k], k) end
    -- the next call has the defaults again
    log = {}
    ctx = assert(linux.apply(the_plan()))
    assert.is_nil(ctx.mine)
  end)

  it("closes the vCPU, the memory and the VM when a step fails or raises", function()
    local ctx, err = linux.apply(the_plan(), { long_mode = function() return nil, "no long mode today" end })
    assert.is_nil(ctx)
    assert.equal("no long mode today", err)
    assert.same({ "vcpu:close", "memory:close", "vm:close" }, { table.unpack(log, #log - 2) })
    log = {}
    assert.has_error(function()
      linux.apply(the_plan(), { kernel = function() error("step raised", 0) end })
    end, "step raised")
    assert.same({ "memory:close", "vm:close" }, { table.unpack(log, #log - 1) })
    log = {}
    assert.same({ nil, "linux.apply: step 'vcpu' failed" },
      { linux.apply(the_plan(), { vcpu = function() return false end }) })
  end)

  it("raises on a bad steps table before any VM exists", function()
    assert.equal("linux.apply: unknown step 'kernal' (steps: " .. table.concat(linux.ORDER, ", ") .. ")",
      support.err(function() linux.apply(the_plan(), { kernal = function() end }) end))
    assert.equal("linux.apply: step 'kernel' must be a function or false, got number",
      support.err(function() linux.apply(the_plan(), { kernel = 1 }) end))
    assert.equal("linux.apply: steps must be a table of functions by name, got string",
      support.err(function() linux.apply(the_plan(), "steps") end))
    assert.same({}, calls("kvm.vm"))
  end)
end)
