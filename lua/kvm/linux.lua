--- Boot a Linux kernel (ELF vmlinux or bzImage) with the 64-bit boot protocol.
--
-- Two halves. `linux.plan(opts)` works out everything that needs no VM: what
-- the kernel file is, the command line, where everything goes, the RAM
-- regions, the e820 map, the ACPI tables, the zero page (boot_params) and the
-- CPUID table, as plain data to print or change. `linux.apply(plan, steps)`
-- creates the VM and runs the steps (`linux.ORDER`, functions in
-- `linux.STEPS`) that put the plan into it; a call replaces any of them with
-- `steps = {name = function(ctx, plan) ... end}`. `linux.setup(opts)` is
-- `apply(plan(opts), opts.steps)`, `linux.run` runs the result and
-- `linux.boot` does both.
--
--     local linux = require "kvm.linux"
--     local plan = assert(linux.plan{ kernel = "vmlinux", memory = 128 << 20 })
--     plan.cmdline = plan.cmdline .. " quiet"
--     local ctx = assert(linux.apply(plan, { initrd = false }))
--     print(linux.run(ctx))
--
-- @module kvm.linux
local kvm = require "kvm"
local x86 = require "kvm.x86"
local bootparams = require "kvm.bootparams"
local e820 = require "kvm.e820"
local hostprofile = require "kvm.hostprofile"
local acpi = require "kvm.acpi"
local cpuid = require "kvm.cpuid"

local fmt = string.format
local ult = math.ult

local linux = {}

local MiB, GiB = 1 << 20, 1 << 30

--- Kernel parameters for a quick, quiet boot on this VMM: serial console,
-- no PCI scan (the PCI ports report no devices), a minimal i8042, reboot
-- through the keyboard controller (which stops run() with "reset").
linux.DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 " ..
  "pci=off nomodules 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

linux.DEFAULT_MEMORY = 128 * MiB
--- The most vCPUs `cpus` may ask for (each is a host thread while the guest runs).
linux.MAX_CPUS = 64

--- Start of the 32-bit PCI/MMIO hole: RAM above this moves to 4 GiB.
linux.HOLE_START = 3 * GiB

--- The PC's legacy hole, reserved in the e820 map: the EBDA at 0x9fc00 up to
-- 1 MiB (VGA memory, option ROMs, BIOS; the ACPI tables go in it).
linux.LEGACY_HOLE = { addr = 0x9fc00, size = 0x100000 - 0x9fc00 }

--- Default placements (guest-physical), the one table of them: the GDT is
-- kvm.x86's, the ACPI tables kvm.acpi's default base. `initrd` and `kernel`
-- are computed (initrd: top of low RAM; kernel: from the file) unless given.
linux.DEFAULT_LAYOUT = {
  gdt = x86.DEFAULT_LAYOUT.gdt, -- 4 descriptors: null, null, code 0x10, data 0x18
  zero_page = 0x7000,       -- struct boot_params, 4 KiB
  page_tables = 0x9000,     -- PML4, PDPT, page directories (6 pages for 4 GiB)
  cmdline = 0x20000,        -- up to cmdline_size bytes
  identity_map = 0xfeffc000, -- VT-x real-mode identity page (1 page)
  tss = 0xfeffd000,         -- VT-x TSS (3 pages)
  acpi = acpi.BASE,         -- ACPI tables (kvm.acpi), in the reserved legacy hole
}

--- Bytes each fixed placement takes.
linux.SIZES = { gdt = 32, zero_page = bootparams.SIZE, page_tables = 0x6000,
                identity_map = 0x1000, tss = 0x3000 }

local function hex(v) return fmt("0x%x", v) end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

--- A complete layout: the defaults, overridden by `user`, for `memory` bytes.
-- @tparam integer memory RAM size in bytes
-- @tparam[opt] table user placements to override
-- @treturn table layout
function linux.layout(memory, user)
  local l = copy(linux.DEFAULT_LAYOUT)
  for k, v in pairs(user or {}) do l[k] = v end
  l.memory = memory
  return l
end

--- RAM regions for `memory` bytes: below the 3 GiB hole, and the rest from 4 GiB.
-- (The default of `opts.ram`.)
-- @treturn table array of {guest=, size=}
function linux.ram_regions(memory)
  if memory <= linux.HOLE_START then return { { guest = 0, size = memory } } end
  return { { guest = 0, size = linux.HOLE_START },
           { guest = 4 * GiB, size = memory - linux.HOLE_START } }
end

--- The e820 map the guest sees: RAM below the EBDA, the legacy hole
-- reserved, RAM from 1 MiB, every other region as RAM, the VT-x TSS and
-- identity-map pages reserved.
-- @tparam table layout from `linux.layout`
-- @tparam[opt] table regions RAM regions (default `linux.ram_regions(layout.memory)`);
--   the first starts at 0
-- @return an e820 map (kvm.e820)
function linux.e820_map(layout, regions)
  regions = regions or linux.ram_regions(layout.memory)
  local hole = linux.LEGACY_HOLE
  local high = hole.addr + hole.size
  local map = e820.new()
  map:add_ram(0, hole.addr)
  map:reserve(hole.addr, hole.size)
  map:add_ram(high, regions[1].guest + regions[1].size - high)
  for i = 2, #regions do map:add_ram(regions[i].guest, regions[i].size) end
  map:reserve(layout.identity_map, linux.SIZES.identity_map)
  map:reserve(layout.tss, linux.SIZES.tss)
  return map
end

