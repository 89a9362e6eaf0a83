--- Boot a Linux kernel (ELF vmlinux or bzImage) with the 64-bit boot protocol.
--
-- Every step is a function a script can call on its own or replace:
-- `linux.layout` (where everything goes), `linux.e820_map`, `linux.probe`
-- (what the kernel file is), `linux.setup` (VM, memory, devices, kernel,
-- initrd, boot_params, CPUID, registers: everything but running) and
-- `linux.boot` (setup, then run until something nobody handles).
--
--     local linux = require "kvm.linux"
--     local e = linux.boot{ kernel = "vmlinux", memory = 128 << 20 }
--     print(e)
--
-- @module kvm.linux
local kvm = require "kvm"
local x86 = require "kvm.x86"
local bootparams = require "kvm.bootparams"
local e820 = require "kvm.e820"
local hostprofile = require "kvm.hostprofile"
local acpi = require "kvm.acpi"
local cpuid = require "kvm.cpuid"
local pm = require "kvm.pm"

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

--- Start of the 32-bit PCI/MMIO hole: RAM above this moves to 4 GiB.
linux.HOLE_START = 3 * GiB

--- Default placements (guest-physical). `initrd` and `kernel` are computed
-- (initrd: top of RAM; kernel: from the file) unless given.
linux.DEFAULT_LAYOUT = {
  gdt = 0x500,              -- 4 descriptors: null, null, code 0x10, data 0x18
  zero_page = 0x7000,       -- struct boot_params, 4 KiB
  page_tables = 0x9000,     -- PML4, PDPT, page directories (6 pages for 4 GiB)
  cmdline = 0x20000,        -- up to cmdline_size bytes
  identity_map = 0xfeffc000, -- VT-x real-mode identity page (1 page)
  tss = 0xfeffd000,         -- VT-x TSS (3 pages)
  acpi = 0xe0000,           -- ACPI tables (kvm.acpi), in the reserved legacy hole
}

local function hex(v) return fmt("0x%x", v) end

--- A complete layout: the defaults, overridden by `user`, for `memory` bytes.
-- @tparam integer memory RAM size in bytes
-- @tparam[opt] table user placements to override
-- @treturn table layout
function linux.layout(memory, user)
  local l = {}
  for k, v in pairs(linux.DEFAULT_LAYOUT) do l[k] = v end
  for k, v in pairs(user or {}) do l[k] = v end
  l.memory = memory
  return l
end

--- RAM regions for `memory` bytes: below the 3 GiB hole, and the rest from 4 GiB.
-- @treturn table array of {guest=, size=}
function linux.ram_regions(memory)
  if memory <= linux.HOLE_START then return { { guest = 0, size = memory } } end
  return { { guest = 0, size = linux.HOLE_START },
           { guest = 4 * GiB, size = memory - linux.HOLE_START } }
end

--- The e820 map the guest sees: RAM below the EBDA, the legacy hole
-- 0x9fc00-0xfffff reserved, RAM from 1 MiB, the VT-x TSS and identity-map
-- pages reserved.
-- @tparam table layout from `linux.layout`
-- @return an e820 map (kvm.e820)
function linux.e820_map(layout)
  local map = e820.new()
  local regions = linux.ram_regions(layout.memory)
  map:add_ram(0, 0x9fc00)
  map:reserve(0x9fc00, 0x100000 - 0x9fc00)
  local first = regions[1]
  map:add_ram(0x100000, first.size - 0x100000)
  for i = 2, #regions do map:add_ram(regions[i].guest, regions[i].size) end
  map:reserve(layout.identity_map, 0x1000)
  map:reserve(layout.tss, 0x3000)
  return map
end

--- What a kernel file is.
-- @tparam string path
-- @treturn string "elf" or "bzimage"
-- @treturn table for a bzImage: the setup header and info (kvm.bootparams.read_setup_header)
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

--- Everything but running: VM, RAM, devices, kernel, initrd, boot_params,
-- CPUID and registers. Options as `linux.boot`. Every check on the files and
-- the layout is done before the vCPU exists; nothing is written outside
-- guest memory.
-- @treturn table ctx {vm=, cpu=, ram={...}, layout=, e820=, cmdline=, entry=, kind=, profile=,
--   acpi = kvm.acpi.build's result (nil with acpi = false), power = {state = "poweroff" once
--   the guest entered S5: run() then returned "poweroff"}}
-- @return[2] nil, message (a bad file, a layout that does not fit, KVM failing)
function linux.setup(opts)
  if type(opts) ~= "table" then error("linux.setup: options table expected", 2) end
  local kernel = opts.kernel
  if type(kernel) ~= "string" then error("linux.setup: 'kernel' (a path) is required", 2) end
  local memory = opts.memory or linux.DEFAULT_MEMORY
  if math.type(memory) ~= "integer" or memory < 16 * MiB or memory & 0x1fffff ~= 0 then
    error("linux.setup: 'memory' must be an integer number of bytes, >= 16 MiB, a multiple of 2 MiB", 2)
  end
  local profile = opts.profile
  if profile == nil then profile = hostprofile.detect() end
  local layout = linux.layout(memory, opts.layout)

  -- the files first: nothing is created for a bad kernel or initrd
  local kind, kinfo = linux.probe(kernel)
  if not kind then return nil, kinfo end
  local initrd_size
  if opts.initrd then
    local err
    initrd_size, err = file_size(opts.initrd)
    if not initrd_size then return nil, err end
  end

  local cmdline = opts.cmdline or linux.DEFAULT_CMDLINE
  if profile and profile.cmdline and profile.cmdline ~= "" then
    cmdline = cmdline .. " " .. profile.cmdline
  end
  if opts.append and opts.append ~= "" then cmdline = cmdline .. " " .. opts.append end
  local cmdline_size = kind == "bzimage" and kinfo.hdr.cmdline_size or 2047
  if #cmdline > cmdline_size then
    return nil, fmt("command line is %d bytes, the kernel accepts at most %d", #cmdline, cmdline_size)
  end
  if cmdline:find("\0", 1, true) then return nil, "command line contains a NUL byte" end

  local regions = linux.ram_regions(memory)
  local top = regions[1].size                -- initrd and boot data stay below the hole
  local ranges = {
    { name = "gdt", addr = layout.gdt, size = 32 },
    { name = "zero_page", addr = layout.zero_page, size = 0x1000 },
    { name = "page_tables", addr = layout.page_tables, size = 0x6000 },
    { name = "cmdline", addr = layout.cmdline, size = #cmdline + 1 },
  }
  -- the kernel's range
  local load_addr
  if kind == "bzimage" then
    local hdr = kinfo.hdr
    local image = kinfo.size - kinfo.kernel_offset
    if image <= 0 then return nil, kernel .. ": bzImage has no protected-mode kernel" end
    load_addr = layout.kernel
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
        kernel, hex(load_addr), hex(load_addr + need - 1), memory >> 20)
    end
    ranges[#ranges + 1] = { name = "kernel", addr = load_addr, size = need }
    kinfo.image = image
  else
    if kinfo.size > memory then
      return nil, fmt("%s: kernel file (%d MiB) is bigger than RAM (%d MiB)", kernel,
        kinfo.size >> 20, memory >> 20)
    end
  end
  -- the initrd: top of low RAM, below initrd_addr_max, page-aligned
  local initrd_addr
  if initrd_size then
    local max = (kind == "bzimage" and kinfo.hdr.initrd_addr_max or 0x7fffffff) + 1
    local limit = ult(top, max) and top or max
    if initrd_size >= limit then
      return nil, fmt("%s: initrd (%d bytes) does not fit below %s", opts.initrd, initrd_size, hex(limit))
    end
    initrd_addr = layout.initrd or ((limit - initrd_size) & ~0xfff)
    ranges[#ranges + 1] = { name = "initrd", addr = initrd_addr, size = math.max(initrd_size, 1) }
  end
  local ok, err = pcall(linux.check_ranges, ranges, regions)
  if not ok then return nil, err end

  -- the VM
  local vm, verr = kvm.vm()
  if not vm then return nil, verr end
  local function fail(msg) vm:close(); return nil, msg end
  local rams = {}
  for _, r in ipairs(regions) do
    local m, merr = vm:memory{ guest = r.guest, size = r.size, hugepages = opts.hugepages }
    if not m then return fail(merr) end
    rams[#rams + 1] = m
  end
  local okd, derr = vm:identity_map_addr(layout.identity_map)
  if not okd then return fail(derr) end
  okd, derr = vm:tss_addr(layout.tss)
  if not okd then return fail(derr) end
  okd, derr = vm:irqchip()
  if not okd then return fail(derr) end
  okd, derr = vm:pit()
  if not okd then return fail(derr) end

  -- the kernel
  local entry
  if kind == "elf" then
    local info, lerr = vm:load_elf(kernel)
    if not info then return fail(lerr) end
    entry = info.entry_phys or info.entry
    local okr, rerr = pcall(linux.check_ranges, {
      { name = "kernel", addr = info.low, size = info.high - info.low },
      table.unpack(ranges) }, regions)
    if not okr then return fail(rerr) end
    kinfo.elf = info
  else
    local low = rams[1]
    local n, lerr = low:load(load_addr, kernel, kinfo.kernel_offset)
    if not n then return fail(lerr) end
    entry = load_addr + 0x200
  end
  if initrd_addr then
    local n, ierr = rams[1]:load(initrd_addr, opts.initrd)
    if not n then return fail(ierr) end
  end
  vm:write(layout.cmdline, cmdline .. "\0")

  -- boot_params
  local map = linux.e820_map(layout)
  local hdr
  if kind == "bzimage" then
    hdr = {}
    for k, v in pairs(kinfo.hdr) do hdr[k] = v end
    hdr.code32_start = load_addr
  else
    hdr = { boot_flag = 0xaa55, header = bootparams.HDRS_MAGIC, version = 0x020f,
            kernel_alignment = 0x200000, cmdline_size = cmdline_size }
  end
  hdr.type_of_loader = bootparams.LOADER_UNDEFINED
  hdr.loadflags = (hdr.loadflags or 0) | bootparams.LOADED_HIGH | bootparams.CAN_USE_HEAP
  hdr.heap_end_ptr = 0xfe00
  hdr.vid_mode = 0xffff
  hdr.cmd_line_ptr = layout.cmdline
  if initrd_addr then
    hdr.ramdisk_image = initrd_addr & 0xffffffff
    hdr.ramdisk_size = initrd_size & 0xffffffff
  end
  local bp = {
    hdr = hdr, e820 = map,
    ext_cmd_line_ptr = layout.cmdline >> 32,
    ext_ramdisk_image = initrd_addr and initrd_addr >> 32 or 0,
    ext_ramdisk_size = initrd_size and initrd_size >> 32 or 0,
  }
  -- the machine description: ACPI tables (CPUs, IOAPIC, power off); opts.acpi
  -- = false leaves them out, a table adds to the options of kvm.acpi.build
  local built
  if opts.acpi ~= false then
    local aopts = { base = layout.acpi, cpus = 1, irq0_gsi = 0 }  -- KVM routes the PIT to IOAPIC pin 0
    for k, v in pairs(type(opts.acpi) == "table" and opts.acpi or {}) do aopts[k] = v end
    local okb, b = pcall(acpi.build, aopts)
    if not okb then return fail(tostring(b)) end
    built = b
    acpi.write(vm, built)
    bp.acpi_rsdp_addr = built.rsdp
  end
  if opts.bootparams then opts.bootparams(bp) end  -- a hook to change anything
  vm:write(layout.zero_page, bootparams.pack(bp))

  -- devices a boot touches
  vm:serial{ port = 0x3f8, irq = 4, output = opts.output or io.stdout, input = opts.input }
  vm:legacy_ports()
  local power = {}
  if built then
    -- PM1a: S5 ends the run with "poweroff" (and ctx.power.state = "poweroff")
    pm.attach(vm, { evt = built.pm1a_evt, cnt = built.pm1a_cnt, on_sleep = function(typ)
      if typ == pm.S5 then power.state = "poweroff" return kvm.POWEROFF end
    end })
  end

  -- the vCPU: CPUID, long mode, registers
  local cpu, cerr = vm:vcpu(0)
  if not cpu then return fail(cerr) end
  -- what the guest sees (kvm.cpuid): the hypervisor bit, KVM's leaves, the
  -- host profile's changes, the user's hook last
  local entries, cpuerr = cpuid.guest{ profile = profile, hook = opts.cpuid }
  if not entries then return fail(cpuerr) end
  local okc, cperr = cpu:set_cpuid(entries)
  if not okc then return fail(cperr) end
  -- 1 GiB pages when the guest's CPUID offers them (pdpe1gb), else 2 MiB
  local huge_1g = layout.huge_1g
  if huge_1g == nil then
    huge_1g = false
    for _, ent in ipairs(entries) do
      if ent.func == 0x80000001 and (ent.edx >> 26) & 1 == 1 then huge_1g = true end
    end
  end
  x86.long_mode(cpu, vm, { gdt = layout.gdt, page_tables = layout.page_tables, map_size = 4 * GiB,
                           huge_1g = huge_1g })
  cpu:set_regs{ rip = entry, rsi = layout.zero_page, rflags = x86.RFLAGS_RESERVED, rsp = 0 }

  return {
    vm = vm, cpu = cpu, ram = rams, layout = layout, e820 = map, cmdline = cmdline,
    entry = entry, kind = kind, kernel = kinfo, initrd = initrd_addr and
      { addr = initrd_addr, size = initrd_size } or nil, profile = profile,
    acpi = built, power = power,
  }
end

--- Set up and run a kernel until an exit nobody handles.
-- @tparam table opts `kernel` (path, required), `initrd` (path), `cmdline`
--   (default `linux.DEFAULT_CMDLINE`; this host's profile appends what it
--   needs), `append` (more parameters), `memory` (bytes, default 128 MiB),
--   `layout` (placements, see `linux.DEFAULT_LAYOUT`), `cpuid` (function(entries),
--   change or return the CPUID table), `on_exit` (function(e, ctx): return
--   true to resume the guest), `output` / `input` (the serial console's FILE
--   or function; default io.stdout, no input), `timeout` (seconds),
--   `profile` (a host profile, false for none; default: detected),
--   `bootparams` (function(bp) to change boot_params before packing).
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
    local e = ctx.cpu:run(run_opts)
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