--- What a kernel file is.
-- @tparam string path
-- @treturn string "elf" or "bzimage"
-- @treturn table `{size=}`; for a bzImage also the setup header as `hdr` and
--   the rest of kvm.bootparams.read_setup_header's info
-- @return[2] nil, message
function linux.probe(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local head = f:read(0x1000) or ""
  local size = f:seek("end")
  f:close()
  if head:sub(1, 4) == "\127ELF" then return "elf", { size = size } end
  if #head >= 0x206 and head:sub(0x203, 0x206) == "HdrS" then
    local hdr, info = bootparams.read_setup_header(head)
    if not hdr then return nil, path .. ": " .. info end
    info.size = size
    info.hdr = hdr
    return "bzimage", info
  end
  return nil, path .. ": neither an ELF vmlinux nor a bzImage"
end

-- [a, a+n) and [b, b+m) overlap?
local function overlaps(a, n, b, m)
  return ult(a, b + m) and ult(b, a + n)
end

--- Check that the named ranges neither overlap nor leave RAM.
-- @tparam table ranges array of {name=, addr=, size=}
-- @tparam table regions RAM regions ({guest=, size=})
-- @raise "layout: zero_page (0x7000-0x7fff) overlaps cmdline (...)"
function linux.check_ranges(ranges, regions)
  for i, r in ipairs(ranges) do
    local inside = false
    for _, g in ipairs(regions) do
      if not ult(r.addr, g.guest) and not ult(g.guest + g.size, r.addr + r.size)
         and not ult(r.addr + r.size, r.addr) then inside = true end
    end
    if not inside then
      error(fmt("layout: %s (%s-%s) is outside guest RAM", r.name, hex(r.addr),
        hex(r.addr + r.size - 1)), 0)
    end
    for j = i + 1, #ranges do
      local o = ranges[j]
      if overlaps(r.addr, r.size, o.addr, o.size) then
        error(fmt("layout: %s (%s-%s) overlaps %s (%s-%s)", r.name, hex(r.addr),
          hex(r.addr + r.size - 1), o.name, hex(o.addr), hex(o.addr + o.size - 1)), 0)
      end
    end
  end
end

local function file_size(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local size = f:seek("end")
  f:close()
  if not size then return nil, path .. ": cannot seek (not a regular file?)" end
  return size
end

--- Virtio-mmio slots: device i (from 0) has 0x200 bytes of registers at
-- `VIRTIO_BASE + i * 0x200` (as QEMU's microvm) and GSI `VIRTIO_IRQ + i`
-- (IOAPIC pins 16-23: no ISA device's); at most `VIRTIO_MAX` devices.
linux.VIRTIO_BASE = 0xfeb00000
linux.VIRTIO_IRQ = 16
linux.VIRTIO_MAX = 8

--- Does a boot with these options need the kernel's modules (the virtio
-- drivers, modules in Debian's cloud kernel)? True with `disks`, `rng`,
-- `virtio_console` or `virtio`.
-- @tparam table opts
-- @treturn boolean
function linux.wants_modules(opts)
  return (type(opts.disks) == "table" and #opts.disks > 0) or opts.rng == true
    or opts.virtio_console ~= nil or (type(opts.virtio) == "table" and #opts.virtio > 0)
end

--- The command line: `opts.cmdline` (default `linux.DEFAULT_CMDLINE`, without
-- `nomodules` when `linux.wants_modules(opts)`), the host profile's
-- parameters, then `opts.append`.
-- @tparam table opts
-- @tparam[opt] table profile a host profile (kvm.hostprofile)
-- @treturn string
function linux.cmdline(opts, profile)
  local cmdline = opts.cmdline or linux.DEFAULT_CMDLINE
  if not opts.cmdline and linux.wants_modules(opts) then
    cmdline = cmdline:gsub(" nomodules", "", 1)     -- the virtio drivers are modules
  end
  if profile and profile.cmdline and profile.cmdline ~= "" then
    cmdline = cmdline .. " " .. profile.cmdline
  end
  if opts.append and opts.append ~= "" then cmdline = cmdline .. " " .. opts.append end
  return cmdline
end

-- ---- the plan ----

-- The options a plan cannot do without; raises (level 3: plan's caller) on a
-- programmer mistake. Returns memory and the RAM regions.
local function check_opts(opts)
  if type(opts) ~= "table" then error("linux.plan: options table expected", 3) end
  if type(opts.kernel) ~= "string" then error("linux.plan: 'kernel' (a path) is required", 3) end
  local cpus = opts.cpus
  if cpus ~= nil and (math.type(cpus) ~= "integer" or cpus < 1 or cpus > linux.MAX_CPUS) then
    error(fmt("linux.plan: 'cpus' must be an integer 1..%d", linux.MAX_CPUS), 3)
  end
  local ram, memory = nil, opts.memory
  if opts.ram ~= nil then
    if type(opts.ram) ~= "table" or #opts.ram == 0 then
      error("linux.plan: 'ram' must be a list of {guest=, size=}", 3)
    end
    local sum = 0
    ram = {}                                -- the plan's own copy
    for i, r in ipairs(opts.ram) do
      if type(r) ~= "table" or math.type(r.guest) ~= "integer" or math.type(r.size) ~= "integer"
         or r.size <= 0 then
        error(fmt("linux.plan: ram[%d] must be {guest = integer, size = integer > 0}", i), 3)
      end
      ram[i] = { guest = r.guest, size = r.size }
      sum = sum + r.size
    end
    if ram[1].guest ~= 0 then error("linux.plan: ram[1] must start at guest address 0", 3) end
    memory = memory or sum
  end
  memory = memory or linux.DEFAULT_MEMORY
  if math.type(memory) ~= "integer" or memory < 16 * MiB or memory & 0x1fffff ~= 0 then
    error("linux.plan: 'memory' must be an integer number of bytes, >= 16 MiB, a multiple of 2 MiB", 3)
  end
  return memory, ram or linux.ram_regions(memory)
end

-- The kernel, initrd and command line: plan.kind, kernel, initrd, cmdline.
local function plan_files(p, opts)
  local kind, kinfo = linux.probe(opts.kernel)
  if not kind then return nil, kinfo end
  kinfo.path = opts.kernel
  p.kind, p.kernel = kind, kinfo
  if opts.initrd then
    local size, err = file_size(opts.initrd)
    if not size then return nil, err end
    p.initrd = { path = opts.initrd, size = size }
  end
  local cmdline = linux.cmdline(opts, p.profile)
  local max = kind == "bzimage" and kinfo.hdr.cmdline_size or 2047
  if #cmdline > max then
    return nil, fmt("command line is %d bytes, the kernel accepts at most %d", #cmdline, max)
  end
  if cmdline:find("\0", 1, true) then return nil, "command line contains a NUL byte" end
  p.cmdline, p.cmdline_size = cmdline, max
  return true
end

-- Where a bzImage goes (plan.kernel.load_addr, image, need; plan.entry); an
-- ELF only has to fit (it goes where its program headers say, at apply).
local function place_kernel(p, top)
  local k, path = p.kernel, p.kernel.path
  if p.kind == "elf" then
    if k.size > p.memory then
      return nil, fmt("%s: kernel file (%d MiB) is bigger than RAM (%d MiB)", path,
        k.size >> 20, p.memory >> 20)
    end
    return true
  end
  local hdr = k.hdr
  local image = k.size - k.kernel_offset
  if image <= 0 then return nil, path .. ": bzImage has no protected-mode kernel" end
  local load_addr = p.layout.kernel
  if not load_addr then
    if hdr.relocatable_kernel ~= 0 then
      load_addr = hdr.pref_address
      if not load_addr or load_addr == 0 then load_addr = 0x1000000 end
    else
      load_addr = 0x100000
    end
  end
  local need = math.max(image, hdr.init_size or image)
  if ult(top, load_addr + need) then
    return nil, fmt("%s: kernel needs %s-%s (init_size), more than the %d MiB of RAM",
      path, hex(load_addr), hex(load_addr + need - 1), p.memory >> 20)
  end
  k.image, k.load_addr, k.need = image, load_addr, need
  p.entry = load_addr + 0x200               -- the 64-bit entry point
  return true
end

-- The initrd: top of low RAM, below initrd_addr_max, page-aligned.
local function place_initrd(p, top)
  local rd = p.initrd
  if not rd then return true end
  local max = (p.kind == "bzimage" and p.kernel.hdr.initrd_addr_max or 0x7fffffff) + 1
  local limit = ult(top, max) and top or max
  if rd.size >= limit then
    return nil, fmt("%s: initrd (%d bytes) does not fit below %s", rd.path, rd.size, hex(limit))
  end
  rd.addr = p.layout.initrd or ((limit - rd.size) & ~0xfff)
  return true
end

-- Placements: the kernel, the initrd, and plan.ranges checked against plan.ram.
local function plan_layout(p)
  local l, sz = p.layout, linux.SIZES
  local top = p.ram[1].guest + p.ram[1].size  -- initrd and boot data stay below the hole
  p.ranges = {
    { name = "gdt", addr = l.gdt, size = sz.gdt },
    { name = "zero_page", addr = l.zero_page, size = sz.zero_page },
    { name = "page_tables", addr = l.page_tables, size = sz.page_tables },
    { name = "cmdline", addr = l.cmdline, size = #p.cmdline + 1 },
  }
  local ok, err = place_kernel(p, top)
  if not ok then return nil, err end
  if p.kind == "bzimage" then
    p.ranges[#p.ranges + 1] = { name = "kernel", addr = p.kernel.load_addr, size = p.kernel.need }
  end
  ok, err = place_initrd(p, top)
  if not ok then return nil, err end
  if p.initrd then
    p.ranges[#p.ranges + 1] = { name = "initrd", addr = p.initrd.addr, size = math.max(p.initrd.size, 1) }
  end
  return pcall(linux.check_ranges, p.ranges, p.ram)
end

-- The virtio devices: plan.virtio = {{kind = "blk", path=, readonly=,
-- discard= (only when given), base=, irq=} or {kind = "rng", base=, irq=},
-- ...}, the disks first, the Lua devices (`opts.virtio`: {kind = "lua",
-- options = vm:virtio's}) last; raises (level 3: plan's caller) on bad
-- options, nil + message for a disk that is missing.
local function plan_virtio(p, opts)
  local list = {}
  if opts.disks ~= nil and type(opts.disks) ~= "table" then
    error("linux.plan: 'disks' must be a list of {path =, readonly =}", 3)
  end
  for i, d in ipairs(opts.disks or {}) do
    if type(d) == "string" then d = { path = d } end
    if type(d) ~= "table" or type(d.path) ~= "string" then
      error(fmt("linux.plan: disks[%d] must be a path or {path = string, readonly = boolean}", i), 3)
    end
    if d.readonly ~= nil and type(d.readonly) ~= "boolean" then
      error(fmt("linux.plan: disks[%d].readonly must be a boolean", i), 3)
    end
    if d.discard ~= nil and type(d.discard) ~= "boolean" then
      error(fmt("linux.plan: disks[%d].discard must be a boolean", i), 3)
    end
    local size, err = file_size(d.path)
    if not size then return nil, err end
    list[#list + 1] = { kind = "blk", path = d.path, readonly = d.readonly or false, discard = d.discard,
                        size = size }
  end
  if opts.rng ~= nil and type(opts.rng) ~= "boolean" then error("linux.plan: 'rng' must be a boolean", 3) end
  if opts.rng then list[#list + 1] = { kind = "rng" } end
  local con = opts.virtio_console
  if con ~= nil then
    if type(con) ~= "table" then error("linux.plan: 'virtio_console' must be a table {output =, input =}", 3) end
    list[#list + 1] = { kind = "console", output = con.output, input = con.input }
  end
  if opts.virtio ~= nil and type(opts.virtio) ~= "table" then
    error("linux.plan: 'virtio' must be a list of vm:virtio options", 3)
  end
  for i, d in ipairs(opts.virtio or {}) do
    if type(d) ~= "table" or type(d.on_queue) ~= "function" then
      error(fmt("linux.plan: virtio[%d] must be vm:virtio's options, with an on_queue function", i), 3)
    end
    if d.base ~= nil or d.irq ~= nil then
      error(fmt("linux.plan: virtio[%d]: 'base' and 'irq' are the plan's (the next free slot)", i), 3)
    end
    list[#list + 1] = { kind = "lua", options = d }
  end
  if #list > linux.VIRTIO_MAX then
    return nil, fmt("%d virtio devices, at most %d", #list, linux.VIRTIO_MAX)
  end
  for i, d in ipairs(list) do
    d.base = linux.VIRTIO_BASE + (i - 1) * 0x200
    d.irq = linux.VIRTIO_IRQ + i - 1
  end
  p.virtio = list
  return true
end

-- The ACPI tables (false with opts.acpi = false; a table of options adds to
-- kvm.acpi.build's).
local function plan_acpi(p, opts)
  if opts.acpi == false then return false end
  local aopts = { base = p.layout.acpi, cpus = p.cpus, irq0_gsi = 0 }  -- KVM routes the PIT to IOAPIC pin 0
  if #p.virtio > 0 then
    aopts.virtio = {}
    for i, d in ipairs(p.virtio) do aopts.virtio[i] = { base = d.base, irq = d.irq } end
  end
  for k, v in pairs(type(opts.acpi) == "table" and opts.acpi or {}) do aopts[k] = v end
  local ok, built = pcall(acpi.build, aopts)
  if not ok then return nil, tostring(built) end
  return built
end

-- struct boot_params as kvm.bootparams.pack takes it, without e820 (plan.e820).
local function plan_bootparams(p)
  local l, rd = p.layout, p.initrd
  local hdr
  if p.kind == "bzimage" then
    hdr = copy(p.kernel.hdr)
    hdr.code32_start = p.kernel.load_addr
  else
    hdr = { boot_flag = 0xaa55, header = bootparams.HDRS_MAGIC, version = 0x020f,
            kernel_alignment = 0x200000, cmdline_size = p.cmdline_size }
  end
  hdr.type_of_loader = bootparams.LOADER_UNDEFINED
  hdr.loadflags = (hdr.loadflags or 0) | bootparams.LOADED_HIGH | bootparams.CAN_USE_HEAP
  hdr.heap_end_ptr = 0xfe00
  hdr.vid_mode = 0xffff
  hdr.cmd_line_ptr = l.cmdline & 0xffffffff
  if rd then
    hdr.ramdisk_image = rd.addr & 0xffffffff
    hdr.ramdisk_size = rd.size & 0xffffffff
  end
  return {
    hdr = hdr,
    ext_cmd_line_ptr = l.cmdline >> 32,
    ext_ramdisk_image = rd and rd.addr >> 32 or 0,
    ext_ramdisk_size = rd and rd.size >> 32 or 0,
    acpi_rsdp_addr = p.acpi and p.acpi.rsdp or nil,
  }
end

-- The CPUID table (kvm.cpuid: hypervisor bit, the profile, the user's hook)
-- and the long-mode set-up it decides (1 GiB pages when the guest has pdpe1gb).
local function plan_cpu(p, opts)
  -- the platform step makes an in-kernel irqchip: its LAPIC timer has the
  -- TSC-deadline mode when KVM says so
  local deadline = (kvm.check_extension("tsc_deadline_timer") or 0) > 0
  local entries, err = cpuid.guest{ profile = p.profile, hook = opts.cpuid, entries = opts.cpuid_entries,
                                    cpus = p.cpus, tsc_deadline = deadline }
  if not entries then return nil, err end
  p.cpuid = entries
  local huge_1g = p.layout.huge_1g
  if huge_1g == nil then
    local ext = cpuid.find(entries, 0x80000001)
    huge_1g = ext ~= nil and (ext.edx >> 26) & 1 == 1
  end
  p.long_mode = { gdt = p.layout.gdt, page_tables = p.layout.page_tables, map_size = 4 * GiB,
                  huge_1g = huge_1g }
  p.registers = { rsi = p.layout.zero_page, rflags = x86.RFLAGS_RESERVED, rsp = 0 }
  return true
end

--- Everything a boot needs that needs no VM, as data: the files are probed
-- and the layout checked here, so `apply` only builds. `apply` takes the plan
-- as it is: a field derived from another (the e820 map and `ranges` from
-- `ram` and `layout`, the zero page from the placements) is not worked out
-- again, so change both, or give `ram` and `layout` to `plan`.
-- @tparam table opts as `linux.boot` (`steps` is `apply`'s); also `ram` (a
--   list of `{guest=, size=}`, the first at 0: the memory slots, and RAM in
--   the e820 map; default `linux.ram_regions(memory)`, and `memory` defaults to
--   their sum) and `cpuid_entries` (the list CPUID starts from, default
--   kvm.supported_cpuid())
-- @treturn table plan `{kind = "elf"|"bzimage", kernel = {path=, size=, hdr=,
--   load_addr=, ...}, initrd = {path=, size=, addr=} or nil, memory=, ram=,
--   layout=, cmdline=, cmdline_size=, ranges = {{name=, addr=, size=}, ...},
--   entry = the 64-bit entry (nil for an ELF: its own, at load), e820 = {{addr=,
--   size=, type=}, ...}, acpi = kvm.acpi.build's result or false, bootparams =
--   the zero page for kvm.bootparams.pack (its e820 is plan.e820), cpuid =
--   entries, long_mode = kvm.x86.long_mode's layout, registers = set_regs's
--   (rip is ctx.entry), devices =
--   {serial = {port=, irq=, output=, input=}, power = true, virtio = {{kind =
--   "blk", path=, readonly=, size=, base=, irq=}, {kind = "rng", base=,
--   irq=}, {kind = "console", output=, input=, base=, irq=} or {kind =
--   "lua", options = vm:virtio's options, base=, irq=}, ...} (only with
--   disks, rng, virtio_console or virtio)}, profile = the host
--   profile or false, hugepages=}`. Numbers, strings and tables, but for the
--   profile's functions, the console's `output`/`input` and the Lua devices'
--   options as given.
-- @return[2] nil, message (a bad file, a layout that does not fit, a bad `acpi`, KVM's CPUID failing)
-- @raise on bad options; what the `bootparams` hook (given the zero page
--   with `e820` as a kvm.e820 map) and the `cpuid` hook raise
function linux.plan(opts)
  local memory, ram = check_opts(opts)
  local profile = opts.profile
  if profile == nil then profile = hostprofile.detect() or false end
  local p = { memory = memory, ram = ram, profile = profile, hugepages = opts.hugepages,
              layout = linux.layout(memory, opts.layout), cpus = opts.cpus or 1 }
  local ok, err = plan_files(p, opts)
  if not ok then return nil, err end
  ok, err = plan_layout(p)
  if not ok then return nil, err end
  ok, err = plan_virtio(p, opts)
  if not ok then return nil, err end
  p.acpi, err = plan_acpi(p, opts)
  if p.acpi == nil then return nil, err end
  local bp = plan_bootparams(p)
  bp.e820 = linux.e820_map(p.layout, ram)
  if opts.bootparams then opts.bootparams(bp) end  -- a hook to change anything
  local map = bp.e820
  if getmetatable(map) and type(map.entries) == "function" then map = map:entries() end
  p.e820, bp.e820 = map, nil
  p.bootparams = bp
  ok, err = plan_cpu(p, opts)
  if not ok then return nil, err end
  p.devices = { serial = { port = 0x3f8, irq = 4, output = opts.output, input = opts.input },
                legacy = true, power = p.acpi and true or false }
  if #p.virtio > 0 then p.devices.virtio = p.virtio end
  p.virtio = nil
  return p
end

-- ---- the steps ----

--- The steps `apply` runs, in this order.
linux.ORDER = { "memory", "platform", "kernel", "initrd", "cmdline", "acpi", "zero_page",
                "devices", "vcpu", "cpuid", "long_mode", "registers" }

--- The default steps: `function(ctx, plan)`, by name. Each puts a part of the
-- plan into `ctx.vm` (and sets fields of ctx); it returns nothing on success,
-- nil and a message (or false) to fail the set-up, and may raise.
-- @table STEPS
linux.STEPS = {}

--- RAM: one memory slot per `plan.ram` region (`ctx.ram`).
function linux.STEPS.memory(ctx, plan)
  for _, r in ipairs(plan.ram) do
    local m, err = ctx.vm:memory{ guest = r.guest, size = r.size, hugepages = plan.hugepages }
    if not m then return nil, err end
    ctx.ram[#ctx.ram + 1] = m
  end
end

--- The VT-x identity-map page and TSS, the in-kernel irqchip and PIT.
function linux.STEPS.platform(ctx, plan)
  local vm = ctx.vm
  local ok, err = vm:identity_map_addr(plan.layout.identity_map)
  if ok then ok, err = vm:tss_addr(plan.layout.tss) end
  if ok then ok, err = vm:irqchip() end
  if ok then ok, err = vm:pit() end
  if not ok then return nil, err end
end

--- The kernel: an ELF where its program headers say (checked against the
-- other ranges), a bzImage's protected-mode part at `load_addr`; `ctx.entry`.
function linux.STEPS.kernel(ctx, plan)
  local k = plan.kernel
  if plan.kind == "elf" then
    local info, err = ctx.vm:load_elf(k.path)
    if not info then return nil, err end
    local ok, rerr = pcall(linux.check_ranges, {
      { name = "kernel", addr = info.low, size = info.high - info.low },
      table.unpack(plan.ranges) }, plan.ram)
    if not ok then return nil, rerr end
    ctx.kernel.elf = info
    ctx.entry = plan.entry or info.entry_phys or info.entry
  else
    local n, err = ctx.ram[1]:load(k.load_addr, k.path, k.kernel_offset)  -- ram[1] starts at 0
    if not n then return nil, err end
    ctx.entry = plan.entry
  end
end

--- The initrd at `plan.initrd.addr`.
function linux.STEPS.initrd(ctx, plan)
  local rd = plan.initrd
  if not rd then return end
  local n, err = ctx.ram[1]:load(rd.addr, rd.path)
  if not n then return nil, err end
end

--- The command line and its NUL at `layout.cmdline`.
function linux.STEPS.cmdline(ctx, plan)
  ctx.vm:write(plan.layout.cmdline, plan.cmdline .. "\0")
end

--- The ACPI tables (kvm.acpi.write), unless `plan.acpi` is false.
function linux.STEPS.acpi(ctx, plan)
  if plan.acpi then acpi.write(ctx.vm, plan.acpi) end
end

--- The zero page: `plan.bootparams` with `plan.e820`, packed at `layout.zero_page`.
function linux.STEPS.zero_page(ctx, plan)
  local bp = copy(plan.bootparams)
  bp.e820 = plan.e820
  ctx.vm:write(plan.layout.zero_page, bootparams.pack(bp))
end

--- The devices a boot touches: the UART, the legacy ports, with ACPI the
-- PM1a ports the FADT names (vm:power: S5 ends the run with "poweroff"), and
-- the virtio devices the DSDT names (`ctx.virtio`, kvm.virtio objects in
-- `plan.devices.virtio` order; the Lua ones by vm:virtio).
function linux.STEPS.devices(ctx, plan)
  local d, vm = plan.devices, ctx.vm
  local s = d.serial
  if s then vm:serial{ port = s.port, irq = s.irq, output = s.output or io.stdout, input = s.input } end
  if d.legacy then vm:legacy_ports() end
  local built = plan.acpi
  if d.power and built then
    vm:power{ evt = built.pm1a_evt, cnt = built.pm1a_cnt, s5 = built.s5_slp_typ }
  end
  ctx.virtio = {}
  for i, v in ipairs(d.virtio or {}) do
    local dev, err
    if v.kind == "blk" then
      dev, err = vm:virtio_blk{ path = v.path, readonly = v.readonly, discard = v.discard, base = v.base,
                                irq = v.irq }
    elseif v.kind == "console" then
      dev = vm:virtio_console{ output = v.output, input = v.input, base = v.base, irq = v.irq }
    elseif v.kind == "lua" then
      local o = copy(v.options)
      o.base, o.irq = v.base, v.irq
      dev = vm:virtio(o)
    else
      dev, err = vm:virtio_rng{ base = v.base, irq = v.irq }
    end
    if not dev then return nil, err end
    ctx.virtio[i] = dev
  end
end

--- `plan.cpus` vCPUs, ids 0.. (`ctx.cpus`); vCPU 0 (`ctx.cpu`) is the
-- bootstrap processor, which the next steps set up. The others wait, in
-- KVM's in-kernel local APIC, for the guest's INIT and start-up IPIs.
function linux.STEPS.vcpu(ctx, plan)
  ctx.cpus = {}
  for i = 0, (plan.cpus or 1) - 1 do
    local cpu, err = ctx.vm:vcpu(i)
    if not cpu then return nil, err end
    ctx.cpus[i + 1] = cpu
  end
  ctx.cpu = ctx.cpus[1]
end

--- What the guest's CPUID says: `plan.cpuid`, with each vCPU's APIC id
-- (kvm.cpuid.for_cpu).
function linux.STEPS.cpuid(ctx, plan)
  for i, cpu in ipairs(ctx.cpus or { ctx.cpu }) do
    local entries = i == 1 and plan.cpuid or cpuid.for_cpu(plan.cpuid, i - 1, plan.cpus)
    local ok, err = cpu:set_cpuid(entries)
    if not ok then return nil, err end
  end
end

--- Long mode: page tables, GDT, control registers (kvm.x86.long_mode).
function linux.STEPS.long_mode(ctx, plan)
  x86.long_mode(ctx.cpu, ctx.vm, plan.long_mode)
end

--- rip = ctx.entry, rsi = the zero page, interrupts off.
function linux.STEPS.registers(ctx, plan)
  local regs = copy(plan.registers)
  regs.rip = ctx.entry
  ctx.cpu:set_regs(regs)
end

-- The steps of one call: linux.STEPS with `user` over it, in linux.ORDER.
local function steps_for(user)
  if user ~= nil and type(user) ~= "table" then
    error("linux.apply: steps must be a table of functions by name, got " .. type(user), 3)
  end
  for name, fn in pairs(user or {}) do
    if linux.STEPS[name] == nil then
      error(fmt("linux.apply: unknown step '%s' (steps: %s)", tostring(name), table.concat(linux.ORDER, ", ")), 3)
    end
    if type(fn) ~= "function" and fn ~= false then
      error(fmt("linux.apply: step '%s' must be a function or false, got %s", name, type(fn)), 3)
    end
  end
  local list = {}
  for _, name in ipairs(linux.ORDER) do
    local fn = linux.STEPS[name]
    if user and user[name] ~= nil then fn = user[name] end
    if fn then list[#list + 1] = { name = name, fn = fn } end
  end
  return list
end

-- A to-be-closed guard over a ctx: when it goes out of scope unreleased (a
-- step failed or raised) it closes what the steps made, the vCPU and the
-- memory regions (each holds its own fd or mapping), then the VM. A guard
-- rather than `local vm <close>`: the objects only need a close method
-- (spec/fuzz wraps kvm.vm()), and the vCPU and memory close too.
local Guard = { __close = function(g)
  local ctx = g.ctx
  if not ctx then return end
  if ctx.cpu then ctx.cpu:close() end
  for i = #ctx.ram, 1, -1 do ctx.ram[i]:close() end
  ctx.vm:close()
end }

--- Create the VM and run the steps that put `plan` into it.
-- When a step fails (nil, message) or raises, or `kvm.vm()` fails, the VM is
-- closed before `apply` returns or the error goes on: nothing is left open;
-- only the ctx of a set-up that succeeded holds the VM.
-- @tparam table plan from `linux.plan` (changed or not)
-- @tparam[opt] table steps `{name = function(ctx, plan) | false}`: this call's
--   steps over `linux.STEPS` (false skips one); the module's table is not changed
-- @treturn table ctx {vm=, cpu=, ram={...}, layout=, e820 = a kvm.e820 map of
--   plan.e820, cmdline=, entry=, kind=, kernel = plan.kernel (and `elf`, what
--   vm:load_elf returned), initrd = {addr=, size=, path=} or nil, profile=,
--   acpi = kvm.acpi.build's result (nil with acpi = false; the guest's S5
--   makes run() return "poweroff"),
--   plan = plan}
-- @return[2] nil, message (KVM failing, a step's message)
-- @raise on a bad `steps` table; what a step raises (after closing the VM)
function linux.apply(plan, steps)
  if type(plan) ~= "table" then error("linux.apply: plan table expected", 2) end
  local list = steps_for(steps)
  local ctx = {
    ram = {}, layout = plan.layout, e820 = e820.from_entries(plan.e820),
    cmdline = plan.cmdline, entry = plan.entry, kind = plan.kind, kernel = copy(plan.kernel),
    initrd = plan.initrd and copy(plan.initrd) or nil, profile = plan.profile,
    acpi = plan.acpi or nil, plan = plan,
  }
  local vm, err = kvm.vm()
  if not vm then return nil, err end
  ctx.vm = vm                               -- nothing between here and the guard raises
  local guard <close> = setmetatable({ ctx = ctx }, Guard)
  for _, step in ipairs(list) do
    local ok, serr = step.fn(ctx, plan)
    if ok == false or (ok == nil and serr ~= nil) then
      return nil, serr or ("linux.apply: step '" .. step.name .. "' failed")
    end
  end
  guard.ctx = nil                           -- the caller's now
  return ctx
end

--- Everything but running: `linux.apply(linux.plan(opts), opts.steps)`.
-- Every check on the files and the layout is done before the VM exists;
-- nothing is written outside guest memory.
-- @tparam table opts as `linux.boot`
-- @treturn table ctx, as `linux.apply`
-- @return[2] nil, message (a bad file, a layout that does not fit, KVM failing)
-- @raise on bad options, and what a hook or step raises (nothing is left open)
function linux.setup(opts)
  local plan, err = linux.plan(opts)
  if not plan then return nil, err end
  local ctx, aerr = linux.apply(plan, opts.steps)
  if ctx then ctx.opts = opts end
  return ctx, aerr
end

-- ---- snapshots ----

--- The options that build the machine: what a snapshot of a booted kernel
-- keeps (its meta), so that `linux.restore` builds the same VM elsewhere.
-- The rest (functions, files, output and input) belong to the process.
linux.MACHINE_OPTS = { "kernel", "initrd", "cmdline", "append", "memory", "cpus", "ram", "layout",
                       "disks", "rng", "acpi", "hugepages" }

local META_MAGIC = "luakvm-linux 1\n"

-- data (strings, integers, booleans, tables of them) as bytes, and back
local function encode(v, out, depth)
  local t = math.type(v) or type(v)
  if depth > 8 then error("linux.save: options nested too deep", 0) end
  if t == "string" then out[#out + 1] = string.pack("<c1s4", "s", v)
  elseif t == "integer" then out[#out + 1] = string.pack("<c1i8", "i", v)
  elseif t == "boolean" then out[#out + 1] = v and "T" or "F"
  elseif t == "table" then
    out[#out + 1] = "t"
    for k, x in pairs(v) do
      local kt, xt = math.type(k) or type(k), math.type(x) or type(x)
      if (kt == "string" or kt == "integer") and (xt ~= "function" and xt ~= "userdata"
         and xt ~= "thread" and xt ~= "float") then
        encode(k, out, depth + 1)
        encode(x, out, depth + 1)
      end
    end
    out[#out + 1] = "e"
  else error("linux.save: cannot keep a " .. t .. " in a snapshot", 0) end
end

local function decode(s, pos, depth)
  if depth > 8 then error("nested too deep", 0) end
  local tag = s:sub(pos, pos)
  if tag == "s" then return string.unpack("<s4", s, pos + 1)
  elseif tag == "i" then return string.unpack("<i8", s, pos + 1)
  elseif tag == "T" or tag == "F" then return tag == "T", pos + 1
  elseif tag == "t" then
    local t = {}
    pos = pos + 1
    while s:sub(pos, pos) ~= "e" do
      if pos > #s then error("truncated", 0) end
      local k, x
      k, pos = decode(s, pos, depth + 1)
      x, pos = decode(s, pos, depth + 1)
      if type(k) == "table" or type(k) == "boolean" then error("bad key", 0) end
      t[k] = x
    end
    return t, pos + 1
  end
  error("bad tag at byte " .. pos, 0)
end

--- Save a booted kernel's VM to a file: `ctx.vm:snapshot()` with the
-- options that built it (`linux.MACHINE_OPTS` of `ctx.opts`) as its meta,
-- then `snap:save(path)`. Call it between runs (e.g. from `on_exit`).
-- @tparam table ctx from `linux.setup`
-- @tparam string path
-- @return the snapshot
-- @return[2] nil, message
function linux.save(ctx, path)
  local keep = {}
  for _, k in ipairs(linux.MACHINE_OPTS) do keep[k] = (ctx.opts or {})[k] end
  local ok, meta = pcall(function()
    local out = { META_MAGIC }
    encode(keep, out, 0)
    return table.concat(out)
  end)
  if not ok then return nil, meta end
  local snap, err = ctx.vm:snapshot()
  if not snap then return nil, err end
  snap.meta = meta
  local saved, serr = snap:save(path)
  if not saved then return nil, serr end
  return snap
end

--- The steps a restore runs: the VM, its memory, devices and vCPUs are
-- built as for a boot; what only fills guest memory or sets registers is
-- left out (the snapshot brings them).
linux.RESTORE_STEPS = { kernel = false, initrd = false, cmdline = false, acpi = false,
                        zero_page = false, long_mode = false, registers = false }

--- Build the machine a `linux.save` file describes and put it in that state.
-- @tparam string path
-- @tparam[opt] table over options for this process: `output`, `input`,
--   `virtio_console`, `timeout`, `profile`, ... (the machine's own come
--   from the file; the kernel and disk files it names must still be there)
-- @treturn table ctx, as `linux.setup`, running from the saved state
-- @return[2] nil, message (a bad or foreign file, a machine that cannot be
--   built, a state KVM refuses)
function linux.restore(path, over)
  local snap, err = kvm.load_snapshot(path)
  if not snap then return nil, err end
  local meta = snap.meta
  if type(meta) ~= "string" or meta:sub(1, #META_MAGIC) ~= META_MAGIC then
    return nil, path .. ": not a snapshot of a kvm.linux machine (linux.save writes those)"
  end
  local ok, opts, stop = pcall(decode, meta, #META_MAGIC + 1, 0)
  if not ok or type(opts) ~= "table" or stop ~= #meta + 1 then
    return nil, path .. ": its machine options are malformed (" .. tostring(ok and "trailing bytes" or opts) .. ")"
  end
  for k, v in pairs(over or {}) do opts[k] = v end
  local steps = copy(linux.RESTORE_STEPS)
  for k, v in pairs((over or {}).steps or {}) do steps[k] = v end
  opts.steps = steps
  local sok, ctx, serr = pcall(linux.setup, opts)
  if not sok then return nil, path .. ": " .. tostring(ctx) end
  if not ctx then return nil, serr end
  local rok, rerr = ctx.vm:restore(snap)
  if not rok then
    for _, c in ipairs(ctx.cpus or {}) do c:close() end
    ctx.vm:close()
    return nil, path .. ": " .. rerr
  end
  ctx.snapshot = snap
  return ctx
end

--- Set up and run a kernel until an exit nobody handles.
-- @tparam table opts `kernel` (path, required), `initrd` (path), `cmdline`
--   (default `linux.DEFAULT_CMDLINE`; this host's profile appends what it
--   needs), `append` (more parameters), `memory` (bytes, default 128 MiB),
--   `cpus` (vCPUs, default 1, at most `linux.MAX_CPUS`: the ACPI MADT lists
--   them, each gets its APIC id in CPUID, the guest starts the others),
--   `ram` (the RAM regions, see `linux.plan`), `layout` (placements, see
--   `linux.DEFAULT_LAYOUT`), `cpuid` (function(entries), change or return the
--   CPUID table), `on_exit` (function(e, ctx): return true to resume the
--   guest), `output` / `input` (the serial console's FILE or function;
--   default io.stdout, no input), `timeout` (seconds), `profile` (a host
--   profile, false for none; default: detected), `bootparams` (function(bp)
--   to change boot_params before packing), `acpi` (false, or options for
--   kvm.acpi.build), `hugepages`, `steps` (see `linux.apply`), `disks` (a list
--   of image paths or `{path =, readonly = false, discard = true}`:
--   virtio-blk devices, the first /dev/vda; vm:virtio_blk's options), `rng`
--   (true: a virtio-rng device), `virtio_console` (`{output =, input =}` as
--   vm:virtio_console's: the guest's /dev/hvc0), `virtio` (a list of
--   vm:virtio's options but `base` and `irq`: virtio devices written in Lua,
--   in the slots after the others; a block device among them is a /dev/vdX
--   after the `disks`).
-- @return the Exit that ended the run, and ctx
-- @return[2] nil, message
function linux.boot(opts)
  local ctx, err = linux.setup(opts)
  if not ctx then return nil, err end
  local e = linux.run(ctx, opts)
  return e, ctx
end

--- Run a set-up kernel until an exit nobody handles: the host profile and
-- `opts.on_exit` see each exit run() returns and may resume the guest.
-- @tparam table ctx from `linux.setup`
-- @tparam[opt] table opts `timeout` (seconds for the whole run; the exit is
--   then reason "timeout"), `on_exit` (function(e, ctx), true resumes),
--   `every` + `on_tick` (function(ctx, elapsed_seconds) called every `every`
--   seconds while the guest runs: progress reports), `unclaimed` ("ignore",
--   the default: all ones; "return": end the run at such an access)
-- @return the Exit that ended the run
function linux.run(ctx, opts)
  opts = opts or {}
  local start = kvm.now()
  local deadline = opts.timeout and start + opts.timeout
  -- a port or MMIO address nobody claimed reads as all ones and ignores
  -- writes, as on a PC (and in QEMU and Firecracker): a kernel probing for
  -- hardware that is not there goes on (counted in vm:stats())
  local run_opts = { unclaimed = opts.unclaimed or "ignore" }
  while true do
    local slice = opts.every
    if deadline then
      local left = math.max(deadline - kvm.now(), 0.001)
      if not slice or left < slice then slice = left end
    end
    run_opts.timeout = slice
    run_opts.cpus = ctx.cpus
    local e = ctx.vm:run(run_opts)   -- every vCPU, each on a thread (one: on this one)
    local resume = false
    if e.reason == "timeout" and opts.every and (not deadline or kvm.now() < deadline) then
      -- a slice ended, not the run
      if opts.on_tick then opts.on_tick(ctx, kvm.now() - start) end
      resume = true
    else
      if ctx.profile and ctx.profile.on_exit then resume = ctx.profile.on_exit(e, ctx) end
      if not resume and opts.on_exit then resume = opts.on_exit(e, ctx) end
    end
    if not resume then return e end
  end
end

return linux
